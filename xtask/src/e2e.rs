//! `cargo xtask e2e`: real sshd hosts for the end-to-end tests.
//!
//! Hosts are Docker containers on a private bridge network, from an image built here from
//! Debian packages (no registry can be pulled from): `debootstrap` into a folder, a recipe
//! run in a chroot (accounts, sshd settings, login shells), then `docker import`. The image
//! is cached under a versioned tag; bump [`IMAGE`] when [`RECIPE`] changes. Each container
//! makes its own host keys when it starts; the client key lives in `target/e2e/`.
//!
//! The tests find the hosts through the file named by `MITOGEN_E2E` (see
//! `mitogen_tests::e2e`).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The image tag; the number changes with the recipe.
pub const IMAGE: &str = "mitogen-e2e:5";
/// The private network.
pub const NETWORK: &str = "mitogen-e2e";

/// The hosts: (name, extra `docker run` arguments, role for the init script).
const HOSTS: &[(&str, &[&str], &str)] = &[
    // Everything; also a container host: the engine's socket and client are mounted, so
    // `docker exec` works from here (through sudo) into the other test containers.
    (
        "plain",
        &["-v", "/var/run/docker.sock:/var/run/docker.sock", "-v", "{docker}:/usr/local/bin/docker:ro"],
        "plain",
    ),
    // No perl, no python: the first stage falls back to a private tmpfs file.
    ("noperl", &[], "noperl"),
    // /tmp and /dev/shm are noexec, and no perl or python: the fallback must skip them.
    ("noexec", &["--tmpfs", "/tmp:rw,noexec,nosuid", "--tmpfs", "/dev/shm:rw,noexec,nosuid"], "noperl"),
    // A low open-files limit for everything on the host.
    ("lowfd", &["--ulimit", "nofile=64:64"], "plain"),
];

/// Accounts (all `mitogen-test-*`), made in the image by the recipe:
/// - `key`: key only; `pw`: password only (`mitogen-pw-Pw1`);
/// - `sudo`: key, sudo to anyone without a password; `sudopw`: key, sudo with its password
///   (`mitogen-sudopw-Pw2`);
/// - `slow`: key, a login shell that sleeps a minute first;
/// - `noisy`: key, a login shell that prints "Permission denied" and a line with
///   "password" first.
///
/// sshd shows a banner containing "password" before authentication, on every host.
const RECIPE: &str = r#"set -e
mk() { id "$1" >/dev/null 2>&1 || useradd --create-home --shell "$2" "$1"; usermod -p '*' "$1"; }
mk mitogen-test-key /bin/sh
mk mitogen-test-pw /bin/sh
echo 'mitogen-test-pw:mitogen-pw-Pw1' | chpasswd
mk mitogen-test-sudo /bin/sh
mk mitogen-test-sudopw /bin/sh
echo 'mitogen-test-sudopw:mitogen-sudopw-Pw2' | chpasswd
cat >/usr/local/bin/mitogen-slow-shell <<'EOF'
#!/bin/sh
sleep 60
exec /bin/sh "$@"
EOF
cat >/usr/local/bin/mitogen-noisy-shell <<'EOF'
#!/bin/sh
echo 'Permission denied' >&2
echo 'Your password: expires in 3 days' >&2
exec /bin/sh "$@"
EOF
chmod 755 /usr/local/bin/mitogen-slow-shell /usr/local/bin/mitogen-noisy-shell
mk mitogen-test-slow /usr/local/bin/mitogen-slow-shell
mk mitogen-test-noisy /usr/local/bin/mitogen-noisy-shell
cat >/etc/sudoers.d/mitogen-test <<'EOF'
Defaults !lecture
mitogen-test-sudo ALL=(ALL) NOPASSWD: ALL
mitogen-test-sudopw ALL=(ALL) ALL
EOF
chmod 440 /etc/sudoers.d/mitogen-test
echo 'Authorized use only. Your password: is logged.' >/etc/ssh/mitogen-banner
cat >/etc/ssh/sshd_config.d/mitogen.conf <<'EOF'
PasswordAuthentication yes
KbdInteractiveAuthentication no
PermitRootLogin no
Banner /etc/ssh/mitogen-banner
UseDNS no
MaxStartups 200
MaxSessions 200
EOF
cat >/usr/local/sbin/mitogen-e2e-init <<'EOF'
#!/bin/sh
set -e
rm -f /etc/ssh/ssh_host_*
ssh-keygen -A -q
for u in key sudo sudopw slow noisy; do
    h=/home/mitogen-test-$u
    mkdir -p $h/.ssh
    echo "$E2E_PUBKEY" >$h/.ssh/authorized_keys
    # The same test key, so that hops between hosts work (`via` chains).
    cp /etc/mitogen-e2e-key $h/.ssh/id_ed25519
    chmod 600 $h/.ssh/id_ed25519
    chown -R mitogen-test-$u: $h/.ssh
    chmod 700 $h/.ssh
