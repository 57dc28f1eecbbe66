//! Core of mitogen-rs: messages, codec, the sans-IO [`Router`] and the [`Broker`] I/O loop,
//! plus the channel and call primitives every context uses.
//!
//! This crate knows nothing about sudo, ssh or containers: connection methods implement
//! [`Transport`] in their own crates. Start with [`Broker`] (one I/O thread per process),
//! [`Context`] (calls), [`Receiver`]/[`Sender`]/[`Select`] (channels) and [`remote_fn!`]
//! (declaring callable functions). The wire format is described in `docs/wire-format.md`.
//!
//! Deliberately absent: process spawning (only `mitogen-transport-local` and friends start
//! processes), and any async runtime.

#![warn(missing_docs)]

pub mod broker;
mod bytes;
pub mod call;
pub mod channel;
pub mod codec;
mod context;
pub mod ids;
pub mod logs;
pub mod message;
pub mod router;
pub mod transport;

pub use broker::{Broker, BrokerConfig, BrokerError, BrokerHandle, Sink};
pub use bytes::Bytes;
pub use call::{CallError, RemoteError, RemoteErrorKind, RemoteFn};
pub use channel::{Receiver, Select, Sender};
pub use context::Context;
pub use ids::{ContextId, Handle};
pub use message::{DeadReason, Kind, Message};
pub use router::{Router, RouterConfig};
pub use transport::{
    answer_prompt, Bootstrap, Connection, Dialogue, DialogueStep, LoginError, Password, StartError, Transport,
};
