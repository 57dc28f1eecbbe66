//! The first stage: how any method that starts a process through a command (sudo, su,
//! doas, ssh, containers, and local "through sh") gets the agent running with nothing
//! installed and nothing left behind.
//!
//! 1. The command line is one short POSIX `sh` program ([`FirstStage::script`], well under
//!    1 KiB, only `[A-Za-z0-9]` values substituted, so it survives sudo's and ssh's quoting).
//!    It reads the OS and architecture from `/proc/sys/kernel/{ostype,arch}` (Linux 6.1+;
//!    `uname` otherwise, a process more) and prints one marker line, `MITO<token> <os> <arch> <cached> <loaders>`, where the
//!    token is random per connection, so a banner, a prompt or profile output can never be
//!    mistaken for it.
//! 2. The master checks the OS and architecture against the image ([`arch_matches`]) and
//!    refuses a mismatch before anything is sent or run. It answers with one line,
//!    `<len> <encoding> <memfd syscall> <code>` ([`answer`]), which the shell reads with
//!    `read` (one byte at a time: nothing beyond the line is consumed) and runs. For perl
//!    and python3 the code is a few words that read the loader program, which follows the
//!    line, in one go. The image comes last.
//!    A non-blocking stdin makes `read` fail at once: the shell retries ten times a second,
//!    for at most 30 s (no spinning; a closed stdin ends it after that bound).
//! 3. The loader reads exactly `len` bytes (never to end of file: the same stream becomes
//!    the message stream) and executes the image from memory: `memfd_create` through perl
//!    or python3 (which first make stdin blocking), with `argv[0]` set so `ps` shows who started it; without either, a private
//!    file on a tmpfs (tested for exec permission first) that is unlinked before the agent
//!    runs, filled by `dd` reads of at most what is left (retried like `read` above when
//!    stdin is non-blocking and empty: a failed or short `dd` loses nothing). With the opt-in cache, the loader also keeps the image under
//!    `${XDG_CACHE_HOME:-~/.cache}/mitogen/<hash>`, and the next connection sends no image.
//!
//! **Handed over** ([`Loader::HandedOver`]): a method that runs its command on this host and
//! passes it our stdin (sudo, doas) gets the image *as* stdin: a sealed, read-only memfd the
//! master makes once per image. The stream is then the child's stdout alone (a socket works
//! both ways): the first stage reads its answer there (one blocking `read`: if it fails,
//! the master is gone and the first stage ends), checks that stdin is a regular file
//! and stdout a socket (sudo's I/O logging puts pipes in between; the master then starts
//! it again the usual way), and `exec`s `/proc/self/fd/0`. No interpreter runs, no byte of
//! the image is sent or copied, and every such child runs the one copy. The agent is told
//! by [`STREAM_ON_STDOUT`].

use std::fmt::Write as _;

/// Prefix of the marker line.
pub const MARKER: &str = "MITO";

/// The value of [`crate::AGENT_ENV`] for an agent whose stdin is its image and whose
/// stream runs over stdout alone (both directions: it is a socket).
pub const STREAM_ON_STDOUT: &str = "stdout";

/// Exit codes of the first stage, for errors.
pub const EXIT_NO_ANSWER: i32 = 90;
/// No directory allowed executing a file (noexec everywhere) and no memfd loader.
pub const EXIT_NO_EXEC_DIR: i32 = 91;

/// How the image travels after the answer line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Encoding {
    /// As is.
    Raw,
    /// gzip (deflate), decompressed by the python3 loader (zlib is always built in; perl's
    /// zlib module is not part of `perl-base`, so perl gets the image raw).
    Gzip,
}

impl Encoding {
    fn word(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Gzip => "gz",
        }
    }
}

/// The parameters of one first stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstStage {
    /// Random token carried by the marker line (hex).
    pub token: String,
    /// Hash of the image (hex), the cache key.
    pub hash: String,
    /// `argv[0]` for the agent (`[A-Za-z0-9@:._-]` only; other characters are dropped).
    pub argv0: String,
    /// Look up and fill the target's image cache.
    pub cache: bool,
    /// The image is handed over as the first stage's stdin (a sealed memfd, same host):
    /// the stream runs over stdout alone ([`Loader::HandedOver`]).
    pub handover: bool,
}

