//! Connecting a new child: start it through a [`Transport`], send its bootstrap, check its
//! hello, hand the stream to the broker. The same code runs in the master and in an
//! intermediary asked to connect onward (`via`).

use crate::build_id;
use mitogen_core::codec::{decode_value, encode_value, Decoder};
use mitogen_core::ids::{self, ContextId};
use mitogen_core::message::HEADER_LEN;
use mitogen_core::transport::{Connection, StartError, Transport};
use mitogen_core::{BrokerError, BrokerHandle, Context, Kind, Message};
use mitogen_transport_local::{LocalOptions, LocalTransport};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
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
}

impl Method {
    fn transport(&self, arg0: String) -> Box<dyn Transport> {
        match self {
            Method::Local(o) => Box::new(LocalTransport::new(o.clone(), arg0)),
        }
    }

    /// The build id the new agent must report.
    fn expected_build_id(&self) -> std::io::Result<String> {
        match self {
            Method::Local(o) => match &o.program {
                None => build_id::current().map(str::to_string),
                Some(p) => build_id::of_image(p),
            },
        }
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
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions { connect_timeout: Duration::from_secs(30), name: None }
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
    /// Connecting through an intermediary failed there.
    #[error("error on {via}: {message}")]
    Via {
        /// The intermediary's name.
        via: String,
        /// What went wrong there.
        message: String,
    },
    /// Local I/O failed while talking to the child.
    #[error("I/O error during bootstrap: {0}")]
    Io(#[from] std::io::Error),
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
    let deadline = Instant::now() + opts.connect_timeout;
    let mut transport = method.transport(agent_arg0());
    let conn = transport.start(deadline)?;
    let mut pending = Pending { conn: Some(conn) };
    // Hashed while the child starts up.
    let expected = method.expected_build_id()?;
    let pid = pending.conn().process.as_ref().map_or(0, |c| c.id());
    let name = opts.name.clone().unwrap_or_else(|| {
        let own = format!("{}.{pid}", transport.method());
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
    let mut diag = DiagLines::default();
    if let Err(e) = std::fs::File::from(pending.conn().write.try_clone()?).write_all(&frame) {
        return Err(pending.fail_exited(&mut diag, Some(e)));
    }
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
    Ok(Context::new(broker.clone(), id, name))
}

/// A started child not yet handed to the broker: killed and reaped if dropped.
struct Pending {
    conn: Option<Connection>,
}

impl Pending {
    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("still pending")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.conn.take() {
            if let Some(p) = c.process.as_mut() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }

    /// The child went away: collect its remaining output and exit status.
    fn fail_exited(&mut self, diag: &mut DiagLines, err: Option<std::io::Error>) -> ConnectError {
        let mut c = self.conn.take().expect("still pending");
        if let Some(fd) = c.diag.take() {
            let until = Instant::now() + Duration::from_millis(500);
            while diag.read_some(&fd, until) {}
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
        ConnectError::ChildExited { status, output: diag.take() }
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
    /// Reads what is available on `fd` (waiting until `until`); false at end of file.
    fn read_some(&mut self, fd: &OwnedFd, until: Instant) -> bool {
        if !poll_one(fd, until) {
            return false;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: buf is valid for writes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return false;
        }
        self.push(&buf[..n as usize]);
        true
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

/// Reads the hello frame with exact-length reads (nothing beyond it is consumed), while
/// collecting diagnostic output, until `deadline`.
fn read_hello(
    p: &mut Pending,
    deadline: Instant,
    diag: &mut DiagLines,
    timeout: Duration,
) -> Result<Hello, ConnectError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut body: Vec<u8> = Vec::new();
    let mut body_got = 0;
    let mut body_len = None;
    loop {
        let conn = p.conn();
        let read_fd = conn.read.as_raw_fd();
        let mut fds = vec![libc::pollfd { fd: read_fd, events: libc::POLLIN, revents: 0 }];
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
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if fds.len() > 1 && fds[1].revents != 0 {
            let d = conn.diag.as_ref().expect("polled");
            let mut buf = [0u8; 4096];
            // SAFETY: buf is valid for writes.
            let n = unsafe { libc::read(d.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                diag.push(&buf[..n as usize]);
            } else {
                // The child closed its stderr (normal once the agent captures it).
                p.conn.as_mut().expect("pending").diag = None;
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        let n = match body_len {
            None => read_fd_into(read_fd, &mut header[got..]),
            Some(_) => read_fd_into(read_fd, &mut body[body_got..]),
        };
        match n {
            Ok(0) | Err(_) => return Err(p.fail_exited(diag, n.err())),
            Ok(n) if body_len.is_none() => {
                got += n;
                if got == HEADER_LEN {
                    let mut dec = Decoder::new(1 << 20);
                    let mut out = Vec::new();
                    dec.feed(&header, &mut out).map_err(|e| ConnectError::Protocol(e.to_string()))?;
                    let len = u32::from_be_bytes([header[24], header[25], header[26], header[27]]) as usize;
                    body = vec![0; len];
                    body_len = Some(len);
                }
            }
            Ok(n) => body_got += n,
        }
        if body_len == Some(body_got) {
            let mut frame = header.to_vec();
            frame.extend_from_slice(&body);
            let mut out = Vec::new();
            Decoder::new(1 << 20)
                .feed(&frame, &mut out)
                .map_err(|e| ConnectError::Protocol(e.to_string()))?;
            let m = out.pop().ok_or_else(|| ConnectError::Protocol("no hello frame".into()))?;
            if m.handle != ids::HELLO || m.kind != Kind::Value {
                return Err(ConnectError::Protocol(format!("expected hello, got {m:?}")));
            }
            return decode_value::<Hello>(&m.data).map_err(|e| ConnectError::Protocol(e.to_string()));
        }
    }
}

fn read_fd_into(fd: i32, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Request for an intermediary to connect a child itself (handle CONNECT).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConnectRequest {
    pub id: ContextId,
    pub method: Method,
    pub opts: ConnectOptions,
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
    let req = ConnectRequest { id, method: method.clone(), opts: opts.clone() };
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
    let b = b.clone();
    let spawned = std::thread::Builder::new().name("mitogen-connect".into()).spawn(move || {
        let result = match decode_value::<ConnectRequest>(&m.data) {
            Ok(req) => connect(&b, &req.method, &req.opts, req.id, &inherited)
                .map(|ctx| ConnectReply { name: ctx.name().to_string() })
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("malformed connect request: {e}")),
        };
        if let Ok(data) = encode_value(&result) {
            let _ = b.send(m.reply(Kind::Value, data));
        }
    });
    if let Err(e) = spawned {
        log::error!("cannot start a connect thread: {e}");
    }
}
