//! Puts the packets of all sensors into one timestamp order, and tracks which batches have
//! been written so that sensors get acknowledgements.
//!
//! Each sensor interface is a source whose packets arrive in capture order. Sources are
//! merged by their running-maximum timestamp, ties broken by arrival: a source's own order
//! is kept as captured (even where its clock stepped back), and sources interleave by time.
//! A held packet is safe to write once every source has sent something at least as new (the
//! low watermark, as in a k-way merge); a source that has sent nothing yet holds the others.
//! A quiet or slow source must not hold the others back for ever, so a packet also goes out
//! once it has waited the reorder window, or when held data passes a memory bound. Packets
//! written after a newer one went out are counted as late.
//!
//! Since a source's merge keys never decrease, each source keeps its batches as they came
//! and only its next packet is in the heap: a packet costs a heap step among sources, not
//! among every packet held, and per-batch bookkeeping happens once per batch.
//!
//! TLS key log lines (batches of [`RecordKind::TlsKeyLog`] records) are not merged: they
//! go out before any packet held, as soon as they arrive, since they must precede in the
//! file the handshakes they open, which were captured before they were logged. For that,
//! the packets of a sensor that sends them wait the whole reorder window.
//!
//! No I/O of its own: it writes to the [`Sink`] it is given and reports acknowledgements as
//! values, so tests drive it with plain calls.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::io;
use std::iter::Peekable;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering::Relaxed;

use protocol::{PacketIter, RecordKind};

use crate::sink::secrets::COUNTERS as SECRETS;
use crate::sink::{BatchPosition, Frontier, OutPacket, Sink};

pub type SessionId = u64;

/// How far past the receiver's clock a packet's timestamp counts in the merge: later ones
/// are merged as if stamped then (and counted), so one far-future packet cannot make every
/// later packet late. Past timestamps are left alone: replayed files carry old ones.
pub const MAX_AHEAD: Duration = Duration::from_secs(24 * 3600);

/// A packet record's header on the wire (timestamp, lengths, direction): held memory counts
/// it, so that a batch of empty packets is not free.
const RECORD_HEADER_LEN: usize = 8 + 4 + 4 + 1;

/// A source's next packet, as the heap orders sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Head {
    /// The source's running-maximum timestamp at this packet: the merge key.
    key: u64,
    /// Arrival order: ties in time keep the order they came in.
    order: u64,
    source: usize,
}

/// A batch whose packets are not all written yet.
struct HeldBatch {
    sequence: u64,
    arrived: Instant,
    /// Arrival order of the next packet.
    order: u64,
    /// Its first records that are in the output (some by an earlier run of the receiver).
    written: u64,
    packets: Peekable<PacketIter>,
}

/// A batch of key log lines, to go out before the packets held.
struct KeyLogBatch {
    session: SessionId,
    sequence: u64,
    /// The output interface of the sensor interface it came on.
    interface: u32,
    /// Each ending in a newline.
    lines: Vec<u8>,
    count: u64,
}

/// One interface of one sensor.
struct Source {
    session: SessionId,
    /// The output interface.
    interface: u32,
    /// Running-maximum timestamp of what was taken in: the source sends nothing older.
    newest: Option<u64>,
    /// Merge key of the last packet written: the next key continues its running maximum.
    written_key: Option<u64>,
    batches: VecDeque<HeldBatch>,
    written: Written,
    /// A batch of which an earlier run wrote the first records: (sequence, records).
    resumed_partial: Option<(u64, u64)>,
    /// When it joined or last sent a batch: silent for the reorder window, it no longer
    /// holds the others back.
    heard: Instant,
    /// Its sensor sends TLS key log lines: its packets wait the whole reorder window, for
    /// the keys logged after their handshakes to overtake them.
    waits_for_keys: bool,
}

impl Source {
    /// The next packet's place in the merge, if the source holds one.
    fn head(&mut self, index: usize, latest_key: u64) -> Option<Head> {
        let batch = self.batches.front_mut()?;
        let timestamp_ns = batch.packets.peek()?.timestamp_ns.min(latest_key);
        Some(Head {
            key: self
                .written_key
                .map_or(timestamp_ns, |k| k.max(timestamp_ns)),
            order: batch.order,
            source: index,
        })
    }
}

/// What the merge knows of one connected sensor.
struct SensorInMerge {
    /// Source index for each of the sensor's interface ids.
    sources: Vec<usize>,
    /// Batches taken in whose packets are not all written.
    held_batches: usize,
    /// Batches written, above the contiguous `acked`.
    done: BTreeSet<u64>,
    acked: u64,
    ack_changed: bool,
    /// The highest batch taken in; `None` until the first, which may have any sequence (a
    /// sensor resuming with a receiver that has not seen it).
    received: Option<u64>,
    /// Away or leaving: it sends nothing for now, so it does not hold the others back.
    idle: bool,
    /// How long its batches were held, from arrival to their last packet written.
    held: BatchHolds,
}

