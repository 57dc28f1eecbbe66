//! The master's [`Router`]: owns the broker and creates contexts.

use mitogen_child::{ConnectError, ConnectOptions, Method};
use mitogen_core::broker::Sink;
use mitogen_core::codec::decode_value;
use mitogen_core::ids;
use mitogen_core::logs::LogRecord;
use mitogen_core::router::Policy;
use mitogen_core::{Broker, BrokerConfig, BrokerError, BrokerHandle, Context, ContextId, Password};
use mitogen_transport_local::LocalOptions;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Settings of a master router.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouterOptions {
    /// Largest message any context of this tree sends or accepts (inherited by children).
    pub max_message_size: u32,
    /// Refuse to route between sibling subtrees (inherited by children).
    pub unidirectional: bool,
    /// Log every routed message at debug level, in every context.
    pub debug: bool,
    /// How long children get to disconnect when the router shuts down.
    pub shutdown_grace: Duration,
}

impl Default for RouterOptions {
    fn default() -> Self {
        let cfg = BrokerConfig::master();
        RouterOptions {
            max_message_size: cfg.router.max_message_size,
            unidirectional: false,
            debug: false,
            shutdown_grace: cfg.shutdown_grace,
        }
    }
}

impl RouterOptions {
    /// Sets [`RouterOptions::max_message_size`].
    pub fn max_message_size(mut self, bytes: u32) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`RouterOptions::unidirectional`].
    pub fn unidirectional(mut self, on: bool) -> Self {
        self.unidirectional = on;
        self
    }

    /// Sets [`RouterOptions::debug`].
    pub fn debug(mut self, on: bool) -> Self {
        self.debug = on;
        self
    }

    /// Sets [`RouterOptions::shutdown_grace`].
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }
}

/// The entry point of the API in the master: owns the broker thread and creates contexts.
///
/// Dropping the router shuts the whole tree down (bounded), as does [`Router::shutdown`].
#[derive(Debug)]
pub struct Router {
    broker: Broker,
    next_id: AtomicU32,
}

impl Router {
    /// A router with default options.
    pub fn new() -> Result<Router, BrokerError> {
        Router::with_options(RouterOptions::default())
    }

    /// A router with `opts`.
    pub fn with_options(opts: RouterOptions) -> Result<Router, BrokerError> {
        let mut cfg = BrokerConfig::master();
        cfg.router.max_message_size = opts.max_message_size;
        cfg.router.unidirectional = opts.unidirectional;
        cfg.debug = opts.debug;
        cfg.shutdown_grace = opts.shutdown_grace;
        let broker = Broker::start(cfg)?;
        let forward = Sink::Callback(Arc::new(|_: &BrokerHandle, m: mitogen_core::Message| {
            if let Ok(rec) = decode_value::<LogRecord>(&m.data) {
                rec.emit();
            }
        }));
        broker.handle().set_handle(ids::FORWARD_LOG, forward, Policy::Any)?;
        Ok(Router { broker, next_id: AtomicU32::new(1) })
    }

    /// The broker handle, for lower-level use.
    pub fn broker(&self) -> &BrokerHandle {
        self.broker.handle()
    }

    /// Turns on per-message debug logging here and in every context connected afterwards.
    /// The records travel to this process's `log` facade under `mitogen::*` targets.
    pub fn enable_debug(&self) {
        self.broker.handle().set_debug(true);
    }

    fn alloc_id(&self) -> ContextId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts a local child context (a copy of this program by default).
    pub fn local(&self, spec: Local) -> Result<Context, ConnectError> {
        self.connect(Method::Local(spec.opts), &spec.common, spec.via.as_ref())
    }

    /// Starts a context in another account through sudo (directly or through `via`).
    #[cfg(feature = "sudo")]
    pub fn sudo(&self, spec: Sudo) -> Result<Context, ConnectError> {
        self.connect(Method::Sudo(spec.opts), &spec.common, spec.via.as_ref())
    }

