//! Connecting a new child: start it through a [`Transport`], send its bootstrap, check its
//! hello, hand the stream to the broker. The same code runs in the master and in an
//! intermediary asked to connect onward (`via`).

use crate::build_id;
use mitogen_core::codec::{decode_value, encode_value, Decoder};
use mitogen_core::ids::{self, ContextId};
use mitogen_core::message::HEADER_LEN;
use mitogen_core::transport::Bootstrap as StartMode;
use mitogen_core::transport::{Connection, StartError, Transport};
use mitogen_core::{BrokerError, BrokerHandle, Context, Kind, LoginError, Message};
use mitogen_transport_local::bootstrap::{self as stage1, FirstStage, Loader};
use mitogen_transport_local::{LocalOptions, LocalTransport};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines of diagnostic output kept for errors.
const KEEP_LINES: usize = 20;

/// The first message a child receives: who it is and how to behave.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Bootstrap {
    pub context_id: ContextId,
    pub parent_ids: Vec<ContextId>,
    pub name: String,
    pub max_message_size: u32,
    /// `log::LevelFilter` as a number (0 = off ... 5 = trace).
    pub log_level: u8,
    pub debug: bool,
    pub unidirectional: bool,
    /// The build id of the image sent over this stream, when it was: the agent takes it as
    /// its own instead of hashing itself again (its bytes are the ones hashed here, and
    /// the stream delivered them intact, or the agent would not be running to read this).
    pub image_id: Option<String>,
}

/// The child's answer to [`Bootstrap`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub build_id: String,
    pub pid: u32,
}

/// How to reach a new context. One variant per connection method.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub enum Method {
    /// A subprocess on the connecting context's host.
    Local(LocalOptions),
    /// Another account on the connecting context's host, through sudo.
    #[cfg(feature = "sudo")]
    Sudo(mitogen_transport_sudo::SudoOptions),
    /// Another account on the connecting context's host, through su.
    #[cfg(feature = "sudo")]
    Su(mitogen_transport_sudo::SuOptions),
    /// Another account on the connecting context's host, through doas.
    #[cfg(feature = "sudo")]
    Doas(mitogen_transport_sudo::DoasOptions),
    /// Another host, through the OpenSSH client.
    #[cfg(feature = "ssh")]
    Ssh(mitogen_transport_ssh::SshOptions),
    /// A running container on the connecting context's host (docker/podman exec).
    #[cfg(feature = "container")]
    Container(mitogen_transport_container::ContainerOptions),
}

impl Method {
    /// The transport; `image`, for a method that [`hands_over`](Method::hands_over), is
    /// the image to give the child as its stdin.
    #[cfg_attr(not(feature = "sudo"), allow(unused_variables))]
    fn transport(
        &self,
        arg0: String,
        image_hash: String,
        image: Option<Arc<OwnedFd>>,
    ) -> Result<Box<dyn Transport>, StartError> {
        Ok(match self {
            Method::Local(o) => Box::new(LocalTransport::new(o.clone(), arg0, image_hash)),
            #[cfg(feature = "sudo")]
            Method::Sudo(o) => Box::new(
                mitogen_transport_sudo::SudoTransport::new(o.clone(), arg0, image_hash).hand_over(image),
            ),
            #[cfg(feature = "sudo")]
            Method::Su(o) => Box::new(
                mitogen_transport_sudo::SuTransport::new(o.clone(), arg0, image_hash).hand_over(image),
            ),
            #[cfg(feature = "sudo")]
            Method::Doas(o) => Box::new(
                mitogen_transport_sudo::DoasTransport::new(o.clone(), arg0, image_hash).hand_over(image),
            ),
            #[cfg(feature = "ssh")]
            Method::Ssh(o) => return o.transport(arg0, image_hash),
            #[cfg(feature = "container")]
            Method::Container(o) => {
                Box::new(mitogen_transport_container::ContainerTransport::new(o.clone(), arg0, image_hash))
            }
        })
    }

    /// This hop's part of the context name.
    fn own_name(&self, pid: u32) -> String {
        match self {
            Method::Local(_) => format!("local.{pid}"),
            #[cfg(feature = "sudo")]
            Method::Sudo(o) => format!("sudo.{}", o.username),
            #[cfg(feature = "sudo")]
            Method::Su(o) => format!("su.{}", o.username),
            #[cfg(feature = "sudo")]
            Method::Doas(o) => format!("doas.{}", o.username),
            #[cfg(feature = "ssh")]
            Method::Ssh(o) => match o.port {
                Some(p) => format!("ssh.{}:{p}", o.hostname),
                None => format!("ssh.{}", o.hostname),
            },
            #[cfg(feature = "container")]
            Method::Container(o) => format!("{}.{}", o.runtime.name(), o.container),
        }
    }

