//! The broker thread: readiness loop, stream reading, flushing, timers, reaping, shutdown.

use super::rx::StreamRx;
use super::stream::StreamTx;
use super::sys;
use super::{resolve, BrokerHandle, Command, Deferred, Driver, Interest, LineSink, Resolved, Wants};
use crate::ids;
use crate::message::{Kind, Message};
use crate::router::StreamId;
use polling::{Event, Events, PollMode};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

// Poll keys: each stream gets a slot `k`; its read fd is 4k, its write fd 4k+1 and its
// diagnostic fd 4k+2. Keys 4n+3 belong to the rest: free-standing line readers use even
// n (their own counter), drivers odd n (descriptor i of driver d: n = 2(8d+i)+1).
pub(super) fn read_key(k: usize) -> usize {
    k * 4
}
pub(super) fn write_key(k: usize) -> usize {
    k * 4 + 1
}
fn diag_key(k: usize) -> usize {
    k * 4 + 2
}
fn line_key(m: usize) -> usize {
    (2 * m) * 4 + 3
}
/// Most descriptors one driver may poll.
const DRIVER_FDS: usize = 8;
fn driver_key(d: usize, i: usize) -> usize {
    (2 * (d * DRIVER_FDS + i) + 1) * 4 + 3
}
/// The driver and descriptor index of a driver key.
fn driver_of(key: usize) -> Option<(usize, usize)> {
    let n = key / 4;
    (key % 4 == 3 && n % 2 == 1).then_some(((n / 2) / DRIVER_FDS, (n / 2) % DRIVER_FDS))
}

/// Longest line kept before it is cut (diagnostic output with no newline).
const MAX_LINE: usize = 64 * 1024;
/// A child that has not exited this long after its stream closed gets SIGTERM...
const TERM_AFTER: Duration = Duration::from_secs(2);
/// ...and SIGKILL this long after.
const KILL_AFTER: Duration = Duration::from_secs(4);

struct Reader {
    stream: StreamId,
    rx: Arc<StreamRx>,
    tx: Arc<StreamTx>,
    name: String,
    is_parent: bool,
}

struct Lines {
    fd: OwnedFd,
    partial: Vec<u8>,
    sink: LineSink,
}

struct Reaping {
    stream: StreamId,
    child: Child,
    name: String,
    since: Instant,
    signalled: u8,
}

struct Driven {
    driver: Box<dyn Driver>,
    /// Its descriptors (fixed for its life, open while it is registered).
    fds: Vec<RawFd>,
    /// What the poller waits for on each, so only changes cost a syscall.
    interest: Vec<Interest>,
    deadline: Option<Instant>,
}

struct Loop {
    h: BrokerHandle,
    readers: HashMap<usize, Reader>,
    lines: HashMap<usize, Lines>,
    next_line_key: usize,
    drivers: HashMap<usize, Driven>,
    next_driver: usize,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_fns: HashMap<u64, Deferred>,
    next_timer: u64,
    reaping: Vec<Reaping>,
    shutdown_deadline: Option<Instant>,
}

pub(super) fn run(h: BrokerHandle) {
    let _ = h.shared.broker_thread.set(std::thread::current().id());
    let mut lp = Loop {
        h,
        readers: HashMap::new(),
        lines: HashMap::new(),
        next_line_key: 0,
        drivers: HashMap::new(),
        next_driver: 0,
        timers: BinaryHeap::new(),
        timer_fns: HashMap::new(),
        next_timer: 0,
        reaping: Vec::new(),
        shutdown_deadline: None,
    };
    let mut events = Events::new();
    loop {
        lp.run_commands();
        if lp.shutdown_finished() {
            break;
        }
        let timeout = lp.next_timeout();
        events.clear();
        if let Err(e) = lp.h.shared.poller.wait(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("{}: poller failed: {e}", lp.h.shared.cfg.name);
                lp.h.begin_shutdown();
            }
        }
        lp.run_commands();
        for ev in events.iter() {
            lp.on_event(ev);
        }
        lp.run_timers();
        lp.run_driver_deadlines();
        lp.reap(false);
    }
    lp.finish();
}

impl Loop {
    fn name(&self) -> &str {
        &self.h.shared.cfg.name
    }

