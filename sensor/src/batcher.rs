//! Turns a backend's packets into batch frames and hands them to the transport.
//!
//! Every capture backend feeds one [`Batcher`] from its own thread. It owns a reused
//! `protocol::BatchBuilder` (no allocation per packet), decides when a batch is done (size
//! or age), numbers it from the session-wide sequence, and sends it down a bounded channel.
//! The channel fills only when the sensor's buffer of unacknowledged batches is full. Live
//! captures never wait on it: the batch is dropped and counted ("sensor buffer full"), so
//! a slow or absent receiver cannot stall the host. File replays wait instead, so that
//! nothing is lost.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{BatchBuilder, Direction, EncodedBatch, PushOutcome};
use tokio::sync::mpsc;

use crate::stats::Counters;

/// A batch frame on its way to the transport.
#[derive(Debug)]
pub struct Outgoing {
    pub sequence: u64,
    pub interface_id: u16,
    pub batch: EncodedBatch,
}

/// What every batcher of a session shares.
#[derive(Clone)]
pub struct SessionBatching {
    /// The session's id, which the delivery loop changes when the receiver cannot resume
    /// the session.
    pub session_id: Arc<AtomicU64>,
    /// The next batch sequence number; starts at 1 and is shared by all interfaces.
    pub next_sequence: Arc<AtomicU64>,
    pub tx: mpsc::Sender<Outgoing>,
    /// Held from taking a sequence number to handing the batch over, so that batches of
    /// several threads (captures, the key log) enter the channel in sequence order.
    pub handing_over: Arc<Mutex<()>>,
    pub batch_size: usize,
    pub flush_interval: Duration,
}

impl SessionBatching {
    /// `first_sequence`: 1, or after those of a session resumed from the spool.
    pub fn new(
        session_id: Arc<AtomicU64>,
        first_sequence: u64,
        tx: mpsc::Sender<Outgoing>,
        batch_size: usize,
        flush_interval: Duration,
    ) -> Self {
        Self {
            session_id,
            next_sequence: Arc::new(AtomicU64::new(first_sequence)),
            tx,
            handing_over: Arc::default(),
            batch_size,
            flush_interval,
        }
    }
}

/// Whether a full channel makes the capture wait (files) or drop the batch (live).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backpressure {
    Wait,
    Drop,
}

/// The channel to the transport is gone: the session is over.
#[derive(Debug)]
pub struct Closed;

pub struct Batcher {
    session: SessionBatching,
    interface_id: u16,
    counters: Arc<Counters>,
    backpressure: Backpressure,
    builder: BatchBuilder,
    /// When the oldest packet of the current batch was added.
    started: Option<Instant>,
}

