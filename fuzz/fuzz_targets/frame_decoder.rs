//! The frame decoder fed arbitrary bytes in arbitrary chunks, through the same
//! `read_buf`/`commit` steps the broker uses. Checked: the outcome does not depend on the
//! chunking (same messages, same error, as one `feed` of the whole input); no message is
//! over the limit; every message re-encodes to the bytes it came from; an error is sticky.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mitogen_core::codec::{Decoder, FrameError};
use mitogen_core::Message;

/// Small enough that a hostile header cannot make the decoder allocate much.
const MAX: u32 = 256 * 1024;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Chunk sizes, used in turn (0 stands for 1).
    cuts: Vec<u16>,
    bytes: Vec<u8>,
}

fn whole(bytes: &[u8]) -> (Vec<Message>, Option<FrameError>) {
    let mut d = Decoder::new(MAX);
    let mut out = Vec::new();
    let err = d.feed(bytes, &mut out).err();
    (out, err)
}

fn chunked(bytes: &[u8], cuts: &[u16]) -> (Vec<Message>, Option<FrameError>) {
    let mut d = Decoder::new(MAX);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let cut = cuts.get(i % cuts.len().max(1)).map_or(bytes.len(), |&c| c.max(1) as usize);
        i += 1;
        let buf = d.read_buf();
        assert!(!buf.is_empty(), "read_buf must never be empty");
        let n = buf.len().min(cut).min(bytes.len() - pos);
        buf[..n].copy_from_slice(&bytes[pos..pos + n]);
        d.commit(n);
        pos += n;
        while let Some(r) = d.next_message() {
            match r {
                Ok(m) => out.push(m),
                Err(e) => {
                    // Sticky: the stream is unusable from here on.
                    assert_eq!(d.next_message(), Some(Err(e.clone())));
                    return (out, Some(e));
                }
            }
        }
    }
    (out, None)
}

fuzz_target!(|input: Input| {
    let a = whole(&input.bytes);
    let b = chunked(&input.bytes, &input.cuts);
    assert_eq!(a, b, "the outcome depends on the chunking");
    let mut offset = 0;
    for m in &a.0 {
        assert!(m.data.len() <= MAX as usize);
        let frame = m.to_frame();
        assert_eq!(&input.bytes[offset..offset + frame.len()], &frame[..], "not re-encoded identically");
        offset += frame.len();
    }
});
