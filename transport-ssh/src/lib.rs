//! The ssh transport: an agent on another host, through the OpenSSH client.
//!
//! `ssh` runs the sh first stage ([`mitogen_transport_local::bootstrap`]) on the far host;
//! it receives the agent image over the same stream and runs it from memory, so nothing
//! is installed or written there. The user's ssh configuration applies (`Host` aliases,
//! `ProxyJump`, the agent): we only add options for what was asked.
//!
//! Without a password, ssh runs in `BatchMode` with its stderr on a pipe: it can never
//! stop at a prompt. With a password, a PTY becomes its controlling terminal (data stays
//! on the socketpair: "hybrid" TTY) and the sans-IO [`SshDialogue`] answers the prompt once.
//! Host-key checking never prompts: `enforce` refuses unknown keys, `accept` adds new
//! ones (`accept-new`), `ignore` uses no known-hosts file at all.

#![warn(missing_docs)]

mod dialogue;
#[cfg(feature = "libssh2")]
mod libssh2;

pub use dialogue::SshDialogue;
#[cfg(feature = "libssh2")]
pub use libssh2::Libssh2Transport;

use mitogen_core::{Dialogue, Password, StartError};
use mitogen_transport_local::bootstrap::{exec_sh, FirstStage};
use mitogen_transport_local::command::{CommandMethod, CommandTransport, Wiring};
use mitogen_transport_local::DataChannel;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// How the far host's key is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HostKeyPolicy {
    /// Unknown or changed keys are refused (`StrictHostKeyChecking=yes`).
    #[default]
    Enforce,
    /// New keys are added to known_hosts; changed keys are refused (`accept-new`).
    Accept,
    /// No checking at all, nothing recorded (`StrictHostKeyChecking=no`, no known-hosts
    /// file). Only for throw-away hosts.
    Ignore,
}

/// Which ssh client makes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SshBackend {
    /// The system's OpenSSH `ssh` program: the user's configuration, agent and
    /// `ProxyJump` apply.
    #[default]
    OpenSsh,
    /// libssh2, in-process (cargo feature `libssh2`): no ssh program needed; the ssh
    /// configuration does not apply.
    Libssh2,
}

impl SshBackend {
    /// True if this program was built with the backend.
    pub fn is_available(self) -> bool {
        match self {
            SshBackend::OpenSsh => true,
            SshBackend::Libssh2 => cfg!(feature = "libssh2"),
        }
    }
}

/// Options of the ssh method.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct SshOptions {
    /// Host name, address or `Host` alias from the ssh configuration.
    pub hostname: String,
    /// Port (`-p`); `None` leaves it to the configuration (22).
    pub port: Option<u16>,
    /// Remote account (`-l`); `None` leaves it to the configuration.
    pub username: Option<String>,
    /// Private key file (`-i`).
    pub identity_file: Option<PathBuf>,
    /// Use only the given identity, not the agent's or the defaults (`IdentitiesOnly`).
    pub identities_only: bool,
    /// Host-key checking.
    pub check_host_keys: HostKeyPolicy,
    /// A known-hosts file instead of the user's (`UserKnownHostsFile`).
    pub known_hosts_file: Option<PathBuf>,
    /// Password for password or keyboard-interactive authentication; never logged.
    pub password: Option<Password>,
    /// ssh compression (`-C`; off by default: it slows fast links).
    pub compression: bool,
    /// Keepalive probe interval (`ServerAliveInterval`); `None` disables keepalives.
    pub keepalive_interval: Option<Duration>,
    /// Unanswered probes before ssh gives up (`ServerAliveCountMax`).
    pub keepalive_count: u32,
    /// More arguments for ssh, before the host name.
    pub extra_args: Vec<String>,
    /// The ssh program (default `ssh` from `PATH`).
    pub ssh_path: PathBuf,
    /// `-v` repeated this many times (0 to 3); the output is logged under the context.
    pub ssh_debug_level: u8,
    /// TCP connect timeout (`ConnectTimeout`); `None` uses what is left of the whole
    /// start's connect timeout.
    pub connect_timeout: Option<Duration>,
    /// The agent image; `None` sends the current executable.
    pub program: Option<PathBuf>,
    /// Keep the image in the remote account's cache and reuse it.
    pub cache: bool,
    /// The ssh client: OpenSSH (default) or libssh2. `ssh_path`, `extra_args` and
    /// `ssh_debug_level` only apply to OpenSSH.
    pub backend: SshBackend,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            hostname: String::new(),
            port: None,
            username: None,
            identity_file: None,
            identities_only: false,
            check_host_keys: HostKeyPolicy::Enforce,
            known_hosts_file: None,
            password: None,
            compression: false,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_count: 3,
            extra_args: Vec::new(),
            ssh_path: "ssh".into(),
            ssh_debug_level: 0,
            connect_timeout: None,
            program: None,
            cache: false,
            backend: SshBackend::OpenSsh,
        }
    }
}

impl SshOptions {
    /// Options for `hostname` with the defaults.
    pub fn new(hostname: impl Into<String>) -> SshOptions {
        SshOptions { hostname: hostname.into(), ..Default::default() }
    }

