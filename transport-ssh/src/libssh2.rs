//! The libssh2 backend (cargo feature `libssh2`): ssh in-process through the `ssh2` crate,
//! with no ssh program needed.
//!
//! [`Libssh2Transport::start`] connects, checks the host key, logs in and starts the sh
//! first stage on the connecting thread (blocking, bounded by the connect deadline). The
//! session then turns non-blocking and becomes a [`Pump`]: a [`Driver`] the broker thread
//! polls, which moves bytes between the channel and one end of a socketpair whose other end
//! is an ordinary broker stream. Session and channel are only ever touched on the broker
//! thread after that. The channel's stderr goes to a socketpair that the broker logs, like ssh's
//! stderr with the OpenSSH backend.
//!
//! The user's ssh configuration does not apply (libssh2 does not read it): options are
//! taken as given, and the defaults are OpenSSH's (port 22, the local user name,
//! `~/.ssh/known_hosts`, the agent and then `~/.ssh/id_{ed25519,ecdsa,rsa}`).

use crate::{HostKeyPolicy, SshOptions};
use mitogen_core::broker::{Driver, Interest, Wants};
use mitogen_core::transport::{Bootstrap, Connection, LoginError, StartError, Transport};
use mitogen_transport_local::bootstrap::{exec_sh, random_token, FirstStage};
use mitogen_transport_local::{socketpair, SELF_EXE};
use ssh2::{BlockDirections, CheckResult, ErrorCode, KnownHostFileKind, Session};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `LIBSSH2_ERROR_TIMEOUT`: a blocking call outlived the session timeout.
const ERROR_TIMEOUT: i32 = -9;
/// Bytes buffered per direction before the pump stops reading that side.
const BUF_CAP: usize = 256 * 1024;
/// Stderr bytes kept while the log reader is behind; beyond that they are dropped.
const DIAG_CAP: usize = 64 * 1024;

/// The ssh transport through libssh2.
#[derive(Debug, Clone)]
pub struct Libssh2Transport {
    opts: SshOptions,
    arg0: String,
    image_hash: String,
}

impl Libssh2Transport {
    /// A transport for `opts`; `arg0` is what `ps` shows for the agent; `image_hash` is the
    /// image's build id (the first stage's cache key).
    pub fn new(opts: SshOptions, arg0: impl Into<String>, image_hash: impl Into<String>) -> Libssh2Transport {
        Libssh2Transport { opts, arg0: arg0.into(), image_hash: image_hash.into() }
    }
}

fn login(error: LoginError, line: impl Into<String>) -> StartError {
    StartError::Login { error, output: vec![line.into()] }
}

/// Milliseconds left until `deadline` (at least 1: libssh2 reads 0 as "no timeout").
fn ms_left(deadline: Instant) -> u32 {
    deadline.saturating_duration_since(Instant::now()).as_millis().clamp(1, u32::MAX as u128) as u32
}

/// `Some` typed timeout if `e` is libssh2's session timeout (the connect deadline).
fn timed_out(e: &ssh2::Error, host: &str, what: &str) -> Option<StartError> {
    (e.code() == ErrorCode::Session(ERROR_TIMEOUT)).then(|| {
        login(
            LoginError::ConnectTimedOut { host: host.into() },
            format!("libssh2: {what} with {host} timed out"),
        )
    })
}

/// A libssh2 failure while connecting: a typed timeout, else an I/O error naming the step.
fn failed(e: ssh2::Error, host: &str, what: &str) -> StartError {
    timed_out(&e, host, what).unwrap_or_else(|| {
        StartError::Io(io::Error::other(format!("libssh2: {what} with {host} failed: {e}")))
    })
}

