//! The sans-IO Router fed arbitrary sequences of messages (any header, from any stream,
//! spoofed or not, dead or not) and stream events (children added and lost), plus local
//! sends and handles. Checked after every step:
//! - at most one dead reply per message, and none to a dead message or one wanting none;
//! - a one-shot handle receives at most one message, ever;
//! - nothing is transmitted on a stream that is not open, and nothing goes down a child
//!   stream but to a context routed through it (so nothing to a lost subtree);
//! - losing a child stream wakes every one-shot handle waiting on a context behind it.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mitogen_core::ids::{ContextId, Handle, NO_REPLY};
use mitogen_core::router::{Action, HandleEntry, Policy, Router, RouterConfig, StreamId};
use mitogen_core::{Kind, Message};
use std::collections::{HashMap, HashSet};

const ME: ContextId = 5;
const PARENTS: [ContextId; 2] = [1, 0];
const PARENT_STREAM: StreamId = 0;
const MAX: u32 = 4096;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A frame arrives on stream `stream % 5` (0 is the parent).
    Receive { stream: u8, dst: u8, src: u8, auth: u8, handle: u16, reply_to: u16, kind: u8, data: Vec<u8> },
    /// Local code sends, with a one-shot reply handle waiting on `dst` if `wants_reply`.
    Send { dst: u8, handle: u16, wants_reply: bool, big: bool },
    /// A new child `remote` on stream `stream % 5` (ignored if taken).
    AddChild { stream: u8, remote: u8 },
    /// The stream ends.
    Lose { stream: u8 },
    /// A handle; one-shot ones wait on `respondent`.
    Alloc { persist: bool, respondent: Option<u8>, parent_only: bool },
    /// A handle goes.
    Del { handle: u16 },
}

/// Small ids and handles, so that routes, handles and spoofs collide often.
fn id(x: u8) -> ContextId {
    (x % 24) as ContextId
}

fn handle(x: u16) -> Handle {
    match x % 8 {
        0 => NO_REPLY,
        1..=3 => (x % 16) as Handle,
        _ => 1000 + (x % 24) as Handle,
    }
}

struct State {
    r: Router<u64>,
    open: HashSet<StreamId>,
    next_tag: u64,
    /// One-shot handles: tag -> (handle, respondent), and what each received.
    oneshot: HashMap<u64, (Handle, Option<ContextId>)>,
    received: HashMap<u64, u32>,
}

