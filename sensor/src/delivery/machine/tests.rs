//! Every transition of the module's table, numbered as there, with a fake clock: time is
//! an `Instant` taken once and moved forward by hand.

use super::*;

const SECOND: Duration = Duration::from_secs(1);

/// A machine whose backoff is always the whole step.
fn machine(t0: Instant, give_up_after: Option<Duration>) -> Delivery {
    Delivery::new(t0, give_up_after, None, Box::new(|| 1.0))
}

/// A machine joined at `t0` (first connection, resume point 0).
fn joined(t0: Instant) -> Delivery {
    let mut d = machine(t0, None);
    d.on_connected(t0);
    assert_eq!(
        d.on_ack(t0, 0),
        Step::Joined {
            resume: 0,
            after_outage: false
        }
    );
    d
}

/// Sends batches `1..=n` on a machine that is up.
fn send(d: &mut Delivery, n: u64) {
    for sequence in 1..=n {
        assert_eq!(
            d.on_room(Some(sequence), false),
            Some(Frame::Batch { again: false })
        );
    }
}

#[test]
fn t01_connected_waits_for_the_resume_point() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    assert_eq!(d.state(), State::Connecting);
    d.on_connected(t0 + SECOND);
    assert_eq!(
        d.state(),
        State::Joining {
            deadline: t0 + SECOND + JOIN_TIMEOUT
        }
    );
}

#[test]
fn t02_the_first_connection_failing_for_good_is_fatal() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    assert_eq!(
        d.on_connect_failed(t0, true),
        Step::Fail(Fatal::FirstConnection)
    );
    assert_eq!(d.state(), State::Failed);
    assert_eq!(d.poll_timeout(), None);
}

#[test]
fn t03_other_connect_failures_back_off_exponentially() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    // Unreachable at first: retried, and from then on even "permanent" failures are.
    assert_eq!(
        d.on_connect_failed(t0, false),
        Step::Retry {
            delay: FIRST_RETRY,
            cause: RetryCause::ConnectFailed { loud: false }
        }
    );
    assert_eq!(
        d.state(),
        State::Down {
            retry_at: t0 + FIRST_RETRY
        }
    );
    let mut delays = Vec::new();
    for _ in 0..6 {
        assert_eq!(d.handle_timeout(t0, false), Step::Continue, "not due yet");
        let State::Down { retry_at } = d.state() else {
            panic!("not down: {:?}", d.state())
        };
        assert_eq!(d.handle_timeout(retry_at, false), Step::Connect);
        match d.on_connect_failed(retry_at, true) {
            Step::Retry {
                delay,
                cause: RetryCause::ConnectFailed { loud: true },
            } => delays.push(delay),
            other => panic!("{other:?}"),
        }
    }
    let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
    assert_eq!(ms, [500, 1000, 2000, 4000, 5000, 5000]);
}

#[test]
fn backoff_takes_the_injected_jitter_within_half_and_all_of_the_step() {
    let t0 = Instant::now();
    let fractions = [0.5, 0.75, 7.0];
    let mut next = fractions.into_iter();
    let mut d = Delivery::new(t0, None, None, Box::new(move || next.next().unwrap_or(1.0)));
    let mut delay = || match d.on_connect_failed(t0, false) {
        Step::Retry { delay, .. } => delay.as_millis(),
        other => panic!("{other:?}"),
    };
    // Steps 250, 500, 1000 ms; an out-of-range fraction is held to the step.
    assert_eq!([delay(), delay(), delay()], [125, 375, 1000]);
}

#[test]
fn t04_down_connects_again_when_the_retry_is_due() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    d.on_connect_failed(t0, false);
    assert_eq!(d.poll_timeout(), Some(t0 + FIRST_RETRY));
    assert_eq!(
        d.handle_timeout(t0 + FIRST_RETRY - Duration::from_millis(1), false),
        Step::Continue
    );
    assert_eq!(d.handle_timeout(t0 + FIRST_RETRY, false), Step::Connect);
    assert_eq!(d.state(), State::Connecting);
}

