use crate::local;
use mitogen::Router;
use mitogen_tests::*;
use std::time::Duration;

#[test]
fn create_shutdown_cycles_leak_nothing() {
    let r = Router::new().unwrap();
    // Warm up lazily created state (build id cache, this thread's waker).
    for _ in 0..3 {
        let c = local(&r);
        c.call(add, (0, 0)).unwrap();
        c.shutdown(Duration::from_secs(10)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = hygiene();
    let handles_before = r.broker().handle_count();
    for i in 0..200 {
        let c = local(&r);
        assert_eq!(c.call(add, (i, 1)).unwrap(), i + 1);
        c.shutdown(Duration::from_secs(10)).unwrap();
    }
    // Reaping is asynchronous: give the broker a moment.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = hygiene();
    while after != before && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
        after = hygiene();
    }
    assert_eq!(after, before, "fds/threads/zombies grew over 200 cycles: {before:?} -> {after:?}");
    assert_eq!(r.broker().handle_count(), handles_before, "handles leaked");
    assert_eq!(r.broker().stream_count(), 0);
}

#[test]
fn dropping_the_router_shuts_children_down() {
    let pid;
    {
        let r = Router::new().unwrap();
        let c = local(&r);
        pid = c.call(mitogen::builtins::getpid, ()).unwrap();
    }
    assert!(wait_gone(pid, Duration::from_secs(10)));
    assert!(proc_stat(pid).is_none(), "not reaped");
}

#[test]
fn run_with_router_shuts_down_afterwards() {
    let pid = mitogen::run_with_router(|r| local(r).call(mitogen::builtins::getpid, ()).unwrap()).unwrap();
    assert!(wait_gone(pid, Duration::from_secs(10)));
}
