//! The [`Broker`]: one I/O thread per process that multiplexes every stream.
//!
//! User threads never wait on file descriptors. They send through a [`BrokerHandle`], which
//! routes the message with the [`Router`] under a short lock and writes it straight to the
//! stream's socket when nothing is queued there (no thread hop); the broker thread only
//! reads, flushes what could not be written at once, runs timers and reaps processes.
//!
//! Shutdown is bounded: children are asked to shut down, given a grace period, then cut off;
//! every waiter is woken with a dead "broker has exited" message, and any later use fails at
//! once with [`BrokerError::Shutdown`].

mod driver;
mod event_loop;
mod rx;
mod stream;
mod sys;

pub use driver::{Driver, Interest, Wants};
pub(crate) use rx::wake;
use rx::StreamRx;

pub use stream::{HIGH_WATER, LOW_WATER};

use crate::channel::Queue;
use crate::ids::{self, ContextId, Handle};
use crate::message::{DeadReason, Message};
use crate::router::{Action, HandleEntry, Policy, Router, RouterConfig, StreamId};
use crate::transport::Connection;
use polling::{Event, Poller};
use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};
use stream::{Sent, StreamTx};

/// Errors from broker operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker is shutting down or has exited; nothing can be sent or registered.
    #[error("the broker has shut down")]
    Shutdown,
    /// The message is larger than `max_message_size`; nothing was sent.
    #[error("message too large ({len} bytes, max {max} bytes)")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// An OS error while creating the broker or registering a stream.
    #[error("broker I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A message callback registered with [`Sink::Callback`].
pub type Callback = Arc<dyn Fn(&BrokerHandle, Message) + Send + Sync>;

/// Where a handle's messages go.
#[derive(Clone)]
pub enum Sink {
    /// A queue a [`crate::Receiver`] waits on.
    Queue(Arc<Queue>),
    /// A callback run on the thread that routed the message (usually the broker thread),
    /// without any broker lock held. It must not block.
    Callback(Callback),
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sink::Queue(_) => f.write_str("Sink::Queue"),
            Sink::Callback(_) => f.write_str("Sink::Callback"),
        }
    }
}

/// How a broker is set up.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Name used in logs and the thread name (`mitogen-broker`).
    pub name: String,
    /// The router's identity and limits.
    pub router: RouterConfig,
    /// How long children get to disconnect after being asked to shut down.
    pub shutdown_grace: Duration,
    /// Log every routed message at debug level (`enable_debug`); can be switched on later
    /// with [`BrokerHandle::set_debug`].
    pub debug: bool,
}

impl BrokerConfig {
    /// Configuration for a master: context id 0, no parents, default limits.
    pub fn master() -> BrokerConfig {
        BrokerConfig {
            name: "master".into(),
            router: RouterConfig {
                id: ids::MASTER_ID,
                parent_ids: Vec::new(),
                max_message_size: crate::message::DEFAULT_MAX_MESSAGE_SIZE,
                unidirectional: false,
            },
            shutdown_grace: Duration::from_secs(5),
            debug: false,
        }
    }
}

const RUNNING: u8 = 0;
const SHUTTING_DOWN: u8 = 1;
const EXITED: u8 = 2;

/// A callback run once on the broker thread.
pub type Deferred = Box<dyn FnOnce(&BrokerHandle) + Send>;
/// A callback for each line of diagnostic output (`None` at end of file).
pub type LineSink = Box<dyn FnMut(&BrokerHandle, Option<&str>) + Send>;

pub(crate) enum Command {
    /// Start reading a stream that was registered with the router.
    AddReader {
        stream: StreamId,
        key: usize,
        rx: Arc<StreamRx>,
        diag: Option<OwnedFd>,
        process: Option<std::process::Child>,
        name: String,
    },
    /// Read an fd line by line into a callback.
    AddLines { fd: OwnedFd, sink: LineSink },
    /// Drive a transport's protocol on the broker thread.
    AddDriver(Box<dyn Driver>),
    /// Run a callback at a time.
    Timer { at: Instant, f: Deferred },
    /// Close a stream as if it had hit end of file, saying why.
    CloseStream(StreamId, String),
    /// Begin the bounded shutdown.
    Shutdown,
}

