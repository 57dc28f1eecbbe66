//! The read side of a stream, and waiting by borrowing it.
//!
//! Normally the broker thread reads every stream. A user thread about to block for a
//! message from some context instead *borrows* the read side of the stream leading there:
//! it disables the broker's interest in that fd, polls the socket itself (plus a per-thread
//! eventfd, so deliveries by other threads and shutdown still wake it), routes whatever it
//! reads, and hands the stream back when its message has arrived. A call round trip then
//! costs one wake-up per process, like a raw ping-pong, instead of two.
//!
//! A borrower hands the stream back as soon as a large frame is in flight: bulk data is
//! read by the broker thread, which overlaps it with the work of the waiting thread.
//!
//! Reading, routing and handing the results to streams and queues all happen under the
//! stream's read lock, so messages from one stream keep their order whichever thread reads.

use super::sys;
use super::{resolve, BrokerHandle};
use crate::channel::Queue;
use crate::codec::Decoder;
use crate::ids::ContextId;
use crate::message::Message;
use crate::router::StreamId;
use polling::{Event, PollMode};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Reads per readiness event before other streams get a turn.
const READ_BUDGET: usize = 16;

pub(crate) struct RxState {
    decoder: Decoder,
    /// A user thread is reading this stream; the broker's interest is disabled.
    borrowed: bool,
    /// When a byte last arrived (or the stream was made): what heartbeats look at.
    last_rx: Instant,
}

/// Read side of one stream.
pub(crate) struct StreamRx {
    pub(crate) stream: StreamId,
    pub(crate) key: usize,
    pub(crate) fd: OwnedFd,
    pub(crate) name: String,
    state: Mutex<RxState>,
}

impl StreamRx {
    pub(crate) fn new(stream: StreamId, key: usize, fd: OwnedFd, name: String, max: u32) -> StreamRx {
        StreamRx {
            stream,
            key,
            fd,
            name,
            state: Mutex::new(RxState {
                decoder: Decoder::new(max),
                borrowed: false,
                last_rx: Instant::now(),
            }),
        }
    }

    /// Starts polling this stream (level-triggered: no re-arming after each read), with no
    /// interest while a thread has borrowed it.
    pub(crate) fn register(&self, poller: &polling::Poller) -> io::Result<()> {
        let st = self.state.lock().unwrap();
        let ev = if st.borrowed { Event::none(self.key) } else { Event::readable(self.key) };
        // SAFETY: deleted in the broker's `lose` before the fd is dropped.
        unsafe { poller.add_with_mode(&self.fd, ev, PollMode::Level) }
    }

    /// How long nothing has arrived on this stream.
    pub(crate) fn silent_for(&self) -> std::time::Duration {
        self.state.lock().unwrap().last_rx.elapsed()
    }

    /// True while a large frame is being read (bulk data in flight).
    fn in_large_body(&self) -> bool {
        self.state.lock().unwrap().decoder.in_large_body()
    }

