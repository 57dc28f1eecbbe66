//! The sans-IO login dialogue of the OpenSSH client.

use mitogen_core::{answer_prompt, Dialogue, DialogueStep, LoginError, Password};

/// Most output kept while looking for a prompt.
const MAX_BUF: usize = 16 * 1024;

/// Watches the OpenSSH client's terminal and stderr while it logs in.
///
/// - A password prompt (`user@host's password: `, keyboard-interactive `Password:`) is
///   an unfinished line ending in `password:`; a banner line mentioning "password" has
///   ended, so it never matches. The password is sent once; a second prompt, or
///   `Permission denied (...)` after it, means it was wrong.
/// - ssh's own failures are recognised by their exact form, so a login profile printing
///   "Permission denied" is not one: `user@host: Permission denied (publickey,password).`,
///   `Host key verification failed.`, `ssh: connect to host H port P: Connection refused`.
#[derive(Debug)]
pub struct SshDialogue {
    host: String,
    password: Option<Password>,
    buf: Vec<u8>,
    sent: bool,
    changed: bool,
}

impl SshDialogue {
    /// A dialogue for a connection to `host`, answering password prompts with `password`.
    pub fn new(host: impl Into<String>, password: Option<Password>) -> SshDialogue {
        SshDialogue { host: host.into(), password, buf: Vec::new(), sent: false, changed: false }
    }

    fn check_line(&mut self, line: &str) -> Option<LoginError> {
        let l = line.trim();
        let host = self.host.clone();
        if l.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || l.starts_with("Host key for ") {
            self.changed = true;
        }
        if l == "Host key verification failed." {
            return Some(if self.changed {
                LoginError::HostKeyChanged { host }
            } else {
                LoginError::HostKeyUnknown { host }
            });
        }
        if let Some(methods) = permission_denied(l) {
            return Some(match (&self.password, self.sent) {
                (Some(_), true) => LoginError::PasswordIncorrect { method: "ssh" },
                (None, _) if methods.split(',').any(|m| m == "password" || m == "keyboard-interactive") => {
                    LoginError::PasswordRequired { method: "ssh" }
                }
                _ => LoginError::PermissionDenied { method: "ssh", line: l.to_string() },
            });
        }
        if l == "Connection timed out during banner exchange" {
            return Some(LoginError::ConnectTimedOut { host });
        }
        if l.starts_with("ssh: ") {
            if l.ends_with(": Connection refused") {
                return Some(LoginError::ConnectionRefused { host });
            }
            if l.ends_with(": Connection timed out") || l.ends_with(": Operation timed out") {
                return Some(LoginError::ConnectTimedOut { host });
            }
            if l.contains("Could not resolve hostname") || l.ends_with(": No route to host") {
                return Some(LoginError::Refused { method: "ssh", line: l.to_string() });
            }
        }
        None
    }

    fn prompted(&mut self) -> DialogueStep {
        match answer_prompt(self.password.as_ref(), &mut self.sent, "ssh") {
            Ok(answer) => DialogueStep::Write(answer),
            Err(e) => DialogueStep::Fail(e),
        }
    }
}

/// The methods of ssh's `[user@host: ]Permission denied (m1,m2).` line.
fn permission_denied(line: &str) -> Option<&str> {
    let rest = match line.find(": Permission denied (") {
        Some(i) if !line[..i].contains(' ') => &line[i + 2..],
        _ => line,
    };
    let methods = rest.strip_prefix("Permission denied (")?.strip_suffix(").")?;
    methods.chars().all(|c| c.is_ascii_lowercase() || c == ',' || c == '-').then_some(methods)
}

