//! The delivery state machine, sans-IO: what the sensor does about its connection to the
//! receiver, decided from events and the time passed in, never read from a clock of its
//! own. It does no I/O: it returns a [`Step`] that says what to do, and exposes its next
//! deadline ([`Delivery::poll_timeout`]). The driver in [`crate::delivery`] only moves
//! bytes and time; the unit tests below drive it with plain calls and a fake clock.
//!
//! The batches themselves are in the [`crate::outbox::Outbox`], which the driver owns: it
//! tells the machine what the machine needs of it (whether everything is sent, or
//! acknowledged).
//!
//! # Transitions
//!
//! | # | From                 | Event                                          | To                    | Step                          |
//! |---|----------------------|------------------------------------------------|-----------------------|-------------------------------|
//! | 1 | Connecting           | connected                                      | Joining (deadline)    | (wait for the Ack)            |
//! | 2 | Connecting           | failed for good, first connection              | Failed                | `Fail(FirstConnection)`       |
//! | 3 | Connecting           | failed (later, or may pass)                    | Down (backoff)        | `Retry(ConnectFailed)`        |
//! | 4 | Down                 | retry time reached                             | Connecting            | `Connect`                     |
//! | 5 | Joining              | Ack (resume point)                             | Up                    | `Joined`                      |
//! | 6 | Joining              | join deadline passed                           | Down (backoff)        | `Retry(NoAnswerToHello)`      |
//! | 7 | Joining, Up          | Ack beyond anything sent (not first resume)    | Down, new session     | `NewSession(Takeover)`        |
//! | 8 | Up                   | Ack                                            | Up                    | `Release`                     |
//! | 9 | Joining, Up          | connection lost                                | Down (backoff)        | `Retry(Lost)`                 |
//! |10 | Up                   | Goodbye, ours sent and everything acknowledged | Finished              | `Finish(Complete)`            |
//! |11 | Joining, Up          | Goodbye otherwise                              | Down (backoff)        | `Retry(EndedEarly)`           |
//! |12 | Joining, Up          | refused: UNAVAILABLE or SHUTTING_DOWN          | Down (backoff)        | `Retry(Unavailable)`          |
//! |13 | Joining, Up          | refused: SESSION_REFUSED                       | Down, new session     | `NewSession(Refused)`         |
//! |14 | Joining              | refused otherwise, first connection            | Failed                | `Fail(Refused)`               |
//! |15 | Joining, Up          | refused otherwise, later                       | Down (backoff)        | `Retry(RefusedAgain)`         |
//! |16 | not Up               | give-up time, something unacknowledged         | Failed                | `Fail(GaveUp)`                |
//! |17 | not Up               | give-up time, everything acknowledged          | Finished              | `Finish(StatisticsUndelivered)`|
//! |18 | Down, Connecting     | stopping, captures ended, everything acked     | Finished              | `Finish(StatisticsUndelivered)`|
//! |19 | Up                   | room, a batch unsent                           | Up                    | `Frame::Batch`                |
//! |20 | Up                   | room, all sent, captures ended                 | Up (Goodbye sent)     | `Frame::Goodbye`              |
//! |21 | Up                   | statistics time                                | Up                    | `Stats`                       |
//! |22 | any                  | stop signal                                    | same (stopping)       | stop the captures, once       |
//! |23 | not Up               | failover time (several receivers)              | Connecting            | `FailOver`                    |
//! |24 | Joining, joined once | Ack below what another receiver acknowledged   | Down, new session     | `NewSession(Behind)`          |
//!
//! Backoff: exponential from [`FIRST_RETRY`] to [`MAX_RETRY`], each delay a random fraction
//! (half to all) of its step, so that many sensors cut off together do not come back in
//! step; the fraction comes from an injected [`Jitter`]. Give-up: after --give-up-after
//! without a connection, and after a stop signal at the latest [`STOP_GRACE`] (or
//! --give-up-after) later.
//!
//! Failover (with several receivers, see [`super::fleet`]): the current receiver is
//! unreachable from the moment it was last heard from (a connection that timed out was
//! silent for the whole idle timeout before), or from the start while it was never
//! reached, or from the last failover. Once it has been unreachable for --failover-after
//! with no session up, the sensor moves to the next receiver at once, keeps its session
//! (so that batches sent to both receivers are the same session, sequence and record)
//! and sends it every unacknowledged batch. The backoff goes on growing across
//! failovers: with every receiver down the sensor goes round them, one attempt or a few
//! each, no faster than the backoff allows, holding what it captured within the outbox's
//! counted limits. It stays on the receiver it moved to until that one fails in turn or
//! the sensor restarts (no flapping back to one that is coming and going). A receiver
//! that knows the session but is behind what another one acknowledged (come back to
//! after a round) could not take the next batch (sequences grow by one), so the session
//! continues under a new id there (transition 24).

