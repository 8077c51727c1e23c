//! `sensor --read FILE` on arbitrary files: libpcap opens and filters them, every packet
//! goes into batches that must decode to the same packets. See
//! `capstream_fuzz::pcap_read::run`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capstream_fuzz::pcap_read::run(data);
});
