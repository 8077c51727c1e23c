//! Which receiver a sensor sends to, among several, sans-IO: rendezvous (highest random
//! weight) hashing orders the receivers by a weight each gets from the sensor's id and the
//! receiver's address, so that every sensor of a fleet finds its own order with no
//! coordinator, the fleet's sensors spread evenly over the receivers, and removing one
//! receiver moves only the sensors that were on it.
//!
//! The weight of receiver `r` for sensor `s` is the first 8 bytes (big-endian) of
//! SHA-256(`s` ‖ 0x00 ‖ `r`), with `s` the sensor id (`--sensor-id`, default the hostname,
//! as the receiver names the sensor) and `r` the receiver's address as resolved, written
//! `IP:PORT` (`[IPv6]:PORT`). Ties (never met in practice) go to the lower address.
//!
//! Before every other connection attempt the addresses are resolved again too: a receiver
//! whose name now has another address is followed there ([`Fleet::refresh`]); a failover
//! moves to the receiver after the current one in the order, wrapping around
//! ([`Fleet::fail_over`]).

use std::net::SocketAddr;

use crate::transport::Target;

/// The receivers in this sensor's hash order, and the one it sends to.
#[derive(Debug, Clone)]
pub struct Fleet {
    sensor_id: String,
    /// Most preferred first; never empty.
    order: Vec<Target>,
    current: usize,
}

impl Fleet {
    /// `receivers`: every address of every `--receiver` (at least one), in any order and
    /// with repeats; the sensor starts on the most preferred. `None` without any.
    pub fn new(sensor_id: &str, receivers: &[Target]) -> Option<Self> {
        let order = hash_order(sensor_id, receivers);
        (!order.is_empty()).then(|| Self {
            sensor_id: sensor_id.to_owned(),
            order,
            current: 0,
        })
    }

    /// The receiver sent to now.
    pub fn current(&self) -> &Target {
        &self.order[self.current]
    }

    /// The receivers, most preferred first.
    pub fn order(&self) -> &[Target] {
        &self.order
    }

    /// Whether there is another receiver to move to.
    pub fn can_fail_over(&self) -> bool {
        self.order.len() > 1
    }

    /// Takes the receivers' addresses as resolved now: stays on the current receiver if it
    /// is among them, else goes to the most preferred. An empty answer (the resolver
    /// failed) keeps the known ones. Returns the previous receiver when it changed.
    pub fn refresh(&mut self, resolved: &[Target]) -> Option<SocketAddr> {
        let from = self.current().addr;
        self.take(resolved);
        match self.position(from) {
            Some(i) => {
                self.current = i;
                None
            }
            None => {
                self.current = 0;
                Some(from)
            }
        }
    }

    /// Leaves the current receiver for the next in the hash order of `resolved`, the
    /// receivers' addresses as resolved now (so that a changed DNS answer is followed);
    /// an empty answer (the resolver failed) keeps the known ones. When the current
    /// receiver is no longer among them, the most preferred one is next. Returns the
    /// receiver left.
    pub fn fail_over(&mut self, resolved: &[Target]) -> SocketAddr {
        let from = self.current().addr;
        self.take(resolved);
        self.current = self
            .position(from)
            .map_or(0, |i| (i + 1) % self.order.len());
        from
    }

    fn take(&mut self, resolved: &[Target]) {
        let order = hash_order(&self.sensor_id, resolved);
        if !order.is_empty() {
            self.order = order;
        }
    }

    fn position(&self, addr: SocketAddr) -> Option<usize> {
        self.order.iter().position(|t| t.addr == addr)
    }
}

/// `receivers` deduplicated by address, heaviest first.
fn hash_order(sensor_id: &str, receivers: &[Target]) -> Vec<Target> {
    let mut weighted: Vec<(u64, &Target)> = receivers
        .iter()
        .map(|r| (weight(sensor_id, r.addr), r))
        .collect();
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.addr.cmp(&b.1.addr)));
    weighted.dedup_by_key(|(_, r)| r.addr);
    weighted.into_iter().map(|(_, r)| r.clone()).collect()
}

