//! Test accounts for the sudo tests: `mitogen-test-*`, created only in CI (`CI=true`) or
//! when asked (`MITOGEN_TEST_ACCOUNTS=1`), never on a developer's own accounts. Creation is
//! idempotent and serialized across parallel test processes with a lock file.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::Command;

/// Password of [`USER_A`].
pub const PW_A: &str = "mitogen-a-Pw1";
/// Password of [`USER_B`].
pub const PW_B: &str = "mitogen-b-Pw2";
/// May sudo to B with its own password, and to C without one.
pub const USER_A: &str = "mitogen-test-a";
/// A plain target account.
pub const USER_B: &str = "mitogen-test-b";
/// A target reached without a password.
pub const USER_C: &str = "mitogen-test-c";
/// May sudo to B, but only with B's password (`targetpw`), and only from a tty.
pub const USER_D: &str = "mitogen-test-d";
/// Password of [`USER_D`].
pub const PW_D: &str = "mitogen-d-Pw4";
/// Its login profile sleeps for a minute (connect timeouts with `login`).
pub const USER_E: &str = "mitogen-test-e";
/// Its home is read-only and its login profile prints "Permission denied" and a line
/// containing "password".
pub const USER_F: &str = "mitogen-test-f";
/// sudo logs this account's input and output, so its stdin and stdout are sudo's pipes.
pub const USER_G: &str = "mitogen-test-g";
/// Used by one test only, which checks that nothing is left running in it.
pub const USER_H: &str = "mitogen-test-h";

/// The rules for doas (OpenDoas has no drop-in directory: this block goes into
/// /etc/doas.conf between markers).
const DOAS: &str = "\
permit nopass root
permit mitogen-test-a as mitogen-test-b
";
const DOAS_BEGIN: &str = "# BEGIN mitogen-test";
const DOAS_END: &str = "# END mitogen-test";
const PROFILE_E: &str = "sleep 60\n";
const PROFILE_F: &str = "echo 'Permission denied'\necho 'Your password: expires in 3 days'\n";

const SUDOERS: &str = "\
Defaults:mitogen-test-a !lecture, passwd_tries=3
Defaults:mitogen-test-d !lecture, targetpw, requiretty
Defaults>mitogen-test-g log_input, log_output
mitogen-test-a ALL=(mitogen-test-b) ALL
mitogen-test-a ALL=(mitogen-test-c) NOPASSWD: ALL
mitogen-test-d ALL=(mitogen-test-b) ALL
mitogen-test-d ALL=(mitogen-test-c) NOPASSWD: ALL
";
const VERSION: &str = "4";

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn user_exists(u: &str) -> bool {
    Command::new("id").arg(u).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Makes sure the test accounts and their sudoers rules exist. Panics with an explanation
/// when that is not allowed or not possible: a sudo test must fail, not skip, without them.
pub fn ensure() {
    let allowed =
        std::env::var("CI").is_ok_and(|v| v == "true") || std::env::var_os("MITOGEN_TEST_ACCOUNTS").is_some();
    assert!(
        allowed,
        "the sudo tests need test accounts (mitogen-test-*); they are created only in CI (CI=true) \
         or with MITOGEN_TEST_ACCOUNTS=1 (as root)"
    );
    if let Err(e) = setup() {
        panic!("cannot set up the sudo test accounts: {e}");
    }
}

fn setup() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("creating test accounts needs root".into());
    }
    let sudo_ok = Command::new("sudo").arg("-V").output().map(|o| o.status.success()).unwrap_or(false);
    if !sudo_ok {
        return Err("sudo is not installed (.ci/run installs it)".into());
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/mitogen-test-accounts.lock")
        .map_err(|e| e.to_string())?;
    // SAFETY: flock on a file we keep open until the end of this function.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    let marker = "/etc/sudoers.d/mitogen-test";
    let doas_done = which("doas").is_err()
        || std::fs::read_to_string("/etc/doas.conf").is_ok_and(|s| s.contains(DOAS_BEGIN));
    if doas_done && std::fs::read_to_string(marker).is_ok_and(|s| s.contains(&format!("# version {VERSION}")))
    {
        return Ok(());
    }
    for (user, pw) in [
        (USER_A, PW_A),
        (USER_B, PW_B),
        (USER_C, PW_B),
        (USER_D, PW_D),
        (USER_E, PW_B),
        (USER_F, PW_B),
        (USER_G, PW_B),
        (USER_H, PW_B),
    ] {
        if !user_exists(user) {
            run(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", user]))?;
        }
        let mut child = Command::new("chpasswd")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        writeln!(child.stdin.take().expect("piped"), "{user}:{pw}").map_err(|e| e.to_string())?;
        let st = child.wait().map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("chpasswd {user}: {st}"));
        }
    }
    for (user, profile) in [(USER_E, PROFILE_E), (USER_F, PROFILE_F)] {
        let home = format!("/home/{user}");
        std::fs::write(format!("{home}/.profile"), profile).map_err(|e| e.to_string())?;
        run(Command::new("chown").args([&format!("root:{user}"), &format!("{home}/.profile")]))?;
        run(Command::new("chmod").args(["0644", &format!("{home}/.profile")]))?;
    }
    // F's home: owned by root, not writable by F (no cache directory can be made there).
    run(Command::new("chown").args(["root:root", &format!("/home/{USER_F}")]))?;
    run(Command::new("chmod").args(["0755", &format!("/home/{USER_F}")]))?;
    setup_doas()?;
    let tmp = format!("{marker}.tmp");
    std::fs::write(&tmp, format!("# version {VERSION}\n{SUDOERS}")).map_err(|e| e.to_string())?;
    run(Command::new("chmod").args(["0440", &tmp]))?;
    run(Command::new("visudo").args(["-c", "-q", "-f", &tmp]))?;
    std::fs::rename(&tmp, marker).map_err(|e| e.to_string())?;
    Ok(())
}

/// Puts the test block into /etc/doas.conf (replacing an older one), if doas is installed.
fn setup_doas() -> Result<(), String> {
    let Ok(path) = which("doas") else { return Ok(()) };
    let conf = "/etc/doas.conf";
    let old = std::fs::read_to_string(conf).unwrap_or_default();
    let mut kept = String::new();
    let mut inside = false;
    for line in old.lines() {
        match line {
            DOAS_BEGIN => inside = true,
            DOAS_END => inside = false,
            l if !inside => {
                kept.push_str(l);
                kept.push('\n');
            }
            _ => {}
        }
    }
    let new = format!("{kept}{DOAS_BEGIN}\n{DOAS}{DOAS_END}\n");
    let tmp = format!("{conf}.mitogen-tmp");
    std::fs::write(&tmp, new).map_err(|e| e.to_string())?;
    run(Command::new("chmod").args(["0400", &tmp]))?;
    run(Command::new(path).args(["-C", &tmp]))?;
    std::fs::rename(&tmp, conf).map_err(|e| e.to_string())
}

/// The path of `program` on `PATH`.
fn which(program: &str) -> Result<String, String> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| format!("{d}/{program}"))
        .find(|p| std::path::Path::new(p).is_file())
        .ok_or_else(|| format!("{program} is not installed"))
}

/// Like [`ensure`], and also fails (with an explanation) when doas is not installed.
pub fn ensure_doas() {
    ensure();
    if let Err(e) = which("doas") {
        panic!("the doas tests need OpenDoas ({e}; .ci/run installs the opendoas package)");
    }
}
