//! The [`Transport`] trait: how a connection method starts a child and hands its byte pipe
//! to the broker.
//!
//! A transport only *starts* something (a process, a login dialogue) and returns a
//! [`Connection`]. The bootstrap handshake that follows is the same for every method and
//! lives in `mitogen-child`; routing and I/O afterwards belong to the [`crate::Broker`].

use crate::broker::Driver;
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Child;
use std::time::Instant;

/// A started child: the pipe carrying messages, plus what must be watched and cleaned up.
pub struct Connection {
    /// Messages from the child are read here (non-blocking is set by the broker).
    pub read: OwnedFd,
    /// Messages to the child are written here; may be a dup of `read` for a socketpair.
    pub write: OwnedFd,
    /// Diagnostic output of the child (its stderr, or a PTY), logged line by line.
    pub diag: Option<OwnedFd>,
    /// The local process to reap when the stream ends (the child itself, or ssh/sudo).
    pub process: Option<Child>,
    /// A short description for errors and logs, e.g. the program path.
    pub description: String,
    /// What the child expects before the message stream begins.
    pub bootstrap: Bootstrap,
    /// A login dialogue (password prompts) run on `diag` while the child starts; what it
    /// answers is written to `diag` (a PTY) or to `write` ([`DialogueStep::WriteInput`]).
    pub dialogue: Option<Box<dyn Dialogue>>,
    /// An in-process protocol client (e.g. libssh2) to run on the broker thread, which
    /// pumps bytes between its session and the far ends of `read`/`write` and `diag`. The
    /// connecting code hands it to the broker before the bootstrap begins.
    pub driver: Option<Box<dyn Driver>>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("read", &self.read)
            .field("write", &self.write)
            .field("diag", &self.diag)
            .field("process", &self.process)
            .field("description", &self.description)
            .field("bootstrap", &self.bootstrap)
            .field("dialogue", &self.dialogue)
            .field("driver", &self.driver.as_ref().map(|_| "Driver"))
            .finish()
    }
}

/// What a [`Dialogue`] wants after seeing some output.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DialogueStep {
    /// Nothing to do yet.
    Continue,
    /// Write these bytes to the terminal (e.g. the password and a newline).
    Write(Vec<u8>),
    /// Write these bytes to the child's standard input, the message stream (for programs
    /// that read the password from stdin, like util-linux `su`).
    WriteInput(Vec<u8>),
    /// The login failed; stop.
    Fail(LoginError),
}

/// Why a login dialogue failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoginError {
    /// A password was asked for and none was configured.
    #[error("a password is required ({method} asked for one and none was given)")]
    PasswordRequired {
        /// The method that asked (`sudo`, `su`, ...).
        method: &'static str,
    },
    /// The password was refused (a second prompt, or an "incorrect password" message).
    #[error("the {method} password was incorrect")]
    PasswordIncorrect {
        /// The method that refused it.
        method: &'static str,
    },
    /// The method needs a terminal (sudo's `requiretty`) and was started without one.
    #[error("{method} needs a terminal (requiretty)")]
    TtyRequired {
        /// The method that refused.
        method: &'static str,
    },
    /// The method refused for another reason; the line says why.
    #[error("{method} refused: {line}")]
    Refused {
        /// The method that refused.
        method: &'static str,
        /// Its message.
        line: String,
    },
    /// Authentication failed without a password being involved (no usable key).
    #[error("{method}: permission denied: {line}")]
    PermissionDenied {
        /// The method that was refused.
        method: &'static str,
        /// Its message, naming the methods the server offered.
        line: String,
    },
    /// The host's key is not known and host keys are checked.
    #[error("the host key of {host} is unknown (check_host_keys is enforcing)")]
    HostKeyUnknown {
        /// The host.
        host: String,
    },
    /// The host's key differs from the known one: possibly an attack.
    #[error("the host key of {host} has CHANGED from the known one")]
    HostKeyChanged {
        /// The host.
        host: String,
    },
    /// Nothing listens on the host's port.
    #[error("connection to {host} refused")]
    ConnectionRefused {
        /// The host.
        host: String,
    },
    /// The host did not answer the TCP connection.
    #[error("connection to {host} timed out")]
    ConnectTimedOut {
        /// The host.
        host: String,
    },
}

