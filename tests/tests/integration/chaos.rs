//! A bounded chaos run (the long one is `cargo xtask chaos`): see `mitogen_tests::chaos`.

use crate::agent;

#[test]
fn bounded_chaos_run_ends_every_wait_and_leaves_nothing() {
    let report = mitogen_tests::chaos::run(agent(), 7, 15).unwrap_or_else(|f| panic!("{}", f.0));
    // The faults happened and the calls ran: a run that did nothing proves nothing.
    assert!(report.kills > 0 && report.stops > 0 && report.garbage > 0, "{report:?}");
    assert!(report.ok > 100 && report.connects > 30, "{report:?}");
}
