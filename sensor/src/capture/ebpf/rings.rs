//! The rings of captured frames, one per CPU, read as one stream in timestamp order.
//!
//! A frame goes into the ring of the CPU that captured it: two CPUs reserving in one ring
//! serialise on its lock, 1.3 to 6 times the cost of a frame (BENCHMARKS.md, "The ring").
//! Each ring is in capture order, so the rings are merged by timestamp.
//!
//! A frame is stamped before its CPU gets to copy it, sometimes milliseconds before on a
//! busy machine, so a ring can still receive frames older than another ring's newest. One
//! shared ring wrote those out of order (in order of copying); here, while a CPU that
//! captured a moment ago shows nothing, the newer frames of the others wait in their rings
//! for it, up to [`HOLD_NS`].

use std::ops::ControlFlow;
use std::os::fd::{AsFd, BorrowedFd};

use aya::maps::{ArrayOfMaps, Map, MapData, RingBuf};
use aya::Ebpf;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use sensor_ebpf as shared;

use crate::error::{Error, Result};

const BPF_MAP_TYPE_RINGBUF: u32 = 27;
/// Each CPU's ring by default: as much as one ring held for all CPUs before there was a
/// ring per CPU, since a single-queue NIC still has one CPU capture everything ...
const DEFAULT_RING_BYTES: u32 = 8 << 20;
/// ... but on many CPUs, all of the default rings together take at most this.
const DEFAULT_RINGS_TOTAL: u32 = 64 << 20;
/// The smallest default ring: four records of the largest size class (64 KiB).
const MIN_DEFAULT_RING_BYTES: u32 = 1 << 18;
/// The smallest ring the kernel takes on any page size (and `--ring-size` allows).
#[cfg_attr(
    not(feature = "afxdp"),
    allow(dead_code, reason = "only AF_XDP asks for it")
)]
pub const MIN_RING_BYTES: u32 = 1 << 16;
/// How long frames wait for a CPU that captured within this time and shows nothing now:
/// long enough for a softirq deferred on a busy machine, short enough that the wait holds
/// a few MiB at most in a ring (at 300 MB/s).
const HOLD_NS: u64 = 10_000_000;

/// How [`Rings::drain`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// The rings are empty.
    All,
    /// Frames wait in the rings for a CPU that may still hand over older ones.
    Holding,
    /// `deliver` stopped it.
    Stopped,
}

/// The rings this machine gets: one per online CPU, in slots for every possible CPU.
pub struct Layout {
    /// One slot per possible CPU (the programs index the rings by CPU number).
    slots: u32,
    /// The online CPUs, each with a ring of its own; a CPU brought online later writes to
    /// the first CPU's ring, which the merge reads like any other.
    online: Vec<u32>,
    /// Each ring's size, a power of two: `--ring-size`, or the default.
    pub ring_bytes: u32,
}

impl Layout {
    /// `ring_bytes`: `--ring-size`, if given.
    pub fn for_this_machine(ring_bytes: Option<u32>) -> Result<Self> {
        const POSSIBLE: &str = "/sys/devices/system/cpu/possible";
        let possible = std::fs::read_to_string(POSSIBLE)
            .map_err(|e| Error::runtime(format!("cannot read {POSSIBLE}: {e}")))?;
        let slots = highest_cpu(&possible)
            .and_then(|highest| highest.checked_add(1))
            .ok_or_else(|| Error::runtime(format!("cannot read {POSSIBLE}: {possible:?}")))?;
        let online = aya::util::online_cpus().map_err(|(path, e)| {
            Error::runtime(format!("cannot read the online CPUs from {path}: {e}"))
        })?;
        let ring_bytes = ring_bytes.unwrap_or_else(|| {
            let count = u32::try_from(online.len().max(1)).unwrap_or(u32::MAX);
            let share =
                (DEFAULT_RINGS_TOTAL / count).clamp(MIN_DEFAULT_RING_BYTES, DEFAULT_RING_BYTES);
            // The kernel wants a power of two: the largest one within the share.
            1 << share.ilog2()
        });
        Ok(Self {
            slots,
            online,
            ring_bytes,
        })
    }

