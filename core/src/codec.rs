//! Frame decoding (sans-IO) and value encoding.
//!
//! [`Decoder`] turns a byte stream cut at arbitrary points into [`Message`]s. It checks the
//! magic, version, kind and length of each header *before* allocating the body, and reads
//! large bodies straight into their final buffer (no staging copy). Values are encoded with
//! bincode 2 through [`encode_value`] and [`decode_value`], the only place bincode is used.

use crate::message::{Kind, Message, HEADER_LEN, MAGIC, VERSION};
use serde::{de::DeserializeOwned, Serialize};

/// Largest size of the staging buffer for reads: small frames are batched through it.
pub const READ_CHUNK: usize = 128 * 1024;
/// Initial size of the staging buffer; it doubles (up to [`READ_CHUNK`]) when reads fill
/// it, so idle streams stay small.
const INITIAL_CHUNK: usize = 4096;

/// A stream that produced one of these is corrupt or hostile and must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The first two bytes of a header were not `MG`.
    #[error("bad frame magic {0:02x?}: stream is corrupt")]
    BadMagic([u8; 2]),
    /// The protocol version is not ours.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    /// The payload kind byte is unknown.
    #[error("unknown payload kind {0}")]
    BadKind(u8),
    /// The announced payload is larger than the receiver accepts.
    #[error("message of {len} bytes exceeds max_message_size {max}")]
    TooLarge {
        /// Announced payload length.
        len: u32,
        /// The receiver's limit.
        max: u32,
    },
}

/// An error encoding or decoding a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("cannot encode value: {0}")]
    Encode(String),
    /// The bytes do not decode as the expected type.
    #[error("cannot decode {type_name}: {detail}")]
    Decode {
        /// The type that was expected.
        type_name: &'static str,
        /// What bincode said.
        detail: String,
    },
}

/// Largest input [`decode_prefix`] accepts (and the most bincode may claim for it).
const DECODE_LIMIT: usize = 1 << 30;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Decodes with a claim limit (what bincode may allocate for strings and byte blocks,
/// before it reads them) in proportion to the input: the smallest of 64 KiB, 8 MiB and
/// [`DECODE_LIMIT`] that holds the whole input. Every byte block a valid input holds is
/// in the input, so valid data always fits; a hostile length prefix (9 bytes claiming a
/// 600 MB string) is refused before it allocates: a frame under 64 KiB never makes it
/// claim more than 64 KiB, and no input more than 128 times its size. bincode's limit is
/// a constant, so each tier instantiates the decoder again: three tiers cost the release
/// agent about 88 KB (6%), five (16 times at most) would cost twice that.
fn decode_limited<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), bincode::error::DecodeError> {
    use bincode::serde::decode_from_slice as dec;
    let std = bincode::config::standard();
    match bytes.len() {
        0..=0xFFFF => dec(bytes, std.with_limit::<0x1_0000>()),
        0x1_0000..=0x7F_FFFF => dec(bytes, std.with_limit::<0x80_0000>()),
        _ => dec(bytes, config()),
    }
}

/// Encodes `value` with bincode 2 into a new buffer.
pub fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Appends the bincode encoding of `value` to `out`.
pub fn encode_value_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(drop)
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a `T` from the start of `bytes`, returning it and the number of bytes used.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    if bytes.len() > DECODE_LIMIT {
        return Err(CodecError::Decode {
            type_name: std::any::type_name::<T>(),
            detail: "input larger than the decode limit".into(),
        });
    }
    decode_limited(bytes)
        .map_err(|e| CodecError::Decode { type_name: std::any::type_name::<T>(), detail: e.to_string() })
}

