//! The main job: builds a small local tree (including a `via` hop), calls functions in it,
//! streams data back, and prints results and timings.
//!
//! Run it with `cargo run --release -p mitogen --example demo`.

use mitogen::{Bytes, Local, Router, Sender};
use std::time::{Duration, Instant};

mitogen::remote_fn! {
    /// Returns who and where we are.
    pub fn whoami() -> (u32, String) {
        (std::process::id(), std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default())
    }
}

mitogen::remote_fn! {
    /// Adds two numbers.
    pub fn add(a: i64, b: i64) -> i64 { a + b }
}

mitogen::remote_fn! {
    /// Streams `n` blocks of `size` bytes back through `out`.
    pub fn produce(n: u32, size: u32, out: Sender<Bytes>) -> Result<(), mitogen::CallError> {
        for i in 0..n {
            out.send(&Bytes(vec![i as u8; size as usize]))?;
        }
        Ok(())
    }
}

mitogen::remote_fn! {
    /// Fails on purpose, to show how remote errors look.
    pub fn fail(path: String) -> Result<Vec<u8>, std::io::Error> { std::fs::read(path) }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    mitogen::run_if_child(
        mitogen::Registry::new().register(whoami).register(add).register(produce).register(fail),
    );

    let t0 = Instant::now();
    let router = Router::new()?;
    let a = router.local(Local::new())?;
    let t_a = t0.elapsed();
    let b = router.local(Local::new().via(&a))?;
    let t_b = t0.elapsed() - t_a;
    println!("master pid {}", std::process::id());
    println!("started {:<24} in {:>8.2?}", a.name(), t_a);
    println!("started {:<24} in {:>8.2?} (via {})", b.name(), t_b, a.name());

    for ctx in [&a, &b] {
        let t = Instant::now();
        let (pid, cwd) = ctx.call(whoami, ())?;
        println!("{:<24} whoami -> pid {pid}, cwd {cwd} ({:.2?})", ctx.name(), t.elapsed());
    }

    // Round trips.
    for ctx in [&a, &b] {
        let n = 2000;
        let t = Instant::now();
        for i in 0..n {
            assert_eq!(ctx.call(add, (i, 1))?, i + 1);
        }
        let per = t.elapsed() / n as u32;
        println!("{:<24} add() round trip: {per:.2?} per call over {n} calls", ctx.name());
    }

    // Streaming from the grandchild.
    let rx = mitogen::Receiver::<Bytes>::new(router.broker())?;
    let t = Instant::now();
    b.call(produce, (64, 1 << 20, rx.sender()))?;
    let mut total = 0usize;
    for block in rx {
        total += block?.len();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:<24} streamed {} MiB in {:.2?} ({:.0} MiB/s)",
        b.name(),
        total >> 20,
        t.elapsed(),
        (total >> 20) as f64 / secs
    );

    match b.call(fail, ("/nonexistent/file".into(),)) {
        Err(e) => println!("remote error, as expected: {e}"),
        Ok(_) => println!("unexpected success"),
    }

    let t = Instant::now();
    a.shutdown(Duration::from_secs(5))?;
    println!("shut down {} and {} in {:.2?}", a.name(), b.name(), t.elapsed());
    println!("total {:.2?}", t0.elapsed());
    Ok(())
}