use std::time::{Duration, Instant};

use program::backoff::Backoff;
use protocol::ErrorCode;

/// How often the statistics go to the receiver.
pub const STATS_EVERY: Duration = Duration::from_secs(1);
/// A receiver that accepts a connection must say where the session resumes this soon.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The first backoff step.
pub const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The largest backoff step.
pub const MAX_RETRY: Duration = Duration::from_secs(5);
/// After a stop signal, how long an unreachable receiver is waited for when
/// --give-up-after is not set.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// The fraction of a backoff step to wait, between 0.5 and 1.
pub type Jitter = Box<dyn FnMut() -> f64 + Send>;

/// Full jitter between half and all of the step, from the thread's random generator.
pub fn random_jitter() -> Jitter {
    Box::new(|| rand::random_range(0.5..=1.0))
}

/// Where the connection to the receiver is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting to try again.
    Down { retry_at: Instant },
    /// An attempt is under way (handshake, stream, Hello).
    Connecting,
    /// Hello sent, waiting for the receiver's resume point.
    Joining { deadline: Instant },
    /// The receiver said where the session resumes: batches flow.
    Up,
    /// The session is over: Goodbye exchanged, or nothing was left to deliver.
    Finished,
    /// The session failed for good.
    Failed,
}

/// What the driver does after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing beyond the machine's own bookkeeping.
    Continue,
    /// Start a connection attempt with the current Hello.
    Connect,
    /// Release the batches acknowledged up to this sequence.
    Release(u64),
    /// The receiver took the session in and has every batch up to `resume`: release those,
    /// send the rest again from the oldest, and count the link as up.
    Joined {
        resume: u64,
        /// A reconnection, or a first connection that took a while: worth a warning.
        after_outage: bool,
    },
    /// Close the connection, if any, and try again in `delay`.
    Retry { delay: Duration, cause: RetryCause },
    /// Close the connection or end the attempt, if any, and connect to the next receiver
    /// (its addresses resolved again) at once.
    FailOver,
    /// Close the connection, if any, take a new session id and secret, and send what is
    /// held under them in `delay`.
    NewSession {
        delay: Duration,
        cause: NewSessionCause,
    },
    /// Time for statistics on the link that is up: refresh its round-trip time, and send
    /// them unless the Goodbye went already.
    Stats { send: bool },
    /// The session ends well.
    Finish(Finish),
    /// The session ends in failure.
    Fail(Fatal),
}

/// Why the connection is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// The attempt failed; `loud` when that would have been fatal for the first connection
    /// (forged, or the path changed: logged as an error).
    ConnectFailed { loud: bool },
    /// The receiver did not say where the session resumes within [`JOIN_TIMEOUT`].
    NoAnswerToHello,
    /// The connection broke.
    Lost,
    /// The receiver said Goodbye before this sensor did.
    EndedEarly,
    /// A passing state of the receiver (unavailable, shutting down), which keeps the
    /// session.
    Unavailable,
    /// What stopped the first connection, met later: forged, or a receiver's mistake.
    RefusedAgain,
}

/// Why the session is given a new id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSessionCause {
    /// The receiver cannot resume the session (`SESSION_REFUSED`).
    Refused,
    /// The receiver acknowledged `acked`, past `known`, the last this sensor sent or saw
    /// acknowledged: another connection took the session over.
    Takeover { acked: u64, known: u64 },
    /// The receiver resumes the session after `resume`, behind `acked`, which another
    /// receiver acknowledged: the batches between are released, so it could not take the
    /// next one.
    Behind { resume: u64, acked: u64 },
}

