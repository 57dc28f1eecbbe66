//! The [`Message`] type: a fixed header plus a payload.
//!
//! The byte layout is documented in `docs/wire-format.md` and checked by a test there.

use crate::ids::{ContextId, Handle};

/// First two bytes of every frame: ASCII `MG`.
pub const MAGIC: [u8; 2] = *b"MG";
/// Wire protocol version carried in byte 2 of every frame.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 28;
/// Default `max_message_size`: 128 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u32 = 128 * 1024 * 1024;

/// What the payload bytes of a message mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A serde value encoded with bincode 2 (standard configuration).
    Value,
    /// Raw bytes, passed through untouched (bulk data).
    Raw,
    /// A dead message: the first byte is a [`DeadReason`] code, the rest a UTF-8 text.
    Dead,
}

impl Kind {
    /// The byte that encodes this kind in the header.
    pub fn code(self) -> u8 {
        match self {
            Kind::Value => 0,
            Kind::Raw => 1,
            Kind::Dead => 2,
        }
    }

    /// Parses a header kind byte.
    pub fn from_code(code: u8) -> Option<Kind> {
        match code {
            0 => Some(Kind::Value),
            1 => Some(Kind::Raw),
            2 => Some(Kind::Dead),
            _ => None,
        }
    }
}

/// Why a message is dead: the sender of a message that could not be handled gets one back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadReason {
    /// No handle with that number exists at the destination.
    InvalidHandle,
    /// A policy (authority, source verification, unidirectional mode) refused the message.
    Refused,
    /// No route to the destination context.
    NoRoute,
    /// The message is larger than `max_message_size`.
    TooLarge,
    /// The broker of a context on the path is shutting down.
    BrokerExited,
    /// The sending side of a channel was closed: the normal end of a stream.
    SenderClosed,
    /// The context that was expected to answer has disconnected.
    Disconnected,
    /// Anything else; the text says what.
    Other,
}

impl DeadReason {
    /// The byte that encodes this reason.
    pub fn code(self) -> u8 {
        match self {
            DeadReason::InvalidHandle => 1,
            DeadReason::Refused => 2,
            DeadReason::NoRoute => 3,
            DeadReason::TooLarge => 4,
            DeadReason::BrokerExited => 5,
            DeadReason::SenderClosed => 6,
            DeadReason::Disconnected => 7,
            DeadReason::Other => 0,
        }
    }

    /// Parses a reason byte; unknown codes become [`DeadReason::Other`].
    pub fn from_code(code: u8) -> DeadReason {
        match code {
            1 => DeadReason::InvalidHandle,
            2 => DeadReason::Refused,
            3 => DeadReason::NoRoute,
            4 => DeadReason::TooLarge,
            5 => DeadReason::BrokerExited,
            6 => DeadReason::SenderClosed,
            7 => DeadReason::Disconnected,
            _ => DeadReason::Other,
        }
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeadReason::InvalidHandle => "invalid handle",
            DeadReason::Refused => "refused by policy",
            DeadReason::NoRoute => "no route",
            DeadReason::TooLarge => "message too large",
            DeadReason::BrokerExited => "broker has exited",
            DeadReason::SenderClosed => "sender closed",
            DeadReason::Disconnected => "the respondent context has disconnected",
            DeadReason::Other => "dead message",
        })
    }
}

/// One routed message: header fields plus an owned payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// Destination context.
    pub dst: ContextId,
    /// Context that sent the message.
    pub src: ContextId,
    /// Context whose authority the message carries (normally `src`).
    pub auth: ContextId,
    /// Handle at the destination.
    pub handle: Handle,
    /// Handle at `src` that expects the reply, or [`crate::ids::NO_REPLY`].
    pub reply_to: Handle,
    /// Meaning of `data`.
    pub kind: Kind,
    /// Payload bytes.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Payloads may hold secrets and can be large: print only their size.
        write!(
            f,
            "Message({}->{} auth={} handle={} reply_to={} {:?} {} bytes)",
            self.src,
            self.dst,
            self.auth,
            self.handle,
            self.reply_to,
            self.kind,
            self.data.len()
        )
    }
}