    /// The size of the rings' array, set before the object is loaded.
    pub fn slots(&self) -> u32 {
        self.slots
    }
}

pub struct Rings {
    rings: Vec<RingBuf<MapData>>,
    order: Order,
}

impl Rings {
    /// Creates the rings of `layout` and puts them in the programs' array.
    pub fn create(ebpf: &mut Ebpf, layout: &Layout) -> Result<Self> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::runtime(format!("cannot set up the capture rings: {what}: {e}"))
        };
        let mut slots: ArrayOfMaps<MapData, MapData> = ebpf
            .take_map(shared::RINGS_MAP)
            .ok_or_else(|| fail("the object has no map", &shared::RINGS_MAP))?
            .try_into()
            .map_err(|e| fail("the rings' array", &e))?;
        let mut rings = Vec::with_capacity(layout.online.len());
        for &cpu in &layout.online {
            let fd = cbpf_to_ebpf::map_create(
                BPF_MAP_TYPE_RINGBUF,
                0,
                0,
                layout.ring_bytes,
                "capstream_ring",
            )
            .map_err(|e| fail("a ring", &e))?;
            let data = MapData::from_fd(fd).map_err(|e| fail("a ring", &e))?;
            slots
                .set(cpu, &data, 0)
                .map_err(|e| fail(&format!("the ring of CPU {cpu}"), &e))?;
            rings.push(RingBuf::try_from(Map::RingBuf(data)).map_err(|e| fail("a ring", &e))?);
        }
        // The CPUs not online now share the first ring (see Layout::online).
        if let Some(first) = rings.first() {
            let first = MapData::from_fd(
                first
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| fail("dup", &e))?,
            )
            .map_err(|e| fail("a ring", &e))?;
            for cpu in (0..layout.slots).filter(|c| !layout.online.contains(c)) {
                slots
                    .set(cpu, &first, 0)
                    .map_err(|e| fail(&format!("the ring of CPU {cpu}"), &e))?;
            }
        }
        // The array stays alive through the programs that use it.
        drop(slots);
        Ok(Self {
            order: Order::new(rings.len()),
            rings,
        })
    }

    /// Waits until a ring (or `also`) has data, or `timeout` passes. poll, not epoll: it
    /// looks at each ring's data itself, where epoll would miss the records submitted
    /// without a wakeup since the last drain (see the programs' `wakeup_flag`).
    pub fn wait(&self, also: Option<BorrowedFd<'_>>, timeout: &Timespec) {
        // One small vector per wait, not per frame.
        let mut fds: Vec<PollFd<'_>> = self
            .rings
            .iter()
            .map(|r| PollFd::new(r, PollFlags::IN))
            .chain(also.map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN)))
            .collect();
        // EINTR only means an earlier look at the stop flag.
        let _ = poll(&mut fds, Some(timeout));
    }

    /// Hands the records the rings hold to `deliver`, oldest first by `stamp` (wall clock,
    /// ns), until `deliver` breaks. Each ring is in order already: the oldest record is at
    /// the head of one of them. With `hold`, records stamped within [`HOLD_NS`] of
    /// `now.real_ns` stay while a ring that held records within that time is empty, for
    /// [`HOLD_NS`] at most (on the monotonic clock, so that a step of the wall clock
    /// cannot stretch it); without it (at a stop), everything goes.
    pub fn drain(
        &mut self,
        now: Now,
        hold: bool,
        stamp: impl Fn(&[u8]) -> u64,
        mut deliver: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Drained {
        for (i, ring) in self.rings.iter_mut().enumerate() {
            self.order.set_head(i, peek(ring, &stamp), now);
        }
        loop {
            let i = match self.order.next(now, hold) {
                Next::Ring(i) => i,
                Next::Hold => return Drained::Holding,
                Next::Empty => return Drained::All,
            };
            let ring = &mut self.rings[i];
            if let Some(record) = ring.next() {
                if deliver(&record).is_break() {
                    return Drained::Stopped;
                }
            }
            self.order.set_head(i, peek(ring, &stamp), now);
        }
    }
}