/// How a session that ends well ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Goodbye exchanged: everything delivered.
    Complete,
    /// Everything was acknowledged, but the receiver was unreachable at the end for
    /// `waited`, so the final statistics were not delivered.
    StatisticsUndelivered { waited: Duration },
}

/// How a session fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fatal {
    /// The first connection attempt failed for good (TLS verification, names, versions).
    FirstConnection,
    /// The receiver refused the first connection (token, version, link type).
    Refused,
    /// No connection for `waited`: what is unacknowledged is lost.
    GaveUp { waited: Duration },
}

/// The frame to send in the room the stream has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// The next unsent batch; `again` when an earlier connection sent it already.
    Batch { again: bool },
    /// The last statistics and the Goodbye.
    Goodbye,
}

/// The delivery state machine: see the module documentation.
pub struct Delivery {
    state: State,
    /// Until the first connection attempt has an outcome: its failures are fatal.
    first_connection: bool,
    /// Whether a receiver has answered one of this process's Hellos. Until then its resume
    /// point is taken as it is, however far it goes: it may cover what an earlier process
    /// of a resumed spool sent, and the first attempt may well have failed (the receiver
    /// restarting, which is when a spool is resumed).
    joined: bool,
    /// The highest sequence sent on any connection: what goes again counts as resent.
    highest_sent: u64,
    /// The highest sequence a receiver acknowledged or resumed after.
    highest_acked: u64,
    backoff: Backoff,
    jitter: Jitter,
    /// Since when no connection has been up.
    down_since: Option<Instant>,
    /// Connections that were up or joining and were dropped.
    reconnects: u64,
    captures_done: bool,
    stopping: Option<Instant>,
    goodbye_sent: bool,
    give_up_after: Option<Duration>,
    next_stats: Instant,
    /// --failover-after; `None` with one receiver.
    failover_after: Option<Duration>,
    /// Since when the current receiver has not been heard from, while no session is up.
    unreachable_since: Option<Instant>,
    /// Moves to another receiver.
    failovers: u64,
}

impl Delivery {
    /// A session whose first connection attempt started at `now`; `failover_after`: with
    /// several receivers, how long the current one may be unreachable.
    pub fn new(
        now: Instant,
        give_up_after: Option<Duration>,
        failover_after: Option<Duration>,
        jitter: Jitter,
    ) -> Self {
        Self {
            state: State::Connecting,
            first_connection: true,
            joined: false,
            highest_sent: 0,
            highest_acked: 0,
            backoff: Backoff::new(FIRST_RETRY, MAX_RETRY),
            jitter,
            down_since: Some(now),
            reconnects: 0,
            captures_done: false,
            stopping: None,
            goodbye_sent: false,
            give_up_after,
            next_stats: now + STATS_EVERY,
            failover_after,
            unreachable_since: Some(now),
            failovers: 0,
        }
    }

    /// Where the connection is (the driver holds the connection itself, and asks the
    /// machine's other questions).
    #[cfg(test)]
    pub fn state(&self) -> State {
        self.state
    }

    /// Connections dropped after they were up or joining.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Moves to another receiver.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Whether a stop signal came.
    pub fn stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// Whether every capture has ended.
    pub fn captures_done(&self) -> bool {
        self.captures_done
    }

    /// A stop signal: `true` the first time, when the captures are to be stopped.
    pub fn on_stop_signal(&mut self, now: Instant) -> bool {
        if self.stopping.is_some() {
            return false;
        }
        self.stopping = Some(now);
        true
    }

    /// Every capture has ended: nothing more will come into the outbox.
    pub fn on_captures_done(&mut self) {
        self.captures_done = true;
    }

    /// The attempt connected and sent the Hello: the receiver's answer is awaited.
    pub fn on_connected(&mut self, now: Instant) {
        self.state = State::Joining {
            deadline: now + JOIN_TIMEOUT,
        };
    }

    /// The attempt failed; `permanent`: TLS verification, names, versions, a refused
    /// client certificate (fatal for the first connection only).
    pub fn on_connect_failed(&mut self, now: Instant, permanent: bool) -> Step {
        if permanent && self.first_connection {
            self.state = State::Failed;
            return Step::Fail(Fatal::FirstConnection);
        }
        self.first_connection = false;
        let delay = self.next_delay();
        self.state = State::Down {
            retry_at: now + delay,
        };
        Step::Retry {
            delay,
            cause: RetryCause::ConnectFailed { loud: permanent },
        }
    }

