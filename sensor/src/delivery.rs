//! The session: takes batches from the capture threads into the [`Outbox`], sends them on
//! the current connection, lets them go when the receiver acknowledges them, and when a
//! connection fails makes a new one (backoff with jitter) and sends again what was not
//! acknowledged. Capture never waits for the network: while disconnected, batches collect
//! in the outbox, and once it is full the capture threads drop whole batches and count them.
//!
//! The session ends when every capture has ended and every batch is acknowledged: Stats,
//! Goodbye, and the receiver's Goodbye.
//!
//! Only what the first connection of the process meets can be fatal: a certificate that
//! does not verify, another protocol version, a refused token are then misconfiguration.
//! Later, the same events may be forged by anyone on the path (Version Negotiation and
//! Initial packets are not authenticated) or be a receiver's passing state, so they are
//! logged as errors and retried with backoff, and nothing captured is given up.
//!
//! A receiver that cannot resume the session (`SESSION_REFUSED`: it ended, or the receiver
//! lost it) gets a new one, with a new id and secret: what is held is sent again under it
//! with the same sequence numbers (a new session may start at any sequence).
//!
//! With several receivers, the sensor sends to one at a time, chosen by rendezvous hashing
//! of its id ([`fleet`]), and moves to the next in its order when that one has been
//! unreachable for --failover-after, sending it everything unacknowledged (same session,
//! same sequences). Before every attempt, the receivers' names are resolved again.
//!
//! Every decision above is the sans-IO [`machine::Delivery`]'s (and [`fleet::Fleet`]'s),
//! tested there with a fake clock; this file only moves batches, frames and time between
//! it, the outbox and the connection, and says in the log what happened.

mod fleet;
mod machine;

pub use fleet::Fleet;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use protocol::{Goodbye, Hello, Message, Stats};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::batcher::Outgoing;
use crate::capture::Stopper;
use crate::error::{Error, Result};
use crate::outbox::Outbox;
use crate::spool::SessionKeys;
use crate::stats::{Counters, KeyLogCounters, LinkStats};
use crate::transport::{Client, ConnectError, Link, LinkEvent, Target};
use machine::{Delivery, Fatal, Finish, Frame, NewSessionCause, RetryCause, Step, JOIN_TIMEOUT};

/// How long a broken connection's last event may take to say why (the receiver's error
/// rather than "connection lost").
const ERROR_GRACE: Duration = Duration::from_secs(1);

/// Everything the session needs besides the connection.
pub struct Input<'a> {
    /// The current session's id, shared with the batchers, which stamp it on new batches.
    pub session_id: Arc<AtomicU64>,
    /// Sent first on every connection.
    pub hello: Hello,
    pub batches: mpsc::Receiver<Outgoing>,
    pub outbox: Outbox,
    pub counters: &'a [Arc<Counters>],
    /// `--keylog`'s lines: their batches count there, not as packets of interface 0.
    pub key_log: &'a KeyLogCounters,
    pub link: &'a LinkStats,
    pub stoppers: &'a [Stopper],
    /// Notified on SIGINT/SIGTERM.
    pub shutdown: Arc<Notify>,
    pub give_up_after: Option<Duration>,
    /// --failover-after, with several receivers.
    pub failover_after: Option<Duration>,
}

/// What the session achieved, for the exit summary.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Batches handed to the transport.
    pub batches: u64,
    /// Batches the receiver acknowledged.
    pub acked: u64,
    /// Batches sent again on a later connection.
    pub resent: u64,
    /// Packets still unacknowledged at exit, by interface: lost.
    pub unacked: Vec<u64>,
    /// Moves to another receiver.
    pub failovers: u64,
    /// The receiver sent to last.
    pub receiver: Option<std::net::SocketAddr>,
}

