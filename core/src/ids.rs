//! Context ids and message handles, including the well-known handle numbers.

/// Identifies one context (process) in the tree. The master is always [`MASTER_ID`].
pub type ContextId = u32;

/// Identifies a message sink inside one context.
pub type Handle = u32;

/// The master's context id.
pub const MASTER_ID: ContextId = 0;

/// `reply_to` value meaning "no reply is wanted".
pub const NO_REPLY: Handle = 0;

/// Runs a registered function; needs parent authority.
pub const CALL_FUNCTION: Handle = 101;
/// Log records and captured stdio travelling up to the master.
pub const FORWARD_LOG: Handle = 102;
/// Announces a new context reachable through the sending stream.
pub const ADD_ROUTE: Handle = 103;
/// Announces that a context is gone.
pub const DEL_ROUTE: Handle = 104;
/// Asks the parent for a block of context ids (reserved; ids are allocated by the master).
pub const ALLOCATE_ID: Handle = 105;
/// Asks a context to shut down with its subtree; needs parent authority.
pub const SHUTDOWN: Handle = 106;
/// Reserved for detaching contexts.
pub const DETACHING: Handle = 109;
/// Reserved for services.
pub const CALL_SERVICE: Handle = 110;
/// Liveness probe between neighbours: payload `[0]` asks, `[1]` answers. The router answers
/// probes itself, so a context whose broker thread runs answers even while its user
/// threads are busy; see `BrokerHandle::heartbeat`.
pub const HEARTBEAT: Handle = 111;
/// First message on a new stream, from parent to child: the child's configuration.
pub const BOOTSTRAP: Handle = 120;
/// The child's answer to [`BOOTSTRAP`]: build id and pid.
pub const HELLO: Handle = 121;
/// Asks a context to connect a new child itself (the `via` mechanism); needs parent authority.
pub const CONNECT: Handle = 122;

/// Reply handles are allocated from here upward; lower numbers are well-known.
pub const FIRST_REPLY_HANDLE: Handle = 1000;
