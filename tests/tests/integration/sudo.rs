//! Real sudo, su and doas, with test accounts (see `mitogen_tests::accounts`).

use crate::{agent, local};
use mitogen::{ConnectError, Doas, Local, LoginError, Router, Su, Sudo};
use mitogen_tests::accounts::*;
use mitogen_tests::*;
use std::time::Duration;

fn uid_of(user: &str) -> u32 {
    let out = std::process::Command::new("id").args(["-u", user]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

fn sudo(user: &str) -> Sudo {
    Sudo::new().username(user).program(agent()).connect_timeout(Duration::from_secs(20))
}

fn su(user: &str) -> Su {
    Su::new().username(user).program(agent()).connect_timeout(Duration::from_secs(20))
}

fn doas(user: &str) -> Doas {
    Doas::new().username(user).program(agent()).connect_timeout(Duration::from_secs(20))
}

/// Processes owned by `user`, as `pid command` lines.
fn processes_of(user: &str) -> Vec<String> {
    let uid = uid_of(user);
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let owner =
            status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next());
        if owner == Some(uid.to_string().as_str()) && !status.contains("State:\tZ") {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push(format!("{pid} {}", String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    found
}

fn assert_via_error(err: ConnectError, via: &str, needle: &str, secret: &str) {
    match err {
        ConnectError::Via { via: v, message } => {
            assert_eq!(v, via);
            assert!(message.contains(needle), "{message}");
            assert!(!message.contains(secret), "the password leaked: {message}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn passwordless_sudo_runs_the_agent_in_the_account_from_memory() {
    ensure();
    let r = Router::new().unwrap();
    let a = r.sudo(sudo(USER_A)).unwrap();
    assert_eq!(a.name(), format!("sudo.{USER_A}"));
    let (uid, euid) = a.call(uids, ()).unwrap();
    assert_eq!((uid, euid), (uid_of(USER_A), uid_of(USER_A)));
    let pid = a.call(mitogen::builtins::getpid, ()).unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.display().to_string().starts_with("/memfd:"), "{exe:?}");
    a.shutdown(Duration::from_secs(10)).unwrap();
    assert!(wait_gone(pid, Duration::from_secs(10)));
}

#[test]
fn same_host_sudo_and_doas_run_one_sealed_image_handed_over_as_stdin() {
    ensure_doas();
    let r = Router::new().unwrap();
    let a = r.sudo(sudo(USER_A)).unwrap();
    let c = r.sudo(sudo(USER_C)).unwrap();
    let d = r.doas(doas(USER_B)).unwrap();
    let pids: Vec<u32> =
        [&a, &c, &d].iter().map(|x| x.call(mitogen::builtins::getpid, ()).unwrap()).collect();
    // One copy in memory for all of them: the master's sealed memfd.
    let inode = |pid: &u32| {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/proc/{pid}/exe")).unwrap())
    };
    assert!(pids.iter().all(|p| inode(p) == inode(&pids[0])), "{pids:?} run different copies");
    let exe = std::fs::read_link(format!("/proc/{}/exe", pids[0])).unwrap();
    assert!(exe.display().to_string().starts_with("/memfd:mitogen-image"), "{exe:?}");
    // The account can run and read it, never change it.
    let all = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(a.call(image_seals, ()).unwrap() & all, all);
    // stdin is no longer the image, and `ps` shows who started the agent.
    let stdin = std::fs::read_link(format!("/proc/{}/fd/0", pids[0])).unwrap();
    assert_eq!(stdin, std::path::Path::new("/dev/null"));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("mitogen:"), "{cmdline:?}");
    // A large call both ways over the one socket.
    let data = mitogen::Bytes(block(7, 3, 3 << 20));
    assert_eq!(c.call(echo, (data.clone(),)).unwrap(), data);
    // Through an intermediary: it hands over its own image (a copy of the master's).
    let b = r.sudo(sudo(USER_B).password(PW_A).via(&a)).unwrap();
    let pb = b.call(mitogen::builtins::getpid, ()).unwrap();
    let exe = std::fs::read_link(format!("/proc/{pb}/exe")).unwrap();
    assert!(exe.display().to_string().starts_with("/memfd:mitogen-image"), "{exe:?}");
}

#[test]
fn with_sudo_logging_input_and_output_the_image_is_sent_instead() {
    ensure();
    let r = Router::new().unwrap();
    // sudo puts pipes between us and the first stage: it finds its stdin is not the
    // image, and the master starts it again, sending the image over the stream.
    let g = r.sudo(sudo(USER_G)).unwrap();
    assert_eq!(g.call(uids, ()).unwrap().0, uid_of(USER_G));
    let pid = g.call(mitogen::builtins::getpid, ()).unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap().display().to_string();
    assert!(exe.starts_with("/memfd:mitogen") && !exe.contains("image"), "{exe}");
    let data = mitogen::Bytes(block(1, 2, 1 << 20));
    assert_eq!(g.call(echo, (data.clone(),)).unwrap(), data);
    g.shutdown(Duration::from_secs(10)).unwrap();
    assert!(wait_gone(pid, Duration::from_secs(10)));
    // Neither the refused first start nor the agent left anything running in G's account.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !processes_of(USER_G).is_empty() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_of(USER_G), Vec::<String>::new(), "left running");
}

#[test]
fn password_sudo_through_an_intermediary() {
    ensure();
    let r = Router::new().unwrap();
    let a = r.sudo(sudo(USER_A)).unwrap();
    let b = r.sudo(sudo(USER_B).password(PW_A).via(&a)).unwrap();
    assert_eq!(b.name(), format!("sudo.{USER_A}.sudo.{USER_B}"));
    assert_eq!(b.call(uids, ()).unwrap().0, uid_of(USER_B));
    // Passwordless from the same intermediary.
    let c = r.sudo(sudo(USER_C).via(&a)).unwrap();
    assert_eq!(c.call(uids, ()).unwrap().0, uid_of(USER_C));
}

#[test]
fn wrong_password_is_a_typed_error_and_is_not_retried() {
    ensure();
    let r = Router::new().unwrap();
    let a = r.sudo(sudo(USER_A)).unwrap();
    let err = r.sudo(sudo(USER_B).password("not-the-password").via(&a)).unwrap_err();
    match err {
        ConnectError::Via { via, message } => {
            assert_eq!(via, a.name());
            assert!(message.contains("password was incorrect"), "{message}");
            assert!(!message.contains("not-the-password"), "the password leaked: {message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // The intermediary is fine afterwards.
    assert_eq!(a.call(add, (1, 2)).unwrap(), 3);
}

#[test]
fn prompt_without_a_password_fails_at_once() {
    ensure();
    let r = Router::new().unwrap();
    let a = r.sudo(sudo(USER_A)).unwrap();
    let started = std::time::Instant::now();
    let err = r.sudo(sudo(USER_B).via(&a)).unwrap_err();
    assert!(err.to_string().contains("a password is required"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "waited for the connect timeout");
}

#[test]
fn requiretty_and_target_password_accounts_work() {
    ensure();
    // D's sudoers entry has `requiretty` and `targetpw`: sudo needs a terminal (the PTY)
    // and asks for B's password, not D's.
    let r = Router::new().unwrap();
    let d = r.sudo(sudo(USER_D)).unwrap();
    let b = r.sudo(sudo(USER_B).password(PW_B).via(&d)).unwrap();
    assert_eq!(b.call(uids, ()).unwrap().0, uid_of(USER_B));
    // D's own password is not B's: refused.
    let err = r.sudo(sudo(USER_B).password(PW_D).via(&d)).unwrap_err();
    assert!(err.to_string().contains("incorrect"), "{err}");
}

/// The controlling terminal of `pid` (`tty_nr` in /proc/PID/stat; 0 for none).
fn tty_of(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name, which ends at the last ')': state ppid pgrp session tty_nr.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(4).unwrap().parse().unwrap()
}

#[test]
fn without_a_password_sudo_gets_no_terminal_unless_requiretty_asks_for_one() {
    ensure();
    let r = Router::new().unwrap();
    // Passwordless: nothing to answer, so no PTY (and no monitor process of sudo's).
    let d = r.sudo(sudo(USER_D)).unwrap();
    assert_eq!(tty_of(d.call(mitogen::builtins::getpid, ()).unwrap()), 0);
    // D's sudo has `requiretty`: passwordless to C, sudo refuses the start without a
    // terminal, and it is made again with one.
    let c = r.sudo(sudo(USER_C).via(&d)).unwrap();
    assert_eq!(c.call(uids, ()).unwrap().0, uid_of(USER_C));
    assert_ne!(tty_of(c.call(mitogen::builtins::getpid, ()).unwrap()), 0);
    // Asked for, and for a login shell.
    let a = r.sudo(sudo(USER_A).tty(true)).unwrap();
    assert_ne!(tty_of(a.call(mitogen::builtins::getpid, ()).unwrap()), 0);
    let a = r.sudo(sudo(USER_A).login(true)).unwrap();
    assert_ne!(tty_of(a.call(mitogen::builtins::getpid, ()).unwrap()), 0);
}

#[test]
fn an_abandoned_start_without_a_terminal_leaves_nothing_running() {
    ensure();
    let r = Router::new().unwrap();
    // Connect timeouts that end the start at different points: before sudo runs, in
    // sudo, in the first stage, or not at all. However it ends, the account is left empty
    // (sudo passes our SIGTERM on to what it runs; there is no terminal to hang up).
    for ms in [1, 2, 4, 6, 8, 12] {
        match r.sudo(sudo(USER_H).connect_timeout(Duration::from_millis(ms))) {
            Ok(h) => h.shutdown(Duration::from_secs(10)).unwrap(),
            Err(ConnectError::Timeout { .. }) => {}
            Err(e) => panic!("{ms} ms: {e:?}"),
        }
    }
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !processes_of(USER_H).is_empty() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_of(USER_H), Vec::<String>::new(), "left running");
}

#[test]
fn errors_on_an_intermediary_are_typed_in_the_master_when_direct() {
    ensure();
    // Root is never asked for a password, so a direct login error needs an unprivileged
    // master: covered by the dialogue's unit tests; here the typed error's text is checked.
    let e = ConnectError::from(LoginError::PasswordIncorrect { method: "sudo" });
    assert_eq!(e.to_string(), "the sudo password was incorrect");
}

#[test]
fn local_through_sudo_and_sudo_through_local() {
    ensure();
    let r = Router::new().unwrap();
    let a = r.sudo(sudo(USER_A)).unwrap();
    // A local child of the sudo context runs as the same account.
    let la = r.local(Local::new().via(&a).connect_timeout(Duration::from_secs(20))).unwrap();
    assert_eq!(la.call(uids, ()).unwrap().0, uid_of(USER_A));
    // sudo started by a local child of the master.
    let l = local(&r);
    let s = r.sudo(sudo(USER_C).via(&l)).unwrap();
    assert_eq!(s.call(uids, ()).unwrap().0, uid_of(USER_C));
}

#[test]
fn su_as_root_then_with_a_password_through_an_intermediary() {
    ensure();
    let r = Router::new().unwrap();
    // root is not asked for a password.
    let a = r.su(su(USER_A)).unwrap();
    assert_eq!(a.name(), format!("su.{USER_A}"));
    assert_eq!(a.call(uids, ()).unwrap().0, uid_of(USER_A));
    let pid = a.call(mitogen::builtins::getpid, ()).unwrap();
    assert!(std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap()
        .display()
        .to_string()
        .starts_with("/memfd:"));
    // util-linux su reads the password from stdin: it goes over the stream.
    let b = r.su(su(USER_B).password(PW_B).via(&a)).unwrap();
    assert_eq!(b.name(), format!("su.{USER_A}.su.{USER_B}"));
    assert_eq!(b.call(uids, ()).unwrap().0, uid_of(USER_B));
    let err = r.su(su(USER_B).password("not-the-password").via(&a)).unwrap_err();
    assert_via_error(err, a.name(), "su password was incorrect", "not-the-password");
    let err = r.su(su(USER_B).via(&a)).unwrap_err();
    assert_via_error(err, a.name(), "a password is required", "\0");
    // Over pipes too, and the intermediary is fine afterwards.
    let b2 = r.su(su(USER_B).password(PW_B).pipes(true).via(&a)).unwrap();
    assert_eq!(b2.call(add, (2, 2)).unwrap(), 4);
    assert_eq!(a.call(add, (1, 2)).unwrap(), 3);
}

#[test]
fn doas_passwordless_with_a_password_and_refused() {
    ensure_doas();
    let r = Router::new().unwrap();
    let a = r.doas(doas(USER_A)).unwrap();
    assert_eq!(a.name(), format!("doas.{USER_A}"));
    assert_eq!(a.call(uids, ()).unwrap().0, uid_of(USER_A));
    // A may become B with A's own password (prompt on the terminal).
    let b = r.doas(doas(USER_B).password(PW_A).via(&a)).unwrap();
    assert_eq!(b.call(uids, ()).unwrap().0, uid_of(USER_B));
    let err = r.doas(doas(USER_B).password("not-the-password").via(&a)).unwrap_err();
    assert_via_error(err, a.name(), "doas password was incorrect", "not-the-password");
    // No rule lets A become C.
    let err = r.doas(doas(USER_C).password(PW_A).via(&a)).unwrap_err();
    assert_via_error(err, a.name(), "doas refused", PW_A);
}

#[test]
fn slow_login_profile_hits_the_connect_timeout_and_nothing_is_left_running() {
    ensure();
    let r = Router::new().unwrap();
    let started = std::time::Instant::now();
    let err = r.sudo(sudo(USER_E).login(true).connect_timeout(Duration::from_secs(2))).unwrap_err();
    assert!(matches!(err, ConnectError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    // sudo, the login shell and its `sleep` are all gone.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !processes_of(USER_E).is_empty() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_of(USER_E), Vec::<String>::new(), "left running");
}

#[test]
fn read_only_home_and_a_noisy_login_profile() {
    ensure();
    let r = Router::new().unwrap();
    // F's profile prints "Permission denied" and a line with "password"; its home is not
    // writable, so the opt-in cache cannot be filled: the image is sent every time.
    for _ in 0..2 {
        let f = r.sudo(sudo(USER_F).login(true).cache(true)).unwrap();
        assert_eq!(f.call(uids, ()).unwrap().0, uid_of(USER_F));
        let pid = f.call(mitogen::builtins::getpid, ()).unwrap();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(exe.display().to_string().starts_with("/memfd:"), "{exe:?}");
        f.shutdown(Duration::from_secs(10)).unwrap();
    }
    assert!(!std::path::Path::new(&format!("/home/{USER_F}/.cache")).exists());
}

#[test]
fn sudo_over_pipes() {
    ensure();
    let r = Router::new().unwrap();
    let a = r.sudo(sudo(USER_A).pipes(true)).unwrap();
    assert_eq!(a.call(uids, ()).unwrap().0, uid_of(USER_A));
    // Over pipes the image is sent, not handed over (stdin is the stream).
    let (exe, _) = a.call(whoami, ()).unwrap();
    assert!(exe.starts_with("/memfd:mitogen") && !exe.contains("image"), "{exe}");
    let data = mitogen::Bytes(block(5, 6, 2 << 20));
    assert_eq!(a.call(echo, (data.clone(),)).unwrap(), data);
}

/// A program run from a folder other accounts cannot enter (mode 0700, as a home folder
/// often is), with that folder as its working directory: contexts in other accounts never
/// open the program's path or enter its folder, directly or onward. Where an image there
/// really is needed (another program than the one running), the error names the path.
#[test]
fn a_program_in_a_private_folder_works_through_sudo_su_and_doas() {
    use std::os::unix::fs::PermissionsExt;
    ensure_doas();
    let dir = std::env::temp_dir().join(format!("mitogen-private-{}", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let program = dir.join("agent");
    std::fs::copy(agent(), &program).unwrap();
    let other = dir.join("other-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_mitogen-bench"), &other).unwrap();
    std::env::set_current_dir(&dir).unwrap();
    let r = Router::new().unwrap();
    let timeout = Duration::from_secs(20);
    let a = r.sudo(Sudo::new().username(USER_A).program(&program).connect_timeout(timeout)).unwrap();
    let (cwd, entered) = a.call(working_dir, ()).unwrap();
    assert!(entered && !cwd.starts_with(&dir.display().to_string()), "{cwd} {entered}");
    let la = r.local(Local::new().program(&program).via(&a).connect_timeout(timeout)).unwrap();
    assert_eq!(la.call(uids, ()).unwrap().0, uid_of(USER_A));
    assert!(la.call(working_dir, ()).unwrap().1);
    let c = r.sudo(Sudo::new().username(USER_C).program(&program).via(&a).connect_timeout(timeout)).unwrap();
    assert_eq!(c.call(uids, ()).unwrap().0, uid_of(USER_C));
    assert!(c.call(working_dir, ()).unwrap().1);
    let b = Doas::new().username(USER_B).password(PW_A).program(&program).via(&a).connect_timeout(timeout);
    let b = r.doas(b).unwrap();
    assert_eq!(b.call(uids, ()).unwrap().0, uid_of(USER_B));
    let s =
        r.su(Su::new().username(USER_B).password(PW_B).program(&program).via(&a).connect_timeout(timeout));
    assert_eq!(s.unwrap().call(uids, ()).unwrap().0, uid_of(USER_B));
    // Another image in the private folder: A cannot read it, and says which path.
    let err =
        r.sudo(Sudo::new().username(USER_C).program(&other).via(&a).connect_timeout(timeout)).unwrap_err();
    assert_via_error(
        err,
        &format!("sudo.{USER_A}"),
        &format!("cannot read the agent image {}", other.display()),
        PW_B,
    );
    drop(r);
    std::fs::remove_dir_all(&dir).unwrap();
}
