//! Remote calls: the [`RemoteFn`] trait, [`CallError`], [`RemoteError`] and the encoding of
//! CALL_FUNCTION requests and replies.
//!
//! A request payload is the bincode encoding of the function name followed by the bincode
//! encoding of its argument tuple, in one buffer (no double encoding of large arguments).
//! The reply is the encoding of `Result<Output, RemoteError>`.

use crate::codec::{self, CodecError};
use crate::message::DeadReason;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// A function that can be called in another context.
///
/// Implement it with [`crate::remote_fn!`] rather than by hand. The implementing type is a
/// zero-sized marker used on the calling side (`ctx.call(echo, (data,))`), so arguments and
/// results are checked at compile time; the agent registers the same type to run it.
pub trait RemoteFn: Send + Sync + 'static {
    /// Stable name the function is registered and called under.
    const NAME: &'static str;
    /// Argument tuple.
    type Args: Serialize + DeserializeOwned + Send;
    /// Success value.
    type Output: Serialize + DeserializeOwned + Send;
    /// Runs the function in the agent.
    fn run(args: Self::Args) -> Result<Self::Output, RemoteError>;
}

/// What failed in a remote call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RemoteErrorKind {
    /// The function returned an error.
    Failed,
    /// The function panicked.
    Panicked,
    /// No function is registered under that name in the agent.
    UnknownFunction,
    /// The arguments did not decode as the function's argument type.
    BadArguments,
    /// The function ran, but its encoded result is larger than `max_message_size`, so it
    /// could not be sent back.
    ResultTooLarge {
        /// Size of the encoded result.
        len: u64,
        /// The limit.
        max: u32,
    },
}

/// An error raised in another context, carried back to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// What kind of failure it was.
    pub kind: RemoteErrorKind,
    /// Rust type name of the remote error (or `panic`).
    pub type_name: String,
    /// The error's message (its `Display`, with its `source` chain).
    pub message: String,
    /// Backtrace captured where the error was converted or the panic happened.
    pub backtrace: String,
    /// Name of the context the error happened in, e.g. `local.1.local.2`.
    pub context: String,
}

impl RemoteError {
    /// Builds a remote error from any error value, capturing a backtrace.
    pub fn from_error<E: std::error::Error>(e: E) -> RemoteError {
        let mut message = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        RemoteError {
            kind: RemoteErrorKind::Failed,
            type_name: std::any::type_name::<E>().to_string(),
            message,
            backtrace: std::backtrace::Backtrace::force_capture().to_string(),
            context: String::new(),
        }
    }

    /// Builds a remote error from a plain message.
    pub fn msg(message: impl Into<String>) -> RemoteError {
        RemoteError {
            kind: RemoteErrorKind::Failed,
            type_name: "message".into(),
            message: message.into(),
            backtrace: std::backtrace::Backtrace::force_capture().to_string(),
            context: String::new(),
        }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            RemoteErrorKind::Failed => "error",
            RemoteErrorKind::Panicked => "panic",
            RemoteErrorKind::UnknownFunction => "unknown function",
            RemoteErrorKind::BadArguments => "bad arguments",
            RemoteErrorKind::ResultTooLarge { .. } => "result too large",
        };
        write!(f, "{what} in context {}: {}: {}", self.context, self.type_name, self.message)
    }
}

/// Why a call, or a receive on a channel, did not produce a value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The remote function failed, panicked, was unknown, or refused its arguments.
    #[error("{0}")]
    Remote(RemoteError),
    /// A message this context was about to send (the arguments, a value on a channel) is
    /// larger than `max_message_size`; nothing was sent.
    #[error("message too large ({len} bytes, max {max} bytes)")]
    TooLarge {
        /// Size of the encoded message.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A dead message came back: no route, refused, disconnected, too large...
    #[error("{reason}: {message}")]
    Dead {
        /// Why the message was dead.
        reason: DeadReason,
        /// The text the router that produced it gave.
        message: String,
    },
    /// The sending side closed the channel (the normal end of a stream).
    #[error("the channel was closed by its sender")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A value could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The local broker has shut down.
    #[error("the broker has shut down")]
    Shutdown,
}