    /// True if the child is started through the sh first stage (the image hash is then
    /// needed before the start, for the cache).
    fn through_first_stage(&self) -> bool {
        match self {
            Method::Local(o) => o.through_sh,
            #[cfg(feature = "sudo")]
            Method::Sudo(_) | Method::Su(_) | Method::Doas(_) => true,
            #[cfg(feature = "ssh")]
            Method::Ssh(_) => true,
            #[cfg(feature = "container")]
            Method::Container(_) => true,
        }
    }

    /// The same method with a terminal for the login, if it started without one (sudo
    /// without a password; `requiretty` refuses that).
    fn with_tty(&self) -> Option<Method> {
        match self {
            #[cfg(feature = "sudo")]
            Method::Sudo(o) if !o.tty => {
                let mut o = o.clone();
                o.tty = true;
                Some(Method::Sudo(o))
            }
            _ => None,
        }
    }

    /// True if the image is handed over as the child's stdin (a sealed memfd) instead of
    /// being sent: the method's wiring says so (sudo and doas over a socketpair).
    fn hands_over(&self) -> bool {
        #[cfg(feature = "sudo")]
        fn wired<M: mitogen_transport_local::command::CommandMethod>(m: &M) -> bool {
            m.wiring().is_ok_and(|w| w.hands_over())
        }
        match self {
            #[cfg(feature = "sudo")]
            Method::Sudo(o) => wired(o),
            #[cfg(feature = "sudo")]
            Method::Su(o) => wired(o),
            #[cfg(feature = "sudo")]
            Method::Doas(o) => wired(o),
            _ => false,
        }
    }

    /// The image the new agent runs: the named program, or this one.
    fn image(&self) -> PathBuf {
        self.program().cloned().unwrap_or_else(|| PathBuf::from(mitogen_transport_local::SELF_EXE))
    }

    /// The build id the new agent must report. Reading the image can fail (another
    /// account's private folder): the error names the path.
    fn expected_build_id(&self) -> Result<String, ConnectError> {
        match self.program() {
            None => build_id::current().map(str::to_string),
            Some(p) => build_id::of_image(p),
        }
        .map_err(|source| ConnectError::Image { path: self.image(), source })
    }

    /// Names the program the new agent runs (`None`: this one).
    fn set_program(&mut self, program: Option<PathBuf>) {
        let slot = match self {
            Method::Local(o) => &mut o.program,
            #[cfg(feature = "sudo")]
            Method::Sudo(o) => &mut o.program,
            #[cfg(feature = "sudo")]
            Method::Su(o) => &mut o.program,
            #[cfg(feature = "sudo")]
            Method::Doas(o) => &mut o.program,
            #[cfg(feature = "ssh")]
            Method::Ssh(o) => &mut o.program,
            #[cfg(feature = "container")]
            Method::Container(o) => &mut o.program,
        };
        *slot = program;
    }

    fn program(&self) -> Option<&PathBuf> {
        let program = match self {
            Method::Local(o) => &o.program,
            #[cfg(feature = "sudo")]
            Method::Sudo(o) => &o.program,
            #[cfg(feature = "sudo")]
            Method::Su(o) => &o.program,
            #[cfg(feature = "sudo")]
            Method::Doas(o) => &o.program,
            #[cfg(feature = "ssh")]
            Method::Ssh(o) => &o.program,
            #[cfg(feature = "container")]
            Method::Container(o) => &o.program,
        };
        program.as_ref()
    }
}

/// Options shared by every connection method.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Bound on the whole start: process start, login dialogue, bootstrap and hello.
    pub connect_timeout: Duration,
    /// Name for the new context instead of `<method>.<pid>`.
    pub name: Option<String>,
    /// `(interval, count)`: probe the child after each `interval` of silence and drop it
    /// after `interval x (count + 1)` of silence (`BrokerHandle::heartbeat`). `None`: only
    /// the transport notices a lost child (end of file, ssh keepalives).
    pub heartbeat: Option<(Duration, u32)>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions { connect_timeout: Duration::from_secs(30), name: None, heartbeat: None }
    }
}