#[test]
fn t05_the_resume_point_joins_and_resets_the_backoff() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    d.on_connect_failed(t0, false);
    d.on_connect_failed(t0, false);
    d.handle_timeout(t0 + 10 * SECOND, false);
    d.on_connected(t0 + 10 * SECOND);
    assert_eq!(
        d.on_ack(t0 + 10 * SECOND, 0),
        Step::Joined {
            resume: 0,
            after_outage: true
        }
    );
    assert_eq!(d.state(), State::Up);
    // Connected: the backoff starts again from its first step.
    match d.on_lost(t0 + 11 * SECOND, Duration::ZERO) {
        Step::Retry {
            delay,
            cause: RetryCause::Lost,
        } => assert_eq!(delay, FIRST_RETRY),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.reconnects(), 1);
}

#[test]
fn t05_a_prompt_first_connection_is_no_outage() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    d.on_connected(t0 + SECOND / 2);
    assert_eq!(
        d.on_ack(t0 + SECOND / 2, 0),
        Step::Joined {
            resume: 0,
            after_outage: false
        }
    );
}

#[test]
fn t06_no_answer_to_the_hello_is_a_lost_connection() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    d.on_connected(t0);
    assert_eq!(d.poll_timeout(), Some(t0 + SECOND), "statistics tick first");
    assert_eq!(d.handle_timeout(t0 + SECOND, false), Step::Continue);
    assert_eq!(d.poll_timeout(), Some(t0 + 2 * SECOND));
    assert_eq!(
        d.handle_timeout(t0 + JOIN_TIMEOUT, false),
        Step::Retry {
            delay: FIRST_RETRY,
            cause: RetryCause::NoAnswerToHello
        }
    );
    assert_eq!(d.reconnects(), 1);
}

#[test]
fn t07_an_ack_of_batches_never_sent_means_a_takeover() {
    let t0 = Instant::now();
    let mut d = joined(t0);
    send(&mut d, 7);
    assert_eq!(d.on_ack(t0, 7), Step::Release(7));
    assert_eq!(
        d.on_ack(t0, 8),
        Step::NewSession {
            delay: FIRST_RETRY,
            cause: NewSessionCause::Takeover { acked: 8, known: 7 }
        }
    );
    assert!(matches!(d.state(), State::Down { .. }));
    // A later connection's resume point past what was sent is a takeover too.
    d.handle_timeout(t0 + SECOND, false);
    d.on_connected(t0 + SECOND);
    assert!(matches!(
        d.on_ack(t0 + SECOND, 9),
        Step::NewSession {
            cause: NewSessionCause::Takeover { acked: 9, known: 7 },
            ..
        }
    ));
    // Resuming where it was is not.
    d.handle_timeout(t0 + 2 * SECOND, false);
    d.on_connected(t0 + 2 * SECOND);
    assert!(matches!(
        d.on_ack(t0 + 2 * SECOND, 7),
        Step::Joined { resume: 7, .. }
    ));
}

/// A resumed spool's sensor whose first attempts fail (its receiver restarting) still takes
/// the first resume point it is given, past what this process sent, as it is.
#[test]
fn t07_the_first_join_resumes_anywhere_even_after_failed_attempts() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    assert!(matches!(d.on_connect_failed(t0, false), Step::Retry { .. }));
    d.handle_timeout(t0 + SECOND, false);
    d.on_connected(t0 + SECOND);
    assert!(matches!(
        d.on_ack(t0 + SECOND, 500),
        Step::Joined { resume: 500, .. }
    ));
}

#[test]
fn t07_the_first_connection_resumes_anywhere_but_a_new_session_acks_nothing_unsent() {
    assert!(!acks_the_unsent(0, 0, false), "a new session");
    assert!(!acks_the_unsent(7, 7, false));
    assert!(acks_the_unsent(8, 7, false));
    assert!(
        !acks_the_unsent(500, 0, true),
        "a resumed spool's first resume point"
    );
}

#[test]
fn t08_acks_release_what_they_cover() {
    let t0 = Instant::now();
    let mut d = joined(t0);
    send(&mut d, 3);
    assert_eq!(d.on_ack(t0, 2), Step::Release(2));
    assert_eq!(d.on_ack(t0, 3), Step::Release(3));
    assert_eq!(d.state(), State::Up);
}

