//! [`Driver`]: work the broker thread does for a transport besides moving stream bytes.
//!
//! An in-process protocol client (the libssh2 backend) cannot be a plain stream: its
//! socket carries a session whose state only the client library understands. It runs as
//! a driver instead: the broker polls the descriptors it names, calls [`Driver::poll`]
//! when one is ready or its deadline passes, and the driver pumps bytes between its
//! protocol and the local end of a socketpair whose other end is an ordinary stream.
//! Everything a driver owns is touched on the broker thread only.

use std::os::fd::BorrowedFd;
use std::time::Instant;

/// What a driver waits for on one of its descriptors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    /// Wake when the descriptor is readable.
    pub readable: bool,
    /// Wake when the descriptor is writable.
    pub writable: bool,
}

/// What a driver waits for next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wants {
    /// One entry per descriptor of [`Driver::fds`], in the same order.
    pub interest: Vec<Interest>,
    /// Poll again at this time even if nothing is ready (keepalives, timeouts).
    pub deadline: Option<Instant>,
}

/// Something the broker thread drives. See the module documentation.
pub trait Driver: Send {
    /// The descriptors to poll, fixed for the driver's life. They must stay open until
    /// [`Driver::poll`] returns `None` or the driver is dropped (the broker stops polling
    /// them first).
    fn fds(&self) -> Vec<BorrowedFd<'_>>;

    /// Makes progress without blocking; returns what to wait for next, or `None` when
    /// the driver is finished (it is then dropped). Called once when added, then whenever
    /// a descriptor is ready or the deadline has passed.
    fn poll(&mut self, now: Instant) -> Option<Wants>;
}
