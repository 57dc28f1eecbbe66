//! The sh first stage ("through sh"): each loader, the cache, and refusals.

use crate::agent;
use mitogen::{ConnectError, Local, Router};
use mitogen_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A directory for `PATH` holding only `tools` (symlinks to the real ones).
fn bin_dir(name: &str, tools: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mitogen-bin-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for t in tools {
        let real = if *t == "python3" {
            let out = std::process::Command::new("python3")
                .args(["-c", "import sys; print(sys.executable)"])
                .output()
                .expect("python3 is needed by this test");
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        } else {
            let out =
                std::process::Command::new("sh").args(["-c", &format!("command -v {t}")]).output().unwrap();
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        };
        assert!(real.is_absolute(), "{t} not found on this machine");
        std::os::unix::fs::symlink(real, dir.join(t)).unwrap();
    }
    dir
}

fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap().display().to_string()
}

fn argv0_of(pid: u32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    String::from_utf8_lossy(cmd.split(|b| *b == 0).next().unwrap()).into_owned()
}

fn through_sh(r: &Router, path: Option<&Path>) -> Result<mitogen::Context, ConnectError> {
    let mut l = Local::new().program(agent()).through_sh(true);
    if let Some(p) = path {
        l = l.env("PATH", p);
    }
    r.local(l)
}

#[test]
fn perl_loader_runs_the_agent_from_memory() {
    let r = Router::new().unwrap();
    let c = through_sh(&r, None).unwrap();
    assert_eq!(c.call(add, (2, 3)).unwrap(), 5);
    let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
    assert!(exe_of(pid).starts_with("/memfd:"), "{}", exe_of(pid));
    assert!(argv0_of(pid).starts_with("mitogen:"), "{}", argv0_of(pid));
    // The stream works as usual after the bootstrap: bulk both ways.
    let data = mitogen::Bytes(block(1, 2, 3 << 20));
    assert_eq!(c.call(echo, (data.clone(),)).unwrap(), data);
}

#[test]
fn python_loader_runs_the_agent_from_memory() {
    let r = Router::new().unwrap();
    let dir = bin_dir("py", &["uname", "python3"]);
    let c = through_sh(&r, Some(&dir)).unwrap();
    let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
    assert!(exe_of(pid).starts_with("/memfd:"), "{}", exe_of(pid));
    assert!(argv0_of(pid).starts_with("mitogen:"), "{}", argv0_of(pid));
    assert_eq!(c.call(add, (1, 1)).unwrap(), 2);
}

#[test]
fn without_perl_or_python_a_private_tmpfs_file_is_used_and_unlinked() {
    let r = Router::new().unwrap();
    let dir = bin_dir("sh", &["uname", "mktemp", "chmod", "cp", "dd", "rm", "wc", "sleep"]);
    let c = through_sh(&r, Some(&dir)).unwrap();
    let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
    let exe = exe_of(pid);
    assert!(!exe.starts_with("/memfd:") && exe.ends_with("(deleted)"), "{exe}");
    assert_eq!(c.call(add, (4, 4)).unwrap(), 8);
}

