//! The one task that owns the output: it registers sensors, feeds the merge, writes, and
//! tells each connection how far it has been written.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use program::names::{clean, sensor_label, sensor_name};
use protocol::{Hello, InterfaceInfo, PacketIter, Stats};
use tokio::sync::{mpsc, oneshot, watch};

use crate::merge::{Merge, SessionId};
use crate::sink::{Frontier, Refusal, Sink, SinkInterface};
use crate::stats::{Received, SensorSummary};
use crate::telemetry::{Figures, SessionSeries, Telemetry};

/// How often held packets are looked at when no event arrives.
const TICK: Duration = Duration::from_millis(50);
/// Held data beyond this goes out early (counted as late if it overtakes anything).
const MAX_HELD_BYTES: usize = 128 << 20;
/// Events handled in one round before writing and flushing.
const ROUND: usize = 256;

/// Which connection an event comes from: a session that reconnected ignores its old ones.
pub type ConnId = u64;

/// What connections tell the writer.
pub enum Event {
    /// A sensor said Hello; the reply says whether the output can take it.
    Joined {
        conn: ConnId,
        hello: Box<Hello>,
        /// The name in its verified client certificate, which names it in the output.
        identity: Option<String>,
        peer: SocketAddr,
        reply: oneshot::Sender<Result<Attached, JoinRefusal>>,
    },
    Batch {
        session: SessionId,
        conn: ConnId,
        sequence: u64,
        interface_id: u16,
        packets: PacketIter,
        raw_len: usize,
        wire_len: usize,
    },
    /// The sensor's counters, sent about once a second, with the connection's QUIC
    /// round-trip time then.
    Stats {
        session: SessionId,
        conn: ConnId,
        stats: Stats,
        rtt: Duration,
    },
    /// The connection ended without Goodbye: the session waits for the sensor to come back
    /// (for [`SESSION_LINGER`]).
    Detached {
        session: SessionId,
        conn: ConnId,
        duplicates: u64,
    },
    /// The sensor said Goodbye, or the receiver is stopping: write all of it; `done` gets
    /// the final acknowledged sequence once that is in the output.
    Left {
        session: SessionId,
        conn: ConnId,
        duplicates: u64,
        done: oneshot::Sender<u64>,
    },
}

/// The writer's answer to a Hello it accepted.
pub struct Attached {
    /// Every batch up to this one is in the output: where the sensor resumes.
    pub acked: u64,
    /// The highest batch received (possibly not yet written); `None` for a new session,
    /// which may start at any sequence. Batches up to it are duplicates.
    pub received: Option<u64>,
    /// Later acknowledgements. Closed when a newer connection takes the session over.
    pub acks: watch::Receiver<u64>,
}

/// Why the writer did not take a sensor in: each maps to the error code that tells the
/// sensor what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinRefusal {
    /// The output cannot hold the sensor's link type.
    LinkType(String),
    /// The output cannot take the sensor now (cannot be written, too many sessions): the
    /// sensor keeps its data and tries again.
    Unavailable(String),
    /// The session cannot be resumed (ended, or another sensor's): the sensor starts a new
    /// session and sends what it holds there.
    Session(String),
}

impl std::fmt::Display for JoinRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LinkType(why) | Self::Unavailable(why) | Self::Session(why) => f.write_str(why),
        }
    }
}

/// Sessions open at once (connected or awaited), and from one source (the name in a
/// client certificate, else the peer's address). Past either, the oldest session of that
/// scope that is away is closed to make room; if none is away, the sensor is told to come
/// back later.
pub const MAX_SESSIONS: usize = 1024;
pub const MAX_SESSIONS_PER_SOURCE: usize = 32;
/// Exit-summary lines kept one per session; sessions beyond are added up in one line.
const MAX_SUMMARIES: usize = 1024;

/// How long a sensor whose connection broke may come back and resume its session before
/// the session is closed (its counters written, its summary line made).
pub const SESSION_LINGER: Duration = Duration::from_secs(600);
/// Sessions that ended cleanly are remembered (their last acknowledged batch) this many,
/// so that a sensor whose final Ack was lost resumes rather than sending duplicates.
const FINISHED_REMEMBERED: usize = 4096;
/// How often a failing output is tried again, and how often it is reported meanwhile.
const OUTPUT_RETRY: Duration = Duration::from_secs(1);
const OUTPUT_REPORT: Duration = Duration::from_secs(30);