#[test]
fn t09_a_lost_connection_is_retried() {
    let t0 = Instant::now();
    for joining in [false, true] {
        let mut d = joined(t0);
        if joining {
            d.on_lost(t0, Duration::ZERO);
            d.handle_timeout(t0 + SECOND, false);
            d.on_connected(t0 + SECOND);
        }
        assert!(matches!(
            d.on_lost(t0 + SECOND, Duration::ZERO),
            Step::Retry {
                cause: RetryCause::Lost,
                ..
            }
        ));
        assert!(matches!(d.state(), State::Down { .. }));
    }
}

#[test]
fn t10_goodbye_after_ours_with_everything_acknowledged_completes() {
    let t0 = Instant::now();
    let mut d = joined(t0);
    send(&mut d, 2);
    d.on_captures_done();
    assert!(d.wants_room(false, true), "the Goodbye is due");
    assert_eq!(d.on_room(None, true), Some(Frame::Goodbye));
    assert!(!d.wants_room(false, true), "sent once");
    assert_eq!(d.on_ack(t0, 2), Step::Release(2));
    assert_eq!(d.on_goodbye(t0, true), Step::Finish(Finish::Complete));
    assert_eq!(d.state(), State::Finished);
}

#[test]
fn t11_an_early_goodbye_is_a_lost_connection() {
    let t0 = Instant::now();
    // Before ours.
    let mut d = joined(t0);
    assert!(matches!(
        d.on_goodbye(t0, true),
        Step::Retry {
            cause: RetryCause::EndedEarly,
            ..
        }
    ));
    // After ours, with batches still unacknowledged; and the Goodbye goes again on the
    // next connection.
    let mut d = joined(t0);
    send(&mut d, 1);
    d.on_captures_done();
    assert_eq!(d.on_room(None, true), Some(Frame::Goodbye));
    assert!(matches!(
        d.on_goodbye(t0, false),
        Step::Retry {
            cause: RetryCause::EndedEarly,
            ..
        }
    ));
    d.handle_timeout(t0 + SECOND, false);
    d.on_connected(t0 + SECOND);
    d.on_ack(t0 + SECOND, 1);
    assert_eq!(d.on_room(None, true), Some(Frame::Goodbye));
}

#[test]
fn t12_an_unavailable_or_stopping_receiver_is_retried() {
    let t0 = Instant::now();
    for code in [ErrorCode::UNAVAILABLE, ErrorCode::SHUTTING_DOWN] {
        for first in [true, false] {
            let mut d = machine(t0, None);
            if !first {
                d.on_connected(t0);
                d.on_ack(t0, 0);
            }
            d.on_connected(t0);
            assert!(
                matches!(
                    d.on_refused(t0, code),
                    Step::Retry {
                        cause: RetryCause::Unavailable,
                        ..
                    }
                ),
                "{code:?}"
            );
        }
    }
}

#[test]
fn t13_a_session_the_receiver_cannot_resume_becomes_a_new_one() {
    let t0 = Instant::now();
    for first in [true, false] {
        let mut d = machine(t0, None);
        d.on_connected(t0);
        if !first {
            d.on_ack(t0, 0);
        }
        assert_eq!(
            d.on_refused(t0, ErrorCode::SESSION_REFUSED),
            Step::NewSession {
                delay: FIRST_RETRY,
                cause: NewSessionCause::Refused
            }
        );
        assert!(matches!(d.state(), State::Down { .. }));
    }
}

