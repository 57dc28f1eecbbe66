//! [`Context`]: a cheap handle on which calls are made.

use crate::broker::BrokerHandle;
use crate::call::{self, CallError, RemoteFn};
use crate::channel::Receiver;
use crate::ids::{self, ContextId};
use crate::message::{DeadReason, Kind, Message};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A context (process) in the tree, as seen from this one.
#[derive(Clone)]
pub struct Context {
    broker: BrokerHandle,
    id: ContextId,
    name: Arc<str>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({} {:?})", self.id, self.name)
    }
}

impl Context {
    /// A handle on context `id`, reached through `broker`.
    pub fn new(broker: BrokerHandle, id: ContextId, name: impl Into<Arc<str>>) -> Context {
        Context { broker, id, name: name.into() }
    }

    /// The context id.
    pub fn id(&self) -> ContextId {
        self.id
    }

    /// The context name, e.g. `local.1.local.2`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The broker this handle sends through.
    pub fn broker(&self) -> &BrokerHandle {
        &self.broker
    }

    /// Calls `F` with `args` and waits for the result.
    ///
    /// Fails promptly if the context disconnects mid-call; never hangs on a dead context.
    pub fn call<F: RemoteFn>(&self, f: F, args: F::Args) -> Result<F::Output, CallError> {
        self.call_async(f, args)?.get(None)
    }

    /// Like [`Context::call`] with a bound on the wait.
    pub fn call_timeout<F: RemoteFn>(
        &self,
        f: F,
        args: F::Args,
        timeout: Duration,
    ) -> Result<F::Output, CallError> {
        self.call_async(f, args)?.get(Some(timeout))
    }

    /// Starts a call and returns the receiver of its single result.
    pub fn call_async<F: RemoteFn>(&self, _f: F, args: F::Args) -> Result<Receiver<F::Output>, CallError> {
        let payload = call::encode_request::<F>(&args)?;
        let rx = Receiver::with_decoder(&self.broker, false, Some(self.id), call::decode_reply::<F::Output>)?;
        let mut m = Message::new(self.id, ids::CALL_FUNCTION, Kind::Value, payload);
        m.reply_to = rx.handle();
        self.broker.send(m).map_err(CallError::from_send)?;
        Ok(rx)
    }

    /// Starts a call and does not wait for, or receive, its result. A failure is only
    /// logged in the called context.
    pub fn call_no_reply<F: RemoteFn>(&self, _f: F, args: F::Args) -> Result<(), CallError> {
        let payload = call::encode_request::<F>(&args)?;
        let m = Message::new(self.id, ids::CALL_FUNCTION, Kind::Value, payload);
        self.broker.send(m).map_err(CallError::from_send)
    }

    /// Sends a raw message to `handle` in this context.
    pub fn send(&self, handle: ids::Handle, kind: Kind, data: Vec<u8>) -> Result<(), CallError> {
        self.broker.send(Message::new(self.id, handle, kind, data)).map_err(CallError::from_send)
    }

    /// True while this context is reachable.
    pub fn is_connected(&self) -> bool {
        self.broker.is_reachable(self.id)
    }

    /// Asks the context to shut down with its subtree and waits until it has disconnected,
    /// up to `timeout`. A context that is already gone is not an error.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), CallError> {
        let mut rx: Receiver<()> = Receiver::with_respondent(&self.broker, self.id)?;
        self.broker
            .send(Message::new(self.id, ids::SHUTDOWN, Kind::Value, Vec::new()))
            .map_err(CallError::from_send)?;
        match rx.get(Some(timeout)) {
            Err(CallError::Dead { reason: DeadReason::Disconnected | DeadReason::NoRoute, .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(()) => Ok(()),
        }
    }
}
