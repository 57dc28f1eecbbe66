//! The test agent: registers the test functions. Started by hand with `tree`, it acts as a
//! master that builds child + grandchild (the grandchild hung in a call), prints
//! `PIDS <child> <grandchild>` and waits to be killed. `ssh-tree BACKEND IP1 IP2 KEY
//! KNOWN_HOSTS` does the same over ssh (`openssh` or `libssh2`): IP1 as the child, IP2
//! reached from IP1.

use mitogen::{HostKeyPolicy, Local, Router, Ssh, SshBackend};
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    mitogen::run_if_child(mitogen_tests::registry());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let router = Router::new()?;
    let (child, grandchild) = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["tree"] => {
            let child = router.local(Local::new())?;
            let grandchild = router.local(Local::new().via(&child))?;
            (child, grandchild)
        }
        ["ssh-tree", backend, ip1, ip2, key, known_hosts] => {
            let backend = if backend == "libssh2" { SshBackend::Libssh2 } else { SshBackend::OpenSsh };
            let child = router.ssh(
                Ssh::new(ip1)
                    .backend(backend)
                    .username("mitogen-test-key")
                    .identity_file(key)
                    .known_hosts_file(known_hosts),
            )?;
            let hop = Ssh::new(ip2)
                .backend(backend)
                .username("mitogen-test-key")
                .check_host_keys(HostKeyPolicy::Ignore);
            let grandchild = router.ssh(hop.via(&child))?;
            (child, grandchild)
        }
        _ => anyhow::bail!("usage: mitogen-test-agent tree | ssh-tree BACKEND IP1 IP2 KEY KNOWN_HOSTS"),
    };
    let pid_c = child.call(mitogen::builtins::getpid, ())?;
    let pid_g = grandchild.call(mitogen::builtins::getpid, ())?;
    let _hung = grandchild.call_async(mitogen_tests::hang, ())?;
    println!("PIDS {pid_c} {pid_g}");
    std::thread::sleep(Duration::from_secs(3600));
    Ok(())
}