/// Why a new context could not be connected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The transport could not start the child (e.g. the program does not exist).
    #[error("child start failed: {0}")]
    Start(#[from] StartError),
    /// The child exited (or closed its stream) before saying hello.
    #[error("child exited during bootstrap ({status}){}", fmt_lines(.output))]
    ChildExited {
        /// Exit status as text.
        status: String,
        /// Its last lines of diagnostic output.
        output: Vec<String>,
    },
    /// The child did not say hello within `connect_timeout`; it was killed and reaped.
    #[error("connect timed out after {after:?}{}", fmt_lines(.output))]
    Timeout {
        /// The timeout that expired.
        after: Duration,
        /// Its last lines of diagnostic output.
        output: Vec<String>,
    },
    /// The target cannot run the image: another OS or architecture. Nothing was sent.
    #[error("the target runs {os} {arch}, but the agent image is for Linux {image_arch}")]
    Unsupported {
        /// `uname -s` of the target.
        os: String,
        /// `uname -m` of the target.
        arch: String,
        /// What the image was built for.
        image_arch: String,
    },
    /// The child runs a different image than the one we started.
    #[error("agent build id mismatch: expected {expected}, child reports {got}")]
    BuildIdMismatch {
        /// The hash of the image we started.
        expected: String,
        /// The hash the child computed of itself.
        got: String,
    },
    /// The child sent something that is not a valid hello.
    #[error("bootstrap protocol error: {0}")]
    Protocol(String),
    /// The local broker refused the new stream (it is shutting down).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The login dialogue failed: password required or incorrect, refused, host key or
    /// network errors.
    #[error("{error}{}", fmt_lines(.output))]
    Login {
        /// What failed.
        error: mitogen_core::LoginError,
        /// The last lines of output that explain it (never a password).
        output: Vec<String>,
    },
    /// Connecting through an intermediary failed there.
    #[error("error on {via}: {message}")]
    Via {
        /// The intermediary's name.
        via: String,
        /// What went wrong there.
        message: String,
    },
    /// The agent image could not be read (to hash or to send it).
    #[error("cannot read the agent image {}: {source}", .path.display())]
    Image {
        /// The image's path in the connecting context.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// Local I/O failed while talking to the child.
    #[error("I/O error during bootstrap: {0}")]
    Io(#[from] std::io::Error),
}

impl From<mitogen_core::LoginError> for ConnectError {
    fn from(error: mitogen_core::LoginError) -> Self {
        ConnectError::Login { error, output: Vec::new() }
    }
}

fn fmt_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last output:\n  {}", lines.join("\n  "))
    }
}

/// `mitogen:user@host:pid` — what `ps` shows for agents we start.
fn agent_arg0() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| {
        // SAFETY: getuid has no preconditions.
        format!("uid{}", unsafe { libc::getuid() })
    });
    let mut host = [0u8; 256];
    // SAFETY: host is a valid buffer of the given length.
    unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) };
    let end = host.iter().position(|&b| b == 0).unwrap_or(host.len());
    format!("mitogen:{user}@{}:{}", String::from_utf8_lossy(&host[..end]), std::process::id())
}

/// Facts the connecting context passes down to each new child.
#[derive(Debug, Clone)]
pub(crate) struct Inherited {
    /// This context's name, or `None` in the master (children are not prefixed).
    pub name: Option<String>,
    pub log_level: u8,
}

/// Starts a new child for `method` with id `id`, bootstraps it, and adds its stream to
/// `broker`. Blocks the calling thread (never call it on the broker thread).
pub(crate) fn connect(
    broker: &BrokerHandle,
    method: &Method,
    opts: &ConnectOptions,
    id: ContextId,
    inherited: &Inherited,
) -> Result<Context, ConnectError> {
    // Refused before anything is started: a child connected now could never be served.
    if broker.is_shutting_down() {
        return Err(ConnectError::Broker(BrokerError::Shutdown));
    }
    // Where no sealed executable memfd can be made, the image is sent instead.
    let mut image = method.hands_over().then(|| image_memfd(&method.image())).and_then(|r| {
        r.inspect_err(|e| log::debug!("the image cannot be handed over ({e}): it is sent")).ok()
    });
    let mut method = std::borrow::Cow::Borrowed(method);
    // A start is made again at most twice, each time with one thing changed.
    for _ in 0..3 {
        let error = match connect_once(broker, &method, opts, id, inherited, image.clone()) {
            Ok(Some(context)) => return Ok(context),
            Ok(None) => {
                log::debug!(
                    "stdin and stdout are relayed (sudo's I/O log?): starting again, sending the image"
                );
                image = None;
                continue;
            }
            Err(e) => e,
        };
        match (&error, method.with_tty()) {
            (ConnectError::Login { error: LoginError::TtyRequired { .. }, .. }, Some(again)) => {
                log::debug!("{}: starting again with a terminal", error);
                method = std::borrow::Cow::Owned(again);
            }
            _ => return Err(error),
        }
    }
    Err(ConnectError::Protocol("the start was refused three times".into()))
}