/// The rendezvous weight of `receiver` for `sensor_id` (see the module documentation).
pub fn weight(sensor_id: &str, receiver: SocketAddr) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(sensor_id.as_bytes());
    ctx.update(&[0]);
    ctx.update(receiver.to_string().as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receivers(n: u8) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                addr: SocketAddr::from(([198, 18, 0, 10 + i], 4433)),
                host: "rx.example".into(),
            })
            .collect()
    }

    fn fleet(id: &str, receivers: &[Target]) -> Fleet {
        Fleet::new(id, receivers).unwrap()
    }

    fn addrs(targets: &[Target]) -> Vec<SocketAddr> {
        targets.iter().map(|t| t.addr).collect()
    }

    fn sensors(n: usize) -> impl Iterator<Item = String> {
        (0..n).map(|i| format!("sensor-{i}"))
    }

    /// 1000 sensors over 3 receivers: each gets 1000/3 ± 15% (a binomial's standard
    /// deviation here is 15, so ±50 is more than 3 of them; the hash is deterministic, so
    /// this either always passes or never).
    #[test]
    fn a_fleet_spreads_evenly() {
        let all = receivers(3);
        let mut count = [0usize; 3];
        for id in sensors(1000) {
            let first = fleet(&id, &all).current().addr;
            count[all.iter().position(|r| r.addr == first).unwrap()] += 1;
        }
        for n in count {
            assert!((333 - 50..=333 + 50).contains(&n), "{count:?}");
        }
    }

    /// Removing a receiver moves only its sensors, each to its own second choice; the
    /// others stay where they were.
    #[test]
    fn removing_a_receiver_moves_only_its_sensors() {
        let all = receivers(3);
        let without: Vec<Target> = all.iter().filter(|r| **r != all[1]).cloned().collect();
        let mut moved = 0;
        for id in sensors(1000) {
            let before = fleet(&id, &all);
            let after = fleet(&id, &without);
            if *before.current() == all[1] {
                moved += 1;
                assert_eq!(after.current(), &before.order()[1], "{id}");
            } else {
                assert_eq!(after.current(), before.current(), "{id}");
            }
        }
        assert!(moved > 250, "{moved}");
    }

    #[test]
    fn the_order_is_the_sensors_own_and_stable() {
        let all = receivers(3);
        let reversed: Vec<Target> = all.iter().rev().cloned().collect();
        let a = fleet("tap-1", &all);
        assert_eq!(a.order(), fleet("tap-1", &reversed).order());
        assert_eq!(a.order().len(), 3);
        let mut twice = all.clone();
        twice.extend(all.iter().cloned());
        assert_eq!(a.order(), fleet("tap-1", &twice).order(), "repeats");
        // Not every sensor has the same order.
        assert!(sensors(20).any(|id| fleet(&id, &all).order() != a.order()));
        // Pinned, so that a change of the hash (which would move the whole fleet on
        // upgrade) is a decision: SHA-256("tap-1\0198.18.0.10:4433").
        assert_eq!(weight("tap-1", all[0].addr), 0xbda6_7919_ba82_ced2);
        assert!(Fleet::new("tap-1", &[]).is_none());
    }

    #[test]
    fn failover_goes_round_the_order() {
        let all = receivers(3);
        let mut f = fleet("tap-1", &all);
        let order = addrs(f.order());
        assert_eq!(f.fail_over(&all), order[0]);
        assert_eq!(f.current().addr, order[1]);
        assert_eq!(f.fail_over(&[]), order[1], "resolver failed");
        assert_eq!(f.current().addr, order[2]);
        assert_eq!(f.fail_over(&all), order[2]);
        assert_eq!(f.current().addr, order[0]);
        assert!(f.can_fail_over());
        assert!(!fleet("tap-1", &all[..1]).can_fail_over());
    }

    /// A changed DNS answer is followed: a new address joins the order where its weight
    /// puts it; a current receiver that is gone leaves the sensor on the most preferred.
    #[test]
    fn failover_follows_a_changed_answer() {
        let all = receivers(4);
        let mut f = fleet("tap-1", &all[..3]);
        let fresh = addrs(fleet("tap-1", &all).order());
        let from = f.current().addr;
        let at = fresh.iter().position(|a| *a == from).unwrap();
        assert_eq!(f.fail_over(&all), from);
        assert_eq!(f.current().addr, fresh[(at + 1) % fresh.len()]);
        assert_eq!(addrs(f.order()), fresh);
        let next = f.current().clone();
        let others: Vec<Target> = all.iter().filter(|r| **r != next).cloned().collect();
        f.fail_over(&others);
        assert_eq!(f.current(), &fleet("tap-1", &others).order()[0]);
    }

    /// Between failovers, a new answer keeps the sensor where it is unless its receiver is
    /// gone (a moved receiver: followed to the most preferred address).
    #[test]
    fn refresh_stays_unless_the_receiver_moved() {
        let all = receivers(3);
        let mut f = fleet("tap-1", &all);
        let here = f.current().clone();
        assert_eq!(f.refresh(&all), None);
        assert_eq!(f.refresh(&[]), None);
        assert_eq!(f.current(), &here);
        let moved: Vec<Target> = all.iter().filter(|r| **r != here).cloned().collect();
        assert_eq!(f.refresh(&moved), Some(here.addr));
        assert_eq!(f.current(), &fleet("tap-1", &moved).order()[0]);
    }
}
