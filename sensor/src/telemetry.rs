//! What the sensor shows while it runs: the Prometheus series (`--metrics`) and the live
//! status line, both read once a second from the counters the captures and the delivery
//! loop keep. Without a recorder installed, the series are no-ops.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge};
use program::status;
use protocol::DropReason;

use crate::stats::{Counters, KeyLogCounters, LinkStats};

const EVERY: Duration = Duration::from_secs(1);

/// One interface's series, registered once.
struct InterfaceSeries {
    counters: Arc<Counters>,
    seen: Counter,
    matched: Counter,
    delivered: Counter,
    batches: Counter,
    raw_bytes: Counter,
    wire_bytes: Counter,
    /// In the order of [`Counters::drops`].
    drops: [Counter; 4],
}

pub struct Telemetry {
    interfaces: Vec<InterfaceSeries>,
    /// `--keylog`'s lines, with their series, in the order of [`KeyLogCounters::figures`].
    key_log: Option<(Arc<KeyLogCounters>, [Counter; 4])>,
    link: Arc<LinkStats>,
    connected: Gauge,
    reconnects: Counter,
    failovers: Counter,
    rtt: Gauge,
    /// The receiver the `capstream_sensor_receiver` series says is current.
    receiver: Option<std::net::SocketAddr>,
    /// Matched packets at the last reading, for the rate.
    last: (Instant, u64),
}

impl Telemetry {
    pub fn new(names: &[String], counters: &[Arc<Counters>], link: Arc<LinkStats>) -> Self {
        describe();
        let interfaces = names
            .iter()
            .zip(counters)
            .map(|(name, c)| {
                let series = |metric: &'static str| counter!(metric, "interface" => name.clone());
                InterfaceSeries {
                    counters: Arc::clone(c),
                    seen: series("capstream_sensor_packets_seen_total"),
                    matched: series("capstream_sensor_packets_matched_total"),
                    delivered: series("capstream_sensor_packets_delivered_total"),
                    batches: series("capstream_sensor_batches_total"),
                    raw_bytes: series("capstream_sensor_raw_bytes_total"),
                    wire_bytes: series("capstream_sensor_wire_bytes_total"),
                    drops: c.drops().map(|(reason, _)| {
                        counter!("capstream_sensor_drops_total",
                            "interface" => name.clone(), "reason" => reason.label())
                    }),
                }
            })
            .collect();
        Self {
            interfaces,
            key_log: None,
            link,
            connected: gauge!("capstream_sensor_connected"),
            reconnects: counter!("capstream_sensor_reconnects_total"),
            failovers: counter!("capstream_sensor_failovers_total"),
            rtt: gauge!("capstream_sensor_rtt_seconds"),
            receiver: None,
            last: (Instant::now(), 0),
        }
    }

    /// Publishes the `--keylog` figures too.
    pub fn with_key_log(mut self, counters: Arc<KeyLogCounters>) -> Self {
        let series = counters
            .figures()
            .map(|(name, _)| counter!(format!("capstream_sensor_tls_key_log_{name}_total")));
        self.key_log = Some((counters, series));
        self
    }

    /// Publishes every second until aborted.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.publish();
        }
    }

    fn publish(&mut self) {
        let mut totals = Totals::default();
        for i in &self.interfaces {
            let c = &i.counters;
            let matched = c.matched.load(Relaxed);
            let delivered = c.delivered.load(Relaxed);
            i.seen.absolute(c.seen.load(Relaxed));
            i.matched.absolute(matched);
            i.delivered.absolute(delivered);
            i.batches.absolute(c.batches.load(Relaxed));
            i.raw_bytes.absolute(c.raw_bytes.load(Relaxed));
            i.wire_bytes.absolute(c.wire_bytes.load(Relaxed));
            let drops = c.drops();
            for (series, (_, n)) in i.drops.iter().zip(drops) {
                series.absolute(n);
            }
            totals.add(matched, delivered, &drops);
        }
        if let Some((counters, series)) = &self.key_log {
            for (series, (_, n)) in series.iter().zip(counters.figures()) {
                series.absolute(n);
            }
        }
        let up = self.link.up.load(Relaxed);
        let rtt = Duration::from_micros(self.link.rtt_micros.load(Relaxed));
        self.connected.set(if up { 1.0 } else { 0.0 });
        self.reconnects.absolute(self.link.reconnects.load(Relaxed));
        self.failovers.absolute(self.link.failovers.load(Relaxed));
        self.rtt.set(rtt.as_secs_f64());
        let receiver = self.link.receiver();
        if receiver != self.receiver {
            let series = |addr: std::net::SocketAddr| gauge!("capstream_sensor_receiver", "receiver" => addr.to_string());
            if let Some(old) = self.receiver {
                series(old).set(0.0);
            }
            if let Some(new) = receiver {
                series(new).set(1.0);
            }
            self.receiver = receiver;
        }

        let now = Instant::now();
        let (then, matched_then) = self.last;
        let rate = status::per_second(matched_then, totals.matched, (now - then).as_secs_f64());
        self.last = (now, totals.matched);
        let link = if up {
            let to = receiver.map(|r| format!(" to {r}")).unwrap_or_default();
            format!("connected{to}, rtt {:.1} ms", rtt.as_secs_f64() * 1e3)
        } else {
            "receiver unreachable, holding".into()
        };
        status::show(&format!(
            "sensor: {}pkt/s matched, {} delivered, {} awaiting ack, {} dropped, {link}",
            status::short(rate),
            totals.delivered,
            totals.awaiting,
            totals.dropped,
        ));
    }
}