/// What a method hands to the target account's shell (ssh's remote command, `su -c`): that
/// shell may not be POSIX, so it only has to `exec /bin/sh` with the first-stage `script`
/// as one single-quoted argument (the script has no single quote).
pub fn exec_sh(script: &str) -> String {
    debug_assert!(!script.contains('\''));
    format!("exec /bin/sh -c '{script}'")
}

/// A random hex token from the kernel's generator.
pub fn random_token() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom fills the buffer it is given.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Fall back to something unique enough for a marker: time and pid.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
    }
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn safe(s: &str, extra: &[char]) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric() || extra.contains(c)).collect()
}

impl FirstStage {
    /// The `sh -c` program (one argument).
    pub fn script(&self) -> String {
        let token = safe(&self.token, &[]);
        let hash = safe(&self.hash, &[]);
        let argv0 = safe(&self.argv0, &['@', ':', '.', '_', '-']);
        let cache = u8::from(self.cache);
        // Handed over: the image must be stdin and the stream stdout; a relay (sudo's I/O
        // log) would have put pipes there, and the master then starts again without. The
        // stream is then the master's own socket, never non-blocking: a failed read means
        // the master is gone, and the first stage ends at once.
        let (check, answer, agent) = if self.handover {
            (
                "I=0;[ -f /proc/self/fd/0 ]&&[ -S /proc/self/fd/1 ]&&I=1;",
                format!("read -r N E S X <&1||exit {EXIT_NO_ANSWER};"),
                STREAM_ON_STDOUT,
            )
        } else {
            (
                "I=0;",
                format!("i=0;until read -r N E S X;do [ $((i+=1)) -gt 300 ]&&exit {EXIT_NO_ANSWER};sleep .1;done;"),
                "1",
            )
        };
        format!(
            "T={token};H={hash};A={argv0};C=${{XDG_CACHE_HOME:-$HOME/.cache}}/mitogen;\
             L=;for p in perl python3;do command -v $p >/dev/null 2>&1&&L=$L,$p;done;\
             K=0;[ {cache} = 1 ]&&{{ [ -x \"$C/$H\" ]&&K=1||mkdir -p \"$C\" 2>/dev/null;}};\
             {{ read -r O </proc/sys/kernel/ostype&&read -r M </proc/sys/kernel/arch;}} 2>/dev/null||{{ set -- $(uname -sm);O=$1;M=$2;}};\
             {check}echo \"{MARKER}$T $O $M $K $I ${{L#,}}\";{answer}\
             export MITOGEN_AGENT={agent};eval \"$X\""
        )
    }

    /// Parses one line of the child's output; `Some` only for our marker line.
    pub fn parse(&self, line: &str) -> Option<Report> {
        let rest = line.trim_end().strip_prefix(MARKER)?.strip_prefix(self.token.as_str())?;
        let mut f = rest.strip_prefix(' ')?.split(' ');
        let os = f.next()?.to_string();
        let arch = f.next()?.to_string();
        let cached = f.next()? == "1";
        let handover = f.next()? == "1";
        let loaders =
            f.next().unwrap_or("").split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        Some(Report { os, arch, cached, handover, loaders })
    }
}

/// What the first stage reported about the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `uname -s`, e.g. `Linux`.
    pub os: String,
    /// `uname -m`, e.g. `x86_64`.
    pub arch: String,
    /// The cache holds the image already.
    pub cached: bool,
    /// The image handed over is stdin and the stream is stdout, as the master wired them.
    pub handover: bool,
    /// Loaders found: `perl`, `python3`.
    pub loaders: Vec<String>,
}

/// The `uname -m` name of the architecture this program (and so its image) was built for.
pub fn image_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86" => "i686",
        "arm" => "armv7l",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// True if an image built for `image` (a [`image_arch`] name) runs on a `uname -m` of