    /// Starts a context in another account through su (directly or through `via`).
    #[cfg(feature = "sudo")]
    pub fn su(&self, spec: Su) -> Result<Context, ConnectError> {
        self.connect(Method::Su(spec.opts), &spec.common, spec.via.as_ref())
    }

    /// Starts a context in another account through doas (directly or through `via`).
    #[cfg(feature = "sudo")]
    pub fn doas(&self, spec: Doas) -> Result<Context, ConnectError> {
        self.connect(Method::Doas(spec.opts), &spec.common, spec.via.as_ref())
    }

    /// Starts a context on another host through ssh (directly or through `via`).
    #[cfg(feature = "ssh")]
    pub fn ssh(&self, spec: Ssh) -> Result<Context, ConnectError> {
        self.connect(Method::Ssh(spec.opts), &spec.common, spec.via.as_ref())
    }

    /// Starts a context inside a running container (directly or through `via`).
    #[cfg(feature = "container")]
    pub fn container(&self, spec: Container) -> Result<Context, ConnectError> {
        self.connect(Method::Container(spec.opts), &spec.common, spec.via.as_ref())
    }

    /// Starts a context with any method, directly or through `via`.
    pub fn connect(
        &self,
        method: Method,
        opts: &ConnectOptions,
        via: Option<&Context>,
    ) -> Result<Context, ConnectError> {
        let id = self.alloc_id();
        match via {
            None => mitogen_child::connect(self.broker.handle(), &method, opts, id, None),
            Some(v) => mitogen_child::connect_via(v, &method, opts, id),
        }
    }

    /// Shuts the tree down: children are asked to exit, given the grace period, then cut
    /// off; every waiter wakes with an error. Later calls fail at once.
    pub fn shutdown(&self) {
        self.broker.shutdown();
    }
}

/// The builder methods every context builder shares: the image, the cache, `via`, the
/// connect timeout and the name. `$ty` has fields `opts` (with `program` and `cache`),
/// `common` and `via`.
macro_rules! common_builder {
    ($ty:ident, $($default_name:literal),+) => {
        impl $ty {
            /// Sends (or runs) `program` as the agent image instead of the current
            /// executable, for instance the static agent of `cargo xtask dist`.
            pub fn program(mut self, program: impl Into<std::path::PathBuf>) -> $ty {
                self.opts.program = Some(program.into());
                self
            }

            /// Keep the image in the target account's cache directory, so later
            /// connections send only its hash (methods that use the first stage).
            pub fn cache(mut self, on: bool) -> $ty {
                self.opts.cache = on;
                self
            }

            /// Has `ctx` make the connection itself; the new context's name is prefixed
            /// with `ctx`'s.
            pub fn via(mut self, ctx: &Context) -> $ty {
                self.via = Some(ctx.clone());
                self
            }

            /// Bound on the whole connection, login included (default 30 s).
            pub fn connect_timeout(mut self, t: Duration) -> $ty {
                self.common.connect_timeout = t;
                self
            }

            /// Probes the new context after each `interval` in which nothing came from it, and
            /// drops it (pending calls fail as disconnected) after `interval x (count + 1)`
            /// of silence: catches a peer that hangs without closing its stream. `None`
            /// turns it off. Off by default, except for containers (15 s x 3, like ssh's
            /// keepalives, which containers lack).
            pub fn heartbeat(mut self, every: Option<Duration>, count: u32) -> $ty {
                self.common.heartbeat = every.map(|i| (i, count));
                self
            }

            #[doc = concat!("Names the context instead of `", $($default_name),+, "`.")]
            pub fn name(mut self, name: impl Into<String>) -> $ty {
                self.common.name = Some(name.into());
                self
            }
        }
    };
}

/// Builder for a local context: which image, which options, and through which context.
#[derive(Debug, Clone, Default)]
pub struct Local {
    opts: LocalOptions,
    common: ConnectOptions,
    via: Option<Context>,
}