/// The `# HELP` lines of the endpoint.
fn describe() {
    for (name, help) in [
        (
            "capstream_sensor_tls_key_log_read_total",
            "TLS key log lines read (--keylog) and batched.",
        ),
        (
            "capstream_sensor_tls_key_log_delivered_total",
            "TLS key log lines the receiver acknowledged.",
        ),
        (
            "capstream_sensor_tls_key_log_dropped_total",
            "TLS key log lines dropped: the sensor's buffer was full.",
        ),
        (
            "capstream_sensor_tls_key_log_malformed_total",
            "Key log lines not of the NSS key log format, skipped.",
        ),
        (
            "capstream_sensor_packets_seen_total",
            "Frames the capture saw before the filter, where the backend can tell.",
        ),
        (
            "capstream_sensor_packets_matched_total",
            "Frames that matched the filter and reached the sensor.",
        ),
        (
            "capstream_sensor_packets_delivered_total",
            "Frames the receiver acknowledged (in its output).",
        ),
        (
            "capstream_sensor_drops_total",
            "Frames lost, by reason: kernel_buffer, sensor_buffer, interface.",
        ),
        (
            "capstream_sensor_batches_total",
            "Batches the receiver acknowledged.",
        ),
        (
            "capstream_sensor_raw_bytes_total",
            "Bytes of the acknowledged batches before compression.",
        ),
        (
            "capstream_sensor_wire_bytes_total",
            "Bytes of the acknowledged batches as sent (compressed).",
        ),
        (
            "capstream_sensor_reconnects_total",
            "Connections to the receiver lost and made again.",
        ),
        (
            "capstream_sensor_failovers_total",
            "Moves to the next receiver in this sensor's order (--failover-after).",
        ),
        (
            "capstream_sensor_on_demand_packets_sent_total",
            "Packets on-demand captures sent, counted when they ended.",
        ),
        (
            "capstream_sensor_on_demand_packets_dropped_total",
            "Packets on-demand captures lost (kernel, sensor buffer, rate cap), when they ended.",
        ),
    ] {
        describe_counter!(name, help);
    }
    describe_gauge!(
        "capstream_sensor_connected",
        "1 while the receiver has the session, else 0."
    );
    describe_gauge!(
        "capstream_sensor_receiver",
        "1 for the receiver this sensor sends to (or tries) now, 0 for those it left."
    );
    describe_gauge!(
        "capstream_sensor_rtt_seconds",
        "QUIC's smoothed round-trip time to the receiver."
    );
    describe_gauge!(
        "capstream_sensor_on_demand_captures",
        "On-demand captures running, by interface."
    );
}

/// The status line's figures, over all interfaces.
#[derive(Default)]
struct Totals {
    matched: u64,
    delivered: u64,
    /// Matched, neither acknowledged nor dropped: batching, queued or unacknowledged.
    awaiting: u64,
    dropped: u64,
}

impl Totals {
    fn add(&mut self, matched: u64, delivered: u64, drops: &[(DropReason, u64)]) {
        // Kernel and interface drops never reached the sensor: only its own buffer's and
        // spool's are among the matched.
        let buffer_drops: u64 = drops
            .iter()
            .filter(|(r, _)| matches!(*r, DropReason::SENSOR_BUFFER | DropReason::SPOOL_DAMAGED))
            .map(|(_, n)| n)
            .sum();
        self.matched += matched;
        self.delivered += delivered;
        self.awaiting += matched.saturating_sub(delivered + buffer_drops);
        self.dropped += drops.iter().map(|(_, n)| n).sum::<u64>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awaiting_counts_only_what_the_sensor_holds() {
        let mut t = Totals::default();
        let drops = [
            (DropReason::KERNEL_BUFFER, 4),
            (DropReason::INTERFACE, 1),
            (DropReason::SENSOR_BUFFER, 3),
        ];
        t.add(10, 5, &drops);
        t.add(7, 7, &[]);
        assert_eq!(
            (t.matched, t.delivered, t.awaiting, t.dropped),
            (17, 12, 2, 8)
        );
    }
}
