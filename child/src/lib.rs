//! The agent runtime of mitogen-rs.
//!
//! A program that wants to be replicated calls [`run_if_child`] first thing in `main`. In
//! the master this returns at once; in a process started as a child it becomes the agent:
//! it reads its bootstrap from the parent, answers with a hello carrying the hash of its own
//! image, captures its stdio into the log stream, runs calls one at a time on the main thread
//! while its broker thread keeps routing, and exits promptly when its parent is gone.
//!
//! This crate also holds the connection procedure shared by the master and intermediaries
//! ([`connect_via`], [`Method`], [`ConnectOptions`]), and the stock agent binary
//! `mitogen-agent`, which registers only the [`builtins`].

#![warn(missing_docs)]

mod agent;
pub mod build_id;
pub mod builtins;
mod connect;
mod registry;

pub use agent::AgentError;
#[doc(hidden)]
pub use connect::decode_control_messages;
pub use connect::{connect_via, ConnectError, ConnectOptions, Method};
pub use registry::Registry;

use mitogen_core::{BrokerHandle, Context, ContextId};
use std::sync::OnceLock;

static CURRENT: OnceLock<BrokerHandle> = OnceLock::new();

/// In an agent: the broker of this context, so remote functions can make receivers, or
/// talk to other contexts. `None` outside an agent.
pub fn current_broker() -> Option<&'static BrokerHandle> {
    CURRENT.get()
}

/// If this process was started as an agent, runs the agent with `registry` and never
/// returns; otherwise returns immediately. Call it first thing in `main`.
pub fn run_if_child(registry: Registry) {
    let Some(mode) = std::env::var_os(mitogen_transport_local::AGENT_ENV) else {
        return;
    };
    // Single-threaded here: nothing else reads the environment concurrently.
    std::env::remove_var(mitogen_transport_local::AGENT_ENV);
    // Handed its image as stdin, the agent has its stream on stdout alone.
    let on_stdout = mode == mitogen_transport_local::bootstrap::STREAM_ON_STDOUT;
    let code = match agent::run(registry, on_stdout) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mitogen agent: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Connects a new child directly from this context (the master, or an agent acting for
/// itself). `name` is this context's own name for prefixing (`None` in the master).
pub fn connect(
    broker: &BrokerHandle,
    method: &Method,
    opts: &ConnectOptions,
    id: ContextId,
    name: Option<&str>,
) -> Result<Context, ConnectError> {
    let inherited =
        connect::Inherited { name: name.map(str::to_string), log_level: log::max_level() as usize as u8 };
    connect::connect(broker, method, opts, id, &inherited)
}

/// Cuts `text` to at most `room` bytes (at a character boundary), marking the cut: a text
/// that must travel in one message is shortened rather than lost.
pub(crate) fn cut_to(text: &mut String, room: usize) {
    if text.len() <= room {
        return;
    }
    let mut cut = room;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(" [cut to fit max_message_size]");
}