/// How long a session's batches waited in the merge (from arrival to their last packet
/// written, after which they are acknowledged at the next flush): reported when the
/// session closes, to tell which wait holds sensors back.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchHolds {
    /// Batches written whole.
    pub batches: u64,
    /// Their waits together.
    pub total: Duration,
    /// The longest wait.
    pub longest: Duration,
}

/// Per-session totals for the exit summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub packets: u64,
    pub bytes: u64,
    pub late: u64,
    /// Written before the merge rules allowed, because held data passed the memory bound.
    pub forced: u64,
    /// Sent again after a receiver restart but written by the earlier run: not repeated.
    pub resumed: u64,
    /// Stamped more than [`MAX_AHEAD`] past the receiver's clock: merged as if stamped then.
    pub ahead: u64,
}

impl std::ops::AddAssign for Written {
    fn add_assign(&mut self, other: Self) {
        self.packets = self.packets.saturating_add(other.packets);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.late = self.late.saturating_add(other.late);
        self.forced = self.forced.saturating_add(other.forced);
        self.resumed = self.resumed.saturating_add(other.resumed);
        self.ahead = self.ahead.saturating_add(other.ahead);
    }
}

pub struct Merge {
    window: Duration,
    max_held_bytes: usize,
    /// The next packet of every source that holds one.
    heads: BinaryHeap<Reverse<Head>>,
    /// Indexed by source; `None` where a removed session's source was.
    sources: Vec<Option<Source>>,
    free_sources: Vec<usize>,
    held_bytes: usize,
    next_order: u64,
    /// Merge key of the last packet written.
    last_written_key: u64,
    /// The highest merge key: [`MAX_AHEAD`] past the clock at the last release.
    latest_key: u64,
    /// Output interfaces of sessions removed, until taken.
    closed_interfaces: Vec<u32>,
    /// Key log lines to write before anything else.
    key_logs: VecDeque<KeyLogBatch>,
    /// `--drop-secrets`: key log lines are acknowledged but not written.
    drop_secrets: bool,
    sessions: HashMap<SessionId, SensorInMerge>,
}

impl Merge {
    pub fn new(window: Duration, max_held_bytes: usize) -> Self {
        Self {
            window,
            max_held_bytes,
            heads: BinaryHeap::new(),
            sources: Vec::new(),
            free_sources: Vec::new(),
            held_bytes: 0,
            next_order: 0,
            last_written_key: 0,
            latest_key: latest_key(),
            closed_interfaces: Vec::new(),
            key_logs: VecDeque::new(),
            drop_secrets: false,
            sessions: HashMap::new(),
        }
    }

    /// `--drop-secrets`: key log lines are taken (and acknowledged) but never written.
    pub fn drop_secrets(&mut self) {
        self.drop_secrets = true;
    }

    /// The session's sensor sends TLS key log lines: its packets wait the reorder window
    /// (unless the lines are dropped anyway).
    pub fn wait_for_keys(&mut self, session: SessionId) {
        if self.drop_secrets {
            return;
        }
        if let Some(s) = self.sessions.get(&session) {
            for &index in &s.sources {
                if let Some(source) = self.sources[index].as_mut() {
                    source.waits_for_keys = true;
                }
            }
        }
    }

    /// A sensor joined; `interfaces` maps its interface ids to output interfaces. `resume`:
    /// what the output holds of it already (written by an earlier session here, or by an
    /// earlier run of the receiver): those batches, or first records of a batch, are not
    /// written again when the sensor sends them.
    pub fn add_session(&mut self, id: SessionId, interfaces: Vec<u32>, resume: Option<&Frontier>) {
        let sources = interfaces
            .into_iter()
            .enumerate()
            .map(|(interface_id, interface)| {
                let resumed_partial = resume
                    .and_then(|r| {
                        r.partial
                            .iter()
                            .find(|p| usize::from(p.interface_id) == interface_id)
                    })
                    .map(|p| (p.sequence, p.records));
                let source = Source {
                    session: id,
                    interface,
                    newest: None,
                    written_key: None,
                    batches: VecDeque::new(),
                    written: Written::default(),
                    resumed_partial,
                    heard: Instant::now(),
                    waits_for_keys: false,
                };
                match self.free_sources.pop() {
                    Some(index) => {
                        self.sources[index] = Some(source);
                        index
                    }
                    None => {
                        self.sources.push(Some(source));
                        self.sources.len() - 1
                    }
                }
            })
            .collect();
        self.sessions.insert(
            id,
            SensorInMerge {
                sources,
                held_batches: 0,
                done: resume.map_or_else(BTreeSet::new, |r| r.done.iter().copied().collect()),
                acked: resume.map_or(0, |r| r.acked),
                ack_changed: false,
                received: resume.map(|r| r.acked),
                idle: false,
                held: BatchHolds::default(),
            },
        );
    }