common_builder!(Local, "local.<pid>");

impl Local {
    /// A copy of the current executable, started directly by the master.
    pub fn new() -> Local {
        Local::default()
    }

    /// Adds an environment variable for the agent.
    pub fn env(mut self, key: impl Into<std::ffi::OsString>, value: impl Into<std::ffi::OsString>) -> Local {
        self.opts = self.opts.env(key, value);
        self
    }

    /// Starts the agent the way sudo and ssh do: `sh -c <first stage>`, with the image sent
    /// over the stream and executed from memory.
    pub fn through_sh(mut self, on: bool) -> Local {
        self.opts = self.opts.through_sh(on);
        self
    }

    /// Carries messages over two pipes instead of a socketpair.
    pub fn pipes(mut self, on: bool) -> Local {
        self.opts = self.opts.pipes(on);
        self
    }
}

/// Runs `f` with a fresh router and shuts the router down afterwards, also when `f` panics.
pub fn run_with_router<T>(f: impl FnOnce(&Router) -> T) -> Result<T, BrokerError> {
    let router = Router::new()?;
    let out = f(&router);
    router.shutdown();
    Ok(out)
}

/// The builder methods sudo, su and doas share, besides [`common_builder`]'s.
#[cfg(feature = "sudo")]
macro_rules! account_builder {
    ($ty:ident, $method:literal) => {
        common_builder!($ty, $method, ".<username>");

        impl $ty {
            #[doc = concat!("", $method, " to root with no password, started by the master.")]
            pub fn new() -> $ty {
                $ty::default()
            }

            /// The target account.
            pub fn username(mut self, user: impl Into<String>) -> $ty {
                self.opts.username = user.into();
                self
            }

            #[doc = concat!("The password to answer ", $method, "'s prompt with (never logged).")]
            pub fn password(mut self, password: impl Into<Password>) -> $ty {
                self.opts.password = Some(password.into());
                self
            }

            #[doc = concat!("More arguments for ", $method, ".")]
            pub fn extra_args(mut self, args: Vec<String>) -> $ty {
                self.opts.extra_args = args;
                self
            }

            /// Carry messages over pipes instead of a socketpair.
            pub fn pipes(mut self, on: bool) -> $ty {
                self.opts.pipes = on;
                self
            }
        }
    };
}
/// Builder for a sudo context: which account, how to authenticate, through which context.
#[cfg(feature = "sudo")]
#[derive(Debug, Clone, Default)]
pub struct Sudo {
    opts: mitogen_transport_sudo::SudoOptions,
    common: ConnectOptions,
    via: Option<Context>,
}

#[cfg(feature = "sudo")]
account_builder!(Sudo, "sudo");

#[cfg(feature = "sudo")]
impl Sudo {
    /// `-E`: keep the environment.
    pub fn preserve_env(mut self, on: bool) -> Sudo {
        self.opts.preserve_env = on;
        self
    }

    /// `-H`: set `HOME` to the target's.
    pub fn set_home(mut self, on: bool) -> Sudo {
        self.opts.set_home = on;
        self
    }

    /// `-i`: run the target's login shell and profile.
    pub fn login(mut self, on: bool) -> Sudo {
        self.opts.login = on;
        self
    }

    /// `-r` / `-t`: SELinux role and type.
    pub fn selinux(mut self, role: Option<String>, kind: Option<String>) -> Sudo {
        self.opts.selinux_role = role;
        self.opts.selinux_type = kind;
        self
    }

    /// The sudo program to run.
    pub fn sudo_path(mut self, path: impl Into<std::path::PathBuf>) -> Sudo {
        self.opts.sudo_path = path.into();
        self
    }

    /// Give sudo a terminal even without a password or a login shell. Not needed for
    /// `requiretty` accounts: a start sudo refuses for want of one is made again with one.
    pub fn tty(mut self, on: bool) -> Sudo {
        self.opts.tty = on;
        self
    }
}

