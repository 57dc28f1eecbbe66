#![allow(clippy::disallowed_methods)]
//! Benchmark workloads, one per invocation: `mitogen-bench WORKLOAD`. Prints lines of the
//! form `RESULT <workload> <metric> <value> <unit>`; `cargo xtask bench` runs every workload
//! in fresh processes, repeats them and prints the table. The program is its own agent.

use mitogen::{Bytes, Context, Local, Receiver, Router, Sender};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

mitogen::remote_fn! {
    /// Returns its argument.
    pub fn echo(x: u64) -> u64 { x }
}

mitogen::remote_fn! {
    /// Consumes a block and returns its length.
    pub fn sink(data: Bytes) -> u64 { data.len() as u64 }
}

mitogen::remote_fn! {
    /// Sends `n` blocks of `len` random bytes through `out`.
    pub fn source(n: u64, len: u64, out: Sender<Bytes>) -> Result<(), mitogen::CallError> {
        let block = Bytes(random(len as usize, n));
        for _ in 0..n {
            out.send(&block)?;
        }
        out.close()
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn report(w: &str, metric: &str, value: f64, unit: &str) {
    println!("RESULT {w} {metric} {value:.3} {unit}");
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs `once` 20 times and reports the median duration in ms as `w median`.
fn median_ms_of_20(w: &str, mut once: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut samples = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        once()?;
        samples.push(micros(t.elapsed()) / 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    report(w, "median", pct(&samples, 0.5), "ms");
    Ok(())
}

/// The lifecycle workloads: start a context, first call, shutdown; median of 20.
fn lifecycle_of(
    w: &str,
    mut start: impl FnMut() -> Result<Context, mitogen::ConnectError>,
) -> anyhow::Result<()> {
    // The master hashes its own image once; that is not per-context work.
    mitogen_child::build_id::current()?;
    median_ms_of_20(w, || life(&mut start))
}

/// One lifecycle: start a context, first call, shutdown.
fn life(start: &mut impl FnMut() -> Result<Context, mitogen::ConnectError>) -> anyhow::Result<()> {
    let c = start()?;
    c.call(echo, (1,))?;
    c.shutdown(Duration::from_secs(10))?;
    Ok(())
}

const MIB: usize = 1 << 20;
const BLOCKS: u64 = 256;

fn main() -> anyhow::Result<()> {
    mitogen::run_if_child(mitogen::Registry::new().register(echo).register(sink).register(source));
    // Helper modes for the floors.
    if std::env::var_os("MITOGEN_BENCH_EXIT").is_some() {
        return Ok(());
    }
    if std::env::var_os("MITOGEN_BENCH_PONG").is_some() {
        return pong();
    }
    if std::env::var_os("MITOGEN_BENCH_WRITER").is_some() {
        return writer();
    }
    let w = std::env::args().nth(1).unwrap_or_default();
    // `libssh2-<x>` is the ssh workload `ssh-<x>` through the libssh2 backend.
    let (backend, ssh_w) = match w.strip_prefix("libssh2-") {
        Some(rest) => (mitogen::SshBackend::Libssh2, format!("ssh-{rest}")),
        None => (mitogen::SshBackend::OpenSsh, w.clone()),
    };
    let spec = || ssh_spec().backend(backend);
    match ssh_w.as_str() {
        "ssh-lifecycle" => return ssh_lifecycle(&w, spec, false),
        "ssh-lifecycle-cached" => return ssh_lifecycle(&w, spec, true),
        "ssh-roundtrip" => {
            let r = Router::new()?;
            return roundtrip_on(&r.ssh(spec())?, &w);
        }
        "ssh-stream-c2p" => {
            let r = Router::new()?;
            return stream_c2p_on(&r, &r.ssh(spec())?, &w);
        }
        "ssh-args-p2c" => {
            let r = Router::new()?;
            return args_p2c_on(&r.ssh(spec())?, &w);
        }
        _ => {}
    }
    match w.as_str() {
        "floor-pingpong" => floor_pingpong(),
        "floor-write" => floor_write(),
        "floor-spawn" => floor_spawn(),
        "floor-cat" => floor_cat(),
        "lifecycle" => lifecycle(),
        "roundtrip" => roundtrip(false),
        "roundtrip-via" => roundtrip(true),
        "stream-c2p" => stream_c2p(),
        "args-p2c" => args_p2c(),
        "fanout-50" => fanout(50),
        "fanout-200" => fanout(200),
        "floor-sudo" => floor_sudo(),
        "sudo-lifecycle" => sudo_lifecycle(false),
        "sudo-lifecycle-cached" => sudo_lifecycle(true),
        "sudo-bootstrap" => sudo_bootstrap(),
        "floor-ssh" => floor_ssh(),
        "floor-ssh-down" => floor_ssh_down(),
        "floor-ssh-up" => floor_ssh_up(),
        _ => anyhow::bail!("unknown workload {w:?}"),
    }
}

fn helper(env: &str, sock: UnixStream) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe()?;
    let fd = std::os::fd::OwnedFd::from(sock);
    #[allow(clippy::disallowed_methods)]
    let child = std::process::Command::new(exe)
        .env(env, "1")
        .stdin(std::process::Stdio::from(fd.try_clone()?))
        .stdout(std::process::Stdio::from(fd))
        .spawn()?;
    Ok(child)
}

fn pong() -> anyhow::Result<()> {
    let mut i = std::io::stdin().lock();
    let mut o = std::io::stdout().lock();
    let mut b = [0u8; 1];
    while i.read(&mut b)? == 1 {
        o.write_all(&b)?;
        o.flush()?;
    }
    Ok(())
}

fn writer() -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    let block = random(MIB, 3);
    for _ in 0..BLOCKS {
        o.write_all(&block)?;
    }
    Ok(())
}

/// The floor for round trips: a 1-byte ping-pong between two processes.
fn floor_pingpong() -> anyhow::Result<()> {
    let (mut a, b) = UnixStream::pair()?;
    let mut child = helper("MITOGEN_BENCH_PONG", b)?;
    let mut buf = [0u8; 1];
    let mut samples = Vec::new();
    for i in 0..5200 {
        let t = Instant::now();
        a.write_all(&[1])?;
        a.read_exact(&mut buf)?;
        if i >= 200 {
            samples.push(micros(t.elapsed()));
        }
    }
    drop(a);
    child.wait()?;
    samples.sort_by(f64::total_cmp);
    report("floor-pingpong", "median", pct(&samples, 0.5), "us");
    report("floor-pingpong", "p99", pct(&samples, 0.99), "us");
    Ok(())
}

/// The floor for throughput: 256 x 1 MiB raw writes from a child process.
fn floor_write() -> anyhow::Result<()> {
    let (mut a, b) = UnixStream::pair()?;
    let t = Instant::now();
    let mut child = helper("MITOGEN_BENCH_WRITER", b)?;
    let mut buf = vec![0u8; MIB];
    let mut total = 0;
    loop {
        let n = a.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    let secs = t.elapsed().as_secs_f64();
    child.wait()?;
    anyhow::ensure!(total == BLOCKS as usize * MIB, "short read {total}");
    report("floor-write", "throughput", (total / MIB) as f64 / secs, "MiB/s");
    Ok(())
}

/// The floor for lifecycle: spawn + exit + wait of this binary.
fn floor_spawn() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    median_ms_of_20("floor-spawn", || {
        std::process::Command::new(&exe).env("MITOGEN_BENCH_EXIT", "1").status()?;
        Ok(())
    })
}

/// The floor for relaying bulk data through processes: 256 x 1 MiB through `cat | cat`.
fn floor_cat() -> anyhow::Result<()> {
    let mut child = std::process::Command::new("sh")
        .args(["-c", "cat | cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let block = random(MIB, 9);
    let t = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for _ in 0..BLOCKS {
            stdin.write_all(&block)?;
        }
        Ok(())
    });
    let mut buf = vec![0u8; MIB];
    let mut total = 0;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    let secs = t.elapsed().as_secs_f64();
    writer.join().expect("writer thread")?;
    child.wait()?;
    anyhow::ensure!(total == BLOCKS as usize * MIB, "short read {total}");
    report("floor-cat", "throughput", (total / MIB) as f64 / secs, "MiB/s");
    Ok(())
}

fn lifecycle() -> anyhow::Result<()> {
    let r = Router::new()?;
    lifecycle_of("lifecycle", || r.local(Local::new()))
}

fn roundtrip(via: bool) -> anyhow::Result<()> {
    let r = Router::new()?;
    let first = r.local(Local::new())?;
    let c = if via { r.local(Local::new().via(&first))? } else { first.clone() };
    roundtrip_on(&c, if via { "roundtrip-via" } else { "roundtrip" })
}

/// Median and p99 of 5000 echo calls after 200 warm-up calls.
fn roundtrip_on(c: &Context, w: &str) -> anyhow::Result<()> {
    let mut samples = Vec::new();
    for i in 0..5200u64 {
        let t = Instant::now();
        let v = c.call(echo, (i,))?;
        if i >= 200 {
            samples.push(micros(t.elapsed()));
        }
        anyhow::ensure!(v == i);
    }
    samples.sort_by(f64::total_cmp);
    report(w, "median", pct(&samples, 0.5), "us");
    report(w, "p99", pct(&samples, 0.99), "us");
    Ok(())
}

fn stream_c2p() -> anyhow::Result<()> {
    let r = Router::new()?;
    stream_c2p_on(&r, &r.local(Local::new())?, "stream-c2p")
}

/// 256 x 1 MiB child -> parent through a Sender.
fn stream_c2p_on(r: &Router, c: &Context, w: &str) -> anyhow::Result<()> {
    c.call(echo, (0,))?;
    let rx = Receiver::<Bytes>::new(r.broker())?;
    let t = Instant::now();
    let mut pending = c.call_async(source, (BLOCKS, MIB as u64, rx.sender()))?;
    let mut total = 0;
    for b in rx {
        total += b?.len();
    }
    let secs = t.elapsed().as_secs_f64();
    pending.get(None)?;
    anyhow::ensure!(total == BLOCKS as usize * MIB);
    report(w, "throughput", (total / MIB) as f64 / secs, "MiB/s");
    Ok(())
}

fn args_p2c() -> anyhow::Result<()> {
    let r = Router::new()?;
    args_p2c_on(&r.local(Local::new())?, "args-p2c")
}

/// 256 x 1 MiB parent -> child as call arguments, 4 calls in flight.
fn args_p2c_on(c: &Context, w: &str) -> anyhow::Result<()> {
    c.call(echo, (0,))?;
    let block = random(MIB, 5);
    let t = Instant::now();
    let mut window = std::collections::VecDeque::new();
    let mut total = 0;
    for _ in 0..BLOCKS {
        window.push_back(c.call_async(sink, (Bytes(block.clone()),))?);
        if window.len() == 4 {
            total += window.pop_front().unwrap().get(None)?;
        }
    }
    for mut rx in window {
        total += rx.get(None)?;
    }
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(total == BLOCKS * MIB as u64);
    report(w, "throughput", (BLOCKS as f64) / secs, "MiB/s");
    Ok(())
}

fn status_kib(pid: &str, key: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn uss_kib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .filter(|l| l.starts_with("Private_Clean") || l.starts_with("Private_Dirty"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

fn fanout(n: usize) -> anyhow::Result<()> {
    let r = Router::new()?;
    mitogen_child::build_id::current()?;
    let t = Instant::now();
    let mut ctxs = Vec::with_capacity(n);
    for _ in 0..n {
        ctxs.push(r.local(Local::new())?);
    }
    let start = t.elapsed();
    let t = Instant::now();
    let mut sel = mitogen::Select::new();
    for c in &ctxs {
        sel.add(c.call_async(mitogen::builtins::getpid, ())?);
    }
    let mut pids = Vec::new();
    while let Some((_, pid)) = sel.get(None) {
        pids.push(pid?);
    }
    let call_all = t.elapsed();
    anyhow::ensure!(pids.len() == n);
    let rss: f64 = pids.iter().map(|p| status_kib(&p.to_string(), "VmRSS")).sum::<f64>() / n as f64;
    let uss: f64 = pids.iter().map(|p| uss_kib(*p)).sum::<f64>() / n as f64;
    let w = format!("fanout-{n}");
    report(&w, "start-all", micros(start) / 1000.0, "ms");
    report(&w, "call-all", micros(call_all) / 1000.0, "ms");
    report(&w, "master-peak-rss", status_kib("self", "VmHWM") / 1024.0, "MiB");
    report(&w, "child-rss", rss / 1024.0, "MiB");
    report(&w, "child-uss", uss / 1024.0, "MiB");
    Ok(())
}

const SUDO_USER: &str = mitogen_tests::accounts::USER_A;

/// `sudo -u USER true`, once.
fn sudo_true() -> anyhow::Result<()> {
    let st = std::process::Command::new("sudo").args(["-u", SUDO_USER, "true"]).status()?;
    anyhow::ensure!(st.success(), "sudo -u {SUDO_USER} true: {st}");
    Ok(())
}

/// The floor for sudo: `sudo -u USER true`.
fn floor_sudo() -> anyhow::Result<()> {
    mitogen_tests::accounts::ensure();
    median_ms_of_20("floor-sudo", sudo_true)
}

/// A sudo context: create, first call, shutdown; median of 20. Each one also runs next to a
/// `sudo -u USER true`: `extra` is the median of the 20 differences, which the machine's
/// drift between separate runs (several ms on this VM) does not move.
fn sudo_lifecycle(cached: bool) -> anyhow::Result<()> {
    mitogen_tests::accounts::ensure();
    let w = if cached { "sudo-lifecycle-cached" } else { "sudo-lifecycle" };
    let r = Router::new()?;
    // The cache lives in the target account's ~/.cache/mitogen.
    let spec =
        || mitogen::Sudo::new().username(SUDO_USER).cache(cached).connect_timeout(Duration::from_secs(30));
    if cached {
        // Fill the target's cache once.
        r.sudo(spec())?.shutdown(Duration::from_secs(10))?;
    }
    mitogen_child::build_id::current()?;
    let ms = |t: Instant| micros(t.elapsed()) / 1000.0;
    let (mut ours, mut extra) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let t = Instant::now();
        sudo_true()?;
        let floor = ms(t);
        let t = Instant::now();
        life(&mut || r.sudo(spec()))?;
        let took = ms(t);
        ours.push(took);
        extra.push(took - floor);
    }
    ours.sort_by(f64::total_cmp);
    extra.sort_by(f64::total_cmp);
    report(w, "median", pct(&ours, 0.5), "ms");
    report(w, "extra", pct(&extra, 0.5), "ms");
    Ok(())
}

/// What the first stage costs on the wire: sudo's command line; what sudo sends to a
/// fresh target (the image is handed over as stdin: only the answer line) and to one with
/// a cached image; and what a method that streams the image sends (ssh, containers, su,
/// sudo over pipes: perl loader, raw image cut after its last loaded byte).
fn sudo_bootstrap() -> anyhow::Result<()> {
    use mitogen_transport_local::bootstrap::{answer, FirstStage, Loader};
    let stage = FirstStage {
        token: "0".repeat(16),
        hash: "0".repeat(32),
        argv0: format!("mitogen:{SUDO_USER}@localhost:{}", std::process::id()),
        cache: true,
        handover: true,
    };
    let image = mitogen_child::build_id::shipped(std::path::Path::new("/proc/self/exe"))?.len();
    let sent = |loader| answer(loader, image, "x86_64", false).len();
    report("sudo-bootstrap", "command-line", stage.script().len() as f64, "bytes");
    report("sudo-bootstrap", "sent-fresh", sent(Loader::HandedOver) as f64, "bytes");
    report("sudo-bootstrap", "sent-cached", sent(Loader::Cached) as f64, "bytes");
    report("sudo-bootstrap", "sent-fresh-stream", (sent(Loader::Perl) + image) as f64, "bytes");
    Ok(())
}

/// The sshd host of the ssh workloads: `MITOGEN_BENCH_SSH` = `user@address`, with
/// `MITOGEN_BENCH_SSH_KEY` and `MITOGEN_BENCH_SSH_KNOWN_HOSTS` (set by `cargo xtask bench
/// --ssh`, which provisions the e2e hosts).
fn ssh_target() -> anyhow::Result<(String, String, String, String)> {
    let var =
        |k: &str| std::env::var(k).map_err(|_| anyhow::anyhow!("{k} is unset (run cargo xtask bench --ssh)"));
    let target = var("MITOGEN_BENCH_SSH")?;
    let (user, host) =
        target.split_once('@').ok_or_else(|| anyhow::anyhow!("MITOGEN_BENCH_SSH is user@host"))?;
    Ok((user.into(), host.into(), var("MITOGEN_BENCH_SSH_KEY")?, var("MITOGEN_BENCH_SSH_KNOWN_HOSTS")?))
}

/// The same options for every ssh workload: key, known hosts, compression off.
fn ssh_spec() -> mitogen::Ssh {
    let (user, host, key, kh) = ssh_target().expect("ssh target");
    mitogen::Ssh::new(host)
        .username(user)
        .identity_file(key)
        .identities_only(true)
        .known_hosts_file(kh)
        .compression(false)
        .connect_timeout(Duration::from_secs(30))
}

/// `ssh <same options> HOST <command>`, stdin and stdout as given.
fn ssh_command(command: &str) -> anyhow::Result<std::process::Command> {
    let (user, host, key, kh) = ssh_target()?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(["-l", &user, "-i", &key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]).args([
        "-o",
        &format!("UserKnownHostsFile={kh}"),
        "-o",
        "Compression=no",
        "--",
        &host,
        command,
    ]);
    Ok(cmd)
}

/// The floor for ssh lifecycle: `ssh HOST true`, median of 20.
fn floor_ssh() -> anyhow::Result<()> {
    median_ms_of_20("floor-ssh", || {
        let out = ssh_command("true")?.output()?;
        anyhow::ensure!(out.status.success(), "ssh HOST true: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    })
}

/// The floor for ssh child -> parent: 256 MiB from `ssh HOST head -c N /dev/zero` (the
/// cipher's cost does not depend on the bytes; compression is off).
fn floor_ssh_down() -> anyhow::Result<()> {
    let n = BLOCKS as usize * MIB;
    let t = Instant::now();
    let mut child =
        ssh_command(&format!("head -c {n} /dev/zero"))?.stdout(std::process::Stdio::piped()).spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; MIB];
    let mut total = 0;
    loop {
        let k = out.read(&mut buf)?;
        if k == 0 {
            break;
        }
        total += k;
    }
    anyhow::ensure!(child.wait()?.success() && total == n, "short read: {total}");
    report("floor-ssh-down", "throughput", (n / MIB) as f64 / t.elapsed().as_secs_f64(), "MiB/s");
    Ok(())
}

/// The floor for ssh parent -> child: 256 MiB of random bytes into `ssh HOST 'cat >/dev/null'`.
fn floor_ssh_up() -> anyhow::Result<()> {
    let block = random(MIB, 9);
    let t = Instant::now();
    let mut child = ssh_command("cat >/dev/null")?.stdin(std::process::Stdio::piped()).spawn()?;
    let mut input = child.stdin.take().expect("piped");
    for _ in 0..BLOCKS {
        input.write_all(&block)?;
    }
    drop(input);
    anyhow::ensure!(child.wait()?.success());
    report("floor-ssh-up", "throughput", BLOCKS as f64 / t.elapsed().as_secs_f64(), "MiB/s");
    Ok(())
}

/// An ssh context: create, first call, shutdown; median of 20. Fresh: the image is sent
/// every time; cached: the remote cache holds it (filled once first).
fn ssh_lifecycle(name: &str, spec: impl Fn() -> mitogen::Ssh, cached: bool) -> anyhow::Result<()> {
    let r = Router::new()?;
    let spec = || spec().cache(cached);
    if cached {
        r.ssh(spec())?.shutdown(Duration::from_secs(10))?;
    }
    lifecycle_of(name, || r.ssh(spec()))
}
