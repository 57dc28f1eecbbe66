use crate::{agent, ssh};
use mitogen::{ConnectError, Container, Router, Sudo};
use mitogen_tests::e2e::{E2e, PrivateHost};
use mitogen_tests::*;
use std::time::Duration;

#[test]
fn docker_exec_into_containers_as_an_account() {
    let e = E2e::get();
    let r = Router::new().unwrap();
    let c = r
        .container(Container::docker(e.container("plain")).username("mitogen-test-key").program(agent()))
        .unwrap();
    assert_eq!(c.name(), format!("docker.{}", e.container("plain")));
    let (exe, _) = c.call(whoami, ()).unwrap();
    assert!(exe.starts_with("/memfd:"), "{exe}");
    let out = c.call(mitogen::builtins::run_command, (vec!["id".into(), "-un".into()],)).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "mitogen-test-key");
    // Without perl or python in the container: the unlinked-file loader.
    let c = r.container(Container::docker(e.container("noperl")).program(agent())).unwrap();
    let (exe, _) = c.call(whoami, ()).unwrap();
    assert!(exe.ends_with("(deleted)"), "{exe}");
    assert_eq!(c.call(uids, ()).unwrap().0, 0);
}

#[test]
fn podman_exec_into_a_container_as_root_and_as_an_account() {
    let e = E2e::get();
    let name = e.podman();
    let r = Router::new().unwrap();
    let c = r.container(Container::podman(&name).program(agent())).unwrap();
    assert_eq!(c.name(), format!("podman.{name}"));
    let (exe, _) = c.call(whoami, ()).unwrap();
    assert!(exe.starts_with("/memfd:"), "{exe}");
    assert_eq!(c.call(uids, ()).unwrap().0, 0);
    let c = r.container(Container::podman(&name).username("mitogen-test-key").program(agent())).unwrap();
    let out = c.call(mitogen::builtins::run_command, (vec!["id".into(), "-un".into()],)).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "mitogen-test-key");
    c.shutdown(Duration::from_secs(10)).unwrap();
    // The account's agent is gone (bounded wait: its exit is reaped by podman), the root
    // one still runs.
    let agents = || {
        let out = std::process::Command::new("podman")
            .args(["exec", &name, "ps", "-eo", "user:20,args"])
            .output()
            .expect("podman exec ps");
        let ps = String::from_utf8_lossy(&out.stdout).into_owned();
        ps.lines()
            .filter(|l| l.split_whitespace().nth(1).is_some_and(|a| a.starts_with("mitogen:")))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while agents() != ["root"] && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(agents(), ["root"]);
}

#[test]
fn a_missing_container_is_a_typed_error() {
    let r = Router::new().unwrap();
    let err = r.container(Container::docker("mitogen-e2e-does-not-exist").program(agent())).unwrap_err();
    match err {
        ConnectError::Login { error: mitogen::LoginError::Refused { method: "docker", line }, .. } => {
            assert!(line.contains("No such container"), "{line}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// A call hangs in `c`; `fault` breaks its container's host; the call must fail as
/// disconnected within `bound`, later calls say "no route", and no child is left a zombie
/// once `reaped` has passed.
fn pending_call_fails_when(
    c: &mitogen::Context,
    h: &PrivateHost,
    fault: impl FnOnce(&PrivateHost),
    bound: Duration,
    reaped: Duration,
) {
    let mut pending = c.call_async(hang, ()).unwrap();
    let t = std::time::Instant::now();
    fault(h);
    let err = pending.get(Some(Duration::from_secs(30))).unwrap_err();
    assert_eq!(err.dead_reason(), Some(mitogen::DeadReason::Disconnected), "{err:?}");
    assert!(t.elapsed() < bound, "{:?}", t.elapsed());
    assert_eq!(c.call(add, (1, 1)).unwrap_err().dead_reason(), Some(mitogen::DeadReason::NoRoute));
    assert_eq!(zombies_after(reaped), 0);
}

#[test]
fn container_paused_mid_call_fails_within_the_heartbeat_bound() {
    let e = E2e::get();
    let h = e.private_host("dpause");
    let r = Router::new().unwrap();
    let beat = Some(Duration::from_secs(1));
    let c = r.container(Container::docker(h.container()).program(agent()).heartbeat(beat, 2)).unwrap();
    // Idle past the bound while healthy: kept.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(c.call(add, (1, 2)).unwrap(), 3);
    // `docker exec`'s client and its pipes stay up: only the heartbeat can tell. 1 s x (2 +
    // 1) of silence, checked once a second.
    pending_call_fails_when(&c, &h, |h| h.pause(), Duration::from_secs(6), Duration::from_secs(6));
}

#[test]
fn container_killed_mid_call_fails_the_pending_call() {
    let e = E2e::get();
    let h = e.private_host("dkill");
    let r = Router::new().unwrap();
    let c = r.container(Container::docker(h.container()).program(agent())).unwrap();
    pending_call_fails_when(&c, &h, |h| h.kill(), Duration::from_secs(10), Duration::from_secs(2));
}

per_backend! {
    fn docker_exec_through_ssh_and_sudo_on_a_container_host(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        // plain has the engine's socket; only root may use it.
        let host = r.ssh(ssh(b, &e, "plain", "sudo")).unwrap();
        let root = r.sudo(Sudo::new().via(&host)).unwrap();
        let c = r
            .container(Container::docker(e.container("noexec")).username("mitogen-test-key").via(&root))
            .unwrap();
        assert_eq!(c.name(), format!("ssh.{}.sudo.root.docker.{}", e.ip("plain"), e.container("noexec")));
        let data = mitogen::Bytes(block(2, 2, 2 << 20));
        assert_eq!(c.call(echo, (data.clone(),)).unwrap(), data);
    }
}