/// One start. `None`: the image was handed over, and the first stage found it was not its
/// stdin (a relay sits in between): start again without.
fn connect_once(
    broker: &BrokerHandle,
    method: &Method,
    opts: &ConnectOptions,
    id: ContextId,
    inherited: &Inherited,
    image: Option<Arc<OwnedFd>>,
) -> Result<Option<Context>, ConnectError> {
    let deadline = Instant::now() + opts.connect_timeout;
    // The first stage needs the hash up front (cache key); otherwise it is computed while
    // the child starts up.
    let early = if method.through_first_stage() { Some(method.expected_build_id()?) } else { None };
    let mut conn = method
        .transport(agent_arg0(), early.clone().unwrap_or_default(), image)
        .and_then(|mut t| t.start(deadline))
        .map_err(|e| match e {
            StartError::Login { error, output } => ConnectError::Login { error, output },
            e => ConnectError::Start(e),
        })?;
    // An in-process client (libssh2) pumps its session on the broker thread from now on.
    let driver = conn.driver.take();
    let mut pending = Pending { conn: Some(conn) };
    if let Some(d) = driver {
        broker.add_driver(d)?;
    }
    let mut diag = DiagLines::default();
    set_nonblocking(&pending.conn().read)?;
    set_nonblocking(&pending.conn().write)?;
    let mut fresh = false;
    if let StartMode::FirstStage { token, image, cache, handover } = pending.conn().bootstrap.clone() {
        let how = Ship { image: &image, cache, handover };
        match first_stage(&mut pending, deadline, &mut diag, opts.connect_timeout, &token, how)? {
            Staged::Fresh => fresh = true,
            Staged::Cached => {}
            Staged::Relayed => return Ok(None),
        }
    }
    let expected = match early {
        Some(id) => id,
        None => method.expected_build_id()?,
    };
    let pid = pending.conn().process.as_ref().map_or(0, |c| c.id());
    let name = opts.name.clone().unwrap_or_else(|| {
        let own = method.own_name(pid);
        match &inherited.name {
            Some(prefix) => format!("{prefix}.{own}"),
            None => own,
        }
    });
    let cfg = broker.config();
    let mut parent_ids = vec![cfg.router.id];
    parent_ids.extend(cfg.router.parent_ids.iter().copied());
    let boot = Bootstrap {
        context_id: id,
        parent_ids,
        name: name.clone(),
        max_message_size: cfg.router.max_message_size,
        log_level: inherited.log_level,
        debug: broker.debug(),
        unidirectional: cfg.router.unidirectional,
        image_id: fresh.then(|| expected.clone()),
    };
    let mut m = Message::new(
        id,
        ids::BOOTSTRAP,
        Kind::Value,
        encode_value(&boot).map_err(|e| ConnectError::Protocol(e.to_string()))?,
    );
    m.src = cfg.router.id;
    m.auth = cfg.router.id;
    let frame = m.to_frame();
    write_all(&mut pending, &frame, deadline, &mut diag, opts.connect_timeout)?;
    let hello = read_hello(&mut pending, deadline, &mut diag, opts.connect_timeout)?;
    if hello.build_id != expected {
        pending.kill();
        return Err(ConnectError::BuildIdMismatch { expected, got: hello.build_id });
    }
    log::debug!("connected {name} (id {id}, pid {})", hello.pid);
    let conn = pending.conn.take().expect("still pending");
    for l in &diag.lines {
        log::info!(target: "mitogen::stderr", "[{name}] {l}");
    }
    broker.add_stream(conn, id, false, &name)?;
    if let Some((interval, count)) = opts.heartbeat {
        broker.heartbeat(id, interval, count)?;
    }
    Ok(Some(Context::new(broker.clone(), id, name)))
}

/// A started child not yet handed to the broker: killed and reaped if dropped.
struct Pending {
    conn: Option<Connection>,
}