    /// Takes in one batch. The caller has checked the interface id against the Hello and
    /// that the sequence follows [`Self::received`].
    pub fn add_batch(
        &mut self,
        session: SessionId,
        sequence: u64,
        interface_id: u16,
        packets: PacketIter,
        now: Instant,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        // Written already (the sensor sends it again after the receiver restarted): the
        // connection passes only batches above what it was told, so only those are here.
        let in_output = s.received.is_some() && (sequence <= s.acked || s.done.contains(&sequence));
        if s.received.is_none() {
            // The first batch of a resumed session: what came before went elsewhere.
            s.acked = sequence.saturating_sub(1);
        }
        s.received = Some(sequence);
        let Some(&index) = s.sources.get(usize::from(interface_id)) else {
            return;
        };
        let Some(source) = self.sources.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        source.heard = now;
        if in_output {
            source.written.resumed = source.written.resumed.saturating_add(packets.len() as u64);
            return;
        }
        if packets.kind() == RecordKind::TlsKeyLog {
            s.held_batches += 1;
            let count = packets.len() as u64;
            let mut lines = Vec::with_capacity(packets.records_len());
            for line in packets {
                lines.extend_from_slice(&line.data);
                lines.push(b'\n');
            }
            self.held_bytes = self.held_bytes.saturating_add(lines.len());
            self.key_logs.push_back(KeyLogBatch {
                session,
                sequence,
                interface: source.interface,
                lines,
                count,
            });
            return;
        }
        let mut packets = packets;
        let mut written = 0;
        if let Some((partial, records)) = source.resumed_partial {
            if partial <= sequence {
                source.resumed_partial = None;
            }
            if partial == sequence {
                // Its first records are in the output already.
                for _ in 0..records {
                    if packets.next().is_some() {
                        written += 1;
                    }
                }
                source.written.resumed = source.written.resumed.saturating_add(written);
            }
        }
        let Some(newest) = packets.newest().filter(|_| packets.len() > 0) else {
            s.mark_done(sequence);
            return;
        };
        s.held_batches += 1;
        source.newest = Some(source.newest.map_or(newest, |n| n.max(newest)));
        self.held_bytes = self.held_bytes.saturating_add(packets.records_len());
        let order = self.next_order;
        self.next_order = self.next_order.saturating_add(packets.len() as u64);
        let was_empty = source.batches.is_empty();
        source.batches.push_back(HeldBatch {
            sequence,
            arrived: now,
            order,
            written,
            packets: packets.peekable(),
        });
        if was_empty {
            if let Some(head) = source.head(index, self.latest_key) {
                self.heads.push(Reverse(head));
            }
        }
    }

    /// Writes every held packet that may go out now.
    pub fn release(&mut self, now: Instant, sink: &mut dyn Sink) -> io::Result<()> {
        self.write_key_logs(sink)?;
        self.latest_key = latest_key();
        let watermark = self.watermark(now);
        while let Some(&Reverse(head)) = self.heads.peek() {
            let source = self.sources[head.source].as_ref();
            let waited = source
                .and_then(|s| s.batches.front())
                .is_none_or(|b| now.saturating_duration_since(b.arrived) >= self.window);
            let waits_for_keys = source.is_some_and(|s| s.waits_for_keys);
            let due = waited || (!waits_for_keys && watermark.is_some_and(|w| head.key <= w));
            if !due && self.held_bytes <= self.max_held_bytes {
                break;
            }
            self.write_next(head, sink, !due)?;
        }
        Ok(())
    }