struct Sensor {
    label: String,
    /// The name in its client certificate: only the same certificate name may resume it.
    identity: Option<String>,
    /// SHA-256 of the secret the session was opened with: only a Hello with the same
    /// secret resumes it. The secret itself is not kept.
    secret_hash: [u8; 32],
    /// Who opened it, for the per-source cap.
    source: Source,
    announced: Vec<InterfaceInfo>,
    interfaces: Vec<u32>,
    acks: watch::Sender<u64>,
    /// The connection it is attached to; `None` while it is away.
    conn: Option<ConnId>,
    detached_at: Option<Instant>,
    /// Said goodbye (or the receiver stops): to be closed once written.
    leaving: Option<oneshot::Sender<u64>>,
    received: Received,
    stats: Option<Stats>,
    /// QUIC round-trip time when its statistics last came.
    rtt: Duration,
    series: SessionSeries,
}

impl Sensor {
    fn figures(&self, written: crate::merge::Written) -> Figures<'_> {
        Figures {
            written,
            received: self.received,
            stats: self.stats.as_ref(),
            rtt: self.rtt,
        }
    }
}

pub struct Writer {
    sink: Box<dyn Sink>,
    /// Output errors are waited out (a file: disk full) rather than fatal (a pipe).
    retry_output: bool,
    merge: Merge,
    sensors: HashMap<SessionId, Sensor>,
    finished: HashMap<SessionId, u64>,
    /// Closed sessions whose connection waits for the final Ack, sent once committed.
    to_notify: Vec<(oneshot::Sender<u64>, u64)>,
    summaries: Vec<SensorSummary>,
    /// The sessions closed beyond [`MAX_SUMMARIES`], added up.
    summaries_beyond: SummariesBeyond,
    telemetry: Telemetry,
    /// Sessions an earlier run of the receiver wrote (from the output's journal), until
    /// their sensors come back or [`SESSION_LINGER`] has passed.
    resumable: HashMap<SessionId, (Frontier, Instant)>,
    /// The test-only fault point: abort after this many flushes that wrote something.
    abort_after_flush: Option<u64>,
    flushes: u64,
    secrets: Secrets,
    /// That the output cannot hold keys was said.
    /// A sensor's keys were met with [`Secrets::CannotHold`] or [`Secrets::WriteSome`],
    /// and that was said.
    said_of_keys: bool,
}