impl Message {
    /// A message carrying an already-encoded payload of `kind`.
    pub fn new(dst: ContextId, handle: Handle, kind: Kind, data: Vec<u8>) -> Message {
        Message { dst, src: 0, auth: 0, handle, reply_to: 0, kind, data }
    }

    /// A dead message addressed to `dst`/`handle` for `reason`, with a human text.
    pub fn dead(dst: ContextId, handle: Handle, reason: DeadReason, text: &str) -> Message {
        let mut data = Vec::with_capacity(1 + text.len());
        data.push(reason.code());
        data.extend_from_slice(text.as_bytes());
        Message::new(dst, handle, Kind::Dead, data)
    }

    /// True for a dead message.
    pub fn is_dead(&self) -> bool {
        self.kind == Kind::Dead
    }

    /// For a dead message: its reason and text.
    pub fn dead_reason(&self) -> Option<(DeadReason, String)> {
        if self.kind != Kind::Dead {
            return None;
        }
        let code = self.data.first().copied().unwrap_or(0);
        let text = String::from_utf8_lossy(self.data.get(1..).unwrap_or_default()).into_owned();
        Some((DeadReason::from_code(code), text))
    }

    /// The reply to this message: addressed to its `src` and `reply_to`.
    pub fn reply(&self, kind: Kind, data: Vec<u8>) -> Message {
        Message::new(self.src, self.reply_to, kind, data)
    }

    /// Length of the frame on the wire: header plus payload.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// Encodes the fixed header of this message (big-endian fields).
    pub fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = VERSION;
        h[3] = self.kind.code();
        h[4..8].copy_from_slice(&self.dst.to_be_bytes());
        h[8..12].copy_from_slice(&self.src.to_be_bytes());
        h[12..16].copy_from_slice(&self.auth.to_be_bytes());
        h[16..20].copy_from_slice(&self.handle.to_be_bytes());
        h[20..24].copy_from_slice(&self.reply_to.to_be_bytes());
        h[24..28].copy_from_slice(&(self.data.len() as u32).to_be_bytes());
        h
    }

    /// The whole frame as one buffer (header then payload); for tests and tools.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.wire_len());
        v.extend_from_slice(&self.header());
        v.extend_from_slice(&self.data);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_doc_matches_the_encoder() {
        let doc = include_str!("../../docs/wire-format.md");
        let block = doc.split("<!-- frame-example -->").nth(1).expect("example marker");
        let hex: String = block.split("```").nth(1).expect("code block").split_whitespace().collect();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let m = Message {
            dst: 5,
            src: 0,
            auth: 0,
            handle: crate::ids::CALL_FUNCTION,
            reply_to: 1000,
            kind: Kind::Value,
            data: b"abc".to_vec(),
        };
        assert_eq!(m.to_frame(), bytes);
        assert!(doc.contains(&format!("fixed {HEADER_LEN}-byte header")));
        let mut out = Vec::new();
        crate::codec::Decoder::new(1024).feed(&bytes, &mut out).unwrap();
        assert_eq!(out, vec![m]);
    }

    #[test]
    fn dead_reason_codes_round_trip() {
        for r in [
            DeadReason::InvalidHandle,
            DeadReason::Refused,
            DeadReason::NoRoute,
            DeadReason::TooLarge,
            DeadReason::BrokerExited,
            DeadReason::SenderClosed,
            DeadReason::Disconnected,
            DeadReason::Other,
        ] {
            assert_eq!(DeadReason::from_code(r.code()), r);
            let m = Message::dead(1, 2, r, "why");
            assert_eq!(m.dead_reason(), Some((r, "why".to_string())));
        }
    }
}
