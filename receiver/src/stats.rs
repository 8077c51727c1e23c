//! The exit summary: one line per sensor session; and all of it as JSON for
//! `--summary-json`.

use protocol::{DropReason, Stats};
use receiver::sink::kafka::KafkaSummary;
use receiver::sink::live::LiveSummary;
use receiver::sink::secrets::SecretsCounters;
use serde_json::{json, Value};

use crate::merge::Written;
use crate::upload::UploadReport;

/// What the writer counts of one sensor session's traffic.
#[derive(Debug, Default, Clone, Copy)]
pub struct Received {
    pub batches: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub reconnects: u64,
    /// Batches received again after a reconnect, and ignored.
    pub duplicates: u64,
}

/// One sensor's line in the exit summary.
pub struct SensorSummary {
    pub label: String,
    pub written: Written,
    pub received: Received,
    pub stats: Option<Stats>,
}

impl SensorSummary {
    /// `sensor s1 (host, peer): 7907 packets, 1.6 MB, 7 batches, compression 3.28x, dropped 0`
    pub fn line(&self) -> String {
        let r = &self.received;
        let ratio = if r.wire_bytes > 0 {
            r.raw_bytes as f64 / r.wire_bytes as f64
        } else {
            1.0
        };
        let mut line = format!(
            "{}: {} packets, {} bytes, {} batches, compression {ratio:.2}x",
            self.label, self.written.packets, self.written.bytes, r.batches
        );
        if r.reconnects > 0 || r.duplicates > 0 {
            line += &format!(
                ", {} reconnect(s), {} duplicate batch(es) ignored",
                r.reconnects, r.duplicates
            );
        }
        if self.written.forced > 0 {
            line += &format!(
                ", {} forced out before the reorder window allowed",
                self.written.forced
            );
        }
        if self.written.resumed > 0 {
            line += &format!(
                ", {} sent again after a receiver restart and already in the output",
                self.written.resumed
            );
        }
        if self.written.ahead > 0 {
            line += &format!(
                ", {} stamped over a day past the receiver's clock (merged as if stamped then)",
                self.written.ahead
            );
        }
        if self.written.late > 0 {
            line += &format!(
                ", {} written late (older than packets already out)",
                self.written.late
            );
        }
        match &self.stats {
            Some(stats) => {
                let mut by_reason: Vec<(DropReason, u64)> = Vec::new();
                for (reason, n) in stats.interfaces.iter().flat_map(|i| &i.drops) {
                    match by_reason.iter_mut().find(|(r, _)| r == reason) {
                        Some((_, total)) => *total = total.saturating_add(*n),
                        None => by_reason.push((*reason, *n)),
                    }
                }
                // Sums of sensor-supplied counters saturate rather than overflow.
                let total = by_reason
                    .iter()
                    .fold(0u64, |t, (_, n)| t.saturating_add(*n));
                line += &format!(", dropped by the sensor {total}");
                if total > 0 {
                    let parts: Vec<String> = by_reason
                        .iter()
                        .map(|(r, n)| format!("{} {n}", r.name()))
                        .collect();
                    line += &format!(" ({})", parts.join(", "));
                }
                // The accounting identity: what the sensor matched is written here, dropped
                // with a reason, or elsewhere (an earlier receiver, or still at the sensor).
                let matched = stats
                    .interfaces
                    .iter()
                    .fold(0u64, |t, i| t.saturating_add(i.matched));
                let elsewhere = matched.saturating_sub(self.written.packets.saturating_add(total));
                line += &format!(", matched by the sensor {matched}");
                if elsewhere > 0 {
                    line += &format!(
                        ", {elsewhere} not in this output (written by an earlier receiver, or \
                         still held by the sensor)"
                    );
                }
            }
            None => line += ", no statistics received",
        }
        line
    }
}

