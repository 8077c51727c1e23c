//! The rings of captured frames, one per CPU, read as one stream in timestamp order.
//!
//! A frame goes into the ring of the CPU that captured it: two CPUs reserving in one ring
//! serialise on its lock, 6 times the cost of a frame (BENCHMARKS.md, "The ring"). Each ring
//! is in capture order, so the rings are merged by timestamp.
//!
//! A frame is stamped before its CPU gets to copy it, sometimes milliseconds before on a
//! busy machine, so a ring can still receive frames older than another ring's newest. One
//! shared ring wrote those out of order (in order of copying); here, while a CPU that
//! captured a moment ago shows nothing, the newer frames of the others wait in their rings
//! for it, up to [`HOLD`].

use std::mem::MaybeUninit;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{ArrayOfMaps, Map, MapData, RingBuf};
use aya::Ebpf;
use rustix::event::{epoll, Timespec};
use sensor_ebpf as shared;

use crate::error::{Error, Result};

const BPF_MAP_TYPE_RINGBUF: u32 = 27;
/// The smallest ring: what `--ring-size` takes at least, and a page on any kernel.
const MIN_RING_BYTES: u32 = 1 << 16;
/// How long frames wait for a CPU that captured within this time and shows nothing now:
/// long enough for a softirq deferred on a busy machine, short enough that the wait holds
/// few frames in the rings (a few MiB at 300 MB/s).
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

/// How `--ring-size` is shared out on this machine.
pub struct Layout {
    /// One slot per possible CPU (the programs index the rings by CPU number).
    slots: u32,
    /// The online CPUs, each with a ring of its own; a CPU brought online later writes to
    /// the first CPU's ring, which the merge reads like any other.
    online: Vec<u32>,
    /// Each ring's size: `--ring-size` split among the online CPUs, a power of two.
    pub ring_bytes: u32,
}

