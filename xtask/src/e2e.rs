//! `cargo xtask e2e`: real sshd hosts for the end-to-end tests.
//!
//! The hosts come from a root built here from Debian packages (no registry can be pulled
//! from): `debootstrap` into `target/e2e/rootfs-<version>`, then a recipe run in a chroot
//! (accounts, sshd settings, login shells). Both are cached; bump [`IMAGE`] when
//! [`RECIPE`] changes. Each host makes its own host keys when it starts; the client key
//! lives in `target/e2e/`. Two engines run them:
//!
//! - Docker (when an engine answers): the root is `docker import`ed as [`IMAGE`], and the
//!   hosts are containers on the private network [`NETWORK`];
//! - network namespaces (no engine, or `MITOGEN_E2E_HOSTS=netns`): see [`crate::netns`].
//!
//! Where podman is installed, one podman container from the same root serves the podman
//! test, on either engine.
//!
//! The tests find the hosts through the file named by `MITOGEN_E2E` (see
//! `mitogen_tests::e2e`), and act on them (exec, kill, pause, cut off, private hosts)
//! through `xtask host ...` ([`host_command`]), so that they do not care which engine runs.

use crate::netns;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The image tag; the number changes with the recipe.
pub const IMAGE: &str = "mitogen-e2e:5";
/// The podman image: the same root, imported into podman's own store.
pub const PODMAN_IMAGE: &str = "localhost/mitogen-e2e:5";
/// The private network.
pub const NETWORK: &str = "mitogen-e2e";

/// How one host is set up.
struct Host {
    name: &'static str,
    spec: netns::Spec,
    /// A container host: the engine's socket and client are mounted, so `docker exec`
    /// works from there (through sudo) into the other test containers. Docker only.
    container_host: bool,
}

const fn host(name: &'static str, role: &'static str, noexec: bool, nofile: Option<u32>) -> Host {
    Host { name, spec: netns::Spec { role, noexec, nofile }, container_host: false }
}

/// The shared hosts. Tests that kill, pause or cut off a host start a private one.
const HOSTS: &[Host] = &[
    // Everything; also a container host.
    Host { container_host: true, ..host("plain", "plain", false, None) },
    // No perl, no python: the first stage falls back to a private tmpfs file.
    host("noperl", "noperl", false, None),
    // /tmp and /dev/shm are noexec, and no perl or python: the fallback must skip them.
    host("noexec", "noperl", true, None),
    // A low open-files limit for everything on the host.
    host("lowfd", "plain", false, Some(64)),
];

/// A private host (`xtask host start`).
const PRIVATE: netns::Spec = netns::Spec { role: "plain", noexec: false, nofile: None };

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

/// Which engine runs the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Docker containers.
    Docker,
    /// sshd in network namespaces.
    Netns,
}

impl Engine {
    /// `MITOGEN_E2E_HOSTS` (`docker` or `netns`) when set; otherwise Docker when an engine
    /// answers, else network namespaces.
    fn choose() -> Result<Engine> {
        match std::env::var("MITOGEN_E2E_HOSTS").as_deref() {
            Ok("docker") => Ok(Engine::Docker),
            Ok("netns") => Ok(Engine::Netns),
            Ok(other) => bail!("MITOGEN_E2E_HOSTS={other}: expected docker or netns"),
            Err(_) if quiet(docker().arg("info")) => Ok(Engine::Docker),
            Err(_) => {
                eprintln!("no Docker engine answers: the e2e hosts run in network namespaces");
                Ok(Engine::Netns)
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Netns => "netns",
        }
    }
}

/// The recipe's root, built once (debootstrap, or unpacked from the image when only that
/// is cached) and kept.
fn ensure_rootfs(work: &Path) -> Result<PathBuf> {
    let version = IMAGE.rsplit(':').next().unwrap_or("0");
    let rootfs = work.join(format!("rootfs-{version}"));
    let done = rootfs.join(".mitogen-e2e-complete");
    if done.exists() {
        return Ok(rootfs);
    }
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    std::fs::create_dir_all(&rootfs)?;
    // The image holds the same root: exporting it takes seconds, debootstrap minutes.
    if quiet(docker().args(["image", "inspect", IMAGE])) {
        eprintln!("unpacking the e2e root {} from {IMAGE}", rootfs.display());
        let c = "mitogen-e2e-export";
        quiet(docker().args(["rm", "-f", c]));
        run(docker().args(["create", "--name", c, IMAGE]).stdout(Stdio::null()))?;
        let export = docker().args(["export", c]).stdout(Stdio::piped()).spawn().context("docker export")?;
        let unpacked = run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-x")
            .stdin(export.stdout.context("docker export stdout")?));
        quiet(docker().args(["rm", "-f", c]));
        unpacked?;
        std::fs::write(&done, "")?;
        return Ok(rootfs);
    }
    eprintln!("building the e2e root {} (debootstrap, once)", rootfs.display());
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=openssh-server,sudo,python3,procps,perl-base", "bookworm"])
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian"))
    .context("debootstrap (the package debootstrap, root and the Debian mirror are needed)")?;
    run(Command::new("chroot").arg(&rootfs).args(["/bin/sh", "-c", RECIPE]))?;
    std::fs::write(&done, "")?;
    Ok(rootfs)
}

