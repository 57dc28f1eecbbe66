//! Each login dialogue (sudo, su, doas, ssh) fed arbitrary output in arbitrary chunks.
//! Checked: the password is only ever written as the exact answer, at most once; an
//! error never carries the password unless the output itself did; a dialogue that failed
//! is not asked again (the connect loop stops); the kept output stays bounded.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mitogen_core::{Dialogue, DialogueStep, Password};
use mitogen_transport_ssh::SshDialogue;
use mitogen_transport_sudo::PromptDialogue;

const PASSWORD: &str = "Pw-7f3Q";

#[derive(Arbitrary, Debug)]
struct Input {
    which: u8,
    with_password: bool,
    cuts: Vec<u16>,
    output: Vec<u8>,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|input: Input| {
    let pw = input.with_password.then(|| Password::from(PASSWORD));
    let prompts: Vec<String> = ["password:", "passwort:", "mot de passe :"].map(String::from).to_vec();
    let incorrect: Vec<String> = ["authentication failure", "incorrect password"].map(String::from).to_vec();
    let mut d: Box<dyn Dialogue> = match input.which % 4 {
        0 => Box::new(PromptDialogue::sudo("[mitogen-sudo-Zt0k3n] ", pw.clone())),
        1 => Box::new(PromptDialogue::su(pw.clone(), &prompts, &incorrect)),
        2 => Box::new(PromptDialogue::doas(pw.clone(), &prompts, &incorrect)),
        _ => Box::new(SshDialogue::new("host.example", pw.clone())),
    };
    let answer = format!("{PASSWORD}\n").into_bytes();
    let mut answers = 0;
    let mut pos = 0;
    let mut i = 0;
    while pos < input.output.len() {
        let cut = input.cuts.get(i % input.cuts.len().max(1)).map_or(usize::MAX, |&c| c.max(1) as usize);
        i += 1;
        let n = cut.min(input.output.len() - pos);
        let step = d.on_output(&input.output[pos..pos + n]);
        pos += n;
        match step {
            DialogueStep::Continue => {}
            DialogueStep::Write(b) | DialogueStep::WriteInput(b) => {
                assert!(pw.is_some(), "answered without a password");
                assert_eq!(b, answer, "wrote something other than the answer");
                answers += 1;
                assert!(answers <= 1, "the password was sent twice");
            }
            DialogueStep::Fail(e) => {
                let text = format!("{e} {e:?}");
                if text.contains(PASSWORD) {
                    assert!(contains(&input.output, PASSWORD.as_bytes()), "the password leaked: {text}");
                }
                assert!(text.len() <= 64 * 1024, "an error of {} bytes", text.len());
                return;
            }
            _ => {}
        }
    }
    // Debug shows the state (the kept output) but never the password.
    let dbg = format!("{d:?}");
    assert!(!dbg.contains(PASSWORD) || contains(&input.output, PASSWORD.as_bytes()), "{dbg}");
    assert!(dbg.len() < 256 * 1024, "the dialogue kept {} bytes of state", dbg.len());
});
