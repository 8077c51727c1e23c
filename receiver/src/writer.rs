//! The one task that owns the output: it registers sensors, feeds the merge, writes, and
//! tells each connection how far it has been written.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::{Hello, PacketIter, Stats};
use tokio::sync::{mpsc, oneshot, watch};

use crate::merge::{Merge, SessionId};
use crate::sink::{Sink, SinkInterface};
use crate::stats::SensorSummary;

/// How often held packets are looked at when no event arrives.
const TICK: Duration = Duration::from_millis(50);
/// Held data beyond this goes out early (counted as late if it overtakes anything).
const MAX_HELD_BYTES: usize = 128 << 20;
/// Events handled in one round before writing and flushing.
const ROUND: usize = 256;

/// What connections tell the writer.
pub enum Event {
    /// A sensor said Hello; the reply says whether the output can take it.
    Joined {
        session: SessionId,
        hello: Box<Hello>,
        peer: SocketAddr,
        acks: watch::Sender<u64>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Batch {
        session: SessionId,
        sequence: u64,
        interface_id: u16,
        packets: PacketIter,
        raw_len: usize,
        wire_len: usize,
    },
    Stats {
        session: SessionId,
        stats: Stats,
    },
    /// The sensor left (cleanly or not): write all of it; `done` fires when that is so.
    Left {
        session: SessionId,
        done: oneshot::Sender<()>,
    },
}

struct Sensor {
    label: String,
    interfaces: Vec<u32>,
    acks: watch::Sender<u64>,
    batches: u64,
    raw_bytes: u64,
    wire_bytes: u64,
    stats: Option<Stats>,
}

pub struct Writer {
    sink: Box<dyn Sink>,
    merge: Merge,
    sensors: HashMap<SessionId, Sensor>,
    /// Sensors that left, waiting for their last packets to be written.
    leaving: Vec<(SessionId, oneshot::Sender<()>)>,
    summaries: Vec<SensorSummary>,
}

impl Writer {
    pub fn new(sink: Box<dyn Sink>, reorder_window: Duration) -> Self {
        Self {
            sink,
            merge: Merge::new(reorder_window, MAX_HELD_BYTES),
            sensors: HashMap::new(),
            leaving: Vec::new(),
            summaries: Vec::new(),
        }
    }

    /// Runs until every connection has let go of its sender, then writes out everything
    /// and completes the file.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) -> Result<Vec<SensorSummary>> {
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
            self.flush_and_ack()?;
            self.complete_leaving()?;
        }
        self.merge
            .drain_all(self.sink.as_mut())
            .context("writing the output")?;
        let ids: Vec<SessionId> = self.sensors.keys().copied().collect();
        for id in ids {
            self.leave(id)?;
        }
        for (_, done) in self.leaving.drain(..) {
            let _ = done.send(());
        }
        self.sink.flush().context("writing the output")?;
        self.sink.finish().context("completing the output")?;
        Ok(self.summaries)
    }

    fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Joined {
                session,
                hello,
                peer,
                acks,
                reply,
            } => {
                let _ = reply.send(self.join(session, &hello, peer, acks));
            }
            Event::Batch {
                session,
                sequence,
                interface_id,
                packets,
                raw_len,
                wire_len,
            } => {
                if let Some(s) = self.sensors.get_mut(&session) {
                    s.batches += 1;
                    s.raw_bytes += raw_len as u64;
                    s.wire_bytes += wire_len as u64;
                }
                self.merge
                    .add_batch(session, sequence, interface_id, packets, Instant::now());
            }
            Event::Stats { session, stats } => {
                if let Some(s) = self.sensors.get_mut(&session) {
                    s.stats = Some(stats);
                }
            }
            Event::Left { session, done } => {
                // Its packets go out by the usual rules, not at once: other sensors may
                // still have older packets on their way. The reorder window bounds the
                // wait for the final Ack.
                self.merge.leave(session);
                self.leaving.push((session, done));
            }
        }
        Ok(())
    }

    fn join(
        &mut self,
        session: SessionId,
        hello: &Hello,
        peer: SocketAddr,
        acks: watch::Sender<u64>,
    ) -> Result<(), String> {
        let host = clean(&hello.hostname);
        let wanted: Vec<SinkInterface> = hello
            .interfaces
            .iter()
            .map(|i| SinkInterface {
                name: format!("{host}/{}", clean(&i.name)),
                link_type: i.link_type,
                snaplen: i.snaplen,
                filter: clean(&i.filter),
                description: format!(
                    "sensor {} on {host} ({}), session {:016x}",
                    clean(&hello.sensor_id),
                    clean(&hello.os),
                    hello.session_id
                ),
            })
            .collect();
        self.sink.check(&wanted)?;
        let mut interfaces = Vec::with_capacity(wanted.len());
        for w in &wanted {
            let idx = self
                .sink
                .add_interface(w)
                .map_err(|e| format!("the receiver cannot write its output: {e}"))?;
            interfaces.push(idx);
        }
        self.merge.add_session(session, interfaces.clone());
        let label = format!("sensor {} ({host}, {peer})", clean(&hello.sensor_id));
        self.sensors.insert(
            session,
            Sensor {
                label,
                interfaces,
                acks,
                batches: 0,
                raw_bytes: 0,
                wire_bytes: 0,
                stats: None,
            },
        );
        Ok(())
    }

    /// Records a sensor's final counters in the output and its line in the summary.
    fn leave(&mut self, session: SessionId) -> Result<()> {
        let Some(sensor) = self.sensors.remove(&session) else {
            return Ok(());
        };
        let _ = sensor.acks.send(self.merge.acked(session));
        if let Some(stats) = &sensor.stats {
            for s in &stats.interfaces {
                if let Some(&idx) = sensor.interfaces.get(usize::from(s.interface_id)) {
                    self.sink
                        .write_stats(idx, s)
                        .context("writing statistics")?;
                }
            }
        }
        self.summaries.push(SensorSummary {
            label: sensor.label,
            written: self.merge.written(session),
            batches: sensor.batches,
            raw_bytes: sensor.raw_bytes,
            wire_bytes: sensor.wire_bytes,
            stats: sensor.stats,
        });
        self.merge.remove_session(session);
        Ok(())
    }

    /// Lets go of the sensors that left once everything they sent is in the output.
    fn complete_leaving(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.leaving.len() {
            let session = self.leaving[i].0;
            if self.merge.is_written(session) {
                let (_, done) = self.leaving.swap_remove(i);
                self.leave(session)?;
                self.sink.flush().context("writing the output")?;
                let _ = done.send(());
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Flushes every round, so that a pipe reader sees packets live, and acknowledges only
    /// what has reached the file (or pipe), not just our buffer.
    fn flush_and_ack(&mut self) -> Result<()> {
        self.sink.flush().context("writing the output")?;
        for (session, acked) in self.merge.take_acks() {
            if let Some(s) = self.sensors.get(&session) {
                let _ = s.acks.send(acked);
            }
        }
        Ok(())
    }
}

/// Sensor-supplied text is data: control characters never reach the output or the logs.
pub fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}