impl CallError {
    pub(crate) fn from_dead(reason: DeadReason, message: String) -> CallError {
        match reason {
            DeadReason::SenderClosed => CallError::Closed,
            DeadReason::BrokerExited if message == "broker has exited" => CallError::Shutdown,
            _ => CallError::Dead { reason, message },
        }
    }

    /// Maps a failed local send.
    pub(crate) fn from_send(e: crate::broker::BrokerError) -> CallError {
        match e {
            crate::broker::BrokerError::TooLarge { len, max } => CallError::TooLarge { len: len as u64, max },
            _ => CallError::Shutdown,
        }
    }

    /// The remote error, if this is one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            CallError::Remote(r) => Some(r),
            _ => None,
        }
    }

    /// The dead-message reason, if this is one.
    pub fn dead_reason(&self) -> Option<DeadReason> {
        match self {
            CallError::Dead { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// Encodes a CALL_FUNCTION payload for `F` with `args`.
pub fn encode_request<F: RemoteFn>(args: &F::Args) -> Result<Vec<u8>, CodecError> {
    let mut out = codec::encode_value(F::NAME)?;
    codec::encode_value_into(args, &mut out)?;
    Ok(out)
}

/// Splits a CALL_FUNCTION payload into the function name and the encoded arguments.
pub fn decode_request_name(payload: &[u8]) -> Result<(String, &[u8]), CodecError> {
    let (name, used) = codec::decode_prefix::<String>(payload)?;
    Ok((name, &payload[used..]))
}

/// Decodes a reply payload: `Result<T, RemoteError>`.
pub(crate) fn decode_reply<T: DeserializeOwned>(
    b: &crate::broker::BrokerHandle,
    m: crate::message::Message,
) -> Result<T, CallError> {
    if let Some((reason, text)) = m.dead_reason() {
        return Err(CallError::from_dead(reason, text));
    }
    match crate::channel::decode_with::<Result<T, RemoteError>>(b, &m.data)? {
        Ok(v) => Ok(v),
        Err(e) => Err(CallError::Remote(e)),
    }
}

/// Declares a function callable in other contexts.
///
/// ```
/// mitogen_core::remote_fn! {
///     /// Adds two numbers.
///     pub fn add(a: i64, b: i64) -> i64 { a + b }
/// }
/// mitogen_core::remote_fn! {
///     /// Reads a file; errors travel back as `CallError::Remote`.
///     pub fn read_file(path: String) -> Result<Vec<u8>, std::io::Error> { std::fs::read(path) }
/// }
/// use mitogen_core::RemoteFn;
/// assert_eq!(add::run((2, 3)).unwrap(), 5);
/// assert!(read_file::NAME.ends_with("read_file"));
/// ```
///
/// This defines a zero-sized type named after the function implementing [`RemoteFn`];
/// callers write `ctx.call(add, (2, 3))` and agents register `add`.
#[macro_export]
macro_rules! remote_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> Result<$ok:ty, $err:ty> $body:block) => {
        $(#[$meta])*
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, Default)]
        $vis struct $name;
        impl $crate::RemoteFn for $name {
            const NAME: &'static str = concat!(module_path!(), "::", stringify!($name));
            type Args = ($($ty,)*);
            type Output = $ok;
            #[allow(unused_variables, clippy::unused_unit)]
            fn run(args: Self::Args) -> ::std::result::Result<$ok, $crate::RemoteError> {
                fn inner($($arg: $ty),*) -> ::std::result::Result<$ok, $err> $body
                let ($($arg,)*) = args;
                inner($($arg),*).map_err($crate::RemoteError::from_error)
            }
        }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, Default)]
        $vis struct $name;
        impl $crate::RemoteFn for $name {
            const NAME: &'static str = concat!(module_path!(), "::", stringify!($name));
            type Args = ($($ty,)*);
            type Output = $ret;
            #[allow(unused_variables, clippy::unused_unit)]
            fn run(args: Self::Args) -> ::std::result::Result<$ret, $crate::RemoteError> {
                fn inner($($arg: $ty),*) -> $ret $body
                let ($($arg,)*) = args;
                Ok(inner($($arg),*))
            }
        }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $crate::remote_fn!($(#[$meta])* $vis fn $name($($arg: $ty),*) -> () $body);
    };
}
