//! Per-sensor quotas, so that one sensor cannot take the receiver's memory or bandwidth
//! from the others. Both are enforced by not reading the sensor's stream: QUIC flow control
//! then slows the sensor, whose own buffer fills and drops (counted there). Nothing here is
//! ever dropped silently.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The limits every sensor connection gets.
#[derive(Debug, Clone, Copy)]
pub struct Quotas {
    /// Wire bytes per second a sensor may send; `None`: no limit.
    pub rate: Option<u64>,
    /// Decompressed batch bytes of one sensor in the receiver, received but not yet in the
    /// output. At least one batch is always let in.
    pub held: usize,
}

/// A token bucket over wire bytes, allowing one second's worth in a burst.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u64,
    /// Bytes that may be read now; negative: owed.
    tokens: i64,
    refilled: Instant,
}

impl RateLimit {
    pub fn new(per_second: u64, now: Instant) -> Self {
        let per_second = per_second.max(1);
        Self {
            per_second,
            tokens: i64::try_from(per_second).unwrap_or(i64::MAX),
            refilled: now,
        }
    }

    /// Takes `bytes` just read; returns how long to wait before reading more.
    pub fn take(&mut self, bytes: usize, now: Instant) -> Duration {
        let burst = i64::try_from(self.per_second).unwrap_or(i64::MAX);
        let earned =
            now.saturating_duration_since(self.refilled).as_secs_f64() * self.per_second as f64;
        self.refilled = now;
        self.tokens = (self.tokens as f64 + earned).min(burst as f64) as i64;
        self.tokens -= i64::try_from(bytes).unwrap_or(i64::MAX);
        if self.tokens >= 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens as f64 / self.per_second as f64)
        }
    }
}

/// The batches of one connection taken in but not yet acknowledged (in the output).
#[derive(Debug, Default)]
pub struct Held {
    batches: VecDeque<(u64, usize)>,
    bytes: usize,
}

impl Held {
    pub fn add(&mut self, sequence: u64, bytes: usize) {
        self.batches.push_back((sequence, bytes));
        self.bytes += bytes;
    }

    /// Everything up to `sequence` is in the output.
    pub fn acknowledged(&mut self, sequence: u64) {
        while let Some(&(s, bytes)) = self.batches.front() {
            if s > sequence {
                break;
            }
            self.batches.pop_front();
            self.bytes -= bytes;
        }
    }

    /// Whether another batch may come in under `limit`.
    pub fn has_room(&self, limit: usize) -> bool {
        self.batches.is_empty() || self.bytes < limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_allows_a_second_in_a_burst_then_paces() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(1000, t0);
        assert_eq!(r.take(1000, t0), Duration::ZERO);
        assert_eq!(r.take(500, t0), Duration::from_millis(500));
        // Half a second later the debt is paid.
        assert_eq!(r.take(0, t0 + Duration::from_millis(500)), Duration::ZERO);
        // A long pause earns no more than one second's burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(r.take(1000, later), Duration::ZERO);
        assert!(r.take(1, later) > Duration::ZERO);
    }

    #[test]
    fn held_bytes_follow_acknowledgements_and_always_let_one_batch_in() {
        let mut h = Held::default();
        assert!(h.has_room(10));
        h.add(1, 100);
        assert!(!h.has_room(10), "over the limit");
        assert!(h.has_room(1000));
        h.add(2, 50);
        h.acknowledged(1);
        assert!(h.has_room(60));
        assert!(!h.has_room(50));
        h.acknowledged(5);
        assert!(h.has_room(0), "empty: one batch may always come in");
    }
}