/// Imports the root as [`IMAGE`] unless it is cached.
fn ensure_image(work: &Path) -> Result<()> {
    if quiet(docker().args(["image", "inspect", IMAGE])) {
        return Ok(());
    }
    import_root(
        work,
        docker().args(["import", "--change", "CMD [\"/usr/local/sbin/mitogen-e2e-init\"]", "-", IMAGE]),
    )
}

/// Runs `import` (an engine's `import -`) with the root as a tar stream on its stdin.
fn import_root(work: &Path, import: &mut Command) -> Result<()> {
    let rootfs = ensure_rootfs(work)?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-c", "--exclude=./.mitogen-e2e-complete", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("tar")?;
    run(import.stdin(tar.stdout.context("tar stdout")?).stdout(Stdio::null()))
}

/// The running hosts, as written to `target/e2e/hosts`.
pub struct Hosts {
    /// The description file for the tests (`MITOGEN_E2E`).
    pub file: PathBuf,
    lines: Vec<String>,
    /// What runs them.
    pub engine: Engine,
}

impl Hosts {
    /// How to reach the hosts by hand, and how to remove them.
    pub fn describe(&self) -> String {
        let remove = match self.engine {
            Engine::Docker => format!(
                "docker rm -f $(docker ps -aq --filter name=mitogen-e2e-); docker network rm {NETWORK}"
            ),
            Engine::Netns => "MITOGEN_E2E=target/e2e/hosts cargo xtask host teardown".to_string(),
        };
        format!(
            "{}\nreach them with: ssh -i target/e2e/id_ed25519 -o UserKnownHostsFile=target/e2e/known_hosts \
             mitogen-test-key@<address>\nremove them with: {remove}",
            self.lines.join("\n")
        )
    }
}

fn container(name: &str) -> String {
    format!("mitogen-e2e-{name}")
}

/// Removes every test host of both engines: containers (also those a test started and
/// could not remove) and the network, namespaces and their files; only ours, by name.
pub fn teardown(root: &Path) {
    netns::teardown(&root.join("target/e2e"));
    quiet(podman().args(["rm", "-f", "-t", "0", &container("podman")]));
    if !quiet(docker().arg("info")) {
        return;
    }
    if let Ok(out) = docker().args(["ps", "-aq", "--filter", "name=mitogen-e2e-"]).output() {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            quiet(docker().args(["rm", "-f", id]));
        }
    }
    quiet(docker().args(["network", "rm", NETWORK]));
}

/// The client key pair, made once.
fn client_key(work: &Path) -> Result<(PathBuf, String)> {
    let key = work.join("id_ed25519");
    if !key.exists() {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "mitogen-e2e", "-f"])
            .arg(&key))?;
    }
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))?.trim().to_string();
    Ok((key, pubkey))
}

/// The docker client's real path, to mount into the container host.
fn docker_client() -> Result<String> {
    Ok(std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("docker"))
        .find(|p| p.is_file())
        .context("the docker client is not on PATH")?
        .canonicalize()?
        .display()
        .to_string())
}