/// The connection as the driver holds it; the [`Delivery`] machine knows its state.
enum Conn {
    /// No connection (waiting for the machine's retry time).
    None,
    /// The receivers' names resolved again before an attempt; `failover`: for the next
    /// receiver rather than the current one.
    Resolving {
        task: tokio::task::JoinHandle<Vec<Target>>,
        failover: bool,
    },
    Connecting(tokio::task::JoinHandle<Result<Link, ConnectError>>),
    /// An attempt that ended before the session loop started.
    Attempted(Option<Result<Link, ConnectError>>),
    /// Joining or up.
    Link(Link),
}

/// Drives the [`Delivery`] machine: moves batches from the capture threads into the
/// outbox and onto the connection, and the connection's events and time into the machine.
struct Driver<'a> {
    input: Input<'a>,
    client: Arc<Client>,
    /// The Hello, encoded.
    hello_frame: Bytes,
    delivery: Delivery,
    fleet: Fleet,
    conn: Conn,
    outcome: Outcome,
    waits: Waits,
}

/// What the delivery loop waited for, and for how long: reported at exit (info), to tell
/// which wait holds a sensor back (issue 19: fan-in).
#[derive(Debug, Default)]
struct Waits {
    /// A batch ready, the stream without room (QUIC flow control or congestion window).
    stream: Duration,
    /// Intake stopped: the outbox (`--buffer`) full of unacknowledged batches.
    acks: Duration,
    /// Every batch sent, the capture done: the last acknowledgements.
    last_acks: Duration,
    /// Nothing to send: waiting for the capture (from its first batch on).
    capture: Duration,
    /// Before the capture's first batch.
    first_batch: Duration,
    since: Option<(Instant, Wait)>,
}

#[derive(Debug, Clone, Copy)]
enum Wait {
    Stream,
    Acks,
    LastAcks,
    Capture,
    FirstBatch,
}

impl Waits {
    /// The loop starts waiting for `wait`: what it waited for before is counted.
    fn now_waiting_for(&mut self, wait: Wait) {
        let now = Instant::now();
        if let Some((since, before)) = self.since.replace((now, wait)) {
            *match before {
                Wait::Stream => &mut self.stream,
                Wait::Acks => &mut self.acks,
                Wait::LastAcks => &mut self.last_acks,
                Wait::Capture => &mut self.capture,
                Wait::FirstBatch => &mut self.first_batch,
            } += now - since;
        }
    }
}

/// How long the first connection attempt is waited for before capture starts: long enough
/// to report a wrong CA or fingerprint at once, short enough not to miss traffic while an
/// unreachable receiver times out.
const FIRST_ATTEMPT_WAIT: Duration = Duration::from_secs(2);

/// The session's connection side, once the first attempt is under way.
pub struct Started {
    client: Arc<Client>,
    hello_frame: Bytes,
    fleet: Fleet,
    conn: Conn,
    since: Instant,
}

/// Starts connecting to the fleet's current receiver. Fails only when the first attempt
/// fails for good (TLS verification, names, versions) within [`FIRST_ATTEMPT_WAIT`].
pub async fn start(client: Client, fleet: Fleet, hello: &Hello) -> Result<Started> {
    let client = Arc::new(client);
    let since = Instant::now();
    let hello_frame = Message::Hello(hello.clone()).to_bytes();
    let mut task = spawn_connect(&client, fleet.current(), hello_frame.clone());
    let conn = match tokio::time::timeout(FIRST_ATTEMPT_WAIT, &mut task).await {
        Err(_) => Conn::Connecting(task),
        Ok(Ok(Err(e))) if e.is_permanent() => return Err(e.into_error()),
        Ok(done) => Conn::Attempted(Some(done.unwrap_or_else(|e| Err(task_failed(e))))),
    };
    Ok(Started {
        client,
        hello_frame,
        fleet,
        conn,
        since,
    })
}

