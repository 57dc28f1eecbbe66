//! The first-stage report parser: arbitrary lines (with and without our marker and
//! token) as the connecting side reads them from a target. Checked: only a line with the
//! exact marker and token parses; the loader chosen for a report is one it offered (or
//! the cache / hand-over it reported); the answer line carries nothing of the report but a syscall number.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mitogen_transport_local::bootstrap::{self, FirstStage, Loader};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Prefix the line with the real marker and token.
    marked: bool,
    cache: bool,
    handover: bool,
    len: u32,
    line: String,
}

fuzz_target!(|input: Input| {
    let stage = FirstStage {
        token: "Zt0k3n".into(),
        hash: String::new(),
        argv0: String::new(),
        cache: input.cache,
        handover: input.handover,
    };
    let marker = bootstrap::MARKER;
    let line = if input.marked { format!("{marker}{}", input.line) } else { input.line.clone() };
    let Some(report) = stage.parse(&line) else { return };
    assert!(
        line.trim_end().starts_with(&format!("{marker}Zt0k3n")),
        "parsed a line without the marker: {line:?}"
    );
    let loader = bootstrap::choose(&report);
    match loader {
        Loader::Cached => assert!(report.cached),
        Loader::HandedOver => assert!(report.handover),
        Loader::Perl => assert!(report.loaders.iter().any(|l| l == "perl")),
        Loader::Python => assert!(report.loaders.iter().any(|l| l.starts_with("python"))),
        _ => {}
    }
    let _ = bootstrap::arch_matches(bootstrap::image_arch(), &report.arch);
    let _ = bootstrap::memfd_syscall(&report.arch);
    let answer = bootstrap::answer(loader, input.len as usize, &report.arch, input.cache);
    // One answer line (the loader program, if any, follows it); the report's text never
    // reaches it (the architecture only picks a syscall number).
    let (first, _) = answer.split_once('\n').expect("an answer line");
    let plain = bootstrap::answer(loader, input.len as usize, "none", input.cache);
    let syscall = bootstrap::memfd_syscall(&report.arch).unwrap_or(0).to_string();
    assert_eq!(first.replacen(&format!(" {syscall} "), " 0 ", 1), plain.split_once('\n').unwrap().0);
});
