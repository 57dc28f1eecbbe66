//! The function [`Registry`] and the dispatcher that runs calls in the agent.

use mitogen_core::call::{decode_request_name, RemoteErrorKind};
use mitogen_core::channel::decode_with;
use mitogen_core::codec::encode_value;
use mitogen_core::{BrokerError, BrokerHandle, Kind, Message, RemoteError, RemoteFn};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

type Entry = Box<dyn Fn(&BrokerHandle, &[u8]) -> Result<Vec<u8>, RemoteError> + Send + Sync>;

/// The functions an agent can run, by stable name.
#[derive(Default)]
pub struct Registry {
    fns: HashMap<&'static str, Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.fns.keys().collect();
        names.sort();
        f.debug_struct("Registry").field("functions", &names).finish()
    }
}

impl Registry {
    /// A registry holding the built-in functions ([`crate::builtins`]).
    pub fn new() -> Registry {
        crate::builtins::register(Registry::empty())
    }

    /// A registry with no functions at all.
    pub fn empty() -> Registry {
        Registry::default()
    }

    /// Registers `F` under [`RemoteFn::NAME`].
    pub fn register<F: RemoteFn>(mut self, _f: F) -> Registry {
        let entry: Entry = Box::new(|b, args| {
            let args: F::Args = decode_with(b, args).map_err(|e| RemoteError {
                kind: RemoteErrorKind::BadArguments,
                type_name: std::any::type_name::<F::Args>().into(),
                message: e.to_string(),
                backtrace: String::new(),
                context: String::new(),
            })?;
            let out = F::run(args)?;
            encode_value(&Ok::<&F::Output, RemoteError>(&out)).map_err(|e| RemoteError {
                kind: RemoteErrorKind::Failed,
                type_name: std::any::type_name::<F::Output>().into(),
                message: format!("cannot encode the result: {e}"),
                backtrace: String::new(),
                context: String::new(),
            })
        });
        self.fns.insert(F::NAME, entry);
        self
    }

    /// True if a function is registered under `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.fns.contains_key(name)
    }

    /// Runs one CALL_FUNCTION message and sends its reply (if one is wanted).
    pub(crate) fn dispatch(&self, b: &BrokerHandle, context_name: &str, m: Message) {
        let result = self.run(b, &m.data);
        let payload = match result {
            Ok(p) => p,
            Err(mut e) => {
                e.context = context_name.to_string();
                if m.reply_to == mitogen_core::ids::NO_REPLY {
                    log::error!("call_no_reply failed: {e}");
                }
                encode_value(&Err::<(), RemoteError>(e)).expect("a RemoteError always encodes")
            }
        };
        if m.reply_to == mitogen_core::ids::NO_REPLY {
            return;
        }
        match b.send(m.reply(Kind::Value, payload)) {
            Ok(()) => {}
            // The caller must not wait forever for a reply that cannot leave: it gets
            // this error instead (small, so it always fits).
            Err(BrokerError::TooLarge { len, max }) => {
                let e = RemoteError {
                    kind: RemoteErrorKind::ResultTooLarge { len: len as u64, max },
                    type_name: "ResultTooLarge".into(),
                    message: format!("the result is {len} bytes, more than max_message_size ({max} bytes)"),
                    backtrace: String::new(),
                    context: context_name.to_string(),
                };
                let payload = encode_value(&Err::<(), RemoteError>(e)).expect("a RemoteError always encodes");
                if let Err(e) = b.send(m.reply(Kind::Value, payload)) {
                    log::error!("cannot reply to a call: {e}");
                }
            }
            // Shutting down: the caller is woken by the disconnect.
            Err(e) => log::debug!("cannot reply to a call: {e}"),
        }
    }

    fn run(&self, b: &BrokerHandle, payload: &[u8]) -> Result<Vec<u8>, RemoteError> {
        let (name, args) = decode_request_name(payload).map_err(|e| RemoteError {
            kind: RemoteErrorKind::BadArguments,
            type_name: "request".into(),
            message: e.to_string(),
            backtrace: String::new(),
            context: String::new(),
        })?;
        let Some(f) = self.fns.get(name.as_str()) else {
            return Err(RemoteError {
                kind: RemoteErrorKind::UnknownFunction,
                type_name: "UnknownFunction".into(),
                message: format!("no function named {name:?} is registered in this agent"),
                backtrace: String::new(),
                context: String::new(),
            });
        };
        match catch_unwind(AssertUnwindSafe(|| f(b, args))) {
            Ok(r) => r,
            Err(payload) => {
                let message = if let Some(s) = payload.downcast_ref::<&str>() {
                    s.to_string()
                } else if let Some(s) = payload.downcast_ref::<String>() {
                    s.clone()
                } else {
                    "panic with a non-string payload".into()
                };
                let backtrace = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_default();
                Err(RemoteError {
                    kind: RemoteErrorKind::Panicked,
                    type_name: "panic".into(),
                    message,
                    backtrace,
                    context: String::new(),
                })
            }
        }
    }
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Keeps the backtrace of the last panic for the dispatcher instead of printing it.
pub(crate) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let bt = std::backtrace::Backtrace::force_capture().to_string();
        log::debug!("panic in agent: {info}");
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{info}\n{bt}")));
    }));
}
