//! The local transport: starts the agent image as a subprocess of this one, connected over
//! a socketpair (the child's stdin and stdout), with its stderr on a pipe for diagnostics.
//!
//! [`spawn`] is the one place in the workspace that starts processes (an invariant checked
//! by clippy's `disallowed-methods`); the sudo, ssh and container transports use it too.

#![warn(missing_docs)]

pub mod bootstrap;
pub mod command;

use mitogen_core::transport::{Bootstrap, Connection, StartError, Transport};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// The running executable, also when it runs from a memfd or was deleted (an agent started
/// by the first stage): `current_exe()` would name a path that cannot be executed.
pub const SELF_EXE: &str = "/proc/self/exe";

/// Environment variable that tells a program it was started as an agent: `1`, or
/// [`bootstrap::STREAM_ON_STDOUT`] when its stdin is not the stream. The agent runtime
/// removes it at once, so the agent's own subprocesses do not inherit it.
pub const AGENT_ENV: &str = "MITOGEN_AGENT";

/// Options of the local method.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalOptions {
    /// The agent image to run; `None` runs the current executable (self-replication).
    pub program: Option<PathBuf>,
    /// Extra environment variables for the agent.
    pub env: Vec<(OsString, OsString)>,
    /// Start the agent the way sudo and ssh do: `sh -c <first stage>`, the image sent over
    /// the stream and run from memory ([`bootstrap`]).
    pub through_sh: bool,
    /// With `through_sh`: keep the image in the user's cache directory and reuse it.
    pub cache: bool,
    /// Carry messages over two pipes instead of a socketpair.
    pub pipes: bool,
}

impl LocalOptions {
    /// Options that run the current executable.
    pub fn new() -> LocalOptions {
        LocalOptions::default()
    }

    /// Runs `program` as the agent instead of the current executable.
    pub fn program(mut self, program: impl Into<PathBuf>) -> LocalOptions {
        self.program = Some(program.into());
        self
    }

    /// Adds an environment variable for the agent.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> LocalOptions {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the agent through the `sh` first stage, as command-based methods do.
    pub fn through_sh(mut self, on: bool) -> LocalOptions {
        self.through_sh = on;
        self
    }

    /// With [`LocalOptions::through_sh`]: use the image cache on the target.
    pub fn cache(mut self, on: bool) -> LocalOptions {
        self.cache = on;
        self
    }

    /// Carries messages over two pipes instead of a socketpair.
    pub fn pipes(mut self, on: bool) -> LocalOptions {
        self.pipes = on;
        self
    }

    /// The program that will run: the named one or the current executable.
    pub fn resolved_program(&self) -> std::io::Result<PathBuf> {
        match &self.program {
            Some(p) => Ok(p.clone()),
            None => Ok(PathBuf::from(SELF_EXE)),
        }
    }
}

/// The local transport.
#[derive(Debug, Clone)]
pub struct LocalTransport {
    opts: LocalOptions,
    /// `argv[0]` the agent gets, so `ps` shows who started it.
    arg0: String,
    /// Hash of the image, needed by the first stage (cache key).
    image_hash: String,
}

impl LocalTransport {
    /// A transport for `opts`; `arg0` is what `ps` will show for the agent; `image_hash`
    /// is the build id of the image (used by the first stage's cache).
    pub fn new(opts: LocalOptions, arg0: impl Into<String>, image_hash: impl Into<String>) -> LocalTransport {
        LocalTransport { opts, arg0: arg0.into(), image_hash: image_hash.into() }
    }
}

/// Makes a connected `AF_UNIX` stream socketpair with close-on-exec set on both ends.
pub fn socketpair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array for socketpair to fill.
    let r = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `cmd`. Every process the library starts goes through here.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    #[allow(clippy::disallowed_methods)]
    cmd.spawn()
}