/// The highest CPU number of a kernel CPU list such as `0-3,8-11`: the last one.
fn highest_cpu(list: &str) -> Option<u32> {
    list.trim().rsplit([',', '-']).next()?.parse().ok()
}

/// The timestamp of the ring's oldest record, which stays in the ring.
fn peek(ring: &mut RingBuf<MapData>, stamp: &impl Fn(&[u8]) -> u64) -> Option<u64> {
    let record = ring.next()?;
    let t = stamp(&record);
    // Dropping the item would consume the record; forgetting it leaves the ring as it was
    // (in aya 0.14, pinned, the item only holds borrows and consumes in its Drop), and the
    // next read returns the same record.
    std::mem::forget(record);
    Some(t)
}

/// The time of a drain, on both clocks (ns).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// CLOCK_MONOTONIC: how long the merge has waited.
    pub monotonic_ns: u64,
    /// CLOCK_REALTIME, the frames' clock: how old a frame is.
    pub real_ns: u64,
}

/// Which ring's record goes next: the merge's decisions, apart from the rings.
struct Order {
    /// The timestamp of each ring's oldest record, as last looked at.
    heads: Vec<Option<u64>>,
    /// When each ring last held a record (monotonic ns; 0: never).
    last_seen_ns: Vec<u64>,
    /// Since when the oldest record has been held (monotonic ns).
    held_since_ns: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    Ring(usize),
    /// The oldest record waits (see [`Rings::drain`]).
    Hold,
    Empty,
}

impl Order {
    fn new(rings: usize) -> Self {
        Self {
            heads: vec![None; rings],
            last_seen_ns: vec![0; rings],
            held_since_ns: None,
        }
    }

    /// Ring `ring`'s oldest record's timestamp, looked at `now`.
    fn set_head(&mut self, ring: usize, head: Option<u64>, now: Now) {
        self.heads[ring] = head;
        if head.is_some() {
            self.last_seen_ns[ring] = now.monotonic_ns;
        }
    }

