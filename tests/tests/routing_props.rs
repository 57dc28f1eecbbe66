//! Routing invariants, one proptest each, over random trees and random interleavings in
//! the deterministic simulator (no processes).

use mitogen_core::DeadReason;
use mitogen_tests::sim::{Reply, Sim};
use proptest::prelude::*;

/// A random tree: `parents[i-1]` is the parent of node i, always a smaller index.
fn tree() -> impl Strategy<Value = Vec<usize>> {
    (1usize..12).prop_flat_map(|n| (1..=n).map(|i| (0..i).boxed()).collect::<Vec<_>>())
}

#[derive(Debug, Clone)]
enum Op {
    Send { from: usize, to: u32 },
    Steps(u8),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            3 => (0usize..64, 0u32..14).prop_map(|(from, to)| Op::Send { from, to }),
            1 => (0u8..20).prop_map(Op::Steps),
        ],
        1..80,
    )
}

fn run(sim: &mut Sim, ops: &[Op]) {
    for op in ops {
        match *op {
            Op::Send { from, to } => {
                let from = from % sim.len();
                sim.send(from, to);
            }
            Op::Steps(n) => {
                for _ in 0..n {
                    sim.step();
                }
            }
        }
    }
    sim.drain(1_000_000);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every message is delivered exactly once (and answered) or its sender gets exactly
    /// one dead reply.
    #[test]
    fn delivered_exactly_once_or_one_dead_reply(parents in tree(), ops in ops(), seed: u64) {
        let mut sim = Sim::new(&parents, seed);
        run(&mut sim, &ops);
        for (uid, s) in sim.sent.iter().enumerate() {
            let uid = uid as u64;
            let delivered = sim.delivered.get(&uid).copied().unwrap_or(0);
            let replies = sim.replies.get(&uid).cloned().unwrap_or_default();
            prop_assert_eq!(replies.len(), 1, "uid {} {:?}: replies {:?}", uid, s, replies);
            match &replies[0] {
                Reply::Answer => prop_assert_eq!(delivered, 1),
                Reply::Dead(..) => prop_assert_eq!(delivered, 0),
            }
        }
    }

    /// No loops: a request crosses at most the path up to the root and down again.
    #[test]
    fn hops_are_bounded(parents in tree(), ops in ops(), seed: u64) {
        let mut sim = Sim::new(&parents, seed);
        run(&mut sim, &ops);
        let max_depth = (0..sim.len()).map(|i| sim.depth(i)).max().unwrap_or(0);
        for (uid, hops) in &sim.hops {
            prop_assert!(*hops <= 2 * max_depth, "uid {} took {} hops (max depth {})", uid, hops, max_depth);
        }
    }

    /// A message for an unknown context travels up to the root, which answers "no route".
    #[test]
    fn unknown_destinations_go_up(parents in tree(), seed: u64, from in 0usize..64) {
        let mut sim = Sim::new(&parents, seed);
        let from = from % sim.len();
        let uid = sim.send(from, 1_000_000);
        sim.drain(1_000_000);
        prop_assert_eq!(sim.replies[&uid].clone(), vec![Reply::Dead(DeadReason::NoRoute, 0)]);
        prop_assert_eq!(sim.hops.get(&uid).copied().unwrap_or(0), sim.depth(from));
    }

    /// A frame whose source does not live behind the link it arrives on is dropped:
    /// never delivered, never answered.
    #[test]
    fn spoofed_sources_are_never_delivered(parents in tree(), seed: u64, pick in 0usize..64, claim in 0u32..12, ops in ops()) {
        let mut sim = Sim::new(&parents, seed);
        let n = sim.len();
        let child = 1 + pick % (n - 1).max(1);
        if n < 2 { return Ok(()); }
        let parent = parents[child - 1];
        let claim = claim % n as u32;
        // Upward: the claimed source must not be in the child's subtree.
        let spoof_up = !sim.in_subtree(claim as usize, child);
        // Downward: the claimed source must not be outside the child's subtree... i.e. it
        // claims to be the child itself or below it, coming from above.
        let mut uids = Vec::new();
        if spoof_up {
            uids.push(sim.spoof(child, parent, claim, parent as u32));
        }
        uids.push(sim.spoof(parent, child, child as u32, child as u32));
        run(&mut sim, &ops);
        for uid in uids {
            prop_assert_eq!(sim.delivered.get(&uid), None, "spoofed uid {} delivered", uid);
            prop_assert_eq!(sim.replies.get(&uid), None);
        }
    }

    /// After a link is cut: nothing is transmitted into the lost subtree, later messages to
    /// it get "no route", and every waiter outside it is answered exactly once.
    #[test]
    fn disconnect_answers_every_waiter(parents in tree(), before in ops(), after in ops(), seed: u64, pick in 0usize..64) {
        let mut sim = Sim::new(&parents, seed);
        if sim.len() < 2 { return Ok(()); }
        let victim = 1 + pick % (sim.len() - 1);
        for op in &before {
            if let Op::Send { from, to } = *op { sim.send(from % sim.len(), to); }
            if let Op::Steps(k) = *op { for _ in 0..k { sim.step(); } }
        }
        sim.cut(victim);
        run(&mut sim, &after);
        prop_assert!(sim.into_dead_links.is_empty(), "transmitted on a cut link: {:?}", sim.into_dead_links);
        for (uid, s) in sim.sent.iter().enumerate() {
            let uid = uid as u64;
            let replies = sim.replies.get(&uid).cloned().unwrap_or_default();
            prop_assert!(sim.delivered.get(&uid).copied().unwrap_or(0) <= 1);
            if s.sender_cut_off || sim.in_subtree(s.from, victim) {
                // Inside the lost subtree the real agent shuts down and wakes everything.
                prop_assert!(replies.len() <= 1);
                continue;
            }
            prop_assert_eq!(replies.len(), 1, "uid {} {:?}: {:?}", uid, s, replies);
            if s.into_cut_subtree {
                prop_assert_eq!(sim.delivered.get(&uid), None);
                prop_assert!(matches!(replies[0], Reply::Dead(DeadReason::NoRoute | DeadReason::Disconnected, _)), "{:?}", replies);
            }
        }
    }

    /// Messages from one sender to one receiver arrive in the order they were sent.
    #[test]
    fn fifo_per_sender_receiver_pair(parents in tree(), ops in ops(), seed: u64) {
        let mut sim = Sim::new(&parents, seed);
        run(&mut sim, &ops);
        for (pair, seqs) in &sim.order {
            prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{:?} out of order: {:?}", pair, seqs);
        }
    }
}