/// Runs the session to its end. On a fatal error the captures are stopped.
pub async fn run(started: Started, input: Input<'_>) -> (Outcome, Result<()>) {
    let Started {
        client,
        hello_frame,
        fleet,
        conn,
        since,
    } = started;
    let delivery = Delivery::new(
        since.into_std(),
        input.give_up_after,
        input.failover_after,
        machine::random_jitter(),
    );
    input.link.set_receiver(fleet.current().addr);
    let mut s = Driver {
        input,
        client,
        hello_frame,
        delivery,
        fleet,
        conn,
        outcome: Outcome::default(),
        waits: Waits::default(),
    };
    s.count_damaged();
    let result = s.run().await;
    s.waits.now_waiting_for(Wait::Capture);
    let w = &s.waits;
    tracing::debug!(
        "delivery waited {} ms for room on the stream, {} ms for acknowledgements with the \
         buffer full, {} ms for the last acknowledgements, {} ms for captured batches, \
         {} ms before the first",
        w.stream.as_millis(),
        w.acks.as_millis(),
        w.last_acks.as_millis(),
        w.capture.as_millis(),
        w.first_batch.as_millis()
    );
    if result.is_ok() && s.input.outbox.is_empty() {
        s.input.outbox.end_session();
    }
    if result.is_err() {
        for stop in s.input.stoppers {
            stop();
        }
        // Unblock capture threads waiting for room: the batches have nowhere to go. Those
        // already queued are counted with what was not acknowledged.
        s.input.batches.close();
        while let Ok(out) = s.input.batches.try_recv() {
            if let Err(e) = s.input.outbox.push(out) {
                tracing::warn!("spool write failed while stopping: {e}");
            }
        }
    }
    match std::mem::replace(&mut s.conn, Conn::None) {
        Conn::Link(link) => link.close(result.is_ok()),
        Conn::Connecting(task) => task.abort(),
        Conn::Resolving { task, .. } => task.abort(),
        Conn::None | Conn::Attempted(_) => {}
    }
    s.outcome.failovers = s.delivery.failovers();
    s.outcome.receiver = Some(s.fleet.current().addr);
    s.input.link.up.store(false, Relaxed);
    let closing = Instant::now();
    s.client.close(result.is_ok()).await;
    tracing::debug!(
        "waited {} ms closing the QUIC endpoint (its connection draining)",
        closing.elapsed().as_millis()
    );
    s.outcome.unacked = (0..s.input.counters.len())
        .map(|i| s.input.outbox.unacked_packets(i))
        .collect();
    (s.outcome, result)
}

/// The machine's clock: tokio's, so that the driver's timers and the machine agree.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

