//! The batch decompressor and record validation on arbitrary bodies: first byte the
//! encoding (even: stored, odd: Snappy), then the packet count (u32, big-endian), then the
//! body. See `capstream_fuzz::decode::check_batch`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(batch) = capstream_fuzz::decode::batch_from_input(data) {
        let _ = capstream_fuzz::decode::check_batch(&batch);
    }
});