pub(crate) struct Core {
    pub(crate) router: Router<Sink>,
    pub(crate) streams: HashMap<StreamId, Arc<StreamTx>>,
    /// Read sides, registered once the broker polls them.
    pub(crate) readers: HashMap<StreamId, Arc<StreamRx>>,
    next_stream: StreamId,
    pub(crate) commands: Vec<Command>,
    next_key: usize,
}

pub(crate) struct Shared {
    pub(crate) poller: Poller,
    pub(crate) cfg: BrokerConfig,
    pub(crate) core: Mutex<Core>,
    state: AtomicU8,
    pub(crate) debug: AtomicBool,
    broker_thread: OnceLock<ThreadId>,
    exited: (Mutex<bool>, Condvar),
    /// Messages handed over by code that may run under the core lock (loggers).
    pub(crate) outbox: Mutex<Vec<Message>>,
    pub(crate) on_exit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// A cheap, cloneable reference to a running broker, used by every API object.
#[derive(Clone)]
pub struct BrokerHandle {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for BrokerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerHandle({})", self.shared.cfg.name)
    }
}

/// Owns the broker thread. Dropping it shuts the broker down (bounded) and joins the thread.
#[derive(Debug)]
pub struct Broker {
    handle: BrokerHandle,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Broker {
    /// Starts a broker thread with `cfg`.
    pub fn start(cfg: BrokerConfig) -> Result<Broker, BrokerError> {
        let poller = Poller::new()?;
        let debug = cfg.debug;
        let shared = Arc::new(Shared {
            poller,
            core: Mutex::new(Core {
                router: Router::new(cfg.router.clone()),
                streams: HashMap::new(),
                readers: HashMap::new(),
                next_stream: 1,
                commands: Vec::new(),
                next_key: 0,
            }),
            cfg,
            state: AtomicU8::new(RUNNING),
            debug: AtomicBool::new(debug),
            broker_thread: OnceLock::new(),
            exited: (Mutex::new(false), Condvar::new()),
            outbox: Mutex::new(Vec::new()),
            on_exit: Mutex::new(None),
        });
        let handle = BrokerHandle { shared };
        let h2 = handle.clone();
        let thread =
            std::thread::Builder::new().name("mitogen-broker".into()).spawn(move || event_loop::run(h2))?;
        Ok(Broker { handle, thread: Mutex::new(Some(thread)) })
    }

    /// A handle for API objects.
    pub fn handle(&self) -> &BrokerHandle {
        &self.handle
    }

    /// Shuts down (children get the configured grace period) and waits for the thread.
    pub fn shutdown(&self) {
        self.handle.begin_shutdown();
        if let Some(t) = self.thread.lock().unwrap().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl BrokerHandle {
    /// This context's id.
    pub fn context_id(&self) -> ContextId {
        self.shared.cfg.router.id
    }

    /// The broker's configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.shared.cfg
    }

    /// Switches per-message debug logging on or off.
    pub fn set_debug(&self, on: bool) {
        self.shared.debug.store(on, Ordering::Relaxed);
    }

    /// True when per-message debug logging is on.
    pub fn debug(&self) -> bool {
        self.shared.debug.load(Ordering::Relaxed)
    }

    /// True once shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) != RUNNING
    }

    /// True once the broker thread has finished.
    pub fn is_exited(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) == EXITED
    }

    pub(crate) fn on_broker_thread(&self) -> bool {
        self.shared.broker_thread.get() == Some(&std::thread::current().id())
    }

    fn check_running(&self) -> Result<(), BrokerError> {
        if self.is_shutting_down() {
            Err(BrokerError::Shutdown)
        } else {
            Ok(())
        }
    }

    /// Routes `msg` from this context. Undeliverable messages produce dead replies, so this
    /// only fails when the broker has shut down or the message is over the size limit.
    pub fn send(&self, msg: Message) -> Result<(), BrokerError> {
        self.check_running()?;
        let max = self.shared.cfg.router.max_message_size;
        if msg.data.len() > max as usize {
            return Err(BrokerError::TooLarge { len: msg.data.len(), max });
        }
        self.route(|r, out| r.send(msg, out));
        Ok(())
    }

    /// Queues `msg` for the broker thread to route. Safe to call from anywhere, including a
    /// `log` implementation invoked while the router lock is held; never blocks.
    pub fn send_later(&self, msg: Message) {
        if self.is_exited() {
            return;
        }
        self.shared.outbox.lock().unwrap().push(msg);
        let _ = self.shared.poller.notify();
    }

