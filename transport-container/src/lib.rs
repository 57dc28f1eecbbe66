//! The container transport: an agent inside a running container, through `docker exec -i`
//! or `podman exec -i`.
//!
//! The runtime's client runs the sh first stage ([`mitogen_transport_local::bootstrap`])
//! in the container; the agent image arrives over the same stream and runs from memory, so
//! nothing is installed or written in the container. No TTY is involved: the client's
//! stdin/stdout carry the messages, its stderr is read for diagnostics, and the runtime's
//! own errors (`Error response from daemon: ...`, `Error: ...`) become typed errors.

#![warn(missing_docs)]

use mitogen_core::{Dialogue, DialogueStep, LoginError, StartError};
use mitogen_transport_local::bootstrap::FirstStage;
use mitogen_transport_local::command::{CommandMethod, CommandTransport, Wiring};
use mitogen_transport_local::DataChannel;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Which container runtime's client to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Runtime {
    /// `docker exec`.
    #[default]
    Docker,
    /// `podman exec` (same command line).
    Podman,
}

impl Runtime {
    /// The method name, also the context name's prefix.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
        }
    }
}

/// Options of the container method.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct ContainerOptions {
    /// The runtime.
    pub runtime: Runtime,
    /// Container name or id.
    pub container: String,
    /// Account inside the container (`-u`); `None` is the image's default user.
    pub username: Option<String>,
    /// The client program; `None` runs `docker` or `podman` from `PATH`.
    pub runtime_path: Option<PathBuf>,
    /// More arguments for `exec`, before the container name.
    pub extra_args: Vec<String>,
    /// The agent image; `None` sends the current executable.
    pub program: Option<PathBuf>,
    /// Keep the image in the container account's cache and reuse it.
    pub cache: bool,
}

impl ContainerOptions {
    /// Options for `container` under `runtime`.
    pub fn new(runtime: Runtime, container: impl Into<String>) -> ContainerOptions {
        ContainerOptions { runtime, container: container.into(), ..Default::default() }
    }

    /// The exec command line running the first-stage `script`.
    pub fn command(&self, script: &str) -> Command {
        let program = self.runtime_path.clone().unwrap_or_else(|| self.runtime.name().into());
        let mut cmd = Command::new(program);
        cmd.arg("exec").arg("-i");
        if let Some(u) = &self.username {
            cmd.arg("-u").arg(u);
        }
        cmd.args(&self.extra_args).arg(&self.container).arg("/bin/sh").arg("-c").arg(script);
        cmd
    }
}

/// Recognises the runtime client's own errors on its stderr.
#[derive(Debug)]
struct RuntimeErrors {
    method: &'static str,
    buf: Vec<u8>,
}

impl Dialogue for RuntimeErrors {
    fn on_output(&mut self, bytes: &[u8]) -> DialogueStep {
        self.buf.extend_from_slice(bytes);
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            if line.starts_with("Error response from daemon:") || line.starts_with("Error: ") {
                return DialogueStep::Fail(LoginError::Refused { method: self.method, line });
            }
        }
        if self.buf.len() > 16 * 1024 {
            self.buf.clear();
        }
        DialogueStep::Continue
    }
}

impl CommandMethod for ContainerOptions {
    fn method(&self) -> &'static str {
        self.runtime.name()
    }

    fn wiring(&self) -> Result<Wiring, StartError> {
        if self.container.is_empty() || self.container.starts_with('-') {
            return Err(StartError::Options(format!("invalid container name {:?}", self.container)));
        }
        Ok(Wiring {
            program: self.program.clone(),
            cache: self.cache,
            pty: false,
            data: DataChannel::SocketPair,
            // The exec'd process's stdin comes through the runtime.
            same_host: false,
            description: format!("{} exec {}", self.runtime.name(), self.container),
        })
    }

    fn command(&self, stage: &FirstStage, _deadline: Instant) -> (Command, Option<Box<dyn Dialogue>>) {
        let d = RuntimeErrors { method: self.runtime.name(), buf: Vec::new() };
        (self.command(&stage.script()), Some(Box::new(d)))
    }
}

/// The container transport.
pub type ContainerTransport = CommandTransport<ContainerOptions>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let mut o = ContainerOptions::new(Runtime::Podman, "web1");
        o.username = Some("app".into());
        let c = o.command("echo x");
        assert_eq!(c.get_program(), "podman");
        let args: Vec<_> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["exec", "-i", "-u", "app", "web1", "/bin/sh", "-c", "echo x"]);
    }

    #[test]
    fn runtime_errors_are_typed() {
        let mut d = RuntimeErrors { method: "docker", buf: Vec::new() };
        assert_eq!(d.on_output(b"some profile output\n"), DialogueStep::Continue);
        let s = d.on_output(b"Error response from daemon: No such container: web9\n");
        assert!(matches!(s, DialogueStep::Fail(LoginError::Refused { method: "docker", .. })), "{s:?}");
    }
}
