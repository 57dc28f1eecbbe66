//! The write half of a stream, shared by every thread that sends.
//!
//! A sender first tries to write at once from its own thread (no thread hop); only what the
//! kernel did not take is queued, and write interest is registered for the broker thread.

use super::sys;
use crate::message::{Message, HEADER_LEN};
use crate::router::StreamId;
use polling::{Event, Poller};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Queued bytes above which a sending user thread waits for the queue to drain.
pub const HIGH_WATER: usize = 32 * 1024 * 1024;
/// Queued bytes below which waiting senders resume.
pub const LOW_WATER: usize = 8 * 1024 * 1024;

struct Pending {
    header: [u8; HEADER_LEN],
    data: Vec<u8>,
    /// Bytes of header+data already written.
    off: usize,
}

impl Pending {
    fn remaining(&self) -> usize {
        HEADER_LEN + self.data.len() - self.off
    }
    fn slices(&self) -> [&[u8]; 2] {
        if self.off < HEADER_LEN {
            [&self.header[self.off..], &self.data[..]]
        } else {
            [&[], &self.data[self.off - HEADER_LEN..]]
        }
    }
}

#[derive(Default)]
struct TxState {
    queue: VecDeque<Pending>,
    queued: usize,
    want_write: bool,
    closed: bool,
}

/// Write side of one stream.
pub(crate) struct StreamTx {
    pub(crate) id: StreamId,
    pub(crate) key: usize,
    fd: OwnedFd,
    state: Mutex<TxState>,
    drained: Condvar,
}

/// Result of a send attempt.
pub(crate) enum Sent {
    Done,
    /// The stream is closed; the message was not sent.
    Closed(Message),
}

impl StreamTx {
    pub(crate) fn new(id: StreamId, key: usize, fd: OwnedFd) -> StreamTx {
        StreamTx { id, key, fd, state: Mutex::new(TxState::default()), drained: Condvar::new() }
    }

    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Writes `msg`, directly if nothing is queued; queues the rest. When `may_block` (a
    /// user thread) and the queue is over [`HIGH_WATER`], waits for it to drain.
    pub(crate) fn send(&self, poller: &Poller, msg: Message, may_block: bool) -> Sent {
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return Sent::Closed(msg);
        }
        let mut p = Pending { header: msg.header(), data: msg.data, off: 0 };
        if st.queue.is_empty() {
            match sys::writev(self.fd.as_fd(), &p.slices()) {
                Ok(n) if n == p.remaining() => return Sent::Done,
                Ok(n) => p.off = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Leave the error for the broker's flush, which closes the stream.
                Err(_) => {}
            }
        }
        st.queued += p.remaining();
        st.queue.push_back(p);
        if !st.want_write {
            st.want_write = true;
            let _ = poller.modify(self.fd.as_fd(), Event::writable(self.key));
        }
        if may_block {
            while st.queued > HIGH_WATER && !st.closed {
                st = self.drained.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
            }
        }
        Sent::Done
    }

    /// Called by the broker thread when writable: writes as much as the kernel takes.
    /// Returns an error if the stream is broken.
    pub(crate) fn flush(&self, poller: &Poller) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        loop {
            if st.queue.is_empty() {
                st.want_write = false;
                self.drained.notify_all();
                return Ok(());
            }
            let mut bufs: Vec<&[u8]> = Vec::with_capacity(64);
            for p in st.queue.iter().take(32) {
                for s in p.slices() {
                    if !s.is_empty() {
                        bufs.push(s);
                    }
                }
            }
            match sys::writev(self.fd.as_fd(), &bufs) {
                Ok(mut n) => {
                    st.queued -= n;
                    while n > 0 {
                        let front = st.queue.front_mut().expect("bytes were written from it");
                        let r = front.remaining();
                        if n >= r {
                            n -= r;
                            st.queue.pop_front();
                        } else {
                            front.off += n;
                            n = 0;
                        }
                    }
                    if st.queued < LOW_WATER {
                        self.drained.notify_all();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poller.modify(self.fd.as_fd(), Event::writable(self.key))?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// True if nothing is waiting to be written.
    pub(crate) fn is_drained(&self) -> bool {
        self.state.lock().unwrap().queue.is_empty()
    }

    /// Marks the stream closed: later sends fail, blocked senders wake. Returns how many
    /// bytes were still queued (lost).
    pub(crate) fn close(&self) -> usize {
        let mut st = self.state.lock().unwrap();
        st.closed = true;
        let lost = st.queued;
        st.queue.clear();
        st.queued = 0;
        self.drained.notify_all();
        lost
    }
}