    /// Whether the sensor is sending (connected). One that is not no longer holds the
    /// others back; its held packets still go out in order, by the usual rules, and
    /// [`Self::is_written`] tells when they all have.
    pub fn set_sending(&mut self, session: SessionId, sending: bool) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.idle = !sending;
        }
    }

    /// The highest batch sequence taken in, if any.
    pub fn received(&self, session: SessionId) -> Option<u64> {
        self.sessions.get(&session).and_then(|s| s.received)
    }

    /// Packets written of the sensor's interface `interface_id`.
    pub fn written_on(&self, session: SessionId, interface_id: u16) -> u64 {
        self.sessions
            .get(&session)
            .and_then(|s| s.sources.get(usize::from(interface_id)))
            .and_then(|&index| self.sources[index].as_ref())
            .map_or(0, |source| source.written.packets)
    }

    /// Whether every batch the session sent has been written.
    pub fn is_written(&self, session: SessionId) -> bool {
        self.sessions
            .get(&session)
            .is_none_or(|s| s.held_batches == 0)
    }

    /// The sessions it knows.
    pub fn sessions(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.keys().copied()
    }

    /// How much of the session the output holds, once what was written is flushed: the
    /// journal's record (the secret's hash is the caller's to fill in).
    pub fn frontier(&self, session: SessionId) -> Option<Frontier> {
        let s = self.sessions.get(&session)?;
        let partial = s
            .sources
            .iter()
            .enumerate()
            .filter_map(|(interface_id, &index)| {
                let source = self.sources[index].as_ref()?;
                let interface_id = u16::try_from(interface_id).ok()?;
                let (sequence, records) = match source.batches.front() {
                    Some(b) if b.written > 0 => (b.sequence, b.written),
                    _ => source.resumed_partial?,
                };
                Some(crate::sink::PartialBatch {
                    interface_id,
                    sequence,
                    records,
                })
            })
            .collect();
        Some(Frontier {
            session,
            secret_hash: [0; 32],
            acked: s.acked,
            done: s.done.iter().copied().collect(),
            partial,
        })
    }

    /// Forgets a session once it is written.
    pub fn remove_session(&mut self, session: SessionId) {
        if let Some(s) = self.sessions.remove(&session) {
            for index in s.sources {
                if let Some(source) = self.sources[index].take() {
                    self.closed_interfaces.push(source.interface);
                }
                self.free_sources.push(index);
            }
        }
    }

    /// The output interfaces of the sessions removed since the last call.
    pub fn take_closed_interfaces(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.closed_interfaces)
    }

    /// Writes the key log lines that came, each batch as one block; a batch leaves the
    /// queue only once written, so that a failing output writes it again.
    fn write_key_logs(&mut self, sink: &mut dyn Sink) -> io::Result<()> {
        while let Some(batch) = self.key_logs.front() {
            if self.drop_secrets || !sink.write_secrets(batch.interface, &batch.lines)? {
                SECRETS.not_written.fetch_add(batch.count, Relaxed);
            }
            let (session, sequence) = (batch.session, batch.sequence);
            self.held_bytes = self.held_bytes.saturating_sub(batch.lines.len());
            self.key_logs.pop_front();
            if let Some(s) = self.sessions.get_mut(&session) {
                s.held_batches -= 1;
                s.mark_done(sequence);
            }
        }
        Ok(())
    }

    /// Writes everything held: at shutdown.
    pub fn drain_all(&mut self, sink: &mut dyn Sink) -> io::Result<()> {
        self.write_key_logs(sink)?;
        while let Some(&Reverse(head)) = self.heads.peek() {
            self.write_next(head, sink, false)?;
        }
        Ok(())
    }

    /// Sessions whose contiguous acknowledged sequence moved since the last call.
    pub fn take_acks(&mut self) -> Vec<(SessionId, u64)> {
        let mut out = Vec::new();
        for (id, s) in &mut self.sessions {
            if std::mem::take(&mut s.ack_changed) {
                out.push((*id, s.acked));
            }
        }
        out
    }

    pub fn acked(&self, session: SessionId) -> u64 {
        self.sessions.get(&session).map_or(0, |s| s.acked)
    }

    pub fn written(&self, session: SessionId) -> Written {
        let mut total = Written::default();
        if let Some(s) = self.sessions.get(&session) {
            for &index in &s.sources {
                if let Some(source) = &self.sources[index] {
                    total += source.written;
                }
            }
        }
        total
    }

    /// How long the session's batches waited in the merge so far.
    pub fn batch_holds(&self, session: SessionId) -> BatchHolds {
        self.sessions
            .get(&session)
            .map_or_else(BatchHolds::default, |s| s.held)
    }

    #[cfg(test)]
    pub fn held_packets(&self) -> usize {
        self.sources
            .iter()
            .flatten()
            .flat_map(|s| &s.batches)
            .map(|b| b.packets.len())
            .sum()
    }

    /// The lowest running-maximum timestamp over the sources still sending: none of them
    /// will send anything older. `None` while one of them has sent nothing yet, as it might
    /// still send anything (the reorder window bounds that wait). With no source left,
    /// nothing can come that belongs before what is held.
    /// A source silent (nothing held, no batch) for the reorder window no longer counts:
    /// what it sends later, if older, is written late and counted.
    fn watermark(&self, now: Instant) -> Option<u64> {
        let mut low = u64::MAX;
        for s in self.sessions.values().filter(|s| !s.idle) {
            for &index in &s.sources {
                if let Some(source) = &self.sources[index] {
                    let silent = source.batches.is_empty()
                        && now.saturating_duration_since(source.heard) >= self.window;
                    if !silent {
                        low = low.min(source.newest?.min(self.latest_key));
                    }
                }
            }
        }
        Some(low)
    }

    /// Writes the packet `head` (the heap's top) and puts its source's next one in its place.
    fn write_next(&mut self, head: Head, sink: &mut dyn Sink, forced: bool) -> io::Result<()> {
        let Some(source) = self.sources[head.source].as_mut() else {
            self.heads.pop();
            return Ok(());
        };
        let Some(batch) = source.batches.front_mut() else {
            self.heads.pop();
            return Ok(());
        };
        let Some(p) = batch.packets.next() else {
            self.heads.pop();
            return Ok(());
        };
        batch.order = batch.order.saturating_add(1);
        batch.written += 1;
        sink.write_packet(&OutPacket {
            interface: source.interface,
            timestamp_ns: p.timestamp_ns,
            original_len: p.original_len,
            direction: p.direction,
            data: &p.data,
            batch: BatchPosition {
                sequence: batch.sequence,
                // Counted just above: this packet is the batch's `written`th.
                record: u32::try_from(batch.written - 1).unwrap_or(u32::MAX),
            },
            process: p.process.as_deref(),
        })?;
        self.held_bytes = self
            .held_bytes
            .saturating_sub(RECORD_HEADER_LEN + p.data.len());
        let late = head.key < self.last_written_key;
        let ahead = p.timestamp_ns > self.latest_key;
        // One far-future packet must not make every other source's packets late.
        if !late && !ahead {
            self.last_written_key = head.key;
        }
        source.written_key = Some(head.key);
        let w = &mut source.written;
        w.packets = w.packets.saturating_add(1);
        w.bytes = w.bytes.saturating_add(p.data.len() as u64);
        w.forced = w.forced.saturating_add(u64::from(forced));
        w.late = w.late.saturating_add(u64::from(late));
        w.ahead = w.ahead.saturating_add(u64::from(ahead));
        if batch.packets.peek().is_none() {
            let sequence = batch.sequence;
            sink.end_batch(source.interface, sequence)?;
            let held = batch.arrived.elapsed();
            source.batches.pop_front();
            // A session is removed only once all its packets are written, so it is here.
            if let Some(s) = self.sessions.get_mut(&source.session) {
                s.held_batches -= 1;
                s.held.batches += 1;
                s.held.total += held;
                s.held.longest = s.held.longest.max(held);
                s.mark_done(sequence);
            }
        }
        match source.head(head.source, self.latest_key) {
            Some(next) => {
                if let Some(mut top) = self.heads.peek_mut() {
                    *top = Reverse(next);
                }
            }
            None => {
                self.heads.pop();
            }
        }
        Ok(())
    }
}

