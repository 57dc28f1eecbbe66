//! The agent: what a program becomes when it was started as a child.

use crate::connect::{self, Bootstrap, Hello, Inherited};
use crate::registry::{install_panic_hook, Registry};
use mitogen_core::broker::Sink;
use mitogen_core::channel::Queue;
use mitogen_core::codec::{decode_value, encode_value, Decoder};
use mitogen_core::ids::{self, MASTER_ID};
use mitogen_core::logs::{level_to_u8, LogRecord};
use mitogen_core::router::{Policy, RouterConfig};
use mitogen_core::transport::Connection;
use mitogen_core::{Broker, BrokerConfig, BrokerHandle, Kind, Message};
use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A call request at least this large counts as bulk data (see the dispatch loop).
const BULK_CALL: usize = 64 * 1024;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The parent sent no valid bootstrap.
    #[error("bad bootstrap from parent: {0}")]
    Bootstrap(String),
    /// An OS call failed while setting up.
    #[error("agent setup failed: {0}")]
    Io(#[from] std::io::Error),
    /// The broker could not start.
    #[error(transparent)]
    Broker(#[from] mitogen_core::BrokerError),
}

fn dup_cloexec(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we were given; the result is ours.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn dup2(from: RawFd, to: RawFd) -> std::io::Result<()> {
    // SAFETY: plain dup2 onto a standard descriptor.
    if unsafe { libc::dup2(from, to) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is valid for two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads exactly one frame (the bootstrap) without consuming anything after it.
fn read_bootstrap(fd: &OwnedFd) -> Result<Bootstrap, AgentError> {
    let read_exact = |buf: &mut [u8]| -> Result<(), AgentError> {
        let mut got = 0;
        while got < buf.len() {
            // SAFETY: the slice is valid for writes.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got) };
            if n == 0 {
                return Err(AgentError::Bootstrap("parent closed the stream".into()));
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            got += n as usize;
        }
        Ok(())
    };
    let mut frame = vec![0u8; mitogen_core::message::HEADER_LEN];
    read_exact(&mut frame)?;
    let mut dec = Decoder::new(1 << 20);
    let mut out = Vec::new();
    dec.feed(&frame, &mut out).map_err(|e| AgentError::Bootstrap(e.to_string()))?;
    let len = u32::from_be_bytes([frame[24], frame[25], frame[26], frame[27]]) as usize;
    let mut body = vec![0u8; len];
    read_exact(&mut body)?;
    dec.feed(&body, &mut out).map_err(|e| AgentError::Bootstrap(e.to_string()))?;
    let m = out.pop().ok_or_else(|| AgentError::Bootstrap("incomplete frame".into()))?;
    if m.handle != ids::BOOTSTRAP {
        return Err(AgentError::Bootstrap(format!("expected bootstrap, got {m:?}")));
    }
    decode_value(&m.data).map_err(|e| AgentError::Bootstrap(e.to_string()))
}

/// An agent in another account inherits a working directory it may not enter (a home
/// folder of mode 0700): every relative path, and every command it runs, would fail there
/// with a bare "Permission denied". It moves to its own home, or `/`, instead.
/// Returns where it moved to.
fn leave_closed_cwd() -> Option<std::path::PathBuf> {
    // chdir needs search permission on the target: "." tests exactly that.
    if std::env::set_current_dir(".").is_ok() {
        return None;
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    home.into_iter().chain([std::path::PathBuf::from("/")]).find(|dir| std::env::set_current_dir(dir).is_ok())
}

fn set_thread_name(name: &str) {
    // comm is limited to 15 bytes; keep the informative tail.
    let short: String = name.chars().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
    if let Ok(c) = std::ffi::CString::new(short) {
        // SAFETY: PR_SET_NAME with a NUL-terminated string.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) };
    }
}

/// Runs the agent; returns only on setup failure. `on_stdout`: the stream is stdout alone
/// (a socket, both ways); stdin is not part of it.
pub(crate) fn run(registry: Registry, on_stdout: bool) -> Result<(), AgentError> {
    let stream_in = dup_cloexec(if on_stdout { 1 } else { 0 })?;
    let stream_out = dup_cloexec(1)?;
    let boot = read_bootstrap(&stream_in)?;
    let me = match boot.image_id.clone() {
        Some(id) => crate::build_id::adopt(id).to_string(),
        None => crate::build_id::current()?.to_string(),
    };
    set_thread_name(&boot.name);
    install_panic_hook();
    let moved = leave_closed_cwd();

    // stdin becomes /dev/null; stdout and stderr become pipes read by the broker, so
    // nothing the agent or its subprocesses print can corrupt the message stream.
    let devnull = std::fs::File::open("/dev/null")?;
    dup2(devnull.as_raw_fd(), 0)?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    dup2(out_w.as_raw_fd(), 1)?;
    dup2(err_w.as_raw_fd(), 2)?;
    drop((out_w, err_w, devnull));

    let parent_id = *boot.parent_ids.first().ok_or_else(|| AgentError::Bootstrap("no parent id".into()))?;
    let broker = Broker::start(BrokerConfig {
        name: boot.name.clone(),
        router: RouterConfig {
            id: boot.context_id,
            parent_ids: boot.parent_ids.clone(),
            max_message_size: boot.max_message_size,
            unidirectional: boot.unidirectional,
        },
        shutdown_grace: Duration::from_secs(3),
        debug: boot.debug,
    })?;
    let h = broker.handle().clone();
    let _ = crate::CURRENT.set(h.clone());
    // The broker thread ends the process once shutdown is complete, even if a user function
    // is still running on the main thread. `_exit` avoids stdio locks a hung thread holds.
    // SAFETY: _exit has no preconditions.
    h.on_exit(Box::new(|| unsafe { libc::_exit(0) }));

    let calls = Queue::new();
    h.set_handle(ids::CALL_FUNCTION, Sink::Queue(calls.clone()), Policy::ParentOnly)?;
    h.set_handle(
        ids::SHUTDOWN,
        Sink::Callback(std::sync::Arc::new(|b: &BrokerHandle, _m| b.begin_shutdown())),
        Policy::ParentOnly,
    )?;
    let inherited = Inherited { name: Some(boot.name.clone()), log_level: boot.log_level };
    h.set_handle(
        ids::CONNECT,
        Sink::Callback(std::sync::Arc::new(move |b: &BrokerHandle, m| {
            connect::serve_connect(b, m, inherited.clone())
        })),
        Policy::ParentOnly,
    )?;
    let conn = Connection {
        read: stream_in,
        write: stream_out,
        diag: None,
        process: None,
        description: "parent".into(),
        bootstrap: mitogen_core::Bootstrap::Direct,
        dialogue: None,
        driver: None,
    };
    h.add_stream(conn, parent_id, true, "parent")?;
    // HELLO before anything can log: the parent reads it as the stream's first frame, and
    // a record the broker thread forwarded first would take its place.
    let hello = Hello { build_id: me, pid: std::process::id() };
    let data = encode_value(&hello).map_err(|e| AgentError::Bootstrap(e.to_string()))?;
    h.send(Message::new(parent_id, ids::HELLO, Kind::Value, data))?;

    let level = level_filter(boot.log_level);
    install_logger(&h, &boot.name, level);
    if let Some(dir) = moved {
        log::debug!("the inherited working directory is closed to this account: moved to {}", dir.display());
    }
    for (fd, target) in [(out_r, "stdout"), (err_r, "stderr")] {
        let name = boot.name.clone();
        let forward = level >= log::LevelFilter::Info;
        let room = log_room(boot.max_message_size);
        h.add_line_reader(
            fd,
            Box::new(move |b, line| {
                if let (Some(line), true) = (line, forward) {
                    let mut rec = LogRecord {
                        context: name.clone(),
                        level: level_to_u8(log::Level::Info),
                        target: target.into(),
                        message: line.into(),
                    };
                    crate::cut_to(&mut rec.message, room);
                    if let Ok(data) = encode_value(&rec) {
                        let _ = b.send(Message::new(MASTER_ID, ids::FORWARD_LOG, Kind::Value, data));
                    }
                }
            }),
        )?;
    }

    // Calls run one at a time on the main thread while the broker keeps routing. Waiting
    // for the next call, the main thread reads the parent stream itself (one wake-up per
    // call), unless the last call was bulk data: then the broker thread reads the next one
    // while this thread is still busy, which keeps large transfers overlapped.
    let mut last_len = 0;
    loop {
        let from = (last_len < BULK_CALL).then_some(parent_id);
        let Some(m) = h.wait(&calls, None, from) else { continue };
        if m.is_dead() {
            break;
        }
        last_len = m.data.len();
        registry.dispatch(&h, &boot.name, m);
    }
    // The broker is exiting; its exit hook ends the process.
    h.wait_exited(Duration::from_secs(10));
    drop(broker);
    Ok(())
}

fn level_filter(n: u8) -> log::LevelFilter {
    match n {
        0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Forwards `log` records to the master, filtered here at the master's level.
struct ForwardLogger {
    broker: BrokerHandle,
    name: String,
    level: log::LevelFilter,
    /// Longest message a record carries (see [`log_room`]).
    room: usize,
}

/// Room for a log record's text: half the message limit (the record's other fields are
/// short), so a long record or output line is cut rather than refused and lost.
fn log_room(max_message_size: u32) -> usize {
    (max_message_size as usize / 2).max(64)
}

thread_local! {
    static IN_LOGGER: Cell<bool> = const { Cell::new(false) };
}

impl log::Log for ForwardLogger {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) || IN_LOGGER.with(|f| f.replace(true)) {
            return;
        }
        let mut rec = LogRecord {
            context: self.name.clone(),
            level: level_to_u8(record.level()),
            target: record.target().to_string(),
            message: record.args().to_string(),
        };
        crate::cut_to(&mut rec.message, self.room);
        if let Ok(data) = encode_value(&rec) {
            // Never route inline: this may run while the router lock is held.
            self.broker.send_later(Message::new(MASTER_ID, ids::FORWARD_LOG, Kind::Value, data));
        }
        IN_LOGGER.with(|f| f.set(false));
    }

    fn flush(&self) {}
}

fn install_logger(h: &BrokerHandle, name: &str, level: log::LevelFilter) {
    let room = log_room(h.config().router.max_message_size);
    let logger = ForwardLogger { broker: h.clone(), name: name.to_string(), level, room };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
