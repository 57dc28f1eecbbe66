//! Channels: [`Receiver`], [`Sender`] and [`Select`].
//!
//! A receiver owns a handle in its context; a sender is just `(context, handle)` and can be
//! passed inside call arguments so remote code streams values back. Closing (or dropping) a
//! sender sends a dead "sender closed" message, which ends the receiver's iteration.

use crate::broker::{BrokerHandle, Sink};
use crate::bytes::Bytes;
use crate::call::CallError;
use crate::codec::{self, CodecError};
use crate::ids::{ContextId, Handle};
use crate::message::{DeadReason, Kind, Message};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A thread-safe message queue bound to a handle; what a [`Receiver`] waits on.
#[derive(Default)]
pub struct Queue {
    st: Mutex<QueueState>,
    cond: Condvar,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Message>,
    watcher: Option<(Arc<SelectShared>, usize)>,
    /// Eventfd of a thread waiting by reading a stream itself, and that thread.
    waker: Option<(Arc<OwnedFd>, std::thread::ThreadId)>,
    /// Threads blocked on the condvar (notifying costs a syscall; skip it when none).
    sleepers: usize,
}

impl Queue {
    /// An empty queue.
    pub fn new() -> Arc<Queue> {
        Arc::new(Queue::default())
    }

    /// Appends a message and wakes one waiter (and the select watching this queue).
    pub fn push(&self, m: Message) {
        let mut st = self.st.lock().unwrap();
        st.items.push_back(m);
        if let Some((sel, key)) = &st.watcher {
            sel.ready(*key);
        }
        if let Some((fd, thread)) = &st.waker {
            if *thread != std::thread::current().id() {
                crate::broker::wake(fd);
            }
        }
        let sleepers = st.sleepers;
        drop(st);
        if sleepers > 0 {
            self.cond.notify_one();
        }
    }

    /// Removes the oldest message without waiting.
    pub fn try_pop(&self) -> Option<Message> {
        self.st.lock().unwrap().items.pop_front()
    }

    /// Registers (or clears) the eventfd of the current thread as this queue's waker.
    pub(crate) fn set_waker(&self, fd: Option<Arc<OwnedFd>>) {
        self.st.lock().unwrap().waker = fd.map(|f| (f, std::thread::current().id()));
    }

    /// Removes the oldest message, waiting until `deadline` (forever if `None`).
    pub fn pop(&self, deadline: Option<Instant>) -> Option<Message> {
        let mut st = self.st.lock().unwrap();
        loop {
            if let Some(m) = st.items.pop_front() {
                return Some(m);
            }
            st.sleepers += 1;
            match deadline {
                None => st = self.cond.wait(st).unwrap(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        st.sleepers -= 1;
                        return None;
                    }
                    st = self.cond.wait_timeout(st, d - now).unwrap().0;
                }
            }
            st.sleepers -= 1;
        }
    }

    /// Number of queued messages.
    pub fn len(&self) -> usize {
        self.st.lock().unwrap().items.len()
    }

    /// True if nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

thread_local! {
    static DECODE_BROKER: RefCell<Option<BrokerHandle>> = const { RefCell::new(None) };
}

/// Decodes `bytes` as a `T` with `broker` available to values that need one ([`Sender`]).
pub fn decode_with<T: DeserializeOwned>(broker: &BrokerHandle, bytes: &[u8]) -> Result<T, CodecError> {
    struct Reset(Option<BrokerHandle>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            DECODE_BROKER.with(|b| *b.borrow_mut() = prev);
        }
    }
    let prev = DECODE_BROKER.with(|b| b.borrow_mut().replace(broker.clone()));
    let _reset = Reset(prev);
    codec::decode_value(bytes)
}

type DecodeFn<T> = fn(&BrokerHandle, Message) -> Result<T, CallError>;

/// Turns a message into a value of `T`, mapping dead messages to errors. A raw payload
/// becomes a [`Bytes`] without copying.
pub(crate) fn decode_plain<T: DeserializeOwned + 'static>(
    b: &BrokerHandle,
    m: Message,
) -> Result<T, CallError> {
    if let Some((reason, text)) = m.dead_reason() {
        return Err(CallError::from_dead(reason, text));
    }
    match m.kind {
        Kind::Value => Ok(decode_with(b, &m.data)?),
        Kind::Raw if TypeId::of::<T>() == TypeId::of::<Bytes>() => {
            let any: Box<dyn Any> = Box::new(Bytes(m.data));
            Ok(*any.downcast::<T>().expect("T is Bytes"))
        }
        _ => Err(CallError::Codec(CodecError::Decode {
            type_name: std::any::type_name::<T>(),
            detail: format!("unexpected payload kind {:?}", m.kind),
        })),
    }
}

