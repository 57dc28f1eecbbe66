//! `cargo xtask <task>`: the project's build tasks.
//!
//! - `bench [--quick] [--reps N]`: release-build the benchmark program, run every workload
//!   in fresh processes (interleaved reps, latency workloads also pinned to CPU 0), print
//!   one table with medians, ranges, ratios to the physical floors and the targets.
//! - `check-invariants`: the architecture invariants that can be checked mechanically.
//! - `test`: every test (doc tests, then everything else under nextest).
//! - `ci`: fmt check, clippy, invariants, docs, then `test`.

#![allow(clippy::disallowed_methods)]

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let st = cmd.current_dir(root()).status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("check-invariants") => check_invariants(),
        Some("ci") => ci(),
        Some("test") => test(),
        _ => bail!("usage: cargo xtask <test | bench [--quick] [--reps N] | check-invariants | ci>"),
    }
}

fn ci() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    check_invariants()?;
    run(cargo().args(["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings"))?;
    test()
}

/// Every test: doc tests, then unit, property, simulation and integration tests (nextest
/// last, so its summary closes the output).
fn test() -> Result<()> {
    // Integration tests run the stock agent of mitogen-child, another package's binary.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo().args(["test", "--workspace", "--doc"]))?;
    run(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]))
}

/// Architecture invariants (see ARCHITECTURE.md).
fn check_invariants() -> Result<()> {
    // 1. mitogen-core depends on no transport, agent or facade crate.
    let out = cargo()
        .args(["tree", "-p", "mitogen-core", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .current_dir(root())
        .output()?;
    if !out.status.success() {
        bail!("cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let tree = String::from_utf8(out.stdout)?;
    let bad: Vec<&str> =
        tree.lines().filter(|l| l.starts_with("mitogen") && !l.starts_with("mitogen-core ")).collect();
    if !bad.is_empty() {
        bail!("mitogen-core must not depend on {bad:?}");
    }
    // 2. Only the transport crates' spawn helpers start processes: clippy's
    //    disallowed-methods enforces it; make sure the configuration is in place.
    let clippy = std::fs::read_to_string(root().join("clippy.toml"))?;
    for m in
        ["std::process::Command::spawn", "std::process::Command::output", "std::process::Command::status"]
    {
        if !clippy.contains(m) {
            bail!("clippy.toml no longer disallows {m}");
        }
    }
    // 3. bincode stays behind the codec module.
    let mut offenders = Vec::new();
    for dir in ["core/src", "child/src", "master/src", "transport-local/src"] {
        visit(&root().join(dir), &mut |p, text| {
            if text.contains("bincode::") && !p.ends_with("core/src/codec.rs") {
                offenders.push(p.display().to_string());
            }
        })?;
    }
    if !offenders.is_empty() {
        bail!("bincode used outside core/src/codec.rs: {offenders:?}");
    }
    eprintln!("invariants hold");
    Ok(())
}

fn visit(dir: &std::path::Path, f: &mut dyn FnMut(&std::path::Path, &str)) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            visit(&p, f)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            f(&p, &std::fs::read_to_string(&p)?);
        }
    }
    Ok(())
}

/// (workload, pinned) pairs run each rep; latency workloads run pinned as well.
const WORKLOADS: &[(&str, bool)] = &[
    ("floor-spawn", false),
    ("floor-pingpong", false),
    ("floor-pingpong", true),
    ("floor-write", false),
    ("lifecycle", false),
    ("lifecycle", true),
    ("roundtrip", false),
    ("roundtrip", true),
    ("roundtrip-via", false),
    ("roundtrip-via", true),
    ("stream-c2p", false),
    ("args-p2c", false),
    ("fanout-50", false),
    ("fanout-200", false),
];

/// (busy, total) jiffies of all CPUs.
fn cpu_times() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Fraction of CPU time busy over the next 200 ms.
fn busy() -> f64 {
    let (b0, t0) = cpu_times();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (b1, t1) = cpu_times();
    if t1 == t0 {
        0.0
    } else {
        (b1 - b0) as f64 / (t1 - t0) as f64
    }
}

/// Waits (at most 10 s) until the machine is mostly idle; returns the last busy fraction.
fn wait_idle() -> f64 {
    let start = std::time::Instant::now();
    loop {
        let b = busy();
        if b < 0.15 || start.elapsed() > std::time::Duration::from_secs(10) {
            return b;
        }
    }
}

fn bench(args: &[String]) -> Result<()> {
    let mut reps = 5;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => reps = 2,
            "--reps" => {
                i += 1;
                reps = args.get(i).context("--reps needs a number")?.parse()?;
            }
            other => bail!("unknown bench option {other}"),
        }
        i += 1;
    }
    run(cargo().args(["build", "--release", "-p", "mitogen-tests", "--bin", "mitogen-bench"]))?;
    let bin = root().join("target/release/mitogen-bench");
    // key: (workload, metric, pinned) -> values
    let mut results: BTreeMap<(String, String, bool), (Vec<f64>, String)> = BTreeMap::new();
    let mut loads = Vec::new();
    for rep in 1..=reps {
        for &(w, pinned) in WORKLOADS {
            loads.push(wait_idle());
            let mut cmd = if pinned {
                let mut c = Command::new("taskset");
                c.args(["-c", "0"]).arg(&bin);
                c
            } else {
                Command::new(&bin)
            };
            let out = cmd.arg(w).output().with_context(|| format!("running {w}"))?;
            if !out.status.success() {
                bail!("{w} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() == 5 && f[0] == "RESULT" {
                    let e = results
                        .entry((f[1].into(), f[2].into(), pinned))
                        .or_insert((Vec::new(), f[4].into()));
                    e.0.push(f[3].parse()?);
                }
            }
            eprint!("\rrep {rep}/{reps}: {w}{}            ", if pinned { " (pinned)" } else { "" });
        }
    }
    eprintln!();
    let med = |k: (&str, &str, bool)| -> Option<f64> {
        results.get(&(k.0.to_string(), k.1.to_string(), k.2)).map(|(v, _)| median(v))
    };
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "mitogen-rs benchmarks: {reps} reps, {cpus} CPUs, kernel {kernel}, CPU busy before runs {:.0}%-{:.0}%",
        100.0 * loads.iter().cloned().fold(f64::INFINITY, f64::min),
        100.0 * loads.iter().cloned().fold(0.0, f64::max)
    );
    println!();
    println!("| workload | metric | pinned | median | [min - max] | unit | vs floor | target |");
    println!("|---|---|---|---|---|---|---|---|");
    for ((w, m, pinned), (v, unit)) in &results {
        let md = median(v);
        let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = v.iter().cloned().fold(0.0, f64::max);
        let (floor, target) = judge(w, m, *pinned, md, &med);
        println!(
            "| {w} | {m} | {} | {md:.2} | [{min:.2} - {max:.2}] | {unit} | {floor} | {target} |",
            if *pinned { "cpu0" } else { "" }
        );
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

type Lookup<'a> = &'a dyn Fn((&str, &str, bool)) -> Option<f64>;

/// Ratio to the workload's floor and the verdict against the issue's target.
fn judge(w: &str, m: &str, pinned: bool, v: f64, med: Lookup<'_>) -> (String, String) {
    let ratio = |floor: Option<f64>| floor.map(|f| v / f);
    let fmt = |r: Option<f64>| r.map(|r| format!("{r:.2}x")).unwrap_or_default();
    let verdict = |ok: bool, what: &str| format!("{} {what}", if ok { "ok" } else { "MISSED" });
    match (w, m) {
        ("lifecycle", "median") => {
            let r = ratio(med(("floor-spawn", "median", false)));
            (fmt(r), verdict(v <= 3.0, "<= 3 ms"))
        }
        ("roundtrip", "median") => {
            let r = ratio(med(("floor-pingpong", "median", pinned)));
            let limit = if pinned { 2.0 } else { 1.5 };
            (fmt(r), verdict(r.is_some_and(|r| r <= limit), &format!("<= {limit}x floor")))
        }
        ("roundtrip-via", "median") | ("roundtrip", "p99") | ("roundtrip-via", "p99") => {
            (fmt(ratio(med(("floor-pingpong", m, pinned)))), String::new())
        }
        ("stream-c2p", _) | ("args-p2c", _) => {
            let r = ratio(med(("floor-write", "throughput", false)));
            (fmt(r), verdict(v >= 2000.0, ">= 2000 MiB/s"))
        }
        ("fanout-200", "start-all") => (String::new(), verdict(v <= 600.0, "<= 600 ms")),
        ("fanout-200", "child-rss") => (String::new(), verdict(v <= 3.0, "<= 3 MiB")),
        _ => (String::new(), String::new()),
    }
}
