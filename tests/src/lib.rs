//! Shared pieces of the test suite: the functions the test agent registers, process
//! hygiene probes, and the deterministic routing simulator ([`sim`]).

#![allow(clippy::disallowed_methods)]

pub mod accounts;
pub mod chaos;
pub mod e2e;
pub mod sim;

use mitogen::{Bytes, Context, Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

/// Deterministic pseudo-random block `index` of a stream identified by `seed`.
pub fn block(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

mitogen::remote_fn! {
    /// Adds two numbers.
    pub fn add(a: i64, b: i64) -> i64 { a + b }
}

mitogen::remote_fn! {
    /// Returns its argument.
    pub fn echo(data: Bytes) -> Bytes { data }
}

mitogen::remote_fn! {
    /// Fails with an io::Error of kind NotFound.
    pub fn fail_io(path: String) -> Result<(), std::io::Error> {
        std::fs::metadata(path).map(drop)
    }
}

mitogen::remote_fn! {
    /// Panics with `msg`.
    pub fn panic_now(msg: String) -> () { panic!("{msg}") }
}

mitogen::remote_fn! {
    /// Sleeps `ms` milliseconds.
    pub fn sleep_ms(ms: u64) -> () { std::thread::sleep(Duration::from_millis(ms)) }
}

mitogen::remote_fn! {
    /// Never returns.
    pub fn hang() -> () { loop { std::thread::sleep(Duration::from_secs(3600)) } }
}

mitogen::remote_fn! {
    /// Registered nowhere: calling it must give an unknown-function error.
    pub fn not_registered() -> () {}
}

mitogen::remote_fn! {
    /// Streams `n` deterministic blocks of `len` bytes to `out`.
    pub fn produce(seed: u64, n: u64, len: u64, out: Sender<Bytes>) -> Result<(), mitogen::CallError> {
        for i in 0..n {
            out.send(&Bytes(block(seed, i, len as usize)))?;
        }
        out.close()
    }
}

mitogen::remote_fn! {
    /// Checks `data` byte for byte against block `index` of `seed`; returns the first
    /// differing offset, or `None` if equal.
    pub fn verify(seed: u64, index: u64, data: Bytes) -> Option<u64> {
        let want = block(seed, index, data.len());
        if want.len() != data.len() {
            return Some(0);
        }
        want.iter().zip(data.iter()).position(|(a, b)| a != b).map(|p| p as u64)
    }
}

mitogen::remote_fn! {
    /// Logs at warn level and prints a line on stdout and one on stderr.
    pub fn chatter(tag: String) -> () {
        log::warn!("log record {tag}");
        log::error!("error record {tag}");
        println!("stdout line {tag}");
        eprintln!("stderr line {tag}");
        // Output of subprocesses is captured too: they inherit the agent's stdout.
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", &format!("echo subprocess line {tag}")]);
        let _ = mitogen_core_spawn_wait(&mut cmd);
    }
}

fn mitogen_core_spawn_wait(cmd: &mut std::process::Command) -> std::io::Result<()> {
    cmd.status().map(drop)
}

static INBOX: Mutex<Option<Receiver<String>>> = Mutex::new(None);

mitogen::remote_fn! {
    /// Opens an inbox in this context and returns a sender for it.
    pub fn open_inbox() -> Result<Sender<String>, mitogen::CallError> {
        let b = mitogen::current_broker().ok_or(mitogen::CallError::Shutdown)?;
        let rx = Receiver::new(b)?;
        let tx = rx.sender();
        *INBOX.lock().unwrap() = Some(rx);
        Ok(tx)
    }
}

mitogen::remote_fn! {
    /// Waits for the next inbox message.
    pub fn read_inbox(timeout_ms: u64) -> Result<String, mitogen::CallError> {
        let mut g = INBOX.lock().unwrap();
        let rx = g.as_mut().ok_or(mitogen::CallError::Closed)?;
        rx.get(Some(Duration::from_millis(timeout_ms)))
    }
}

mitogen::remote_fn! {
    /// Sends `text` through `to` (which may lead to a sibling).
    pub fn send_text(to: Sender<String>, text: String) -> Result<(), mitogen::CallError> {
        to.send(&text)
    }
}

mitogen::remote_fn! {
    /// Tries to call `add` in context `id` from here; returns the error text, if any.
    pub fn call_other(id: u32) -> Option<String> {
        let b = mitogen::current_broker()?;
        let ctx = Context::new(b.clone(), id, "other");
        ctx.call_timeout(add, (1, 2), Duration::from_secs(10)).err().map(|e| e.to_string())
    }
}

mitogen::remote_fn! {
    /// The agent's real and effective user ids.
    pub fn uids() -> (u32, u32) {
        // SAFETY: getuid/geteuid have no preconditions.
        unsafe { (libc::getuid(), libc::geteuid()) }
    }
}

mitogen::remote_fn! {
    /// Where the agent runs from and what `ps` shows: (`/proc/self/exe` target, argv[0]).
    pub fn whoami() -> (String, String) {
        let exe = std::fs::read_link("/proc/self/exe").map(|p| p.display().to_string()).unwrap_or_default();
        let cmd = std::fs::read("/proc/self/cmdline").unwrap_or_default();
        let argv0 = String::from_utf8_lossy(cmd.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
        (exe, argv0)
    }
}

mitogen::remote_fn! {
    /// The seals (`F_GET_SEALS`) of the file the agent runs from.
    pub fn image_seals() -> i32 {
        match std::fs::File::open("/proc/self/exe") {
            // SAFETY: fcntl on a descriptor the File owns.
            Ok(f) => unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_GET_SEALS) },
            Err(_) => -1,
        }
    }
}

mitogen::remote_fn! {
    /// Returns `len` zero bytes (a result as large as asked).
    pub fn zeros(len: u64) -> Bytes { Bytes(vec![0; len as usize]) }
}

mitogen::remote_fn! {
    /// Writes `bytes` raw onto the stream to this agent's parent, bypassing the broker (a
    /// corrupt frame, for fault tests), then returns.
    pub fn write_parent_stream(bytes: Vec<u8>) -> Result<(), std::io::Error> {
        let fd = socket_fds().into_iter().next().ok_or(std::io::ErrorKind::NotFound)?;
        write_raw(fd, &bytes)
    }
}

mitogen::remote_fn! {
    /// The agent's working directory, and whether it can enter it.
    pub fn working_dir() -> (String, bool) {
        let cwd = std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default();
        (cwd, std::env::set_current_dir(".").is_ok())
    }
}

mitogen::remote_fn! {
    /// Logs one warning of `len` bytes (`x` repeated) and prints a line as long.
    pub fn log_long(len: u64) -> () {
        let text = "x".repeat(len as usize);
        log::warn!("{text}");
        println!("{text}");
    }
}

/// The number after `--flag` in `args`, or `default` (the chaos and soak programs).
pub fn flag(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

/// This process's socket descriptors, lowest first. In an agent without children the only
/// sockets are its parent stream; in a test process (one per test under nextest) with
/// one local child, they are the stream to that child.
pub fn socket_fds() -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    fds
}

/// Writes all of `bytes` to the descriptor `fd` (which may be non-blocking).
pub fn write_raw(fd: i32, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: writing from a valid slice to a descriptor this process owns.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// The registry of the test agent.
pub fn registry() -> mitogen::Registry {
    mitogen::Registry::new()
        .register(add)
        .register(echo)
        .register(fail_io)
        .register(panic_now)
        .register(sleep_ms)
        .register(hang)
        .register(produce)
        .register(verify)
        .register(chatter)
        .register(open_inbox)
        .register(read_inbox)
        .register(send_text)
        .register(call_other)
        .register(uids)
        .register(whoami)
        .register(image_seals)
        .register(zeros)
        .register(write_parent_stream)
        .register(working_dir)
        .register(log_long)
}

/// Snapshot of this process's resources, for leak checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hygiene {
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Zombie children.
    pub zombies: usize,
}

/// Counts open fds, threads and zombie children of this process.
pub fn hygiene() -> Hygiene {
    let count = |p: &str| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    let me = std::process::id();
    let zombies = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter_map(proc_stat)
        .filter(|(state, ppid)| *state == 'Z' && *ppid == me)
        .count();
    Hygiene { fds: count("/proc/self/fd"), threads: count("/proc/self/task"), zombies }
}

/// Zombie children still there after waiting up to `limit`: the broker reaps exited
/// processes on its own schedule (within milliseconds), not at the instant a stream ends.
pub fn zombies_after(limit: Duration) -> usize {
    let until = std::time::Instant::now() + limit;
    loop {
        let z = hygiene().zombies;
        if z == 0 || std::time::Instant::now() >= until {
            return z;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `(state, ppid)` of a process, or `None` if it does not exist.
pub fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True if `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn is_gone(pid: u32) -> bool {
    !matches!(proc_stat(pid), Some((s, _)) if s != 'Z')
}

/// Waits up to `limit` for `pid` to be gone; true if it is.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    let end = std::time::Instant::now() + limit;
    loop {
        if is_gone(pid) {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
