//! The e2e hosts without a Docker engine: each host is an sshd in its own network, mount,
//! PID and UTS namespaces, chrooted into an overlay of the same debootstrap root the Docker
//! image is made from (so accounts, sshd settings and login shells are the same).
//!
//! Network: the hosts hang off a bridge that lives in a namespace of its own
//! ([`SWITCH`]), reached from here through one veth ([`HOST_IF`], 10.231.0.1/16). Nothing
//! is added to this machine's firewall: traffic between hosts is bridged inside the switch
//! namespace, whose (empty) iptables accept everything, and traffic from here is local
//! to an interface.
//!
//! State lives in `target/e2e/netns/<name>/` (`upper`, `work`, `root`, `log`, `pid`,
//! `port`); addresses are taken by creating `target/e2e/netns/ips/<n>` (atomic), so
//! concurrent tests starting private hosts never share one.
//!
//! The faults the tests inject: kill = SIGKILL to the host's PID-namespace init (the
//! kernel ends the rest); pause = SIGSTOP to every process of the namespace until all are
//! stopped (its kernel still accepts TCP connections, as with a frozen container); cut =
//! the host's bridge port set down.

use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The namespace holding the bridge.
const SWITCH: &str = "mitogen-e2e-sw";
/// This machine's side of the link to the bridge.
const HOST_IF: &str = "mitogen-e2e0";

/// What makes one host differ from another.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// `plain` or `noperl` (the init script removes perl and python).
    pub role: &'static str,
    /// /tmp and /dev/shm mounted noexec.
    pub noexec: bool,
    /// Open-files limit for everything on the host.
    pub nofile: Option<u32>,
}

/// Runs in the new namespaces as PID 1: mounts the host's root and exec's its init script
/// (which ends in `exec sshd -D`).
const SETUP: &str = r#"set -e
R=$E2E_DIR/root
mount -t overlay overlay -o "lowerdir=$E2E_LOWER,upperdir=$E2E_DIR/upper,workdir=$E2E_DIR/work" "$R"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
opt=
[ "$E2E_NOEXEC" != 1 ] || opt=,noexec,nosuid
mount -t tmpfs -o "mode=1777$opt" tmpfs "$R/tmp"
mount -t tmpfs -o "mode=1777$opt" tmpfs "$R/dev/shm"
mount -t tmpfs tmpfs "$R/run"
echo "$E2E_HOSTNAME" >/proc/sys/kernel/hostname
[ -z "$E2E_NOFILE" ] || ulimit -n "$E2E_NOFILE"
unset E2E_DIR E2E_LOWER E2E_NOEXEC E2E_NOFILE E2E_HOSTNAME
exec chroot "$R" /usr/local/sbin/mitogen-e2e-init
"#;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn netns_name(host: &str) -> String {
    format!("mitogen-e2e-{host}")
}

fn state(work: &Path) -> PathBuf {
    work.join("netns")
}

