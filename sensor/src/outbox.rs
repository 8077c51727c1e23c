//! Batches kept until the receiver acknowledges them, so that a new connection can send
//! again what the last one lost.
//!
//! The oldest batches sit in memory (`--buffer`); once that is full, newer ones go to the
//! optional spool on disk (`--spool-dir`) and come back into memory, oldest first, as
//! acknowledgements free room. When both are full the outbox refuses further batches
//! ([`Outbox::has_room`]), the capture threads' channel fills, and live captures drop whole
//! batches there, counted, before a sequence number is taken: the session never has a gap.
//!
//! No network I/O: the delivery loop drives it with plain calls, and tests do the same.

use std::collections::VecDeque;
use std::io;

use common::EncodedBatch;

use crate::batcher::Outgoing;
use crate::spool::{Spool, Spooled};

pub struct Outbox {
    /// Oldest first; the first `sent` of them went out on the current connection.
    memory: VecDeque<Outgoing>,
    memory_bytes: usize,
    max_memory: usize,
    /// Newer than everything in memory.
    spool: Option<Spool>,
    /// The spool failed a write: it is only read from now on.
    spool_failed: bool,
    /// The batch the spool refused (full or failing), newer than everything spooled: at
    /// most one, as it closes the intake.
    overflow: VecDeque<Outgoing>,
    sent: usize,
    /// Packets not yet acknowledged, by interface id.
    unacked_packets: Vec<u64>,
}

/// What the receiver's acknowledgement released, for the counters.
pub struct Released<'a> {
    pub interface_id: u16,
    pub batch: &'a EncodedBatch,
}

impl Outbox {
    pub fn new(max_memory: usize, spool: Option<Spool>) -> Self {
        Self {
            memory: VecDeque::new(),
            memory_bytes: 0,
            max_memory,
            spool,
            spool_failed: false,
            overflow: VecDeque::new(),
            sent: 0,
            unacked_packets: Vec::new(),
        }
    }

    /// Whether another batch may come in. Memory may exceed its bound by one batch.
    pub fn has_room(&self) -> bool {
        self.overflow.is_empty()
            && (self.memory_bytes < self.max_memory || (self.spool.is_some() && !self.spool_failed))
    }

    /// Takes a new batch, the newest of the session, and never loses it: what the spool
    /// refuses waits in memory behind it. A spool write error is returned for the log; the
    /// spool is then only read from.
    pub fn push(&mut self, out: Outgoing) -> io::Result<()> {
        let iface = usize::from(out.interface_id);
        if self.unacked_packets.len() <= iface {
            self.unacked_packets.resize(iface + 1, 0);
        }
        self.unacked_packets[iface] += u64::from(out.batch.packets);
        let spooled = self.spool.as_ref().is_some_and(|s| !s.is_empty());
        if self.memory_bytes < self.max_memory && !spooled && self.overflow.is_empty() {
            self.keep_in_memory(out);
            return Ok(());
        }
        let result = match self.spool.as_mut() {
            Some(spool) if !self.spool_failed && self.overflow.is_empty() => {
                match spool.push(&to_spooled(&out)) {
                    Ok(true) => return Ok(()),
                    Ok(false) => Ok(()),
                    Err(e) => {
                        self.spool_failed = true;
                        Err(e)
                    }
                }
            }
            _ => Ok(()),
        };
        self.overflow.push_back(out);
        result
    }

    fn keep_in_memory(&mut self, out: Outgoing) {
        self.memory_bytes += out.batch.frame.len();
        self.memory.push_back(out);
    }

    /// The next batch to write on the current connection, if any is waiting.
    pub fn next_unsent(&self) -> Option<&Outgoing> {
        self.memory.get(self.sent)
    }

    pub fn mark_sent(&mut self) {
        self.sent = (self.sent + 1).min(self.memory.len());
    }

    /// The receiver has everything up to `sequence`: lets those batches go, reporting each
    /// to `released`, and refills memory from the spool.
    pub fn ack(&mut self, sequence: u64, mut released: impl FnMut(Released)) -> io::Result<()> {
        while self.memory.front().is_some_and(|o| o.sequence <= sequence) {
            let Some(out) = self.memory.pop_front() else {
                break;
            };
            self.memory_bytes -= out.batch.frame.len();
            self.sent = self.sent.saturating_sub(1);
            if let Some(n) = self.unacked_packets.get_mut(usize::from(out.interface_id)) {
                *n -= u64::from(out.batch.packets);
            }
            released(Released {
                interface_id: out.interface_id,
                batch: &out.batch,
            });
        }
        self.refill()
    }

    /// Brings batches back into memory, oldest first: from the spool, then the overflow.
    /// A spool that cannot be read back is an error: its batches are lost.
    fn refill(&mut self) -> io::Result<()> {
        while self.memory_bytes < self.max_memory {
            let spooled = match self.spool.as_mut() {
                Some(spool) => spool.pop()?,
                None => None,
            };
            let out = match spooled {
                Some(s) => Outgoing {
                    sequence: s.sequence,
                    interface_id: s.interface_id,
                    batch: EncodedBatch {
                        frame: s.frame,
                        packets: s.packets,
                        raw_len: usize::try_from(s.raw_len).unwrap_or(usize::MAX),
                    },
                },
                None => match self.overflow.pop_front() {
                    Some(out) => out,
                    None => break,
                },
            };
            self.keep_in_memory(out);
        }
        Ok(())
    }