/// The clock now plus [`MAX_AHEAD`], in nanoseconds since the epoch.
fn latest_key() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from((now + MAX_AHEAD).as_nanos()).unwrap_or(u64::MAX)
}

impl SensorInMerge {
    fn mark_done(&mut self, sequence: u64) {
        self.done.insert(sequence);
        while let Some(next) = self.acked.checked_add(1) {
            if !self.done.remove(&next) {
                break;
            }
            self.acked = next;
            self.ack_changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{PartialBatch, Sink, SinkInterface};
    use protocol::{BatchBuilder, Direction, InterfaceStats, Message};

    /// Records what would be written.
    #[derive(Default)]
    struct Recorder(Vec<(u32, u64)>);

    impl Sink for Recorder {
        fn check(&self, _: &[SinkInterface]) -> Result<(), crate::sink::Refusal> {
            Ok(())
        }
        fn add_interface(&mut self, _: &SinkInterface) -> io::Result<u32> {
            Ok(0)
        }
        fn write_packet(&mut self, p: &OutPacket) -> io::Result<()> {
            self.0.push((p.interface, p.timestamp_ns));
            Ok(())
        }
        fn write_stats(&mut self, _: u32, _: &InterfaceStats) -> io::Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn finish(self: Box<Self>) -> io::Result<()> {
            Ok(())
        }
    }

    fn packets(times: &[u64]) -> PacketIter {
        let mut b = BatchBuilder::new(1 << 20);
        for &t in times {
            let _ = b.push(t, 60, Direction::Unknown, &[0u8; 60]);
        }
        decoded(&mut b)
    }

    /// The records of the builder's batch, as the receiver decodes them.
    fn decoded(b: &mut BatchBuilder) -> PacketIter {
        let frame = b.finish(1, 1, 0).frame;
        let mut buf = bytes::BytesMut::from(&frame[..]);
        match protocol::decode_frame(&mut buf) {
            Ok(Some(Message::Batch(batch))) => batch.packets().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    const WINDOW: Duration = Duration::from_secs(1);

    /// Records key log blocks as (u32::MAX, lines) beside the packets.
    #[derive(Default)]
    struct KeyRecorder(Recorder);

    impl Sink for KeyRecorder {
        fn check(&self, i: &[SinkInterface]) -> Result<(), crate::sink::Refusal> {
            self.0.check(i)
        }
        fn add_interface(&mut self, i: &SinkInterface) -> io::Result<u32> {
            self.0.add_interface(i)
        }
        fn write_packet(&mut self, p: &OutPacket) -> io::Result<()> {
            self.0.write_packet(p)
        }
        fn write_secrets(&mut self, _: u32, lines: &[u8]) -> io::Result<bool> {
            let count = lines.iter().filter(|&&b| b == b'\n').count();
            self.0 .0.push((u32::MAX, count as u64));
            Ok(true)
        }
        fn write_stats(&mut self, i: u32, s: &InterfaceStats) -> io::Result<()> {
            self.0.write_stats(i, s)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn finish(self: Box<Self>) -> io::Result<()> {
            Ok(())
        }
    }

    fn key_lines(n: usize) -> PacketIter {
        let mut b = BatchBuilder::new(1 << 20);
        for i in 0..n {
            let _ = b.push_tls_key_log(1, format!("CLIENT_RANDOM {i:064x} 00").as_bytes());
        }
        decoded(&mut b)
    }

    #[test]
    fn key_lines_overtake_the_packets_of_a_sensor_that_waits_for_them() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        let mut out = KeyRecorder::default();
        m.add_session(1, vec![0], None);
        m.wait_for_keys(1);
        // The handshake, then its keys, logged after it.
        m.add_batch(1, 1, 0, packets(&[10, 20]), t0);
        m.release(t0, &mut out).unwrap();
        assert!(out.0 .0.is_empty(), "its own watermark does not release it");
        m.add_batch(1, 2, 0, key_lines(3), t0 + WINDOW / 2);
        m.release(t0 + WINDOW / 2, &mut out).unwrap();
        assert_eq!(out.0 .0, [(u32::MAX, 3)]);
        assert_eq!(m.take_acks(), []);
        m.release(t0 + WINDOW, &mut out).unwrap();
        assert_eq!(out.0 .0, [(u32::MAX, 3), (0, 10), (0, 20)]);
        assert_eq!(m.take_acks(), [(1, 2)]);
        assert!(m.is_written(1));
    }

    #[test]
    fn dropped_key_lines_are_acknowledged_and_hold_nothing() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        m.drop_secrets();
        let mut out = KeyRecorder::default();
        m.add_session(1, vec![0], None);
        m.wait_for_keys(1);
        m.add_batch(1, 1, 0, key_lines(2), t0);
        m.add_batch(1, 2, 0, packets(&[10]), t0);
        m.release(t0, &mut out).unwrap();
        assert_eq!(out.0 .0, [(0, 10)]);
        assert_eq!(m.take_acks(), [(1, 2)]);
    }

    #[test]
    fn two_sources_come_out_in_time_order() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        m.add_batch(1, 1, 0, packets(&[10, 30, 50]), t0);
        m.release(t0, &mut out).unwrap();
        assert!(
            out.0.is_empty(),
            "session 2 has sent nothing yet: hold everything"
        );
        m.add_batch(2, 1, 0, packets(&[20, 40]), t0);
        m.release(t0, &mut out).unwrap();
        assert_eq!(out.0, [(0, 10), (1, 20), (0, 30), (1, 40)]);
        assert_eq!(m.take_acks(), [(2, 1)]);
        m.add_batch(2, 2, 0, packets(&[60]), t0);
        m.release(t0, &mut out).unwrap();
        assert_eq!(out.0[4..], [(0, 50)]);
        let mut acks = m.take_acks();
        acks.sort();
        assert_eq!(acks, [(1, 1)]);
    }

    #[test]
    fn a_source_keeps_its_own_order_when_its_clock_steps_back() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        m.add_batch(1, 1, 0, packets(&[10, 40, 20, 50]), t0);
        m.add_batch(2, 1, 0, packets(&[30, 45, 60]), t0);
        m.release(t0, &mut out).unwrap();
        // Source 0 as captured (40 before 20); source 1 interleaved by running maximum.
        assert_eq!(
            out.0,
            [(0, 10), (1, 30), (0, 40), (0, 20), (1, 45), (0, 50)]
        );
        assert_eq!((m.written(1).late, m.written(2).late), (0, 0));
    }

    #[test]
    fn a_quiet_source_holds_others_only_for_the_window() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        m.add_batch(2, 1, 0, packets(&[5]), t0);
        m.add_batch(1, 1, 0, packets(&[10, 20]), t0);
        m.release(t0, &mut out).unwrap();
        assert_eq!(out.0, [(1, 5)]);
        m.release(t0 + WINDOW / 2, &mut out).unwrap();
        assert_eq!(out.0.len(), 1);
        m.release(t0 + WINDOW, &mut out).unwrap();
        assert_eq!(out.0, [(1, 5), (0, 10), (0, 20)]);
    }