/// What becomes of the TLS key log lines sensors send (`--keylog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Written (pcapng) ahead of the packets they decrypt, which wait the reorder window.
    Write,
    /// Written, but not to every output (the lake beside a classic pcap file): said once.
    WriteSome(&'static str),
    /// `--drop-secrets`: acknowledged, counted, never written.
    Drop,
    /// The output cannot hold them (classic pcap, the live stream): counted, said once.
    CannotHold(&'static str),
}

/// The environment variable of the fault point, for tests only:
/// `abort-after-flush:N` makes the receiver abort right after its Nth flush that wrote
/// something, before acknowledging it (as a crash between write and acknowledgement).
pub const FAULT_ENV: &str = "CAPSTREAM_FAULT";

impl Writer {
    pub fn new(mut sink: Box<dyn Sink>, reorder_window: Duration, retry_output: bool) -> Self {
        let loaded = Instant::now();
        let resumable: HashMap<SessionId, (Frontier, Instant)> = sink
            .take_recovered()
            .into_iter()
            .map(|f| (f.session, (f, loaded)))
            .collect();
        if !resumable.is_empty() {
            tracing::info!(
                "the output's journal names {} sensor session(s) that may resume where the \
                 previous run left them",
                resumable.len()
            );
        }
        Self {
            sink,
            retry_output,
            merge: Merge::new(reorder_window, MAX_HELD_BYTES),
            sensors: HashMap::new(),
            finished: HashMap::new(),
            to_notify: Vec::new(),
            summaries: Vec::new(),
            summaries_beyond: SummariesBeyond::default(),
            telemetry: Telemetry::new(),
            resumable,
            abort_after_flush: fault_point(),
            flushes: 0,
            secrets: Secrets::Write,
            said_of_keys: false,
        }
    }

    /// What to do with TLS key log lines (by default, write them).
    pub fn with_secrets(mut self, secrets: Secrets) -> Self {
        if secrets != Secrets::Write {
            self.merge.drop_secrets();
        }
        self.secrets = secrets;
        self
    }

    /// Runs until every connection has let go of its sender, then writes out everything
    /// and completes the file. `stop` turns true when the receiver is stopping.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Vec<SensorSummary>> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { break };
                    self.handle(event)?;
                    // Take what else is ready, so that writes and flushes come in rounds.
                    for _ in 0..ROUND {
                        match events.try_recv() {
                            Ok(event) => self.handle(event)?,
                            Err(_) => break,
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            self.merge
                .release(Instant::now(), self.sink.as_mut())
                .context("writing the output")?;
            self.close_finished_sessions(Instant::now())?;
            self.commit(&mut stop).await?;
            self.acknowledge();
            // Once their last packets and counters are in: the output forgets them.
            let closed = self.merge.take_closed_interfaces();
            if !closed.is_empty() {
                self.sink.close_interfaces(&closed);
            }
            self.publish(Instant::now());
        }
        self.merge
            .drain_all(self.sink.as_mut())
            .context("writing the output")?;
        let ids: Vec<SessionId> = self.sensors.keys().copied().collect();
        for id in ids {
            self.close_session(id)?;
        }
        self.commit(&mut stop).await?;
        self.acknowledge();
        let (merge, sensors, resumable) = (&self.merge, &self.sensors, &self.resumable);
        self.sink
            .close_journal(&mut |out| collect_frontiers(merge, sensors, resumable, out))
            .context("closing the output's journal")?;
        self.sink.finish().context("completing the output")?;
        let mut summaries = self.summaries;
        summaries.extend(self.summaries_beyond.into_summary());
        Ok(summaries)
    }

    fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Joined {
                conn,
                hello,
                identity,
                peer,
                reply,
            } => {
                let _ = reply.send(self.join(conn, &hello, identity, peer));
            }
            Event::Batch {
                session,
                conn,
                sequence,
                interface_id,
                packets,
                raw_len,
                wire_len,
            } => {
                let Some(s) = self.sensors.get_mut(&session) else {
                    return Ok(());
                };
                // A connection that was taken over: the new one sends this batch again.
                if s.conn != Some(conn) {
                    return Ok(());
                }
                s.received.batches += 1;
                s.received.raw_bytes += raw_len as u64;
                s.received.wire_bytes += wire_len as u64;
                self.merge
                    .add_batch(session, sequence, interface_id, packets, Instant::now());
            }
            Event::Stats {
                session,
                conn,
                stats,
                rtt,
            } => {
                if let Some(s) = self.sensors.get_mut(&session) {
                    if s.conn == Some(conn) {
                        for i in &stats.interfaces {
                            if let Some(&idx) = s.interfaces.get(usize::from(i.interface_id)) {
                                self.sink.update_stats(idx, i);
                            }
                        }
                        s.stats = Some(stats);
                        s.rtt = rtt;
                    }
                }
            }
            Event::Detached {
                session,
                conn,
                duplicates,
            } => {
                if let Some(s) = self.sensors.get_mut(&session) {
                    s.received.duplicates += duplicates;
                    if s.conn == Some(conn) {
                        s.conn = None;
                        s.detached_at = Some(Instant::now());
                        // Away, it sends nothing: it no longer holds the others back.
                        self.merge.set_sending(session, false);
                    }
                }
            }
            Event::Left {
                session,
                conn,
                duplicates,
                done,
            } => {
                let Some(s) = self.sensors.get_mut(&session) else {
                    return Ok(());
                };
                s.received.duplicates += duplicates;
                if s.conn == Some(conn) {
                    // Its packets go out by the usual rules, not at once: other sensors
                    // may still have older packets on their way. The reorder window
                    // bounds the wait for the final Ack.
                    self.merge.set_sending(session, false);
                    s.leaving = Some(done);
                }
            }
        }
        Ok(())
    }

    /// Takes a sensor in: a new session, or one coming back.
    fn join(
        &mut self,
        conn: ConnId,
        hello: &Hello,
        identity: Option<String>,
        peer: SocketAddr,
    ) -> Result<Attached, JoinRefusal> {
        let session = hello.session_id;
        let secret_hash = secret_hash(&hello.session_secret);
        let tag = session_tag(session);
        if let Some(s) = self.sensors.get_mut(&session) {
            // Whoever opened the session, and only they, may take it over: the same
            // certificate name and the same secret.
            if s.identity != identity || !same_hash(&s.secret_hash, &secret_hash) {
                return Err(JoinRefusal::Session(format!(
                    "session {tag} belongs to another sensor; start a new session"
                )));
            }
            if s.announced != hello.interfaces {
                return Err(JoinRefusal::Session(format!(
                    "session {tag} is already open with other interfaces; start a new session"
                )));
            }
            if s.leaving.is_some() {
                return Err(JoinRefusal::Session(format!(
                    "session {tag} has ended; start a new one"
                )));
            }
            // A newer connection takes over; the old one's watch closes and it ends.
            let (acks_tx, acks) = watch::channel(self.merge.acked(session));
            s.acks = acks_tx;
            s.conn = Some(conn);
            s.detached_at = None;
            s.received.reconnects += 1;
            self.merge.set_sending(session, true);
            tracing::info!("{}: resumed from {peer}", s.label);
            return Ok(Attached {
                acked: self.merge.acked(session),
                received: self.merge.received(session),
                acks,
            });
        }
        let host = clean(&hello.hostname);
        let sensor = sensor_name(hello, identity.as_deref());
        // A certificate's name, being verified, names the interfaces; else the hostname the
        // sensor gives (kept as data in the description either way).
        let owner = identity.as_ref().map_or(&host, |_| &sensor);
        let verified = if identity.is_some() {
            " (client certificate)"
        } else {
            ""
        };
        let wanted: Vec<SinkInterface> = hello
            .interfaces
            .iter()
            .map(|i| SinkInterface {
                name: format!("{owner}/{}", clean(&i.name)),
                link_type: i.link_type,
                snaplen: i.snaplen,
                filter: clean(&i.filter),
                description: format!(
                    "sensor {sensor}{verified} on {host} ({}), session {tag}",
                    clean(&hello.os),
                ),
                sensor: sensor.clone(),
                session: tag.clone(),
                session_id: session,
            })
            .collect();
        self.sink.check(&wanted).map_err(|refusal| match refusal {
            Refusal::LinkType(why) => JoinRefusal::LinkType(why),
            Refusal::Full(why) => JoinRefusal::Unavailable(why),
        })?;
        // A session that ended here before, or that an earlier run wrote: what it had
        // delivered stays delivered (for the holder of its secret only).
        let resume = self.resume_point(session, &secret_hash)?;
        let source = Source::of(identity.as_deref(), peer);
        self.make_room(&source)?;
        let mut interfaces = Vec::with_capacity(wanted.len());
        for w in &wanted {
            let idx = self.sink.add_interface(w).map_err(|e| {
                JoinRefusal::Unavailable(format!("the receiver cannot write its output: {e}"))
            })?;
            interfaces.push(idx);
        }
        self.merge
            .add_session(session, interfaces.clone(), resume.as_ref());
        if hello.tls_key_log {
            match self.secrets {
                Secrets::Write => self.merge.wait_for_keys(session),
                Secrets::Drop => {}
                Secrets::WriteSome(which) => {
                    self.merge.wait_for_keys(session);
                    if !std::mem::replace(&mut self.said_of_keys, true) {
                        tracing::warn!(
                            "{} sends TLS keys (--keylog): {which}",
                            sensor_label(hello, identity.as_deref(), peer)
                        );
                    }
                }
                Secrets::CannotHold(why) => {
                    if !std::mem::replace(&mut self.said_of_keys, true) {
                        tracing::warn!(
                            "{} sends TLS keys (--keylog), but {why}: they are not written",
                            sensor_label(hello, identity.as_deref(), peer)
                        );
                    }
                }
            }
        }
        let acked = resume.as_ref().map_or(0, |r| r.acked);
        let (acks_tx, acks) = watch::channel(acked);
        self.sensors.insert(
            session,
            Sensor {
                label: sensor_label(hello, identity.as_deref(), peer),
                identity,
                secret_hash,
                source,
                announced: hello.interfaces.clone(),
                interfaces,
                acks: acks_tx,
                conn: Some(conn),
                detached_at: None,
                leaving: None,
                received: Received::default(),
                stats: None,
                rtt: Duration::ZERO,
                series: SessionSeries::new(&sensor, tag),
            },
        );
        Ok(Attached {
            acked,
            received: resume.map(|r| r.acked),
            acks,
        })
    }

    /// Room for one more session of `source` under [`MAX_SESSIONS`] and
    /// [`MAX_SESSIONS_PER_SOURCE`]: the oldest session away (of that source, else of any)
    /// is closed for it; with none away, the sensor is told to come back later.
    fn make_room(&mut self, source: &Source) -> Result<(), JoinRefusal> {
        let of_source = self
            .sensors
            .values()
            .filter(|s| &s.source == source)
            .count();
        let scope = if of_source >= MAX_SESSIONS_PER_SOURCE {
            Some(source)
        } else if self.sensors.len() >= MAX_SESSIONS {
            None
        } else {
            return Ok(());
        };
        let oldest_away = self
            .sensors
            .iter()
            .filter(|(_, s)| scope.is_none_or(|scope| &s.source == scope))
            .filter_map(|(id, s)| s.detached_at.map(|t| (t, *id)))
            .min();
        let Some((_, id)) = oldest_away else {
            return Err(JoinRefusal::Unavailable(match scope {
                Some(_) => format!(
                    "{MAX_SESSIONS_PER_SOURCE} sessions of this sensor's source are connected"
                ),
                None => format!("{MAX_SESSIONS} sensor sessions are connected"),
            }));
        };
        self.close_session(id)
            .map_err(|e| JoinRefusal::Unavailable(format!("{e:#}")))
    }

    /// Where a session new to this writer starts: after what an earlier run wrote of it
    /// (the journal's record, for the holder of its secret only), or what it delivered
    /// before it ended here. Remembers the secret's hash for the journal.
    fn resume_point(
        &mut self,
        session: SessionId,
        hash: &[u8; 32],
    ) -> Result<Option<Frontier>, JoinRefusal> {
        if let Some((frontier, _)) = self.resumable.remove(&session) {
            if !same_hash(&frontier.secret_hash, hash) {
                self.resumable.insert(session, (frontier, Instant::now()));
                return Err(JoinRefusal::Session(format!(
                    "session {} was opened with another secret; start a new one",
                    session_tag(session)
                )));
            }
            return Ok(Some(frontier));
        }
        Ok(self.finished.remove(&session).map(|acked| Frontier {
            session,
            secret_hash: *hash,
            acked,
            ..Frontier::default()
        }))
    }

    /// Flushes, journaled: where every session (open, or written by an earlier run and not
    /// back yet) stands once the flush is done goes into the output's journal first.
    fn flush_journaled(&mut self) -> std::io::Result<bool> {
        let now = Instant::now();
        self.resumable
            .retain(|_, (_, loaded)| now.saturating_duration_since(*loaded) < SESSION_LINGER);
        let (merge, sensors, resumable) = (&self.merge, &self.sensors, &self.resumable);
        self.sink
            .flush_journaled(&mut |out| collect_frontiers(merge, sensors, resumable, out))
    }

    /// The fault point: a crash right after a write, before its acknowledgement.
    fn flushed(&mut self, wrote: bool) {
        if wrote {
            self.flushes += 1;
            if self.abort_after_flush == Some(self.flushes) {
                eprintln!(
                    "receiver: {FAULT_ENV}: aborting after flush {}",
                    self.flushes
                );
                std::process::abort();
            }
        }
    }

    /// Closes the sessions that are done: left and written, or away for too long.
    fn close_finished_sessions(&mut self, now: Instant) -> Result<()> {
        let done: Vec<SessionId> = self
            .sensors
            .iter()
            .filter(|(id, s)| {
                (s.leaving.is_some() && self.merge.is_written(**id))
                    || s.detached_at
                        .is_some_and(|t| now.saturating_duration_since(t) >= SESSION_LINGER)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.close_session(id)?;
        }
        Ok(())
    }

    /// Records a sensor's final counters in the output and its line in the summary. Held
    /// packets of a session that never came back are written first.
    fn close_session(&mut self, session: SessionId) -> Result<()> {
        let Some(mut sensor) = self.sensors.remove(&session) else {
            return Ok(());
        };
        if let Some(stats) = &sensor.stats {
            for s in &stats.interfaces {
                if let Some(&idx) = sensor.interfaces.get(usize::from(s.interface_id)) {
                    // Delivered to this output: what it holds, whatever the sensor last
                    // heard acknowledged.
                    let mut s = s.clone();
                    s.delivered = self.merge.written_on(session, s.interface_id);
                    self.sink
                        .write_stats(idx, &s)
                        .context("writing statistics")?;
                }
            }
        }
        let acked = self.merge.acked(session);
        let holds = self.merge.batch_holds(session);
        tracing::debug!(
            "{}: its {} batches waited in the merge {} ms on average, {} ms at most",
            sensor.label,
            holds.batches,
            holds
                .total
                .checked_div(u32::try_from(holds.batches).unwrap_or(u32::MAX))
                .unwrap_or_default()
                .as_millis(),
            holds.longest.as_millis()
        );
        if let Some(done) = sensor.leaving.take() {
            self.to_notify.push((done, acked));
        }
        if sensor.detached_at.is_some() {
            tracing::warn!(
                "{}: closed its session after {}s away",
                sensor.label,
                SESSION_LINGER.as_secs()
            );
        }
        if self.finished.len() >= FINISHED_REMEMBERED {
            if let Some(&old) = self.finished.keys().next() {
                self.finished.remove(&old);
            }
        }
        self.finished.insert(session, acked);
        let written = self.merge.written(session);
        let figures = sensor.figures(written);
        // Its series go out once more with the final figures, then linger and go.
        sensor.series.publish(&figures);
        self.telemetry.closed(&figures);
        let summary = SensorSummary {
            label: sensor.label,
            written,
            received: sensor.received,
            stats: sensor.stats,
        };
        if self.summaries.len() < MAX_SUMMARIES {
            self.summaries.push(summary);
        } else {
            self.summaries_beyond.add(&summary);
        }
        self.merge.remove_session(session);
        Ok(())
    }

    /// Pushes what was written to the file or pipe. A file that cannot take it (disk full)
    /// is tried again every second: meanwhile nothing is acknowledged, so the sensors keep
    /// their copies, and no event is taken in, so the sensors slow down and buffer.
    async fn commit(&mut self, stop: &mut watch::Receiver<bool>) -> Result<()> {
        let e = match self.flush_journaled() {
            Ok(wrote) => {
                self.flushed(wrote);
                return Ok(());
            }
            Err(e) => e,
        };
        // A reader that went away (stdout's pipe) never comes back, whatever else is retried.
        if !self.retry_output || e.kind() == std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing the output");
        }
        tracing::error!(
            "cannot write the output: {e}; holding the rest and acknowledging nothing until \
             it can be written (sensors keep their copies); retrying every {}s",
            OUTPUT_RETRY.as_secs()
        );
        let since = Instant::now();
        let mut reported = since;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(OUTPUT_RETRY) => {}
                _ = stop.changed() => {}
            }
            // The journal written before the first try still describes this flush.
            match self.sink.flush() {
                Ok(()) => {
                    self.flushed(true);
                    tracing::warn!(
                        "the output is writable again after {:.0}s; resuming",
                        since.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                Err(e) if *stop.borrow() => {
                    return Err(anyhow!(
                        "stopping with the output still failing ({e}); the file ends at the \
                         last complete write, and the sensors keep what it lacks, \
                         unacknowledged"
                    ));
                }
                Err(e) if reported.elapsed() >= OUTPUT_REPORT => {
                    reported = Instant::now();
                    tracing::error!(
                        "the output has failed for {:.0}s: {e}; still holding, still retrying",
                        since.elapsed().as_secs_f64()
                    );
                }
                Err(_) => {}
            }
        }
    }

    /// Brings the metrics and the status line up to date, about once a second.
    fn publish(&mut self, now: Instant) {
        if !self.telemetry.due(now) {
            return;
        }
        let merge = &self.merge;
        let open = self
            .sensors
            .iter()
            .map(|(id, s)| (&s.series, s.figures(merge.written(*id)), s.conn.is_some()));
        self.telemetry.publish(now, open);
    }

    /// Tells sensors what is now in the output; only called after a commit.
    fn acknowledge(&mut self) {
        for (session, acked) in self.merge.take_acks() {
            if let Some(s) = self.sensors.get(&session) {
                let _ = s.acks.send(acked);
            }
        }
        for (done, acked) in self.to_notify.drain(..) {
            let _ = done.send(acked);
        }
    }
}

