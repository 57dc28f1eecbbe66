use crate::agent;
use mitogen::{DeadReason, HostKeyPolicy, Router, Ssh, SshBackend};
use mitogen_tests::e2e::{E2e, PrivateHost};
use mitogen_tests::*;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

fn to(b: SshBackend, e: &E2e, ip: &str) -> Ssh {
    Ssh::new(ip)
        .backend(b)
        .username("mitogen-test-key")
        .identity_file(e.key())
        .identities_only(true)
        .check_host_keys(HostKeyPolicy::Ignore)
        .keepalive(Some(Duration::from_secs(1)), 2)
        .program(agent())
        .connect_timeout(Duration::from_secs(30))
}

/// A call hangs on a private host; `fault` breaks the host; the call must fail with
/// "disconnected" within the keepalive bound (1 s x 2, plus slack), and later calls say
/// "no route". With `via`, the hop is made by the shared `plain` host, which must not keep
/// an ssh client for it.
fn pending_call_fails_when(b: SshBackend, tag: &str, fault: impl FnOnce(&PrivateHost), via_plain: bool) {
    let e = E2e::get();
    let h = e.private_host(tag);
    let r = Router::new().unwrap();
    let (ctx, mid) = if via_plain {
        let mid = r.ssh(crate::ssh(b, &e, "plain", "key")).unwrap();
        let s = Ssh::new(&h.ip)
            .backend(b)
            .username("mitogen-test-key")
            .check_host_keys(HostKeyPolicy::Ignore)
            .keepalive(Some(Duration::from_secs(1)), 2);
        (r.ssh(s.via(&mid)).unwrap(), Some(mid))
    } else {
        (r.ssh(to(b, &e, &h.ip)).unwrap(), None)
    };
    assert_eq!(ctx.call(add, (1, 2)).unwrap(), 3);
    let mut pending = ctx.call_async(hang, ()).unwrap();
    let t = Instant::now();
    fault(&h);
    let err = pending.get(Some(Duration::from_secs(30))).unwrap_err();
    assert_eq!(err.dead_reason(), Some(DeadReason::Disconnected), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "noticed after {:?}", t.elapsed());
    eprintln!("{tag}: the pending call failed {:?} after the fault", t.elapsed());
    let err = ctx.call(add, (1, 2)).unwrap_err();
    assert_eq!(err.dead_reason(), Some(DeadReason::NoRoute), "{err:?}");
    if let Some(mid) = mid {
        assert_eq!(mid.call(add, (2, 2)).unwrap(), 4, "the intermediary survives");
        let ps = e.exec("plain", "ps -eo args");
        let left: Vec<&str> = ps.lines().filter(|l| l.starts_with("ssh ") && l.contains(&h.ip)).collect();
        assert!(left.is_empty(), "left running on plain: {left:?}");
    }
    assert_eq!(zombies_after(Duration::from_secs(2)), 0);
}

per_backend! {
    /// Keepalives never end a healthy idle connection: 1 s x 2 probes, 5 s idle.
    fn an_idle_healthy_connection_outlives_its_keepalive_bound(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let c = r.ssh(to(b, &e, &e.ip("plain"))).unwrap();
        assert_eq!(c.call(add, (1, 2)).unwrap(), 3);
        std::thread::sleep(Duration::from_secs(5));
        assert_eq!(c.call(add, (2, 3)).unwrap(), 5);
    }

    fn host_killed_mid_call_through_an_intermediary(b: SshBackend) {
        pending_call_fails_when(b, "kill", |h| h.kill(), true);
    }
    fn host_paused_mid_call(b: SshBackend) {
        pending_call_fails_when(b, "pause", |h| h.pause(), false);
    }
    fn host_cut_off_from_its_network_mid_call(b: SshBackend) {
        pending_call_fails_when(b, "cut", |h| h.cut(), false);
    }
    fn sigkill_master_leaves_no_agent_on_any_host_after_a_second(b: SshBackend) {
        let e = E2e::get();
        let mut master = std::process::Command::new(agent())
            .args(["ssh-tree", if b == SshBackend::Libssh2 { "libssh2" } else { "openssh" }, &e.ip("plain"), &e.ip("noperl")])
            .arg(e.key())
            .arg(e.known_hosts())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(master.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let pids: Vec<u32> = line.split_whitespace().skip(1).map(|p| p.parse().unwrap()).collect();
        assert_eq!(pids.len(), 2, "{line:?}");
        master.kill().unwrap();
        let killed = Instant::now();
        master.wait().unwrap();
        std::thread::sleep(Duration::from_secs(1).saturating_sub(killed.elapsed()));
        for (host, pid) in [("plain", pids[0]), ("noperl", pids[1])] {
            let alive = e.exec(host, &format!("cat /proc/{pid}/cmdline 2>/dev/null"));
            assert!(!alive.starts_with("mitogen:"), "agent {pid} on {host} runs 1 s after the master died");
        }
    }
    fn a_hung_host_at_connect_time_hits_the_connect_timeout(b: SshBackend) {
        let e = E2e::get();
        let h = e.private_host("hung");
        // Its kernel still accepts TCP connections, but sshd never answers.
        h.pause();
        let r = Router::new().unwrap();
        let started = Instant::now();
        let err = r.ssh(to(b, &e, &h.ip).connect_timeout(Duration::from_secs(2))).unwrap_err();
        // ssh's own ConnectTimeout is what is left of ours: whichever fires first, the error
        // is a typed timeout.
        match &err {
            mitogen::ConnectError::Timeout { .. } => {}
            mitogen::ConnectError::Login { error: mitogen::LoginError::ConnectTimedOut { host }, output } => {
                assert_eq!(host, &h.ip);
                assert!(output.iter().any(|l| l.contains("timed out")), "{output:?}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert_eq!(zombies_after(Duration::from_secs(2)), 0, "ssh was not reaped");
    }
}
