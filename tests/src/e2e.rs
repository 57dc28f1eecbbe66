//! The end-to-end test hosts, as provisioned by `cargo xtask e2e` (or `cargo xtask test`):
//! the file named by `MITOGEN_E2E` lists them (`engine=docker|netns`, `ctl=` the xtask
//! binary that acts on them, `name=address`, `name.container=...` on Docker, `key=`,
//! `known_hosts=`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The test hosts.
#[derive(Debug, Clone)]
pub struct E2e {
    file: PathBuf,
    values: HashMap<String, String>,
}

/// Password of `mitogen-test-pw` on every host.
pub const PW: &str = "mitogen-pw-Pw1";
/// Password of `mitogen-test-sudopw` on every host.
pub const SUDO_PW: &str = "mitogen-sudopw-Pw2";

impl E2e {
    /// Reads the description; panics with an explanation when the hosts were not
    /// provisioned: an e2e test must fail, not skip, without them.
    pub fn get() -> E2e {
        let path = std::env::var_os("MITOGEN_E2E").expect(
            "MITOGEN_E2E is unset: the e2e tests need the sshd hosts that `cargo xtask e2e` or \
             `cargo xtask test` provision (Docker)",
        );
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read the e2e hosts file {path:?}: {e}"));
        let values = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        E2e { file: path.into(), values }
    }

    fn value(&self, key: &str) -> &str {
        self.values.get(key).unwrap_or_else(|| panic!("the e2e hosts file has no {key}"))
    }

    /// The address of host `name` (`plain`, `noperl`, `noexec`, `lowfd`).
    pub fn ip(&self, name: &str) -> String {
        self.value(name).to_string()
    }

    /// The container of host `name` (Docker hosts only: the container tests need an
    /// engine).
    pub fn container(&self, name: &str) -> String {
        assert_eq!(self.value("engine"), "docker", "this test needs the e2e hosts on Docker");
        self.value(&format!("{name}.container")).to_string()
    }

    /// The podman container (made where podman is installed; CI installs it).
    pub fn podman(&self) -> String {
        self.values.get("podman").cloned().unwrap_or_else(|| {
            panic!("no podman container: podman is not installed (Debian: podman); see the e2e provisioning output")
        })
    }

    /// The client's private key (also installed on every host for hops between them).
    pub fn key(&self) -> PathBuf {
        self.value("key").into()
    }

    /// known_hosts with every host's keys.
    pub fn known_hosts(&self) -> PathBuf {
        self.value("known_hosts").into()
    }

    /// Runs `xtask host ARGS` (the e2e hosts' control, either engine); returns stdout,
    /// whatever the exit status when `check` is false.
    fn ctl(&self, args: &[&str], check: bool) -> String {
        let out = Command::new(self.value("ctl"))
            .arg("host")
            .args(args)
            .env("MITOGEN_E2E", &self.file)
            .stderr(Stdio::inherit())
            .output()
            .expect("running the e2e host control (xtask host)");
        assert!(!check || out.status.success(), "xtask host {args:?}: {}", out.status);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sh -c script` as root on host `name`; returns stdout, whatever the script's
    /// exit status.
    pub fn exec(&self, name: &str, script: &str) -> String {
        self.ctl(&["exec", name, script], false)
    }

    /// Starts a private host like `plain` (for tests that kill, pause or cut it off);
    /// removed on drop.
    pub fn private_host(&self, tag: &str) -> PrivateHost {
        let name = format!("{tag}-{}", std::process::id());
        let ip = self.ctl(&["start", &name], true).trim().to_string();
        PrivateHost { name, ip, e2e: self.clone() }
    }
}

/// A host started by one test; removed when dropped.
#[derive(Debug)]
pub struct PrivateHost {
    /// Its name for `E2e::exec`.
    pub name: String,
    /// Address.
    pub ip: String,
    e2e: E2e,
}

impl PrivateHost {
    /// Its container (Docker hosts only).
    pub fn container(&self) -> String {
        assert_eq!(self.e2e.value("engine"), "docker", "this test needs the e2e hosts on Docker");
        format!("mitogen-e2e-{}", self.name)
    }

    /// Kills every process on the host at once.
    pub fn kill(&self) {
        self.e2e.ctl(&["kill", &self.name], true);
    }

    /// Freezes the host: its kernel still accepts TCP connections, nothing answers.
    pub fn pause(&self) {
        self.e2e.ctl(&["pause", &self.name], true);
    }

    /// Cuts the host off its network.
    pub fn cut(&self) {
        self.e2e.ctl(&["cut", &self.name], true);
    }
}

impl Drop for PrivateHost {
    fn drop(&mut self) {
        self.e2e.ctl(&["rm", &self.name], false);
    }
}