impl Layout {
    pub fn for_this_machine(total_bytes: u32) -> Result<Self> {
        fn cpus<T>(what: &str, r: std::result::Result<T, (&str, std::io::Error)>) -> Result<T> {
            r.map_err(|(path, e)| {
                Error::runtime(format!("cannot read the {what} CPUs from {path}: {e}"))
            })
        }
        let slots = cpus("possible", aya::util::nr_cpus())?;
        let slots = u32::try_from(slots).map_err(|_| Error::runtime("too many CPUs"))?;
        let online = cpus("online", aya::util::online_cpus())?;
        let count = u32::try_from(online.len().max(1)).unwrap_or(u32::MAX);
        let share = (total_bytes / count).max(MIN_RING_BYTES);
        // The kernel wants a power of two: the largest one within the share.
        let ring_bytes = 1 << share.ilog2();
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
    /// Readable when a ring (or another source added with [`Rings::watch`]) has data.
    epoll: OwnedFd,
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
        let epoll =
            epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| fail("epoll_create", &e))?;
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
            let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(|e| fail("a ring", &e))?;
            epoll::add(
                &epoll,
                &ring,
                epoll::EventData::new_u64(0),
                epoll::EventFlags::IN,
            )
            .map_err(|e| fail("epoll_ctl", &e))?;
            rings.push(ring);
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
            epoll,
        })
    }

    /// Wakes [`Rings::wait`] when `source` is readable too.
    pub fn watch(&self, source: impl AsFd) -> Result<()> {
        epoll::add(
            &self.epoll,
            source,
            epoll::EventData::new_u64(0),
            epoll::EventFlags::IN,
        )
        .map_err(|e| Error::runtime(format!("cannot wait for the eBPF log: {e}")))
    }

    /// Waits until a ring (or a watched source) has data, or `timeout` passes.
    pub fn wait(&self, timeout: &Timespec) {
        // Which source woke the wait does not matter: the loop reads them all.
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); 4];
        // EINTR only means an earlier look at the stop flag.
        let _ = epoll::wait(&self.epoll, &mut events[..], Some(timeout));
    }

    /// Hands the records the rings hold to `deliver`, oldest first by `stamp` (wall clock,
    /// ns), until `deliver` breaks. Each ring is in order already: the oldest record is at
    /// the head of one of them. With `hold`, records newer than `now_ns` − [`HOLD_NS`] stay
    /// while a ring that held records within that time is empty; without it (at a stop),
    /// everything goes.
    pub fn drain(
        &mut self,
        now_ns: u64,
        hold: bool,
        stamp: impl Fn(&[u8]) -> u64,
        mut deliver: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Drained {
        for (i, ring) in self.rings.iter_mut().enumerate() {
            self.order.set_head(i, peek(ring, &stamp), now_ns);
        }
        loop {
            let i = match self.order.next(now_ns, hold) {
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
            self.order.set_head(i, peek(ring, &stamp), now_ns);
        }
    }
}

/// The timestamp of the ring's oldest record, which stays in the ring.
fn peek(ring: &mut RingBuf<MapData>, stamp: &impl Fn(&[u8]) -> u64) -> Option<u64> {
    let record = ring.next()?;
    let t = stamp(&record);
    // Dropping the item would consume the record; forgetting it leaves the ring as it was
    // (the item only holds borrows), and the next read returns the same record.
    std::mem::forget(record);
    Some(t)
}

/// Which ring's record goes next: the merge's decisions, apart from the rings.
struct Order {
    /// The timestamp of each ring's oldest record, as last looked at.
    heads: Vec<Option<u64>>,
    /// When each ring last held a record (wall clock, ns; 0: never).
    last_seen_ns: Vec<u64>,
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
        }
    }

    /// Ring `ring`'s oldest record's timestamp, looked at `now_ns`.
    fn set_head(&mut self, ring: usize, head: Option<u64>, now_ns: u64) {
        self.heads[ring] = head;
        if head.is_some() {
            self.last_seen_ns[ring] = now_ns;
        }
    }

    fn next(&self, now_ns: u64, hold: bool) -> Next {
        let oldest = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.map(|t| (t, i)))
            .min();
        let Some((t, i)) = oldest else {
            return Next::Empty;
        };
        let recent = now_ns.saturating_sub(HOLD_NS);
        // A ring empty now that held records since `recent`: its CPU may still hand over
        // frames stamped before this one.
        let awaited = || {
            self.heads
                .iter()
                .zip(&self.last_seen_ns)
                .any(|(head, &seen)| head.is_none() && seen > recent)
        };
        if hold && t > recent && awaited() {
            Next::Hold
        } else {
            Next::Ring(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const NOW: u64 = 1_000 * MS;

    /// Delivers everything `order` lets go, as the rings would, from per-ring stamps.
    fn merged(
        order: &mut Order,
        rings: &mut [Vec<u64>],
        now_ns: u64,
        hold: bool,
    ) -> (Vec<u64>, Next) {
        let mut out = Vec::new();
        for (i, ring) in rings.iter().enumerate() {
            order.set_head(i, ring.first().copied(), now_ns);
        }
        loop {
            match order.next(now_ns, hold) {
                Next::Ring(i) => {
                    out.push(rings[i].remove(0));
                    order.set_head(i, rings[i].first().copied(), now_ns);
                }
                end => return (out, end),
            }
        }
    }

    #[test]
    fn rings_are_merged_in_timestamp_order() {
        let mut order = Order::new(3);
        let mut rings = [vec![1, 4, 7], vec![2, 5, 8], vec![3, 6, 9]];
        let (out, end) = merged(&mut order, &mut rings, NOW, true);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(end, Next::Empty);
    }

    #[test]
    fn one_busy_cpu_is_never_held_back_by_idle_ones() {
        let mut order = Order::new(2);
        let mut rings = [vec![NOW - 1, NOW], vec![]];
        let (out, end) = merged(&mut order, &mut rings, NOW, true);
        assert_eq!(out, [NOW - 1, NOW]);
        assert_eq!(end, Next::Empty);
    }

    #[test]
    fn newer_frames_wait_for_a_cpu_that_just_captured() {
        let mut order = Order::new(2);
        // CPU 1 handed over a frame in this look; then only CPU 0 has any.
        let mut rings = [vec![NOW - 2 * MS, NOW - MS], vec![NOW - 3 * MS]];
        let (out, end) = merged(&mut order, &mut rings, NOW, true);
        assert_eq!(out, [NOW - 3 * MS]);
        assert_eq!(end, Next::Hold);
        // CPU 1's late frame, stamped before the held ones, comes first.
        rings[1].push(NOW - 2 * MS - 1);
        let later = NOW + MS;
        let (out, end) = merged(&mut order, &mut rings, later, true);
        assert_eq!(out, [NOW - 2 * MS - 1]);
        assert_eq!(end, Next::Hold);
        // Nothing more from CPU 1: the held frames go once older than the hold.
        let (out, end) = merged(&mut order, &mut rings, later + HOLD_NS, true);
        assert_eq!(out, [NOW - 2 * MS, NOW - MS]);
        assert_eq!(end, Next::Empty);
    }

    #[test]
    fn a_stop_holds_nothing() {
        let mut order = Order::new(2);
        order.set_head(1, Some(NOW - MS), NOW);
        let mut rings = [vec![NOW], vec![]];
        let (out, end) = merged(&mut order, &mut rings, NOW, false);
        assert_eq!(out, [NOW]);
        assert_eq!(end, Next::Empty);
    }
}