    /// The ssh command line running the first-stage `script` on the far host (ssh joins
    /// the remote command into one string for the remote account's shell: [`exec_sh`]).
    pub fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new(&self.ssh_path);
        let o = |cmd: &mut Command, kv: String| {
            cmd.arg("-o").arg(kv);
        };
        if let Some(p) = self.port {
            cmd.arg("-p").arg(p.to_string());
        }
        if let Some(u) = &self.username {
            cmd.arg("-l").arg(u);
        }
        if let Some(i) = &self.identity_file {
            cmd.arg("-i").arg(i);
        }
        if self.identities_only {
            o(&mut cmd, "IdentitiesOnly=yes".into());
        }
        if self.password.is_some() {
            o(&mut cmd, "BatchMode=no".into());
            o(&mut cmd, "NumberOfPasswordPrompts=1".into());
        } else {
            o(&mut cmd, "BatchMode=yes".into());
        }
        match self.check_host_keys {
            HostKeyPolicy::Enforce => o(&mut cmd, "StrictHostKeyChecking=yes".into()),
            HostKeyPolicy::Accept => o(&mut cmd, "StrictHostKeyChecking=accept-new".into()),
            HostKeyPolicy::Ignore => {
                o(&mut cmd, "StrictHostKeyChecking=no".into());
                o(&mut cmd, "UserKnownHostsFile=/dev/null".into());
                o(&mut cmd, "GlobalKnownHostsFile=/dev/null".into());
                o(&mut cmd, "LogLevel=ERROR".into());
            }
        }
        if let (Some(k), false) = (&self.known_hosts_file, self.check_host_keys == HostKeyPolicy::Ignore) {
            o(&mut cmd, format!("UserKnownHostsFile={}", k.display()));
        }
        o(&mut cmd, format!("Compression={}", if self.compression { "yes" } else { "no" }));
        match self.keepalive_interval {
            Some(i) => {
                o(&mut cmd, format!("ServerAliveInterval={}", i.as_secs().max(1)));
                o(&mut cmd, format!("ServerAliveCountMax={}", self.keepalive_count.max(1)));
            }
            None => o(&mut cmd, "ServerAliveInterval=0".into()),
        }
        if let Some(t) = self.connect_timeout {
            o(&mut cmd, format!("ConnectTimeout={}", t.as_secs().max(1)));
        }
        if self.ssh_debug_level > 0 {
            cmd.arg(format!("-{}", "v".repeat(self.ssh_debug_level.min(3).into())));
        }
        cmd.args(&self.extra_args).arg("--").arg(&self.hostname).arg(exec_sh(script));
        cmd
    }

    /// An error unless `hostname` can be given to ssh (not empty, not an option).
    pub(crate) fn check_hostname(&self) -> Result<(), StartError> {
        if self.hostname.is_empty() || self.hostname.starts_with('-') {
            return Err(StartError::Options(format!("invalid ssh hostname {:?}", self.hostname)));
        }
        Ok(())
    }

    /// The transport for these options' backend, or an error if this program was built
    /// without it.
    pub fn transport(
        &self,
        arg0: String,
        image_hash: String,
    ) -> Result<Box<dyn mitogen_core::Transport>, StartError> {
        match self.backend {
            SshBackend::OpenSsh => Ok(Box::new(SshTransport::new(self.clone(), arg0, image_hash))),
            #[cfg(feature = "libssh2")]
            SshBackend::Libssh2 => Ok(Box::new(Libssh2Transport::new(self.clone(), arg0, image_hash))),
            #[cfg(not(feature = "libssh2"))]
            SshBackend::Libssh2 => Err(StartError::Options(
                "this program was built without the libssh2 ssh backend (cargo feature `libssh2`)".into(),
            )),
        }
    }
}

impl CommandMethod for SshOptions {
    fn method(&self) -> &'static str {
        "ssh"
    }

    fn wiring(&self) -> Result<Wiring, StartError> {
        self.check_hostname()?;
        Ok(Wiring {
            program: self.program.clone(),
            cache: self.cache,
            // A PTY only when a password prompt must be answered; BatchMode otherwise.
            pty: self.password.is_some(),
            data: DataChannel::SocketPair,
            same_host: false,
            description: format!("ssh {}", self.hostname),
        })
    }

    fn command(&self, stage: &FirstStage, deadline: Instant) -> (Command, Option<Box<dyn Dialogue>>) {
        let mut o = self.clone();
        o.connect_timeout =
            o.connect_timeout.or_else(|| Some(deadline.saturating_duration_since(Instant::now())));
        let d = SshDialogue::new(self.hostname.clone(), self.password.clone());
        (o.command(&stage.script()), Some(Box::new(d)))
    }
}

/// The ssh transport (OpenSSH client).
pub type SshTransport = CommandTransport<SshOptions>;

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn batch_mode_without_password_and_the_remote_command_last() {
        let o = SshOptions { port: Some(2222), username: Some("bob".into()), ..SshOptions::new("h1") };
        let a = args(&o.command("echo x"));
        assert!(a.contains(&"BatchMode=yes".to_string()));
        assert!(a.contains(&"StrictHostKeyChecking=yes".to_string()));
        assert!(a.contains(&"Compression=no".to_string()));
        assert_eq!(&a[a.len() - 3..], ["--", "h1", "exec /bin/sh -c 'echo x'"]);
        assert_eq!(&a[..4], ["-p", "2222", "-l", "bob"]);
    }

    #[test]
    fn password_policy_keepalive_and_debug() {
        let o = SshOptions {
            password: Some("hunter2".into()),
            check_host_keys: HostKeyPolicy::Ignore,
            keepalive_interval: None,
            ssh_debug_level: 2,
            ..SshOptions::new("h1")
        };
        let a = args(&o.command("x"));
        assert!(a.contains(&"BatchMode=no".to_string()));
        assert!(a.contains(&"UserKnownHostsFile=/dev/null".to_string()));
        assert!(a.contains(&"ServerAliveInterval=0".to_string()));
        assert!(a.contains(&"-vv".to_string()));
        assert!(!a.iter().any(|x| x.contains("hunter2")), "the password is never on the command line");
        assert!(!format!("{o:?}").contains("hunter2"));
    }
}