impl Transport for Libssh2Transport {
    fn method(&self) -> &'static str {
        "ssh"
    }

    fn start(&mut self, deadline: Instant) -> Result<Connection, StartError> {
        let o = &self.opts;
        o.check_hostname()?;
        let host = o.hostname.as_str();
        let port = o.port.unwrap_or(22);
        let tcp = connect_tcp(host, port, o.connect_timeout, deadline)?;
        let tcp_fd = tcp.as_raw_fd();
        let mut session = Session::new().map_err(|e| StartError::Io(e.into()))?;
        session.set_compress(o.compression);
        session.set_timeout(ms_left(deadline));
        session.set_tcp_stream(tcp);
        session.handshake().map_err(|e| {
            timed_out(&e, host, "the banner exchange").unwrap_or_else(|| {
                login(
                    LoginError::Refused { method: "ssh", line: format!("handshake failed: {}", e.message()) },
                    format!("libssh2: handshake with {host} port {port} failed: {e}"),
                )
            })
        })?;
        check_host_key(&session, o, host, port)?;
        let user = match &o.username {
            Some(u) => u.clone(),
            None => local_user()
                .ok_or_else(|| StartError::Options("no username and no local user name".into()))?,
        };
        authenticate(&session, o, &user, host, deadline)?;
        session.set_timeout(ms_left(deadline));
        let mut channel =
            session.channel_session().map_err(|e| failed(e, host, "opening a session channel"))?;
        let stage = FirstStage {
            token: random_token(),
            hash: self.image_hash.clone(),
            argv0: self.arg0.clone(),
            cache: o.cache,
            handover: false,
        };
        channel.exec(&exec_sh(&stage.script())).map_err(|e| failed(e, host, "starting the first stage"))?;
        let keepalive = o.keepalive_interval.map(|i| {
            let secs = i.as_secs().clamp(1, u32::MAX as u64) as u32;
            session.set_keepalive(true, secs);
            (Duration::from_secs(secs.into()), o.keepalive_count.max(1))
        });
        session.set_blocking(false);
        // The stream and stderr both cross socketpairs: plain sockets for the broker's
        // readers, `UnixStream`s on the pump's side (non-blocking).
        let (ours, theirs) = socketpair()?;
        let (diag_r, diag_w) = socketpair()?;
        let (local, diag) = (UnixStream::from(theirs), UnixStream::from(diag_w));
        local.set_nonblocking(true)?;
        diag.set_nonblocking(true)?;
        let now = Instant::now();
        let pump = Pump {
            name: format!("libssh2 {host}"),
            session,
            channel,
            tcp_fd,
            local,
            diag,
            diag_open: true,
            to_ssh: Buf::new(BUF_CAP),
            from_ssh: Buf::new(BUF_CAP),
            stderr: Buf::new(DIAG_CAP),
            local_eof: false,
            remote_eof: false,
            keepalive,
            next_keepalive: now,
            last_heard: now,
        };
        Ok(Connection {
            write: ours.try_clone()?,
            read: ours,
            diag: Some(diag_r),
            process: None,
            description: format!("libssh2 {host}"),
            bootstrap: Bootstrap::FirstStage {
                token: stage.token,
                image: o.program.clone().unwrap_or_else(|| PathBuf::from(SELF_EXE)),
                cache: o.cache,
                handover: false,
            },
            dialogue: None,
            driver: Some(Box::new(pump)),
        })
    }
}

/// Connects to the first address of `host` that answers, within `timeout` (else what is
/// left until `deadline`).
fn connect_tcp(
    host: &str,
    port: u16,
    timeout: Option<Duration>,
    deadline: Instant,
) -> Result<TcpStream, StartError> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            login(
                LoginError::Refused { method: "ssh", line: format!("cannot resolve {host}: {e}") },
                format!("ssh: Could not resolve hostname {host}: {e}"),
            )
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        let t = timeout.map_or(left, |t| t.min(left)).max(Duration::from_millis(1));
        match TcpStream::connect_timeout(&a, t) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    let line = format!("ssh: connect to host {host} port {port}: {last}");
    Err(match last.kind() {
        io::ErrorKind::ConnectionRefused => login(LoginError::ConnectionRefused { host: host.into() }, line),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            login(LoginError::ConnectTimedOut { host: host.into() }, line)
        }
        _ => login(LoginError::Refused { method: "ssh", line: line.clone() }, line),
    })
}

