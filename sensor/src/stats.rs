//! Per-interface counters, shared between a capture thread (which counts packets) and the
//! transport (which counts what it sent). Atomics only: the hot path never locks.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use protocol::{DropReason, InterfaceStats};

#[derive(Debug, Default)]
pub struct Counters {
    /// Packets the capture saw before the filter (libpcap ps_recv), where known.
    pub seen: AtomicU64,
    /// Packets that passed the filter and reached the sensor.
    pub matched: AtomicU64,
    /// Packets in batches the receiver acknowledged (wrote to its output).
    pub delivered: AtomicU64,
    pub drop_kernel: AtomicU64,
    pub drop_interface: AtomicU64,
    pub drop_buffer: AtomicU64,
    /// Packets of spooled batches that could not be read back.
    pub drop_spool: AtomicU64,
    /// Batches acknowledged, and their sizes before and after compression.
    pub batches: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
}

impl Counters {
    pub fn drops(&self) -> [(DropReason, u64); 4] {
        [
            (DropReason::KERNEL_BUFFER, self.drop_kernel.load(Relaxed)),
            (DropReason::INTERFACE, self.drop_interface.load(Relaxed)),
            (DropReason::SENSOR_BUFFER, self.drop_buffer.load(Relaxed)),
            (DropReason::SPOOL_DAMAGED, self.drop_spool.load(Relaxed)),
        ]
    }

    /// The protocol's view of these counters.
    pub fn snapshot(&self, interface_id: u16) -> InterfaceStats {
        InterfaceStats {
            interface_id,
            seen: self.seen.load(Relaxed),
            matched: self.matched.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            drops: self.drops().to_vec(),
        }
    }

    /// Records one batch the receiver acknowledged.
    pub fn acknowledged(&self, packets: u32, raw_len: usize, wire_len: usize) {
        self.delivered.fetch_add(packets.into(), Relaxed);
        self.batches.fetch_add(1, Relaxed);
        self.raw_bytes.fetch_add(raw_len as u64, Relaxed);
        self.wire_bytes.fetch_add(wire_len as u64, Relaxed);
    }

    /// One summary line for the exit report; `unacked` packets were still held at exit.
    pub fn summary_line(&self, name: &str, unacked: u64) -> String {
        let raw = self.raw_bytes.load(Relaxed);
        let wire = self.wire_bytes.load(Relaxed);
        let mut line = format!(
            "  {name}: seen {}, matched {}, delivered {}, dropped {}",
            self.seen.load(Relaxed),
            self.matched.load(Relaxed),
            self.delivered.load(Relaxed),
            self.drops().iter().map(|(_, n)| n).sum::<u64>(),
        );
        let drops: Vec<String> = self
            .drops()
            .iter()
            .map(|(r, n)| format!("{}: {n}", r.name()))
            .collect();
        let _ = write!(
            line,
            " ({}), unacknowledged {unacked}, batches {}, raw bytes {raw}, wire bytes {wire}, \
             compression ratio {}",
            drops.join(", "),
            self.batches.load(Relaxed),
            ratio(raw, wire),
        );
        line
    }

    /// The figures of [`Counters::summary_line`] for `--summary-json`, drops keyed by
    /// [`DropReason::label`].
    pub fn summary_json(&self, name: &str, unacked: u64) -> serde_json::Value {
        let drops = self.drops();
        let by_reason: serde_json::Map<String, serde_json::Value> = drops
            .iter()
            .map(|(r, n)| (r.label().to_string(), serde_json::Value::from(*n)))
            .collect();
        serde_json::json!({
            "name": name,
            "seen": self.seen.load(Relaxed),
            "matched": self.matched.load(Relaxed),
            "delivered": self.delivered.load(Relaxed),
            "dropped": drops.iter().map(|(_, n)| n).sum::<u64>(),
            "drops": by_reason,
            "unacknowledged": unacked,
            "batches": self.batches.load(Relaxed),
            "raw_bytes": self.raw_bytes.load(Relaxed),
            "wire_bytes": self.wire_bytes.load(Relaxed),
        })
    }
}