/// `target`.
pub fn arch_matches(image: &str, target: &str) -> bool {
    image == target
        || (image == "i686" && matches!(target, "i386" | "i486" | "i586" | "i686"))
        || (image == "armv7l" && target.starts_with("armv7"))
        || (image == "aarch64" && target == "arm64")
}

/// The `memfd_create` system call number on `arch`, if known.
pub fn memfd_syscall(arch: &str) -> Option<u32> {
    Some(match arch {
        "x86_64" => 319,
        "aarch64" | "arm64" | "riscv64" => 279,
        "i386" | "i486" | "i586" | "i686" => 356,
        a if a.starts_with("armv7") => 385,
        "s390x" => 350,
        "ppc64le" | "ppc64" => 360,
        _ => return None,
    })
}

/// Which loader will run the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Loader {
    /// The cached image is executed; nothing is sent.
    Cached,
    /// perl: memfd, `argv[0]` set.
    Perl,
    /// python3: memfd, `argv[0]` set.
    Python,
    /// Plain sh: a private, immediately unlinked file on a tmpfs.
    TmpFile,
    /// The image is already there, as the first stage's stdin: a sealed memfd the master
    /// (on the same host) made once and hands to every such child. Executed as it is: no
    /// interpreter, nothing sent or copied.
    HandedOver,
}

impl Loader {
    /// The encoding this loader accepts.
    pub fn encoding(self) -> Encoding {
        match self {
            Loader::Python => Encoding::Gzip,
            Loader::Perl | Loader::Cached | Loader::TmpFile | Loader::HandedOver => Encoding::Raw,
        }
    }
}

/// Picks the loader for what the target reported.
pub fn choose(report: &Report) -> Loader {
    let memfd = memfd_syscall(&report.arch).is_some();
    if report.cached {
        Loader::Cached
    } else if report.handover {
        Loader::HandedOver
    } else if memfd && report.loaders.iter().any(|l| l == "perl") {
        Loader::Perl
    } else if memfd && report.loaders.iter().any(|l| l == "python3") {
        Loader::Python
    } else {
        Loader::TmpFile
    }
}

/// The perl loader, run by [`PERL_BOOT`]. No modules (each costs milliseconds). The image
/// goes to the memfd (and the cache file) 64 KiB at a time through one reused buffer:
/// growing one scalar to the image's size cost perl about twice as long.
const PERL: &str = "($n,$e,$s,$a,$c,$p)=@ARGV;\
$f=syscall($s+0,$m=\"mitogen\",1);$f>=0||die\"memfd_create: $!\\n\";open F,\">&=$f\";$c&&open W,\">$p.$$\";\
while($n>0){$r=sysread(STDIN,$b,$n<65536?$n:65536);$r>0||die\"short image\\n\";syswrite(F,$b)==$r||die\"memfd: $!\\n\";$c&&print W $b;$n-=$r}\
if($c){close W;chmod 0700,\"$p.$$\";rename\"$p.$$\",$p}exec{\"/proc/self/fd/$f\"}$a";

/// What the answer line runs for perl: clear `O_NONBLOCK` on stdin (`fcntl(F_SETFL=4,
/// F_GETFL=3)`; 04000 on every architecture with a known memfd call), read the loader that
/// follows the line (its length is the first argument) and run it. The shell's `read`
/// takes one byte per system call, so the loader does not travel in the line.
const PERL_BOOT: &str = "fcntl(STDIN,4,fcntl(STDIN,3,0)&~2048);$l=shift;\
$c.=$b while$l>length$c&&sysread STDIN,$b,$l-length$c;$l==length$c||die\"short loader\\n\";eval$c;die$@";

