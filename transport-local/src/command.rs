//! Methods that start the agent by running a command (sudo, su, doas, ssh, docker exec):
//! the command runs the sh first stage ([`crate::bootstrap`]) and the image follows over
//! the stream. A method only says which command and which login dialogue;
//! [`CommandTransport`] does the rest, the same way for every method.

use crate::bootstrap::{random_token, FirstStage};
use crate::{spawn_hybrid, DataChannel, SELF_EXE};
use mitogen_core::transport::{Bootstrap, Connection, StartError, Transport};
use mitogen_core::Dialogue;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// How a started command is wired and what it is sent.
#[derive(Debug, Clone)]
pub struct Wiring {
    /// The agent image; `None` sends the current executable.
    pub program: Option<PathBuf>,
    /// Let the first stage use the target's image cache.
    pub cache: bool,
    /// Give the command a PTY as controlling terminal and stderr (for prompts). A
    /// same-host command whose image is not handed over gets one in any case.
    pub pty: bool,
    /// What carries the messages.
    pub data: DataChannel,
    /// The command runs on this host and gives its stdin to the program it runs (sudo,
    /// doas): with a socketpair, the image may be handed over as that stdin
    /// ([`CommandTransport::hand_over`]).
    pub same_host: bool,
    /// A short description for errors and logs.
    pub description: String,
}

impl Wiring {
    /// The image can be handed over as the child's stdin ([`CommandTransport::hand_over`]):
    /// the command runs on this host and the stream is a socketpair.
    pub fn hands_over(&self) -> bool {
        self.same_host && self.data == DataChannel::SocketPair
    }
}

/// One command-based connection method, as its options.
pub trait CommandMethod: std::fmt::Debug + Clone + Send {
    /// The method's name (`sudo`, `ssh`, ...).
    fn method(&self) -> &'static str;

    /// How the command is wired; an error for invalid options (checked before anything runs).
    fn wiring(&self) -> Result<Wiring, StartError>;

    /// The command running `stage` (its script and token), and the dialogue that watches
    /// its terminal or stderr while it logs in. `deadline` bounds the whole start.
    fn command(&self, stage: &FirstStage, deadline: Instant) -> (Command, Option<Box<dyn Dialogue>>);
}

/// The transport of any [`CommandMethod`].
#[derive(Debug, Clone)]
pub struct CommandTransport<M> {
    method: M,
    arg0: String,
    image_hash: String,
    handover: Option<Arc<OwnedFd>>,
}

impl<M: CommandMethod> CommandTransport<M> {
    /// A transport for `method`; `arg0` is what `ps` shows for the agent; `image_hash` is
    /// the image's build id (the first stage's cache key).
    pub fn new(method: M, arg0: impl Into<String>, image_hash: impl Into<String>) -> CommandTransport<M> {
        CommandTransport { method, arg0: arg0.into(), image_hash: image_hash.into(), handover: None }
    }

    /// Hands `image` (a sealed memfd holding the image as shipped) to the child as its
    /// stdin, where the method runs on this host over a socketpair: the first stage then
    /// runs it without an interpreter and without a byte of it crossing the stream, and
    /// the stream runs over the child's stdout alone. Ignored elsewhere; `None`: send it.
    pub fn hand_over(mut self, image: Option<Arc<OwnedFd>>) -> CommandTransport<M> {
        self.handover = image;
        self
    }
}

impl<M: CommandMethod + 'static> Transport for CommandTransport<M> {
    fn method(&self) -> &'static str {
        self.method.method()
    }

    fn start(&mut self, deadline: Instant) -> Result<Connection, StartError> {
        let w = self.method.wiring()?;
        let handover = match &self.handover {
            Some(fd) if w.hands_over() => Some(fd.try_clone()?),
            _ => None,
        };
        let stage = FirstStage {
            token: random_token(),
            hash: self.image_hash.clone(),
            argv0: self.arg0.clone(),
            cache: w.cache,
            handover: handover.is_some(),
        };
        let (mut cmd, dialogue) = self.method.command(&stage, deadline);
        let program = cmd.get_program().to_string_lossy().into_owned();
        // Without a terminal, nothing ends a first stage left waiting when its start is
        // abandoned, but the handed-over one ends by itself once the stream closes: a
        // same-host method whose image is not handed over gets a terminal in any case.
        let pty = w.pty || (w.same_host && handover.is_none());
        let (child, stream, diag) = spawn_hybrid(&mut cmd, pty, w.data, handover)
            .map_err(|source| StartError::Spawn { program, source })?;
        // Our copies of the PTY slave and the child's stream ends must go, or end of file
        // never comes.
        drop(cmd);
        Ok(Connection {
            read: stream.read,
            write: stream.write,
            diag,
            process: Some(child),
            description: w.description,
            bootstrap: Bootstrap::FirstStage {
                token: stage.token,
                image: w.program.unwrap_or_else(|| PathBuf::from(SELF_EXE)),
                cache: w.cache,
                handover: stage.handover,
            },
            dialogue,
            driver: None,
        })
    }
}