impl Dialogue for SshDialogue {
    fn on_output(&mut self, bytes: &[u8]) -> DialogueStep {
        self.buf.extend_from_slice(bytes);
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            if let Some(e) = self.check_line(&String::from_utf8_lossy(&line)) {
                return DialogueStep::Fail(e);
            }
        }
        let tail = String::from_utf8_lossy(&self.buf).trim().to_ascii_lowercase();
        if tail.ends_with("password:") {
            self.buf.clear();
            return self.prompted();
        }
        if tail.starts_with("enter passphrase for key") && tail.ends_with(':') {
            self.buf.clear();
            return DialogueStep::Fail(LoginError::Refused {
                method: "ssh",
                line: "the identity file needs a passphrase (use ssh-agent)".into(),
            });
        }
        if self.buf.len() > MAX_BUF {
            self.buf.drain(..self.buf.len() - MAX_BUF / 2);
        }
        DialogueStep::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(d: &mut SshDialogue, chunks: &[&[u8]]) -> Vec<DialogueStep> {
        chunks.iter().map(|c| d.on_output(c)).filter(|s| *s != DialogueStep::Continue).collect()
    }

    #[test]
    fn password_prompt_split_across_reads_is_answered_once() {
        let mut d = SshDialogue::new("h1", Some("pw".into()));
        let steps = feed(&mut d, &[b"alice@h1's pass", b"word: "]);
        assert_eq!(steps, vec![DialogueStep::Write(b"pw\n".to_vec())]);
        let s = d.on_output(b"\r\nalice@h1's password: ");
        assert_eq!(s, DialogueStep::Fail(LoginError::PasswordIncorrect { method: "ssh" }));
    }

    #[test]
    fn permission_denied_means_required_incorrect_or_denied() {
        let mut d = SshDialogue::new("h1", None);
        let s = d.on_output(b"alice@h1: Permission denied (publickey,password).\r\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::PasswordRequired { method: "ssh" }));
        let mut d = SshDialogue::new("h1", None);
        let s = d.on_output(b"alice@h1: Permission denied (publickey).\n");
        assert!(matches!(s, DialogueStep::Fail(LoginError::PermissionDenied { .. })), "{s:?}");
        let mut d = SshDialogue::new("h1", Some("pw".into()));
        assert!(matches!(d.on_output(b"Password: "), DialogueStep::Write(_)));
        let s = d.on_output(b"\nalice@h1: Permission denied (publickey,password).\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::PasswordIncorrect { method: "ssh" }));
    }

    #[test]
    fn banners_and_profiles_are_neither_prompts_nor_failures() {
        let mut d = SshDialogue::new("h1", None);
        let noise: &[&[u8]] = &[
            b"Authorized use only. Your password: is logged.\r\n",
            b"Permission denied\n",
            b"bash: /home/x/.bashrc: Permission denied\n",
            b"Warning: Permanently added 'h1' (ED25519) to the list of known hosts.\r\n",
        ];
        assert_eq!(feed(&mut d, noise), vec![]);
    }

    #[test]
    fn host_keys_refusals_and_network_errors_are_typed() {
        let mut d = SshDialogue::new("h1", None);
        let s = d.on_output(b"No ED25519 host key is known for h1 and you have requested strict checking.\r\nHost key verification failed.\r\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::HostKeyUnknown { host: "h1".into() }));
        let mut d = SshDialogue::new("h1", None);
        let steps = feed(
            &mut d,
            &[
                b"@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n",
                b"Host key verification failed.\n",
            ],
        );
        assert_eq!(steps, vec![DialogueStep::Fail(LoginError::HostKeyChanged { host: "h1".into() })]);
        let mut d = SshDialogue::new("h1", None);
        let s = d.on_output(b"ssh: connect to host h1 port 2222: Connection refused\r\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::ConnectionRefused { host: "h1".into() }));
        let mut d = SshDialogue::new("h1", None);
        let s = d.on_output(b"ssh: connect to host 10.9.9.9 port 22: Connection timed out\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::ConnectTimedOut { host: "h1".into() }));
        let mut d = SshDialogue::new("h1", None);
        let s = d.on_output(b"Connection timed out during banner exchange\r\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::ConnectTimedOut { host: "h1".into() }));
        let mut d = SshDialogue::new("h1", None);
        let s = d.on_output(b"ssh: Could not resolve hostname nope: Name or service not known\n");
        assert!(matches!(s, DialogueStep::Fail(LoginError::Refused { .. })), "{s:?}");
    }

    #[test]
    fn debug_never_shows_the_password() {
        assert!(!format!("{:?}", SshDialogue::new("h", Some("hunter2".into()))).contains("hunter2"));
    }
}