/// Starts one container host; returns its address.
fn start_container(
    name: &str,
    spec: netns::Spec,
    container_host: bool,
    pubkey: &str,
    key: &Path,
) -> Result<String> {
    let c = container(name);
    let mut cmd = docker();
    cmd.args(["run", "-d", "--name", &c, "--hostname", &c, "--network", NETWORK])
        .args(["-e", &format!("E2E_PUBKEY={pubkey}"), "-e", &format!("E2E_ROLE={}", spec.role)])
        .args(["-v", &format!("{}:/etc/mitogen-e2e-key:ro", key.display())]);
    if spec.noexec {
        cmd.args(["--tmpfs", "/tmp:rw,noexec,nosuid", "--tmpfs", "/dev/shm:rw,noexec,nosuid"]);
    }
    if let Some(n) = spec.nofile {
        cmd.args(["--ulimit", &format!("nofile={n}:{n}")]);
    }
    if container_host {
        cmd.args(["-v", "/var/run/docker.sock:/var/run/docker.sock"])
            .args(["-v", &format!("{}:/usr/local/bin/docker:ro", docker_client()?)]);
    }
    run(cmd.arg(IMAGE).stdout(Stdio::null()))?;
    let out = docker()
        .args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &c])
        .output()?;
    let ip = String::from_utf8(out.stdout)?.trim().to_string();
    if ip.is_empty() {
        bail!("container {c} has no address");
    }
    Ok(ip)
}

fn podman() -> Command {
    Command::new("podman")
}

/// Starts a podman container from the same root (no sshd: only `podman exec` reaches it);
/// returns its name. The image is imported once and cached as [`PODMAN_IMAGE`].
fn start_podman(work: &Path) -> Result<String> {
    if !quiet(podman().arg("--version")) {
        bail!("podman is not installed (Debian: podman)");
    }
    if !quiet(podman().args(["image", "exists", PODMAN_IMAGE])) {
        import_root(work, podman().args(["import", "-", PODMAN_IMAGE]))?;
    }
    let c = container("podman");
    quiet(podman().args(["rm", "-f", "-t", "0", &c]));
    // Limits low enough to set without CAP_SYS_RESOURCE (some VMs lack it), which podman's
    // defaults are not.
    run(podman()
        .args(["run", "-d", "--name", &c, "--network", "none"])
        .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"])
        .args([PODMAN_IMAGE, "sleep", "infinity"])
        .stdout(Stdio::null()))?;
    Ok(c)
}

/// Starts host `name` on `engine` and waits for its sshd; returns its address and its
/// keys in known_hosts form. A host that fails half-way is removed again.
fn start(
    engine: Engine,
    work: &Path,
    name: &str,
    spec: netns::Spec,
    container_host: bool,
) -> Result<(String, String)> {
    let started = (|| -> Result<(String, String)> {
        let (key, pubkey) = client_key(work)?;
        let ip = match engine {
            Engine::Docker => {
                ensure_image(work)?;
                start_container(name, spec, container_host, &pubkey, &key)?
            }
            Engine::Netns => netns::start(work, &ensure_rootfs(work)?, name, spec, &pubkey, &key)?,
        };
        let keys = scan(&ip, || match engine {
            Engine::Docker => docker()
                .args(["logs", &container(name)])
                .output()
                .map(|o| {
                    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
                })
                .unwrap_or_default(),
            Engine::Netns => netns::log(work, name),
        })?;
        Ok((ip, keys))
    })();
    started.inspect_err(|_| remove(engine, work, name)).with_context(|| format!("e2e host {name}"))
}

/// Removes host `name` (paused or not); quiet on what is already gone.
fn remove(engine: Engine, work: &Path, name: &str) {
    match engine {
        Engine::Docker => {
            // A paused container cannot be removed everywhere.
            quiet(docker().arg("unpause").arg(container(name)));
            quiet(docker().args(["rm", "-f", &container(name)]));
        }
        Engine::Netns => netns::remove(work, name),
    }
}

/// Builds (or reuses) the root, starts every host, waits for their sshd, and writes the
/// description file.
pub fn provision(root: &Path) -> Result<Hosts> {
    provision_on(root, Engine::choose()?)
}