/// Decodes exactly one `T` from `bytes`; trailing bytes are an error.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = decode_prefix::<T>(bytes)?;
    if used != bytes.len() {
        return Err(CodecError::Decode {
            type_name: std::any::type_name::<T>(),
            detail: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}

/// Parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    dst: u32,
    src: u32,
    auth: u32,
    handle: u32,
    reply_to: u32,
    kind: Kind,
    len: u32,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn parse_header(h: &[u8], max: u32) -> Result<Header, FrameError> {
    if h[0..2] != MAGIC {
        return Err(FrameError::BadMagic([h[0], h[1]]));
    }
    if h[2] != VERSION {
        return Err(FrameError::BadVersion(h[2]));
    }
    let kind = Kind::from_code(h[3]).ok_or(FrameError::BadKind(h[3]))?;
    let len = be32(&h[24..28]);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Header {
        dst: be32(&h[4..8]),
        src: be32(&h[8..12]),
        auth: be32(&h[12..16]),
        handle: be32(&h[16..20]),
        reply_to: be32(&h[20..24]),
        kind,
        len,
    })
}

/// Incremental frame decoder.
///
/// Use it in three steps: [`Decoder::read_buf`] gives the slice to read into,
/// [`Decoder::commit`] says how many bytes were read, and [`Decoder::next_message`] yields
/// the complete messages. [`Decoder::feed`] does all three for a byte slice (tests, tools).
#[derive(Debug)]
pub struct Decoder {
    max: u32,
    /// Staging buffer for headers and small bodies.
    buf: Vec<u8>,
    /// Start of unparsed bytes in `buf`.
    start: usize,
    /// End of valid bytes in `buf`.
    end: usize,
    /// A large body being read directly into its own buffer.
    body: Option<(Header, Vec<u8>, usize)>,
    failed: Option<FrameError>,
    /// The frame in progress was reported by [`Decoder::take_started`].
    started: bool,
    /// `(src, auth)` of a frame whose header is in but whose body is not, not yet taken.
    pending: Option<(u32, u32)>,
}

impl Decoder {
    /// A decoder refusing payloads larger than `max_message_size`.
    pub fn new(max_message_size: u32) -> Decoder {
        Decoder {
            max: max_message_size,
            buf: vec![0; INITIAL_CHUNK],
            start: 0,
            end: 0,
            body: None,
            failed: None,
            started: false,
            pending: None,
        }
    }

    /// Changes the size limit (a child learns its limit from its bootstrap).
    pub fn set_max_message_size(&mut self, max: u32) {
        self.max = max;
    }

    /// The slice the next read should fill. Never empty.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if let Some((_, body, filled)) = &mut self.body {
            return &mut body[*filled..];
        }
        if self.end == self.buf.len() {
            // Compact: move the partial frame to the front.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end == self.buf.len() {
                // One partial frame fills the buffer: grow (it is at most half of
                // READ_CHUNK, larger bodies are read into their own buffer).
                let len = (self.buf.len() * 2).min(READ_CHUNK);
                self.buf.resize(len, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    fn grow(&mut self) {
        let len = (self.buf.len() * 2).min(READ_CHUNK);
        self.buf.resize(len, 0);
    }

    /// Records that `n` bytes were written into the slice from [`Decoder::read_buf`].
    pub fn commit(&mut self, n: usize) {
        if let Some((_, _, filled)) = &mut self.body {
            *filled += n;
        } else {
            self.end += n;
            if self.end == self.buf.len() && self.buf.len() < READ_CHUNK {
                // Reads fill the buffer: the stream is busy, batch more per read.
                self.grow();
            }
        }
    }

    /// `(src, auth)` of the frame being read, once per frame, as soon as its header is in
    /// and its body is not: a reader checks the sender before waiting for a body that a
    /// corrupt header may have invented (up to `max_message_size` of the stream's later
    /// frames would be swallowed as its body).
    pub fn take_started(&mut self) -> Option<(u32, u32)> {
        self.pending.take()
    }

    fn note_started(&mut self, h: &Header) {
        if !self.started {
            self.started = true;
            self.pending = Some((h.src, h.auth));
        }
    }

    /// True while a large body is being read into its own buffer (bulk data in flight).
    pub fn in_large_body(&self) -> bool {
        self.body.is_some()
    }

    /// True when no partial frame is buffered (a clean place for the stream to end).
    pub fn is_idle(&self) -> bool {
        self.body.is_none() && self.start == self.end
    }

    /// The next complete message, `None` if more input is needed, or the error that makes
    /// the stream unusable (returned again on every later call).
    pub fn next_message(&mut self) -> Option<Result<Message, FrameError>> {
        if let Some(e) = &self.failed {
            return Some(Err(e.clone()));
        }
        if let Some((h, body, filled)) = &mut self.body {
            if *filled < body.len() {
                return None;
            }
            let msg = make(*h, std::mem::take(body));
            self.body = None;
            self.started = false;
            return Some(Ok(msg));
        }
        let avail = self.end - self.start;
        if avail < HEADER_LEN {
            if avail == 0 {
                self.start = 0;
                self.end = 0;
            }
            return None;
        }
        let h = match parse_header(&self.buf[self.start..self.start + HEADER_LEN], self.max) {
            Ok(h) => h,
            Err(e) => {
                self.failed = Some(e.clone());
                return Some(Err(e));
            }
        };
        let len = h.len as usize;
        let body_start = self.start + HEADER_LEN;
        if self.end - body_start >= len {
            let data = self.buf[body_start..body_start + len].to_vec();
            self.start = body_start + len;
            self.started = false;
            return Some(Ok(make(h, data)));
        }
        self.note_started(&h);
        if len + HEADER_LEN <= READ_CHUNK / 2 {
            // Small frame: wait for the rest in the staging buffer (grown if needed).
            if self.start + len + HEADER_LEN > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                while self.buf.len() < len + HEADER_LEN {
                    self.grow();
                }
            }
            return None;
        }
        // Large frame: allocate exactly once (the length was checked) and read into it.
        let have = self.end - body_start;
        let mut body = vec![0u8; len];
        body[..have].copy_from_slice(&self.buf[body_start..self.end]);
        self.start = 0;
        self.end = 0;
        self.body = Some((h, body, have));
        None
    }

    /// Pushes `bytes` through the decoder, appending complete messages to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<Message>) -> Result<(), FrameError> {
        loop {
            while let Some(r) = self.next_message() {
                out.push(r?);
            }
            if bytes.is_empty() {
                return Ok(());
            }
            let spot = self.read_buf();
            let n = spot.len().min(bytes.len());
            spot[..n].copy_from_slice(&bytes[..n]);
            self.commit(n);
            bytes = &bytes[n..];
        }
    }
}

