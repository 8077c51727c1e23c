//! What the Capstream sensor and receiver share as programs, apart from the wire protocol
//! (the `protocol` crate): retry waits ([`backoff`]), protocol messages read from a stream ([`frames`]), options layered from flags, `CAPSTREAM_*` environment variables
//! and a TOML file ([`cli`]), sizes and durations ([`units`]), logging and the live status
//! line ([`status`]), the Prometheus endpoint ([`metrics`]), signals and the token file,
//! how peer-supplied names are shown ([`names`]), and files for their owner alone
//! ([`private_file`]).

pub mod backoff;
pub mod cli;
pub mod exit;
pub mod frames;
pub mod metrics;
pub mod names;
pub mod private_file;
pub mod status;
pub mod units;