/// What the key log follower counts.
#[derive(Debug, Default)]
pub struct KeyLogCounters {
    /// `matched`: lines read and batched; `drop_buffer`: of those, dropped because the
    /// sensor's buffer was full; `delivered`: acknowledged by the receiver.
    pub lines: Arc<Counters>,
    /// Lines not of the key log format, skipped.
    pub malformed: AtomicU64,
}

impl KeyLogCounters {
    /// The exit summary's line.
    pub fn summary_line(&self) -> String {
        format!(
            "  TLS key log: {} lines read, {} delivered, {} dropped (sensor buffer full), {} \
             malformed skipped",
            self.lines.matched.load(Relaxed),
            self.lines.delivered.load(Relaxed),
            self.lines.drop_buffer.load(Relaxed),
            self.malformed.load(Relaxed),
        )
    }

    /// Each figure by its name in `--summary-json` and the metrics.
    pub fn figures(&self) -> [(&'static str, u64); 4] {
        [
            ("read", self.lines.matched.load(Relaxed)),
            ("delivered", self.lines.delivered.load(Relaxed)),
            ("dropped", self.lines.drop_buffer.load(Relaxed)),
            ("malformed", self.malformed.load(Relaxed)),
        ]
    }

    pub fn summary_json(&self) -> serde_json::Value {
        self.figures()
            .into_iter()
            .map(|(name, n)| (name.to_string(), serde_json::Value::from(n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// The connection to the receiver, kept by the delivery loop.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// A connection is up and the receiver has taken the session.
    pub up: AtomicBool,
    /// Connections lost once open (the session goes on over a new one).
    pub reconnects: AtomicU64,
    /// QUIC's smoothed round-trip time in microseconds, sampled each second while up.
    pub rtt_micros: AtomicU64,
    /// Moves to another receiver (several --receiver).
    pub failovers: AtomicU64,
    /// The receiver sent to (or tried) now.
    receiver: std::sync::Mutex<Option<std::net::SocketAddr>>,
}

impl LinkStats {
    /// The receiver sent to now.
    pub fn receiver(&self) -> Option<std::net::SocketAddr> {
        *self.receiver.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_receiver(&self, addr: std::net::SocketAddr) {
        *self.receiver.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }
}

/// raw/wire as "2.53", or "-" before anything was sent.
pub fn ratio(raw: u64, wire: u64) -> String {
    if wire == 0 {
        "-".into()
    } else {
        format!("{:.2}", raw as f64 / wire as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_and_summary() {
        let c = Counters::default();
        c.matched.store(10, Relaxed);
        c.drop_buffer.store(3, Relaxed);
        c.acknowledged(7, 1000, 400);
        let s = c.snapshot(2);
        assert_eq!(s.interface_id, 2);
        assert_eq!((s.matched, s.delivered, s.dropped()), (10, 7, 3));
        let line = c.summary_line("eth0", 0);
        assert!(line.contains("eth0: seen 0, matched 10, delivered 7, dropped 3"));
        assert!(line.contains("sensor buffer full: 3, spool damaged: 0), unacknowledged 0"));
        assert!(line.contains("compression ratio 2.50"));
        assert_eq!(ratio(1, 0), "-");
        let json = c.summary_json("eth0", 2);
        assert_eq!(json["name"], "eth0");
        assert_eq!(
            (
                json["matched"].as_u64(),
                json["delivered"].as_u64(),
                json["dropped"].as_u64()
            ),
            (Some(10), Some(7), Some(3))
        );
        assert_eq!(json["drops"]["sensor_buffer"], 3);
        assert_eq!(json["drops"]["kernel_buffer"], 0);
        assert_eq!(json["unacknowledged"], 2);
        assert_eq!(
            (
                json["batches"].as_u64(),
                json["raw_bytes"].as_u64(),
                json["wire_bytes"].as_u64()
            ),
            (Some(1), Some(1000), Some(400))
        );
    }
}