impl SensorSummary {
    /// The figures of [`SensorSummary::line`] for `--summary-json`; the sensor's drops
    /// keyed by [`DropReason::label`].
    pub fn json(&self) -> Value {
        let (w, r) = (&self.written, &self.received);
        let sensor_stats = self.stats.as_ref().map(|stats| {
            let interfaces: Vec<Value> = stats
                .interfaces
                .iter()
                .map(|i| {
                    let mut drops = serde_json::Map::new();
                    for (reason, n) in &i.drops {
                        let total = drops
                            .get(reason.label())
                            .and_then(Value::as_u64)
                            .unwrap_or(0)
                            .saturating_add(*n);
                        drops.insert(reason.label().to_string(), total.into());
                    }
                    json!({
                        "interface_id": i.interface_id,
                        "seen": i.seen,
                        "matched": i.matched,
                        "delivered": i.delivered,
                        "drops": drops,
                    })
                })
                .collect();
            json!({ "interfaces": interfaces })
        });
        json!({
            "label": self.label,
            "written": {
                "packets": w.packets,
                "bytes": w.bytes,
                "late": w.late,
                "forced": w.forced,
                "resumed": w.resumed,
                "ahead": w.ahead,
            },
            "received": {
                "batches": r.batches,
                "raw_bytes": r.raw_bytes,
                "wire_bytes": r.wire_bytes,
                "duplicates": r.duplicates,
                "reconnects": r.reconnects,
            },
            "sensor_stats": sensor_stats,
        })
    }
}

/// The whole exit summary for `--summary-json`: the sessions (`null` when the run failed
/// before it could list them), the live stream's figures and the upload report (`null`
/// when not asked for).
pub fn summary_json(
    sessions: Option<&[SensorSummary]>,
    live: Option<&LiveSummary>,
    kafka: Option<&KafkaSummary>,
    upload: Option<&UploadReport>,
    tls_keys: &SecretsCounters,
    split_overflow_packets: u64,
) -> Value {
    json!({
        "sessions": sessions.map(|s| s.iter().map(SensorSummary::json).collect::<Vec<_>>()),
        "live_stream": live.map(LiveSummary::json),
        "kafka": kafka.map(KafkaSummary::json),
        "upload": upload.map(UploadReport::json),
        "tls_keys": tls_keys.json(),
        "split_overflow_packets": split_overflow_packets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::InterfaceStats;
    use receiver::sink::secrets::COUNTERS;

    /// Hostile counters (u64::MAX) make a summary line, not an overflow panic.
    #[test]
    fn hostile_counters_saturate() {
        let huge = InterfaceStats {
            interface_id: 0,
            seen: u64::MAX,
            matched: u64::MAX,
            delivered: u64::MAX,
            drops: vec![
                (DropReason::KERNEL_BUFFER, u64::MAX),
                (DropReason::KERNEL_BUFFER, u64::MAX),
            ],
        };
        let summary = SensorSummary {
            label: "sensor s".into(),
            written: Written {
                packets: u64::MAX,
                ..Written::default()
            },
            received: Received::default(),
            stats: Some(Stats {
                session_id: 1,
                interfaces: vec![huge.clone(), huge],
            }),
        };
        assert!(summary
            .line()
            .contains(&format!("matched by the sensor {}", u64::MAX)));
        // The JSON adds a reason given twice up, saturating as well.
        let json = summary.json();
        let interfaces = &json["sensor_stats"]["interfaces"];
        assert_eq!(interfaces[0]["drops"]["kernel_buffer"], u64::MAX);
        assert_eq!(interfaces[1]["matched"], u64::MAX);
        assert_eq!(json["written"]["packets"], u64::MAX);
    }

    #[test]
    fn a_session_without_statistics_and_a_failed_run() {
        let summary = SensorSummary {
            label: "sensor s (h, 127.0.0.1:1)".into(),
            written: Written {
                packets: 3,
                late: 1,
                ..Written::default()
            },
            received: Received {
                batches: 2,
                duplicates: 1,
                ..Received::default()
            },
            stats: None,
        };
        let json = summary_json(Some(&[summary]), None, None, None, &COUNTERS, 0);
        let session = &json["sessions"][0];
        assert_eq!(session["label"], "sensor s (h, 127.0.0.1:1)");
        assert_eq!(session["written"]["packets"], 3);
        assert_eq!(session["written"]["late"], 1);
        assert_eq!(session["received"]["duplicates"], 1);
        assert!(session["sensor_stats"].is_null());
        assert!(json["live_stream"].is_null() && json["upload"].is_null());
        assert!(summary_json(None, None, None, None, &COUNTERS, 0)["sessions"].is_null());
    }
}
