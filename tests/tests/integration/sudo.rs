//! Real sudo, with test accounts (see `mitogen_tests::accounts`).

use crate::{agent, local};
use mitogen::{ConnectError, Local, LoginError, Router, Sudo};
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
