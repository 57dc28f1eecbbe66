use crate::{agent, ssh};
use mitogen::{ConnectError, HostKeyPolicy, LoginError, Router, Ssh};
use mitogen_tests::e2e::{E2e, PW};
use mitogen_tests::*;
use std::time::{Duration, Instant};

fn login_error(err: ConnectError) -> (LoginError, Vec<String>) {
    match err {
        ConnectError::Login { error, output } => (error, output),
        other => panic!("expected a login error, got {other:?}"),
    }
}

#[test]
fn the_users_ssh_config_applies() {
    let e = E2e::get();
    let r = Router::new().unwrap();
    let dir = std::env::temp_dir().join(format!("mitogen-e2e-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config");
    std::fs::write(
        &cfg,
        format!(
            "Host e2e-alias\n  HostName {}\n  User mitogen-test-key\n  IdentityFile {}\n  UserKnownHostsFile {}\n",
            e.ip("plain"),
            e.key().display(),
            e.known_hosts().display()
        ),
    )
    .unwrap();
    let c = r
        .ssh(Ssh::new("e2e-alias").extra_args(vec!["-F".into(), cfg.display().to_string()]).program(agent()))
        .unwrap();
    assert_eq!(c.name(), "ssh.e2e-alias");
    let out = c.call(mitogen::builtins::run_command, (vec!["id".into(), "-un".into()],)).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "mitogen-test-key");
    // ProxyJump through another host, from the same config.
    std::fs::write(
        &cfg,
        format!(
            "Host e2e-jump\n  HostName {}\n  User mitogen-test-key\n  IdentityFile {key}\n  UserKnownHostsFile {kh}\n\
             Host e2e-behind\n  HostName {}\n  User mitogen-test-key\n  IdentityFile {key}\n  UserKnownHostsFile {kh}\n  ProxyJump e2e-jump\n",
            e.ip("plain"),
            e.ip("noperl"),
            key = e.key().display(),
            kh = e.known_hosts().display()
        ),
    )
    .unwrap();
    let c = r
        .ssh(Ssh::new("e2e-behind").extra_args(vec!["-F".into(), cfg.display().to_string()]).program(agent()))
        .unwrap();
    assert_eq!(c.call(add, (5, 5)).unwrap(), 10);
    let _ = std::fs::remove_dir_all(&dir);
}

