//! What the receiver shows while it runs: the Prometheus series (`--metrics`) and the live
//! status line, both published about once a second by the writer task from the figures it
//! keeps for the exit summary. Without a recorder installed, the series are no-ops.
//!
//! A sensor session's series carry its name and a short hash of its session id, never the
//! id itself (a restarted sensor is a new session, while the old one may still linger); they stop being updated when the session
//! closes and the endpoint drops them after [`crate::METRICS_LINGER`].

use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge};
use program::status;
use protocol::{DropReason, Stats};

use crate::merge::Written;
use crate::stats::Received;

/// How often the series and the status line are brought up to date.
pub const EVERY: Duration = Duration::from_secs(1);

/// The drop reasons a sensor reports, in the order of [`SessionSeries::drops`].
const REASONS: [DropReason; 3] = [
    DropReason::KERNEL_BUFFER,
    DropReason::INTERFACE,
    DropReason::SENSOR_BUFFER,
];

/// One sensor session's figures, as the writer keeps them.
pub struct Figures<'a> {
    pub written: Written,
    pub received: Received,
    /// The sensor's last statistics, if any came yet.
    pub stats: Option<&'a Stats>,
    pub rtt: Duration,
}

impl Figures<'_> {
    /// What the sensor says it dropped, by reason (order of [`REASONS`]).
    fn drops(&self) -> [u64; 3] {
        let mut drops = [0; 3];
        for (reason, n) in self
            .stats
            .iter()
            .flat_map(|s| &s.interfaces)
            .flat_map(|i| &i.drops)
        {
            if let Some(at) = REASONS.iter().position(|r| r == reason) {
                drops[at] += n;
            }
        }
        drops
    }
}

/// One sensor session's series, registered once when it joins.
pub struct SessionSeries {
    packets: Counter,
    bytes: Counter,
    batches: Counter,
    raw_bytes: Counter,
    wire_bytes: Counter,
    reconnects: Counter,
    duplicates: Counter,
    late: Counter,
    matched: Counter,
    drops: [Counter; 3],
    rtt: Gauge,
}

impl SessionSeries {
    /// `sensor`: the name the output gives it (already free of control characters);
    /// `session`: the session's tag ([`crate::writer::session_tag`]).
    pub fn new(sensor: &str, session: String) -> Self {
        let series = |metric: &'static str| counter!(metric, "sensor" => sensor.to_owned(), "session" => session.clone());
        Self {
            packets: series("capstream_receiver_packets_written_total"),
            bytes: series("capstream_receiver_bytes_written_total"),
            batches: series("capstream_receiver_batches_total"),
            raw_bytes: series("capstream_receiver_raw_bytes_total"),
            wire_bytes: series("capstream_receiver_wire_bytes_total"),
            reconnects: series("capstream_receiver_reconnects_total"),
            duplicates: series("capstream_receiver_duplicate_batches_total"),
            late: series("capstream_receiver_packets_late_total"),
            matched: series("capstream_receiver_sensor_matched_total"),
            drops: REASONS.map(|reason| {
                counter!("capstream_receiver_sensor_drops_total",
                    "sensor" => sensor.to_owned(), "session" => session.clone(),
                    "reason" => reason.label())
            }),
            rtt: gauge!("capstream_receiver_rtt_seconds",
                "sensor" => sensor.to_owned(), "session" => session.clone()),
        }
    }

    pub fn publish(&self, f: &Figures<'_>) {
        self.packets.absolute(f.written.packets);
        self.bytes.absolute(f.written.bytes);
        self.batches.absolute(f.received.batches);
        self.raw_bytes.absolute(f.received.raw_bytes);
        self.wire_bytes.absolute(f.received.wire_bytes);
        self.reconnects.absolute(f.received.reconnects);
        self.duplicates.absolute(f.received.duplicates);
        self.late.absolute(f.written.late);
        let matched = f
            .stats
            .iter()
            .flat_map(|s| &s.interfaces)
            .map(|i| i.matched);
        self.matched.absolute(matched.sum());
        for (series, n) in self.drops.iter().zip(f.drops()) {
            series.absolute(n);
        }
        self.rtt.set(f.rtt.as_secs_f64());
    }
}

/// The receiver-wide series and the status line.
pub struct Telemetry {
    connected: Gauge,
    sessions: Gauge,
    /// Packets written, bytes written and drops reported, of every closed session.
    closed: [u64; 3],
    /// Packets written at the last publication, for the rate.
    last: (Instant, u64),
}

impl Telemetry {
    pub fn new() -> Self {
        describe();
        Self {
            connected: gauge!("capstream_receiver_sensors_connected"),
            sessions: gauge!("capstream_receiver_sessions"),
            closed: [0; 3],
            last: (Instant::now(), 0),
        }
    }