/// Checks the host key against known_hosts under `o.check_host_keys`; `Accept` appends a
/// new key to the file (never rewriting lines libssh2 could not parse).
fn check_host_key(session: &Session, o: &SshOptions, host: &str, port: u16) -> Result<(), StartError> {
    if o.check_host_keys == HostKeyPolicy::Ignore {
        return Ok(());
    }
    let (key, kind) = session.host_key().ok_or_else(|| StartError::Io(io::Error::other("no host key")))?;
    let path = match &o.known_hosts_file {
        Some(p) => p.clone(),
        None => home_dir().join(".ssh/known_hosts"),
    };
    let mut kh = session.known_hosts().map_err(|e| StartError::Io(e.into()))?;
    if let Ok(text) = std::fs::read_to_string(&path) {
        // Line by line: one line libssh2 cannot parse (a marker, a new key type) must
        // not hide the others.
        for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
            let _ = kh.read_str(line, KnownHostFileKind::OpenSSH);
        }
    }
    match kh.check_port(host, port, key) {
        CheckResult::Match => Ok(()),
        CheckResult::Mismatch => Err(login(
            LoginError::HostKeyChanged { host: host.into() },
            format!(
                "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! (host {host}, known hosts {})",
                path.display()
            ),
        )),
        CheckResult::NotFound if o.check_host_keys == HostKeyPolicy::Accept => {
            let entry = if port == 22 { host.to_string() } else { format!("[{host}]:{port}") };
            kh.add(&entry, key, "", kind.into()).map_err(|e| StartError::Io(e.into()))?;
            let added = kh.iter().map_err(|e| StartError::Io(e.into()))?;
            let line = added
                .last()
                .map(|h| kh.write_string(h, KnownHostFileKind::OpenSSH))
                .transpose()
                .map_err(|e| StartError::Io(e.into()))?
                .unwrap_or_default();
            append_line(&path, &line).map_err(|e| {
                StartError::Io(io::Error::new(
                    e.kind(),
                    format!("cannot record the host key in {}: {e}", path.display()),
                ))
            })?;
            log::info!("ssh: permanently added {entry} to {}", path.display());
            Ok(())
        }
        CheckResult::NotFound => Err(login(
            LoginError::HostKeyUnknown { host: host.into() },
            format!("No {kind:?} host key is known for {host} and you have requested strict checking."),
        )),
        CheckResult::Failure => Err(StartError::Io(io::Error::other(format!(
            "cannot check the host key of {host} against {}",
            path.display()
        )))),
    }
}

fn append_line(path: &Path, line: &str) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let line = line.trim_end();
    writeln!(f, "{line}")
}

/// Logs in as OpenSSH would: the identity file, then (unless `identities_only`) every agent
/// identity and the default key files, then the password. A password is sent at most once.
fn authenticate(
    session: &Session,
    o: &SshOptions,
    user: &str,
    host: &str,
    deadline: Instant,
) -> Result<(), StartError> {
    session.set_timeout(ms_left(deadline));
    let methods = session.auth_methods(user).map_err(|e| failed(e, host, "the login"))?.to_string();
    if session.authenticated() {
        return Ok(());
    }
    let offers = |m: &str| methods.split(',').any(|x| x == m);
    let mut tried: Vec<String> = Vec::new();
    if offers("publickey") {
        let mut keys: Vec<PathBuf> = o.identity_file.iter().cloned().collect();
        if !o.identities_only {
            if let Ok(mut agent) = session.agent() {
                if agent.connect().is_ok() && agent.list_identities().is_ok() {
                    for id in agent.identities().unwrap_or_default() {
                        if agent.userauth(user, &id).is_ok() {
                            return Ok(());
                        }
                        tried.push(format!("agent key {}", id.comment()));
                    }
                }
                let _ = agent.disconnect();
            }
            let ssh_dir = home_dir().join(".ssh");
            keys.extend(
                ["id_ed25519", "id_ecdsa", "id_rsa"].iter().map(|k| ssh_dir.join(k)).filter(|p| p.exists()),
            );
        }
        for key in keys {
            match session.userauth_pubkey_file(user, None, &key, None) {
                Ok(()) if session.authenticated() => return Ok(()),
                Ok(()) => {}
                Err(e) => {
                    if let Some(t) = timed_out(&e, host, "the login") {
                        return Err(t);
                    }
                    log::debug!("ssh {host}: key {} not accepted: {}", key.display(), e.message());
                }
            }
            tried.push(key.display().to_string());
        }
    }
    let denied = format!("{user}@{host}: Permission denied ({methods}).");
    match &o.password {
        Some(pw) if offers("password") || offers("keyboard-interactive") => {
            let r = if offers("password") {
                session.userauth_password(user, pw.expose())
            } else {
                session.userauth_keyboard_interactive(user, &mut Answer(pw.expose().to_string()))
            };
            match r {
                Ok(()) if session.authenticated() => Ok(()),
                Err(e) => Err(timed_out(&e, host, "the login")
                    .unwrap_or_else(|| login(LoginError::PasswordIncorrect { method: "ssh" }, denied))),
                Ok(()) => Err(login(LoginError::PasswordIncorrect { method: "ssh" }, denied)),
            }
        }
        None if offers("password") || offers("keyboard-interactive") => {
            Err(login(LoginError::PasswordRequired { method: "ssh" }, denied))
        }
        _ => {
            let line = if tried.is_empty() {
                denied.clone()
            } else {
                format!("{denied} Tried: {}", tried.join(", "))
            };
            Err(login(LoginError::PermissionDenied { method: "ssh", line: denied }, line))
        }
    }
}

