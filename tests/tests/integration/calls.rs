use crate::local;
use mitogen::{Bytes, CallError, RemoteErrorKind, Router, Select};
use mitogen_tests::*;
use std::time::Duration;

#[test]
fn typed_call_returns_result() {
    let r = Router::new().unwrap();
    let c = local(&r);
    assert_eq!(c.call(add, (40, 2)).unwrap(), 42);
    assert_eq!(c.call(echo, (Bytes(b"hi".to_vec()),)).unwrap().0, b"hi");
    let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
    assert_ne!(pid, std::process::id());
}

#[test]
fn remote_error_carries_type_message_and_backtrace() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let err = c.call(fail_io, ("/nonexistent/mitogen-test".into(),)).unwrap_err();
    let e = err.remote().expect("a remote error");
    assert_eq!(e.kind, RemoteErrorKind::Failed);
    assert!(e.type_name.contains("io::error::Error"), "{}", e.type_name);
    assert!(e.message.contains("No such file"), "{}", e.message);
    assert!(!e.backtrace.is_empty());
    assert_eq!(e.context, c.name());
    // The context is still usable.
    assert_eq!(c.call(add, (1, 1)).unwrap(), 2);
}

#[test]
fn panic_becomes_call_error_and_agent_survives() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let err = c.call(panic_now, ("kaboom".into(),)).unwrap_err();
    let e = err.remote().expect("a remote error");
    assert_eq!(e.kind, RemoteErrorKind::Panicked);
    assert_eq!(e.message, "kaboom");
    assert!(e.backtrace.contains("kaboom"), "{}", e.backtrace);
    assert_eq!(c.call(add, (2, 2)).unwrap(), 4);
}

#[test]
fn unknown_function_is_a_call_error() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let err = c.call(not_registered, ()).unwrap_err();
    assert_eq!(err.remote().unwrap().kind, RemoteErrorKind::UnknownFunction);
    assert!(err.to_string().contains("not_registered"));
    assert_eq!(c.call(add, (3, 3)).unwrap(), 6);
}

#[test]
fn stock_agent_runs_builtins() {
    let r = Router::new().unwrap();
    let stock = env!("CARGO_BIN_EXE_mitogen-test-agent").replace("mitogen-test-agent", "mitogen-agent");
    assert!(
        std::path::Path::new(&stock).exists(),
        "{stock} is missing: build it with `cargo build --workspace --bins` (cargo xtask test does)"
    );
    let c = r.local(mitogen::Local::new().program(&stock)).unwrap();
    let out = c
        .call(mitogen::builtins::run_command, (vec!["sh".into(), "-c".into(), "echo hi; exit 3".into()],))
        .unwrap();
    assert_eq!(out.code, Some(3));
    assert_eq!(out.stdout.0, b"hi\n");
    // The stock agent does not know the test functions.
    let err = c.call(add, (1, 2)).unwrap_err();
    assert_eq!(err.remote().unwrap().kind, RemoteErrorKind::UnknownFunction);
}

#[test]
fn call_async_select_gathers_results_as_they_arrive() {
    let r = Router::new().unwrap();
    let ctxs: Vec<_> = (0..4).map(|_| local(&r)).collect();
    let mut sel = Select::new();
    // The first context answers last.
    let slow = ctxs[0].call_async(sleep_ms, (300,)).unwrap();
    let k_slow = sel.add(slow);
    let mut fast = Vec::new();
    for c in &ctxs[1..] {
        fast.push(sel.add(c.call_async(sleep_ms, (0,)).unwrap()));
    }
    let mut order = Vec::new();
    while let Some((k, res)) = sel.get(Some(Duration::from_secs(30))) {
        res.unwrap();
        order.push(k);
    }
    assert_eq!(order.len(), 4);
    assert_eq!(*order.last().unwrap(), k_slow);
    for k in fast {
        assert!(order.contains(&k));
    }
}

#[test]
fn call_no_reply_runs_the_function() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let dir = std::env::temp_dir().join(format!("mitogen-noreply-{}", std::process::id()));
    let path = dir.to_str().unwrap().to_string();
    c.call_no_reply(mitogen::builtins::write_file, (path.clone(), Bytes(b"x".to_vec()))).unwrap();
    // Calls run in order, so this read sees the write.
    let got = c.call(mitogen::builtins::read_file, (path.clone(),)).unwrap();
    assert_eq!(got.0, b"x");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn call_timeout_expires_without_killing_the_context() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let err = c.call_timeout(sleep_ms, (500,), Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)), "{err:?}");
    assert_eq!(c.call(add, (5, 5)).unwrap(), 10);
}
