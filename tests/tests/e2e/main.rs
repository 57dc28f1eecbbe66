//! End-to-end tests against real sshd hosts (Docker containers, or network namespaces
//! without an engine, provisioned by `cargo xtask e2e` / `cargo xtask test`; see
//! `mitogen_tests::e2e`). One binary; the modules:
//!
//! - `ssh`: logins (key, password, refusals, host keys), each host's properties
//! - `chains`: `via` chains mixing ssh and sudo, ten hops, errors on an intermediary
//! - `containers`: docker exec, directly and through ssh + sudo on a container host
//! - `faults`: hosts killed, paused or cut off mid-call; the master SIGKILLed
//!
//! Every test that uses ssh is written once and run per backend, as
//! `<module>::openssh::<test>` and `<module>::libssh2::<test>` (see [`per_backend`]).

#![allow(clippy::disallowed_methods)]

/// Defines each test function (taking the backend) once, and a `#[test]` for it in
/// `mod openssh` and in `mod libssh2`: one test list, run per ssh backend.
macro_rules! per_backend {
    ($($(#[$m:meta])* fn $name:ident($b:ident: SshBackend) $body:block)*) => {
        $($(#[$m])* fn $name($b: mitogen::SshBackend) $body)*
        mod openssh {
            $(#[test] fn $name() { super::$name(mitogen::SshBackend::OpenSsh) })*
        }
        mod libssh2 {
            $(#[test] fn $name() { super::$name(mitogen::SshBackend::Libssh2) })*
        }
    };
}

mod chains;
mod containers;
mod faults;
mod ssh;

use mitogen::{HostKeyPolicy, Ssh, SshBackend};
use mitogen_tests::e2e::E2e;
use std::time::Duration;

/// The test agent binary (registers `mitogen_tests::registry()`).
pub fn agent() -> &'static str {
    env!("CARGO_BIN_EXE_mitogen-test-agent")
}

/// An ssh connection from the master to `host` as `mitogen-test-<user>`, with the test
/// key and known_hosts.
pub fn ssh(b: SshBackend, e: &E2e, host: &str, user: &str) -> Ssh {
    Ssh::new(e.ip(host))
        .backend(b)
        .username(format!("mitogen-test-{user}"))
        .identity_file(e.key())
        .identities_only(true)
        .known_hosts_file(e.known_hosts())
        .program(agent())
        .connect_timeout(Duration::from_secs(30))
}

/// An ssh connection made by an intermediary (which has the test key as its default
/// identity, and no known_hosts for the other hosts).
pub fn hop(b: SshBackend, e: &E2e, host: &str, user: &str) -> Ssh {
    Ssh::new(e.ip(host))
        .backend(b)
        .username(format!("mitogen-test-{user}"))
        .check_host_keys(HostKeyPolicy::Ignore)
        .connect_timeout(Duration::from_secs(30))
}