#[test]
fn t14_t15_only_the_first_connection_stops_the_sensor() {
    let t0 = Instant::now();
    for code in [
        ErrorCode::VERSION,
        ErrorCode::UNSUPPORTED_LINK_TYPE,
        ErrorCode::UNAUTHENTICATED,
        ErrorCode::PROTOCOL,
    ] {
        let mut d = machine(t0, None);
        d.on_connected(t0);
        assert_eq!(
            d.on_refused(t0, code),
            Step::Fail(Fatal::Refused),
            "{code:?}"
        );
        assert_eq!(d.state(), State::Failed);
        // Accepted before: forged, or the receiver's mistake.
        let mut d = joined(t0);
        assert!(
            matches!(
                d.on_refused(t0, code),
                Step::Retry {
                    cause: RetryCause::RefusedAgain,
                    ..
                }
            ),
            "{code:?}"
        );
        // Unreachable at first: not the first connection's outcome any more.
        let mut d = machine(t0, None);
        d.on_connect_failed(t0, false);
        d.handle_timeout(t0 + SECOND, false);
        d.on_connected(t0 + SECOND);
        assert!(matches!(
            d.on_refused(t0 + SECOND, code),
            Step::Retry {
                cause: RetryCause::RefusedAgain,
                ..
            }
        ));
    }
}

#[test]
fn t16_give_up_after_without_a_connection_fails() {
    let t0 = Instant::now();
    let mut d = machine(t0, Some(30 * SECOND));
    d.on_connect_failed(t0, false);
    // Connected a while: the wait counts from when it went down.
    d.handle_timeout(t0 + SECOND, false);
    d.on_connected(t0 + SECOND);
    d.on_ack(t0 + SECOND, 0);
    // Up: no give-up deadline.
    assert_eq!(
        d.handle_timeout(t0 + 40 * SECOND, false),
        Step::Stats { send: true }
    );
    d.on_lost(t0 + 50 * SECOND, Duration::ZERO);
    let mut at = t0 + 50 * SECOND;
    loop {
        // (The statistics deadline may lie behind: it is due at once.)
        at = at.max(d.poll_timeout().expect("a deadline"));
        match d.handle_timeout(at, false) {
            Step::Connect => {
                d.on_connect_failed(at, false);
            }
            Step::Fail(Fatal::GaveUp { waited }) => {
                assert_eq!(waited, 30 * SECOND);
                assert_eq!(at, t0 + 80 * SECOND);
                break;
            }
            Step::Continue | Step::Retry { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(d.state(), State::Failed);
}

#[test]
fn t16_a_stop_signal_waits_the_stop_grace_at_most() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    d.on_connect_failed(t0, false);
    assert!(d.on_stop_signal(t0 + 10 * SECOND), "stop the captures");
    assert!(!d.on_stop_signal(t0 + 11 * SECOND), "once");
    d.on_captures_done();
    d.handle_timeout(t0 + SECOND, false);
    assert_eq!(
        d.handle_timeout(t0 + 40 * SECOND, false),
        Step::Fail(Fatal::GaveUp {
            waited: 40 * SECOND
        })
    );
    // With --give-up-after, that instead of the stop grace.
    let mut d = machine(t0, Some(100 * SECOND));
    d.on_stop_signal(t0 + 10 * SECOND);
    assert_eq!(d.handle_timeout(t0 + 99 * SECOND, false), Step::Continue);
    assert_eq!(
        d.handle_timeout(t0 + 100 * SECOND, false),
        Step::Fail(Fatal::GaveUp {
            waited: 100 * SECOND
        })
    );
}

#[test]
fn t17_giving_up_with_everything_acknowledged_ends_well() {
    let t0 = Instant::now();
    let mut d = machine(t0, Some(5 * SECOND));
    d.on_captures_done();
    assert_eq!(
        d.handle_timeout(t0 + 5 * SECOND, true),
        Step::Finish(Finish::StatisticsUndelivered { waited: 5 * SECOND })
    );
    assert_eq!(d.state(), State::Finished);
}

#[test]
fn t18_after_a_stop_nothing_left_needs_no_receiver() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    d.on_connect_failed(t0, false);
    assert_eq!(d.nothing_left(t0, true), None, "no stop signal");
    d.on_stop_signal(t0);
    assert_eq!(d.nothing_left(t0, true), None, "captures still running");
    d.on_captures_done();
    assert_eq!(d.nothing_left(t0, false), None, "batches unacknowledged");
    assert_eq!(
        d.nothing_left(t0 + SECOND, true),
        Some(Step::Finish(Finish::StatisticsUndelivered {
            waited: SECOND
        }))
    );
    // Connected, it says Goodbye instead.
    let mut d = joined(t0);
    d.on_stop_signal(t0);
    d.on_captures_done();
    assert_eq!(d.nothing_left(t0, true), None);
}

#[test]
fn t19_batches_sent_again_count_as_resent() {
    let t0 = Instant::now();
    let mut d = joined(t0);
    assert!(!d.wants_room(false, true), "nothing to send");
    assert!(d.wants_room(true, false));
    send(&mut d, 3);
    d.on_lost(t0, Duration::ZERO);
    assert!(!d.wants_room(true, false), "no link");
    d.handle_timeout(t0 + SECOND, false);
    d.on_connected(t0 + SECOND);
    assert!(!d.wants_room(true, false), "joining");
    d.on_ack(t0 + SECOND, 1);
    assert_eq!(
        d.on_room(Some(2), false),
        Some(Frame::Batch { again: true })
    );
    assert_eq!(
        d.on_room(Some(3), false),
        Some(Frame::Batch { again: true })
    );
    assert_eq!(
        d.on_room(Some(4), false),
        Some(Frame::Batch { again: false })
    );
}

#[test]
fn t20_the_goodbye_waits_for_the_captures_and_every_batch_sent() {
    let t0 = Instant::now();
    let mut d = joined(t0);
    assert_eq!(d.on_room(None, true), None, "captures still running");
    d.on_captures_done();
    assert!(!d.wants_room(false, false), "a batch not yet sent");
    assert_eq!(d.on_room(None, false), None);
    assert_eq!(d.on_room(None, true), Some(Frame::Goodbye));
    assert_eq!(d.on_room(None, true), None, "once per connection");
}

#[test]
fn t21_statistics_every_second_while_up_and_until_the_goodbye() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    assert_eq!(d.poll_timeout(), Some(t0 + STATS_EVERY));
    assert_eq!(
        d.handle_timeout(t0 + STATS_EVERY, false),
        Step::Continue,
        "no link"
    );
    d.on_connected(t0 + STATS_EVERY);
    d.on_ack(t0 + STATS_EVERY, 0);
    assert_eq!(d.poll_timeout(), Some(t0 + 2 * STATS_EVERY));
    assert_eq!(
        d.handle_timeout(t0 + 2 * STATS_EVERY, false),
        Step::Stats { send: true }
    );
    d.on_captures_done();
    d.on_room(None, true);
    assert_eq!(
        d.handle_timeout(t0 + 3 * STATS_EVERY, false),
        Step::Stats { send: false },
        "the Goodbye carried the last"
    );
}