    #[test]
    fn late_packets_are_written_and_counted() {
        let t0 = Instant::now();
        let mut m = Merge::new(Duration::ZERO, usize::MAX);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        m.add_batch(1, 1, 0, packets(&[100]), t0);
        m.release(t0, &mut out).unwrap();
        m.add_batch(2, 1, 0, packets(&[50]), t0);
        m.release(t0, &mut out).unwrap();
        assert_eq!(out.0, [(0, 100), (1, 50)]);
        assert_eq!(m.written(2).late, 1);
        assert_eq!(m.written(1).late, 0);
    }

    #[test]
    fn memory_bound_forces_packets_out() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, 100);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        m.add_batch(1, 1, 0, packets(&[1, 2, 3]), t0);
        m.release(t0, &mut out).unwrap();
        assert_eq!(
            out.0.len(),
            2,
            "180 bytes held, bound 100: oldest go until under it"
        );
        assert_eq!(m.held_packets(), 1);
    }

    #[test]
    fn a_leaving_session_no_longer_holds_others_and_is_written_in_order() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        m.add_batch(1, 1, 0, packets(&[10]), t0);
        m.add_batch(1, 2, 0, packets(&[]), t0);
        m.add_batch(1, 3, 0, packets(&[30]), t0);
        m.add_batch(2, 1, 0, packets(&[20]), t0);
        m.release(t0, &mut out).unwrap();
        assert_eq!(out.0, [(0, 10), (1, 20)]);
        // Session 1 leaves; session 2 still has packets older than 30 on their way.
        m.set_sending(1, false);
        m.release(t0, &mut out).unwrap();
        assert!(
            !m.is_written(1),
            "30 waits: session 2 may still send older packets"
        );
        m.add_batch(2, 2, 0, packets(&[25, 35]), t0);
        m.release(t0, &mut out).unwrap();
        // Session 2 is the only one still sending: its own packets go out at once.
        assert_eq!(out.0[2..], [(1, 25), (0, 30), (1, 35)]);
        assert!(m.is_written(1));
        assert_eq!(m.acked(1), 3);
        m.remove_session(1);
        assert_eq!((m.written(1).late, m.written(2).late), (0, 0));
    }

    #[test]
    fn acks_stay_contiguous_when_batches_finish_out_of_order() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        let mut out = Recorder::default();
        // One sensor, two interfaces; batch 2 (eth1) is older than batch 1 (eth0).
        m.add_session(1, vec![0, 1], None);
        m.add_batch(1, 1, 0, packets(&[50]), t0);
        m.add_batch(1, 2, 1, packets(&[10]), t0);
        m.release(t0, &mut out).unwrap();
        assert_eq!(out.0, [(1, 10)]);
        assert!(
            m.take_acks().is_empty(),
            "batch 2 is written but batch 1 is not"
        );
        m.release(t0 + WINDOW, &mut out).unwrap();
        assert_eq!(m.take_acks(), [(1, 2)]);
    }

    #[test]
    fn a_session_may_start_or_resume_at_any_sequence() {
        let t0 = Instant::now();
        let mut m = Merge::new(Duration::ZERO, usize::MAX);
        let mut out = Recorder::default();
        // Resumed here: batches up to 4 were written before.
        m.add_session(
            1,
            vec![0],
            Some(&Frontier {
                acked: 4,
                ..Frontier::default()
            }),
        );
        assert_eq!((m.acked(1), m.received(1)), (4, Some(4)));
        // New here, but its earlier batches went to another receiver.
        m.add_session(2, vec![1], None);
        m.add_batch(1, 5, 0, packets(&[10]), t0);
        m.add_batch(2, 40, 0, packets(&[20]), t0);
        m.release(t0, &mut out).unwrap();
        let mut acks = m.take_acks();
        acks.sort();
        assert_eq!(acks, [(1, 5), (2, 40)]);
        assert_eq!((m.written_on(2, 0), m.written_on(2, 1)), (1, 0));
    }

    /// After a restart, what the earlier run wrote (whole batches, a batch's first records)
    /// is not written again when the sensor resends it, nor counted as duplicates.
    #[test]
    fn a_resumed_session_skips_what_an_earlier_run_wrote() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        let mut out = Recorder::default();
        let resume = Frontier {
            session: 1,
            secret_hash: [1; 32],
            acked: 2,
            done: vec![4],
            partial: vec![PartialBatch {
                interface_id: 0,
                sequence: 3,
                records: 2,
            }],
        };
        m.add_session(1, vec![0, 1], Some(&resume));
        let mut expected = resume.clone();
        expected.secret_hash = [0; 32];
        assert_eq!(
            m.frontier(1),
            Some(expected),
            "kept until the sensor resends"
        );
        assert_eq!(m.received(1), Some(2));
        m.add_batch(1, 3, 0, packets(&[10, 20, 30, 40]), t0);
        // Partly written now: two records of batch 3 (the earlier run's) are in.
        assert_eq!(m.frontier(1).unwrap().partial, resume.partial);
        m.add_batch(1, 4, 1, packets(&[25]), t0);
        m.add_batch(1, 5, 1, packets(&[50]), t0);
        m.drain_all(&mut out).unwrap();
        assert_eq!(out.0, [(0, 30), (0, 40), (1, 50)]);
        assert_eq!(m.take_acks(), [(1, 5)]);
        let written = m.written(1);
        assert_eq!((written.packets, written.resumed), (3, 3));
        let frontier = m.frontier(1).unwrap();
        assert_eq!(
            (frontier.acked, frontier.done, frontier.partial),
            (5, vec![], vec![])
        );
    }

    /// The frontier of a batch written in part: its first records.
    #[test]
    fn the_frontier_names_a_batch_written_in_part() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, 0);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        m.add_batch(1, 7, 0, packets(&[1, 2, 3]), t0);
        // Over the memory bound: all go but for want of a sink that takes them.
        m.write_next(m.heads.peek().unwrap().0, &mut out, true)
            .unwrap();
        let frontier = m.frontier(1).unwrap();
        assert_eq!(frontier.acked, 6);
        assert_eq!(
            frontier.partial,
            [PartialBatch {
                interface_id: 0,
                sequence: 7,
                records: 1
            }]
        );
    }

    /// Held memory counts each record's header: empty packets are not free.
    #[test]
    fn empty_packets_count_toward_held_bytes() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        let mut b = BatchBuilder::new(1 << 20);
        for t in 0..100 {
            let _ = b.push(t, 0, Direction::Unknown, &[]);
        }
        let frame = b.finish(1, 1, 0).frame;
        let mut buf = bytes::BytesMut::from(&frame[..]);
        let Ok(Some(Message::Batch(batch))) = protocol::decode_frame(&mut buf) else {
            panic!("a batch");
        };
        m.add_batch(1, 1, 0, batch.packets().unwrap(), t0);
        assert_eq!(m.held_bytes, 100 * RECORD_HEADER_LEN);
        let mut out = Recorder::default();
        m.drain_all(&mut out).unwrap();
        assert_eq!(m.held_bytes, 0);
    }

    /// A connected source that never sends holds the others for the reorder window from
    /// when it joined, not for ever: after that, packets go out as the watermark allows,
    /// without each waiting the window.
    #[test]
    fn a_silent_source_stops_holding_the_others_after_the_window() {
        let t0 = Instant::now();
        let mut m = Merge::new(WINDOW, usize::MAX);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        let later = t0 + 2 * WINDOW;
        m.add_batch(1, 1, 0, packets(&[10, 20]), later);
        m.release(later, &mut out).unwrap();
        assert_eq!(out.0, [(0, 10), (0, 20)], "out at once, not a window later");
    }

    /// A packet stamped far in the future is merged as if stamped a day ahead, counted, and
    /// does not make the packets after it late once the clock reaches them.
    #[test]
    fn far_future_timestamps_are_clamped_and_counted() {
        let t0 = Instant::now();
        let mut m = Merge::new(Duration::ZERO, usize::MAX);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_session(2, vec![1], None);
        m.add_batch(1, 1, 0, packets(&[u64::MAX - 1]), t0);
        m.drain_all(&mut out).unwrap();
        m.add_batch(2, 1, 0, packets(&[30]), t0);
        m.drain_all(&mut out).unwrap();
        assert_eq!(out.0, [(0, u64::MAX - 1), (1, 30)], "written as sent");
        assert_eq!(m.written(1).ahead, 1);
        assert_eq!(
            m.written(2).late,
            0,
            "the other sensor's packets are not late"
        );
    }

    /// Hostile sequence numbers and counters saturate instead of overflowing (a panic in a
    /// debug build would stop the writer).
    #[test]
    fn a_last_sequence_of_u64_max_does_not_overflow() {
        let t0 = Instant::now();
        let mut m = Merge::new(Duration::ZERO, usize::MAX);
        let mut out = Recorder::default();
        m.add_session(1, vec![0], None);
        m.add_batch(1, u64::MAX, 0, packets(&[1]), t0);
        m.add_batch(1, u64::MAX, 0, packets(&[]), t0);
        m.release(t0, &mut out).unwrap();
        assert_eq!(m.acked(1), u64::MAX);
        let mut total = Written {
            packets: u64::MAX,
            ..Written::default()
        };
        total += m.written(1);
        assert_eq!(total.packets, u64::MAX);
    }
}
