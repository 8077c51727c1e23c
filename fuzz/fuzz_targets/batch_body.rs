//! The batch decompressor and record validation on arbitrary bodies: first byte the
//! encoding (even: stored, odd: Snappy), then the packet count (u32, big-endian), then the
//! body. See `protocol::decode_check::check_batch`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(batch) = protocol::decode_check::batch_from_input(data) {
        let _ = protocol::decode_check::check_batch(&batch);
    }
});