impl Pending {
    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("still pending")
    }

    /// Ends the child: SIGTERM first, which sudo passes on to what it runs (without a
    /// terminal, nothing else would end a first stage left waiting), then SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.conn.take() {
            if let Some(p) = c.process.as_mut() {
                // SAFETY: kill on our own unreaped child.
                unsafe { libc::kill(p.id() as libc::pid_t, libc::SIGTERM) };
                let until = Instant::now() + Duration::from_millis(200);
                while matches!(p.try_wait(), Ok(None)) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }

    /// The child went away: collect its remaining output and exit status. Output the login
    /// dialogue has not seen yet (the stream's end may be noticed first) is still judged
    /// by it, so a method's own failure message stays a typed [`ConnectError::Login`].
    fn fail_exited(&mut self, diag: &mut DiagLines, err: Option<std::io::Error>) -> ConnectError {
        let mut c = self.conn.take().expect("still pending");
        let mut login = None;
        if let Some(fd) = c.diag.take() {
            let until = Instant::now() + Duration::from_millis(500);
            while let Some(bytes) = diag.read_some(&fd, until) {
                if let (None, Some(d)) = (&login, c.dialogue.as_mut()) {
                    if let mitogen_core::DialogueStep::Fail(e) = d.on_output(&bytes) {
                        login = Some(e);
                    }
                }
            }
        }
        let status = match c.process.as_mut() {
            Some(p) => {
                let until = Instant::now() + Duration::from_millis(500);
                loop {
                    match p.try_wait() {
                        Ok(Some(s)) => break s.to_string(),
                        Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(2)),
                        _ => {
                            let _ = p.kill();
                            break p.wait().map_or_else(|e| e.to_string(), |s| s.to_string());
                        }
                    }
                }
            }
            None => err.map_or_else(|| "stream closed".into(), |e| e.to_string()),
        };
        match login {
            Some(error) => ConnectError::Login { error, output: diag.take() },
            None => ConnectError::ChildExited { status, output: diag.take() },
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Default)]
struct DiagLines {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl DiagLines {
    /// Reads what is available on `fd` (waiting until `until`) and returns it; `None` at
    /// end of file or when `until` passes.
    fn read_some(&mut self, fd: &OwnedFd, until: Instant) -> Option<Vec<u8>> {
        if !poll_one(fd, until) {
            return None;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: buf is valid for writes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return None;
        }
        self.push(&buf[..n as usize]);
        Some(buf[..n as usize].to_vec())
    }

    fn push(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            self.keep(String::from_utf8_lossy(&line[..line.len() - 1]).trim_end().to_string());
        }
    }

    fn keep(&mut self, line: String) {
        if self.lines.len() == KEEP_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    fn take(&mut self) -> Vec<String> {
        if !self.partial.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            self.keep(rest);
        }
        self.lines.drain(..).collect()
    }
}

/// Waits until `fd` is readable or `until` passes; true if readable (or hung up).
fn poll_one(fd: &OwnedFd, until: Instant) -> bool {
    let ms = until.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32;
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a valid descriptor.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads at least one byte into `buf` from the child's stream before `deadline`, keeping
/// its diagnostic output meanwhile. End of file: the child exited; deadline: killed.
fn read_some(
    p: &mut Pending,
    buf: &mut [u8],
    deadline: Instant,
    diag: &mut DiagLines,
    timeout: Duration,
) -> Result<usize, ConnectError> {
    loop {
        match io_step(p, libc::POLLIN, deadline, diag, timeout)? {
            false => continue,
            true => {
                let fd = p.conn().read.as_raw_fd();
                // SAFETY: buf is valid for writes of its length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    return Ok(n as usize);
                }
                let err = std::io::Error::last_os_error();
                if n < 0
                    && matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted)
                {
                    continue;
                }
                return Err(p.fail_exited(diag, (n < 0).then_some(err)));
            }
        }
    }
}

/// Writes all of `data` to the child before `deadline`, keeping its diagnostic output.
fn write_all(
    p: &mut Pending,
    mut data: &[u8],
    deadline: Instant,
    diag: &mut DiagLines,
    timeout: Duration,
) -> Result<(), ConnectError> {
    while !data.is_empty() {
        if !io_step(p, libc::POLLOUT, deadline, diag, timeout)? {
            continue;
        }
        let fd = p.conn().write.as_raw_fd();
        let chunk = &data[..data.len().min(1 << 20)];
        // SAFETY: chunk is valid for reads of its length.
        let n = unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) };
        if n > 0 {
            data = &data[n as usize..];
            continue;
        }
        let err = std::io::Error::last_os_error();
        if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) {
            continue;
        }
        return Err(p.fail_exited(diag, Some(err)));
    }
    Ok(())
}

