//! The chaos run: a tree of about 30 local contexts on three levels, calls and streams in
//! flight from several threads, while a seeded sequence of faults hits random nodes:
//! SIGKILL, SIGSTOP (continued later; heartbeats notice the silence meanwhile), garbage
//! written onto a node's stream to its parent. Lost nodes are connected again. Every
//! operation must end with a value or a typed error within [`BOUND`]; afterwards no
//! process, fd or thread may be left. `cargo xtask chaos --seed N --secs S` runs it; an
//! integration test runs a bounded one.

use crate::{add, echo, hygiene, produce, sleep_ms, wait_gone, write_parent_stream, zombies_after};
use mitogen::{Bytes, CallError, Context, Local, Receiver, Router};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest any one operation may take (calls, streams, connects). A stopped node is
/// dropped by its parent's heartbeat after `HEARTBEAT x (COUNT + 1)`, far below this.
pub const BOUND: Duration = Duration::from_secs(30);
const HEARTBEAT: Duration = Duration::from_millis(250);
const COUNT: u32 = 3;
/// Children per node on each level: 3, then 3 each, then 2 each (3 + 9 + 18 = 30).
const FANOUT: [usize; 3] = [3, 3, 2];
const WORKERS: usize = 4;

/// xorshift64*: the whole run's choices follow from the seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One place in the tree, and whoever fills it now.
struct Slot {
    parent: Option<usize>,
    ctx: Option<(Context, u32)>,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Operations that returned a value.
    pub ok: u64,
    /// Operations that returned a typed error (the node was lost, or refused).
    pub failed: u64,
    /// Faults injected: kills, stops, garbage.
    pub kills: u64,
    /// SIGSTOPs (each continued later).
    pub stops: u64,
    /// Garbage written onto streams.
    pub garbage: u64,
    /// Contexts connected (the tree and its replacements).
    pub connects: u64,
    /// Processes started in all.
    pub processes: usize,
    /// Values that came back wrong from a node that had written garbage onto its own
    /// stream (frames carry no checksum: garbage spliced into a frame in flight changes
    /// it before the stream is found corrupt and closed). Anywhere else, a problem.
    pub corrupted: u64,
    /// Slowest operation seen.
    pub slowest: Duration,
}

/// Everything that went wrong: an operation over the bound, a value that was wrong, a
/// process, fd or thread left behind.
#[derive(Debug)]
pub struct Failure(pub String);

struct Shared {
    slots: Mutex<Vec<Slot>>,
    pids: Mutex<Vec<u32>>,
    stopped: Mutex<Vec<(u32, Instant)>>,
    /// Nodes made to write garbage onto their stream.
    garbaged: Mutex<std::collections::HashSet<u32>>,
    corrupted: AtomicU64,
    done: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
    slowest_us: AtomicU64,
    problems: Mutex<Vec<String>>,
}

impl Shared {
    fn problem(&self, p: String) {
        eprintln!("chaos: PROBLEM: {p}");
        self.problems.lock().unwrap().push(p);
    }

    /// Records how long an operation took; over the bound is a failure.
    fn timed<T>(&self, what: &str, f: impl FnOnce() -> Result<T, String>) -> Option<T> {
        let t = Instant::now();
        let r = f();
        let took = t.elapsed();
        self.slowest_us.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
        if took > BOUND + Duration::from_secs(5) {
            self.problem(format!("{what} took {took:?} (bound {BOUND:?})"));
        }
        match r {
            Ok(v) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                Some(v)
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                // Mostly a context just lost: give the fault thread time to notice.
                std::thread::sleep(Duration::from_millis(2));
                if e.starts_with("WRONG") {
                    self.problem(format!("{what}: {e}"));
                }
                None
            }
        }
    }
}

fn connect(r: &Router, agent: &str, parent: Option<&Context>) -> Result<(Context, u32), String> {
    let mut spec = Local::new().program(agent).connect_timeout(BOUND).heartbeat(Some(HEARTBEAT), COUNT);
    if let Some(p) = parent {
        spec = spec.via(p);
    }
    let c = r.local(spec).map_err(|e| e.to_string())?;
    let pid = c.call_timeout(mitogen::builtins::getpid, (), BOUND).map_err(|e| e.to_string())?;
    Ok((c, pid))
}

