//! The classic-BPF-to-eBPF translator on arbitrary classic programs and packets: where the
//! translator and the kernel's verifier accept a program, the kernel's result on the packet
//! must be libpcap's interpreter's. Needs root. See `capstream_fuzz::translate`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capstream_fuzz::translate::run(data);
});