impl Batcher {
    pub fn new(
        session: SessionBatching,
        interface_id: u16,
        counters: Arc<Counters>,
        backpressure: Backpressure,
    ) -> Self {
        let builder = BatchBuilder::new(session.batch_size);
        Self {
            session,
            interface_id,
            counters,
            backpressure,
            builder,
            started: None,
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Adds one matched packet, sending the batch when it has reached its size.
    pub fn push(
        &mut self,
        timestamp_ns: u64,
        original_len: u32,
        direction: Direction,
        data: &[u8],
    ) -> Result<(), Closed> {
        self.push_record(|b| b.push(timestamp_ns, original_len, direction, data))
    }

    /// Adds one matched packet that `process` sent or received (`--attribute`); `key`
    /// identifies the process (see [`protocol::BatchBuilder::push_attributed`]).
    pub fn push_attributed(
        &mut self,
        timestamp_ns: u64,
        original_len: u32,
        direction: Direction,
        data: &[u8],
        key: u64,
        process: &protocol::Process,
    ) -> Result<(), Closed> {
        self.push_record(|b| {
            b.push_attributed(timestamp_ns, original_len, direction, data, key, process)
        })
    }

    /// Adds one TLS key log line (the batcher of `--keylog`, whose batches hold only
    /// those), counted as matched.
    #[cfg(unix)]
    pub fn push_tls_key_log(&mut self, timestamp_ns: u64, line: &[u8]) -> Result<(), Closed> {
        self.push_record(|b| b.push_tls_key_log(timestamp_ns, line))
    }

    fn push_record(
        &mut self,
        mut push: impl FnMut(&mut BatchBuilder) -> PushOutcome,
    ) -> Result<(), Closed> {
        self.counters.matched.fetch_add(1, Relaxed);
        if push(&mut self.builder) == PushOutcome::Full {
            self.flush(self.backpressure)?;
            // An empty builder always has room for one record of at most MAX_SNAPLEN.
            let _ = push(&mut self.builder);
        }
        if self.started.is_none() {
            self.started = Some(Instant::now());
        }
        if self.builder.is_ready() {
            self.flush(self.backpressure)?;
        }
        Ok(())
    }

    /// Sends the partial batch now: key log lines go out as soon as they are read, as the
    /// receiver must have them before the packets they decrypt.
    #[cfg(unix)]
    pub fn send_now(&mut self) -> Result<(), Closed> {
        self.flush(self.backpressure)
    }

    /// Sends a partial batch once it is older than the flush interval. Backends call it
    /// after every packet or read timeout, so quiet links still deliver.
    pub fn tick(&mut self) -> Result<(), Closed> {
        match self.started {
            Some(t) if t.elapsed() >= self.session.flush_interval => self.flush(self.backpressure),
            _ => Ok(()),
        }
    }

    /// Sends what is left, waiting for room: used when the capture ends.
    pub fn finish(mut self) -> Result<(), Closed> {
        self.flush(Backpressure::Wait)
    }

    fn flush(&mut self, backpressure: Backpressure) -> Result<(), Closed> {
        if self.builder.is_empty() {
            return Ok(());
        }
        self.started = None;
        let session = &self.session;
        // A poisoned lock guards nothing but order: go on.
        let _order = session
            .handing_over
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match backpressure {
            Backpressure::Wait => {
                let out = encode(&mut self.builder, session, self.interface_id);
                session.tx.blocking_send(out).map_err(|_| Closed)
            }
            Backpressure::Drop => match session.tx.try_reserve() {
                // Take the sequence number only once room is certain, so that dropped
                // batches leave no gap in the sequence the receiver acknowledges.
                Ok(permit) => {
                    let out = encode(&mut self.builder, session, self.interface_id);
                    permit.send(out);
                    Ok(())
                }
                Err(mpsc::error::TrySendError::Full(())) => {
                    let lost = self.builder.len();
                    self.builder.clear();
                    self.counters.drop_buffer.fetch_add(lost.into(), Relaxed);
                    Ok(())
                }
                Err(mpsc::error::TrySendError::Closed(())) => Err(Closed),
            },
        }
    }
}

/// A batch with no packets, for a sequence whose batch was lost (a damaged spool, or the
/// memory of a sensor that was killed): the session stays without a gap. The session id
/// is stamped when it is sent.
pub fn empty_batch(sequence: u64, interface_id: u16) -> Outgoing {
    Outgoing {
        sequence,
        interface_id,
        batch: BatchBuilder::new(0).finish(0, sequence, interface_id),
    }
}

fn encode(builder: &mut BatchBuilder, session: &SessionBatching, interface_id: u16) -> Outgoing {
    let sequence = session.next_sequence.fetch_add(1, Relaxed);
    let batch = builder.finish(session.session_id.load(Relaxed), sequence, interface_id);
    Outgoing {
        sequence,
        interface_id,
        batch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(cap: usize, batch_size: usize) -> (SessionBatching, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(cap);
        (
            SessionBatching::new(
                Arc::new(AtomicU64::new(7)),
                1,
                tx,
                batch_size,
                Duration::from_secs(3600),
            ),
            rx,
        )
    }

    #[test]
    fn flushes_by_size_and_numbers_batches() {
        let (s, mut rx) = session(8, 100);
        let c = Arc::new(Counters::default());
        let mut b = Batcher::new(s, 1, Arc::clone(&c), Backpressure::Wait);
        for _ in 0..3 {
            b.push(1, 60, Direction::Unknown, &[0u8; 60]).unwrap();
        }
        b.finish().unwrap();
        let seqs: Vec<(u64, u32)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|o| (o.sequence, o.batch.packets))
            .collect();
        // 77 bytes per record: the second packet crosses the 100-byte target.
        assert_eq!(seqs, [(1, 2), (2, 1)]);
        assert_eq!(c.matched.load(Relaxed), 3);
    }

    #[test]
    fn live_capture_drops_whole_batches_without_sequence_gaps() {
        let (s, mut rx) = session(1, 10);
        let c = Arc::new(Counters::default());
        let mut b = Batcher::new(s, 0, Arc::clone(&c), Backpressure::Drop);
        b.push(1, 60, Direction::Inbound, &[0u8; 60]).unwrap(); // sent
        b.push(2, 60, Direction::Inbound, &[0u8; 60]).unwrap(); // queue full: dropped
        assert_eq!(c.drop_buffer.load(Relaxed), 1);
        assert_eq!(rx.try_recv().unwrap().sequence, 1);
        b.push(3, 60, Direction::Inbound, &[0u8; 60]).unwrap();
        assert_eq!(rx.try_recv().unwrap().sequence, 2);
    }

    #[test]
    fn tick_flushes_old_partial_batches() {
        let (tx, mut rx) = mpsc::channel(4);
        let s = SessionBatching::new(
            Arc::new(AtomicU64::new(7)),
            1,
            tx,
            1 << 20,
            Duration::from_millis(1),
        );
        let mut b = Batcher::new(s, 0, Arc::default(), Backpressure::Drop);
        b.tick().unwrap();
        assert!(rx.try_recv().is_err());
        b.push(1, 60, Direction::Unknown, &[0u8; 60]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        b.tick().unwrap();
        assert_eq!(rx.try_recv().unwrap().batch.packets, 1);
    }
}