/// The slot's chain up to the master: each context's name, pid, process state and
/// whether the master still routes to it.
fn describe(sh: &Shared, r: &Router, mut slot: usize) -> String {
    let slots = sh.slots.lock().unwrap();
    let mut out = Vec::new();
    loop {
        let s = &slots[slot];
        match &s.ctx {
            Some((c, pid)) => {
                let state = crate::proc_stat(*pid).map_or('-', |(st, _)| st);
                out.push(format!(
                    "{} pid {pid} {state} routed {}",
                    c.name(),
                    r.broker().is_reachable(c.id())
                ));
            }
            None => out.push(format!("slot {slot} empty")),
        }
        match s.parent {
            Some(p) => slot = p,
            None => break,
        }
    }
    out.join(" <- ")
}

/// [`Shared::timed`], adding the chain's state before and after to a hang's report.
struct Diag<'a> {
    sh: &'a Shared,
    r: &'a Router,
    slot: usize,
    before: String,
}

impl Diag<'_> {
    fn timed<T>(&self, what: &str, f: impl FnOnce() -> Result<T, String>) -> Option<T> {
        self.sh.timed(what, || {
            f().map_err(|e| {
                let pid = self.sh.slots.lock().unwrap()[self.slot].ctx.as_ref().map(|(_, p)| *p);
                let garbaged = pid.is_some_and(|p| self.sh.garbaged.lock().unwrap().contains(&p));
                if e.starts_with("WRONG") && !e.starts_with("WRONG: timed out") && garbaged {
                    self.sh.corrupted.fetch_add(1, Ordering::Relaxed);
                    format!("corrupted by its own garbage: {e}")
                } else if e.starts_with("WRONG") {
                    let after = describe(self.sh, self.r, self.slot);
                    format!("{e}; before: {}; after: {after}", self.before)
                } else {
                    e
                }
            })
        })
    }
}

/// A call error must be typed: a timeout means something hung.
fn typed(e: CallError) -> String {
    match e {
        CallError::Timeout(t) => format!("WRONG: timed out after {t:?} (a hang)"),
        e => e.to_string(),
    }
}

fn work(sh: &Shared, r: &Router, rng: &mut Rng) {
    let pick = {
        let slots = sh.slots.lock().unwrap();
        let live: Vec<(Context, usize)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.ctx.as_ref().map(|(c, _)| (c.clone(), i)))
            .collect();
        if live.is_empty() {
            None
        } else {
            Some(live[rng.below(live.len() as u64) as usize].clone())
        }
    };
    let Some((c, slot)) = pick else {
        std::thread::sleep(Duration::from_millis(10));
        return;
    };
    let chain = describe(sh, r, slot);
    let sh = &Diag { sh, r, slot, before: chain };
    match rng.below(4) {
        0 => {
            let (a, b) = (rng.below(1000) as i64, rng.below(1000) as i64);
            sh.timed("call add", || {
                let v = c.call_timeout(add, (a, b), BOUND).map_err(typed)?;
                if v == a + b {
                    Ok(())
                } else {
                    Err(format!("WRONG: {a} + {b} = {v}"))
                }
            });
        }
        1 => {
            let ms = rng.below(50);
            sh.timed("call sleep", || c.call_timeout(sleep_ms, (ms,), BOUND).map_err(typed));
        }
        2 => {
            let data = crate::block(rng.next_u64(), 0, 1 + rng.below(128 * 1024) as usize);
            sh.timed("echo", || {
                let back = c.call_timeout(echo, (Bytes(data.clone()),), BOUND).map_err(typed)?;
                if back.0 == data {
                    Ok(())
                } else {
                    Err("WRONG: echo changed the data".into())
                }
            });
        }
        _ => {
            let (seed, n, len) = (rng.next_u64(), 1 + rng.below(16), 1 + rng.below(64 * 1024));
            sh.timed("stream", || {
                let mut rx = Receiver::<Bytes>::with_respondent(r.broker(), c.id()).map_err(typed)?;
                let mut call = c.call_async(produce, (seed, n, len, rx.sender())).map_err(typed)?;
                for i in 0..n {
                    let b = rx.get(Some(BOUND)).map_err(typed)?;
                    if b.0 != crate::block(seed, i, len as usize) {
                        return Err(format!("WRONG: block {i} of a stream differs"));
                    }
                }
                call.get(Some(BOUND)).map_err(typed)?;
                Ok(())
            });
        }
    }
}

