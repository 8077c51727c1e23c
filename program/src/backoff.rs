//! Exponential backoff between tries of something that fails (a connection, an upload, a
//! request): the first wait, doubled after each further failure up to a ceiling, and back to
//! the first after a success. Pure (no clock), so the machines that use it stay testable.

use std::time::Duration;

/// Waits that double from `first` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff whose first wait is `first` and whose longest is `max` (at least `first`).
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next try; the one after will be twice as long, up to the ceiling.
    pub fn delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = delay.saturating_mul(2).min(self.max).max(self.first);
        delay
    }

    /// After a success: the next wait is the first again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The longest wait, for messages that say how long retries may be apart.
    pub const fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_starts_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        let delays: Vec<u128> = (0..7).map(|_| backoff.delay().as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.delay(), Duration::from_millis(250));
    }

    #[test]
    fn a_ceiling_below_the_first_wait_keeps_the_first() {
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(backoff.delay(), Duration::from_secs(2));
        assert_eq!(backoff.delay(), Duration::from_secs(2));
    }
}
