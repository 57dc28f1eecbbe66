//! The sans-IO password dialogue shared by sudo, su and doas.

use mitogen_core::{answer_prompt, Dialogue, DialogueStep, LoginError, Password};

/// Most output kept while looking for a prompt or a refusal.
const MAX_BUF: usize = 16 * 1024;

/// How a password prompt is recognised.
#[derive(Debug, Clone)]
enum Prompt {
    /// A prompt we forced (sudo `-p`): matched exactly, anywhere.
    Exact(Vec<u8>),
    /// Prompts we cannot choose (su, doas): the unfinished last line, lower-cased and
    /// trimmed, ends with one of these texts.
    AnyOf(Vec<String>),
}

/// Watches a terminal for a password prompt and the method's refusals.
///
/// - sudo is made to print our own prompt (with a random token), matched exactly anywhere
///   in the output, also when it is split across reads and has no newline, so banners,
///   translations or a profile printing "password" cannot match it.
/// - su and doas cannot be given a prompt: theirs is recognised from a configurable list
///   of texts, and only on an unfinished line (a prompt waits for input; a banner line
///   that mentions "Password:" has ended).
/// - Refusals only count on whole lines that start with the method's name (`sudo: ...`), so
///   a profile printing "Permission denied" is not mistaken for a failure.
/// - A second prompt means the password was wrong: it is never sent twice.
#[derive(Debug)]
pub struct PromptDialogue {
    method: &'static str,
    prompt: Prompt,
    password: Option<Password>,
    answer_on_input: bool,
    line_prefixes: Vec<String>,
    incorrect: Vec<String>,
    refused: Vec<String>,
    required: Vec<String>,
    needs_tty: Vec<String>,
    buf: Vec<u8>,
    sent: bool,
}

impl PromptDialogue {
    /// A dialogue for sudo (sudo.ws and sudo-rs) answering `prompt` with `password`.
    pub fn sudo(prompt: &str, password: Option<Password>) -> PromptDialogue {
        PromptDialogue {
            method: "sudo",
            prompt: Prompt::Exact(prompt.as_bytes().to_vec()),
            password,
            answer_on_input: false,
            line_prefixes: lower(&["sudo:", "sudo-rs:"]),
            incorrect: lower(&["incorrect password attempt", "maximum 3 incorrect authentication attempts"]),
            refused: lower(&[
                "is not in the sudoers file",
                "is not allowed to execute",
                "not allowed to run sudo",
                "unknown user",
                "no passwd entry",
                "account validation failure",
            ]),
            required: lower(&[
                "a password is required",
                "a terminal is required",
                "no tty present",
                "interactive authentication is required",
            ]),
            needs_tty: lower(&["must have a tty"]),
            buf: Vec::new(),
            sent: false,
        }
    }

    /// A dialogue for util-linux `su`: it reads the password from standard input (so the
    /// answer goes to the message stream), prompts with one of `prompts` (translated), and
    /// says one of `incorrect` when the password is wrong.
    pub fn su(password: Option<Password>, prompts: &[String], incorrect: &[String]) -> PromptDialogue {
        PromptDialogue {
            method: "su",
            prompt: Prompt::AnyOf(lower(prompts)),
            password,
            answer_on_input: true,
            line_prefixes: lower(&["su:"]),
            incorrect: lower(incorrect),
            refused: lower(&["does not exist", "must be run from a terminal", "permission denied"]),
            required: Vec::new(),
            needs_tty: Vec::new(),
            buf: Vec::new(),
            sent: false,
        }
    }

    /// A dialogue for OpenBSD `doas` (and OpenDoas): the prompt (`doas (user@host)
    /// password:`) on the terminal, recognised from `prompts`; `incorrect` texts mean a
    /// wrong password.
    pub fn doas(password: Option<Password>, prompts: &[String], incorrect: &[String]) -> PromptDialogue {
        PromptDialogue {
            method: "doas",
            prompt: Prompt::AnyOf(lower(prompts)),
            password,
            answer_on_input: false,
            line_prefixes: lower(&["doas:"]),
            incorrect: lower(incorrect),
            refused: lower(&["operation not permitted", "not permitted", "unknown user", "no passwd entry"]),
            required: lower(&["authorization required", "a tty is required"]),
            needs_tty: Vec::new(),
            buf: Vec::new(),
            sent: false,
        }
    }

    fn prompted(&mut self) -> DialogueStep {
        match answer_prompt(self.password.as_ref(), &mut self.sent, self.method) {
            Err(e) => DialogueStep::Fail(e),
            Ok(answer) if self.answer_on_input => DialogueStep::WriteInput(answer),
            Ok(answer) => DialogueStep::Write(answer),
        }
    }