/// Where every session stands in the output, for its journal: the open ones, and those an
/// earlier run wrote whose sensors are not back yet.
fn collect_frontiers(
    merge: &Merge,
    sensors: &HashMap<SessionId, Sensor>,
    resumable: &HashMap<SessionId, (Frontier, Instant)>,
    out: &mut Vec<Frontier>,
) {
    for id in merge.sessions() {
        if let Some(mut frontier) = merge.frontier(id) {
            if let Some(s) = sensors.get(&id) {
                frontier.secret_hash = s.secret_hash;
            }
            out.push(frontier);
        }
    }
    out.extend(resumable.values().map(|(f, _)| f.clone()));
}

/// The sessions past [`MAX_SUMMARIES`], as one line of sums.
#[derive(Default)]
struct SummariesBeyond {
    sessions: u64,
    written: crate::merge::Written,
    received: Received,
}

impl SummariesBeyond {
    fn add(&mut self, s: &SensorSummary) {
        self.sessions += 1;
        let (w, r) = (&mut self.written, &mut self.received);
        w.packets = w.packets.saturating_add(s.written.packets);
        w.bytes = w.bytes.saturating_add(s.written.bytes);
        w.late = w.late.saturating_add(s.written.late);
        w.forced = w.forced.saturating_add(s.written.forced);
        r.batches = r.batches.saturating_add(s.received.batches);
        r.raw_bytes = r.raw_bytes.saturating_add(s.received.raw_bytes);
        r.wire_bytes = r.wire_bytes.saturating_add(s.received.wire_bytes);
        r.reconnects = r.reconnects.saturating_add(s.received.reconnects);
        r.duplicates = r.duplicates.saturating_add(s.received.duplicates);
    }

