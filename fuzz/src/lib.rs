//! The bodies of the fuzz targets in `fuzz_targets/`, kept here so that they can be read,
//! linted and reused apart from libFuzzer's entry points. The protocol targets' bodies are
//! in the protocol crate (`protocol::decode_check`), shared with its regression test.

pub mod pcap_read;
pub mod translate;
