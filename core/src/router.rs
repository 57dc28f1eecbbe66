//! The sans-IO [`Router`]: routing table, handle table and the rules that decide where each
//! message goes.
//!
//! The router owns no file descriptors, threads or clocks. Its inputs are messages (from a
//! stream or from local code) and stream events; its outputs are [`Action`]s appended to a
//! caller-supplied vector: transmit a message on a stream, deliver one to a local sink, or
//! report that a context disconnected. The [`crate::Broker`] executes the actions; the
//! simulator in `mitogen-tests` executes them without any process.
//!
//! Routing never fails: a message that cannot be delivered becomes a *dead reply* to its
//! sender (when the sender asked for a reply), or is dropped and logged when it was spoofed.

use crate::ids::{self, ContextId, Handle};
use crate::message::{DeadReason, Kind, Message};
use std::collections::{HashMap, HashSet};

/// Identifies a stream (a connection to an adjacent context) inside one process.
pub type StreamId = usize;

/// Who may send to a handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Policy {
    /// Any context with a route here.
    Any,
    /// Only this context or one of its ancestors ("parent authority"): code execution,
    /// shutdown and onward connections.
    ParentOnly,
}

/// What the router needs to know about a handle.
#[derive(Debug, Clone)]
pub struct HandleEntry<S> {
    /// Where messages for this handle go; opaque to the router.
    pub sink: S,
    /// Who may send to it.
    pub policy: Policy,
    /// False for one-shot reply handles, which are removed after their first message.
    pub persist: bool,
    /// When set, the handle gets a dead [`DeadReason::Disconnected`] message if this context
    /// disconnects.
    pub respondent: Option<ContextId>,
}

/// Output of the router, executed by its driver in order.
#[derive(Debug)]
#[non_exhaustive]
pub enum Action<S> {
    /// Write `msg` to `stream`.
    Transmit {
        /// The outbound stream.
        stream: StreamId,
        /// The message.
        msg: Message,
    },
    /// Hand `msg` to a local sink.
    Deliver {
        /// The sink registered for the handle.
        sink: S,
        /// The message.
        msg: Message,
    },
    /// Context `id` is no longer reachable.
    Disconnected {
        /// The lost context.
        id: ContextId,
    },
}

/// Static facts about this context, fixed when the router is created.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// This context's id.
    pub id: ContextId,
    /// Ancestors from the parent up to the master; empty in the master.
    pub parent_ids: Vec<ContextId>,
    /// Largest payload this context sends or accepts.
    pub max_message_size: u32,
    /// Refuse to forward between two child streams (inherited by children).
    pub unidirectional: bool,
}

#[derive(Debug)]
struct StreamInfo {
    remote: ContextId,
    is_parent: bool,
    /// Context ids routed through this stream (child streams only).
    behind: HashSet<ContextId>,
    /// Destinations this stream has sent traffic to: told when those contexts are lost.
    talked_to: HashSet<ContextId>,
}

/// The routing state of one context. See the module documentation.
#[derive(Debug)]
pub struct Router<S> {
    cfg: RouterConfig,
    streams: HashMap<StreamId, StreamInfo>,
    parent: Option<StreamId>,
    routes: HashMap<ContextId, StreamId>,
    handles: HashMap<Handle, HandleEntry<S>>,
    next_handle: Handle,
}

impl<S: Clone> Router<S> {
    /// A router with no streams and no handles.
    pub fn new(cfg: RouterConfig) -> Router<S> {
        Router {
            cfg,
            streams: HashMap::new(),
            parent: None,
            routes: HashMap::new(),
            handles: HashMap::new(),
            next_handle: ids::FIRST_REPLY_HANDLE,
        }
    }

    /// This context's id.
    pub fn id(&self) -> ContextId {
        self.cfg.id
    }

    /// The configuration the router was made with.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// True if `auth` is this context or one of its ancestors.
    pub fn has_parent_authority(&self, auth: ContextId) -> bool {
        auth == self.cfg.id || self.cfg.parent_ids.contains(&auth)
    }

    /// The stream a message for `dst` would leave on, following the default route up.
    pub fn route_for(&self, dst: ContextId) -> Option<StreamId> {
        self.routes.get(&dst).copied().or(self.parent)
    }

    /// True if `id` is routed downward through one of this context's child streams.
    pub fn has_route(&self, id: ContextId) -> bool {
        self.routes.contains_key(&id)
    }

