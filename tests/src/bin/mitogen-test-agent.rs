//! The test agent: registers the test functions. Started by hand with `tree`, it acts as a
//! master that builds child + grandchild (the grandchild hung in a call), prints
//! `PIDS <child> <grandchild>` and waits to be killed.

use mitogen::{Local, Router};
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    mitogen::run_if_child(mitogen_tests::registry());
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode != "tree" {
        anyhow::bail!("usage: mitogen-test-agent tree");
    }
    let router = Router::new()?;
    let child = router.local(Local::new())?;
    let grandchild = router.local(Local::new().via(&child))?;
    let pid_c = child.call(mitogen::builtins::getpid, ())?;
    let pid_g = grandchild.call(mitogen::builtins::getpid, ())?;
    let _hung = grandchild.call_async(mitogen_tests::hang, ())?;
    println!("PIDS {pid_c} {pid_g}");
    std::thread::sleep(Duration::from_secs(3600));
    Ok(())
}