fn make(h: Header, data: Vec<u8>) -> Message {
    Message {
        dst: h.dst,
        src: h.src,
        auth: h.auth,
        handle: h.handle,
        reply_to: h.reply_to,
        kind: h.kind,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(len: usize, seed: u8) -> Message {
        Message {
            dst: 7,
            src: 3,
            auth: 3,
            handle: 1001,
            reply_to: 1002,
            kind: Kind::Raw,
            data: (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect(),
        }
    }

    #[test]
    fn rejects_bad_magic_before_anything_else() {
        let mut frame = msg(4, 0).to_frame();
        frame[0] = b'X';
        let mut d = Decoder::new(1024);
        let err = d.feed(&frame, &mut Vec::new()).unwrap_err();
        assert_eq!(err, FrameError::BadMagic([b'X', b'G']));
        // The decoder stays failed.
        assert!(matches!(d.next_message(), Some(Err(FrameError::BadMagic(_)))));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let m = msg(0, 0);
        let mut h = m.header();
        h[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut d = Decoder::new(1 << 20);
        let err = d.feed(&h, &mut Vec::new()).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: u32::MAX, max: 1 << 20 });
    }

    #[test]
    fn hostile_length_prefix_in_a_value_is_an_error_not_an_allocation() {
        // A bincode String claiming 2^40 bytes, in a 9-byte payload.
        let bytes = [253u8, 0, 0, 0, 0, 0, 1, 0, 0];
        let err = decode_value::<String>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err:?}");
    }

    #[test]
    fn a_claim_larger_than_the_input_allows_is_refused_before_allocating() {
        // A String claiming 600 MB in a 9-byte payload: within the 1 GiB limit for any
        // input, but far more than 16 times this one (found by the value_decode fuzzer).
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&600_000_000u64.to_le_bytes());
        let err = decode_value::<String>(&bytes).unwrap_err();
        assert!(err.to_string().contains("LimitExceeded"), "{err}");
        // Valid large blocks still decode, in every tier.
        for len in [0, 0xFFF0, 0x1_0000, 3 << 20, 9 << 20] {
            let v = vec![7u8; len];
            let enc = encode_value(&crate::Bytes(v.clone())).unwrap();
            assert_eq!(decode_value::<crate::Bytes>(&enc).unwrap().0, v, "{len}");
        }
    }

    #[test]
    fn values_round_trip_and_trailing_bytes_are_refused() {
        let v = (String::from("echo"), vec![1u32, 2, 3], Some(-5i64));
        let mut bytes = encode_value(&v).unwrap();
        assert_eq!(decode_value::<(String, Vec<u32>, Option<i64>)>(&bytes).unwrap(), v);
        bytes.push(0);
        assert!(decode_value::<(String, Vec<u32>, Option<i64>)>(&bytes).is_err());
    }

    /// What a decoder makes of `bytes` fed in chunks of the sizes in `cuts` (in turn).
    fn decode_chunked(bytes: &[u8], cuts: &[usize], max: u32) -> (Vec<Message>, Option<FrameError>) {
        let mut d = Decoder::new(max);
        let mut out = Vec::new();
        let mut pos = 0;
        for cut in cuts.iter().cycle() {
            if pos >= bytes.len() {
                break;
            }
            let n = (*cut).min(bytes.len() - pos);
            if let Err(e) = d.feed(&bytes[pos..pos + n], &mut out) {
                return (out, Some(e));
            }
            pos += n;
        }
        (out, None)
    }

    proptest! {
        /// Arbitrary bytes (garbage, or valid frames with garbage spliced in), cut into
        /// arbitrary chunks: never a panic, the outcome does not depend on the cuts, and
        /// no message is over the limit. (The fuzz target `frame_decoder` does the same
        /// with coverage guidance; this keeps plain `cargo test` covering it.)
        #[test]
        fn arbitrary_bytes_in_arbitrary_chunks(
            frames in proptest::collection::vec((0usize..300, any::<u8>()), 0..4),
            garbage in proptest::collection::vec(any::<u8>(), 0..200),
            at in any::<usize>(),
            cuts in proptest::collection::vec(1usize..100, 1..16),
        ) {
            let mut bytes: Vec<u8> = frames.iter().flat_map(|&(n, s)| msg(n, s).to_frame()).collect();
            let at = if bytes.is_empty() { 0 } else { at % bytes.len() };
            bytes.splice(at..at, garbage);
            let max = 256;
            let whole = decode_chunked(&bytes, &[usize::MAX], max);
            let cut = decode_chunked(&bytes, &cuts, max);
            prop_assert_eq!(&whole, &cut);
            prop_assert!(whole.0.iter().all(|m| m.data.len() <= max as usize));
        }

        /// Any sequence of frames, cut into arbitrary chunks, decodes to the same messages.
        #[test]
        fn round_trip_under_arbitrary_chunking(
            sizes in proptest::collection::vec(
                prop_oneof![0usize..64, 0usize..4096, (READ_CHUNK - 64)..(READ_CHUNK * 3)],
                1..8),
            cuts in proptest::collection::vec(1usize..70_000, 1..64),
        ) {
            let msgs: Vec<Message> =
                sizes.iter().enumerate().map(|(i, &n)| msg(n, i as u8)).collect();
            let stream: Vec<u8> = msgs.iter().flat_map(|m| m.to_frame()).collect();
            let mut d = Decoder::new(u32::MAX);
            let mut out = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - pos);
                d.feed(&stream[pos..pos + n], &mut out).unwrap();
                pos += n;
                i += 1;
            }
            prop_assert!(d.is_idle());
            prop_assert_eq!(out, msgs);
        }
    }
}
