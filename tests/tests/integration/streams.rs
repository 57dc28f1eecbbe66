use crate::local;
use mitogen::{Bytes, Receiver, Router};
use mitogen_tests::*;

const BLOCKS: u64 = 256;
const LEN: usize = 1 << 20;

#[test]
fn stream_256_mib_child_to_parent_through_a_sender() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let rx = Receiver::<Bytes>::new(r.broker()).unwrap();
    let seed = 7;
    let mut pending = c.call_async(produce, (seed, BLOCKS, LEN as u64, rx.sender())).unwrap();
    let mut n = 0u64;
    for b in rx {
        let b = b.unwrap();
        assert!(b.0 == block(seed, n, LEN), "block {n} differs");
        n += 1;
    }
    assert_eq!(n, BLOCKS);
    pending.get(None).unwrap();
}

#[test]
fn stream_256_mib_parent_to_child_as_call_arguments() {
    let r = Router::new().unwrap();
    let c = local(&r);
    let seed = 11;
    // Pipelined: several calls in flight at once.
    let mut pending = std::collections::VecDeque::new();
    for i in 0..BLOCKS {
        pending.push_back((i, c.call_async(verify, (seed, i, Bytes(block(seed, i, LEN)))).unwrap()));
        if pending.len() == 8 {
            let (i, mut rx) = pending.pop_front().unwrap();
            assert_eq!(rx.get(None).unwrap(), None, "block {i} differs");
        }
    }
    for (i, mut rx) in pending {
        assert_eq!(rx.get(None).unwrap(), None, "block {i} differs");
    }
}