/// A sans-IO login dialogue: fed the child's terminal output as it arrives (prompts may
/// be split across reads and have no newline), it says what to answer. Implementations
/// must never log or return the password except in [`DialogueStep::Write`] or
/// [`DialogueStep::WriteInput`].
pub trait Dialogue: fmt::Debug + Send {
    /// Feeds more output.
    fn on_output(&mut self, bytes: &[u8]) -> DialogueStep;
}

/// What a started child expects before the message stream begins.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Bootstrap {
    /// The agent itself was started: the bootstrap frame can be sent at once.
    Direct,
    /// A shell first stage was started: it prints a marker line carrying `token` (with
    /// the OS, architecture and available loaders), then reads `image` from the stream and
    /// executes it from memory. See `mitogen_transport_local::bootstrap`.
    FirstStage {
        /// Random per-connection token that makes the marker line unmistakable.
        token: String,
        /// The agent image to send.
        image: PathBuf,
        /// Whether the first stage may keep the image in the target's cache directory.
        cache: bool,
        /// The image was handed over as the child's stdin (a sealed memfd, same host); the
        /// stream is the child's stdout alone.
        handover: bool,
    },
}

/// Why a transport could not start its child.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The program could not be executed (e.g. ENOENT, EACCES).
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// What was being started.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Some other OS-level failure while preparing the child (pipes, fds).
    #[error("cannot prepare the child process: {0}")]
    Io(#[from] std::io::Error),
    /// The method is misconfigured (bad option values).
    #[error("invalid options: {0}")]
    Options(String),
    /// An in-process login failed (the libssh2 backend logs in before anything runs).
    #[error("{error}")]
    Login {
        /// What failed.
        error: LoginError,
        /// Lines that explain it, like a program's own error output (never a password).
        output: Vec<String>,
    },
}

/// A connection method: local subprocess, sudo, ssh, container exec...
///
/// Implementations are cheap descriptions of *how* to start a child. `start` may block (it
/// runs on the connecting thread, never on the broker thread) but must respect `deadline`.
pub trait Transport: fmt::Debug + Send {
    /// Short method name used in context names: `local`, `sudo`, `ssh`.
    fn method(&self) -> &'static str;

    /// Starts the child agent and returns the pipe to it.
    fn start(&mut self, deadline: Instant) -> Result<Connection, StartError>;
}

/// A password for a login dialogue. Its `Debug` never shows it, so options and dialogues
/// holding one can derive `Debug`; on the wire (to an intermediary that makes the
/// connection) it travels as a plain string inside the message stream.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    /// The password itself, for answering a prompt; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The answer to a prompt: the password and a newline.
    pub fn answer(&self) -> Vec<u8> {
        let mut a = self.0.clone().into_bytes();
        a.push(b'\n');
        a
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<S: Into<String>> From<S> for Password {
    fn from(s: S) -> Password {
        Password(s.into())
    }
}

/// How every login dialogue answers a password prompt: with the password once; a prompt
/// with no password configured means one is required, a second prompt that it was wrong
/// (it is never sent twice). `sent` remembers the first answer.
pub fn answer_prompt(
    password: Option<&Password>,
    sent: &mut bool,
    method: &'static str,
) -> Result<Vec<u8>, LoginError> {
    match (password, *sent) {
        (None, _) => Err(LoginError::PasswordRequired { method }),
        (Some(_), true) => Err(LoginError::PasswordIncorrect { method }),
        (Some(pw), false) => {
            *sent = true;
            Ok(pw.answer())
        }
    }
}