/// The fault thread: one fault every 50-250 ms, continues stopped nodes after 0.1-2 s,
/// and fills empty slots whose parent lives.
fn havoc(sh: &Shared, r: &Router, agent: &str, rng: &mut Rng, report: &mut Report) {
    std::thread::sleep(Duration::from_millis(50 + rng.below(200)));
    let now = Instant::now();
    sh.stopped.lock().unwrap().retain(|&(pid, until)| {
        if until <= now {
            // SAFETY: signalling a process this run started (it may have exited).
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            false
        } else {
            true
        }
    });
    // Forget contexts that are gone (their route went with them).
    {
        let mut slots = sh.slots.lock().unwrap();
        for s in slots.iter_mut() {
            if s.ctx.as_ref().is_some_and(|(c, _)| !r.broker().is_reachable(c.id())) {
                s.ctx = None;
            }
        }
    }
    let target = {
        let slots = sh.slots.lock().unwrap();
        let live: Vec<(Context, u32)> = slots.iter().filter_map(|s| s.ctx.clone()).collect();
        (!live.is_empty()).then(|| live[rng.below(live.len() as u64) as usize].clone())
    };
    if let Some((c, pid)) = target {
        match rng.below(3) {
            0 => {
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                report.kills += 1;
            }
            1 => {
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                let until = Instant::now() + Duration::from_millis(100 + rng.below(1900));
                sh.stopped.lock().unwrap().push((pid, until));
                report.stops += 1;
            }
            _ => {
                let mut junk: Vec<u8> = (0..1 + rng.below(64)).map(|_| rng.next_u64() as u8).collect();
                if rng.below(2) == 0 {
                    // Often a plausible header, so the decoder gets past the magic.
                    junk.splice(0..0, *b"MG\x01\x01");
                }
                // No reply wanted: the node's stream is corrupt afterwards. A send that
                // fails (the node just went) injects nothing and is not counted.
                if c.call_no_reply(write_parent_stream, (junk,)).is_ok() {
                    sh.garbaged.lock().unwrap().insert(pid);
                    report.garbage += 1;
                }
            }
        }
    }
    // Refill one empty slot whose parent is alive (the tree keeps its shape).
    let empty = {
        let slots = sh.slots.lock().unwrap();
        let cands: Vec<(usize, Option<Context>)> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.ctx.is_none())
            .filter_map(|(i, s)| match s.parent {
                None => Some((i, None)),
                Some(p) => slots[p].ctx.as_ref().map(|(c, _)| (i, Some(c.clone()))),
            })
            .collect();
        (!cands.is_empty()).then(|| cands[rng.below(cands.len() as u64) as usize].clone())
    };
    if let Some((i, parent)) = empty {
        let got = sh.timed("connect", || connect(r, agent, parent.as_ref()));
        report.connects += 1;
        if let Some((c, pid)) = got {
            sh.pids.lock().unwrap().push(pid);
            sh.slots.lock().unwrap()[i].ctx = Some((c, pid));
        }
    }
}