#[test]
fn another_architecture_is_refused_before_anything_runs() {
    let r = Router::new().unwrap();
    let dir = bin_dir("arch", &["perl", "sudo", "unshare", "mount"]);
    let fake = dir.join("uname");
    std::fs::write(&fake, "#!/bin/sh\necho Linux sparc64\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let result = if Path::new("/proc/sys/kernel/arch").exists() {
        // The first stage reads /proc/sys/kernel/arch: sudo (to root, no password) runs in
        // a private mount namespace where that file says sparc64.
        std::fs::write(dir.join("arch"), "sparc64\n").unwrap();
        let wrapper = dir.join("sudo-sparc");
        std::fs::write(
            &wrapper,
            "#!/bin/sh\nexec unshare -m /bin/sh -c 'mount --bind \"$0\" /proc/sys/kernel/arch && exec sudo \"$@\"' \"$(dirname \"$0\")/arch\" \"$@\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        r.sudo(mitogen::Sudo::new().sudo_path(&wrapper).program(agent()))
    } else {
        through_sh(&r, Some(&dir))
    };
    match result {
        Err(ConnectError::Unsupported { os, arch, .. }) => {
            assert_eq!((os.as_str(), arch.as_str()), ("Linux", "sparc64"))
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn cache_lets_the_second_connection_skip_the_image() {
    let r = Router::new().unwrap();
    let cache = std::env::temp_dir().join(format!("mitogen-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let local = || Local::new().program(agent()).through_sh(true).cache(true).env("XDG_CACHE_HOME", &cache);
    let first = r.local(local()).unwrap();
    let pid1 = first.call(mitogen::builtins::getpid, ()).unwrap();
    assert!(exe_of(pid1).starts_with("/memfd:"));
    let entries: Vec<_> = std::fs::read_dir(cache.join("mitogen")).unwrap().flatten().collect();
    assert_eq!(entries.len(), 1, "one cached image");
    let cached = entries[0].path();
    let second = r.local(local()).unwrap();
    let pid2 = second.call(mitogen::builtins::getpid, ()).unwrap();
    assert_eq!(exe_of(pid2), cached.display().to_string(), "the second agent runs the cached image");
    assert_eq!(second.call(add, (3, 4)).unwrap(), 7);
    let _ = std::fs::remove_dir_all(&cache);
}

/// Socket links among a process's open files.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.display().to_string().starts_with("socket:"))
        })
        .count()
}

#[test]
fn pipes_instead_of_a_socketpair_directly_and_through_sh() {
    let r = Router::new().unwrap();
    for sh in [false, true] {
        let c = r.local(Local::new().program(agent()).through_sh(sh).pipes(true)).unwrap();
        let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
        assert_eq!(sockets_of(pid), 0, "the agent's stream is two pipes");
        let data = mitogen::Bytes(block(9, 8, 3 << 20));
        assert_eq!(c.call(echo, (data.clone(),)).unwrap(), data);
        c.shutdown(std::time::Duration::from_secs(10)).unwrap();
        assert!(wait_gone(pid, std::time::Duration::from_secs(10)));
    }
    // The default is a socketpair.
    let c = r.local(Local::new().program(agent())).unwrap();
    assert!(sockets_of(c.call(mitogen::builtins::getpid, ()).unwrap()) > 0);
}

/// Runs the first stage by hand with a non-blocking stdin and an answer that arrives late:
/// the shell must wait for it (not fail, not spin) and the loader must read the whole image.
fn first_stage_with_non_blocking_stdin(path: &Path, loader: mitogen_transport_local::bootstrap::Loader) {
    use mitogen_transport_local::bootstrap::{answer, random_token, Encoding, FirstStage};
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let stage = FirstStage {
        token: random_token(),
        hash: "0".repeat(32),
        argv0: "x".into(),
        cache: false,
        handover: false,
    };
    let (child_in, ours_w) = mitogen_transport_local::pipe().unwrap();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(child_in.as_raw_fd(), libc::F_GETFL);
        assert_eq!(libc::fcntl(child_in.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK), 0);
    }
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(stage.script())
        .env("PATH", path)
        .stdin(std::process::Stdio::from(child_in))
        .stdout(std::process::Stdio::piped());
    let mut child = mitogen_transport_local::spawn(&mut cmd).unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let report = stage.parse(&line).unwrap_or_else(|| panic!("no marker: {line:?}"));
    // Let the shell find its stdin empty a few times.
    std::thread::sleep(std::time::Duration::from_millis(350));
    let image = std::fs::read("/bin/true").unwrap();
    let payload = match loader.encoding() {
        Encoding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&image).unwrap();
            e.finish().unwrap()
        }
        _ => image,
    };
    let mut w = std::fs::File::from(ours_w);
    w.write_all(answer(loader, payload.len(), &report.arch, false).as_bytes()).unwrap();
    // The image in two parts with a pause: the loader meets EAGAIN in the middle.
    let half = payload.len() / 2;
    w.write_all(&payload[..half]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    w.write_all(&payload[half..]).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "{loader:?}: the image (/bin/true) did not run: {st}");
}

#[test]
fn a_non_blocking_stdin_is_waited_for_by_the_shell_and_the_loaders() {
    use mitogen_transport_local::bootstrap::Loader;
    first_stage_with_non_blocking_stdin(&bin_dir("nb-perl", &["uname", "perl", "sleep"]), Loader::Perl);
    first_stage_with_non_blocking_stdin(&bin_dir("nb-py", &["uname", "python3", "sleep"]), Loader::Python);
    // sh alone: dd is retried for what is left, never reading past the image.
    let sh_only = bin_dir("nb-sh", &["uname", "sleep", "mktemp", "chmod", "cp", "rm", "dd", "wc"]);
    first_stage_with_non_blocking_stdin(&sh_only, Loader::TmpFile);
}

#[test]
fn the_static_dist_agent_runs_where_no_library_is_installed() {
    // `cargo xtask test` builds it first (`cargo xtask dist`) and names it here.
    let dist = std::env::var_os("MITOGEN_DIST_AGENT").expect(
        "MITOGEN_DIST_AGENT is unset: run the tests with `cargo xtask test`, which builds the static agent",
    );
    let r = Router::new().unwrap();
    // Through sh, from memory, in an empty environment: only builtins exist in the stock agent.
    let c = r.local(Local::new().program(&dist).through_sh(true)).unwrap();
    let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
    assert!(exe_of(pid).starts_with("/memfd:"), "{}", exe_of(pid));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        !maps.contains("libc.so") && !maps.contains("ld-linux"),
        "the dist agent loaded shared libraries"
    );
    // A user function is not in the stock agent: a typed error, not a crash.
    let err = c.call(add, (1, 2)).unwrap_err();
    assert!(err.to_string().contains("add"), "{err}");
}
