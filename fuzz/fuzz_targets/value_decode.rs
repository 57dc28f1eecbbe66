//! Value decoding with limits: arbitrary bytes as every kind of payload a context decodes
//! from a peer (call requests and replies, log records, the connect handshake's control
//! messages, common argument shapes). Nothing may panic, and no allocation may exceed the
//! input's size by much: bincode's length prefixes are bounded by the decode limit, and
//! serde preallocates cautiously (checked by `-malloc_limit_mb` in `cargo xtask fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mitogen_core::call::decode_request_name;
use mitogen_core::codec::{decode_prefix, decode_value, encode_value};
use mitogen_core::logs::LogRecord;
use mitogen_core::{Bytes, RemoteError};
use std::collections::HashMap;

fn round_trips<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = decode_value::<T>(data) {
        // Decoding is a function: what decoded re-encodes and decodes to the same value.
        let again = encode_value(&v).expect("a decoded value encodes");
        assert_eq!(decode_value::<T>(&again).expect("re-decodes"), v);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trips::<Result<Bytes, RemoteError>>(data);
    round_trips::<Result<(), RemoteError>>(data);
    round_trips::<LogRecord>(data);
    round_trips::<(String, Vec<u8>, Option<u64>)>(data);
    round_trips::<Vec<String>>(data);
    round_trips::<HashMap<String, Vec<u32>>>(data);
    round_trips::<(i64, i64)>(data);
    let _ = decode_prefix::<String>(data);
    if let Ok((name, args)) = decode_request_name(data) {
        assert!(args.len() < data.len() || name.is_empty() && data.len() == 1);
    }
    mitogen_child::decode_control_messages(data);
});