/// Builder for a su context (util-linux su or compatible).
#[cfg(feature = "sudo")]
#[derive(Debug, Clone, Default)]
pub struct Su {
    opts: mitogen_transport_sudo::SuOptions,
    common: ConnectOptions,
    via: Option<Context>,
}

#[cfg(feature = "sudo")]
account_builder!(Su, "su");

#[cfg(feature = "sudo")]
impl Su {
    /// `-l`: a login shell, profiles run.
    pub fn login(mut self, on: bool) -> Su {
        self.opts.login = on;
        self
    }

    /// The su program to run.
    pub fn su_path(mut self, path: impl Into<std::path::PathBuf>) -> Su {
        self.opts.su_path = path.into();
        self
    }

    /// Texts that end the password prompt (any case), replacing the defaults.
    pub fn password_prompts(mut self, texts: Vec<String>) -> Su {
        self.opts.password_prompts = texts;
        self
    }

    /// Texts that mean the password was wrong, replacing the defaults.
    pub fn incorrect_prompts(mut self, texts: Vec<String>) -> Su {
        self.opts.incorrect_prompts = texts;
        self
    }
}

/// Builder for a doas context (OpenBSD doas or OpenDoas).
#[cfg(feature = "sudo")]
#[derive(Debug, Clone, Default)]
pub struct Doas {
    opts: mitogen_transport_sudo::DoasOptions,
    common: ConnectOptions,
    via: Option<Context>,
}

#[cfg(feature = "sudo")]
account_builder!(Doas, "doas");

#[cfg(feature = "sudo")]
impl Doas {
    /// The doas program to run.
    pub fn doas_path(mut self, path: impl Into<std::path::PathBuf>) -> Doas {
        self.opts.doas_path = path.into();
        self
    }

    /// Texts that end the password prompt (any case), replacing the defaults.
    pub fn password_prompts(mut self, texts: Vec<String>) -> Doas {
        self.opts.password_prompts = texts;
        self
    }

    /// Texts that mean the password was wrong, replacing the defaults.
    pub fn incorrect_prompts(mut self, texts: Vec<String>) -> Doas {
        self.opts.incorrect_prompts = texts;
        self
    }
}

/// Builder for an ssh context: which host and account, how to authenticate, through which
/// context. Paths (identity, known hosts) are on the host that runs ssh.
#[cfg(feature = "ssh")]
#[derive(Debug, Clone, Default)]
pub struct Ssh {
    opts: mitogen_transport_ssh::SshOptions,
    common: ConnectOptions,
    via: Option<Context>,
}

#[cfg(feature = "ssh")]
common_builder!(Ssh, "ssh.<hostname>");

#[cfg(feature = "ssh")]
impl Ssh {
    /// A connection to `hostname` (a name, an address or an ssh config `Host` alias).
    pub fn new(hostname: impl Into<String>) -> Ssh {
        Ssh { opts: mitogen_transport_ssh::SshOptions::new(hostname), ..Default::default() }
    }

    /// The remote account.
    pub fn username(mut self, user: impl Into<String>) -> Ssh {
        self.opts.username = Some(user.into());
        self
    }

    /// The port.
    pub fn port(mut self, port: u16) -> Ssh {
        self.opts.port = Some(port);
        self
    }

    /// The private key to log in with.
    pub fn identity_file(mut self, path: impl Into<std::path::PathBuf>) -> Ssh {
        self.opts.identity_file = Some(path.into());
        self
    }

    /// Only the given identity, not the agent's or the default keys.
    pub fn identities_only(mut self, on: bool) -> Ssh {
        self.opts.identities_only = on;
        self
    }

    /// Host-key checking (default: enforce).
    pub fn check_host_keys(mut self, policy: mitogen_transport_ssh::HostKeyPolicy) -> Ssh {
        self.opts.check_host_keys = policy;
        self
    }