/// [`provision`] on a given engine.
pub fn provision_on(root: &Path, engine: Engine) -> Result<Hosts> {
    let work = root.join("target/e2e");
    std::fs::create_dir_all(&work)?;
    teardown(root);
    if engine == Engine::Docker {
        run(docker().args(["network", "create", NETWORK]).stdout(Stdio::null()))?;
    }
    let (key, _) = client_key(&work)?;
    let mut lines = vec![
        format!("engine={}", engine.name()),
        format!("ctl={}", std::env::current_exe()?.display()),
        format!("key={}", key.display()),
    ];
    let mut known = String::new();
    for h in HOSTS {
        let (ip, keys) = start(engine, &work, h.name, h.spec, h.container_host)?;
        known.push_str(&keys);
        lines.push(format!("{}={ip}", h.name));
        if engine == Engine::Docker {
            lines.push(format!("{}.container={}", h.name, container(h.name)));
        }
    }
    match start_podman(&work) {
        Ok(c) => lines.push(format!("podman={c}")),
        // The podman test fails and says why; every other test can still run.
        Err(e) => eprintln!("warning: no podman container for the e2e tests: {e:#}"),
    }
    let kh = work.join("known_hosts");
    std::fs::write(&kh, known)?;
    lines.push(format!("known_hosts={}", kh.display()));
    let file = work.join("hosts");
    std::fs::write(&file, lines.join("\n") + "\n")?;
    Ok(Hosts { file, lines, engine })
}

/// Waits for the sshd at `ip` and returns its keys in known_hosts form; `logs` explains a
/// failure.
fn scan(ip: &str, logs: impl FnOnce() -> String) -> Result<String> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("ssh-keyscan").args(["-T", "2", ip]).stderr(Stdio::null()).output()?;
        let keys = String::from_utf8(out.stdout)?;
        if keys.lines().any(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            return Ok(keys);
        }
        if Instant::now() > until {
            bail!("sshd at {ip} did not come up: {}", logs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `xtask host <verb> <name> [script]`: what the tests do to the hosts, on either engine
/// (read from the file named by `MITOGEN_E2E`). Names are the short ones (`plain`, or a
/// private host's).
///
/// - `start NAME`: a private host like `plain`; prints its address;
/// - `exec NAME SCRIPT`: `sh -c SCRIPT` as root on the host (its stdout passes through;
///   the exit status is the script's);
/// - `kill NAME`, `pause NAME`, `unpause NAME`, `cut NAME` (off its network), `rm NAME`;
/// - `teardown`: every host.
pub fn host_command(root: &Path, args: &[String]) -> Result<()> {
    let work = root.join("target/e2e");
    let file = std::env::var_os("MITOGEN_E2E").map(PathBuf::from).unwrap_or_else(|| work.join("hosts"));
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("the e2e hosts file {}", file.display()))?;
    let engine = match text.lines().find_map(|l| l.strip_prefix("engine=")) {
        Some("netns") => Engine::Netns,
        _ => Engine::Docker,
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let docker_verb =
        |verb: &[&str], name: &str| run(docker().args(verb).arg(container(name)).stdout(Stdio::null()));
    match (engine, args.as_slice()) {
        (_, ["teardown"]) => teardown(root),
        (_, ["start", name]) => println!("{}", start(engine, &work, name, PRIVATE, false)?.0),
        (Engine::Docker, ["exec", name, script]) => {
            let st = docker().args(["exec", &container(name), "sh", "-c", script]).status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        (Engine::Netns, ["exec", name, script]) => {
            std::process::exit(netns::exec(&work, name, script)?.code().unwrap_or(1));
        }
        (Engine::Docker, ["kill", name]) => docker_verb(&["kill"], name)?,
        (Engine::Docker, ["pause", name]) => docker_verb(&["pause"], name)?,
        (Engine::Docker, ["unpause", name]) => docker_verb(&["unpause"], name)?,
        (Engine::Docker, ["cut", name]) => docker_verb(&["network", "disconnect", NETWORK], name)?,
        (_, ["rm", name]) => remove(engine, &work, name),
        (Engine::Netns, ["kill", name]) => netns::kill(&work, name)?,
        (Engine::Netns, ["pause", name]) => netns::pause(&work, name)?,
        (Engine::Netns, ["unpause", name]) => netns::unpause(&work, name)?,
        (Engine::Netns, ["cut", name]) => netns::cut(&work, name)?,
        _ => bail!("usage: xtask host <start|exec|kill|pause|unpause|cut|rm> NAME [SCRIPT] | teardown"),
    }
    Ok(())
}