    fn into_summary(self) -> Option<SensorSummary> {
        (self.sessions > 0).then(|| SensorSummary {
            label: format!(
                "{} further session(s) added up (each one's counters are in the output)",
                self.sessions
            ),
            written: self.written,
            received: self.received,
            stats: None,
        })
    }
}

/// Who opened a session, for the per-source cap: its certificate name, else its address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Certificate(String),
    Address(std::net::IpAddr),
}

impl Source {
    fn of(identity: Option<&str>, peer: SocketAddr) -> Self {
        match identity {
            Some(name) => Self::Certificate(name.to_string()),
            None => Self::Address(peer.ip()),
        }
    }
}

/// The SHA-256 of `bytes`: what the writer and the journal keep of a session's secret
/// (never the secret), and what a session's public tag is cut from.
pub fn secret_hash(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut hash = [0; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// Equal hashes, compared in time independent of where they differ.
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// How a session is named wherever others can read it (logs, metrics, the output's
/// descriptions): the first 8 hex digits of the SHA-256 of its id, which names it without
/// handing out the id.
pub fn session_tag(session: SessionId) -> String {
    secret_hash(&session.to_be_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fault point asked for in [`FAULT_ENV`], read once.
fn fault_point() -> Option<u64> {
    let value = std::env::var(FAULT_ENV).ok()?;
    match value
        .strip_prefix("abort-after-flush:")
        .and_then(|n| n.parse().ok())
    {
        Some(n) => {
            tracing::warn!(
                "{FAULT_ENV}={value}: this receiver aborts after flush {n} (tests only)"
            );
            Some(n)
        }
        None => {
            tracing::warn!("{FAULT_ENV}={value} is not abort-after-flush:N; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::InterfaceStats;

    /// An output whose journal names one session, opened with secret `[1; 16]`.
    struct Recovered;

    impl Sink for Recovered {
        fn check(&self, _: &[SinkInterface]) -> Result<(), crate::sink::Refusal> {
            Ok(())
        }
        fn add_interface(&mut self, _: &SinkInterface) -> std::io::Result<u32> {
            Ok(0)
        }
        fn write_packet(&mut self, _: &crate::sink::OutPacket) -> std::io::Result<()> {
            Ok(())
        }
        fn write_stats(&mut self, _: u32, _: &InterfaceStats) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn finish(self: Box<Self>) -> std::io::Result<()> {
            Ok(())
        }
        fn take_recovered(&mut self) -> Vec<Frontier> {
            vec![Frontier {
                session: 7,
                secret_hash: secret_hash(&[1; 16]),
                acked: 41,
                ..Frontier::default()
            }]
        }
    }

    /// A session an earlier run wrote resumes where it ended, for the holder of its secret
    /// only.
    #[test]
    fn only_the_secret_resumes_a_session_from_the_journal() {
        let mut writer = Writer::new(Box::new(Recovered), Duration::from_secs(1), true);
        assert!(writer.resume_point(7, &secret_hash(&[2; 16])).is_err());
        let resumed = writer
            .resume_point(7, &secret_hash(&[1; 16]))
            .unwrap()
            .unwrap();
        assert_eq!(resumed.acked, 41);
        assert_eq!(
            writer.resume_point(8, &secret_hash(&[1; 16])).unwrap(),
            None
        );
    }
}
