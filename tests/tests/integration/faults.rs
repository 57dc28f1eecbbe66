use crate::{agent, local, local_via};
use mitogen::{Bytes, CallError, ConnectError, DeadReason, Local, Router, RouterOptions};
use mitogen_tests::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

fn script(name: &str, body: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("mitogen-test-{name}-{}", std::process::id()));
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn killed_child_fails_pending_call_and_later_calls_say_no_route() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
    let mut pending = c.call_async(hang, ()).unwrap();
    // SAFETY: killing the child we just started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let err = pending.get(Some(Duration::from_secs(20))).unwrap_err();
    assert_eq!(err.dead_reason(), Some(DeadReason::Disconnected), "{err:?}");
    let err = c.call(add, (1, 2)).unwrap_err();
    assert_eq!(err.dead_reason(), Some(DeadReason::NoRoute), "{err:?}");
    // The broker reaped it: no zombie is left.
    let end = Instant::now() + Duration::from_secs(10);
    while proc_stat(pid).is_some() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(proc_stat(pid).is_none(), "child {pid} not reaped: {:?}", proc_stat(pid));
}

#[test]
fn heartbeat_drops_a_stopped_child_and_spares_a_quiet_healthy_one() {
    let r = Router::new().unwrap();
    let beat = |via: Option<&mitogen::Context>| {
        let l = Local::new().program(agent()).heartbeat(Some(Duration::from_millis(100)), 2);
        r.local(match via {
            Some(v) => l.via(v),
            None => l,
        })
        .unwrap()
    };
    // Idle far longer than the bound: the probes are answered, nothing is dropped.
    let healthy = beat(None);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(healthy.call(add, (1, 2)).unwrap(), 3);
    // Stopped, it closes nothing; the heartbeat notices (the bound is 300 ms) and the
    // pending call fails. The same through an intermediary, which runs the heartbeat.
    for via in [None, Some(&healthy)] {
        let c = beat(via);
        let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
        let mut pending = c.call_async(hang, ()).unwrap();
        let t = Instant::now();
        // SAFETY: stopping the child we just started.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let err = pending.get(Some(Duration::from_secs(20))).unwrap_err();
        assert_eq!(err.dead_reason(), Some(DeadReason::Disconnected), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(3), "noticed after {:?}", t.elapsed());
        assert_eq!(c.call(add, (1, 2)).unwrap_err().dead_reason(), Some(DeadReason::NoRoute));
        // Its parent's broker ends it (SIGTERM waits while stopped; SIGKILL does not).
        let end = Instant::now() + Duration::from_secs(10);
        while proc_stat(pid).is_some() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(proc_stat(pid).is_none(), "child {pid} still there: {:?}", proc_stat(pid));
    }
    assert_eq!(healthy.call(add, (2, 2)).unwrap(), 4, "the intermediary survives");
}

#[test]
fn sigkill_master_takes_children_and_grandchildren_down() {
    let mut master =
        std::process::Command::new(agent()).arg("tree").stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(master.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let pids: Vec<u32> = line.split_whitespace().skip(1).map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 2, "{line:?}");
    master.kill().unwrap();
    master.wait().unwrap();
    let killed = Instant::now();
    for pid in &pids {
        assert!(wait_gone(*pid, Duration::from_secs(1)), "pid {pid} still running 1 s after the master died");
    }
    eprintln!("children gone {:?} after SIGKILL", killed.elapsed());
}