/// Waits until the stream is ready for `events` (true) or only diagnostics moved (false).
fn io_step(
    p: &mut Pending,
    events: libc::c_short,
    deadline: Instant,
    diag: &mut DiagLines,
    timeout: Duration,
) -> Result<bool, ConnectError> {
    let conn = p.conn();
    let fd = if events == libc::POLLIN { conn.read.as_raw_fd() } else { conn.write.as_raw_fd() };
    let mut fds = vec![libc::pollfd { fd, events, revents: 0 }];
    if let Some(d) = &conn.diag {
        fds.push(libc::pollfd { fd: d.as_raw_fd(), events: libc::POLLIN, revents: 0 });
    }
    let now = Instant::now();
    if now >= deadline {
        let output = diag.take();
        p.kill();
        return Err(ConnectError::Timeout { after: timeout, output });
    }
    let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: fds is a valid array of pollfd.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e.into()) };
    }
    if fds.len() > 1 && fds[1].revents != 0 {
        let d = conn.diag.as_ref().expect("polled");
        let mut buf = [0u8; 4096];
        // SAFETY: buf is valid for writes.
        let n = unsafe { libc::read(d.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            let bytes = &buf[..n as usize];
            diag.push(bytes);
            let step = match p.conn.as_mut().and_then(|c| c.dialogue.as_mut()) {
                Some(d) => d.on_output(bytes),
                None => mitogen_core::DialogueStep::Continue,
            };
            match &step {
                mitogen_core::DialogueStep::Write(answer)
                | mitogen_core::DialogueStep::WriteInput(answer) => {
                    let conn = p.conn();
                    // `diag` is open: its output was just read.
                    let fd = match &step {
                        mitogen_core::DialogueStep::Write(_) => {
                            conn.diag.as_ref().expect("polled").as_raw_fd()
                        }
                        _ => conn.write.as_raw_fd(),
                    };
                    // SAFETY: answer is valid for reads of its length. The answer is never
                    // logged: it may be a password.
                    let w = unsafe { libc::write(fd, answer.as_ptr().cast(), answer.len()) };
                    if w != answer.len() as isize {
                        return Err(std::io::Error::last_os_error().into());
                    }
                }
                mitogen_core::DialogueStep::Fail(e) => {
                    let error = e.clone();
                    p.kill();
                    return Err(ConnectError::Login { error, output: diag.take() });
                }
                _ => {}
            }
        } else {
            // The child closed its stderr (normal once the agent captures it), or the PTY
            // reports EIO because the child is gone.
            p.conn.as_mut().expect("pending").diag = None;
        }
    }
    Ok(fds[0].revents != 0)
}

/// Reads the hello frame with exact-length reads (nothing beyond it is consumed).
fn read_hello(
    p: &mut Pending,
    deadline: Instant,
    diag: &mut DiagLines,
    timeout: Duration,
) -> Result<Hello, ConnectError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        got += read_some(p, &mut header[got..], deadline, diag, timeout)?;
    }
    let mut out = Vec::new();
    Decoder::new(1 << 20).feed(&header, &mut out).map_err(|e| ConnectError::Protocol(e.to_string()))?;
    let len = u32::from_be_bytes([header[24], header[25], header[26], header[27]]) as usize;
    let mut frame = header.to_vec();
    frame.resize(HEADER_LEN + len, 0);
    let mut got = HEADER_LEN;
    while got < frame.len() {
        got += read_some(p, &mut frame[got..], deadline, diag, timeout)?;
    }
    let mut out = Vec::new();
    Decoder::new(1 << 20).feed(&frame, &mut out).map_err(|e| ConnectError::Protocol(e.to_string()))?;
    let m = out.pop().ok_or_else(|| ConnectError::Protocol("no hello frame".into()))?;
    if m.handle != ids::HELLO || m.kind != Kind::Value {
        return Err(ConnectError::Protocol(format!("expected hello, got {m:?}")));
    }
    decode_value::<Hello>(&m.data).map_err(|e| ConnectError::Protocol(e.to_string()))
}

/// Most output accepted before the marker line (banners, profile output).
const MAX_PREAMBLE: usize = 64 * 1024;

/// What a first stage is given, and how.
struct Ship<'a> {
    image: &'a Path,
    /// The target's image cache may be used.
    cache: bool,
    /// The image was handed over as the child's stdin.
    handover: bool,
}

/// How a first stage ended.
enum Staged {
    /// The agent runs the image this side sent or handed over: its build id is known.
    Fresh,
    /// The agent runs the copy in the target's cache.
    Cached,
    /// The image was handed over, but the first stage's stdin and stdout are not what this
    /// side gave it (a relay sits in between): the child was killed.
    Relayed,
}

