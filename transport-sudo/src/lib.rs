//! The sudo transport: an agent in another account on this host.
//!
//! sudo runs the sh first stage ([`mitogen_transport_local::bootstrap`]), which receives the
//! agent image over the stream and runs it from memory: nothing is installed or written in
//! the target account. Data goes over a socketpair; sudo's prompt appears on a PTY that is
//! the child's controlling terminal and stderr ("hybrid" TTY), answered by a sans-IO
//! [`PromptDialogue`] with a prompt string we force (`-p`), so the prompt is recognised
//! exactly whatever the locale, banner or sudo flavour (sudo.ws, sudo-rs, pwfeedback).

#![warn(missing_docs)]

mod dialogue;

pub use dialogue::PromptDialogue;

use mitogen_core::transport::{Bootstrap, Connection, StartError, Transport};
use mitogen_transport_local::bootstrap::{random_token, FirstStage};
use mitogen_transport_local::SELF_EXE;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Options of the sudo method.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct SudoOptions {
    /// Target account (default `root`).
    pub username: String,
    /// Password to answer sudo's prompt with; never logged.
    pub password: Option<String>,
    /// `-E`: keep the environment.
    pub preserve_env: bool,
    /// `-H`: set `HOME` to the target's.
    pub set_home: bool,
    /// `-i`: run the target's login shell (profiles run).
    pub login: bool,
    /// `-r`: SELinux role.
    pub selinux_role: Option<String>,
    /// `-t`: SELinux type.
    pub selinux_type: Option<String>,
    /// The sudo program (default `sudo` from `PATH`).
    pub sudo_path: PathBuf,
    /// More arguments for sudo, before `--`.
    pub extra_args: Vec<String>,
    /// The agent image; `None` sends the current executable.
    pub program: Option<PathBuf>,
    /// Keep the image in the target account's cache and reuse it.
    pub cache: bool,
}

impl fmt::Debug for SudoOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SudoOptions")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("preserve_env", &self.preserve_env)
            .field("set_home", &self.set_home)
            .field("login", &self.login)
            .field("selinux_role", &self.selinux_role)
            .field("selinux_type", &self.selinux_type)
            .field("sudo_path", &self.sudo_path)
            .field("extra_args", &self.extra_args)
            .field("program", &self.program)
            .field("cache", &self.cache)
            .finish()
    }
}

impl Default for SudoOptions {
    fn default() -> Self {
        SudoOptions {
            username: "root".into(),
            password: None,
            preserve_env: false,
            set_home: false,
            login: false,
            selinux_role: None,
            selinux_type: None,
            sudo_path: "sudo".into(),
            extra_args: Vec::new(),
            program: None,
            cache: false,
        }
    }
}

impl SudoOptions {
    /// The image that will be sent: the named one or the current executable.
    pub fn resolved_program(&self) -> std::io::Result<PathBuf> {
        match &self.program {
            Some(p) => Ok(p.clone()),
            None => Ok(PathBuf::from(SELF_EXE)),
        }
    }

    /// The sudo command line for `prompt` and the first-stage `script`.
    pub fn command(&self, prompt: &str, script: &str) -> Command {
        let mut cmd = Command::new(&self.sudo_path);
        cmd.arg("-u").arg(&self.username).arg("-p").arg(prompt);
        if self.preserve_env {
            cmd.arg("-E");
        }
        if self.set_home {
            cmd.arg("-H");
        }
        if self.login {
            cmd.arg("-i");
        }
        if let Some(r) = &self.selinux_role {
            cmd.arg("-r").arg(r);
        }
        if let Some(t) = &self.selinux_type {
            cmd.arg("-t").arg(t);
        }
        cmd.args(&self.extra_args).arg("--").arg("/bin/sh").arg("-c").arg(script);
        cmd
    }
}

/// The sudo transport.
#[derive(Debug, Clone)]
pub struct SudoTransport {
    opts: SudoOptions,
    arg0: String,
    image_hash: String,
}

impl SudoTransport {
    /// A transport for `opts`; `arg0` is what `ps` shows for the agent; `image_hash` is
    /// the image's build id (the first stage's cache key).
    pub fn new(opts: SudoOptions, arg0: impl Into<String>, image_hash: impl Into<String>) -> SudoTransport {
        SudoTransport { opts, arg0: arg0.into(), image_hash: image_hash.into() }
    }
}

impl Transport for SudoTransport {
    fn method(&self) -> &'static str {
        "sudo"
    }

    fn start(&mut self, _deadline: Instant) -> Result<Connection, StartError> {
        if self.opts.username.is_empty() {
            return Err(StartError::Options("empty sudo username".into()));
        }
        let image = self.opts.resolved_program()?;
        let stage = FirstStage {
            token: random_token(),
            hash: self.image_hash.clone(),
            argv0: self.arg0.clone(),
            cache: self.opts.cache,
        };
        let prompt = format!("mitogen-sudo-password-{}:", stage.token);
        let mut cmd = self.opts.command(&prompt, &stage.script());
        let program = self.opts.sudo_path.display().to_string();
        let (child, ours, diag) = mitogen_transport_local::spawn_hybrid(&mut cmd, true)
            .map_err(|source| StartError::Spawn { program, source })?;
        // Our copies of the PTY slave and socket end must go, or end of file never comes.
        drop(cmd);
        Ok(Connection {
            read: ours.try_clone()?,
            write: ours,
            diag,
            process: Some(child),
            description: format!("sudo -u {}", self.opts.username),
            bootstrap: Bootstrap::FirstStage { token: stage.token, image, cache: self.opts.cache },
            dialogue: Some(Box::new(PromptDialogue::sudo(&prompt, self.opts.password.clone()))),
        })
    }
}
