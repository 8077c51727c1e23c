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

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use protocol::{ErrorCode, Goodbye, Hello, Message, Stats};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::batcher::Outgoing;
use crate::capture::Stopper;
use crate::error::{Error, Result};
use crate::outbox::Outbox;
use crate::spool::SessionKeys;
use crate::stats::{Counters, LinkStats};
use crate::transport::{Client, ConnectError, Link, LinkEvent};

const STATS_EVERY: Duration = Duration::from_secs(1);
/// A receiver that accepts a connection must say where the session resumes this soon.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// After a stop signal, how long an unreachable receiver is waited for when
/// --give-up-after is not set.
const STOP_GRACE: Duration = Duration::from_secs(30);
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
    pub link: &'a LinkStats,
    pub stoppers: &'a [Stopper],
    /// Notified on SIGINT/SIGTERM.
    pub shutdown: Arc<Notify>,
    pub give_up_after: Option<Duration>,
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
}

enum Conn {
    /// Waiting to try again.
    Down {
        retry_at: Instant,
    },
    Connecting(tokio::task::JoinHandle<Result<Link, ConnectError>>),
    /// An attempt that ended before the session loop started.
    Attempted(Option<Result<Link, ConnectError>>),
    /// Hello sent, waiting for the receiver's resume point.
    Joining {
        link: Link,
        deadline: Instant,
    },
    Up(Link),
}

struct Session<'a> {
    input: Input<'a>,
    client: Arc<Client>,
    /// The Hello, encoded.
    hello_frame: Bytes,
    /// Until the first connection attempt has an outcome: its failures are fatal.
    first_connection: bool,
    conn: Conn,
    outcome: Outcome,
    /// The highest sequence sent on any connection: what goes again counts as resent.
    highest_sent: u64,
    /// The highest sequence a receiver acknowledged or resumed after.
    highest_acked: u64,
    backoff: Duration,
    /// Since when no connection has been up.
    down_since: Option<Instant>,
    captures_done: bool,
    stopping: Option<Instant>,
    goodbye_sent: bool,
}

/// How long the first connection attempt is waited for before capture starts: long enough
/// to report a wrong CA or fingerprint at once, short enough not to miss traffic while an
/// unreachable receiver times out.
const FIRST_ATTEMPT_WAIT: Duration = Duration::from_secs(2);

/// The session's connection side, once the first attempt is under way.
pub struct Started {
    client: Arc<Client>,
    hello_frame: Bytes,
    conn: Conn,
    since: Instant,
}

/// Starts connecting. Fails only when the first attempt fails for good (TLS verification,
/// names, versions) within [`FIRST_ATTEMPT_WAIT`].
pub async fn start(client: Client, hello: &Hello) -> Result<Started> {
    let client = Arc::new(client);
    let since = Instant::now();
    let hello_frame = Message::Hello(hello.clone()).to_bytes();
    let mut task = spawn_connect(&client, hello_frame.clone());
    let conn = match tokio::time::timeout(FIRST_ATTEMPT_WAIT, &mut task).await {
        Err(_) => Conn::Connecting(task),
        Ok(Ok(Err(e))) if e.permanent => return Err(e.error),
        Ok(done) => Conn::Attempted(Some(done.unwrap_or_else(|e| Err(task_failed(e))))),
    };
    Ok(Started {
        client,
        hello_frame,
        conn,
        since,
    })
}

/// Runs the session to its end. On a fatal error the captures are stopped.
pub async fn run(started: Started, input: Input<'_>) -> (Outcome, Result<()>) {
    let Started {
        client,
        hello_frame,
        conn,
        since,
    } = started;
    let mut s = Session {
        input,
        client,
        hello_frame,
        first_connection: true,
        conn,
        outcome: Outcome::default(),
        highest_sent: 0,
        highest_acked: 0,
        backoff: FIRST_RETRY,
        down_since: Some(since),
        captures_done: false,
        stopping: None,
        goodbye_sent: false,
    };
    s.count_damaged();
    let result = s.run().await;
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
    match std::mem::replace(
        &mut s.conn,
        Conn::Down {
            retry_at: Instant::now(),
        },
    ) {
        Conn::Up(link) | Conn::Joining { link, .. } => link.close(result.is_ok()),
        Conn::Connecting(task) => task.abort(),
        Conn::Down { .. } | Conn::Attempted(_) => {}
    }
    s.input.link.up.store(false, Relaxed);
    s.client.close().await;
    s.outcome.unacked = (0..s.input.counters.len())
        .map(|i| s.input.outbox.unacked_packets(i))
        .collect();
    (s.outcome, result)
}

