//! Batches kept until the receiver acknowledges them, so that a new connection can send
//! again what the last one lost.
//!
//! The oldest batches sit in memory (`--buffer`); once that is full, newer ones go to the
//! optional spool on disk (`--spool-dir`) and come back into memory, oldest first, as
//! acknowledgements free room. When both are full the outbox refuses further batches
//! ([`Outbox::has_room`]), the capture threads' channel fills, and live captures drop whole
//! batches there, counted, before a sequence number is taken: the session never has a gap.
//!
//! A spool left by a sensor that was killed is adopted: its batches come first, with empty
//! batches for the sequences that died in that sensor's memory. A damaged spool segment
//! loses only its own batches: they are counted ("spool damaged") and replaced by empty
//! batches, so that the session has no gap.
//!
//! No network I/O: the delivery loop drives it with plain calls, and tests do the same.

use std::collections::VecDeque;
use std::io;

use protocol::EncodedBatch;

use crate::batcher::{empty_batch, Outgoing};
use crate::spool::{SessionKeys, Spool, Spooled};

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
    /// Packets lost to a damaged spool segment since last taken, by interface id.
    damaged_packets: Vec<u64>,
}

/// What the receiver's acknowledgement released, for the counters.
pub struct Released<'a> {
    pub interface_id: u16,
    pub batch: &'a EncodedBatch,
}