/// The python3 loader (same arguments as perl's).
const PYTHON: &str = "import os,sys,zlib
n,e,s,a,c,p=sys.argv[1:];n=int(n);b=bytearray()
while len(b)<n:
 r=os.read(0,n-len(b))
 if not r:sys.exit(\"short image\")
 b+=r
if e==\"gz\":b=zlib.decompress(b,31)
if c==\"1\":t=p+\".%d\"%os.getpid();open(t,\"wb\").write(b);os.chmod(t,448);os.rename(t,p)
f=os.memfd_create(\"mitogen\",1);v=memoryview(b)
while v:v=v[os.write(f,v):]
os.execv(\"/proc/self/fd/%d\"%f,[a])
";

/// What the answer line runs for python3, as [`PERL_BOOT`].
const PYTHON_BOOT: &str = "import os,sys;os.set_blocking(0,True);l=int(sys.argv.pop(1));c=b\\\"\\\"\\n\
while len(c)<l:\\n r=os.read(0,l-len(c))\\n if not r:sys.exit(\\\"short loader\\\")\\n c+=r\\n\
exec(c)";

/// What the master sends after the marker line, before the image of `len` bytes as sent:
/// the answer line for `loader`, then the loader program itself where it has one (the
/// line makes perl or python read it from the stream in one go).
pub fn answer(loader: Loader, len: usize, arch: &str, cache: bool) -> String {
    let s = memfd_syscall(arch).unwrap_or(0);
    let c = u8::from(cache);
    let e = loader.encoding().word();
    let args = format!("$N $E $S \"$A\" {c} \"$C/$H\"");
    let (code, program) = match loader {
        // The name as an argument, so that `ps` shows who started the agent.
        Loader::Cached => ("exec \"$C/$H\" \"$A\"".to_string(), ""),
        Loader::HandedOver => {
            let keep = "cp /proc/self/fd/0 \"$C/$H.$$\"&&chmod 700 \"$C/$H.$$\"&&mv -f \"$C/$H.$$\" \"$C/$H\"";
            let keep = if cache { format!("{{ {keep};}} 2>/dev/null;") } else { String::new() };
            (format!("{keep}exec /proc/self/fd/0 \"$A\""), "")
        }
        Loader::Perl => (format!("exec perl -e '{PERL_BOOT}' {} {args}", PERL.len()), PERL),
        Loader::Python => {
            (format!("exec python3 -c 'exec(\"{PYTHON_BOOT}\")' {} {args}", PYTHON.len()), PYTHON)
        }
        Loader::TmpFile => (
            format!(
                "for D in \"$XDG_RUNTIME_DIR\" /dev/shm /tmp \"$HOME\";do [ -d \"$D\" ]||continue;\
                 F=$(mktemp \"$D/.mitogen.XXXXXX\" 2>/dev/null)&&chmod 700 \"$F\"&&cp /bin/true \"$F\"&&\"$F\"&&break;\
                 rm -f \"$F\";F=;done;[ \"$F\" ]||exit {EXIT_NO_EXEC_DIR};\
                 :>\"$F\";i=0;while R=$((N-$(wc -c <\"$F\")));[ $R -gt 0 ];do \
                 dd bs=65536 count=$R iflag=count_bytes 2>/dev/null >>\"$F\"||dd bs=$R count=1 2>/dev/null >>\"$F\";\
                 [ $((N-$(wc -c <\"$F\"))) -lt $R ]||{{ [ $((i+=1)) -gt 300 ]&&exit {EXIT_NO_ANSWER};sleep .1;}};done;\
                 exec 4<\"$F\";rm -f \"$F\";exec /proc/self/fd/4"
            ),
            "",
        ),
    };
    let n = if matches!(loader, Loader::Cached | Loader::HandedOver) { 0 } else { len };
    format!("{n} {e} {s} {code}\n{program}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> FirstStage {
        FirstStage {
            token: "0123456789abcdef".into(),
            hash: "f".repeat(32),
            argv0: "mitogen:someuser@some-host.example:4194304".into(),
            cache: true,
            handover: false,
        }
    }

    #[test]
    fn command_line_is_short_and_quote_free() {
        for handover in [false, true] {
            let s = FirstStage { handover, ..stage() }.script();
            assert!(s.len() <= 1024, "{} bytes", s.len());
            assert!(!s.contains('\''), "single quotes would break sudo/ssh quoting");
            assert!(!s.contains('\n'));
            // Handed over, the answer comes on stdout (the socket) and the agent is told so.
            assert_eq!(s.contains("read -r N E S X <&1||exit 90;"), handover);
            assert_eq!(s.contains(&format!("MITOGEN_AGENT={STREAM_ON_STDOUT};")), handover);
        }
    }

    #[test]
    fn only_our_marker_is_recognised() {
        let st = stage();
        let good = "MITO0123456789abcdef Linux x86_64 0 1 perl,python3\n";
        assert_eq!(
            st.parse(good),
            Some(Report {
                os: "Linux".into(),
                arch: "x86_64".into(),
                cached: false,
                handover: true,
                loaders: vec!["perl".into(), "python3".into()]
            })
        );
        for bad in [
            "MITOfedcba9876543210 Linux x86_64 0 0 perl",
            "Password: MITO0123456789abcdef Linux x86_64 0 0 perl",
            "MITO0123456789abcdefLinux x86_64 0 0 perl",
            "Welcome! your password expires in 3 days",
            "",
        ] {
            assert_eq!(st.parse(bad), None, "{bad:?}");
        }
        let none = st.parse("MITO0123456789abcdef Linux aarch64 1 0 ").unwrap();
        assert!(none.loaders.is_empty() && none.cached && !none.handover);
    }

    #[test]
    fn loader_choice_follows_the_report() {
        let r = |cached, loaders: &[&str], arch: &str| Report {
            os: "Linux".into(),
            arch: arch.into(),
            cached,
            handover: false,
            loaders: loaders.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(choose(&r(true, &["perl"], "x86_64")), Loader::Cached);
        assert_eq!(choose(&r(false, &["perl", "python3"], "x86_64")), Loader::Perl);
        assert_eq!(choose(&r(false, &["python3"], "x86_64")), Loader::Python);
        assert_eq!(choose(&r(false, &[], "x86_64")), Loader::TmpFile);
        // No known memfd syscall: fall back to the file.
        assert_eq!(choose(&r(false, &["perl"], "mips")), Loader::TmpFile);
        // Handed over: no interpreter needed; a cached copy is as good.
        let handed = |cached| Report { handover: true, ..r(cached, &[], "x86_64") };
        assert_eq!(choose(&handed(false)), Loader::HandedOver);
        assert_eq!(choose(&handed(true)), Loader::Cached);
    }

    #[test]
    fn interpreters_read_their_loader_after_a_short_line() {
        for (loader, program) in [(Loader::Perl, PERL), (Loader::Python, PYTHON)] {
            let a = answer(loader, 1234, "x86_64", true);
            let (line, rest) = a.split_once('\n').unwrap();
            // The shell reads the line a byte per system call: it stays short.
            assert!(line.len() < 320, "{loader:?}: {} bytes", line.len());
            assert!(line.starts_with("1234 "), "{line}");
            // Single-quoted in the line: no quote of its own.
            assert_eq!(line.matches('\'').count(), 2, "{line}");
            assert_eq!(rest, program);
            assert!(line.contains(&format!(" {} $N $E $S", program.len())), "{line}");
        }
        assert!(!answer(Loader::Cached, 1, "x86_64", true).contains("perl"));
        // Handed over: nothing follows the line; with the cache on, it is filled too.
        assert_eq!(
            answer(Loader::HandedOver, 1234, "x86_64", false),
            "0 raw 319 exec /proc/self/fd/0 \"$A\"\n"
        );
        let keep = answer(Loader::HandedOver, 1234, "x86_64", true);
        assert!(keep.starts_with("0 raw 319 {") && keep.ends_with("exec /proc/self/fd/0 \"$A\"\n"), "{keep}");
    }

    #[test]
    fn arch_names() {
        assert!(arch_matches("x86_64", "x86_64"));
        assert!(!arch_matches("x86_64", "aarch64"));
        assert!(arch_matches("i686", "i586"));
        assert!(arch_matches("aarch64", "arm64"));
        assert_eq!(answer(Loader::Cached, 123, "x86_64", false), "0 raw 319 exec \"$C/$H\" \"$A\"\n");
    }
}
