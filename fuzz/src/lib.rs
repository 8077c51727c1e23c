//! The bodies of the fuzz targets in `fuzz_targets/`, kept here so that they can be read,
//! linted and reused apart from libFuzzer's entry points.

pub mod decode;
pub mod pcap_read;
