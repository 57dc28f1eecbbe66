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
    let dir = bin_dir("sh", &["uname", "mktemp", "chmod", "cp", "dd", "rm"]);
    let c = through_sh(&r, Some(&dir)).unwrap();
    let pid = c.call(mitogen::builtins::getpid, ()).unwrap();
    let exe = exe_of(pid);
    assert!(!exe.starts_with("/memfd:") && exe.ends_with("(deleted)"), "{exe}");
    assert_eq!(c.call(add, (4, 4)).unwrap(), 8);
}

#[test]
fn another_architecture_is_refused_before_anything_runs() {
    let r = Router::new().unwrap();
    let dir = bin_dir("arch", &["perl"]);
    let fake = dir.join("uname");
    std::fs::write(&fake, "#!/bin/sh\necho Linux sparc64\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    match through_sh(&r, Some(&dir)) {
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
