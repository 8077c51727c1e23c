//! The exit summary: one line per sensor session.

use common::{DropReason, Stats};

use crate::merge::Written;

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
                        Some((_, total)) => *total += n,
                        None => by_reason.push((*reason, *n)),
                    }
                }
                let total: u64 = by_reason.iter().map(|(_, n)| n).sum();
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
                let matched: u64 = stats.interfaces.iter().map(|i| i.matched).sum();
                let elsewhere = matched.saturating_sub(self.written.packets + total);
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