    pub fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last.0) >= EVERY
    }

    /// A session closed: its series are no longer published, its figures still count in
    /// the status line.
    pub fn closed(&mut self, f: &Figures<'_>) {
        self.closed[0] += f.written.packets;
        self.closed[1] += f.written.bytes;
        self.closed[2] += f.drops().iter().sum::<u64>();
    }

    /// Publishes the open sessions' series (`attached`: connected now rather than away),
    /// and the status line over all sessions.
    pub fn publish<'a>(
        &mut self,
        now: Instant,
        open: impl Iterator<Item = (&'a SessionSeries, Figures<'a>, bool)>,
    ) {
        let (mut connected, mut sessions) = (0u32, 0u32);
        let [mut packets, mut bytes, mut dropped] = self.closed;
        for (series, figures, attached) in open {
            series.publish(&figures);
            sessions += 1;
            connected += u32::from(attached);
            packets += figures.written.packets;
            bytes += figures.written.bytes;
            dropped += figures.drops().iter().sum::<u64>();
        }
        self.connected.set(connected);
        self.sessions.set(sessions);
        for (name, value) in receiver::sink::secrets::COUNTERS.figures() {
            counter!(format!("capstream_receiver_tls_keys_{name}_total")).absolute(value);
        }
        counter!("capstream_receiver_split_overflow_packets_total").absolute(
            receiver::sink::files::SPLIT_OVERFLOW.load(std::sync::atomic::Ordering::Relaxed),
        );
        let (then, packets_then) = self.last;
        let rate = status::per_second(packets_then, packets, (now - then).as_secs_f64());
        self.last = (now, packets);
        status::show(&format!(
            "receiver: {connected} sensor(s) connected, {}pkt/s, {:.1} MB written, {} dropped \
             by sensors",
            status::short(rate),
            bytes as f64 / 1e6,
            dropped,
        ));
    }
}

/// The `# HELP` lines of the endpoint.
fn describe() {
    for (name, help) in [
        (
            "capstream_receiver_packets_written_total",
            "Packets of the sensor session written to the output.",
        ),
        (
            "capstream_receiver_bytes_written_total",
            "Packet bytes of the sensor session written to the output.",
        ),
        (
            "capstream_receiver_packets_late_total",
            "Packets written after newer ones of other sensors.",
        ),
        (
            "capstream_receiver_batches_total",
            "Batches received from the sensor session.",
        ),
        (
            "capstream_receiver_raw_bytes_total",
            "Bytes of the received batches, decompressed.",
        ),
        (
            "capstream_receiver_wire_bytes_total",
            "Bytes of the received batches as received (compressed).",
        ),
        (
            "capstream_receiver_duplicate_batches_total",
            "Batches received again after a reconnect, ignored.",
        ),
        (
            "capstream_receiver_reconnects_total",
            "Times the sensor came back to its session.",
        ),
        (
            "capstream_receiver_sensor_matched_total",
            "Frames the sensor says it matched.",
        ),
        (
            "capstream_receiver_sensor_drops_total",
            "Frames the sensor says it lost, by reason.",
        ),
        (
            "capstream_receiver_tls_keys_written_total",
            "TLS key log lines written in Decryption Secrets Blocks (once each).",
        ),
        (
            "capstream_receiver_tls_keys_carried_total",
            "TLS key log lines written again at the start of a rotated file.",
        ),
        (
            "capstream_receiver_tls_keys_without_packets_total",
            "TLS key log lines no ClientHello written after them named.",
        ),
        (
            "capstream_receiver_tls_keys_not_written_total",
            "TLS key log lines not written: --drop-secrets, or an output that cannot hold them.",
        ),
        (
            "capstream_receiver_split_overflow_packets_total",
            "Packets written to the shared file of --split-by process|container: too many \
             files of their own were open.",
        ),
    ] {
        describe_counter!(name, help);
    }
    describe_gauge!(
        "capstream_receiver_rtt_seconds",
        "QUIC's round-trip time to the sensor."
    );
    describe_gauge!(
        "capstream_receiver_sensors_connected",
        "Sensors connected now."
    );
    describe_gauge!(
        "capstream_receiver_sessions",
        "Sensor sessions open (connected, or away and awaited)."
    );
}

#[cfg(test)]
mod tests {
    use protocol::InterfaceStats;

    use super::*;

    fn figures(stats: Option<&Stats>, packets: u64) -> Figures<'_> {
        Figures {
            written: Written {
                packets,
                bytes: packets * 100,
                ..Written::default()
            },
            received: Received::default(),
            stats,
            rtt: Duration::ZERO,
        }
    }

    #[test]
    fn drops_add_up_by_reason_over_interfaces_and_closed_sessions() {
        let interface = |id, drops: Vec<(DropReason, u64)>| InterfaceStats {
            interface_id: id,
            drops,
            ..InterfaceStats::default()
        };
        let stats = Stats {
            session_id: 1,
            interfaces: vec![
                interface(
                    0,
                    vec![
                        (DropReason::KERNEL_BUFFER, 2),
                        (DropReason::SENSOR_BUFFER, 5),
                    ],
                ),
                interface(1, vec![(DropReason::KERNEL_BUFFER, 3), (DropReason(9), 7)]),
            ],
        };
        let f = figures(Some(&stats), 10);
        // Reasons this build does not know are not series of their own.
        assert_eq!(f.drops(), [5, 0, 5]);
        assert_eq!(figures(None, 0).drops(), [0; 3]);

        let mut t = Telemetry::new();
        t.closed(&f);
        t.closed(&figures(None, 4));
        assert_eq!(t.closed, [14, 1400, 10]);
    }
}