    /// Like [`BrokerHandle::send`] but allowed during shutdown (internal control traffic).
    pub(crate) fn send_internal(&self, msg: Message) {
        self.route(|r, out| r.send(msg, out));
    }

    /// Runs `f` on the router under the lock, then executes the resulting actions.
    pub(crate) fn route(&self, f: impl FnOnce(&mut Router<Sink>, &mut Vec<Action<Sink>>)) {
        let mut actions = Vec::new();
        let resolved = {
            let mut core = self.shared.core.lock().unwrap();
            f(&mut core.router, &mut actions);
            resolve(&core, actions)
        };
        self.execute(resolved, !self.on_broker_thread());
    }

    /// Carries out resolved router actions. `may_block`: a user thread sending its own
    /// message may wait for backpressure; forwarding never does.
    pub(crate) fn execute(&self, resolved: Vec<Resolved>, may_block: bool) {
        for r in resolved {
            match r {
                Resolved::Transmit(tx, msg) => {
                    // Log traffic is never logged itself: that would feed back forever.
                    if self.debug() && msg.handle != ids::FORWARD_LOG {
                        log::debug!("{}: transmit {msg:?} on stream {}", self.shared.cfg.name, tx.id);
                    }
                    if let Sent::Closed(msg) = tx.send(&self.shared.poller, msg, may_block) {
                        // Routed before the stream closed: its sender still gets an answer
                        // (at most one: a dead message never causes another, and a handle
                        // already woken by the loss drops it).
                        log::debug!("{}: stream {} closed, dropped {msg:?}", self.shared.cfg.name, tx.id);
                        let text = format!("the stream to context {} closed while routing", msg.dst);
                        self.route(|r, out| r.dead_reply(&msg, DeadReason::Disconnected, &text, out));
                    }
                }
                Resolved::Deliver(sink, msg) => {
                    if self.debug() && msg.handle != ids::FORWARD_LOG {
                        log::debug!("{}: deliver {msg:?}", self.shared.cfg.name);
                    }
                    match sink {
                        Sink::Queue(q) => q.push(msg),
                        Sink::Callback(cb) => cb(self, msg),
                    }
                }
                Resolved::Disconnected(id) => {
                    log::debug!("{}: context {id} disconnected", self.shared.cfg.name);
                }
            }
        }
    }

    /// Waits for the next message on `q` until `deadline` (forever if `None`). When `from`
    /// names the context the message will come from, the calling thread reads the stream
    /// leading there itself if no other thread does (one wake-up per message instead of
    /// two); otherwise it waits for the broker thread to deliver.
    pub fn wait(&self, q: &Queue, deadline: Option<Instant>, from: Option<ContextId>) -> Option<Message> {
        rx::wait(self, q, deadline, from)
    }

    fn stream_rx_towards(&self, id: ContextId) -> Option<Arc<StreamRx>> {
        let core = self.shared.core.lock().unwrap();
        let stream = core.router.route_for(id)?;
        core.readers.get(&stream).cloned()
    }

    /// Registers a persistent handle with a well-known number.
    pub fn set_handle(&self, handle: Handle, sink: Sink, policy: Policy) -> Result<(), BrokerError> {
        self.check_running()?;
        let entry = HandleEntry { sink, policy, persist: true, respondent: None };
        self.shared.core.lock().unwrap().router.set_handle(handle, entry);
        Ok(())
    }

    /// Registers a handle under a fresh number (>= 1000). A non-persistent handle is removed
    /// after its first message. With `respondent`, the handle gets a dead message if that
    /// context disconnects; if it is already unreachable the dead message comes at once.
    pub fn alloc_handle(
        &self,
        sink: Sink,
        persist: bool,
        respondent: Option<ContextId>,
    ) -> Result<Handle, BrokerError> {
        self.check_running()?;
        let entry = HandleEntry { sink: sink.clone(), policy: Policy::Any, persist, respondent };
        let mut core = self.shared.core.lock().unwrap();
        let handle = core.router.alloc_handle(entry);
        let me = core.router.id();
        let unreachable = respondent
            .is_some_and(|r| r != me && !core.router.has_route(r) && core.router.route_for(r).is_none());
        drop(core);
        if unreachable {
            let r = respondent.unwrap_or_default();
            let text = format!("no route to context {r} from context {me}");
            let mut dead = Message::dead(me, handle, DeadReason::NoRoute, &text);
            dead.src = r;
            dead.auth = me;
            self.route(|router, out| {
                if router.del_handle(handle).is_some() || persist {
                    out.push(Action::Deliver { sink, msg: dead });
                }
            });
        }
        Ok(handle)
    }

