//! No wait may hang: corrupt frames read by a waiting thread (either side), replies that
//! cannot be sent, connects after shutdown. Each over real processes.

use crate::{agent, local};
use mitogen::{Bytes, CallError, ConnectError, DeadReason, Local, RemoteErrorKind, Router, RouterOptions};
use mitogen_core::message::HEADER_LEN;
use mitogen_tests::*;
use std::time::{Duration, Instant};

/// A header with a bad magic (`XX` and zeros), and one announcing more than any limit.
fn bad_frames() -> [(&'static str, Vec<u8>); 2] {
    let mut bad_magic = vec![0u8; HEADER_LEN];
    bad_magic[..2].copy_from_slice(b"XX");
    let mut huge = mitogen_core::Message::new(0, 9999, mitogen_core::Kind::Raw, Vec::new()).header().to_vec();
    huge[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
    [("bad magic", bad_magic), ("oversized length", huge)]
}

/// The bound within which a protocol error must have ended everything (far above the
/// milliseconds it takes; a hang would wait for the 60 s call timeout).
const BOUND: Duration = Duration::from_secs(20);

/// The thread waiting for a reply borrows the stream and reads the corrupt frame itself;
/// nothing follows it. The stream must still be closed at once: the call fails with a
/// disconnect (not a timeout), the route goes, the child exits and is reaped.
#[test]
fn a_corrupt_frame_read_by_a_waiting_caller_fails_the_call_at_once() {
    // A header that looks right (magic, version, kind, a length under the limit) but
    // comes from a context that does not live behind the stream: random bytes after a
    // plausible start. Waiting for its 1 MiB body would swallow every later frame.
    let mut plausible =
        mitogen_core::Message::new(0, 1000, mitogen_core::Kind::Raw, Vec::new()).header().to_vec();
    plausible[8..12].copy_from_slice(&0xDEAD_BEEFu32.to_be_bytes());
    plausible[24..28].copy_from_slice(&(1u32 << 20).to_be_bytes());
    let frames = bad_frames().into_iter().chain([("plausible header from nowhere", plausible)]);
    for (what, frame) in frames {
        let r = Router::new().unwrap();
        let c = local(&r);
        let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
        let started = Instant::now();
        let err = c.call_timeout(write_parent_stream, (frame,), Duration::from_secs(60)).unwrap_err();
        assert_eq!(err.dead_reason(), Some(DeadReason::Disconnected), "{what}: {err:?}");
        assert!(started.elapsed() < BOUND, "{what}: took {:?}", started.elapsed());
        assert!(!r.broker().is_reachable(c.id()), "{what}: the route survived");
        assert_eq!(r.broker().stream_count(), 0, "{what}");
        let err = c.call(add, (1, 2)).unwrap_err();
        assert_eq!(err.dead_reason(), Some(DeadReason::NoRoute), "{what}: {err:?}");
        assert!(wait_gone(pid, BOUND), "{what}: child {pid} still running");
        assert_eq!(zombies_after(BOUND), 0, "{what}: child not reaped");
    }
}

/// The same hole on the agent's side: its main thread borrows the parent stream while it
/// waits for calls. A corrupt frame from the parent, then silence, must end the agent
/// (its parent stream is closed as a protocol error, which shuts it down).
#[test]
fn a_corrupt_frame_from_the_parent_ends_the_agent() {
    for (what, frame) in bad_frames() {
        let r = Router::new().unwrap();
        let c = local(&r);
        let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
        // Idle: the agent's main thread is now reading its parent stream itself.
        std::thread::sleep(Duration::from_millis(50));
        // In this test process (one per test), the only socket is the stream to the child
        // (its read and write sides may be two descriptors).
        let fds = socket_fds();
        let link = |fd: &i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert!(!fds.is_empty() && fds.iter().all(|fd| link(fd) == link(&fds[0])), "{what}: {fds:?}");
        write_raw(fds[0], &frame).unwrap();
        assert!(wait_gone(pid, BOUND), "{what}: the agent kept running after a corrupt frame");
        let end = Instant::now() + BOUND;
        while r.broker().is_reachable(c.id()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!r.broker().is_reachable(c.id()), "{what}: the route survived");
        assert_eq!(zombies_after(BOUND), 0, "{what}: child not reaped");
    }
}

/// A result larger than `max_message_size` cannot be sent back: the caller gets a typed
/// error with both sizes instead of waiting forever, and the context keeps working.
#[test]
fn a_result_too_large_to_send_back_is_a_typed_error() {
    let max = 1 << 20;
    let r = Router::with_options(RouterOptions::default().max_message_size(max)).unwrap();
    let c = local(&r);
    let err = c.call_timeout(zeros, (2 << 20,), Duration::from_secs(60)).unwrap_err();
    let remote = err.remote().unwrap_or_else(|| panic!("not a remote error: {err:?}"));
    match remote.kind {
        RemoteErrorKind::ResultTooLarge { len, max: m } => {
            assert!(len > 2 << 20, "{len}");
            assert_eq!(m, max);
        }
        other => panic!("unexpected kind {other:?}: {err}"),
    }
    assert_eq!(remote.context, c.name());
    assert!(err.to_string().contains(&format!("max_message_size ({max} bytes)")), "{err}");
    // Still working, and a result just under the limit arrives.
    assert_eq!(c.call(add, (1, 2)).unwrap(), 3);
    assert_eq!(c.call(zeros, (1000,)).unwrap(), Bytes(vec![0; 1000]));
    // Arguments over the limit are refused here, before anything is sent.
    let err = c.call(echo, (Bytes(vec![0; 2 << 20]),)).unwrap_err();
    assert!(matches!(err, CallError::TooLarge { len, max: m } if len > 2 << 20 && m == max), "{err:?}");
}

/// Connecting after the router was shut down is refused before anything is started: no
/// child process, so no zombie.
#[test]
fn connect_after_shutdown_starts_nothing() {
    let r = Router::new().unwrap();
    r.shutdown();
    for _ in 0..5 {
        let err = r.local(Local::new().program(agent())).unwrap_err();
        assert!(matches!(err, ConnectError::Broker(mitogen::BrokerError::Shutdown)), "{err:?}");
    }
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", std::process::id()))
        .unwrap_or_default();
    assert_eq!(children.trim(), "", "processes were started");
    assert_eq!(hygiene().zombies, 0);
}

/// Connects racing a shutdown: each either succeeds (and is then shut down with the
/// tree) or fails with a typed error; no process outlives it and no zombie is left.
#[test]
fn connects_racing_a_shutdown_leave_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let r = std::sync::Arc::new(Router::new().unwrap());
    let started = std::sync::Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (r, started) = (r.clone(), started.clone());
            std::thread::spawn(move || {
                let mut pids = Vec::new();
                loop {
                    match r.local(Local::new().program(agent())) {
                        Ok(c) => match c.call(mitogen::builtins::getpid, ()) {
                            Ok(pid) => {
                                pids.push(pid);
                                started.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => assert!(!matches!(e, CallError::Timeout(_)), "{e:?}"),
                        },
                        Err(ConnectError::Broker(_)) => break,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
                pids
            })
        })
        .collect();
    // Shut down while the three threads are in the middle of their connects.
    let until = Instant::now() + BOUND;
    while started.load(Ordering::Relaxed) < 6 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    r.shutdown();
    let pids: Vec<u32> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(pids.len() >= 6, "{} connects before the shutdown", pids.len());
    for pid in pids {
        assert!(wait_gone(pid, BOUND), "child {pid} outlived the shutdown");
    }
    assert_eq!(zombies_after(BOUND), 0);
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", std::process::id()))
        .unwrap_or_default();
    assert_eq!(children.trim(), "", "processes left");
}