impl Session<'_> {
    async fn run(&mut self) -> Result<()> {
        let mut stats_tick = tokio::time::interval_at(Instant::now() + STATS_EVERY, STATS_EVERY);
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.stopping.is_some()
                && self.captures_done
                && self.input.outbox.is_empty()
                && !matches!(self.conn, Conn::Up(_) | Conn::Joining { .. })
            {
                // Nothing left to deliver: waiting for the receiver would only be for the
                // final statistics.
                return self.give_up();
            }
            let give_up_at = self.give_up_at().unwrap_or_else(far_future);
            let want_room = self.input.outbox.next_unsent().is_some() || self.goodbye_due();
            tokio::select! {
                biased;
                _ = self.input.shutdown.notified(), if self.stopping.is_none() => {
                    tracing::info!("stopping: delivering what was captured to the receiver");
                    self.stopping = Some(Instant::now());
                    for stop in self.input.stoppers {
                        stop();
                    }
                }
                // Intake first: the capture threads' channel must not fill while there is
                // room here.
                item = self.input.batches.recv(), if !self.captures_done && self.input.outbox.has_room() => {
                    match item {
                        Some(out) => {
                            if let Err(e) = self.input.outbox.push(out) {
                                tracing::error!("spool write failed: {e}; holding further batches in memory only");
                            }
                        }
                        None => self.captures_done = true,
                    }
                }
                activity = activity(&mut self.conn, want_room) => match activity {
                    Activity::Event(event) => {
                        if self.on_event(event).await? {
                            return Ok(());
                        }
                    }
                    Activity::Connected(connected) => self.on_connected(connected)?,
                    Activity::RetryDue => self.start_connecting(),
                    Activity::Room(permit) => self.send_next(permit),
                },
                _ = tokio::time::sleep_until(give_up_at) => return self.give_up(),
                _ = stats_tick.tick() => {
                    if let Conn::Up(link) = &self.conn {
                        let rtt = u64::try_from(link.rtt().as_micros()).unwrap_or(u64::MAX);
                        self.input.link.rtt_micros.store(rtt, Relaxed);
                        if !self.goodbye_sent {
                            link.try_send(self.stats_frame());
                        }
                    }
                }
            }
        }
    }

    /// Everything captured has gone out on this connection: time for the last statistics
    /// and the Goodbye.
    fn goodbye_due(&self) -> bool {
        self.captures_done
            && self.input.outbox.all_sent()
            && !self.goodbye_sent
            && matches!(self.conn, Conn::Up(_))
    }

    /// Sends the next batch, or else the closing frames, in the room the stream has.
    fn send_next(&mut self, permit: mpsc::OwnedPermit<Bytes>) {
        let Some(out) = self.input.outbox.next_unsent() else {
            if self.goodbye_due() {
                // Statistics last, so that they count every packet; then the Goodbye.
                let mut frames = BytesMut::from(&self.stats_frame()[..]);
                Message::Goodbye(Goodbye).encode(&mut frames);
                permit.send(frames.freeze());
                self.goodbye_sent = true;
            }
            return;
        };
        permit.send(in_session(
            &out.batch.frame,
            self.input.session_id.load(Relaxed),
        ));
        if out.sequence > self.highest_sent {
            self.highest_sent = out.sequence;
            self.outcome.batches += 1;
        } else {
            self.outcome.resent += 1;
        }
        self.input.outbox.mark_sent();
    }

    /// Handles what a connection reported; `Ok(true)` when the session is complete.
    async fn on_event(&mut self, event: LinkEvent) -> Result<bool> {
        match event {
            LinkEvent::Ack(sequence) => {
                let joining = matches!(self.conn, Conn::Joining { .. });
                let known = self.highest_sent.max(self.highest_acked);
                if acks_the_unsent(sequence, known, joining && self.first_connection) {
                    self.new_session();
                    let delay = self.disconnect();
                    tracing::error!(
                        "receiver {} acknowledged batch {sequence}, past the last this sensor \
                         sent ({known}): another connection has taken over the session; \
                         sending the {} batch(es) held under new session {:016x} in {:.1}s",
                        self.client.remote(),
                        self.input.outbox.len(),
                        self.input.session_id.load(Relaxed),
                        delay.as_secs_f64()
                    );
                    return Ok(false);
                }
                self.highest_acked = self.highest_acked.max(sequence);
                self.acknowledge(sequence);
                if joining {
                    let Conn::Joining { link, .. } = std::mem::replace(
                        &mut self.conn,
                        Conn::Down {
                            retry_at: Instant::now(),
                        },
                    ) else {
                        unreachable!("matched above")
                    };
                    self.joined(link, sequence);
                }
                Ok(false)
            }
            LinkEvent::Goodbye if self.goodbye_sent && self.input.outbox.is_empty() => Ok(true),
            LinkEvent::Goodbye => {
                self.lost("receiver ended the session early");
                Ok(false)
            }
            LinkEvent::Refused { code, message } => self.refused(code, message).map(|()| false),
            LinkEvent::Lost(why) => {
                // The receiver's reason, if it sent one before the connection broke.
                let last = match &mut self.conn {
                    Conn::Up(link) | Conn::Joining { link, .. } => {
                        tokio::time::timeout(ERROR_GRACE, link.events.recv()).await
                    }
                    _ => Ok(None),
                };
                match last {
                    Ok(Some(LinkEvent::Refused { code, message })) => {
                        self.refused(code, message)?
                    }
                    _ => self.lost(&why),
                }
                Ok(false)
            }
        }
    }

    fn acknowledge(&mut self, sequence: u64) {
        let counters = self.input.counters;
        let mut released = 0;
        self.input.outbox.ack(sequence, |r| {
            released += 1;
            if let Some(c) = counters.get(usize::from(r.interface_id)) {
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

    /// The receiver accepted the session and said where it resumes.
    fn joined(&mut self, link: Link, resume: u64) {
        self.input.outbox.rewind();
        let pending = self.input.outbox.len();
        if self.input.link.reconnects.load(Relaxed) > 0
            || self.down_since.is_some_and(|t| t.elapsed() > STATS_EVERY)
        {
            tracing::warn!(
                "reconnected to receiver {}: it has every batch up to {resume}; sending {pending} held batch(es)",
                self.client.remote()
            );
        } else {
            tracing::info!("connected to receiver {}", self.client.remote());
        }
        self.first_connection = false;
        self.backoff = FIRST_RETRY;
        self.down_since = None;
        self.goodbye_sent = false;
        self.input.link.rtt_micros.store(
            u64::try_from(link.rtt().as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
        self.input.link.up.store(true, Relaxed);
        self.conn = Conn::Up(link);
    }

    fn refused(&mut self, code: ErrorCode, message: String) -> Result<()> {
        let remote = self.client.remote();
        match after_refusal(code, self.first_connection) {
            AfterRefusal::Retry => self.lost(&message),
            AfterRefusal::NewSession => {
                self.new_session();
                let delay = self.disconnect();
                tracing::error!(
                    "receiver {remote} cannot resume this session ({message}): sending the {} \
                     batch(es) held under new session {:016x} in {:.1}s",
                    self.input.outbox.len(),
                    self.input.session_id.load(Relaxed),
                    delay.as_secs_f64()
                );
            }
            AfterRefusal::Stop => {
                return Err(Error::runtime(format!(
                    "receiver {remote} refused this sensor: {message}"
                )))
            }
            AfterRefusal::RetryLoudly => {
                let delay = self.disconnect();
                tracing::error!(
                    "receiver {remote} refused this sensor: {message}; it accepted it before, \
                     so trying again in {:.1}s ({} batch(es) held)",
                    delay.as_secs_f64(),
                    self.input.outbox.len()
                );
            }
        }
        Ok(())
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

    /// The connection is gone: try again after the backoff.
    fn lost(&mut self, why: &str) {
        let delay = self.disconnect();
        tracing::warn!(
            "receiver {}: {why}; reconnecting in {:.1}s ({} batch(es) held)",
            self.client.remote(),
            delay.as_secs_f64(),
            self.input.outbox.len()
        );
    }

    /// Closes the connection, if any, and schedules the next attempt; returns its delay.
    fn disconnect(&mut self) -> Duration {
        if let Conn::Up(link) | Conn::Joining { link, .. } = std::mem::replace(
            &mut self.conn,
            Conn::Down {
                retry_at: Instant::now(),
            },
        ) {
            link.close(false);
            self.input.link.up.store(false, Relaxed);
            self.input.link.reconnects.fetch_add(1, Relaxed);
        }
        self.down_since.get_or_insert_with(Instant::now);
        self.goodbye_sent = false;
        let delay = self.next_delay();
        self.conn = Conn::Down {
            retry_at: Instant::now() + delay,
        };
        delay
    }

    fn start_connecting(&mut self) {
        self.conn = Conn::Connecting(spawn_connect(&self.client, self.hello_frame.clone()));
    }

    fn on_connected(&mut self, connected: Result<Link, ConnectError>) -> Result<()> {
        match connected {
            Ok(link) => {
                self.conn = Conn::Joining {
                    link,
                    deadline: Instant::now() + JOIN_TIMEOUT,
                };
                Ok(())
            }
            Err(e) if e.permanent && self.first_connection => Err(e.error),
            Err(e) => {
                self.first_connection = false;
                let delay = self.next_delay();
                let held = self.input.outbox.len();
                let wait = delay.as_secs_f64();
                if e.permanent {
                    // Accepted before, or unreachable at first: forged, or the path changed.
                    tracing::error!(
                        "{}; retrying in {wait:.1}s ({held} batch(es) held)",
                        e.error
                    );
                } else {
                    tracing::warn!(
                        "{}; retrying in {wait:.1}s ({held} batch(es) held)",
                        e.error
                    );
                }
                self.conn = Conn::Down {
                    retry_at: Instant::now() + delay,
                };
                Ok(())
            }
        }
    }

    /// Exponential backoff with full jitter between half and all of the step, so that
    /// many sensors cut off together do not come back in step.
    fn next_delay(&mut self) -> Duration {
        let step = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    /// When an unreachable receiver is given up on: after --give-up-after without a
    /// connection, and after a stop signal at the latest STOP_GRACE later.
    fn give_up_at(&self) -> Option<Instant> {
        let down = self.down_since?;
        let running = self.input.give_up_after.map(|d| down + d);
        let stopping = self
            .stopping
            .map(|t| t.max(down) + self.input.give_up_after.unwrap_or(STOP_GRACE));
        match (running, stopping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn give_up(&mut self) -> Result<()> {
        let waited = self.down_since.map_or(Duration::ZERO, |t| t.elapsed());
        if self.captures_done && self.input.outbox.is_empty() {
            tracing::warn!(
                "receiver {} unreachable at the end (for {:.0}s): every batch was \
                 acknowledged, but the final statistics were not delivered",
                self.client.remote(),
                waited.as_secs_f64()
            );
            return Ok(());
        }
        Err(Error::runtime(format!(
            "gave up on receiver {} after {:.0}s without a connection; {} batch(es) \
             unacknowledged are lost (see the summary)",
            self.client.remote(),
            waited.as_secs_f64(),
            self.input.outbox.len()
        )))
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

/// What the current connection (or the lack of one) asks for next.
enum Activity {
    Event(LinkEvent),
    Connected(Result<Link, ConnectError>),
    RetryDue,
    /// Room on the stream for the next batch.
    Room(mpsc::OwnedPermit<Bytes>),
}

/// Waits for the current connection's next activity. A connection that stays silent after
/// the Hello counts as lost.
async fn activity(conn: &mut Conn, want_room: bool) -> Activity {
    let event = match conn {
        Conn::Down { retry_at } => {
            tokio::time::sleep_until(*retry_at).await;
            return Activity::RetryDue;
        }
        Conn::Connecting(task) => {
            return Activity::Connected(task.await.unwrap_or_else(|e| Err(task_failed(e))))
        }
        Conn::Attempted(done) => match done.take() {
            Some(done) => return Activity::Connected(done),
            None => std::future::pending().await,
        },
        Conn::Joining { link, deadline } => {
            match tokio::time::timeout_at(*deadline, link.events.recv()).await {
                Ok(event) => event,
                Err(_) => {
                    return Activity::Event(LinkEvent::Lost(format!(
                        "no answer to Hello within {}s",
                        JOIN_TIMEOUT.as_secs()
                    )))
                }
            }
        }
        Conn::Up(link) => {
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
    hello: Bytes,
) -> tokio::task::JoinHandle<Result<Link, ConnectError>> {
    let client = Arc::clone(client);
    tokio::spawn(async move { client.connect(hello).await })
}

fn task_failed(e: tokio::task::JoinError) -> ConnectError {
    ConnectError {
        error: Error::runtime(format!("connecting failed: {e}")),
        permanent: false,
    }
}

/// Whether an acknowledgement of `sequence` covers batches this sensor never sent on any
/// connection, nor saw acknowledged (`known`): a receiver only acknowledges what it was
/// sent, so someone else sent them under this session, and releasing the held batches of
/// those numbers as delivered would lose them. The resume point of the process's first
/// connection (`resuming`) is taken as it is: it may cover what a previous process of a
/// resumed spool sent.
fn acks_the_unsent(sequence: u64, known: u64, resuming: bool) -> bool {
    !resuming && sequence > known
}

/// What the sensor does when the receiver refuses it.
#[derive(Debug, PartialEq, Eq)]
enum AfterRefusal {
    /// A passing state of the receiver, which keeps the session: reconnect.
    Retry,
    /// The session cannot be resumed: start a new one and send what is held under it.
    NewSession,
    /// A misconfiguration met by the first connection: stop with its message.
    Stop,
    /// What stopped the first connection, met later: forged, or a receiver's mistake;
    /// logged as an error and retried.
    RetryLoudly,
}

fn after_refusal(code: ErrorCode, first_connection: bool) -> AfterRefusal {
    match code {
        ErrorCode::SHUTTING_DOWN | ErrorCode::UNAVAILABLE => AfterRefusal::Retry,
        ErrorCode::SESSION_REFUSED => AfterRefusal::NewSession,
        _ if first_connection => AfterRefusal::Stop,
        _ => AfterRefusal::RetryLoudly,
    }
}

/// `frame`, a batch, stamped with `session_id`: batches made before the session changed
/// (see [`Session::new_session`]) are copied with the new id; the rest go as they are.
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

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_connection_stops_the_sensor() {
        for code in [
            ErrorCode::VERSION,
            ErrorCode::UNSUPPORTED_LINK_TYPE,
            ErrorCode::UNAUTHENTICATED,
            ErrorCode::PROTOCOL,
        ] {
            assert_eq!(after_refusal(code, true), AfterRefusal::Stop, "{code:?}");
            assert_eq!(
                after_refusal(code, false),
                AfterRefusal::RetryLoudly,
                "{code:?}"
            );
        }
        for first in [true, false] {
            assert_eq!(
                after_refusal(ErrorCode::UNAVAILABLE, first),
                AfterRefusal::Retry
            );
            assert_eq!(
                after_refusal(ErrorCode::SHUTTING_DOWN, first),
                AfterRefusal::Retry
            );
            assert_eq!(
                after_refusal(ErrorCode::SESSION_REFUSED, first),
                AfterRefusal::NewSession
            );
        }
    }

    #[test]
    fn an_ack_of_batches_never_sent_means_a_takeover() {
        assert!(!acks_the_unsent(0, 0, false), "a new session");
        assert!(!acks_the_unsent(7, 7, false));
        assert!(acks_the_unsent(8, 7, false));
        assert!(
            !acks_the_unsent(500, 0, true),
            "a resumed spool's first resume point"
        );
    }

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