impl Transport for LocalTransport {
    fn method(&self) -> &'static str {
        "local"
    }

    fn start(&mut self, _deadline: Instant) -> Result<Connection, StartError> {
        let program = self.opts.resolved_program()?;
        let (mut cmd, boot) = if self.opts.through_sh {
            let stage = bootstrap::FirstStage {
                token: bootstrap::random_token(),
                hash: self.image_hash.clone(),
                argv0: self.arg0.clone(),
                cache: self.opts.cache,
                handover: false,
            };
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(stage.script());
            let boot = Bootstrap::FirstStage {
                token: stage.token,
                image: program.clone(),
                cache: self.opts.cache,
                handover: false,
            };
            (cmd, boot)
        } else {
            let mut cmd = Command::new(&program);
            cmd.arg0(&self.arg0).env(AGENT_ENV, "1");
            (cmd, Bootstrap::Direct)
        };
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        let data = if self.opts.pipes { DataChannel::Pipes } else { DataChannel::SocketPair };
        let (child, stream, diag) = spawn_hybrid(&mut cmd, false, data, None)
            .map_err(|source| StartError::Spawn { program: program.display().to_string(), source })?;
        Ok(Connection {
            read: stream.read,
            write: stream.write,
            diag,
            process: Some(child),
            description: program.display().to_string(),
            bootstrap: boot,
            dialogue: None,
            driver: None,
        })
    }
}

/// Runs `cmd` to completion and collects its output (the built-in `run_command` uses it).
pub fn output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    #[allow(clippy::disallowed_methods)]
    cmd.output()
}

/// A pseudo-terminal: the master stays here, the slave becomes the child's stderr and
/// controlling terminal (so password prompts appear on it).
#[derive(Debug)]
pub struct Pty {
    /// Our side: prompts are read and answers written here.
    pub master: OwnedFd,
    /// The child's side.
    pub slave: OwnedFd,
}

/// Opens a PTY with echo off, so nothing written to it (a password) is echoed back.
pub fn open_pty() -> std::io::Result<Pty> {
    use std::os::fd::AsRawFd;
    let err = std::io::Error::last_os_error;
    // SAFETY: plain calls on descriptors we own; ptsname_r gets a valid buffer.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(err());
        }
        let master = OwnedFd::from_raw_fd(m);
        if libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
            return Err(err());
        }
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0 {
            return Err(err());
        }
        let s = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if s < 0 {
            return Err(err());
        }
        let slave = OwnedFd::from_raw_fd(s);
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            t.c_lflag &= !(libc::ECHO | libc::ECHONL);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
        Ok(Pty { master, slave })
    }
}

/// What carries the message stream between a started child and us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DataChannel {
    /// One `AF_UNIX` socketpair for stdin and stdout (the default).
    #[default]
    SocketPair,
    /// Two pipes, for programs or policies that refuse a socket as stdin/stdout.
    Pipes,
}

/// Our ends of a child's message stream.
#[derive(Debug)]
pub struct StreamFds {
    /// Read the child's stdout here.
    pub read: OwnedFd,
    /// Write the child's stdin here.
    pub write: OwnedFd,
}

/// Makes a pipe with close-on-exec set on both ends: (read end, write end).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `cmd` with its stdin and stdout on `data` (the message stream) and its stderr on
/// a pipe, or with `pty`, on a PTY that is also its controlling terminal in a new session
/// ("hybrid" TTY: data never crosses the small TTY buffers). Returns the child, our ends of
/// the stream, and the diagnostic fd (pipe or PTY master). `stdin` replaces the stream as
/// the child's stdin, which then uses its socket stdout both ways (socketpair only).
pub fn spawn_hybrid(
    cmd: &mut Command,
    pty: bool,
    data: DataChannel,
    stdin: Option<OwnedFd>,
) -> std::io::Result<(Child, StreamFds, Option<OwnedFd>)> {
    let stream = match data {
        DataChannel::SocketPair => {
            let (ours, theirs) = socketpair()?;
            let input = match stdin {
                Some(fd) => fd,
                None => theirs.try_clone()?,
            };
            cmd.stdin(Stdio::from(input)).stdout(Stdio::from(theirs));
            StreamFds { read: ours.try_clone()?, write: ours }
        }
        DataChannel::Pipes => {
            let (child_in, write) = pipe()?;
            let (read, child_out) = pipe()?;
            cmd.stdin(Stdio::from(child_in)).stdout(Stdio::from(child_out));
            StreamFds { read, write }
        }
    };
    let term = if pty { Some(open_pty()?) } else { None };
    match &term {
        Some(t) => {
            cmd.stderr(Stdio::from(t.slave.try_clone()?));
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(2, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        None => {
            cmd.stderr(Stdio::piped());
        }
    }
    let mut child = spawn(cmd)?;
    let diag = match term {
        Some(t) => Some(t.master),
        None => child.stderr.take().map(OwnedFd::from),
    };
    Ok((child, stream, diag))
}