#[test]
fn t22_a_stop_signal_keeps_the_connection() {
    let t0 = Instant::now();
    let mut d = joined(t0);
    assert!(d.on_stop_signal(t0));
    assert!(d.stopping());
    assert_eq!(d.state(), State::Up);
    // Up, no give-up deadline: the session ends with the Goodbye.
    assert_eq!(d.poll_timeout(), Some(t0 + STATS_EVERY));
}

/// A machine of several receivers, failing over after `FAILOVER`.
const FAILOVER: Duration = Duration::from_secs(5);

fn fleet_machine(t0: Instant) -> Delivery {
    Delivery::new(t0, None, Some(FAILOVER), Box::new(|| 1.0))
}

/// [`fleet_machine`] joined at `t0` (resume point 0).
fn fleet_joined(t0: Instant) -> Delivery {
    let mut d = fleet_machine(t0);
    d.on_connected(t0);
    d.on_ack(t0, 0);
    d
}

/// Drives `d` with its own deadlines until `until`, collecting each step but the
/// statistics ticks (and answering every Connect with a failed attempt, as an unreachable
/// receiver does).
fn run_unreachable(d: &mut Delivery, until: Instant) -> Vec<(Instant, Step)> {
    let mut steps = Vec::new();
    while let Some(t) = d.poll_timeout().filter(|t| *t <= until) {
        let step = d.handle_timeout(t, false);
        match step {
            Step::Continue | Step::Stats { .. } => {}
            Step::Connect | Step::FailOver => {
                steps.push((t, step));
                steps.push((t, d.on_connect_failed(t, false)));
            }
            other => steps.push((t, other)),
        }
    }
    steps
}

