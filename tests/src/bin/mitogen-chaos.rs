//! `mitogen-chaos --seed N --secs S`: the chaos run of `mitogen_tests::chaos` against the
//! test agent next to this binary. Run it with `cargo xtask chaos`.

fn main() {
    mitogen::run_if_child(mitogen_tests::registry());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{flag} takes a number")))
            .unwrap_or(default)
    };
    let (seed, secs) = (get("--seed", 1), get("--secs", 30));
    let exe = std::env::current_exe().expect("own path");
    let agent = exe.with_file_name("mitogen-test-agent");
    match mitogen_tests::chaos::run(&agent.display().to_string(), seed, secs) {
        Ok(r) => println!(
            "chaos ok: seed {seed}, {secs} s: {} operations ok, {} typed errors, {} kills, {} stops, {} garbage, {} connects, {} processes, {} values corrupted by a node's own garbage, slowest {:?}",
            r.ok, r.failed, r.kills, r.stops, r.garbage, r.connects, r.processes, r.corrupted, r.slowest
        ),
        Err(f) => {
            eprintln!("chaos FAILED: {}", f.0);
            std::process::exit(1);
        }
    }
}