impl State {
    fn check(&mut self, input: Option<&Message>, out: &[Action<u64>]) {
        let mut dead_replies = 0;
        for a in out {
            let msg = match a {
                Action::Transmit { stream, msg } => {
                    assert!(self.open.contains(stream), "transmit on closed stream {stream}: {msg:?}");
                    if *stream != PARENT_STREAM {
                        assert_eq!(
                            self.r.route_for(msg.dst),
                            Some(*stream),
                            "sent down stream {stream} to a context not behind it: {msg:?}"
                        );
                    }
                    msg
                }
                Action::Deliver { sink, msg } => {
                    if self.oneshot.contains_key(sink) {
                        let n = self.received.entry(*sink).or_insert(0);
                        *n += 1;
                        assert!(*n <= 1, "one-shot handle {sink} got a second message: {msg:?}");
                    }
                    msg
                }
                _ => continue,
            };
            if let Some(m) = input {
                if msg.is_dead() && msg.src == ME && msg.dst == m.src && msg.handle == m.reply_to {
                    dead_replies += 1;
                }
            }
        }
        if let Some(m) = input {
            let allowed = if m.is_dead() || m.reply_to == NO_REPLY { 0 } else { 1 };
            assert!(dead_replies <= allowed, "{dead_replies} dead replies to {m:?}: {out:?}");
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut s = State {
        r: Router::new(RouterConfig {
            id: ME,
            parent_ids: PARENTS.to_vec(),
            max_message_size: MAX,
            unidirectional: false,
        }),
        open: HashSet::from([PARENT_STREAM]),
        next_tag: 1,
        oneshot: HashMap::new(),
        received: HashMap::new(),
    };
    s.r.add_parent_stream(PARENT_STREAM, PARENTS[0]);
    for op in ops.into_iter().take(256) {
        let mut out = Vec::new();
        match op {
            Op::Receive { stream, dst, src, auth, handle: h, reply_to, kind, data } => {
                let stream = (stream % 5) as StreamId;
                let mut m =
                    Message::new(id(dst), handle(h), Kind::from_code(kind % 4).unwrap_or(Kind::Raw), data);
                (m.src, m.auth, m.reply_to) = (id(src), id(auth), handle(reply_to));
                if kind % 7 == 0 {
                    // Route control carrying a context id, the shape ADD_ROUTE/DEL_ROUTE take.
                    m.data = id(auth).to_be_bytes().to_vec();
                }
                if !s.open.contains(&stream) {
                    continue;
                }
                s.r.receive(stream, m.clone(), &mut out);
                s.check(Some(&m), &out);
            }
            Op::Send { dst, handle: h, wants_reply, big } => {
                let data = vec![0; if big { MAX as usize + 1 } else { 8 }];
                let mut m = Message::new(id(dst), handle(h), Kind::Raw, data);
                if wants_reply {
                    let tag = s.next_tag;
                    s.next_tag += 1;
                    let entry = HandleEntry {
                        sink: tag,
                        policy: Policy::Any,
                        persist: false,
                        respondent: Some(m.dst),
                    };
                    m.reply_to = s.r.alloc_handle(entry);
                    s.oneshot.insert(tag, (m.reply_to, Some(m.dst)));
                }
                let mut sent = m.clone();
                sent.src = ME;
                s.r.send(m, &mut out);
                s.check(Some(&sent), &out);
            }
            Op::AddChild { stream, remote } => {
                let stream = (stream % 5) as StreamId;
                let remote = id(remote);
                let taken = remote == ME
                    || PARENTS.contains(&remote)
                    || s.r.route_for(remote).is_some_and(|st| st != PARENT_STREAM);
                if stream == PARENT_STREAM || s.open.contains(&stream) || taken {
                    continue;
                }
                s.r.add_child_stream(stream, remote, &mut out);
                s.open.insert(stream);
                s.check(None, &out);
            }
            Op::Lose { stream } => {
                let stream = (stream % 5) as StreamId;
                if !s.open.contains(&stream) {
                    continue;
                }
                let behind: HashSet<ContextId> = (0..24)
                    .filter(|&c| stream != PARENT_STREAM && s.r.route_for(c) == Some(stream))
                    .collect();
                s.open.remove(&stream);
                s.r.stream_lost(stream, &mut out);
                s.check(None, &out);
                for c in &behind {
                    assert_ne!(s.r.route_for(*c), Some(stream), "route to {c} survived its stream");
                }
                for (tag, (h, resp)) in &s.oneshot {
                    if resp.is_some_and(|r| behind.contains(&r)) {
                        assert_eq!(
                            s.received.get(tag),
                            Some(&1),
                            "handle {h} waiting on a lost context not woken"
                        );
                    }
                }
            }
            Op::Alloc { persist, respondent, parent_only } => {
                let tag = s.next_tag;
                s.next_tag += 1;
                let policy = if parent_only { Policy::ParentOnly } else { Policy::Any };
                let respondent = respondent.map(id);
                let h = s.r.alloc_handle(HandleEntry { sink: tag, policy, persist, respondent });
                if !persist {
                    s.oneshot.insert(tag, (h, respondent));
                }
            }
            Op::Del { handle: h } => {
                let h = handle(h);
                if let Some(e) = s.r.del_handle(h) {
                    // Gone: nothing more can arrive for it, and its record is dropped.
                    s.oneshot.remove(&e.sink);
                }
            }
        }
    }
    let mut out = Vec::new();
    s.r.shutdown(&mut out);
    s.check(None, &out);
});
