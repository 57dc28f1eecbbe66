use crate::{local, local_via};
use mitogen::{Router, RouterOptions};
use mitogen_tests::*;
use std::time::Duration;

#[test]
fn two_hop_via_chain_names_and_calls() {
    let r = Router::new().unwrap();
    let a = local(&r);
    let b = local_via(&r, &a);
    let c = local_via(&r, &b);
    assert!(b.name().starts_with(&format!("{}.local.", a.name())), "{}", b.name());
    assert!(c.name().starts_with(&format!("{}.local.", b.name())), "{}", c.name());
    assert_eq!(c.call(add, (20, 22)).unwrap(), 42);
    let pids: Vec<u32> =
        [&a, &b, &c].iter().map(|x| x.call(mitogen::builtins::getpid, ()).unwrap()).collect();
    assert_eq!(pids.len(), 3);
    assert!(pids[0] != pids[1] && pids[1] != pids[2]);
    // Shutting down the intermediary takes the subtree down.
    a.shutdown(Duration::from_secs(10)).unwrap();
    for p in pids {
        assert!(wait_gone(p, Duration::from_secs(10)), "pid {p} survived");
    }
    assert!(!c.is_connected());
}

#[test]
fn siblings_talk_through_their_parent() {
    let r = Router::new().unwrap();
    // Children of the master, then grandchildren under one intermediary.
    let a = local(&r);
    let b = local(&r);
    let p = local(&r);
    let p1 = local_via(&r, &p);
    let p2 = local_via(&r, &p);
    for (from, to) in [(&a, &b), (&p1, &p2)] {
        let inbox = to.call(open_inbox, ()).unwrap();
        from.call(send_text, (inbox, format!("hello from {}", from.name()))).unwrap();
        let got = to.call(read_inbox, (10_000,)).unwrap();
        assert_eq!(got, format!("hello from {}", from.name()));
    }
}

#[test]
fn children_have_no_authority_over_parents_or_siblings() {
    let r = Router::new().unwrap();
    let a = local(&r);
    let b = local(&r);
    let g = local_via(&r, &a);
    // Sibling to sibling, child to parent, grandchild to grandparent: all refused.
    for (from, to) in [(&a, b.id()), (&g, a.id()), (&g, 0)] {
        let err = from.call(call_other, (to,)).unwrap().expect("the call must be refused");
        // The master runs no calls at all: its CALL_FUNCTION handle does not exist.
        let ok = err.contains("refused by policy") || (to == 0 && err.contains("invalid handle"));
        assert!(ok, "{} -> {to}: {err}", from.name());
    }
    // A parent may call its child.
    assert_eq!(a.call(call_other, (g.id(),)).unwrap(), None);
}

#[test]
fn unidirectional_mode_refuses_sibling_traffic() {
    let opts = RouterOptions::default().unidirectional(true);
    let r = Router::with_options(opts).unwrap();
    let p = local(&r);
    let p1 = local_via(&r, &p);
    let p2 = local_via(&r, &p);
    let inbox = p2.call(open_inbox, ()).unwrap();
    p1.call(send_text, (inbox, "sneaky".into())).unwrap();
    let err = p2.call(read_inbox, (300,)).unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
}
