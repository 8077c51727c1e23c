//! The Prometheus endpoint both programs serve with `--metrics`: the `metrics` crate's
//! recorder with its own HTTP listener on a thread of its own.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder};
use metrics_util::MetricKindMask;

/// Serves `http://ADDR/metrics` (any path answers) from now on. Series not updated for
/// `linger` disappear: the programs update their live series every second, so only those
/// of what ended (a sensor's session) go, `linger` after it ended.
pub fn serve(addr: SocketAddr, linger: Duration) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .idle_timeout(MetricKindMask::ALL, Some(linger))
        .install()
        .map_err(|e| match e {
            BuildError::FailedToCreateHTTPListener(why) => {
                format!("cannot serve metrics on {addr}: {why}")
            }
            e => format!("cannot serve metrics on {addr}: {e}"),
        })
}