#[test]
fn missing_program_is_a_start_error() {
    let r = Router::new().unwrap();
    let err = r.local(Local::new().program("/nonexistent/agent")).unwrap_err();
    match err {
        ConnectError::Start(e) => assert!(e.to_string().contains("No such file"), "{e}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn child_exiting_during_bootstrap_reports_its_last_output() {
    let r = Router::new().unwrap();
    let s = script("exit", "echo 'first line' >&2; echo 'boom: cannot start' >&2; exit 3");
    let err = r.local(Local::new().program(&s)).unwrap_err();
    std::fs::remove_file(&s).unwrap();
    match err {
        ConnectError::ChildExited { status, output } => {
            assert!(status.contains('3'), "{status}");
            assert_eq!(output, vec!["first line".to_string(), "boom: cannot start".to_string()]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn connect_timeout_kills_and_reaps_the_child() {
    let r = Router::new().unwrap();
    let s = script("slow", "echo $$ >&2; exec sleep 60");
    let err = r.local(Local::new().program(&s).connect_timeout(Duration::from_millis(300))).unwrap_err();
    std::fs::remove_file(&s).unwrap();
    match err {
        ConnectError::Timeout { output, .. } => {
            let pid: u32 = output[0].trim().parse().unwrap();
            assert!(proc_stat(pid).is_none(), "half-started child {pid} left behind");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn build_id_mismatch_is_refused() {
    let r = Router::new().unwrap();
    // The master hashes this script, the child hashes the real agent binary.
    let s = script("wrapper", &format!("exec {} \"$@\"", agent()));
    let err = r.local(Local::new().program(&s)).unwrap_err();
    std::fs::remove_file(&s).unwrap();
    assert!(matches!(err, ConnectError::BuildIdMismatch { .. }), "{err:?}");
}

#[test]
fn oversized_message_gets_a_dead_reply_and_limit_is_inherited() {
    let opts = RouterOptions::default().max_message_size(1 << 20);
    let r = Router::with_options(opts).unwrap();
    let c = local(&r);
    let err = c.call(echo, (Bytes(vec![0; 2 << 20]),)).unwrap_err();
    assert!(matches!(err, CallError::TooLarge { max: 1048576, .. }), "{err:?}");
    assert!(err.to_string().contains("max 1048576 bytes"), "{err}");
    // The child inherited the limit: its oversized reply is refused there.
    let g = local_via(&r, &c);
    let rx = mitogen::Receiver::<Bytes>::new(r.broker()).unwrap();
    let res = g.call(produce, (1, 1, 2 << 20, rx.sender()));
    assert!(res.is_err(), "sending 2 MiB from a child with a 1 MiB limit succeeded");
    assert_eq!(c.call(add, (1, 1)).unwrap(), 2);
}

#[test]
fn shutdown_wakes_waiters_and_later_use_fails_at_once() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let mut pending = c.call_async(hang, ()).unwrap();
    let t = std::thread::spawn(move || pending.get(Some(Duration::from_secs(30))));
    std::thread::sleep(Duration::from_millis(50));
    r.shutdown();
    let err = t.join().unwrap().unwrap_err();
    assert!(matches!(err, CallError::Shutdown | CallError::Dead { .. }), "{err:?}");
    let started = Instant::now();
    let err = c.call(add, (1, 2)).unwrap_err();
    assert!(matches!(err, CallError::Shutdown), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(r.local(Local::new().program(agent())), Err(ConnectError::Broker(_))));
}

#[test]
fn hung_function_does_not_stop_context_shutdown() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
    let _pending = c.call_async(hang, ()).unwrap();
    c.shutdown(Duration::from_secs(10)).unwrap();
    assert!(wait_gone(pid, Duration::from_secs(10)));
}

/// A broker stream that receives a corrupt or oversized frame is dropped (with a logged
/// error) before any payload is allocated; the peer sees the stream closed.
#[test]
fn corrupt_and_oversized_frames_drop_the_stream() {
    use mitogen_core::transport::Connection;
    use mitogen_core::{Broker, BrokerConfig, Kind, Message};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let mut good = Message::new(0, 9999, Kind::Raw, b"x".to_vec()).to_frame();
    let mut huge = Message::new(0, 9999, Kind::Raw, Vec::new()).header().to_vec();
    huge[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
    good[0] = b'Z';
    for (what, bytes) in [("bad magic", good), ("oversized length", huge)] {
        let b = Broker::start(BrokerConfig::master()).unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let fd = std::os::fd::OwnedFd::from(ours);
        let conn = Connection {
            read: fd.try_clone().unwrap(),
            write: fd,
            diag: None,
            process: None,
            description: "test".into(),
            bootstrap: mitogen_core::Bootstrap::Direct,
            dialogue: None,
            driver: None,
        };
        b.handle().add_stream(conn, 77, false, "peer").unwrap();
        assert_eq!(b.handle().stream_count(), 1);
        theirs.write_all(&bytes).unwrap();
        theirs.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(theirs.read(&mut buf).unwrap(), 0, "{what}: stream not closed");
        let end = Instant::now() + Duration::from_secs(10);
        while b.handle().stream_count() != 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(b.handle().stream_count(), 0, "{what}");
        assert!(!b.handle().is_reachable(77), "{what}: route survived");
    }
}
