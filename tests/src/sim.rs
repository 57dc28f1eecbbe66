//! A deterministic simulator of an N-node context tree driving the sans-IO
//! `mitogen_core::Router` with no processes, threads or sockets.
//!
//! Each node is a router; each directed link is a FIFO of frames in flight. [`Sim::step`]
//! delivers the head of one link chosen by a seeded generator, so any interleaving the
//! real system allows can be produced and replayed. Every delivery to a node's inbox is
//! answered at once, the way a called function replies. The simulator records what
//! happened so tests can check routing invariants.

use mitogen_core::ids::{ContextId, Handle, NO_REPLY};
use mitogen_core::router::{Action, HandleEntry, Policy, Router, RouterConfig, StreamId};
use mitogen_core::{DeadReason, Kind, Message};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// The handle every node answers on.
pub const INBOX: Handle = 2000;
const TAG_INBOX: u64 = u64::MAX;

/// What a sender learnt about one of its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The destination answered.
    Answer,
    /// A dead message came back, produced by context `by`.
    Dead(DeadReason, ContextId),
}

/// Book-keeping for one message sent with [`Sim::send`].
#[derive(Debug, Clone)]
pub struct Sent {
    /// Sending node.
    pub from: usize,
    /// Destination context id (may not exist).
    pub to: ContextId,
    /// Sequence number per (from, to) pair.
    pub seq: u64,
    /// True if sent after a cut, from outside the cut subtree into it.
    pub into_cut_subtree: bool,
    /// True if the sender is inside a cut subtree.
    pub sender_cut_off: bool,
    /// Spoofed: injected on a link with a source that does not live behind it.
    pub spoofed: bool,
}

/// The simulated tree.
pub struct Sim {
    routers: Vec<Router<u64>>,
    parent: Vec<Option<usize>>,
    links: BTreeMap<(usize, usize), VecDeque<Message>>,
    rng: u64,
    /// Messages by uid.
    pub sent: Vec<Sent>,
    /// Inbox deliveries: uid -> count.
    pub delivered: HashMap<u64, u32>,
    /// Order of inbox deliveries per (from node, to node): sequence numbers.
    pub order: HashMap<(usize, usize), Vec<u64>>,
    /// Replies per uid.
    pub replies: HashMap<u64, Vec<Reply>>,
    /// Links traversed per uid by the request.
    pub hops: HashMap<u64, u32>,
    /// The root of the subtree cut off, if any.
    pub cut: Option<usize>,
    /// Transmissions attempted on a link that no longer exists (must stay empty).
    pub into_dead_links: Vec<(usize, usize)>,
    seqs: HashMap<(usize, ContextId), u64>,
}

fn uid_of(m: &Message) -> Option<u64> {
    if m.kind == Kind::Raw && m.data.len() == 8 {
        Some(u64::from_be_bytes(m.data[..8].try_into().ok()?))
    } else {
        None
    }
}

impl Sim {
    /// Builds a tree where node `i` (1..n) has parent `parents[i-1] < i`, announces every
    /// route, and drains the announcements.
    pub fn new(parents: &[usize], seed: u64) -> Sim {
        let n = parents.len() + 1;
        let mut parent = vec![None];
        parent.extend(parents.iter().map(|&p| Some(p)));
        let mut routers = Vec::with_capacity(n);
        for i in 0..n {
            let mut chain = Vec::new();
            let mut p = parent[i];
            while let Some(x) = p {
                chain.push(x as ContextId);
                p = parent[x];
            }
            let mut r = Router::new(RouterConfig {
                id: i as ContextId,
                parent_ids: chain,
                max_message_size: 1 << 20,
                unidirectional: false,
            });
            r.set_handle(
                INBOX,
                HandleEntry { sink: TAG_INBOX, policy: Policy::Any, persist: true, respondent: None },
            );
            routers.push(r);
        }
        let mut sim = Sim {
            routers,
            parent,
            links: BTreeMap::new(),
            rng: seed | 1,
            sent: Vec::new(),
            delivered: HashMap::new(),
            order: HashMap::new(),
            replies: HashMap::new(),
            hops: HashMap::new(),
            cut: None,
            into_dead_links: Vec::new(),
            seqs: HashMap::new(),
        };
        for i in 1..n {
            let p = sim.parent[i].expect("non-root");
            sim.links.insert((i, p), VecDeque::new());
            sim.links.insert((p, i), VecDeque::new());
            sim.routers[i].add_parent_stream(0, p as ContextId);
            let mut out = Vec::new();
            sim.routers[p].add_child_stream(i, i as ContextId, &mut out);
            sim.apply(p, out);
            sim.drain(1_000_000);
        }
        sim
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.routers.len()
    }

    /// True if the tree has no nodes (never: the root always exists).
    pub fn is_empty(&self) -> bool {
        self.routers.is_empty()
    }

    /// Depth of node `i` (root = 0).
    pub fn depth(&self, mut i: usize) -> u32 {
        let mut d = 0;
        while let Some(p) = self.parent[i] {
            d += 1;
            i = p;
        }
        d
    }

    /// True if node `i` lies in the subtree rooted at `root`.
    pub fn in_subtree(&self, mut i: usize, root: usize) -> bool {
        loop {
            if i == root {
                return true;
            }
            match self.parent[i] {
                Some(p) => i = p,
                None => return false,
            }
        }
    }

