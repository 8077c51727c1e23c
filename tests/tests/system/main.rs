//! The system tests: the real programs, run as users run them, in network namespaces with
//! replayed and live traffic, compared with what tcpdump and tshark see. One test binary
//! (the test bed and its dependencies are linked once, not once per file); each module is one
//! subject, and its tests are named after it (`faults::...`), so that
//! `cargo nextest run -p testbed -E 'test(/faults::/)'` runs one subject.

mod attribution;
mod backpressure;
mod config;
mod deploy;
mod failover;
mod faults;
mod kafka;
mod lake;
mod lake_fleet;
mod lake_keys;
mod live_capture;
mod live_stream;
mod metrics;
mod on_demand;
mod outputs;
mod privileges;
mod read_and_stream;
mod security;
mod sensor_hardening;
mod tls_keys;
mod upload;