    /// A new connection: everything not acknowledged goes out again, oldest first.
    pub fn rewind(&mut self) {
        self.sent = 0;
    }

    /// Nothing is waiting for an acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.memory.is_empty() && self.all_sent()
    }

    /// Every batch held has gone out on the current connection.
    pub fn all_sent(&self) -> bool {
        self.sent == self.memory.len()
            && self.overflow.is_empty()
            && self.spool.as_ref().is_none_or(Spool::is_empty)
    }

    /// Batches held, in memory and spooled.
    pub fn len(&self) -> usize {
        self.memory.len() + self.overflow.len() + self.spool.as_ref().map_or(0, Spool::len)
    }

    /// Packets of interface `id` not yet acknowledged.
    pub fn unacked_packets(&self, id: usize) -> u64 {
        self.unacked_packets.get(id).copied().unwrap_or(0)
    }
}

fn to_spooled(out: &Outgoing) -> Spooled {
    Spooled {
        sequence: out.sequence,
        interface_id: out.interface_id,
        packets: out.batch.packets,
        raw_len: out.batch.raw_len as u64,
        frame: out.batch.frame.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn batch(sequence: u64, interface_id: u16, len: usize) -> Outgoing {
        Outgoing {
            sequence,
            interface_id,
            batch: EncodedBatch {
                frame: Bytes::from(vec![sequence as u8; len]),
                packets: 2,
                raw_len: len * 2,
            },
        }
    }

    fn sequences(o: &mut Outbox) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(b) = o.next_unsent() {
            out.push(b.sequence);
            o.mark_sent();
        }
        out
    }

    #[test]
    fn keeps_batches_until_acknowledged_and_resends_after_rewind() {
        let mut o = Outbox::new(1000, None);
        for seq in 1..=3 {
            o.push(batch(seq, 0, 100)).unwrap();
        }
        assert_eq!(sequences(&mut o), [1, 2, 3]);
        assert!(o.all_sent());
        let mut released = Vec::new();
        o.ack(1, |r| released.push(r.batch.packets)).unwrap();
        assert_eq!(released, [2]);
        assert_eq!(o.unacked_packets(0), 4);
        o.rewind();
        assert_eq!(sequences(&mut o), [2, 3]);
        o.ack(3, |_| {}).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.unacked_packets(0), 0);
    }

    #[test]
    fn a_full_memory_buffer_refuses_more() {
        let mut o = Outbox::new(250, None);
        o.push(batch(1, 0, 100)).unwrap();
        o.push(batch(2, 1, 100)).unwrap();
        assert!(o.has_room());
        o.push(batch(3, 1, 100)).unwrap();
        assert!(!o.has_room());
        assert_eq!((o.unacked_packets(0), o.unacked_packets(1)), (2, 4));
        o.ack(1, |_| {}).unwrap();
        assert!(o.has_room());
    }

    #[test]
    fn spills_to_the_spool_in_order_and_comes_back() {
        let dir = std::env::temp_dir().join(format!("outbox-test-{}", std::process::id()));
        let spool = Spool::open(&dir, 7, 64 << 20).unwrap();
        let mut o = Outbox::new(250, Some(spool));
        for seq in 1..=6 {
            o.push(batch(seq, 0, 100)).unwrap();
            assert!(o.has_room());
        }
        assert_eq!(o.len(), 6);
        assert_eq!(sequences(&mut o), [1, 2, 3], "memory first");
        assert!(!o.all_sent());
        o.ack(2, |_| {}).unwrap();
        assert_eq!(
            sequences(&mut o),
            [4, 5],
            "refilled from the spool, oldest first"
        );
        o.push(batch(7, 0, 100)).unwrap();
        o.ack(5, |_| {}).unwrap();
        assert_eq!(sequences(&mut o), [6, 7]);
        o.ack(7, |_| {}).unwrap();
        assert!(o.is_empty());
        drop(o);

        // A spool too small for a second batch: the one it refuses waits behind it.
        let spool = Spool::open(&dir, 8, 150).unwrap();
        let mut o = Outbox::new(100, Some(spool));
        for seq in 1..=3 {
            assert!(o.has_room());
            o.push(batch(seq, 0, 100)).unwrap();
        }
        assert!(
            !o.has_room(),
            "memory and spool full, one batch overflowing"
        );
        assert_eq!(sequences(&mut o), [1]);
        o.ack(1, |_| {}).unwrap();
        assert_eq!(sequences(&mut o), [2]);
        o.ack(2, |_| {}).unwrap();
        assert!(o.has_room());
        assert_eq!(sequences(&mut o), [3]);
        drop(o);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
