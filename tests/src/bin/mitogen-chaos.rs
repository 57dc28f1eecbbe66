//! `mitogen-chaos --seed N --secs S`: the chaos run of `mitogen_tests::chaos` against the
//! test agent next to this binary. Run it with `cargo xtask chaos`.

fn main() {
    mitogen::run_if_child(mitogen_tests::registry());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (seed, secs) = (mitogen_tests::flag(&args, "--seed", 1), mitogen_tests::flag(&args, "--secs", 30));
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
