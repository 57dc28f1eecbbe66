//! `mitogen-soak [--local N] [--sudo N]`: N connect / call / shutdown cycles of local
//! contexts (and of sudo ones, with the test accounts), sampling this master's open fds,
//! threads, zombie children and RSS 20 times along the way. Fails if anything grows
//! after the warm-up (the first sample): fds, threads and zombies must come back to
//! it, RSS may not grow by more than 4 MiB. Run it with `cargo xtask soak`.

use mitogen::{Local, Router, Sudo};
use mitogen_tests::{add, hygiene, zombies_after};
use std::time::{Duration, Instant};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn soak(what: &str, cycles: u64, connect: impl Fn(&Router) -> mitogen::Context) -> bool {
    let r = Router::new().expect("router");
    let every = (cycles / 20).max(1);
    let mut samples = Vec::new();
    let started = Instant::now();
    for i in 1..=cycles {
        let c = connect(&r);
        assert_eq!(c.call(add, (i as i64, 1)).expect("call"), i as i64 + 1);
        c.shutdown(Duration::from_secs(10)).expect("shutdown");
        if i % every == 0 {
            let z = zombies_after(Duration::from_secs(5));
            let h = hygiene();
            samples.push((i, h.fds, h.threads, z, rss_kib()));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{what}: {cycles} cycles in {secs:.1} s ({:.2} ms each)", secs * 1000.0 / cycles as f64);
    println!("{:>8} {:>5} {:>8} {:>8} {:>9}", "cycle", "fds", "threads", "zombies", "RSS KiB");
    for (i, fds, threads, z, rss) in &samples {
        println!("{i:>8} {fds:>5} {threads:>8} {z:>8} {rss:>9}");
    }
    let (_, fds0, th0, _, rss0) = samples[0];
    let (_, fds1, th1, z1, rss1) = *samples.last().expect("samples");
    let ok = fds1 <= fds0 && th1 <= th0 && z1 == 0 && rss1 <= rss0 + 4096;
    println!(
        "{what}: {} (fds {fds0} -> {fds1}, threads {th0} -> {th1}, zombies {z1}, RSS {rss0} -> {rss1} KiB)",
        if ok { "no growth" } else { "GROWTH" }
    );
    ok
}

fn main() {
    mitogen::run_if_child(mitogen_tests::registry());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (local, sudo) =
        (mitogen_tests::flag(&args, "--local", 10_000), mitogen_tests::flag(&args, "--sudo", 1_000));
    let agent = std::env::current_exe().expect("own path").with_file_name("mitogen-test-agent");
    let mut ok = true;
    if local > 0 {
        ok &= soak("local", local, |r| r.local(Local::new().program(&agent)).expect("local context"));
    }
    if sudo > 0 {
        mitogen_tests::accounts::ensure();
        let spec = || Sudo::new().username(mitogen_tests::accounts::USER_A).program(&agent);
        ok &= soak("sudo", sudo, |r| r.sudo(spec()).expect("sudo context"));
    }
    if !ok {
        std::process::exit(1);
    }
}
