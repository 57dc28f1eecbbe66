//! `cargo xtask fuzz [--smoke | --merge] [--runs N] [TARGET...]`: the cargo-fuzz targets
//! in `fuzz/`.
//!
//! Each target runs from its committed corpus (`fuzz/corpus/<target>`, read-only here; new
//! inputs go to `target/fuzz/corpus/<target>`) with its dictionary (`fuzz/dicts`), under
//! memory limits: `-rss_limit_mb` for the process and `-malloc_limit_mb` for any single
//! allocation, so a parser that allocates what a hostile length prefix claims fails the
//! run. By default each target runs 10 million executions; `--smoke` runs each for
//! 30 seconds (CI). The figures (executions, peak RSS) are printed per target at the end.
//! `--merge` folds what the runs found into the committed corpora, minimized (`cargo fuzz
//! cmin`: the smallest set with the same coverage).

use super::{root, run};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// Every target, in the order they run.
const TARGETS: &[&str] = &["frame_decoder", "value_decode", "first_stage", "login_dialogues", "router"];
/// Memory of the whole process (ASan's shadow memory included).
const RSS_LIMIT_MB: u32 = 2048;
/// Largest single allocation: the targets' own limits are far below it.
const MALLOC_LIMIT_MB: u32 = 64;
const SMOKE_SECS: u32 = 30;
const DEFAULT_RUNS: u64 = 10_000_000;

/// `cargo fuzz` on the nightly toolchain, with this (stable) cargo's variables removed.
fn cargo_fuzz() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"]);
    for v in ["CARGO", "RUSTC", "RUSTUP_TOOLCHAIN", "RUSTFLAGS", "CARGO_TARGET_DIR"] {
        c.env_remove(v);
    }
    c
}

fn ensure_tools() -> Result<()> {
    let nightly = Command::new("rustup").args(["run", "nightly", "rustc", "--version"]).output();
    if !nightly.is_ok_and(|o| o.status.success()) {
        bail!("the fuzzers need a nightly toolchain (`rustup toolchain install nightly`)");
    }
    let have = cargo_fuzz().arg("--version").output().is_ok_and(|o| o.status.success());
    if !have {
        run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}

pub(crate) fn fuzz(args: &[String]) -> Result<()> {
    let mut smoke = false;
    let mut merge = false;
    let mut runs = DEFAULT_RUNS;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--merge" => merge = true,
            "--runs" => runs = it.next().context("--runs N")?.parse().context("--runs N")?,
            t if TARGETS.contains(&t) => targets.push(t),
            other => bail!("unknown fuzz target or flag {other:?} (targets: {})", TARGETS.join(", ")),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    ensure_tools()?;
    let fuzz_dir = root().join("fuzz");
    run(cargo_fuzz().args(["build", "-O"]))?;
    if merge {
        for t in targets {
            let seeds = fuzz_dir.join("corpus").join(t);
            let found = root().join("target/fuzz/corpus").join(t);
            for e in std::fs::read_dir(&found).into_iter().flatten().flatten() {
                std::fs::copy(e.path(), seeds.join(e.file_name()))?;
            }
            run(cargo_fuzz().args(["cmin", "-O", t]).arg(&seeds))?;
        }
        return Ok(());
    }
    let mut figures = Vec::new();
    for t in targets {
        let work = root().join("target/fuzz/corpus").join(t);
        std::fs::create_dir_all(&work)?;
        let seeds = fuzz_dir.join("corpus").join(t);
        let log = root().join("target/fuzz").join(format!("{t}.log"));
        let mut cmd = cargo_fuzz();
        cmd.args(["run", "-O", t]).arg(&work).arg(&seeds).arg("--");
        cmd.arg(format!("-dict={}", fuzz_dir.join("dicts").join(format!("{t}.dict")).display()));
        cmd.arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"));
        cmd.arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"));
        cmd.args(["-print_final_stats=1", "-close_fd_mask=1"]);
        if smoke {
            cmd.arg(format!("-max_total_time={SMOKE_SECS}"));
        } else {
            cmd.arg(format!("-runs={runs}"));
        }
        eprintln!("fuzzing {t} (log: {})", log.display());
        let out = std::fs::File::create(&log)?;
        let st = cmd.current_dir(root()).stdout(out.try_clone()?).stderr(out).status()?;
        let stats = final_stats(&log)?;
        if !st.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {t} failed ({st}); the input is under fuzz/artifacts/{t}/:\n{}",
                tail.join("\n")
            );
        }
        figures.push((t, stats));
    }
    println!("{:<16} {:>14} {:>10} {:>12}", "target", "executions", "secs", "peak RSS MB");
    for (t, (execs, secs, rss)) in figures {
        println!("{t:<16} {execs:>14} {secs:>10} {rss:>12}");
    }
    Ok(())
}

/// `(executions, seconds, peak RSS in MB)` from libFuzzer's final statistics.
fn final_stats(log: &Path) -> Result<(u64, u64, u64)> {
    let text = std::fs::read_to_string(log)?;
    let stat = |name: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .filter_map(|v| v.trim().parse().ok())
            .next_back()
            .unwrap_or(0)
    };
    let secs = text
        .lines()
        .filter_map(|l| l.strip_prefix("Done ").and_then(|r| r.split(" in ").nth(1)))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .next_back()
        .unwrap_or(0);
    Ok((stat("number_of_executed_units"), secs, stat("peak_rss_mb")))
}