    /// The receiver acknowledged every batch up to `sequence`; the first Ack on a
    /// connection is where the session resumes.
    pub fn on_ack(&mut self, now: Instant, sequence: u64) -> Step {
        let joining = matches!(self.state, State::Joining { .. });
        let known = self.highest_sent.max(self.highest_acked);
        if acks_the_unsent(sequence, known, joining && !self.joined) {
            let cause = NewSessionCause::Takeover {
                acked: sequence,
                known,
            };
            return self.new_session(now, cause);
        }
        if joining && self.joined && sequence > 0 && sequence < self.highest_acked {
            let cause = NewSessionCause::Behind {
                resume: sequence,
                acked: self.highest_acked,
            };
            return self.new_session(now, cause);
        }
        self.highest_acked = self.highest_acked.max(sequence);
        if !joining {
            return Step::Release(sequence);
        }
        let after_outage = self.reconnects > 0
            || self
                .down_since
                .is_some_and(|t| now.saturating_duration_since(t) > STATS_EVERY);
        self.first_connection = false;
        self.joined = true;
        self.backoff.reset();
        self.down_since = None;
        self.unreachable_since = None;
        self.goodbye_sent = false;
        self.state = State::Up;
        Step::Joined {
            resume: sequence,
            after_outage,
        }
    }

    /// The receiver said Goodbye; `all_acked`: the outbox is empty.
    pub fn on_goodbye(&mut self, now: Instant, all_acked: bool) -> Step {
        if self.goodbye_sent && all_acked {
            self.state = State::Finished;
            return Step::Finish(Finish::Complete);
        }
        self.retry(now, RetryCause::EndedEarly)
    }

    /// The receiver refused the session with `code`.
    pub fn on_refused(&mut self, now: Instant, code: ErrorCode) -> Step {
        match code {
            ErrorCode::SHUTTING_DOWN | ErrorCode::UNAVAILABLE => {
                self.retry(now, RetryCause::Unavailable)
            }
            ErrorCode::SESSION_REFUSED => self.new_session(now, NewSessionCause::Refused),
            _ if self.first_connection => {
                self.state = State::Failed;
                Step::Fail(Fatal::Refused)
            }
            _ => self.retry(now, RetryCause::RefusedAgain),
        }
    }

    /// The connection broke; `silent_for`: how long the receiver had not been heard from
    /// (the idle timeout, when that is what ended it).
    pub fn on_lost(&mut self, now: Instant, silent_for: Duration) -> Step {
        let delay = self.disconnect(now, silent_for);
        Step::Retry {
            delay,
            cause: RetryCause::Lost,
        }
    }

