use crate::local;
use mitogen::Router;
use mitogen_tests::*;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static RECORDS: Mutex<Vec<(log::Level, String, String)>> = Mutex::new(Vec::new());

struct Capture;
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        RECORDS.lock().unwrap().push((r.level(), r.target().to_string(), r.args().to_string()));
    }
    fn flush(&self) {}
}

fn wait_for(pred: impl Fn(&(log::Level, String, String)) -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if RECORDS.lock().unwrap().iter().any(&pred) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn child_logs_and_stdio_arrive_named_after_the_context() {
    let _ = log::set_logger(&Capture);
    log::set_max_level(log::LevelFilter::Info);
    let r = Router::new().unwrap();
    let c = local(&r);
    c.call(chatter, ("t1".into(),)).unwrap();
    let ctx_target = format!("mitogen::ctx::{}", c.name());
    assert!(wait_for(|(l, t, m)| *l == log::Level::Warn && *t == ctx_target && m.ends_with("log record t1")));
    assert!(wait_for(|(_, t, m)| *t == format!("{ctx_target}::stdout") && m == "stdout line t1"));
    assert!(wait_for(|(_, t, m)| *t == format!("{ctx_target}::stderr") && m == "stderr line t1"));
    assert!(wait_for(|(_, t, m)| *t == format!("{ctx_target}::stdout") && m == "subprocess line t1"));
}

#[test]
fn child_filters_records_below_the_master_level() {
    let _ = log::set_logger(&Capture);
    log::set_max_level(log::LevelFilter::Error);
    let r = Router::new().unwrap();
    let c = local(&r);
    c.call(chatter, ("t2".into(),)).unwrap();
    let ctx_target = format!("mitogen::ctx::{}", c.name());
    // The error record is logged after the warn record: once it is here, the warn record
    // would be too, had the child not filtered it (records keep their order).
    assert!(wait_for(|(l, t, m)| *l == log::Level::Error
        && *t == ctx_target
        && m.ends_with("error record t2")));
    let recs = RECORDS.lock().unwrap();
    assert!(!recs.iter().any(|(_, _, m)| m.ends_with("log record t2")), "warn record was forwarded");
    assert!(
        !recs.iter().any(|(_, t, _)| t.ends_with("::stdout") && t.contains(c.name())),
        "stdout is info level"
    );
}

#[test]
fn enable_debug_makes_children_log_their_routing() {
    let _ = log::set_logger(&Capture);
    log::set_max_level(log::LevelFilter::Debug);
    let r = Router::new().unwrap();
    r.enable_debug();
    let c = local(&r);
    c.call(add, (1, 2)).unwrap();
    let ctx_target = format!("mitogen::ctx::{}", c.name());
    assert!(wait_for(|(l, t, m)| *l == log::Level::Debug && *t == ctx_target && m.contains("Message(")));
    // Forwarding a debug record must not itself produce records: the stream goes quiet.
    let count = || RECORDS.lock().unwrap().iter().filter(|(_, t, _)| *t == ctx_target).count();
    let end = Instant::now() + Duration::from_secs(10);
    let mut last = count();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = count();
        if now == last {
            break;
        }
        assert!(Instant::now() < end, "debug records from {} never stop: {now}", c.name());
        last = now;
    }
}

/// A record or output line longer than the message limit allows arrives cut, never
/// dropped.
#[test]
fn records_longer_than_the_message_limit_arrive_cut() {
    let _ = log::set_logger(&Capture);
    log::set_max_level(log::LevelFilter::Info);
    let max = 1 << 16;
    let r = Router::with_options(mitogen::RouterOptions::default().max_message_size(max)).unwrap();
    let c = local(&r);
    c.call(log_long, (200_000,)).unwrap();
    let ctx_target = format!("mitogen::ctx::{}", c.name());
    let cut = |m: &String| m.ends_with("[cut to fit max_message_size]") && m.len() < max as usize;
    assert!(wait_for(|(l, t, m)| *l == log::Level::Warn && *t == ctx_target && m.contains("xxxx") && cut(m)));
    // The output line: the line reader cuts it into 64 KiB pieces first, each cut again.
    assert!(wait_for(|(_, t, m)| *t == format!("{ctx_target}::stdout") && m.starts_with("xxxx") && cut(m)));
    assert_eq!(c.call(add, (1, 2)).unwrap(), 3);
}