    /// Removes a handle.
    pub fn del_handle(&self, handle: Handle) {
        self.shared.core.lock().unwrap().router.del_handle(handle);
    }

    /// True if `id` is this context or reachable downward from it.
    pub fn is_reachable(&self, id: ContextId) -> bool {
        let core = self.shared.core.lock().unwrap();
        id == core.router.id() || core.router.has_route(id)
    }

    /// Number of registered handles (leak checks in tests).
    pub fn handle_count(&self) -> usize {
        self.shared.core.lock().unwrap().router.handle_count()
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        self.shared.core.lock().unwrap().streams.len()
    }

    /// Adds a connected, bootstrapped stream. `parent` marks the stream to this context's
    /// parent; otherwise it leads to the child `remote`, whose route is announced upward
    /// before any of its messages are read.
    pub fn add_stream(
        &self,
        mut conn: Connection,
        remote: ContextId,
        parent: bool,
        name: &str,
    ) -> Result<StreamId, BrokerError> {
        if let Err(e) = self.check_running() {
            // Nobody would ever reap it: end the process here, not as a zombie later.
            // Its stream closes first, so it exits by itself even where it may not be
            // signalled (sudo, started by another account); the wait is bounded.
            let process = conn.process.take();
            drop(conn);
            if let Some(mut p) = process {
                let _ = p.kill();
                let until = Instant::now() + Duration::from_secs(2);
                while matches!(p.try_wait(), Ok(None)) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            return Err(e);
        }
        sys::set_nonblocking(conn.read.as_fd())?;
        sys::set_nonblocking(conn.write.as_fd())?;
        let (stream, key, rx, resolved) = {
            let mut core = self.shared.core.lock().unwrap();
            let stream = core.next_stream;
            core.next_stream += 1;
            let key = core.next_key;
            core.next_key += 1;
            let tx = Arc::new(StreamTx::new(stream, event_loop::write_key(key), conn.write));
            let max = self.shared.cfg.router.max_message_size;
            let rx =
                Arc::new(StreamRx::new(stream, event_loop::read_key(key), conn.read, name.to_string(), max));
            // Visible to waiting threads at once; the broker starts polling it shortly.
            core.readers.insert(stream, rx.clone());
            // SAFETY: the fd stays open until `delete` in `stream_lost` (same thread order:
            // the broker deletes it before the StreamTx, and so the fd, is dropped).
            unsafe { self.shared.poller.add(tx.fd(), Event::none(tx.key))? };
            core.streams.insert(stream, tx);
            let mut actions = Vec::new();
            if parent {
                core.router.add_parent_stream(stream, remote);
            } else {
                core.router.add_child_stream(stream, remote, &mut actions);
            }
            let resolved = resolve(&core, actions);
            (stream, key, rx, resolved)
        };
        // ADD_ROUTE is queued on the parent stream before reading starts (FIFO order).
        self.execute(resolved, false);
        self.command(Command::AddReader {
            stream,
            key,
            rx,
            diag: conn.diag,
            process: conn.process,
            name: name.to_string(),
        });
        Ok(stream)
    }

    /// Reads `fd` line by line on the broker thread into `sink` (diagnostics, stdio capture).
    pub fn add_line_reader(&self, fd: OwnedFd, sink: LineSink) -> Result<(), BrokerError> {
        self.check_running()?;
        sys::set_nonblocking(fd.as_fd())?;
        self.command(Command::AddLines { fd, sink });
        Ok(())
    }

    /// Runs `driver` on the broker thread until it finishes (or the broker exits).
    pub fn add_driver(&self, driver: Box<dyn Driver>) -> Result<(), BrokerError> {
        self.check_running()?;
        self.command(Command::AddDriver(driver));
        Ok(())
    }

    /// Runs `f` on the broker thread after `delay`.
    pub fn defer_after(&self, delay: Duration, f: Deferred) -> Result<(), BrokerError> {
        self.check_running()?;
        self.command(Command::Timer { at: Instant::now() + delay, f });
        Ok(())
    }

    /// Watches the stream to child `remote`: each `interval` in which nothing arrived from
    /// it, a [`ids::HEARTBEAT`] probe goes out (its router answers); when nothing at all has
    /// arrived for `interval x (count + 1)`, the stream is closed as disconnected, so calls
    /// pending on that subtree fail and its routes go. This catches a peer that hangs
    /// without closing anything (a frozen container, a stopped process), which no read or
    /// write error would reveal. Ends by itself with the stream.
    pub fn heartbeat(&self, remote: ContextId, interval: Duration, count: u32) -> Result<(), BrokerError> {
        let interval = interval.max(Duration::from_millis(10));
        self.defer_after(interval, Box::new(move |h| h.heartbeat_tick(remote, interval, count)))
    }

    fn heartbeat_tick(&self, remote: ContextId, interval: Duration, count: u32) {
        let watched = {
            let core = self.shared.core.lock().unwrap();
            core.router
                .child_streams()
                .into_iter()
                .find(|s| core.router.stream_remote(*s) == Some(remote))
                .and_then(|s| core.readers.get(&s).map(|rx| (s, rx.clone())))
        };
        let Some((stream, rx)) = watched else { return };
        let silent = rx.silent_for();
        if silent >= interval * (count + 1) {
            log::warn!(
                "{}: nothing from {} for {silent:.1?} (heartbeat {interval:?} x {count}); disconnecting it",
                self.shared.cfg.name,
                rx.name
            );
            self.command(Command::CloseStream(stream, format!("silent for {silent:.1?}")));
            return;
        }
        if silent >= interval {
            let _ = self.send(Message::new(remote, ids::HEARTBEAT, crate::message::Kind::Raw, vec![0]));
        }
        let _ = self.defer_after(interval, Box::new(move |h| h.heartbeat_tick(remote, interval, count)));
    }

    /// Closes the stream leading to child `remote`, as if it had disconnected.
    pub fn disconnect(&self, remote: ContextId) {
        let stream = {
            let core = self.shared.core.lock().unwrap();
            core.router.child_streams().into_iter().find(|s| core.router.stream_remote(*s) == Some(remote))
        };
        if let Some(s) = stream {
            self.command(Command::CloseStream(s, "closed on request".into()));
        }
    }

    /// Runs `f` when the broker thread finishes (the agent uses it to exit the process).
    pub fn on_exit(&self, f: Box<dyn FnOnce() + Send>) {
        *self.shared.on_exit.lock().unwrap() = Some(f);
    }

    /// Starts the bounded shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        if self
            .shared
            .state
            .compare_exchange(RUNNING, SHUTTING_DOWN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.command(Command::Shutdown);
        }
    }