#[test]
fn t23_never_reached_fails_over_exactly_after_the_timeout() {
    let t0 = Instant::now();
    let mut d = fleet_machine(t0);
    // The first attempt hangs (no answer): no failover a moment before the time.
    assert_eq!(d.poll_timeout(), Some(t0 + SECOND), "statistics tick first");
    assert_eq!(d.handle_timeout(t0 + SECOND, false), Step::Continue);
    assert_eq!(d.poll_timeout(), Some(t0 + 2 * SECOND));
    for s in 2..5 {
        assert_eq!(d.handle_timeout(t0 + s * SECOND, false), Step::Continue);
    }
    let just_before = t0 + FAILOVER - Duration::from_millis(1);
    assert_eq!(d.handle_timeout(just_before, false), Step::Continue);
    assert_eq!(d.poll_timeout(), Some(t0 + FAILOVER));
    assert_eq!(d.handle_timeout(t0 + FAILOVER, false), Step::FailOver);
    assert_eq!(d.state(), State::Connecting);
    assert_eq!(d.failovers(), 1);
    // The next receiver gets its own full time.
    assert_eq!(
        d.handle_timeout(t0 + 2 * FAILOVER - Duration::from_millis(1), false),
        Step::Continue
    );
    assert_eq!(d.handle_timeout(t0 + 2 * FAILOVER, false), Step::FailOver);
}

#[test]
fn t23_one_receiver_never_fails_over() {
    let t0 = Instant::now();
    let mut d = machine(t0, None);
    for s in 1..=60 {
        assert_eq!(d.handle_timeout(t0 + s * SECOND, false), Step::Continue);
    }
    assert_eq!(d.failovers(), 0);
}

#[test]
fn t23_a_lost_connection_fails_over_after_the_timeout_unless_made_again() {
    let t0 = Instant::now();
    let mut d = fleet_joined(t0);
    // Up: never a failover, however long.
    assert_eq!(
        d.handle_timeout(t0 + 60 * SECOND, false),
        Step::Stats { send: true }
    );
    let lost = t0 + 61 * SECOND;
    d.on_lost(lost, Duration::ZERO);
    let steps = run_unreachable(&mut d, lost + FAILOVER);
    let failover = steps.iter().find(|(_, s)| *s == Step::FailOver).unwrap();
    assert_eq!(failover.0, lost + FAILOVER, "{steps:?}");
    // Reconnected before the time: the clock starts again at the next loss.
    let mut d = fleet_joined(t0);
    d.on_lost(lost, Duration::ZERO);
    d.handle_timeout(lost + FIRST_RETRY, false);
    d.on_connected(lost + SECOND);
    d.on_ack(lost + SECOND, 0);
    let again = lost + 3 * SECOND;
    d.on_lost(again, Duration::ZERO);
    let steps = run_unreachable(&mut d, again + FAILOVER);
    let first = steps.iter().find(|(_, s)| *s == Step::FailOver).unwrap();
    assert_eq!(first.0, again + FAILOVER, "{steps:?}");
}

/// A receiver killed under the connection is unreachable from its last word: the idle
/// timeout's silence counts.
#[test]
fn t23_a_silent_receiver_counts_from_its_last_word() {
    let t0 = Instant::now();
    let mut d = fleet_joined(t0);
    let idle = FAILOVER;
    let timed_out = t0 + 30 * SECOND;
    d.on_lost(timed_out, idle);
    // The failover is due at once, before the backoff's retry.
    assert_eq!(d.handle_timeout(timed_out, false), Step::FailOver);
}