    /// A known-hosts file instead of the user's.
    pub fn known_hosts_file(mut self, path: impl Into<std::path::PathBuf>) -> Ssh {
        self.opts.known_hosts_file = Some(path.into());
        self
    }

    /// The password for password authentication (never logged).
    pub fn password(mut self, password: impl Into<Password>) -> Ssh {
        self.opts.password = Some(password.into());
        self
    }

    /// The ssh client: [`SshBackend::OpenSsh`](crate::SshBackend::OpenSsh) (default) or
    /// [`SshBackend::Libssh2`](crate::SshBackend::Libssh2) (cargo feature `libssh2`, in
    /// process; the ssh configuration, `ssh_path`, `extra_args` and `ssh_debug_level` do
    /// not apply to it). Connecting fails with [`crate::ConnectError::Start`] where the
    /// connecting context's program was built without the backend.
    pub fn backend(mut self, backend: crate::SshBackend) -> Ssh {
        self.opts.backend = backend;
        self
    }

    /// ssh compression (off by default).
    pub fn compression(mut self, on: bool) -> Ssh {
        self.opts.compression = on;
        self
    }

    /// Keepalive probes every `interval`, giving up after `count` unanswered ones;
    /// `None` turns them off.
    pub fn keepalive(mut self, interval: Option<Duration>, count: u32) -> Ssh {
        self.opts.keepalive_interval = interval;
        self.opts.keepalive_count = count;
        self
    }

    /// More arguments for ssh, before the host name.
    pub fn extra_args(mut self, args: Vec<String>) -> Ssh {
        self.opts.extra_args = args;
        self
    }

    /// The ssh program to run.
    pub fn ssh_path(mut self, path: impl Into<std::path::PathBuf>) -> Ssh {
        self.opts.ssh_path = path.into();
        self
    }

    /// ssh's `-v` level (0 to 3); its output is logged under the new context's name.
    pub fn ssh_debug_level(mut self, level: u8) -> Ssh {
        self.opts.ssh_debug_level = level;
        self
    }
}

/// Builder for a container context: `docker exec` (or `podman exec`) into a running
/// container on the host of the context that connects.
#[cfg(feature = "container")]
#[derive(Debug, Clone, Default)]
pub struct Container {
    opts: mitogen_transport_container::ContainerOptions,
    common: ConnectOptions,
    via: Option<Context>,
}

#[cfg(feature = "container")]
common_builder!(Container, "docker.<container>");

/// A container exec has no keepalive of its own: a paused container would hang calls.
#[cfg(feature = "container")]
fn container_common() -> ConnectOptions {
    let mut common = ConnectOptions::default();
    common.heartbeat = Some((Duration::from_secs(15), 3));
    common
}

#[cfg(feature = "container")]
impl Container {
    /// `docker exec` into `container` (a name or id).
    pub fn docker(container: impl Into<String>) -> Container {
        let opts = mitogen_transport_container::ContainerOptions::new(
            mitogen_transport_container::Runtime::Docker,
            container,
        );
        Container { opts, common: container_common(), via: None }
    }

    /// `podman exec` into `container` (a name or id).
    pub fn podman(container: impl Into<String>) -> Container {
        let opts = mitogen_transport_container::ContainerOptions::new(
            mitogen_transport_container::Runtime::Podman,
            container,
        );
        Container { opts, common: container_common(), via: None }
    }

    /// The account inside the container (`-u`).
    pub fn username(mut self, user: impl Into<String>) -> Container {
        self.opts.username = Some(user.into());
        self
    }

    /// The runtime's client program.
    pub fn runtime_path(mut self, path: impl Into<std::path::PathBuf>) -> Container {
        self.opts.runtime_path = Some(path.into());
        self
    }

    /// More arguments for `exec`.
    pub fn extra_args(mut self, args: Vec<String>) -> Container {
        self.opts.extra_args = args;
        self
    }
}