done
if [ "$E2E_ROLE" = noperl ]; then
    rm -f /usr/bin/perl /usr/bin/perl5* /usr/bin/python3 /usr/bin/python3.*
fi
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e
EOF
chmod 755 /usr/local/sbin/mitogen-e2e-init
apt-get clean
rm -rf /var/lib/apt/lists/*
"#;

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn docker() -> Command {
    Command::new("docker")
}

/// Builds the image unless it is cached.
fn ensure_image(work: &Path) -> Result<()> {
    if quiet(docker().args(["image", "inspect", IMAGE])) {
        return Ok(());
    }
    eprintln!("building the e2e image {IMAGE} (debootstrap, once)");
    let rootfs = work.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    std::fs::create_dir_all(work)?;
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=openssh-server,sudo,python3,procps,perl-base", "bookworm"])
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian"))
    .context("debootstrap (the package debootstrap, root and the Debian mirror are needed)")?;
    run(Command::new("chroot").arg(&rootfs).args(["/bin/sh", "-c", RECIPE]))?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("tar")?;
    run(docker()
        .args(["import", "--change", "CMD [\"/usr/local/sbin/mitogen-e2e-init\"]", "-", IMAGE])
        .stdin(tar.stdout.context("tar stdout")?))?;
    std::fs::remove_dir_all(&rootfs)?;
    Ok(())
}

/// The running hosts, as written to `target/e2e/hosts`.
pub struct Hosts {
    /// The description file for the tests (`MITOGEN_E2E`).
    pub file: PathBuf,
    lines: Vec<String>,
}

impl Hosts {
    /// How to reach the hosts by hand.
    pub fn describe(&self) -> String {
        self.lines.join("\n")
    }
}

fn container(name: &str) -> String {
    format!("mitogen-e2e-{name}")
}

/// Removes the test containers (also those a test started and could not remove) and the
/// network: only ours, by name.
pub fn teardown() {
    for (name, _, _) in HOSTS {
        quiet(docker().args(["rm", "-f", &container(name)]));
    }
    if let Ok(out) = docker().args(["ps", "-aq", "--filter", "name=mitogen-e2e-"]).output() {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            quiet(docker().args(["rm", "-f", id]));
        }
    }
    quiet(docker().args(["network", "rm", NETWORK]));
}

/// Builds (or reuses) the image, starts every host, waits for their sshd, and writes the
/// description file.
pub fn provision(root: &Path) -> Result<Hosts> {
    if !quiet(docker().args(["info"])) {
        bail!("no Docker engine answers (`docker info` failed): the e2e hosts need one");
    }
    let work = root.join("target/e2e");
    std::fs::create_dir_all(&work)?;
    ensure_image(&work)?;
    let key = work.join("id_ed25519");
    if !key.exists() {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "mitogen-e2e", "-f"])
            .arg(&key))?;
    }
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))?.trim().to_string();
    // The docker client, mounted into the container host.
    let docker_client = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("docker"))
        .find(|p| p.is_file())
        .context("the docker client is not on PATH")?
        .canonicalize()?
        .display()
        .to_string();
    teardown();
    run(docker().args(["network", "create", NETWORK]).stdout(Stdio::null()))?;
    let mut lines = vec![format!("key={}", key.display())];
    let mut known = String::new();
    for (name, extra, role) in HOSTS {
        let c = container(name);
        run(docker()
            .args(["run", "-d", "--name", &c, "--hostname", &c, "--network", NETWORK])
            .args(["-e", &format!("E2E_PUBKEY={pubkey}"), "-e", &format!("E2E_ROLE={role}")])
            .args(["-v", &format!("{}:/etc/mitogen-e2e-key:ro", key.display())])
            .args(extra.iter().map(|a| a.replace("{docker}", &docker_client)))
            .arg(IMAGE)
            .stdout(Stdio::null()))?;
        let out = docker()
            .args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &c])
            .output()?;
        let ip = String::from_utf8(out.stdout)?.trim().to_string();
        if ip.is_empty() {
            bail!("container {c} has no address");
        }
        known.push_str(&scan(&c, &ip)?);
        lines.push(format!("{name}={ip}"));
        lines.push(format!("{name}.container={c}"));
    }
    let kh = work.join("known_hosts");
    std::fs::write(&kh, known)?;
    lines.push(format!("known_hosts={}", kh.display()));
    lines.push(format!("image={IMAGE}"));
    lines.push(format!("network={NETWORK}"));
    let file = work.join("hosts");
    std::fs::write(&file, lines.join("\n") + "\n")?;
    Ok(Hosts { file, lines })
}

/// Waits for the host's sshd and returns its keys in known_hosts form.
fn scan(container: &str, ip: &str) -> Result<String> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("ssh-keyscan").args(["-T", "2", ip]).stderr(Stdio::null()).output()?;
        let keys = String::from_utf8(out.stdout)?;
        if keys.lines().any(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            return Ok(keys);
        }
        if Instant::now() > until {
            let logs = docker().args(["logs", container]).output()?;
            bail!(
                "sshd on {container} ({ip}) did not come up: {}{}",
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
