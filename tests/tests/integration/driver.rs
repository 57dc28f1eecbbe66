//! The broker's `Driver` hook (what the libssh2 backend runs on): polled on readiness and
//! at its deadline, on the broker thread, and dropped (descriptors unpolled) when done.

use mitogen_core::broker::{Driver, Interest, Wants};
use mitogen_core::{Broker, BrokerConfig};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Copies `from` to `to` in upper case; counts polls made only because the deadline passed.
struct Upper {
    from: UnixStream,
    to: UnixStream,
    pending: Vec<u8>,
    tick: Instant,
    ticks: Arc<AtomicUsize>,
    thread: Arc<std::sync::Mutex<Option<String>>>,
}

impl Driver for Upper {
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.from.as_fd(), self.to.as_fd()]
    }

    fn poll(&mut self, now: Instant) -> Option<Wants> {
        *self.thread.lock().unwrap() = std::thread::current().name().map(str::to_string);
        if now >= self.tick {
            self.ticks.fetch_add(1, Ordering::SeqCst);
            self.tick = now + Duration::from_millis(20);
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.from.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.pending.extend(buf[..n].iter().map(u8::to_ascii_uppercase)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return None,
            }
        }
        match self.to.write(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
        Some(Wants {
            interest: vec![
                Interest { readable: true, writable: false },
                Interest { readable: false, writable: !self.pending.is_empty() },
            ],
            deadline: Some(self.tick),
        })
    }
}

#[test]
fn a_driver_runs_on_the_broker_thread_until_it_is_done() {
    let broker = Broker::start(BrokerConfig::master()).unwrap();
    let (mut input, from) = UnixStream::pair().unwrap();
    let (to, mut output) = UnixStream::pair().unwrap();
    from.set_nonblocking(true).unwrap();
    to.set_nonblocking(true).unwrap();
    let ticks = Arc::new(AtomicUsize::new(0));
    let thread = Arc::new(std::sync::Mutex::new(None));
    let d = Upper {
        from,
        to,
        pending: Vec::new(),
        tick: Instant::now(),
        ticks: ticks.clone(),
        thread: thread.clone(),
    };
    broker.handle().add_driver(Box::new(d)).unwrap();
    // Readiness: bytes move through the driver.
    let data: Vec<u8> = (0..300_000u32).map(|i| b"abcxyz"[(i % 6) as usize]).collect();
    let writer = std::thread::spawn(move || {
        input.write_all(&data).unwrap();
        input
    });
    let mut got = vec![0u8; 300_000];
    output.read_exact(&mut got).unwrap();
    assert!(got.iter().enumerate().all(|(i, b)| *b == b"ABCXYZ"[i % 6]));
    let input = writer.join().unwrap();
    assert_eq!(thread.lock().unwrap().as_deref(), Some("mitogen-broker"));
    // Deadlines: polled again with nothing ready.
    let before = ticks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    assert!(ticks.load(Ordering::SeqCst) >= before + 3, "deadline polls: {before} -> {ticks:?}");
    // End of input: the driver finishes and is dropped, closing its output.
    drop(input);
    output.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(output.read(&mut [0u8; 16]).unwrap(), 0, "the driver was not dropped");
    let after = ticks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ticks.load(Ordering::SeqCst), after, "a finished driver is still polled");
}