    fn run_commands(&mut self) {
        let out = std::mem::take(&mut *self.h.shared.outbox.lock().unwrap());
        for m in out {
            self.h.send_internal(m);
        }
        let cmds = std::mem::take(&mut self.h.shared.core.lock().unwrap().commands);
        for c in cmds {
            match c {
                Command::AddReader { stream, key, rx, diag, process, name } => {
                    self.add_reader(stream, key, rx, diag, process, name)
                }
                Command::AddLines { fd, sink } => {
                    let key = line_key(self.next_line_key);
                    self.next_line_key += 1;
                    self.add_lines(key, fd, sink);
                }
                Command::AddDriver(d) => self.add_driver(d),
                Command::Timer { at, f } => {
                    let id = self.next_timer;
                    self.next_timer += 1;
                    self.timers.push(Reverse((at, id)));
                    self.timer_fns.insert(id, f);
                }
                Command::CloseStream(s, why) => {
                    if let Some(k) = self.key_of(s) {
                        self.lose(k, &why);
                    }
                }
                Command::Shutdown => self.start_shutdown(),
            }
        }
    }

    fn add_reader(
        &mut self,
        stream: StreamId,
        k: usize,
        rx: Arc<StreamRx>,
        diag: Option<OwnedFd>,
        process: Option<Child>,
        name: String,
    ) {
        let (tx, is_parent) = {
            let core = self.h.shared.core.lock().unwrap();
            (core.streams.get(&stream).cloned(), core.router.parent_stream() == Some(stream))
        };
        if let Some(p) = process {
            // Not due for reaping until its stream ends.
            let since = far_future();
            self.reaping.push(Reaping { stream, child: p, name: name.clone(), since, signalled: 0 });
        }
        if let Some(fd) = diag {
            let label = name.clone();
            let sink: LineSink = Box::new(move |_, line| {
                if let Some(l) = line {
                    log::info!(target: "mitogen::stderr", "[{label}] {l}");
                }
            });
            self.add_lines(diag_key(k), fd, sink);
        }
        let Some(tx) = tx else { return };
        if let Err(e) = rx.register(&self.h.shared.poller) {
            log::error!("{}: cannot poll stream {stream}: {e}", self.name());
            return;
        }
        self.readers.insert(k, Reader { stream, rx, tx, name, is_parent });
    }

    fn add_lines(&mut self, key: usize, fd: OwnedFd, sink: LineSink) {
        // SAFETY: deleted before the fd is dropped (in `on_lines`).
        if unsafe { self.h.shared.poller.add_with_mode(&fd, Event::readable(key), PollMode::Level) }.is_ok() {
            self.lines.insert(key, Lines { fd, partial: Vec::new(), sink });
        }
    }

    fn add_driver(&mut self, driver: Box<dyn Driver>) {
        let d = self.next_driver;
        self.next_driver += 1;
        let fds = driver.fds();
        if fds.len() > DRIVER_FDS {
            log::error!("{}: a driver polls {} descriptors (at most {DRIVER_FDS})", self.name(), fds.len());
            return;
        }
        for (i, fd) in fds.iter().enumerate() {
            // SAFETY: deleted in `end_driver` (or `finish`) before the driver, which owns
            // the descriptors, is dropped.
            if let Err(e) = unsafe {
                self.h.shared.poller.add_with_mode(fd, Event::none(driver_key(d, i)), PollMode::Level)
            } {
                log::error!("{}: cannot poll a driver: {e}", self.name());
                for fd in &fds[..i] {
                    let _ = self.h.shared.poller.delete(fd);
                }
                return;
            }
        }
        let fds: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let interest = vec![Interest::default(); fds.len()];
        self.drivers.insert(d, Driven { driver, fds, interest, deadline: None });
        self.poll_driver(d);
    }

    /// Lets driver `d` make progress, then polls what it wants next.
    fn poll_driver(&mut self, d: usize) {
        let Some(dr) = self.drivers.get_mut(&d) else { return };
        match dr.driver.poll(Instant::now()) {
            Some(Wants { interest, deadline }) => {
                dr.deadline = deadline;
                for (i, (&fd, want)) in dr.fds.iter().zip(&interest).enumerate() {
                    if dr.interest[i] == *want {
                        continue;
                    }
                    let mut ev = Event::none(driver_key(d, i));
                    ev.readable = want.readable;
                    ev.writable = want.writable;
                    // SAFETY: the driver keeps its descriptors open while registered.
                    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                    let _ = self.h.shared.poller.modify_with_mode(fd, ev, PollMode::Level);
                    dr.interest[i] = *want;
                }
            }
            None => self.end_driver(d),
        }
    }