    fn next(&mut self, now: Now, hold: bool) -> Next {
        let oldest = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.map(|t| (t, i)))
            .min();
        let Some((t, i)) = oldest else {
            self.held_since_ns = None;
            return Next::Empty;
        };
        let seen_recently = now.monotonic_ns.saturating_sub(HOLD_NS);
        // A ring empty now that held records lately: its CPU may still hand over frames
        // stamped before this one.
        let awaited = || {
            self.heads
                .iter()
                .zip(&self.last_seen_ns)
                .any(|(head, &seen)| head.is_none() && seen > seen_recently)
        };
        if hold && t > now.real_ns.saturating_sub(HOLD_NS) && awaited() {
            let since = *self.held_since_ns.get_or_insert(now.monotonic_ns);
            if now.monotonic_ns.saturating_sub(since) < HOLD_NS {
                return Next::Hold;
            }
        } else {
            self.held_since_ns = None;
        }
        Next::Ring(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    /// Wall-clock stamps: the frames', and `now`'s.
    const NOW: u64 = 1_000_000 * MS;

    /// `now`, `ms` milliseconds after NOW on both clocks (the monotonic one started at 0).
    fn at(ms: u64) -> Now {
        Now {
            monotonic_ns: 5_000 * MS + ms * MS,
            real_ns: NOW + ms * MS,
        }
    }

    /// Delivers everything `order` lets go, as the rings would, from per-ring stamps.
    fn merged(order: &mut Order, rings: &mut [Vec<u64>], now: Now, hold: bool) -> (Vec<u64>, Next) {
        let mut out = Vec::new();
        for (i, ring) in rings.iter().enumerate() {
            order.set_head(i, ring.first().copied(), now);
        }
        loop {
            match order.next(now, hold) {
                Next::Ring(i) => {
                    out.push(rings[i].remove(0));
                    order.set_head(i, rings[i].first().copied(), now);
                }
                end => return (out, end),
            }
        }
    }

    #[test]
    fn rings_are_merged_in_timestamp_order() {
        let mut order = Order::new(3);
        let mut rings = [vec![1, 4, 7], vec![2, 5, 8], vec![3, 6, 9]];
        let (out, end) = merged(&mut order, &mut rings, at(0), true);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(end, Next::Empty);
    }

    #[test]
    fn one_busy_cpu_is_never_held_back_by_idle_ones() {
        let mut order = Order::new(2);
        let mut rings = [vec![NOW - 1, NOW], vec![]];
        let (out, end) = merged(&mut order, &mut rings, at(0), true);
        assert_eq!(out, [NOW - 1, NOW]);
        assert_eq!(end, Next::Empty);
    }

    #[test]
    fn newer_frames_wait_for_a_cpu_that_just_captured() {
        let mut order = Order::new(2);
        // CPU 1 handed over a frame in this look; then only CPU 0 has any.
        let mut rings = [vec![NOW - 2 * MS, NOW - MS], vec![NOW - 3 * MS]];
        let (out, end) = merged(&mut order, &mut rings, at(0), true);
        assert_eq!(out, [NOW - 3 * MS]);
        assert_eq!(end, Next::Hold);
        // CPU 1's late frame, stamped before the held ones, comes first.
        rings[1].push(NOW - 2 * MS - 1);
        let (out, end) = merged(&mut order, &mut rings, at(1), true);
        assert_eq!(out, [NOW - 2 * MS - 1]);
        assert_eq!(end, Next::Hold);
        // Nothing more from CPU 1: the held frames go once the hold has passed.
        let (out, end) = merged(&mut order, &mut rings, at(12), true);
        assert_eq!(out, [NOW - 2 * MS, NOW - MS]);
        assert_eq!(end, Next::Empty);
    }

    #[test]
    fn a_wall_clock_stepped_back_holds_no_longer_than_the_hold() {
        let mut order = Order::new(2);
        // Stamped before the wall clock went back an hour: they look an hour ahead.
        let ahead = NOW + 3_600_000 * MS;
        let mut rings = [vec![ahead, ahead + 1], vec![ahead - 1]];
        let (out, end) = merged(&mut order, &mut rings, at(0), true);
        assert_eq!((out, end), (vec![ahead - 1], Next::Hold));
        let (out, end) = merged(&mut order, &mut rings, at(5), true);
        assert_eq!((out, end), (vec![], Next::Hold));
        let (out, end) = merged(&mut order, &mut rings, at(10), true);
        assert_eq!((out, end), (vec![ahead, ahead + 1], Next::Empty));
    }

    #[test]
    fn frames_older_than_the_hold_are_never_held() {
        let mut order = Order::new(2);
        // A sensor that fell behind: CPU 1 just emptied, CPU 0's frames are 50 ms old.
        let mut rings = [vec![NOW - 50 * MS, NOW - 49 * MS], vec![NOW - 51 * MS]];
        let (out, end) = merged(&mut order, &mut rings, at(0), true);
        assert_eq!(out, [NOW - 51 * MS, NOW - 50 * MS, NOW - 49 * MS]);
        assert_eq!(end, Next::Empty);
    }

    #[test]
    fn a_stop_holds_nothing() {
        let mut order = Order::new(2);
        order.set_head(1, Some(NOW - MS), at(0));
        let mut rings = [vec![NOW], vec![]];
        let (out, end) = merged(&mut order, &mut rings, at(0), false);
        assert_eq!(out, [NOW]);
        assert_eq!(end, Next::Empty);
    }

    #[test]
    fn the_highest_cpu_is_the_last_of_the_list() {
        assert_eq!(highest_cpu("0-1\n"), Some(1));
        assert_eq!(highest_cpu("0-3,8-11"), Some(11));
        assert_eq!(highest_cpu("0"), Some(0));
        assert_eq!(highest_cpu(""), None);
    }
}