/// The first-stage dialogue: find the marker line, check the target, send the image.
fn first_stage(
    p: &mut Pending,
    deadline: Instant,
    diag: &mut DiagLines,
    timeout: Duration,
    token: &str,
    Ship { image, cache, handover }: Ship<'_>,
) -> Result<Staged, ConnectError> {
    let stage =
        FirstStage { token: token.to_string(), hash: String::new(), argv0: String::new(), cache, handover };
    // Read in blocks: the first stage prints nothing after its marker line until it has our
    // answer, so a read cannot take anything that belongs after the marker.
    let mut line = Vec::new();
    let mut seen = 0;
    let report = 'marker: loop {
        let mut buf = [0u8; 4096];
        let n = read_some(p, &mut buf, deadline, diag, timeout)?;
        seen += n;
        let mut rest = &buf[..n];
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            let text = String::from_utf8_lossy(&std::mem::take(&mut line)).into_owned();
            if let Some(r) = stage.parse(&text) {
                if !rest.is_empty() {
                    p.kill();
                    return Err(ConnectError::Protocol(format!(
                        "{} unexpected bytes after the first-stage marker",
                        rest.len()
                    )));
                }
                break 'marker r;
            }
            diag.keep(text);
        }
        line.extend_from_slice(rest);
        if seen > MAX_PREAMBLE {
            p.kill();
            return Err(ConnectError::Protocol(format!(
                "no first-stage marker in {MAX_PREAMBLE} bytes of output"
            )));
        }
    };
    let image_arch = stage1::image_arch();
    if report.os != "Linux" || !stage1::arch_matches(image_arch, &report.arch) {
        p.kill();
        return Err(ConnectError::Unsupported {
            os: report.os,
            arch: report.arch,
            image_arch: image_arch.into(),
        });
    }
    if handover && !report.handover {
        p.kill();
        return Ok(Staged::Relayed);
    }
    let loader = stage1::choose(&report);
    let payload = match loader {
        Loader::Cached | Loader::HandedOver => Arc::new(Vec::new()),
        _ => image_payload(image, loader.encoding())
            .map_err(|source| ConnectError::Image { path: image.to_path_buf(), source })?,
    };
    log::debug!("first stage on {} {}: {loader:?}, {} bytes", report.os, report.arch, payload.len());
    let answer = stage1::answer(loader, payload.len(), &report.arch, cache);
    write_all(p, answer.as_bytes(), deadline, diag, timeout)?;
    write_all(p, &payload, deadline, diag, timeout)?;
    Ok(if loader == Loader::Cached { Staged::Cached } else { Staged::Fresh })
}

/// The image as shipped, in a sealed memfd (no write, shrink, grow or new seal), opened
/// read-only: made once per image and kept while the file is unchanged. Same-host
/// children get it as their stdin and all run this one copy; their user can read it,
/// never change it.
fn image_memfd(path: &Path) -> std::io::Result<Arc<OwnedFd>> {
    type Made = (u64, std::time::SystemTime, Arc<OwnedFd>);
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Made>>> = OnceLock::new();
    /// `MFD_EXEC` (Linux 6.3): executable even where `vm.memfd_noexec` makes new memfds
    /// non-executable. Older kernels refuse the flag.
    const MFD_EXEC: libc::c_uint = 0x10;
    let meta = std::fs::metadata(path)?;
    let (len, mtime) = (meta.len(), meta.modified()?);
    let cache = CACHE.get_or_init(Default::default);
    if let Some((l, m, fd)) = cache.lock().unwrap().get(path) {
        if (*l, *m) == (len, mtime) {
            return Ok(fd.clone());
        }
    }
    let bytes = crate::build_id::shipped(path)?;
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: a NUL-terminated name and plain flags.
    let mut raw = unsafe { libc::memfd_create(c"mitogen-image".as_ptr(), flags | MFD_EXEC) };
    if raw < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // SAFETY: as above.
        raw = unsafe { libc::memfd_create(c"mitogen-image".as_ptr(), flags) };
    }
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that we now own.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    std::io::Write::write_all(&mut file, &bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let read_only = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let fd = Arc::new(OwnedFd::from(read_only));
    // A changed file replaces its old copy (children running that one keep it alive).
    cache.lock().unwrap().insert(path.to_path_buf(), (len, mtime, fd.clone()));
    Ok(fd)
}