    fn next_rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn stream_at(&self, at: usize, neighbour: usize) -> StreamId {
        if self.parent[at] == Some(neighbour) {
            0
        } else {
            neighbour
        }
    }

    fn neighbour(&self, at: usize, stream: StreamId) -> usize {
        if stream == 0 {
            self.parent[at].expect("stream 0 is the parent")
        } else {
            stream
        }
    }

    fn cut_off(&self, node: usize) -> bool {
        self.cut.is_some_and(|c| self.in_subtree(node, c))
    }

    /// Node `from` sends a message to context `to`, expecting a reply from it.
    pub fn send(&mut self, from: usize, to: ContextId) -> u64 {
        let uid = self.sent.len() as u64;
        let seq = {
            let s = self.seqs.entry((from, to)).or_insert(0);
            *s += 1;
            *s
        };
        let to_node = (to as usize) < self.len();
        self.sent.push(Sent {
            from,
            to,
            seq,
            into_cut_subtree: to_node && !self.cut_off(from) && self.cut_off(to as usize),
            sender_cut_off: self.cut_off(from),
            spoofed: false,
        });
        let reply = self.routers[from].alloc_handle(HandleEntry {
            sink: uid,
            policy: Policy::Any,
            persist: false,
            respondent: Some(to),
        });
        let mut m = Message::new(to, INBOX, Kind::Raw, uid.to_be_bytes().to_vec());
        m.reply_to = reply;
        let mut out = Vec::new();
        self.routers[from].send(m, &mut out);
        self.apply(from, out);
        uid
    }

    /// Injects on the link from `from` to `to` a frame claiming to come from `src`.
    pub fn spoof(&mut self, from: usize, to: usize, src: ContextId, dst: ContextId) -> u64 {
        let uid = self.sent.len() as u64;
        self.sent.push(Sent {
            from,
            to: dst,
            seq: 0,
            into_cut_subtree: false,
            sender_cut_off: false,
            spoofed: true,
        });
        let mut m = Message::new(dst, INBOX, Kind::Raw, uid.to_be_bytes().to_vec());
        m.src = src;
        m.auth = src;
        m.reply_to = 4242;
        if let Some(q) = self.links.get_mut(&(from, to)) {
            q.push_back(m);
        }
        uid
    }

    /// Cuts the link between `node` and its parent: both sides see the stream end, and the
    /// frames in flight on it are lost.
    pub fn cut(&mut self, node: usize) {
        let Some(p) = self.parent[node] else { return };
        if self.links.remove(&(node, p)).is_none() {
            return;
        }
        self.links.remove(&(p, node));
        self.cut = Some(node);
        let mut out = Vec::new();
        self.routers[p].stream_lost(node, &mut out);
        self.apply(p, out);
        let mut out = Vec::new();
        self.routers[node].stream_lost(0, &mut out);
        self.apply(node, out);
    }

    fn apply(&mut self, at: usize, actions: Vec<Action<u64>>) {
        let mut work: VecDeque<(usize, Action<u64>)> = actions.into_iter().map(|a| (at, a)).collect();
        while let Some((at, a)) = work.pop_front() {
            match a {
                Action::Transmit { stream, msg } => {
                    let to = self.neighbour(at, stream);
                    if !msg.is_dead() && msg.reply_to != NO_REPLY {
                        if let Some(uid) = uid_of(&msg) {
                            *self.hops.entry(uid).or_insert(0) += 1;
                        }
                    }
                    match self.links.get_mut(&(at, to)) {
                        Some(q) => q.push_back(msg),
                        None => self.into_dead_links.push((at, to)),
                    }
                }
                Action::Deliver { sink: TAG_INBOX, msg } => {
                    let Some(uid) = uid_of(&msg) else { continue };
                    *self.delivered.entry(uid).or_insert(0) += 1;
                    let s = &self.sent[uid as usize];
                    self.order.entry((s.from, at)).or_default().push(s.seq);
                    if msg.reply_to != NO_REPLY {
                        let mut out = Vec::new();
                        self.routers[at].send(msg.reply(Kind::Raw, msg.data.clone()), &mut out);
                        work.extend(out.into_iter().map(|a| (at, a)));
                    }
                }
                Action::Deliver { sink: uid, msg } => {
                    let r = match msg.dead_reason() {
                        Some((reason, _)) => Reply::Dead(reason, msg.src),
                        None => Reply::Answer,
                    };
                    self.replies.entry(uid).or_default().push(r);
                }
                Action::Disconnected { .. } => {}
                _ => {}
            }
        }
    }

    /// Delivers the head of one non-empty link chosen by the generator. False if idle.
    pub fn step(&mut self) -> bool {
        let busy: Vec<(usize, usize)> =
            self.links.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if busy.is_empty() {
            return false;
        }
        let (from, to) = busy[(self.next_rand() % busy.len() as u64) as usize];
        let msg = self.links.get_mut(&(from, to)).and_then(|q| q.pop_front()).expect("non-empty");
        let stream = self.stream_at(to, from);
        let mut out = Vec::new();
        self.routers[to].receive(stream, msg, &mut out);
        self.apply(to, out);
        true
    }

    /// Steps until idle or `limit` steps; returns the number of steps taken.
    pub fn drain(&mut self, limit: usize) -> usize {
        let mut n = 0;
        while n < limit && self.step() {
            n += 1;
        }
        n
    }
}
