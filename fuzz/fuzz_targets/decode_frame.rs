//! The receiver's protocol decoder on arbitrary stream bytes: `protocol::decode_frame` until
//! it needs more or refuses, every batch's packets decoded, every accepted message
//! round-tripped. See `protocol::decode_check::decode_stream`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = protocol::decode_check::decode_stream(data);
});