/// The image as sent for `encoding`, prepared once per image and kept while it is unchanged.
fn image_payload(path: &Path, encoding: stage1::Encoding) -> std::io::Result<Arc<Vec<u8>>> {
    type Key = (PathBuf, bool, u64, std::time::SystemTime);
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<Vec<u8>>>>> = OnceLock::new();
    let meta = std::fs::metadata(path)?;
    let gz = encoding == stage1::Encoding::Gzip;
    let key = (path.to_path_buf(), gz, meta.len(), meta.modified()?);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().unwrap().get(&key) {
        return Ok(v.clone());
    }
    let raw = crate::build_id::shipped(path)?;
    let bytes = if gz {
        use std::io::Write as _;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&raw)?;
        enc.finish()?
    } else {
        raw
    };
    let v = Arc::new(bytes);
    cache.lock().unwrap().insert(key, v.clone());
    Ok(v)
}

/// Request for an intermediary to connect a child itself (handle CONNECT).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConnectRequest {
    pub id: ContextId,
    pub method: Method,
    pub opts: ConnectOptions,
    /// The build id of the method's `program`, where the requester could read it. An
    /// intermediary running that same image starts its own (`/proc/self/exe`) instead of
    /// opening the path, which may not exist there or be closed to its account.
    pub program_id: Option<String>,
}

/// Successful answer to a [`ConnectRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConnectReply {
    pub name: String,
}

/// Asks `via` to connect a new child with id `id`; the route to it is announced to every
/// ancestor before the reply arrives.
pub fn connect_via(
    via: &Context,
    method: &Method,
    opts: &ConnectOptions,
    id: ContextId,
) -> Result<Context, ConnectError> {
    let program_id = method.program().and_then(|p| build_id::of_image(p).ok());
    let req = ConnectRequest { id, method: method.clone(), opts: opts.clone(), program_id };
    let data = encode_value(&req).map_err(|e| ConnectError::Protocol(e.to_string()))?;
    let broker = via.broker();
    let mut rx: mitogen_core::Receiver<Result<ConnectReply, String>> =
        mitogen_core::Receiver::with_respondent(broker, via.id()).map_err(|_| BrokerError::Shutdown)?;
    let mut m = Message::new(via.id(), ids::CONNECT, Kind::Value, data);
    m.reply_to = rx.handle();
    broker.send(m)?;
    let wait = opts.connect_timeout + Duration::from_secs(5);
    match rx.get(Some(wait)) {
        Ok(Ok(reply)) => Ok(Context::new(broker.clone(), id, reply.name)),
        Ok(Err(message)) => Err(ConnectError::Via { via: via.name().to_string(), message }),
        Err(e) => Err(ConnectError::Via { via: via.name().to_string(), message: e.to_string() }),
    }
}

/// Serves CONNECT requests in an agent: each runs on its own thread.
pub(crate) fn serve_connect(b: &BrokerHandle, m: Message, inherited: Inherited) {
    let (b2, request) = (b.clone(), m.clone());
    let spawned = std::thread::Builder::new().name("mitogen-connect".into()).spawn(move || {
        let result = match decode_value::<ConnectRequest>(&m.data) {
            Ok(mut req) => {
                if req.program_id.is_some() && req.program_id.as_deref() == build_id::current().ok() {
                    req.method.set_program(None);
                }
                connect(&b2, &req.method, &req.opts, req.id, &inherited)
                    .map(|ctx| ConnectReply { name: ctx.name().to_string() })
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(format!("malformed connect request: {e}")),
        };
        answer_connect(&b2, &m, result);
    });
    if let Err(e) = spawned {
        answer_connect(b, &request, Err(format!("cannot start a connect thread: {e}")));
    }
}

/// Replies to a CONNECT request. An error too large for `max_message_size` (its output
/// lines can be long) is cut to fit rather than lost, which would leave the requester
/// waiting for its timeout.
fn answer_connect(b: &BrokerHandle, m: &Message, mut result: Result<ConnectReply, String>) {
    let max = b.config().router.max_message_size as usize;
    if let Err(text) = &mut result {
        crate::cut_to(text, (max / 2).max(64));
    }
    let data = encode_value(&result).expect("a connect reply always encodes");
    if let Err(e) = b.send(m.reply(Kind::Value, data)) {
        log::debug!("cannot answer a connect request: {e}");
    }
}

/// Decodes `data` as every control message of the connect handshake (bootstrap, hello,
/// connect request and reply), as an agent or an intermediary would; for the fuzzers.
/// True if any of them decoded.
#[doc(hidden)]
pub fn decode_control_messages(data: &[u8]) -> bool {
    let boot = decode_value::<Bootstrap>(data).is_ok();
    let hello = decode_value::<Hello>(data).is_ok();
    let req = decode_value::<ConnectRequest>(data).is_ok();
    let reply = decode_value::<Result<ConnectReply, String>>(data).is_ok();
    boot || hello || req || reply
}
