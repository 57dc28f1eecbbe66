//! The sudo, su and doas transports: an agent in another account on this host.
//!
//! Each runs the sh first stage ([`mitogen_transport_local::bootstrap`]), which receives the
//! agent image over the stream and runs it from memory: nothing is installed or written in
//! the target account. Data goes over a socketpair; sudo's prompt appears on a PTY that is
//! the child's controlling terminal and stderr ("hybrid" TTY), answered by a sans-IO
//! [`PromptDialogue`] with a prompt string we force (`-p`), so the prompt is recognised
//! exactly whatever the locale, banner or sudo flavour (sudo.ws, sudo-rs, pwfeedback).
//! Without a password there is nothing to answer: sudo then runs non-interactively (`-n`),
//! and when the image is handed over (the default over a socketpair), without a terminal,
//! which saves it a PTY and a monitor process (`use_pty`). Not for a login shell (whatever
//! its profile starts ends with the terminal when a start is abandoned), nor with
//! [`SudoOptions::tty`] (set when `requiretty` refused the first start).
//! su and doas cannot be given a prompt: theirs are recognised from configurable texts
//! ([`SuOptions::password_prompts`], [`DoasOptions::password_prompts`]); util-linux su
//! reads the password from stdin, so its answer goes to the stream, not the terminal.

#![warn(missing_docs)]

mod dialogue;

pub use dialogue::PromptDialogue;

use mitogen_core::{Dialogue, Password, StartError};
use mitogen_transport_local::bootstrap::{exec_sh, FirstStage};
use mitogen_transport_local::command::{CommandMethod, CommandTransport, Wiring};
use mitogen_transport_local::DataChannel;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Options of the sudo method.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct SudoOptions {
    /// Target account (default `root`).
    pub username: String,
    /// Password to answer sudo's prompt with; never logged.
    pub password: Option<Password>,
    /// `-E`: keep the environment.
    pub preserve_env: bool,
    /// `-H`: set `HOME` to the target's.
    pub set_home: bool,
    /// `-i`: run the target's login shell (profiles run).
    pub login: bool,
    /// `-r`: SELinux role.
    pub selinux_role: Option<String>,
    /// `-t`: SELinux type.
    pub selinux_type: Option<String>,
    /// The sudo program (default `sudo` from `PATH`).
    pub sudo_path: PathBuf,
    /// More arguments for sudo, before `--`.
    pub extra_args: Vec<String>,
    /// The agent image; `None` sends the current executable.
    pub program: Option<PathBuf>,
    /// Keep the image in the target account's cache and reuse it.
    pub cache: bool,
    /// Carry messages over pipes instead of a socketpair.
    pub pipes: bool,
    /// Give sudo a terminal even without a password and a login shell. Not needed for
    /// `requiretty` accounts: a start that sudo refuses for want of one is made again with
    /// one.
    pub tty: bool,
}

impl Default for SudoOptions {
    fn default() -> Self {
        SudoOptions {
            username: "root".into(),
            password: None,
            preserve_env: false,
            set_home: false,
            login: false,
            selinux_role: None,
            selinux_type: None,
            sudo_path: "sudo".into(),
            extra_args: Vec::new(),
            program: None,
            cache: false,
            pipes: false,
            tty: false,
        }
    }
}

impl SudoOptions {
    /// The sudo command line for `prompt` and the first-stage `script`.
    pub fn command(&self, prompt: &str, script: &str) -> Command {
        let mut cmd = Command::new(&self.sudo_path);
        cmd.arg("-u").arg(&self.username).arg("-p").arg(prompt);
        if self.password.is_none() {
            // Nothing to answer a prompt with: sudo says "a password is required" at once.
            cmd.arg("-n");
        }
        if self.preserve_env {
            cmd.arg("-E");
        }
        if self.set_home {
            cmd.arg("-H");
        }
        if self.login {
            cmd.arg("-i");
        }
        if let Some(r) = &self.selinux_role {
            cmd.arg("-r").arg(r);
        }
        if let Some(t) = &self.selinux_type {
            cmd.arg("-t").arg(t);
        }
        let script = if self.shell_mode() { dollar_free(script) } else { script.to_string() };
        cmd.args(&self.extra_args).arg("--").arg("/bin/sh").arg("-c").arg(script);
        cmd
    }

    /// sudo runs the account's shell (`-i`, `-s`): with `-i` its profile too.
    fn shell_mode(&self) -> bool {
        self.login
            || self.extra_args.iter().any(|a| matches!(a.as_str(), "-i" | "-s" | "--login" | "--shell"))
    }