/// Receives values of `T` sent to one handle of this context.
///
/// Iterating yields values until the sender closes the stream; a dead message (the sender's
/// context disconnected, the broker shut down...) is yielded once as an error, then
/// iteration ends.
pub struct Receiver<T> {
    broker: BrokerHandle,
    handle: Handle,
    queue: Arc<Queue>,
    decode: DecodeFn<T>,
    done: bool,
    one_shot: bool,
    respondent: Option<ContextId>,
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Receiver(handle {} in context {})", self.handle, self.broker.context_id())
    }
}

impl<T: DeserializeOwned + 'static> Receiver<T> {
    /// A new persistent receiver on a fresh handle of `broker`'s context.
    pub fn new(broker: &BrokerHandle) -> Result<Receiver<T>, CallError> {
        Self::with_decoder(broker, true, None, decode_plain::<T>)
    }

    /// A receiver whose handle expects messages from `respondent`: if that context
    /// disconnects, the receiver gets a [`DeadReason::Disconnected`] error.
    pub fn with_respondent(broker: &BrokerHandle, respondent: ContextId) -> Result<Receiver<T>, CallError> {
        Self::with_decoder(broker, true, Some(respondent), decode_plain::<T>)
    }
}

impl<T> Receiver<T> {
    pub(crate) fn with_decoder(
        broker: &BrokerHandle,
        persist: bool,
        respondent: Option<ContextId>,
        decode: DecodeFn<T>,
    ) -> Result<Receiver<T>, CallError> {
        let queue = Queue::new();
        let handle = broker
            .alloc_handle(Sink::Queue(queue.clone()), persist, respondent)
            .map_err(CallError::from_send)?;
        Ok(Receiver {
            broker: broker.clone(),
            handle,
            queue,
            decode,
            done: false,
            one_shot: !persist,
            respondent,
        })
    }

    /// The handle this receiver owns.
    pub fn handle(&self) -> Handle {
        self.handle
    }

    /// A sender that delivers to this receiver (pass it to remote code inside call args).
    pub fn sender(&self) -> Sender<T> {
        Sender::new(self.broker.clone(), self.broker.context_id(), self.handle)
    }

    /// Waits for the next value, up to `timeout` (forever if `None`).
    ///
    /// Errors: [`CallError::Timeout`], [`CallError::Closed`] when the sender closed the
    /// stream, [`CallError::Dead`] for any other dead message, [`CallError::Remote`] for a
    /// failed call, [`CallError::Shutdown`] when the broker is gone.
    pub fn get(&mut self, timeout: Option<Duration>) -> Result<T, CallError> {
        if self.done && self.queue.is_empty() {
            return Err(CallError::Closed);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        if self.broker.is_exited() && self.queue.is_empty() {
            self.done = true;
            return Err(CallError::Shutdown);
        }
        let m = self
            .broker
            .wait(&self.queue, deadline, self.respondent)
            .ok_or(CallError::Timeout(timeout.unwrap_or_default()))?;
        self.decode_msg(m)
    }

    /// Takes a value if one is queued, without waiting.
    pub fn try_get(&mut self) -> Option<Result<T, CallError>> {
        if self.queue.is_empty() {
            None
        } else {
            Some(self.get(Some(Duration::ZERO)))
        }
    }

    pub(crate) fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    pub(crate) fn decode_msg(&mut self, m: Message) -> Result<T, CallError> {
        if m.is_dead() || self.one_shot {
            self.done = true;
        }
        (self.decode)(&self.broker, m)
    }
}

impl<T> Iterator for Receiver<T> {
    type Item = Result<T, CallError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done && self.queue.is_empty() {
            return None;
        }
        match self.get(None) {
            Err(CallError::Closed) => None,
            other => Some(other),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.broker.del_handle(self.handle);
    }
}

/// Sends values of `T` to a handle in some context: the sending half of a channel.
///
/// Dropping or [`close`](Sender::close)-ing it ends the stream. A sender that has been
/// serialized into a message belongs to the receiving side from then on: dropping the local
/// copy no longer closes anything.
pub struct Sender<T> {
    broker: Option<BrokerHandle>,
    dst: ContextId,
    handle: Handle,
    closed: AtomicBool,
    _t: PhantomData<fn(T)>,
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sender(context {} handle {})", self.dst, self.handle)
    }
}

impl<T> Sender<T> {
    pub(crate) fn new(broker: BrokerHandle, dst: ContextId, handle: Handle) -> Sender<T> {
        Sender { broker: Some(broker), dst, handle, closed: AtomicBool::new(false), _t: PhantomData }
    }

    /// The destination context.
    pub fn context_id(&self) -> ContextId {
        self.dst
    }

    /// The destination handle.
    pub fn handle(&self) -> Handle {
        self.handle
    }

