//! The end-to-end test hosts, as provisioned by `cargo xtask e2e` (or `cargo xtask test`):
//! the file named by `MITOGEN_E2E` lists them (`name=address`, `name.container=...`,
//! `key=`, `known_hosts=`, `image=`, `network=`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The test hosts.
#[derive(Debug, Clone)]
pub struct E2e {
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
        E2e { values }
    }

    fn value(&self, key: &str) -> &str {
        self.values.get(key).unwrap_or_else(|| panic!("the e2e hosts file has no {key}"))
    }

    /// The address of host `name` (`plain`, `noperl`, `noexec`, `lowfd`).
    pub fn ip(&self, name: &str) -> String {
        self.value(name).to_string()
    }

    /// The container of host `name`.
    pub fn container(&self, name: &str) -> String {
        self.value(&format!("{name}.container")).to_string()
    }

    /// The client's private key (also installed on every host for hops between them).
    pub fn key(&self) -> PathBuf {
        self.value("key").into()
    }

    /// known_hosts with every host's keys.
    pub fn known_hosts(&self) -> PathBuf {
        self.value("known_hosts").into()
    }

    /// Runs `sh -c script` in container `c` as root; returns stdout.
    pub fn exec(&self, c: &str, script: &str) -> String {
        let out = Command::new("docker").args(["exec", c, "sh", "-c", script]).output().expect("docker exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a private host from the test image (for tests that kill, pause or cut it
    /// off); removed on drop.
    pub fn private_host(&self, tag: &str) -> PrivateHost {
        let name = format!("mitogen-e2e-{tag}-{}", std::process::id());
        let _ = Command::new("docker").args(["rm", "-f", &name]).stderr(Stdio::null()).output();
        let pubkey = std::fs::read_to_string(self.key().with_extension("pub")).expect("public key");
        let st = Command::new("docker")
            .args(["run", "-d", "--name", &name, "--hostname", &name, "--network", self.value("network")])
            .args(["-e", &format!("E2E_PUBKEY={}", pubkey.trim()), "-e", "E2E_ROLE=plain"])
            .args(["-v", &format!("{}:/etc/mitogen-e2e-key:ro", self.key().display())])
            .arg(self.value("image"))
            .stdout(Stdio::null())
            .status()
            .expect("docker run");
        assert!(st.success(), "docker run {name}: {st}");
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &name])
            .output()
            .expect("docker inspect");
        let ip = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let keys = Command::new("ssh-keyscan").args(["-T", "2", &ip]).stderr(Stdio::null()).output();
            if keys.is_ok_and(|k| !k.stdout.is_empty()) {
                break;
            }
            assert!(Instant::now() < until, "sshd on {name} did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
        PrivateHost { name, ip }
    }
}

/// A host started by one test; removed when dropped.
#[derive(Debug)]
pub struct PrivateHost {
    /// Container name.
    pub name: String,
    /// Address.
    pub ip: String,
}

impl PrivateHost {
    /// `docker <verb> <this container> [args]`.
    pub fn docker(&self, verb: &str, extra: &[&str]) {
        let st = Command::new("docker").arg(verb).args(extra).arg(&self.name).status().expect("docker");
        assert!(st.success(), "docker {verb} {}: {st}", self.name);
    }
}

impl Drop for PrivateHost {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["unpause", &self.name]).stderr(Stdio::null()).output();
        let _ = Command::new("docker").args(["rm", "-f", &self.name]).stdout(Stdio::null()).output();
    }
}