    fn end_driver(&mut self, d: usize) {
        if let Some(dr) = self.drivers.remove(&d) {
            for &fd in &dr.fds {
                // SAFETY: still open: the driver is dropped only after this.
                let _ = self.h.shared.poller.delete(unsafe { BorrowedFd::borrow_raw(fd) });
            }
        }
    }

    fn run_driver_deadlines(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .drivers
            .iter()
            .filter(|(_, dr)| dr.deadline.is_some_and(|t| t <= now))
            .map(|(d, _)| *d)
            .collect();
        for d in due {
            self.poll_driver(d);
        }
    }

    fn key_of(&self, stream: StreamId) -> Option<usize> {
        self.readers.iter().find(|(_, r)| r.stream == stream).map(|(k, _)| *k)
    }

    fn on_event(&mut self, ev: Event) {
        match ev.key % 4 {
            0 => self.on_readable(ev.key / 4),
            1 => {
                let k = ev.key / 4;
                let Some(r) = self.readers.get(&k) else { return };
                if let Err(e) = r.tx.flush(&self.h.shared.poller) {
                    let why = format!("write failed: {e}");
                    self.lose(k, &why);
                }
            }
            _ => match driver_of(ev.key) {
                Some((d, _)) => self.poll_driver(d),
                None => self.on_lines(ev.key),
            },
        }
    }

    fn on_readable(&mut self, k: usize) {
        let Some(r) = self.readers.get(&k) else { return };
        let rx = r.rx.clone();
        if let Some(why) = rx.read_and_route(&self.h) {
            self.lose(k, &why);
        }
    }

    fn on_lines(&mut self, key: usize) {
        let Some(l) = self.lines.get_mut(&key) else { return };
        let mut buf = [0u8; 8192];
        let mut eof = false;
        loop {
            match sys::read(l.fd.as_fd(), &mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => l.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        while let Some(pos) = l.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = l.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            (l.sink)(&self.h, Some(text.trim_end_matches('\r')));
        }
        if l.partial.len() > MAX_LINE || (eof && !l.partial.is_empty()) {
            let text = String::from_utf8_lossy(&l.partial).into_owned();
            l.partial.clear();
            (l.sink)(&self.h, Some(&text));
        }
        if eof {
            let l = self.lines.remove(&key).expect("present");
            let _ = self.h.shared.poller.delete(&l.fd);
            let mut sink = l.sink;
            sink(&self.h, None);
        }
    }

    /// The stream in slot `k` is gone: stop polling it, close it, tell the router.
    fn lose(&mut self, k: usize, why: &str) {
        let Some(r) = self.readers.remove(&k) else { return };
        log::debug!("{}: stream {} to {} lost: {why}", self.h.shared.cfg.name, r.stream, r.name);
        let _ = self.h.shared.poller.delete(&r.rx.fd);
        let _ = self.h.shared.poller.delete(r.tx.fd());
        let unsent = r.tx.close();
        if unsent > 0 {
            log::debug!("{}: {unsent} unsent bytes to {} dropped", self.h.shared.cfg.name, r.name);
        }
        let resolved: Vec<Resolved> = {
            let mut core = self.h.shared.core.lock().unwrap();
            core.streams.remove(&r.stream);
            core.readers.remove(&r.stream);
            let mut actions = Vec::new();
            core.router.stream_lost(r.stream, &mut actions);
            resolve(&core, actions)
        };
        self.h.execute(resolved, false);
        for p in self.reaping.iter_mut().filter(|p| p.stream == r.stream) {
            p.since = Instant::now();
        }
        if r.is_parent {
            log::debug!("{}: parent stream lost ({why}); shutting down", self.h.shared.cfg.name);
            self.h.begin_shutdown();
            self.run_commands();
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut t: Option<Instant> = self.timers.peek().map(|Reverse((at, _))| *at);
        let mut consider = |at: Instant| t = Some(t.map_or(at, |t| t.min(at)));
        if let Some(d) = self.shutdown_deadline {
            consider(d);
        }
        for at in self.drivers.values().filter_map(|dr| dr.deadline) {
            consider(at);
        }
        for p in &self.reaping {
            if p.since <= now {
                // Poll exiting children often at first, then back off.
                let age = now - p.since;
                consider(now + (age / 4).clamp(Duration::from_millis(1), Duration::from_millis(100)));
            }
        }
        t.map(|at| at.saturating_duration_since(now))
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(f) = self.timer_fns.remove(&id) {
                f(&self.h);
            }
        }
    }

    /// Collects exited children; escalates to SIGTERM then SIGKILL for slow ones.
    fn reap(&mut self, force: bool) {
        let now = Instant::now();
        let name = self.h.shared.cfg.name.clone();
        self.reaping.retain_mut(|p| {
            if p.since > now && !force {
                return true;
            }
            match p.child.try_wait() {
                Ok(Some(status)) => {
                    log::debug!("{name}: reaped {} (pid {}): {status}", p.name, p.child.id());
                    false
                }
                Ok(None) => {
                    let age = now.saturating_duration_since(p.since);
                    if (age >= KILL_AFTER || force) && p.signalled < 2 {
                        sys::kill(p.child.id(), libc::SIGKILL);
                        p.signalled = 2;
                    } else if age >= TERM_AFTER && p.signalled < 1 {
                        sys::kill(p.child.id(), libc::SIGTERM);
                        p.signalled = 1;
                    }
                    true
                }
                Err(_) => false,
            }
        });
    }

    fn start_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let grace = self.h.shared.cfg.shutdown_grace;
        self.shutdown_deadline = Some(Instant::now() + grace);
        let children: Vec<u32> = {
            let core = self.h.shared.core.lock().unwrap();
            core.router.child_streams().iter().filter_map(|s| core.router.stream_remote(*s)).collect()
        };
        for c in children {
            self.h.send_internal(Message::new(c, ids::SHUTDOWN, Kind::Value, Vec::new()));
        }
    }