    fn broker(&self) -> Result<&BrokerHandle, CallError> {
        self.broker.as_ref().ok_or(CallError::Shutdown)
    }

    /// Ends the stream: the receiver's iteration stops after the values already sent.
    pub fn close(self) -> Result<(), CallError> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<(), CallError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let b = self.broker()?;
        let m = Message::dead(self.dst, self.handle, DeadReason::SenderClosed, "sender closed");
        b.send(m).map_err(CallError::from_send)
    }
}

impl<T: Serialize + 'static> Sender<T> {
    /// Sends one value. Fails only if the stream was closed or the broker shut down; a
    /// destination that is gone makes the *receiver* fail, as with any message.
    ///
    /// [`Bytes`] travel as a raw payload: copied once here, never re-encoded or copied on
    /// the receiving side.
    pub fn send(&self, value: &T) -> Result<(), CallError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(CallError::Closed);
        }
        let (kind, data) = match (value as &dyn Any).downcast_ref::<Bytes>() {
            Some(bytes) => (Kind::Raw, bytes.0.clone()),
            None => (Kind::Value, codec::encode_value(value)?),
        };
        let b = self.broker()?;
        b.send(Message::new(self.dst, self.handle, kind, data)).map_err(CallError::from_send)
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

impl<T> Serialize for Sender<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Ownership moves with the message: this copy must not close the stream.
        self.closed.store(true, Ordering::Release);
        (self.dst, self.handle).serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for Sender<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (dst, handle) = <(ContextId, Handle)>::deserialize(d)?;
        let broker = DECODE_BROKER.with(|b| b.borrow().clone());
        let broker =
            broker.ok_or_else(|| D::Error::custom("a Sender can only be decoded by a mitogen broker"))?;
        Ok(Sender::new(broker, dst, handle))
    }
}

/// Shared readiness list of a [`Select`].
struct SelectShared {
    ready: Mutex<VecDeque<usize>>,
    cond: Condvar,
}

impl SelectShared {
    fn ready(&self, key: usize) {
        self.ready.lock().unwrap().push_back(key);
        self.cond.notify_one();
    }
}

/// Waits on several receivers at once and yields results as they arrive (scatter/gather).
pub struct Select<T> {
    shared: Arc<SelectShared>,
    receivers: Vec<Option<Receiver<T>>>,
}

impl<T> fmt::Debug for Select<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Select({} receivers)", self.receivers.len())
    }
}

impl<T> Default for Select<T> {
    fn default() -> Self {
        Select {
            shared: Arc::new(SelectShared { ready: Mutex::new(VecDeque::new()), cond: Condvar::new() }),
            receivers: Vec::new(),
        }
    }
}

impl<T> Select<T> {
    /// An empty select.
    pub fn new() -> Select<T> {
        Select::default()
    }

    /// Adds a receiver; returns the key that identifies its results.
    pub fn add(&mut self, rx: Receiver<T>) -> usize {
        let key = self.receivers.len();
        {
            let mut st = rx.queue().st.lock().unwrap();
            for _ in 0..st.items.len() {
                self.shared.ready(key);
            }
            st.watcher = Some((self.shared.clone(), key));
        }
        self.receivers.push(Some(rx));
        key
    }

    /// Number of receivers still being waited on.
    pub fn len(&self) -> usize {
        self.receivers.iter().filter(|r| r.is_some()).count()
    }

    /// True if no receiver is left.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the next result from any receiver: `(key, result)`. A receiver that yields
    /// an error (including the end of its stream) is removed from the select. Returns `None`
    /// when no receiver is left, and `Some((usize::MAX, Err(Timeout)))` on timeout.
    pub fn get(&mut self, timeout: Option<Duration>) -> Option<(usize, Result<T, CallError>)> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.is_empty() {
                return None;
            }
            let key = {
                let mut ready = self.shared.ready.lock().unwrap();
                loop {
                    if let Some(k) = ready.pop_front() {
                        break k;
                    }
                    match deadline {
                        None => ready = self.shared.cond.wait(ready).unwrap(),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                return Some((
                                    usize::MAX,
                                    Err(CallError::Timeout(timeout.unwrap_or_default())),
                                ));
                            }
                            ready = self.shared.cond.wait_timeout(ready, d - now).unwrap().0;
                        }
                    }
                }
            };
            let Some(Some(rx)) = self.receivers.get_mut(key) else { continue };
            let Some(m) = rx.queue().pop(Some(Instant::now())) else { continue };
            let r = rx.decode_msg(m);
            if r.is_err() || rx.done {
                self.receivers[key] = None;
            }
            return Some((key, r));
        }
    }
}

impl<T> Iterator for Select<T> {
    type Item = (usize, Result<T, CallError>);
    fn next(&mut self) -> Option<Self::Item> {
        self.get(None)
    }
}