impl Driver<'_> {
    async fn run(&mut self) -> Result<()> {
        loop {
            if let Some(step) = self
                .delivery
                .nothing_left(now(), self.input.outbox.is_empty())
            {
                if self.act(step, None, "")? {
                    return Ok(());
                }
            }
            let timeout = self.delivery.poll_timeout().map(Instant::from_std);
            let want_room = self.delivery.wants_room(
                self.input.outbox.next_unsent().is_some(),
                self.input.outbox.all_sent(),
            );
            let captures_done = self.delivery.captures_done();
            self.waits.now_waiting_for(if want_room {
                Wait::Stream
            } else if !captures_done && !self.input.outbox.has_room() {
                Wait::Acks
            } else if captures_done && !self.input.outbox.is_empty() {
                Wait::LastAcks
            } else if self.outcome.batches == 0 {
                Wait::FirstBatch
            } else {
                Wait::Capture
            });
            tokio::select! {
                biased;
                _ = self.input.shutdown.notified(), if !self.delivery.stopping() => {
                    if self.delivery.on_stop_signal(now()) {
                        tracing::info!("stopping: delivering what was captured to the receiver");
                        for stop in self.input.stoppers {
                            stop();
                        }
                    }
                }
                // Intake first: the capture threads' channel must not fill while there is
                // room here.
                item = self.input.batches.recv(), if !captures_done && self.input.outbox.has_room() => {
                    match item {
                        Some(out) => {
                            if let Err(e) = self.input.outbox.push(out) {
                                tracing::error!("spool write failed: {e}; holding further batches in memory only");
                            }
                        }
                        None => self.delivery.on_captures_done(),
                    }
                }
                activity = activity(&mut self.conn, want_room) => match activity {
                    Activity::Event(event) => {
                        if self.on_event(event).await? {
                            return Ok(());
                        }
                    }
                    Activity::Connected(Ok(link)) => {
                        self.conn = Conn::Link(link);
                        self.delivery.on_connected(now());
                    }
                    Activity::Connected(Err(e)) => {
                        let step = self.delivery.on_connect_failed(now(), e.is_permanent());
                        if self.act(step, Some(e.into_error()), "")? {
                            return Ok(());
                        }
                    }
                    Activity::Room(permit) => self.send_next(permit),
                    Activity::Resolved { found, failover } => self.connect_after(&found, failover),
                },
                () = sleep_until(timeout) => {
                    let step = self.delivery.handle_timeout(now(), self.input.outbox.is_empty());
                    if self.act(step, None, "")? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Sends the next batch, or else the closing frames, in the room the stream has.
    fn send_next(&mut self, permit: mpsc::OwnedPermit<Bytes>) {
        let next = self.input.outbox.next_unsent().map(|out| out.sequence);
        match self.delivery.on_room(next, self.input.outbox.all_sent()) {
            Some(Frame::Batch { again }) => {
                let Some(out) = self.input.outbox.next_unsent() else {
                    return;
                };
                permit.send(in_session(
                    &out.batch.frame,
                    self.input.session_id.load(Relaxed),
                ));
                if again {
                    self.outcome.resent += 1;
                } else {
                    self.outcome.batches += 1;
                }
                self.input.outbox.mark_sent();
            }
            Some(Frame::Goodbye) => {
                // Statistics last, so that they count every packet; then the Goodbye.
                let mut frames = BytesMut::from(&self.stats_frame()[..]);
                Message::Goodbye(Goodbye).encode(&mut frames);
                permit.send(frames.freeze());
            }
            None => {}
        }
    }

    /// Handles what a connection reported; `Ok(true)` when the session is complete.
    async fn on_event(&mut self, event: LinkEvent) -> Result<bool> {
        let (step, why) = match event {
            LinkEvent::Ack(sequence) => (self.delivery.on_ack(now(), sequence), String::new()),
            LinkEvent::Goodbye => (
                self.delivery
                    .on_goodbye(now(), self.input.outbox.is_empty()),
                "receiver ended the session early".to_owned(),
            ),
            LinkEvent::Refused { code, message } => {
                (self.delivery.on_refused(now(), code), message)
            }
            LinkEvent::Silent(why) => (
                self.delivery.on_lost(now(), self.client.idle_timeout()),
                why,
            ),
            LinkEvent::Lost(why) => {
                // The receiver's reason, if it sent one before the connection broke.
                let last = match &mut self.conn {
                    Conn::Link(link) => tokio::time::timeout(ERROR_GRACE, link.events.recv()).await,
                    _ => Ok(None),
                };
                match last {
                    Ok(Some(LinkEvent::Refused { code, message })) => {
                        (self.delivery.on_refused(now(), code), message)
                    }
                    _ => (self.delivery.on_lost(now(), Duration::ZERO), why),
                }
            }
        };
        self.act(step, None, &why)
    }

    /// Does what the machine decided. `failed`: the connection attempt's error, when the
    /// step answers one; `why`: the receiver's words or the way the connection ended.
    /// `Ok(true)` when the session has ended well.
    fn act(&mut self, step: Step, failed: Option<Error>, why: &str) -> Result<bool> {
        let remote = self.fleet.current().addr;
        match step {
            Step::Continue => {}
            Step::Connect => self.resolve(false),
            Step::FailOver => {
                self.drop_link();
                self.resolve(true);
            }
            Step::Release(sequence) => self.acknowledge(sequence),
            Step::Joined {
                resume,
                after_outage,
            } => {
                self.acknowledge(resume);
                self.input.outbox.rewind();
                let pending = self.input.outbox.len();
                if after_outage {
                    tracing::warn!(
                        "reconnected to receiver {remote}: it has every batch up to {resume}; sending {pending} held batch(es)"
                    );
                } else {
                    tracing::info!("connected to receiver {remote}");
                }
                if let Conn::Link(link) = &self.conn {
                    self.input.link.rtt_micros.store(
                        u64::try_from(link.rtt().as_micros()).unwrap_or(u64::MAX),
                        Relaxed,
                    );
                }
                self.input.link.up.store(true, Relaxed);
            }
            Step::Retry { delay, cause } => {
                self.drop_link();
                let held = self.input.outbox.len();
                let wait = delay.as_secs_f64();
                match cause {
                    RetryCause::ConnectFailed { loud } => {
                        let error = failed.map_or_else(String::new, |e| e.to_string());
                        if loud {
                            // Accepted before, or unreachable at first: forged, or the path
                            // changed.
                            tracing::error!(
                                "{error}; retrying in {wait:.1}s ({held} batch(es) held)"
                            );
                        } else {
                            tracing::warn!(
                                "{error}; retrying in {wait:.1}s ({held} batch(es) held)"
                            );
                        }
                    }
                    RetryCause::RefusedAgain => tracing::error!(
                        "receiver {remote} refused this sensor: {why}; it accepted it before, \
                         so trying again in {wait:.1}s ({held} batch(es) held)"
                    ),
                    RetryCause::NoAnswerToHello => tracing::warn!(
                        "receiver {remote}: no answer to Hello within {}s; reconnecting in \
                         {wait:.1}s ({held} batch(es) held)",
                        JOIN_TIMEOUT.as_secs()
                    ),
                    RetryCause::Lost | RetryCause::EndedEarly | RetryCause::Unavailable => {
                        tracing::warn!(
                            "receiver {remote}: {why}; reconnecting in {wait:.1}s ({held} batch(es) held)"
                        )
                    }
                }
            }
            Step::NewSession { delay, cause } => {
                self.new_session();
                self.drop_link();
                let held = self.input.outbox.len();
                let id = self.input.session_id.load(Relaxed);
                let wait = delay.as_secs_f64();
                match cause {
                    NewSessionCause::Takeover { acked, known } => tracing::error!(
                        "receiver {remote} acknowledged batch {acked}, past the last this sensor \
                         sent ({known}): another connection has taken over the session; \
                         sending the {held} batch(es) held under new session {id:016x} in {wait:.1}s"
                    ),
                    NewSessionCause::Refused => tracing::error!(
                        "receiver {remote} cannot resume this session ({why}): sending the \
                         {held} batch(es) held under new session {id:016x} in {wait:.1}s"
                    ),
                    NewSessionCause::Behind { resume, acked } => tracing::warn!(
                        "receiver {remote} resumes this session after batch {resume}, behind \
                         batch {acked}, which another receiver acknowledged: sending the \
                         {held} batch(es) held under new session {id:016x} in {wait:.1}s"
                    ),
                }
            }
            Step::Stats { send } => {
                if let Conn::Link(link) = &self.conn {
                    let rtt = u64::try_from(link.rtt().as_micros()).unwrap_or(u64::MAX);
                    self.input.link.rtt_micros.store(rtt, Relaxed);
                    if send {
                        link.try_send(self.stats_frame());
                    }
                }
            }
            Step::Finish(Finish::Complete) => return Ok(true),
            Step::Finish(Finish::StatisticsUndelivered { waited }) => {
                tracing::warn!(
                    "receiver {remote} unreachable at the end (for {:.0}s): every batch was \
                     acknowledged, but the final statistics were not delivered",
                    waited.as_secs_f64()
                );
                return Ok(true);
            }
            Step::Fail(Fatal::FirstConnection) => {
                return Err(failed.unwrap_or_else(|| {
                    Error::runtime(format!("cannot connect to receiver {remote}"))
                }))
            }
            Step::Fail(Fatal::Refused) => {
                return Err(Error::runtime(format!(
                    "receiver {remote} refused this sensor: {why}"
                )))
            }
            Step::Fail(Fatal::GaveUp { waited }) => {
                return Err(Error::runtime(format!(
                    "gave up on receiver {remote} after {:.0}s without a connection; {} batch(es) \
                     unacknowledged are lost (see the summary)",
                    waited.as_secs_f64(),
                    self.input.outbox.len()
                )))
            }
        }
        self.input
            .link
            .reconnects
            .store(self.delivery.reconnects(), Relaxed);
        Ok(false)
    }

    /// Closes the connection or ends the attempt (if any) without waiting: the machine
    /// has left it.
    fn drop_link(&mut self) {
        match std::mem::replace(&mut self.conn, Conn::None) {
            Conn::Link(link) => {
                link.close(false);
                self.input.link.up.store(false, Relaxed);
            }
            Conn::Connecting(task) => task.abort(),
            Conn::Resolving { task, .. } => task.abort(),
            Conn::None | Conn::Attempted(_) => {}
        }
    }

    /// Resolves the receivers' names again, then connects (see [`Driver::connect_after`]).
    fn resolve(&mut self, failover: bool) {
        let client = Arc::clone(&self.client);
        let task = tokio::spawn(async move { client.resolve_again().await });
        self.conn = Conn::Resolving { task, failover };
    }

    /// Connects to the current receiver as `found` makes it, or, for a failover, to the
    /// next one.
    fn connect_after(&mut self, found: &[Target], failover: bool) {
        if failover {
            let from = self.fleet.fail_over(found);
            let to = self.fleet.current().addr;
            let waited = self.input.failover_after.unwrap_or_default().as_secs_f64();
            tracing::warn!(
                "failover from receiver {from} to {to}: {from} unreachable for {waited:.1}s; \
                 sending it the {} batch(es) held",
                self.input.outbox.len()
            );
        } else if let Some(from) = self.fleet.refresh(found) {
            let to = self.fleet.current();
            tracing::warn!(
                "receiver host {} is now at {} (was {from}); the capture filter still leaves \
                 out only the flows to the addresses found at start",
                to.host,
                to.addr
            );
        }
        self.input.link.set_receiver(self.fleet.current().addr);
        self.input
            .link
            .failovers
            .store(self.delivery.failovers(), Relaxed);
        self.conn = Conn::Connecting(spawn_connect(
            &self.client,
            self.fleet.current(),
            self.hello_frame.clone(),
        ));
    }

    fn acknowledge(&mut self, sequence: u64) {
        let counters = self.input.counters;
        let key_log = self.input.key_log;
        let mut released = 0;
        self.input.outbox.ack(sequence, |r| {
            released += 1;
            if r.batch.tls_key_log_lines > 0 {
                key_log.lines.acknowledged(
                    r.batch.tls_key_log_lines,
                    r.batch.raw_len,
                    r.batch.frame.len(),
                );
            } else if let Some(c) = counters.get(usize::from(r.interface_id)) {
                c.acknowledged(r.batch.packets, r.batch.raw_len, r.batch.frame.len());
            }
        });
        self.outcome.acked += released;
        self.count_damaged();
    }

    /// Counts what damaged spool segments lost, as drops of their interfaces.
    fn count_damaged(&mut self) {
        for (i, lost) in self.input.outbox.take_damaged().into_iter().enumerate() {
            if let Some(c) = self.input.counters.get(i) {
                c.drop_spool.fetch_add(lost, Relaxed);
            }
        }
    }

    /// A new session id and secret, for a receiver that cannot resume the old session.
    fn new_session(&mut self) {
        let id = rand::random();
        self.input.hello.session_id = id;
        self.input.hello.session_secret = rand::random();
        self.input.session_id.store(id, Relaxed);
        self.input.outbox.set_session(SessionKeys {
            session_id: id,
            secret: self.input.hello.session_secret,
        });
        self.hello_frame = Message::Hello(self.input.hello.clone()).to_bytes();
    }

    fn stats_frame(&self) -> Bytes {
        let stats = Stats {
            session_id: self.input.session_id.load(Relaxed),
            interfaces: self
                .input
                .counters
                .iter()
                .enumerate()
                .map(|(i, c)| c.snapshot(u16::try_from(i).unwrap_or(u16::MAX)))
                .collect(),
        };
        let mut frame = BytesMut::new();
        Message::Stats(stats).encode(&mut frame);
        frame.freeze()
    }
}

/// Sleeps until `at`, or for ever when there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the current connection (or the lack of one) asks for next.
enum Activity {
    Event(LinkEvent),
    Connected(Result<Link, ConnectError>),
    /// Room on the stream for the next batch.
    Room(mpsc::OwnedPermit<Bytes>),
    /// The receivers' addresses, resolved again.
    Resolved {
        found: Vec<Target>,
        failover: bool,
    },
}

/// Waits for the current connection's next activity (the machine's timers handle the
/// rest: retries, the deadline of the Hello's answer).
async fn activity(conn: &mut Conn, want_room: bool) -> Activity {
    let event = match conn {
        Conn::None => std::future::pending().await,
        Conn::Resolving { task, failover } => {
            let failover = *failover;
            // A failed task is an empty answer: the addresses known are kept.
            let found = task.await.unwrap_or_default();
            return Activity::Resolved { found, failover };
        }
        Conn::Connecting(task) => {
            return Activity::Connected(task.await.unwrap_or_else(|e| Err(task_failed(e))))
        }
        Conn::Attempted(done) => match done.take() {
            Some(done) => return Activity::Connected(done),
            None => std::future::pending().await,
        },
        Conn::Link(link) => {
            let frames = link.frames();
            tokio::select! {
                event = link.events.recv() => event,
                permit = frames.reserve_owned(), if want_room => match permit {
                    Ok(permit) => return Activity::Room(permit),
                    Err(_) => None,
                },
            }
        }
    };
    Activity::Event(event.unwrap_or_else(|| LinkEvent::Lost("connection closed".into())))
}

fn spawn_connect(
    client: &Arc<Client>,
    target: &Target,
    hello: Bytes,
) -> tokio::task::JoinHandle<Result<Link, ConnectError>> {
    let client = Arc::clone(client);
    let target = target.clone();
    tokio::spawn(async move { client.connect(&target, hello).await })
}

fn task_failed(e: tokio::task::JoinError) -> ConnectError {
    ConnectError::Passing(Error::runtime(format!("connecting failed: {e}")))
}

/// `frame`, a batch, stamped with `session_id`: batches made before the session changed
/// (see [`Driver::new_session`]) are copied with the new id; the rest go as they are.
fn in_session(frame: &Bytes, session_id: u64) -> Bytes {
    let id_at = protocol::FRAME_HEADER_LEN..protocol::FRAME_HEADER_LEN + 8;
    match frame.get(id_at.clone()) {
        Some(id) if id != session_id.to_be_bytes() => {
            let mut copy = BytesMut::from(&frame[..]);
            copy[id_at].copy_from_slice(&session_id.to_be_bytes());
            copy.freeze()
        }
        _ => frame.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_batches_are_restamped_with_a_new_session() {
        let mut builder = protocol::BatchBuilder::new(1024);
        let _ = builder.push(1, 60, protocol::Direction::Inbound, &[7u8; 60]);
        let frame = builder.finish(0x1111, 42, 0).frame;
        assert_eq!(in_session(&frame, 0x1111), frame, "same session: as it is");
        let moved = in_session(&frame, 0x2222);
        let mut buf = BytesMut::from(&moved[..]);
        match protocol::decode_frame(&mut buf) {
            Ok(Some(Message::Batch(batch))) => {
                assert_eq!((batch.session_id, batch.sequence), (0x2222, 42));
                assert_eq!(batch.packets().unwrap().count(), 1);
            }
            other => panic!("not a batch: {other:?}"),
        }
    }
}