/// Runs chaos for `secs` seconds with `seed`, the agent image at `agent`.
pub fn run(agent: &str, seed: u64, secs: u64) -> Result<Report, Failure> {
    // Warm up first: this thread's waker (an eventfd kept for the thread's life, used by
    // its borrowed reads) and lazily made state must not count as leaks.
    {
        let r = Router::new().map_err(|e| Failure(e.to_string()))?;
        connect(&r, agent, None).map_err(|e| Failure(format!("warm-up: {e}")))?;
    }
    let _ = zombies_after(BOUND);
    let before = hygiene();
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let sh = Arc::new(Shared {
        slots: Mutex::new(Vec::new()),
        pids: Mutex::new(Vec::new()),
        stopped: Mutex::new(Vec::new()),
        garbaged: Mutex::new(Default::default()),
        corrupted: AtomicU64::new(0),
        done: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        slowest_us: AtomicU64::new(0),
        problems: Mutex::new(Vec::new()),
    });
    {
        let r = Arc::new(Router::new().map_err(|e| Failure(e.to_string()))?);
        // The tree, level by level.
        let mut level: Vec<Option<usize>> = vec![None];
        for fan in FANOUT {
            let mut next = Vec::new();
            for parent in level {
                for _ in 0..fan {
                    let pctx = parent.and_then(|p| sh.slots.lock().unwrap()[p].ctx.clone());
                    let (c, pid) = connect(&r, agent, pctx.as_ref().map(|(c, _)| c))
                        .map_err(|e| Failure(format!("building the tree: {e}")))?;
                    sh.pids.lock().unwrap().push(pid);
                    report.connects += 1;
                    let mut slots = sh.slots.lock().unwrap();
                    slots.push(Slot { parent, ctx: Some((c, pid)) });
                    next.push(Some(slots.len() - 1));
                }
            }
            level = next;
        }
        eprintln!("chaos: seed {seed}, {} contexts, {secs} s", sh.slots.lock().unwrap().len());
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (sh, r) = (sh.clone(), r.clone());
                let mut rng = Rng::new(seed ^ (w as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
                std::thread::spawn(move || {
                    while !sh.done.load(Ordering::Relaxed) {
                        work(&sh, &r, &mut rng);
                    }
                })
            })
            .collect();
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            havoc(&sh, &r, agent, &mut rng, &mut report);
        }
        sh.done.store(true, Ordering::Relaxed);
        // Workers finish their operation in flight, each within the bound.
        let joined = Instant::now();
        for w in workers {
            if w.join().is_err() {
                sh.problem("a worker thread panicked".into());
            }
        }
        if joined.elapsed() > BOUND + Duration::from_secs(5) {
            sh.problem(format!("workers took {:?} to stop", joined.elapsed()));
        }
        for (pid, _) in sh.stopped.lock().unwrap().drain(..) {
            // SAFETY: continuing a process this run stopped.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
        sh.slots.lock().unwrap().clear();
        let r = Arc::try_unwrap(r).map_err(|_| Failure("the router is still shared".into()))?;
        let t = Instant::now();
        r.shutdown();
        if t.elapsed() > BOUND {
            sh.problem(format!("router shutdown took {:?}", t.elapsed()));
        }
    }
    let pids = sh.pids.lock().unwrap().clone();
    report.processes = pids.len();
    for pid in &pids {
        if !wait_gone(*pid, BOUND) {
            sh.problem(format!("process {pid} still running after shutdown"));
        }
    }
    if zombies_after(BOUND) != 0 {
        sh.problem("zombies left".into());
    }
    let until = Instant::now() + Duration::from_secs(10);
    let mut after = hygiene();
    while (after.fds > before.fds || after.threads > before.threads) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        after = hygiene();
    }
    if after.fds > before.fds || after.threads > before.threads {
        let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| format!("{:?}", std::fs::read_link(e.path()).unwrap_or_default()))
            .collect();
        sh.problem(format!("resources left: before {before:?}, after {after:?}; fds {fds:?}"));
    }
    report.ok = sh.ok.load(Ordering::Relaxed);
    report.failed = sh.failed.load(Ordering::Relaxed);
    report.corrupted = sh.corrupted.load(Ordering::Relaxed);
    report.slowest = Duration::from_micros(sh.slowest_us.load(Ordering::Relaxed));
    let problems = sh.problems.lock().unwrap().clone();
    eprintln!("chaos: {report:?}");
    if problems.is_empty() {
        Ok(report)
    } else {
        Err(Failure(format!("{} problems (seed {seed}):\n{}", problems.len(), problems.join("\n"))))
    }
}