    fn check_line(&self, line: &str) -> Option<LoginError> {
        let l = line.trim().to_ascii_lowercase();
        if !self.line_prefixes.iter().any(|p| l.starts_with(p.as_str())) {
            return None;
        }
        let m = self.method;
        if self.incorrect.iter().any(|t| l.contains(t.as_str())) {
            return Some(LoginError::PasswordIncorrect { method: m });
        }
        if self.required.iter().any(|t| l.contains(t.as_str())) {
            return Some(if self.password.is_some() && self.sent {
                LoginError::PasswordIncorrect { method: m }
            } else {
                LoginError::PasswordRequired { method: m }
            });
        }
        if self.needs_tty.iter().any(|t| l.contains(t.as_str())) {
            return Some(LoginError::TtyRequired { method: m });
        }
        if self.refused.iter().any(|t| l.contains(t.as_str())) {
            return Some(LoginError::Refused { method: m, line: line.trim().to_string() });
        }
        None
    }
}

fn lower<S: AsRef<str>>(v: &[S]) -> Vec<String> {
    v.iter().map(|s| s.as_ref().trim().to_lowercase()).collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Dialogue for PromptDialogue {
    fn on_output(&mut self, bytes: &[u8]) -> DialogueStep {
        self.buf.extend_from_slice(bytes);
        // Whole lines first: refusals.
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            // A forced prompt may end a line too (pwfeedback asterisks, then newline).
            if let Prompt::Exact(p) = &self.prompt {
                if let Some(pos) = find(&line, p) {
                    let rest = line[pos + p.len()..].to_vec();
                    self.buf.splice(0..0, rest);
                    return self.prompted();
                }
            }
            if let Some(e) = self.check_line(&String::from_utf8_lossy(&line)) {
                return DialogueStep::Fail(e);
            }
        }
        // Then the unfinished line: a prompt has no newline.
        match &self.prompt {
            Prompt::Exact(p) => {
                if let Some(pos) = find(&self.buf, p) {
                    self.buf.drain(..pos + p.len());
                    return self.prompted();
                }
            }
            Prompt::AnyOf(texts) => {
                let tail = String::from_utf8_lossy(&self.buf).trim().to_lowercase();
                if texts.iter().any(|t| !t.is_empty() && tail.ends_with(t.as_str())) {
                    self.buf.clear();
                    return self.prompted();
                }
            }
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

    const P: &str = "mitogen-sudo-password-1f2e3d4c:";

    fn feed(d: &mut PromptDialogue, chunks: &[&[u8]]) -> Vec<DialogueStep> {
        chunks.iter().map(|c| d.on_output(c)).filter(|s| *s != DialogueStep::Continue).collect()
    }

    #[test]
    fn answers_the_prompt_once_even_split_across_reads() {
        let mut d = PromptDialogue::sudo(P, Some("s3cret".into()));
        let steps = feed(&mut d, &[b"mitogen-sudo-pass", b"word-1f2e3d", b"4c:"]);
        assert_eq!(steps, vec![DialogueStep::Write(b"s3cret\n".to_vec())]);
    }

    #[test]
    fn second_prompt_means_incorrect_and_the_password_is_not_resent() {
        let mut d = PromptDialogue::sudo(P, Some("wrong".into()));
        assert!(matches!(d.on_output(P.as_bytes()), DialogueStep::Write(_)));
        let steps = feed(&mut d, &[b"\r\nSorry, try again.\r\n", P.as_bytes()]);
        assert_eq!(steps, vec![DialogueStep::Fail(LoginError::PasswordIncorrect { method: "sudo" })]);
    }

    #[test]
    fn prompt_without_password_fails_at_once() {
        let mut d = PromptDialogue::sudo(P, None);
        assert_eq!(
            d.on_output(P.as_bytes()),
            DialogueStep::Fail(LoginError::PasswordRequired { method: "sudo" })
        );
    }

    #[test]
    fn pwfeedback_asterisks_and_sudo_rs_messages() {
        let mut d = PromptDialogue::sudo(P, Some("pw".into()));
        assert!(matches!(d.on_output(P.as_bytes()), DialogueStep::Write(_)));
        let steps = feed(&mut d, &[b"**\r\n", b"sudo-rs: Maximum 3 incorrect authentication attempts\r\n"]);
        assert_eq!(steps, vec![DialogueStep::Fail(LoginError::PasswordIncorrect { method: "sudo" })]);
    }

    #[test]
    fn banners_and_profiles_are_not_prompts_or_failures() {
        let mut d = PromptDialogue::sudo(P, None);
        let noise: &[&[u8]] = &[
            b"Welcome! Your password expires in 3 days.\r\n",
            b"Password: \r\n",
            b"[sudo] password for someone: ",
            b"\r\nPermission denied (publickey)\r\n",
            b"bash: /home/x/.profile: Permission denied\n",
        ];
        assert_eq!(feed(&mut d, noise), vec![]);
    }

    #[test]
    fn refusals_are_typed() {
        let mut d = PromptDialogue::sudo(P, Some("pw".into()));
        let s = d.on_output(b"sudo: alice is not in the sudoers file.  This incident will be reported.\n");
        assert!(matches!(s, DialogueStep::Fail(LoginError::Refused { .. })), "{s:?}");
        let mut d = PromptDialogue::sudo(P, None);
        let s = d.on_output(b"sudo: a terminal is required to read the password\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::PasswordRequired { method: "sudo" }));
        // `sudo -n` (no password configured): sudo.ws and sudo-rs.
        for line in
            [&b"sudo: a password is required\n"[..], b"sudo-rs: interactive authentication is required\n"]
        {
            let mut d = PromptDialogue::sudo(P, None);
            assert_eq!(
                d.on_output(line),
                DialogueStep::Fail(LoginError::PasswordRequired { method: "sudo" })
            );
        }
        // requiretty without a terminal: the connection is made again with one.
        let mut d = PromptDialogue::sudo(P, None);
        let s = d.on_output(b"sudo: sorry, you must have a tty to run sudo\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::TtyRequired { method: "sudo" }));
    }

    fn su() -> PromptDialogue {
        let o = crate::SuOptions::default();
        PromptDialogue::su(Some("pw".into()), &o.password_prompts, &o.incorrect_prompts)
    }

    #[test]
    fn su_answers_on_stdin_also_translated_and_split() {
        let mut d = su();
        assert_eq!(feed(&mut d, &[b"Pass", b"word: "]), vec![DialogueStep::WriteInput(b"pw\n".to_vec())]);
        let mut d = su();
        assert_eq!(feed(&mut d, &[b"Passwort: "]), vec![DialogueStep::WriteInput(b"pw\n".to_vec())]);
        let mut d = su();
        let ru = "Пароль: ".as_bytes();
        assert_eq!(feed(&mut d, &[&ru[..3], &ru[3..]]), vec![DialogueStep::WriteInput(b"pw\n".to_vec())]);
    }

    #[test]
    fn su_banner_lines_and_profiles_are_not_prompts_or_failures() {
        let mut d = su();
        let noise: &[&[u8]] = &[
            b"Your password: expires in 3 days\n",
            b"Password:\r\n",
            b"sh: 1: /home/x/.profile: Permission denied\n",
        ];
        assert_eq!(feed(&mut d, noise), vec![]);
    }

    #[test]
    fn su_incorrect_password_and_configured_texts() {
        let mut d = su();
        assert!(matches!(d.on_output(b"Password: "), DialogueStep::WriteInput(_)));
        let s = d.on_output(b"\nsu: Authentication failure\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::PasswordIncorrect { method: "su" }));
        // Custom prompt and incorrect texts (another su flavour or locale).
        let mut d = PromptDialogue::su(Some("pw".into()), &["Kennwort:".into()], &["su: falsches".into()]);
        assert_eq!(d.on_output(b"Password: "), DialogueStep::Continue);
        let mut d = PromptDialogue::su(Some("pw".into()), &["Kennwort:".into()], &["su: falsches".into()]);
        assert!(matches!(d.on_output(b"Kennwort: "), DialogueStep::WriteInput(_)));
        let s = d.on_output(b"\nsu: Falsches Kennwort\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::PasswordIncorrect { method: "su" }));
    }

    #[test]
    fn doas_prompt_on_the_terminal_and_its_failures() {
        let o = crate::DoasOptions::default();
        let mut d = PromptDialogue::doas(Some("pw".into()), &o.password_prompts, &o.incorrect_prompts);
        let steps = feed(&mut d, &[b"\rdoas (alice@host) pass", b"word: "]);
        assert_eq!(steps, vec![DialogueStep::Write(b"pw\n".to_vec())]);
        let s = d.on_output(b"\r\ndoas: Authentication failed\r\n");
        assert_eq!(s, DialogueStep::Fail(LoginError::PasswordIncorrect { method: "doas" }));
        let mut d = PromptDialogue::doas(None, &o.password_prompts, &o.incorrect_prompts);
        let s = d.on_output(b"doas: Operation not permitted\r\n");
        assert!(matches!(s, DialogueStep::Fail(LoginError::Refused { method: "doas", .. })), "{s:?}");
        let mut d = PromptDialogue::doas(None, &o.password_prompts, &o.incorrect_prompts);
        let s = d.on_output(b"\rdoas (alice@host) password: ");
        assert_eq!(s, DialogueStep::Fail(LoginError::PasswordRequired { method: "doas" }));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let d = PromptDialogue::sudo(P, Some("hunter2".into()));
        assert!(!format!("{d:?}").contains("hunter2"));
    }
}