/// Answers every keyboard-interactive prompt with the password (sshd asks once).
struct Answer(String);

impl ssh2::KeyboardInteractivePrompt for Answer {
    fn prompt<'a>(&mut self, _user: &str, _instructions: &str, prompts: &[ssh2::Prompt<'a>]) -> Vec<String> {
        prompts.iter().map(|_| self.0.clone()).collect()
    }
}

/// The local account's name: `$USER`, `$LOGNAME`, else the password database.
fn local_user() -> Option<String> {
    for v in ["USER", "LOGNAME"] {
        if let Some(u) = std::env::var_os(v).filter(|u| !u.is_empty()) {
            return u.into_string().ok();
        }
    }
    passwd_field(|pw| pw.pw_name)
}

/// The home directory: `$HOME`, else the password database, else `/`.
fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| passwd_field(|pw| pw.pw_dir).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn passwd_field(field: fn(&libc::passwd) -> *mut libc::c_char) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; zeroed is a valid (empty) value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given; the strings point into `buf`.
    let rc = unsafe { libc::getpwuid_r(libc::geteuid(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return None;
    }
    let p = field(&pw);
    // SAFETY: a NUL-terminated string inside `buf`, which is still alive.
    (!p.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A byte queue of at most the capacity given to [`Buf::new`]: `data[start..end]` is
/// queued. The storage is allocated (and zeroed) once, so a read that finds nothing costs
/// nothing.
struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(cap: usize) -> Buf {
        Buf { data: vec![0; cap].into_boxed_slice(), start: 0, end: 0 }
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn is_full(&self) -> bool {
        self.end - self.start == self.data.len()
    }
    fn clear(&mut self) {
        (self.start, self.end) = (0, 0);
    }
    fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.clear();
        }
    }
    /// Reads once from `r` into the free space (call only when not full). `Ok(None)`: it
    /// would block.
    fn fill(&mut self, r: &mut impl Read) -> io::Result<Option<usize>> {
        if self.end == self.data.len() {
            self.data.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        match r.read(&mut self.data[self.end..]) {
            Ok(n) => {
                self.end += n;
                Ok(Some(n))
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Writes the front of `buf` to `w` until it would block; true if anything was written.
fn drain(buf: &mut Buf, w: &mut impl Write) -> io::Result<bool> {
    let mut any = false;
    while !buf.is_empty() {
        match w.write(buf.bytes()) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf.consume(n);
                any = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(any)
}

/// Bytes waiting in the socket's receive queue.
fn pending_input(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// The broker-thread half of a libssh2 connection. See the module documentation.
struct Pump {
    name: String,
    session: Session,
    channel: ssh2::Channel,
    /// The session's TCP socket (owned by `session`).
    tcp_fd: RawFd,
    /// Our end of the socketpair; the broker stream has the other.
    local: UnixStream,
    /// Our end of the stderr socketpair.
    diag: UnixStream,
    /// False once its reader is gone (stderr is then dropped).
    diag_open: bool,
    to_ssh: Buf,
    from_ssh: Buf,
    stderr: Buf,
    local_eof: bool,
    remote_eof: bool,
    /// Probe interval and how many may go unanswered.
    keepalive: Option<(Duration, u32)>,
    next_keepalive: Instant,
    /// The last time the server sent anything.
    last_heard: Instant,
}

impl Pump {
    /// Moves bytes until nothing moves. Channel reads come last in every round, so when it
    /// stops libssh2 holds no unread input: readiness of the socket is the whole truth.
    fn pump(&mut self) -> io::Result<()> {
        loop {
            let mut moved = false;
            if !self.local_eof && !self.to_ssh.is_full() {
                match self.to_ssh.fill(&mut self.local)? {
                    Some(0) => self.local_eof = true,
                    Some(_) => moved = true,
                    None => {}
                }
            }
            moved |= drain(&mut self.to_ssh, &mut self.channel)?;
            if !self.remote_eof && !self.from_ssh.is_full() {
                match self.from_ssh.fill(&mut self.channel)? {
                    Some(0) if self.channel.eof() => self.remote_eof = true,
                    Some(n) => moved |= n > 0,
                    None => {}
                }
            }
            // stderr is always read (unread, it would stall the channel): what the log
            // reader is too slow for, or gone, is dropped.
            if self.stderr.is_full() || !self.diag_open {
                self.stderr.clear();
            }
            moved |= matches!(self.stderr.fill(&mut self.channel.stderr())?, Some(n) if n > 0);
            moved |= drain(&mut self.from_ssh, &mut self.local)?;
            if self.diag_open {
                match drain(&mut self.stderr, &mut self.diag) {
                    Ok(m) => moved |= m,
                    Err(_) => self.diag_open = false,
                }
            }
            if !moved {
                return Ok(());
            }
        }
    }

    /// Sends keepalives when due; false once the server has been silent too long.
    fn keepalive(&mut self, now: Instant) -> bool {
        let Some((interval, count)) = self.keepalive else { return true };
        if now >= self.next_keepalive {
            let wait = match self.session.keepalive_send() {
                Ok(secs) => Duration::from_secs(secs.max(1).into()),
                Err(_) => Duration::from_millis(100),
            };
            self.next_keepalive = now + wait.min(interval);
        }
        now.saturating_duration_since(self.last_heard) <= interval * (count + 1)
    }
}

impl Driver for Pump {
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![
            // SAFETY: the session owns the socket and lives as long as `self`.
            unsafe { BorrowedFd::borrow_raw(self.tcp_fd) },
            self.local.as_fd(),
            self.diag.as_fd(),
        ]
    }

    fn poll(&mut self, now: Instant) -> Option<Wants> {
        if pending_input(self.tcp_fd) > 0 {
            self.last_heard = now;
        }
        if let Err(e) = self.pump() {
            log::debug!("{}: connection lost: {e}", self.name);
            return None;
        }
        if !self.keepalive(now) {
            log::warn!(
                "{}: no answer to {} keepalives; disconnecting",
                self.name,
                self.keepalive.map_or(0, |k| k.1)
            );
            return None;
        }
        let done_local = self.local_eof && self.to_ssh.is_empty();
        let done_remote = self.remote_eof && self.from_ssh.is_empty();
        if done_local || done_remote {
            // Either side has finished: the stream ends (the broker sees end of file, the
            // far agent sees its stdin close when the session goes). Best effort: these
            // do not block, and whatever they could not send is dropped with the socket.
            let _ = self.channel.send_eof();
            let _ = self.session.disconnect(None, "mitogen: stream closed", None);
            return None;
        }
        let dirs = self.session.block_directions();
        let inbound = matches!(dirs, BlockDirections::Inbound | BlockDirections::Both);
        let outbound = matches!(dirs, BlockDirections::Outbound | BlockDirections::Both);
        let interest = vec![
            Interest { readable: !self.from_ssh.is_full() || inbound, writable: outbound },
            Interest {
                readable: !self.local_eof && !self.to_ssh.is_full(),
                writable: !self.from_ssh.is_empty(),
            },
            Interest { readable: false, writable: self.diag_open && !self.stderr.is_empty() },
        ];
        Some(Wants { interest, deadline: self.keepalive.map(|_| self.next_keepalive) })
    }
}
