//! The sans-IO password dialogue shared by sudo (and, later, su and doas).

use mitogen_core::{Dialogue, DialogueStep, LoginError};
use std::fmt;

/// Most output kept while looking for a prompt or a refusal.
const MAX_BUF: usize = 16 * 1024;

/// Watches a terminal for a password prompt and the method's refusals.
///
/// - The prompt is matched exactly, anywhere in the output, also when it is split across
///   reads and has no newline. sudo is made to print our own prompt (with a random token),
///   so banners, translations or a profile printing "password" cannot match it.
/// - Refusals only count on whole lines that start with the method's name (`sudo: ...`), so
///   a profile printing "Permission denied" is not mistaken for a failure.
/// - A second prompt means the password was wrong: it is never sent twice.
pub struct PromptDialogue {
    method: &'static str,
    prompt: Vec<u8>,
    password: Option<String>,
    line_prefixes: Vec<String>,
    incorrect: Vec<String>,
    refused: Vec<String>,
    required: Vec<String>,
    buf: Vec<u8>,
    sent: bool,
}

impl fmt::Debug for PromptDialogue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PromptDialogue")
            .field("method", &self.method)
            .field("prompt", &String::from_utf8_lossy(&self.prompt))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("sent", &self.sent)
            .finish()
    }
}

impl PromptDialogue {
    /// A dialogue for sudo (sudo.ws and sudo-rs) answering `prompt` with `password`.
    pub fn sudo(prompt: &str, password: Option<String>) -> PromptDialogue {
        let lower = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        PromptDialogue {
            method: "sudo",
            prompt: prompt.as_bytes().to_vec(),
            password,
            line_prefixes: lower(&["sudo:", "sudo-rs:"]),
            incorrect: lower(&["incorrect password attempt", "maximum 3 incorrect authentication attempts"]),
            refused: lower(&[
                "is not in the sudoers file",
                "is not allowed to execute",
                "not allowed to run sudo",
                "must have a tty",
                "unknown user",
                "no passwd entry",
                "account validation failure",
            ]),
            required: lower(&["a password is required", "a terminal is required", "no tty present"]),
            buf: Vec::new(),
            sent: false,
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
        if self.refused.iter().any(|t| l.contains(t.as_str())) {
            return Some(LoginError::Refused { method: m, line: line.trim().to_string() });
        }
        None
    }
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
            let text = String::from_utf8_lossy(&line);
            // A prompt may end a line too (pwfeedback asterisks, then newline).
            if let Some(pos) = find(&line, &self.prompt) {
                let rest = line[pos + self.prompt.len()..].to_vec();
                self.buf.splice(0..0, rest);
                return self.prompted();
            }
            if let Some(e) = self.check_line(&text) {
                return DialogueStep::Fail(e);
            }
        }
        // Then the partial line: a prompt has no newline.
        if let Some(pos) = find(&self.buf, &self.prompt) {
            self.buf.drain(..pos + self.prompt.len());
            return self.prompted();
        }
        if self.buf.len() > MAX_BUF {
            let keep = self.prompt.len();
            self.buf.drain(..self.buf.len() - keep);
        }
        DialogueStep::Continue
    }
}

impl PromptDialogue {
    fn prompted(&mut self) -> DialogueStep {
        let m = self.method;
        match (&self.password, self.sent) {
            (None, _) => DialogueStep::Fail(LoginError::PasswordRequired { method: m }),
            (Some(_), true) => DialogueStep::Fail(LoginError::PasswordIncorrect { method: m }),
            (Some(pw), false) => {
                self.sent = true;
                let mut answer = pw.clone().into_bytes();
                answer.push(b'\n');
                DialogueStep::Write(answer)
            }
        }
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
    }

    #[test]
    fn debug_never_shows_the_password() {
        let d = PromptDialogue::sudo(P, Some("hunter2".into()));
        assert!(!format!("{d:?}").contains("hunter2"));
    }
}