/// Creates the bridge namespace and the link to it, once.
fn ensure_switch() -> Result<()> {
    if Path::new("/run/netns").join(SWITCH).exists() {
        return Ok(());
    }
    ip(&["netns", "add", SWITCH])?;
    ip(&["-n", SWITCH, "link", "set", "lo", "up"])?;
    ip(&["-n", SWITCH, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", SWITCH, "link", "set", "br0", "up"])?;
    ip(&["link", "add", HOST_IF, "type", "veth", "peer", "name", "up0", "netns", SWITCH])?;
    ip(&["addr", "add", "10.231.0.1/16", "dev", HOST_IF])?;
    ip(&["link", "set", HOST_IF, "up"])?;
    ip(&["-n", SWITCH, "link", "set", "up0", "master", "br0", "up"])?;
    Ok(())
}

/// Takes the lowest free host number (2 and up); its address is 10.231.n/256.n%256.
fn take_number(work: &Path) -> Result<u32> {
    let ips = state(work).join("ips");
    std::fs::create_dir_all(&ips)?;
    for n in 2..65000u32 {
        if matches!(n % 256, 0 | 255) {
            continue;
        }
        match std::fs::create_dir(ips.join(n.to_string())) {
            Ok(()) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("no free e2e address left")
}

/// Starts host `name` from the root `lower` with the client key `key`; returns its address.
pub fn start(work: &Path, lower: &Path, name: &str, spec: Spec, pubkey: &str, key: &Path) -> Result<String> {
    ensure_switch()?;
    let dir = state(work).join(name);
    if dir.exists() {
        remove(work, name);
    }
    let n = take_number(work)?;
    let addr = format!("10.231.{}.{}", n / 256, n % 256);
    let port = format!("p{n}");
    for sub in ["upper/etc", "work", "root"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::write(dir.join("port"), format!("{n}"))?;
    std::fs::copy(key, dir.join("upper/etc/mitogen-e2e-key"))?;
    let ns = netns_name(name);
    ip(&["netns", "add", &ns])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    // The address's own MAC (as Docker does): a neighbour entry cached for an earlier host
    // with this address stays right, instead of blackholing the new one for ~30 s.
    let mac = format!("02:4d:47:00:{:02x}:{:02x}", n / 256, n % 256);
    ip(&[
        "-n", &ns, "link", "add", "eth0", "address", &mac, "type", "veth", "peer", "name", &port, "netns",
        SWITCH,
    ])?;
    ip(&["-n", &ns, "addr", "add", &format!("{addr}/16"), "dev", "eth0"])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", SWITCH, "link", "set", &port, "master", "br0", "up"])?;
    let log = std::fs::File::create(dir.join("log"))?;
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "unshare",
            "--mount",
            "--pid",
            "--uts",
            "--fork",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", SETUP])
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("E2E_DIR", &dir)
        .env("E2E_LOWER", lower)
        .env("E2E_NOEXEC", if spec.noexec { "1" } else { "0" })
        .env("E2E_NOFILE", spec.nofile.map(|n| n.to_string()).unwrap_or_default())
        .env("E2E_HOSTNAME", &ns)
        .env("E2E_PUBKEY", pubkey)
        .env("E2E_ROLE", spec.role)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the tests does not take the host down.
        .process_group(0)
        .spawn()
        .context("starting the host (ip netns exec ... unshare)")?;
    // `unshare --fork` makes the host's PID 1 our child's child.
    let children = format!("/proc/{0}/task/{0}/children", child.id());
    let until = Instant::now() + Duration::from_secs(10);
    let init = loop {
        let text = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next() {
            break pid.to_string();
        }
        if Instant::now() > until {
            bail!(
                "host {name} did not start: {}",
                std::fs::read_to_string(dir.join("log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::fs::write(dir.join("pid"), &init)?;
    Ok(addr)
}

/// The host-side PID of host `name`'s init, if it still runs as our host (its root is the
/// host's root folder: never a stranger that reused the number).
fn init_pid(work: &Path, name: &str) -> Option<String> {
    let dir = state(work).join(name);
    let pid = std::fs::read_to_string(dir.join("pid")).ok()?.trim().to_string();
    let root = std::fs::read_link(format!("/proc/{pid}/root")).ok()?;
    (root == dir.join("root")).then_some(pid)
}

fn require_init(work: &Path, name: &str) -> Result<String> {
    init_pid(work, name).with_context(|| format!("e2e host {name} is not running"))
}

/// The host-side PIDs of every process on host `name`.
fn processes(init: &str) -> Vec<String> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{init}/ns/pid")) else { return Vec::new() };
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| std::fs::read_link(format!("/proc/{p}/ns/pid")).is_ok_and(|l| l == ns))
        .collect()
}

fn signal(sig: &str, pids: &[String]) {
    if !pids.is_empty() {
        let _ = Command::new("kill").arg(format!("-{sig}")).args(pids).stderr(Stdio::null()).status();
    }
}

/// Runs `sh -c script` as root on host `name`, inside all its namespaces and its root.
pub fn exec(work: &Path, name: &str, script: &str) -> Result<std::process::ExitStatus> {
    let init = require_init(work, name)?;
    Ok(Command::new("nsenter")
        .args(["-t", &init, "-n", "-m", "-p", "-u", "-r", "-w", "sh", "-c", script])
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .status()?)
}

/// SIGKILL to the host's init: the kernel ends every other process of the host.
pub fn kill(work: &Path, name: &str) -> Result<()> {
    signal("KILL", &[require_init(work, name)?]);
    Ok(())
}

/// Stops every process of the host (a frozen host: its kernel still answers TCP).
pub fn pause(work: &Path, name: &str) -> Result<()> {
    let init = require_init(work, name)?;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        // A process may fork while its siblings are being stopped: repeat until a pass finds
        // every one stopped.
        let running: Vec<String> = processes(&init)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()))
                    .is_some_and(|state| !matches!(state, 'T' | 't' | 'Z' | 'X'))
            })
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("host {name}: could not stop {running:?}");
        }
        signal("STOP", &running);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Resumes a paused host.
pub fn unpause(work: &Path, name: &str) -> Result<()> {
    signal("CONT", &processes(&require_init(work, name)?));
    Ok(())
}

/// Cuts the host off the network: its bridge port goes down.
pub fn cut(work: &Path, name: &str) -> Result<()> {
    let n = std::fs::read_to_string(state(work).join(name).join("port"))
        .with_context(|| format!("e2e host {name} does not exist"))?;
    ip(&["-n", SWITCH, "link", "set", &format!("p{}", n.trim()), "down"])
}

/// Ends host `name` and removes its namespace, files and address; quiet on what is
/// already gone.
pub fn remove(work: &Path, name: &str) {
    let dir = state(work).join(name);
    if let Some(init) = init_pid(work, name) {
        signal("CONT", &processes(&init));
        signal("KILL", std::slice::from_ref(&init));
        let until = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{init}")).exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Ok(n) = std::fs::read_to_string(dir.join("port")) {
        // Deleting a namespace is asynchronous: its link (and address) could linger on the
        // bridge after the number is free again. Deleting the bridge port is synchronous,
        // and takes the other end of the pair with it.
        let _ = ip(&["-n", SWITCH, "link", "del", &format!("p{}", n.trim())]);
        let _ = std::fs::remove_dir(state(work).join("ips").join(n.trim()));
    }
    let _ = ip(&["netns", "del", &netns_name(name)]);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("warning: could not remove {}: {e}", dir.display());
        }
    }
}

/// Removes every host, the switch and the link to it.
pub fn teardown(work: &Path) {
    if let Ok(dir) = std::fs::read_dir(state(work)) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "ips" {
                remove(work, &name);
            }
        }
    }
    let _ = std::fs::remove_dir_all(state(work).join("ips"));
    let _ = ip(&["link", "del", HOST_IF]);
    let _ = ip(&["netns", "del", SWITCH]);
}

/// Where the host's sshd says why it did not come up.
pub fn log(work: &Path, name: &str) -> String {
    std::fs::read_to_string(state(work).join(name).join("log")).unwrap_or_default()
}
