//! mitogen-rs: distributed self-replicating programs.
//!
//! A program using this crate starts copies of itself as child *contexts* and calls
//! functions in them with typed arguments and results, streams data both ways over
//! [`Sender`]/[`Receiver`] channels, and receives their logs and output. Contexts can start
//! further contexts (`via`), forming a tree the messages are routed over.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! mitogen::remote_fn! {
//!     /// Runs in the child.
//!     pub fn hostname_len(prefix: String) -> usize { prefix.len() + 1 }
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // In a child this never returns: the process becomes the agent.
//!     mitogen::run_if_child(mitogen::Registry::new().register(hostname_len));
//!
//!     let router = mitogen::Router::new()?;
//!     let child = router.local(mitogen::Local::new())?;
//!     let grandchild = router.local(mitogen::Local::new().via(&child))?;
//!     println!("{}", grandchild.call(hostname_len, ("abc".into(),))?);
//!     child.shutdown(Duration::from_secs(5))?;
//!     Ok(()) // dropping the router shuts everything down
//! }
//! ```
//!
//! Start with [`Router`]; see [`remote_fn!`] for declaring functions, [`Context`] for
//! calls, and `ARCHITECTURE.md` for how the pieces fit.

#![warn(missing_docs)]

mod router;

pub use mitogen_child::{
    builtins, current_broker, run_if_child, ConnectError, ConnectOptions, Method, Registry,
};
pub use mitogen_core::{
    remote_fn, BrokerError, Bytes, CallError, Context, ContextId, DeadReason, LoginError, Password, Receiver,
    RemoteError, RemoteErrorKind, RemoteFn, Select, Sender,
};
#[cfg(feature = "container")]
pub use mitogen_transport_container::{ContainerOptions, Runtime};
pub use mitogen_transport_local::LocalOptions;
#[cfg(feature = "ssh")]
pub use mitogen_transport_ssh::{HostKeyPolicy, SshBackend, SshOptions};
#[cfg(feature = "sudo")]
pub use mitogen_transport_sudo::{DoasOptions, SuOptions, SudoOptions};
#[cfg(feature = "container")]
pub use router::Container;
#[cfg(feature = "ssh")]
pub use router::Ssh;
pub use router::{run_with_router, Local, Router, RouterOptions};
#[cfg(feature = "sudo")]
pub use router::{Doas, Su, Sudo};

/// Lower-level pieces for transports and tools: the core crate.
pub use mitogen_core as core_api;