    /// Reads what is available, routes it and executes the results, all under the read
    /// lock. Returns why the stream is lost, if it is.
    pub(crate) fn read_and_route(&self, h: &BrokerHandle) -> Option<String> {
        let mut st = self.state.lock().unwrap();
        let mut msgs = Vec::new();
        let mut lost = None;
        let mut got = false;
        // A frame whose body is still to come: its sender is checked once routing the
        // frames before it has updated the routes (an ADD_ROUTE may have announced it).
        let mut started = None;
        for _ in 0..READ_BUDGET {
            let buf = st.decoder.read_buf();
            let want = buf.len();
            match sys::read(self.fd.as_fd(), buf) {
                Ok(0) => {
                    lost = Some(
                        if st.decoder.is_idle() { "end of file" } else { "end of file inside a frame" }
                            .into(),
                    );
                    break;
                }
                Ok(n) => {
                    st.decoder.commit(n);
                    got = true;
                    while let Some(m) = st.decoder.next_message() {
                        match m {
                            Ok(m) => msgs.push(m),
                            Err(e) => {
                                log::error!(
                                    "{}: stream to {}: {e}; dropping it",
                                    h.shared.cfg.name,
                                    self.name
                                );
                                lost = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    // Once per frame; a later one replaces a frame that completed since.
                    started = st.decoder.take_started().or(started);
                    if lost.is_some() || n < want {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    lost = Some(format!("read failed: {e}"));
                    break;
                }
            }
        }
        if got {
            // Once per wake-up, not per read: heartbeats only need to know it was recent.
            st.last_rx = Instant::now();
        }
        if !msgs.is_empty() || started.is_some() {
            if h.debug() {
                for m in msgs.iter().filter(|m| m.handle != crate::ids::FORWARD_LOG) {
                    log::debug!("{}: received {m:?} from {}", h.shared.cfg.name, self.name);
                }
            }
            let resolved = {
                let mut core = h.shared.core.lock().unwrap();
                let mut actions = Vec::new();
                for m in msgs {
                    core.router.receive(self.stream, m, &mut actions);
                }
                if let Some((src, auth)) = started {
                    if lost.is_none() && !core.router.is_genuine(self.stream, src, auth) {
                        // Random bytes that happen to look like a header: waiting for its
                        // body would swallow the stream's real frames, and keep it alive.
                        let why = format!(
                            "a frame from context {src} (authority {auth}), which does not live \
                             behind this stream: the stream is corrupt"
                        );
                        log::error!("{}: stream to {}: {why}; dropping it", h.shared.cfg.name, self.name);
                        lost = Some(why);
                    }
                }
                resolve(&core, actions)
            };
            // Still under the read lock: order is kept across readers. Forwarded traffic
            // never blocks on backpressure.
            h.execute(resolved, false);
        }
        drop(st);
        lost
    }
}

thread_local! {
    static WAKER: Option<Arc<OwnedFd>> = {
        // SAFETY: eventfd with valid flags; the result is a fresh descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        (fd >= 0).then(|| Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
    };
}

/// Wakes a thread blocked in [`wait`] on a queue.
pub(crate) fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64 to an eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Waits for the next message on `q` until `deadline`. If `from` is given and the stream
/// towards that context is free, borrows it and reads it on this thread.
pub(crate) fn wait(
    h: &BrokerHandle,
    q: &Queue,
    deadline: Option<Instant>,
    from: Option<ContextId>,
) -> Option<Message> {
    if let Some(m) = q.try_pop() {
        return Some(m);
    }
    let rx = match from {
        Some(id) if !h.on_broker_thread() && !h.is_shutting_down() => h.stream_rx_towards(id),
        _ => None,
    };
    let Some(rx) = rx else { return q.pop(deadline) };
    let Some(waker) = WAKER.with(|w| w.clone()) else { return q.pop(deadline) };
    {
        let mut st = rx.state.lock().unwrap();
        if st.borrowed {
            drop(st);
            return q.pop(deadline);
        }
        st.borrowed = true;
    }
    let poller = &h.shared.poller;
    let _ = poller.modify_with_mode(&rx.fd, Event::none(rx.key), PollMode::Level);
    q.set_waker(Some(waker.clone()));
    let mut got = None;
    loop {
        if let Some(m) = q.try_pop() {
            got = Some(m);
            break;
        }
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    break;
                }
                // Round up so a short wait does not spin.
                ((d - now).as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
            }
        };
        let mut fds = [
            libc::pollfd { fd: rx.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: waker.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[1].revents != 0 {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a valid u64 from our eventfd.
            unsafe { libc::read(waker.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        if fds[0].revents != 0 {
            if let Some(why) = rx.read_and_route(h) {
                // Lost. The broker may never read this stream again (a corrupt frame
                // followed by silence leaves nothing to wake it), so it is told: it closes
                // the stream, which wakes every waiter and deletes the routes behind it.
                h.command(super::Command::CloseStream(rx.stream, why));
                break;
            }
        }
        if rx.in_large_body() {
            // Bulk data: the broker thread reads it while this thread waits (or works);
            // borrowing pays off for small, latency-bound messages only.
            break;
        }
    }
    q.set_waker(None);
    rx.state.lock().unwrap().borrowed = false;
    // Hand the stream back; level-triggered, so anything pending wakes the broker.
    let _ = poller.modify_with_mode(&rx.fd, Event::readable(rx.key), PollMode::Level);
    // Lost stream or early wake-up: the broker reports the loss to the queue.
    got.or_else(|| q.pop(deadline))
}