    /// A PTY for the start: to answer a prompt, for a login shell (whatever its profile
    /// starts ends with the terminal when the start is abandoned), or when asked.
    fn wants_tty(&self) -> bool {
        self.password.is_some() || self.tty || self.shell_mode()
    }
}

/// The first stage rewritten without `$`, for `sudo -i` / `-s`: sudo then hands the command
/// to the account's shell with every character escaped except `$` (so that variables
/// expand), which would expand the first stage's variables too early. `printf` turns
/// `\044` back into `$` in the inner shell. The first stage has no `'`, `\\` or `%`.
fn dollar_free(script: &str) -> String {
    debug_assert!(!script.contains(['\'', '\\', '%']));
    format!("eval \"`printf '{}'`\"", script.replace('$', "\\044"))
}

/// Options of the su method (util-linux su, or another `su USER -c CMD`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct SuOptions {
    /// Target account (default `root`).
    pub username: String,
    /// Password to answer su's prompt with; never logged.
    pub password: Option<Password>,
    /// `-l`: a login shell (profiles run).
    pub login: bool,
    /// The su program (default `su` from `PATH`).
    pub su_path: PathBuf,
    /// Texts that end su's password prompt, any case (default: `password:` and its common
    /// translations).
    pub password_prompts: Vec<String>,
    /// Texts su prints when the password is wrong (default: `su: sorry`, `su:
    /// authentication failure`, `su: incorrect password`).
    pub incorrect_prompts: Vec<String>,
    /// More arguments for su, before the user name.
    pub extra_args: Vec<String>,
    /// The agent image; `None` sends the current executable.
    pub program: Option<PathBuf>,
    /// Keep the image in the target account's cache and reuse it.
    pub cache: bool,
    /// Carry messages over pipes instead of a socketpair.
    pub pipes: bool,
}

/// Password prompts of su (and doas) in common locales, lower case.
const PASSWORD_PROMPTS: &[&str] = &[
    "password:",
    "passwort:",
    "mot de passe :",
    "mot de passe:",
    "contraseña:",
    "senha:",
    "wachtwoord:",
    "hasło:",
    "пароль:",
    "密码：",
    "密碼：",
    "パスワード:",
    "암호:",
];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Default for SuOptions {
    fn default() -> Self {
        SuOptions {
            username: "root".into(),
            password: None,
            login: false,
            su_path: "su".into(),
            password_prompts: strings(PASSWORD_PROMPTS),
            incorrect_prompts: strings(&[
                "su: sorry",
                "su: authentication failure",
                "su: incorrect password",
            ]),
            extra_args: Vec::new(),
            program: None,
            cache: false,
            pipes: false,
        }
    }
}

impl SuOptions {
    /// The su command line for the first-stage `script` (su hands `-c` to the account's
    /// shell: [`exec_sh`]).
    pub fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new(&self.su_path);
        if self.login {
            cmd.arg("-l");
        }
        cmd.args(&self.extra_args).arg("-c").arg(exec_sh(script)).arg(&self.username);
        cmd
    }
}

/// Options of the doas method (OpenBSD doas or OpenDoas).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct DoasOptions {
    /// Target account (default `root`).
    pub username: String,
    /// Password to answer doas's prompt with; never logged.
    pub password: Option<Password>,
    /// The doas program (default `doas` from `PATH`).
    pub doas_path: PathBuf,
    /// Texts that end doas's password prompt, any case (default: `password:` and common
    /// translations).
    pub password_prompts: Vec<String>,
    /// Texts doas prints when the password is wrong (default: `doas: authentication failed`).
    pub incorrect_prompts: Vec<String>,
    /// More arguments for doas, before `--`.
    pub extra_args: Vec<String>,
    /// The agent image; `None` sends the current executable.
    pub program: Option<PathBuf>,
    /// Keep the image in the target account's cache and reuse it.
    pub cache: bool,
    /// Carry messages over pipes instead of a socketpair.
    pub pipes: bool,
}

impl Default for DoasOptions {
    fn default() -> Self {
        DoasOptions {
            username: "root".into(),
            password: None,
            doas_path: "doas".into(),
            password_prompts: strings(PASSWORD_PROMPTS),
            incorrect_prompts: strings(&["doas: authentication failed"]),
            extra_args: Vec::new(),
            program: None,
            cache: false,
            pipes: false,
        }
    }
}