/// Failover from a hanging join, and every unacknowledged batch goes to the next receiver:
/// its resume point (0, the session is new there) releases nothing, and each held
/// sequence is sent again from the oldest.
#[test]
fn t23_the_next_receiver_gets_every_unacknowledged_batch() {
    let t0 = Instant::now();
    let mut d = fleet_joined(t0);
    send(&mut d, 10);
    assert_eq!(d.on_ack(t0, 4), Step::Release(4));
    let lost = t0 + SECOND;
    d.on_lost(lost, Duration::ZERO);
    // The receiver answers the QUIC handshake but never the Hello.
    assert_eq!(d.handle_timeout(lost + FIRST_RETRY, false), Step::Connect);
    d.on_connected(lost + FIRST_RETRY);
    assert_eq!(d.handle_timeout(lost + FAILOVER, false), Step::FailOver);
    assert_eq!(d.reconnects(), 2, "the abandoned join counts");
    d.on_connected(lost + FAILOVER);
    assert_eq!(
        d.on_ack(lost + FAILOVER, 0),
        Step::Joined {
            resume: 0,
            after_outage: true
        }
    );
    // The driver releases nothing (resume 0) and rewinds the outbox: 5..=10 go again.
    for sequence in 5..=10 {
        assert_eq!(
            d.on_room(Some(sequence), false),
            Some(Frame::Batch { again: true }),
            "{sequence}"
        );
    }
    assert_eq!(
        d.on_room(Some(11), false),
        Some(Frame::Batch { again: false })
    );
    assert_eq!(d.on_ack(lost + FAILOVER, 11), Step::Release(11));
}

/// Every receiver down: the sensor goes round them, one receiver per --failover-after,
/// attempts spaced by a backoff that keeps growing to its cap (no faster going round),
/// and holds on (no give-up without --give-up-after: nothing is dropped here; the
/// outbox's own limits count what does not fit).
#[test]
fn t23_every_receiver_down_goes_round_with_backoff() {
    let t0 = Instant::now();
    let mut d = fleet_machine(t0);
    d.on_connect_failed(t0, false);
    let steps = run_unreachable(&mut d, t0 + 60 * SECOND);
    let failovers: Vec<Instant> = steps
        .iter()
        .filter(|(_, s)| *s == Step::FailOver)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(failovers.len(), 12, "{steps:?}");
    for (i, t) in failovers.iter().enumerate() {
        assert_eq!(*t, t0 + FAILOVER * (i as u32 + 1));
    }
    let delays: Vec<Duration> = steps
        .iter()
        .filter_map(|(_, s)| match s {
            Step::Retry { delay, .. } => Some(*delay),
            _ => None,
        })
        .collect();
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    assert_eq!(delays.last(), Some(&MAX_RETRY));
    // Within one receiver's time, no more attempts than the backoff allows.
    let attempts = steps
        .iter()
        .filter(|(t, s)| matches!(s, Step::Connect | Step::FailOver) && *t >= t0 + 30 * SECOND)
        .count();
    assert!(attempts <= 12, "{attempts}: {steps:?}");
    assert!(!steps.iter().any(|(_, s)| matches!(s, Step::Fail(_))));
    assert_eq!(d.failovers(), 12);
}

/// Back on a receiver that knows the session but is behind what another acknowledged: it
/// could not take the next batch, so the session goes on there under a new id.
#[test]
fn t24_a_receiver_behind_the_acknowledged_gets_a_new_session() {
    let t0 = Instant::now();
    let mut d = fleet_joined(t0);
    send(&mut d, 10);
    d.on_ack(t0, 4);
    d.on_lost(t0 + SECOND, Duration::ZERO);
    d.handle_timeout(t0 + SECOND + FAILOVER, false);
    d.on_connected(t0 + 7 * SECOND);
    d.on_ack(t0 + 7 * SECOND, 0);
    d.on_ack(t0 + 7 * SECOND, 10);
    d.on_lost(t0 + 8 * SECOND, Duration::ZERO);
    d.handle_timeout(t0 + 8 * SECOND + FAILOVER, false);
    d.on_connected(t0 + 14 * SECOND);
    assert!(matches!(
        d.on_ack(t0 + 14 * SECOND, 4),
        Step::NewSession {
            cause: NewSessionCause::Behind {
                resume: 4,
                acked: 10
            },
            ..
        }
    ));
    // A receiver new to the session (0), or level with it, is joined.
    d.handle_timeout(t0 + 15 * SECOND, false);
    d.on_connected(t0 + 15 * SECOND);
    assert!(matches!(
        d.on_ack(t0 + 15 * SECOND, 0),
        Step::Joined { resume: 0, .. }
    ));
}