    /// Waits until the broker thread has finished, up to `timeout`. True if it has.
    pub fn wait_exited(&self, timeout: Duration) -> bool {
        let (m, c) = &self.shared.exited;
        let guard = m.lock().unwrap();
        let (guard, _) = c.wait_timeout_while(guard, timeout, |done| !*done).unwrap();
        *guard
    }

    fn command(&self, c: Command) {
        self.shared.core.lock().unwrap().commands.push(c);
        let _ = self.shared.poller.notify();
    }

    pub(crate) fn set_exited(&self) {
        self.shared.state.store(EXITED, Ordering::Release);
        let (m, c) = &self.shared.exited;
        *m.lock().unwrap() = true;
        c.notify_all();
    }
}

pub(crate) enum Resolved {
    Transmit(Arc<StreamTx>, Message),
    Deliver(Sink, Message),
    Disconnected(ContextId),
}

pub(crate) fn resolve(core: &Core, actions: Vec<Action<Sink>>) -> Vec<Resolved> {
    actions
        .into_iter()
        .filter_map(|a| match a {
            Action::Transmit { stream, msg } => {
                core.streams.get(&stream).map(|tx| Resolved::Transmit(tx.clone(), msg))
            }
            Action::Deliver { sink, msg } => Some(Resolved::Deliver(sink, msg)),
            Action::Disconnected { id } => Some(Resolved::Disconnected(id)),
        })
        .collect()
}
