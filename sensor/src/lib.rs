//! What the sensor shares with the other clients of a receiver (the `capstream-extcap`
//! viewer): how the receiver is trusted (CA files or a pinned fingerprint, TLS 1.3) and the
//! sensor's two kinds of failure.

pub mod error;
pub mod fingerprint;
pub mod tls;