impl Outbox {
    /// `spool`: with what it adopted from a previous process, which goes first.
    pub fn new(max_memory: usize, spool: Option<Spool>) -> Self {
        let adopted = spool.as_ref().map(|s| s.adopted().clone());
        let mut outbox = Self {
            memory: VecDeque::new(),
            memory_bytes: 0,
            max_memory,
            spool,
            spool_failed: false,
            overflow: VecDeque::new(),
            sent: 0,
            unacked_packets: Vec::new(),
            damaged_packets: Vec::new(),
        };
        if let Some(adopted) = adopted {
            outbox.unacked_packets = adopted.packets;
            for sequence in adopted.lost_before {
                outbox.keep_in_memory(empty_batch(sequence, 0));
            }
            outbox.refill();
            for sequence in adopted.lost_after {
                if let Err(e) = outbox.push(empty_batch(sequence, 0)) {
                    tracing::error!("spool write failed: {e}");
                }
            }
        }
        outbox
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
        *slot(&mut self.unacked_packets, out.interface_id) += u64::from(out.batch.packets);
        if let Some(spool) = self.spool.as_mut() {
            // So that a restarted sensor numbers after it (see `Spool::note`).
            if let Err(e) = spool.note(out.sequence, 0) {
                tracing::warn!("spool state write failed: {e}");
            }
        }
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
    pub fn ack(&mut self, sequence: u64, mut released: impl FnMut(Released)) {
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
        if let Some(spool) = self.spool.as_mut() {
            if let Err(e) = spool.note(0, sequence) {
                tracing::warn!("spool state write failed: {e}");
            }
        }
        self.refill();
    }

    /// Brings batches back into memory, oldest first: from the spool, then the overflow.
    /// The batches of a spool segment that cannot be read back are counted as damaged and
    /// go as empty batches.
    fn refill(&mut self) {
        while self.memory_bytes < self.max_memory {
            let spooled = match self.spool.as_mut().map(Spool::pop) {
                Some(Ok(spooled)) => spooled,
                Some(Err(damaged)) => {
                    tracing::error!("{damaged}: counted as dropped (spool damaged)");
                    for lost in damaged.lost {
                        let packets = u64::from(lost.packets);
                        let unacked = slot(&mut self.unacked_packets, lost.interface_id);
                        *unacked = unacked.saturating_sub(packets);
                        *slot(&mut self.damaged_packets, lost.interface_id) += packets;
                        self.keep_in_memory(empty_batch(lost.sequence, lost.interface_id));
                    }
                    continue;
                }
                None => None,
            };
            let out = match spooled {
                Some(s) => Outgoing {
                    sequence: s.sequence,
                    interface_id: s.interface_id,
                    batch: EncodedBatch {
                        frame: s.frame,
                        packets: s.packets,
                        // The spool keeps packet counts only: key log lines that went
                        // through it are not in the sensor's "delivered" figure.
                        tls_key_log_lines: 0,
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
    }

    /// Packets lost to damaged spool segments since the last call, by interface id.
    pub fn take_damaged(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.damaged_packets)
    }

    /// The receiver could not resume the session: the spool's state names the new one.
    pub fn set_session(&mut self, session: SessionKeys) {
        if let Some(spool) = self.spool.as_mut() {
            if let Err(e) = spool.set_session(session) {
                tracing::warn!("spool state write failed: {e}");
            }
        }
    }

    /// The session ended with everything acknowledged: the spool forgets it.
    pub fn end_session(&mut self) {
        if let Some(spool) = self.spool.take() {
            spool.finish();
        }
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

/// The counter of interface `id` in `counts`, grown to hold it.
fn slot(counts: &mut Vec<u64>, id: u16) -> &mut u64 {
    let i = usize::from(id);
    if counts.len() <= i {
        counts.resize(i + 1, 0);
    }
    &mut counts[i]
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
                tls_key_log_lines: 0,
                raw_len: len * 2,
            },
        }
    }

    fn keys(session_id: u64) -> SessionKeys {
        SessionKeys {
            session_id,
            secret: [1; 16],
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
        o.ack(1, |r| released.push(r.batch.packets));
        assert_eq!(released, [2]);
        assert_eq!(o.unacked_packets(0), 4);
        o.rewind();
        assert_eq!(sequences(&mut o), [2, 3]);
        o.ack(3, |_| {});
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
        o.ack(1, |_| {});
        assert!(o.has_room());
    }

    #[test]
    fn spills_to_the_spool_in_order_and_comes_back() {
        let dir = std::env::temp_dir().join(format!("outbox-test-{}", std::process::id()));
        crate::spool::prepare_dir(&dir).unwrap();
        let spool = Spool::open(&dir, "outbox-a", keys(7), 64 << 20).unwrap();
        let mut o = Outbox::new(250, Some(spool));
        for seq in 1..=6 {
            o.push(batch(seq, 0, 100)).unwrap();
            assert!(o.has_room());
        }
        assert_eq!(o.len(), 6);
        assert_eq!(sequences(&mut o), [1, 2, 3], "memory first");
        assert!(!o.all_sent());
        o.ack(2, |_| {});
        assert_eq!(
            sequences(&mut o),
            [4, 5],
            "refilled from the spool, oldest first"
        );
        o.push(batch(7, 0, 100)).unwrap();
        o.ack(5, |_| {});
        assert_eq!(sequences(&mut o), [6, 7]);
        o.ack(7, |_| {});
        assert!(o.is_empty());
        drop(o);

        // A spool too small for a second batch: the one it refuses waits behind it.
        let spool = Spool::open(
            &dir,
            "outbox-b",
            keys(8),
            crate::spool::HEADER_LEN as u64 + 150,
        )
        .unwrap();
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
        o.ack(1, |_| {});
        assert_eq!(sequences(&mut o), [2]);
        o.ack(2, |_| {});
        assert!(o.has_room());
        assert_eq!(sequences(&mut o), [3]);
        drop(o);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A spool segment damaged on disk: its batches are counted as lost to it and go as
    /// empty batches, so that the session has no gap; the outbox goes on.
    #[test]
    fn a_damaged_spool_segment_is_counted_and_sent_empty() {
        let dir = std::env::temp_dir().join(format!("outbox-damaged-{}", std::process::id()));
        crate::spool::prepare_dir(&dir).unwrap();
        let spool = Spool::open(&dir, "outbox-c", keys(9), 64 << 20).unwrap();
        let mut o = Outbox::new(250, Some(spool));
        for seq in 1..=5 {
            o.push(batch(seq, 1, 100)).unwrap();
        }
        assert_eq!(sequences(&mut o), [1, 2, 3]);
        // Batches 4 and 5 are in the spool's one segment: damage it.
        let segment = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "spool"))
            .unwrap();
        let mut data = std::fs::read(&segment).unwrap();
        data[40] ^= 1;
        std::fs::write(&segment, data).unwrap();
        o.ack(3, |_| {});
        assert_eq!(
            o.take_damaged(),
            [0, 4],
            "interface 1 lost 2 batches of 2 packets"
        );
        assert_eq!(o.unacked_packets(1), 0);
        let mut empty = Vec::new();
        while let Some(b) = o.next_unsent() {
            empty.push((b.sequence, b.batch.packets));
            o.mark_sent();
        }
        assert_eq!(empty, [(4, 0), (5, 0)]);
        o.push(batch(6, 1, 100)).unwrap();
        assert_eq!(sequences(&mut o), [6]);
        o.ack(6, |_| {});
        assert!(o.is_empty());
        o.end_session();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