    /// The next time [`Delivery::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let connection = match self.state {
            State::Down { retry_at } => Some(retry_at),
            State::Joining { deadline } => Some(deadline),
            State::Finished | State::Failed => return None,
            State::Connecting | State::Up => None,
        };
        [
            connection,
            self.give_up_at(),
            self.failover_at(),
            Some(self.next_stats),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// What is due at `now`, one thing at a time (the driver asks again at once when the
    /// next deadline has passed too); `all_acked`: the outbox is empty.
    pub fn handle_timeout(&mut self, now: Instant, all_acked: bool) -> Step {
        if self.failover_at().is_some_and(|t| t <= now) {
            return self.fail_over(now);
        }
        match self.state {
            State::Down { retry_at } if retry_at <= now => {
                self.state = State::Connecting;
                return Step::Connect;
            }
            State::Joining { deadline } if deadline <= now => {
                return self.retry(now, RetryCause::NoAnswerToHello);
            }
            State::Finished | State::Failed => return Step::Continue,
            _ => {}
        }
        if self.give_up_at().is_some_and(|t| t <= now) {
            return self.give_up(now, all_acked);
        }
        if self.next_stats <= now {
            self.next_stats = now + STATS_EVERY;
            if self.state == State::Up {
                return Step::Stats {
                    send: !self.goodbye_sent,
                };
            }
        }
        Step::Continue
    }

    /// After a stop signal, once the captures ended and everything is acknowledged with no
    /// connection up: waiting for the receiver would only be for the final statistics.
    pub fn nothing_left(&mut self, now: Instant, all_acked: bool) -> Option<Step> {
        let connected = matches!(self.state, State::Up | State::Joining { .. });
        (self.stopping.is_some() && self.captures_done && all_acked && !connected)
            .then(|| self.give_up(now, true))
    }

    /// Whether the stream should be asked for room: something to send on a link that is up.
    pub fn wants_room(&self, has_unsent: bool, all_sent: bool) -> bool {
        self.state == State::Up && (has_unsent || self.goodbye_due(all_sent))
    }

    /// Room on the stream: what goes into it. `next_unsent`: the sequence of the outbox's
    /// next unsent batch.
    pub fn on_room(&mut self, next_unsent: Option<u64>, all_sent: bool) -> Option<Frame> {
        match next_unsent {
            Some(sequence) if sequence > self.highest_sent => {
                self.highest_sent = sequence;
                Some(Frame::Batch { again: false })
            }
            Some(_) => Some(Frame::Batch { again: true }),
            None if self.goodbye_due(all_sent) => {
                self.goodbye_sent = true;
                Some(Frame::Goodbye)
            }
            None => None,
        }
    }

    /// Everything captured has gone out on this connection: time for the last statistics
    /// and the Goodbye.
    fn goodbye_due(&self, all_sent: bool) -> bool {
        self.captures_done && all_sent && !self.goodbye_sent && self.state == State::Up
    }

    fn new_session(&mut self, now: Instant, cause: NewSessionCause) -> Step {
        let delay = self.disconnect(now, Duration::ZERO);
        Step::NewSession { delay, cause }
    }

    fn retry(&mut self, now: Instant, cause: RetryCause) -> Step {
        let delay = self.disconnect(now, Duration::ZERO);
        Step::Retry { delay, cause }
    }

    /// Leaves the connection, if any, and schedules the next attempt; returns its delay.
    /// `silent_for`: how long before `now` the receiver was last heard from.
    fn disconnect(&mut self, now: Instant, silent_for: Duration) -> Duration {
        if matches!(self.state, State::Up | State::Joining { .. }) {
            self.reconnects += 1;
        }
        self.down_since.get_or_insert(now);
        // Failover counts from the last word heard; giving up, from the connection's end.
        self.unreachable_since
            .get_or_insert(now.checked_sub(silent_for).unwrap_or(now));
        self.goodbye_sent = false;
        let delay = self.next_delay();
        self.state = State::Down {
            retry_at: now + delay,
        };
        delay
    }

    fn next_delay(&mut self) -> Duration {
        self.backoff
            .delay()
            .mul_f64((self.jitter)().clamp(0.5, 1.0))
    }

    /// When the current receiver has been unreachable long enough to move on.
    fn failover_at(&self) -> Option<Instant> {
        match self.state {
            State::Up | State::Finished | State::Failed => None,
            State::Down { .. } | State::Connecting | State::Joining { .. } => {
                Some(self.unreachable_since? + self.failover_after?)
            }
        }
    }

    /// Leaves the current receiver (and any attempt on it) for the next one, now.
    fn fail_over(&mut self, now: Instant) -> Step {
        if matches!(self.state, State::Joining { .. }) {
            self.reconnects += 1;
        }
        self.failovers += 1;
        self.unreachable_since = Some(now);
        self.down_since.get_or_insert(now);
        self.goodbye_sent = false;
        self.state = State::Connecting;
        Step::FailOver
    }

    /// When an unreachable receiver is given up on.
    fn give_up_at(&self) -> Option<Instant> {
        let down = self.down_since?;
        let running = self.give_up_after.map(|d| down + d);
        let stopping = self
            .stopping
            .map(|t| t.max(down) + self.give_up_after.unwrap_or(STOP_GRACE));
        match (running, stopping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn give_up(&mut self, now: Instant, all_acked: bool) -> Step {
        let waited = self
            .down_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        if self.captures_done && all_acked {
            self.state = State::Finished;
            return Step::Finish(Finish::StatisticsUndelivered { waited });
        }
        self.state = State::Failed;
        Step::Fail(Fatal::GaveUp { waited })
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

#[cfg(test)]
mod tests;