per_backend! {
    fn key_login_runs_the_agent_from_memory(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let c = r.ssh(ssh(b, &e, "plain", "key")).unwrap();
        assert_eq!(c.name(), format!("ssh.{}", e.ip("plain")));
        let (exe, argv0) = c.call(whoami, ()).unwrap();
        assert!(exe.starts_with("/memfd:"), "{exe}");
        assert!(argv0.starts_with("mitogen:"), "{argv0}");
        let out = c.call(mitogen::builtins::run_command, (vec!["id".into(), "-un".into()],)).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "mitogen-test-key");
        // Bulk both ways over ssh.
        let data = mitogen::Bytes(block(3, 1, 4 << 20));
        assert_eq!(c.call(echo, (data.clone(),)).unwrap(), data);
        // Nothing was written in the account: no cache directory, no file.
        let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
        c.shutdown(Duration::from_secs(10)).unwrap();
        let left =
            e.exec("plain", "ls -A /home/mitogen-test-key; ls /home/mitogen-test-key/.cache 2>&1");
        assert!(!left.contains(".cache\n") || left.contains("No such file"), "{left}");
        let until = Instant::now() + Duration::from_secs(5);
        while !e.exec("plain", &format!("kill -0 {pid} 2>/dev/null && echo alive")).is_empty() {
            assert!(Instant::now() < until, "the agent is still running after shutdown");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    fn hosts_without_perl_or_with_noexec_tmp_use_an_unlinked_file(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let c = r.ssh(ssh(b, &e, "noperl", "key")).unwrap();
        let (exe, _) = c.call(whoami, ()).unwrap();
        assert!(!exe.starts_with("/memfd:") && exe.ends_with("(deleted)"), "{exe}");
        // /tmp and /dev/shm are noexec there: the file is made in a directory that allows exec.
        let c = r.ssh(ssh(b, &e, "noexec", "key")).unwrap();
        let (exe, _) = c.call(whoami, ()).unwrap();
        assert!(
            exe.ends_with("(deleted)") && !exe.starts_with("/tmp/") && !exe.starts_with("/dev/shm/"),
            "{exe}"
        );
        assert_eq!(c.call(add, (20, 22)).unwrap(), 42);
    }
    fn a_low_open_files_limit_is_enough(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let c = r.ssh(ssh(b, &e, "lowfd", "key")).unwrap();
        let out = c.call(mitogen::builtins::run_command, (vec!["sh".into(), "-c".into(), "ulimit -n".into()],));
        assert_eq!(String::from_utf8_lossy(&out.unwrap().stdout).trim(), "64");
        let data = mitogen::Bytes(block(4, 1, 8 << 20));
        assert_eq!(c.call(echo, (data.clone(),)).unwrap(), data);
    }
    fn password_login_right_wrong_and_missing(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let base = || {
            Ssh::new(e.ip("plain")).backend(b).username("mitogen-test-pw").known_hosts_file(e.known_hosts()).program(agent())
        };
        let c = r.ssh(base().password(PW)).unwrap();
        assert_eq!(c.call(add, (1, 1)).unwrap(), 2);
        let err = r.ssh(base().password("not-the-password")).unwrap_err();
        assert!(!format!("{err:?}").contains("not-the-password"), "the password leaked");
        assert_eq!(login_error(err).0, LoginError::PasswordIncorrect { method: "ssh" });
        // BatchMode without a password: refused at once, never a prompt.
        let started = Instant::now();
        let (error, output) = login_error(r.ssh(base()).unwrap_err());
        assert_eq!(error, LoginError::PasswordRequired { method: "ssh" });
        assert!(output.iter().any(|l| l.contains("Permission denied")), "{output:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    fn banner_and_a_profile_printing_permission_denied_are_not_errors(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        // Every host shows a banner with "password"; this account's shell prints
        // "Permission denied" and another "password" line before anything runs.
        let c = r.ssh(ssh(b, &e, "plain", "noisy")).unwrap();
        assert_eq!(c.call(add, (2, 2)).unwrap(), 4);
    }
    fn host_keys_unknown_changed_accepted_and_ignored(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let dir = std::env::temp_dir().join(format!("mitogen-e2e-kh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, "").unwrap();
        let (error, _) = login_error(r.ssh(ssh(b, &e, "plain", "key").known_hosts_file(&empty)).unwrap_err());
        assert_eq!(error, LoginError::HostKeyUnknown { host: e.ip("plain") });
        // noperl's keys recorded under plain's address: a changed key.
        let known = std::fs::read_to_string(e.known_hosts()).unwrap();
        let wrong: String = known
            .lines()
            .filter(|l| l.starts_with(&format!("{} ", e.ip("noperl"))))
            .map(|l| format!("{}{}\n", e.ip("plain"), &l[e.ip("noperl").len()..]))
            .collect();
        let changed = dir.join("changed");
        std::fs::write(&changed, wrong).unwrap();
        let (error, _) = login_error(r.ssh(ssh(b, &e, "plain", "key").known_hosts_file(&changed)).unwrap_err());
        assert_eq!(error, LoginError::HostKeyChanged { host: e.ip("plain") });
        // accept: a new key is recorded; ignore: nothing is checked or recorded.
        let fresh = dir.join("fresh");
        let c = r
            .ssh(ssh(b, &e, "plain", "key").known_hosts_file(&fresh).check_host_keys(HostKeyPolicy::Accept))
            .unwrap();
        assert_eq!(c.call(add, (1, 2)).unwrap(), 3);
        // (Debian hashes known_hosts entries: ask ssh-keygen.)
        let found =
            std::process::Command::new("ssh-keygen").args(["-F", &e.ip("plain"), "-f"]).arg(&fresh).output();
        assert!(found.unwrap().status.success(), "the accepted key was not recorded");
        let c = r
            .ssh(ssh(b, &e, "plain", "key").known_hosts_file(&changed).check_host_keys(HostKeyPolicy::Ignore))
            .unwrap();
        assert_eq!(c.call(add, (1, 3)).unwrap(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }
    fn refused_port_and_slow_login_are_typed_and_bounded(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let (error, output) = login_error(r.ssh(ssh(b, &e, "plain", "key").port(2)).unwrap_err());
        assert_eq!(error, LoginError::ConnectionRefused { host: e.ip("plain") });
        assert!(output.iter().any(|l| l.contains("Connection refused")), "{output:?}");
        // A login shell that sleeps: the connect timeout holds and ssh is reaped.
        let started = Instant::now();
        let err = r.ssh(ssh(b, &e, "plain", "slow").connect_timeout(Duration::from_secs(2))).unwrap_err();
        assert!(matches!(err, ConnectError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert_eq!(zombies_after(Duration::from_secs(2)), 0, "ssh was not reaped");
    }
}
