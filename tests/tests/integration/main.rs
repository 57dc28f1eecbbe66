//! Integration tests over real processes. One binary; the modules:
//!
//! - `bootstrap`: the sh first stage: each loader, the cache, refusals
//! - `calls`: typed calls, error and panic propagation, unknown functions, async, select
//! - `faults`: killed children, SIGKILLed master, start failures, timeouts, limits, shutdown
//! - `routing`: `via` chains, siblings, authority
//! - `streams`: 256 MiB each way, byte for byte
//! - `sudo`: real sudo with test accounts: passwords, via chains, requiretty, targetpw
//! - `lifecycle`: create/shutdown cycles without leaks
//! - `logs`: log records and stdio forwarded from children

#![allow(clippy::disallowed_methods)]

mod bootstrap;
mod calls;
mod chaos;
mod driver;
mod faults;
mod hangs;
mod lifecycle;
mod logs;
mod routing;
mod streams;
mod sudo;

use mitogen::{Context, Local, Router};

/// The test agent binary (registers `mitogen_tests::registry()`).
pub fn agent() -> &'static str {
    env!("CARGO_BIN_EXE_mitogen-test-agent")
}

/// A local context running the test agent.
pub fn local(r: &Router) -> Context {
    r.local(Local::new().program(agent())).expect("local context")
}

/// A local context running the test agent, started by `via`.
pub fn local_via(r: &Router, via: &Context) -> Context {
    r.local(Local::new().program(agent()).via(via)).expect("local context via")
}