    fn shutdown_finished(&self) -> bool {
        let Some(deadline) = self.shutdown_deadline else { return false };
        let children = self.readers.values().filter(|r| !r.is_parent).count();
        children == 0 || Instant::now() >= deadline
    }

    /// Final steps: cut off remaining children, flush the parent stream, wake every waiter,
    /// reap every child process, then run the exit hook.
    fn finish(mut self) {
        let keys: Vec<usize> = self.readers.iter().filter(|(_, r)| !r.is_parent).map(|(k, _)| *k).collect();
        for k in keys {
            self.lose(k, "broker shutdown");
        }
        // Give queued output (replies, logs) to the parent a bounded chance to leave.
        let parent = self.readers.iter().find(|(_, r)| r.is_parent).map(|(k, _)| *k);
        if let Some(k) = parent {
            let deadline = Instant::now() + Duration::from_secs(1);
            let tx = self.readers[&k].tx.clone();
            while !tx.is_drained() && Instant::now() < deadline {
                if tx.flush(&self.h.shared.poller).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            self.lose(k, "broker shutdown");
        }
        let resolved = {
            let mut core = self.h.shared.core.lock().unwrap();
            let mut actions = Vec::new();
            core.router.shutdown(&mut actions);
            resolve(&core, actions)
        };
        self.h.set_exited();
        self.h.execute(resolved, false);
        // Reap children: they saw end of file on their stream and exit by themselves.
        let deadline = Instant::now() + KILL_AFTER;
        for p in &mut self.reaping {
            p.since = p.since.min(Instant::now());
        }
        while !self.reaping.is_empty() && Instant::now() < deadline {
            self.reap(false);
            std::thread::sleep(Duration::from_millis(1));
        }
        self.reap(true);
        for p in &mut self.reaping {
            let _ = p.child.wait();
        }
        for (_, l) in self.lines.drain() {
            let _ = self.h.shared.poller.delete(&l.fd);
        }
        let drivers: Vec<usize> = self.drivers.keys().copied().collect();
        for d in drivers {
            self.end_driver(d);
        }
        // Drop timers without running them.
        self.timer_fns.clear();
        let hook = self.h.shared.on_exit.lock().unwrap().take();
        log::debug!("{}: broker exited", self.name());
        if let Some(f) = hook {
            f();
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}