impl DoasOptions {
    /// The doas command line for the first-stage `script`.
    pub fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new(&self.doas_path);
        cmd.arg("-u")
            .arg(&self.username)
            .args(&self.extra_args)
            .arg("--")
            .arg("/bin/sh")
            .arg("-c")
            .arg(script);
        cmd
    }
}

/// The wiring every account-changing method shares: a hybrid PTY for the prompt (`pty`).
/// `same_host`: the method gives the program it runs our stdin (the image can be handed
/// over there); not su, which reads its password from stdin.
fn wiring(
    method: &str,
    username: &str,
    program: &Option<PathBuf>,
    cache: bool,
    pipes: bool,
    same_host: bool,
    pty: bool,
) -> Result<Wiring, StartError> {
    if username.is_empty() || username.starts_with('-') {
        return Err(StartError::Options(format!("invalid {method} username {username:?}")));
    }
    Ok(Wiring {
        program: program.clone(),
        cache,
        pty,
        data: if pipes { DataChannel::Pipes } else { DataChannel::SocketPair },
        same_host,
        description: format!("{method} -u {username}"),
    })
}

impl CommandMethod for SudoOptions {
    fn method(&self) -> &'static str {
        "sudo"
    }

    fn wiring(&self) -> Result<Wiring, StartError> {
        wiring("sudo", &self.username, &self.program, self.cache, self.pipes, true, self.wants_tty())
    }

    fn command(&self, stage: &FirstStage, _deadline: Instant) -> (Command, Option<Box<dyn Dialogue>>) {
        let prompt = format!("mitogen-sudo-password-{}:", stage.token);
        let cmd = self.command(&prompt, &stage.script());
        (cmd, Some(Box::new(PromptDialogue::sudo(&prompt, self.password.clone()))))
    }
}

impl CommandMethod for SuOptions {
    fn method(&self) -> &'static str {
        "su"
    }

    fn wiring(&self) -> Result<Wiring, StartError> {
        wiring("su", &self.username, &self.program, self.cache, self.pipes, false, true)
    }

    fn command(&self, stage: &FirstStage, _deadline: Instant) -> (Command, Option<Box<dyn Dialogue>>) {
        let d = PromptDialogue::su(self.password.clone(), &self.password_prompts, &self.incorrect_prompts);
        (self.command(&stage.script()), Some(Box::new(d)))
    }
}

impl CommandMethod for DoasOptions {
    fn method(&self) -> &'static str {
        "doas"
    }

    fn wiring(&self) -> Result<Wiring, StartError> {
        wiring("doas", &self.username, &self.program, self.cache, self.pipes, true, true)
    }

    fn command(&self, stage: &FirstStage, _deadline: Instant) -> (Command, Option<Box<dyn Dialogue>>) {
        let d = PromptDialogue::doas(self.password.clone(), &self.password_prompts, &self.incorrect_prompts);
        (self.command(&stage.script()), Some(Box::new(d)))
    }
}

/// The sudo transport.
pub type SudoTransport = CommandTransport<SudoOptions>;
/// The su transport.
pub type SuTransport = CommandTransport<SuOptions>;
/// The doas transport.
pub type DoasTransport = CommandTransport<DoasOptions>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        let args = |c: &Command| c.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>();
        let su = SuOptions { username: "bob".into(), login: true, ..Default::default() };
        assert_eq!(args(&su.command("echo x")), ["-l", "-c", "exec /bin/sh -c 'echo x'", "bob"]);
        let doas = DoasOptions { username: "bob".into(), ..Default::default() };
        assert_eq!(args(&doas.command("echo x")), ["-u", "bob", "--", "/bin/sh", "-c", "echo x"]);
        let sudo = SudoOptions { username: "bob".into(), login: true, ..Default::default() };
        let a = args(&sudo.command("P", "echo $HOME"));
        assert_eq!(a[a.len() - 1], "eval \"`printf 'echo \\044HOME'`\"");
        assert!(!a.iter().any(|a| a.contains('$')));
        let pw = SuOptions { password: Some("hunter2".into()), ..Default::default() };
        assert!(!format!("{pw:?}").contains("hunter2"));
        let pw = DoasOptions { password: Some("hunter2".into()), ..Default::default() };
        assert!(!format!("{pw:?}").contains("hunter2"));
    }

    #[test]
    fn bad_usernames_are_refused_before_anything_runs() {
        use mitogen_core::Transport;
        let mut t = SuTransport::new(SuOptions { username: "-x".into(), ..Default::default() }, "a", "h");
        assert!(matches!(t.start(Instant::now()), Err(StartError::Options(_))));
    }
}