    /// The stream to the parent, if any.
    pub fn parent_stream(&self) -> Option<StreamId> {
        self.parent
    }

    /// The context at the other end of `stream`.
    pub fn stream_remote(&self, stream: StreamId) -> Option<ContextId> {
        self.streams.get(&stream).map(|s| s.remote)
    }

    /// Ids of all child streams.
    pub fn child_streams(&self) -> Vec<StreamId> {
        let mut v: Vec<_> = self.streams.iter().filter(|(_, s)| !s.is_parent).map(|(id, _)| *id).collect();
        v.sort_unstable();
        v
    }

    /// Number of registered handles (for leak checks).
    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }

    /// Registers `entry` under a fresh reply handle (>= 1000) and returns it.
    pub fn alloc_handle(&mut self, entry: HandleEntry<S>) -> Handle {
        loop {
            let h = self.next_handle;
            self.next_handle = if h == Handle::MAX { ids::FIRST_REPLY_HANDLE } else { h + 1 };
            if let std::collections::hash_map::Entry::Vacant(v) = self.handles.entry(h) {
                v.insert(entry);
                return h;
            }
        }
    }

    /// Registers `entry` under a well-known `handle`, replacing any previous one.
    pub fn set_handle(&mut self, handle: Handle, entry: HandleEntry<S>) {
        self.handles.insert(handle, entry);
    }

    /// Removes a handle; later messages for it get an invalid-handle dead reply.
    pub fn del_handle(&mut self, handle: Handle) -> Option<HandleEntry<S>> {
        self.handles.remove(&handle)
    }

    /// Registers the stream to the parent context `remote`.
    pub fn add_parent_stream(&mut self, stream: StreamId, remote: ContextId) {
        self.streams.insert(
            stream,
            StreamInfo { remote, is_parent: true, behind: HashSet::new(), talked_to: HashSet::new() },
        );
        self.parent = Some(stream);
    }

    /// Registers a stream to a new child `remote` and announces it to the ancestors with
    /// ADD_ROUTE. The announcement is queued before any message from the child can be
    /// routed, so every ancestor learns the route first.
    pub fn add_child_stream(&mut self, stream: StreamId, remote: ContextId, out: &mut Vec<Action<S>>) {
        self.streams.insert(
            stream,
            StreamInfo {
                remote,
                is_parent: false,
                behind: HashSet::from([remote]),
                talked_to: HashSet::new(),
            },
        );
        self.routes.insert(remote, stream);
        self.announce_up(ids::ADD_ROUTE, remote, out);
    }

    /// The stream is gone (EOF, error, or closed). Every context behind it is lost: routes
    /// are removed, local waiters on them get a dead message, and DEL_ROUTE is sent up and
    /// to every stream that talked to them.
    pub fn stream_lost(&mut self, stream: StreamId, out: &mut Vec<Action<S>>) {
        let Some(info) = self.streams.remove(&stream) else { return };
        if info.is_parent {
            self.parent = None;
            let ancestors = self.cfg.parent_ids.clone();
            for id in ancestors {
                self.lost(id, None, out);
            }
            return;
        }
        let mut lost: Vec<ContextId> = info.behind.into_iter().collect();
        lost.sort_unstable();
        for id in lost {
            self.routes.remove(&id);
            self.lost(id, Some(stream), out);
        }
    }

    /// Wakes every handle waiting on `id`, tells interested streams, reports it.
    fn lost(&mut self, id: ContextId, via: Option<StreamId>, out: &mut Vec<Action<S>>) {
        let mut waiting: Vec<Handle> =
            self.handles.iter().filter(|(_, e)| e.respondent == Some(id)).map(|(h, _)| *h).collect();
        waiting.sort_unstable();
        for h in waiting {
            let text = format!("the respondent context {id} has disconnected");
            let mut dead = Message::dead(self.cfg.id, h, DeadReason::Disconnected, &text);
            dead.src = id;
            dead.auth = self.cfg.id;
            let entry = if self.handles[&h].persist {
                self.handles[&h].clone()
            } else {
                self.handles.remove(&h).expect("present")
            };
            out.push(Action::Deliver { sink: entry.sink, msg: dead });
        }
        // Tell the ancestors (if the loss came from below) and every child stream that
        // sent traffic to the lost context.
        if via.is_some() {
            self.announce_up(ids::DEL_ROUTE, id, out);
        }
        let mut listeners: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(s, info)| !info.is_parent && Some(**s) != via && info.talked_to.contains(&id))
            .map(|(s, _)| *s)
            .collect();
        listeners.sort_unstable();
        for s in listeners {
            let info = self.streams.get_mut(&s).expect("present");
            info.talked_to.remove(&id);
            let mut m = Message::new(info.remote, ids::DEL_ROUTE, Kind::Raw, id.to_be_bytes().to_vec());
            m.src = self.cfg.id;
            m.auth = self.cfg.id;
            out.push(Action::Transmit { stream: s, msg: m });
        }
        out.push(Action::Disconnected { id });
    }

    fn announce_up(&mut self, handle: Handle, id: ContextId, out: &mut Vec<Action<S>>) {
        if let Some(p) = self.parent {
            let remote = self.streams[&p].remote;
            let mut m = Message::new(remote, handle, Kind::Raw, id.to_be_bytes().to_vec());
            m.src = self.cfg.id;
            m.auth = self.cfg.id;
            out.push(Action::Transmit { stream: p, msg: m });
        }
    }

    /// Routes a message sent by local code: stamps `src` and `auth` with this context's id.
    pub fn send(&mut self, mut msg: Message, out: &mut Vec<Action<S>>) {
        msg.src = self.cfg.id;
        msg.auth = self.cfg.id;
        self.route(msg, None, out);
    }

    /// Source verification: true if a frame from `src` under authority `auth` may arrive
    /// on `stream` (both live behind it). A frame that fails it is dropped; a reader may
    /// check a header this way before reading the frame's body.
    pub fn is_genuine(&self, stream: StreamId, src: ContextId, auth: ContextId) -> bool {
        self.streams.get(&stream).is_some_and(|info| Self::genuine(&self.cfg, &self.routes, info, src, auth))
    }

    fn genuine(
        cfg: &RouterConfig,
        routes: &HashMap<ContextId, StreamId>,
        info: &StreamInfo,
        src: ContextId,
        auth: ContextId,
    ) -> bool {
        if info.is_parent {
            let from_above = |id: ContextId| id != cfg.id && !routes.contains_key(&id);
            from_above(src) && from_above(auth)
        } else {
            info.behind.contains(&src) && info.behind.contains(&auth)
        }
    }

    /// Routes a message that arrived on `stream`.
    pub fn receive(&mut self, stream: StreamId, msg: Message, out: &mut Vec<Action<S>>) {
        let Some(info) = self.streams.get_mut(&stream) else {
            log::warn!("router {}: message on unknown stream {stream}: {msg:?}", self.cfg.id);
            return;
        };
        let genuine = Self::genuine(&self.cfg, &self.routes, info, msg.src, msg.auth);
        if !genuine {
            log::warn!(
                "router {}: dropping spoofed {msg:?} arriving from context {}",
                self.cfg.id,
                info.remote
            );
            return;
        }
        if !info.is_parent && msg.dst != self.cfg.id && !msg.is_dead() {
            info.talked_to.insert(msg.dst);
        }
        self.route(msg, Some(stream), out);
    }

    fn route(&mut self, msg: Message, from: Option<StreamId>, out: &mut Vec<Action<S>>) {
        if msg.data.len() > self.cfg.max_message_size as usize {
            let text = format!("message too large (max {} bytes)", self.cfg.max_message_size);
            log::warn!("router {}: {text}: {msg:?}", self.cfg.id);
            self.dead_reply(&msg, DeadReason::TooLarge, &text, out);
            return;
        }
        if msg.dst == self.cfg.id {
            self.deliver_local(msg, from, out);
            return;
        }
        // Default route up, but never back where the message came from.
        let next = self.routes.get(&msg.dst).copied().or(self.parent);
        let Some(next) = next.filter(|&s| Some(s) != from) else {
            let text = format!("no route to context {} from context {}", msg.dst, self.cfg.id);
            self.dead_reply(&msg, DeadReason::NoRoute, &text, out);
            return;
        };
        if self.cfg.unidirectional {
            let from_child = from.is_some_and(|s| Some(s) != self.parent);
            if from_child && Some(next) != self.parent {
                let text = "unidirectional mode: forwarding between children is refused";
                self.dead_reply(&msg, DeadReason::Refused, text, out);
                return;
            }
        }
        out.push(Action::Transmit { stream: next, msg });
    }

    fn deliver_local(&mut self, msg: Message, from: Option<StreamId>, out: &mut Vec<Action<S>>) {
        match msg.handle {
            ids::ADD_ROUTE | ids::DEL_ROUTE if !msg.is_dead() => {
                return self.route_control(msg, from, out);
            }
            ids::HEARTBEAT => {
                // A probe gets an answer; an answer needs nothing more (arriving was the
                // point); anything else is dropped.
                if msg.data == [0] && !msg.is_dead() {
                    let mut answer = Message::new(msg.src, ids::HEARTBEAT, Kind::Raw, vec![1]);
                    answer.src = self.cfg.id;
                    answer.auth = self.cfg.id;
                    self.route(answer, None, out);
                }
                return;
            }
            _ => {}
        }
        let Some(entry) = self.handles.get(&msg.handle) else {
            if !msg.is_dead() {
                let text = format!("invalid handle {} in context {}", msg.handle, self.cfg.id);
                log::debug!("router {}: {text}: {msg:?}", self.cfg.id);
                self.dead_reply(&msg, DeadReason::InvalidHandle, &text, out);
            }
            return;
        };
        if entry.policy == Policy::ParentOnly && !self.has_parent_authority(msg.auth) {
            let text = format!(
                "refused by policy: handle {} in context {} needs parent authority, \
                 context {} has none",
                msg.handle, self.cfg.id, msg.auth
            );
            log::warn!("router {}: {text}", self.cfg.id);
            self.dead_reply(&msg, DeadReason::Refused, &text, out);
            return;
        }
        let sink = if entry.persist {
            entry.sink.clone()
        } else {
            self.handles.remove(&msg.handle).expect("present").sink
        };
        out.push(Action::Deliver { sink, msg });
    }

    /// ADD_ROUTE / DEL_ROUTE addressed to this context.
    fn route_control(&mut self, msg: Message, from: Option<StreamId>, out: &mut Vec<Action<S>>) {
        let Some(stream) = from else { return };
        let Ok(raw) = <[u8; 4]>::try_from(msg.data.as_slice()) else {
            log::warn!("router {}: malformed route control {msg:?}", self.cfg.id);
            return;
        };
        let id = ContextId::from_be_bytes(raw);
        let is_parent = self.streams[&stream].is_parent;
        match (msg.handle, is_parent) {
            (ids::ADD_ROUTE, false) => {
                let taken =
                    id == self.cfg.id || self.cfg.parent_ids.contains(&id) || self.routes.contains_key(&id);
                if taken {
                    log::warn!("router {}: refusing ADD_ROUTE({id}) from {stream}", self.cfg.id);
                    return;
                }
                self.routes.insert(id, stream);
                self.streams.get_mut(&stream).expect("present").behind.insert(id);
                self.announce_up(ids::ADD_ROUTE, id, out);
            }
            (ids::DEL_ROUTE, false) => {
                if self.routes.get(&id) == Some(&stream) {
                    self.routes.remove(&id);
                    self.streams.get_mut(&stream).expect("present").behind.remove(&id);
                    self.lost(id, Some(stream), out);
                }
            }
            (ids::DEL_ROUTE, true) => {
                // A context elsewhere in the tree is gone; we never route down to it.
                if !self.routes.contains_key(&id) {
                    self.lost(id, None, out);
                }
            }
            _ => log::warn!("router {}: refusing {msg:?} from parent", self.cfg.id),
        }
    }

    /// Sends a dead message back to the sender of `msg`, unless it wants no reply or is
    /// itself dead (dead messages never cause dead messages, so there are no loops).
    pub fn dead_reply(&mut self, msg: &Message, reason: DeadReason, text: &str, out: &mut Vec<Action<S>>) {
        if msg.reply_to == ids::NO_REPLY || msg.is_dead() {
            return;
        }
        let mut dead = Message::dead(msg.src, msg.reply_to, reason, text);
        dead.src = self.cfg.id;
        dead.auth = self.cfg.id;
        self.route(dead, None, out);
    }

    /// Wakes every handle with a dead [`DeadReason::BrokerExited`] message and forgets them.
    pub fn shutdown(&mut self, out: &mut Vec<Action<S>>) {
        let mut all: Vec<(Handle, HandleEntry<S>)> = self.handles.drain().collect();
        all.sort_unstable_by_key(|(h, _)| *h);
        for (h, e) in all {
            let mut m = Message::dead(self.cfg.id, h, DeadReason::BrokerExited, "broker has exited");
            m.src = self.cfg.id;
            m.auth = self.cfg.id;
            out.push(Action::Deliver { sink: e.sink, msg: m });
        }
    }
}
