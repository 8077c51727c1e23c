//! Every refusal of the connection rules, and the paths that accept.

use bytes::{Bytes, BytesMut};
use protocol::{
    Ack, BatchBuilder, BatchEncoding, Direction, Goodbye, InterfaceStats, MAX_HELLO_LEN,
    PROTOCOL_VERSION,
};

use super::*;

const SESSION: u64 = 0x5e55;

fn hello(interfaces: usize) -> Hello {
    let mut hello = crate::tests::hello(SESSION, "host");
    let one = hello.interfaces[0].clone();
    hello.interfaces = vec![one; interfaces];
    hello
}

/// A batch of one packet, as the sensor encodes it.
fn batch(session_id: u64, sequence: u64, interface_id: u16) -> Message {
    let mut builder = BatchBuilder::new(1 << 16);
    let _ = builder.push(1, 60, Direction::Inbound, &[7u8; 60]);
    let frame = builder.finish(session_id, sequence, interface_id).frame;
    match protocol::decode_frame(&mut BytesMut::from(&frame[..])) {
        Ok(Some(message)) => message,
        other => panic!("not a batch: {other:?}"),
    }
}

fn stats(session_id: u64) -> Message {
    Message::Stats(Stats {
        session_id,
        interfaces: Vec::<InterfaceStats>::new(),
    })
}

/// Rules for a sensor joined with two interfaces; `received`: the writer's resume point.
fn joined(received: Option<u64>) -> SensorProtocol {
    let mut rules = SensorProtocol::default();
    let hello = rules.hello(Message::Hello(hello(2))).unwrap();
    rules.admit(&hello, Ok(())).unwrap();
    rules.on_join(received);
    assert!(rules.joined());
    rules
}

fn refusal(result: Result<Accepted, Refusal>) -> Refusal {
    match result {
        Err(refusal) => refusal,
        Ok(_) => panic!("accepted"),
    }
}

fn protocol_refusal(result: Result<Accepted, Refusal>, says: &str) {
    let refusal = refusal(result);
    assert_eq!(refusal.code, ErrorCode::PROTOCOL, "{refusal:?}");
    assert!(refusal.message.contains(says), "{refusal:?}");
}

fn header(kind: MessageType, len: usize) -> Vec<u8> {
    let mut header = vec![kind as u8];
    header.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
    header
}

#[test]
fn before_the_hello_only_a_bounded_hello_header_is_read() {
    let rules = SensorProtocol::default();
    assert_eq!(rules.check_header(&[]), Ok(()), "nothing yet");
    assert_eq!(rules.check_header(&[MessageType::Batch as u8]), Ok(()));
    assert_eq!(
        rules.check_header(&header(MessageType::Hello, MAX_HELLO_LEN)),
        Ok(())
    );
    let big = rules
        .check_header(&header(MessageType::Hello, MAX_HELLO_LEN + 1))
        .unwrap_err();
    assert_eq!(big.code, ErrorCode::PROTOCOL);
    assert!(big.message.contains("hello"), "{big:?}");
    let batch_first = rules
        .check_header(&header(MessageType::Batch, 100))
        .unwrap_err();
    assert_eq!(
        batch_first,
        Refusal::new(ErrorCode::PROTOCOL, "expected Hello first, got Batch")
    );
    let unknown = rules.check_header(&[0xee, 0, 0, 0, 0]).unwrap_err();
    assert_eq!(unknown.code, ErrorCode::PROTOCOL);
    // Joined, a batch frame of any allowed size is read.
    assert_eq!(
        joined(None).check_header(&header(MessageType::Batch, MAX_HELLO_LEN + 1)),
        Ok(())
    );
}

#[test]
fn the_first_message_must_be_a_hello() {
    let rules = SensorProtocol::default();
    let refused = rules.hello(stats(SESSION)).unwrap_err();
    assert_eq!(
        refused,
        Refusal::new(ErrorCode::PROTOCOL, "expected Hello first, got Stats")
    );
    assert_eq!(rules.hello(Message::Hello(hello(1))), Ok(hello(1)));
}

#[test]
fn a_wrong_token_is_refused_before_anything_else() {
    let mut rules = SensorProtocol::default();
    // Even a Hello that names no interface: the token is checked first.
    let refused = rules.admit(&hello(0), Err("wrong token")).unwrap_err();
    assert_eq!(
        refused,
        Refusal::new(ErrorCode::UNAUTHENTICATED, TOKEN_REFUSAL)
    );
    assert!(
        !refused.message.contains("wrong token"),
        "the reason stays in the log"
    );
    assert!(!rules.joined());
}

#[test]
fn a_hello_naming_no_interface_is_refused() {
    let mut rules = SensorProtocol::default();
    assert_eq!(
        rules.admit(&hello(0), Ok(())),
        Err(Refusal::new(
            ErrorCode::PROTOCOL,
            "Hello names no interface"
        ))
    );
}

#[test]
fn join_refusals_map_to_what_the_sensor_does_next() {
    let code = |r: JoinRefusal| Refusal::join(r).code;
    assert_eq!(
        code(JoinRefusal::LinkType("x".into())),
        ErrorCode::UNSUPPORTED_LINK_TYPE
    );
    assert_eq!(
        code(JoinRefusal::Unavailable("x".into())),
        ErrorCode::UNAVAILABLE
    );
    assert_eq!(
        code(JoinRefusal::Session("x".into())),
        ErrorCode::SESSION_REFUSED
    );
    let refusal = Refusal::join(JoinRefusal::Session("session 0a1b2c3d has ended".into()));
    assert_eq!(refusal.message, "session 0a1b2c3d has ended");
    assert_eq!(Refusal::shutting_down().code, ErrorCode::SHUTTING_DOWN);
}

#[test]
fn a_decode_error_of_another_version_is_a_version_refusal() {
    let version = Refusal::protocol(protocol::DecodeError::UnsupportedVersion {
        got: PROTOCOL_VERSION + 1,
        supported: PROTOCOL_VERSION,
    });
    assert_eq!(version.code, ErrorCode::VERSION);
    assert_eq!(
        Refusal::protocol(protocol::DecodeError::BadMagic).code,
        ErrorCode::VERSION
    );
    assert_eq!(
        Refusal::protocol(protocol::DecodeError::UnknownType(9)).code,
        ErrorCode::PROTOCOL
    );
}

#[test]
fn nothing_but_the_hello_before_the_join() {
    let mut rules = SensorProtocol::default();
    protocol_refusal(rules.on_message(batch(SESSION, 1, 0)), "before the session");
    let hello = rules.hello(Message::Hello(hello(1))).unwrap();
    rules.admit(&hello, Ok(())).unwrap();
    protocol_refusal(rules.on_message(stats(SESSION)), "before the session");
}

#[test]
fn a_new_session_may_start_at_any_sequence_then_grows_by_one() {
    let mut rules = joined(None);
    for sequence in [41, 42, 43] {
        match rules.on_message(batch(SESSION, sequence, 1)) {
            Ok(Accepted::Batch {
                sequence: s,
                interface_id: 1,
                packets,
                wire_len,
            }) => {
                assert_eq!(s, sequence);
                assert_eq!(packets.count(), 1);
                assert!(wire_len > 0);
            }
            Ok(_) => panic!("not a batch"),
            Err(refusal) => panic!("{refusal:?}"),
        }
    }
    protocol_refusal(
        rules.on_message(batch(SESSION, 45, 0)),
        "batch sequence 45 where 44 was expected",
    );
}

#[test]
fn batches_below_the_resume_point_are_counted_duplicates() {
    let mut rules = joined(Some(10));
    for sequence in [3, 10] {
        assert!(matches!(
            rules.on_message(batch(SESSION, sequence, 0)),
            Ok(Accepted::Duplicate)
        ));
    }
    assert_eq!(rules.duplicates(), 2);
    assert!(matches!(
        rules.on_message(batch(SESSION, 11, 0)),
        Ok(Accepted::Batch { sequence: 11, .. })
    ));
    assert!(matches!(
        rules.on_message(batch(SESSION, 11, 0)),
        Ok(Accepted::Duplicate)
    ));
    assert_eq!(rules.duplicates(), 3);
}

#[test]
fn a_gap_is_refused() {
    protocol_refusal(
        joined(Some(10)).on_message(batch(SESSION, 12, 0)),
        "batch sequence 12 where 11 was expected (sequences grow by one)",
    );
}

#[test]
fn sequence_0_is_refused() {
    protocol_refusal(
        joined(None).on_message(batch(SESSION, 0, 0)),
        "batch sequence 0 (sequences start at 1)",
    );
}

#[test]
fn a_batch_beyond_the_hellos_interfaces_is_refused() {
    protocol_refusal(
        joined(None).on_message(batch(SESSION, 1, 2)),
        "batch for interface 2 of 2",
    );
}

#[test]
fn a_batch_of_another_session_is_refused() {
    protocol_refusal(
        joined(None).on_message(batch(SESSION + 1, 1, 0)),
        "batch of another session",
    );
}

#[test]
fn a_batch_that_does_not_decode_is_refused() {
    let broken = Message::Batch(Batch {
        session_id: SESSION,
        sequence: 1,
        interface_id: 0,
        packet_count: 1,
        encoding: BatchEncoding::Snappy,
        body: Bytes::from_static(&[0xff; 8]),
    });
    let mut rules = joined(None);
    protocol_refusal(rules.on_message(broken), "decompress");
    // Not taken: the next batch is still any first one.
    assert!(matches!(
        rules.on_message(batch(SESSION, 5, 0)),
        Ok(Accepted::Batch { sequence: 5, .. })
    ));
}

#[test]
fn statistics_of_this_session_pass_and_of_another_are_refused() {
    let mut rules = joined(None);
    assert!(matches!(
        rules.on_message(stats(SESSION)),
        Ok(Accepted::Stats(Stats {
            session_id: SESSION,
            ..
        }))
    ));
    protocol_refusal(
        rules.on_message(stats(SESSION + 1)),
        "statistics of another session",
    );
}

#[test]
fn goodbye_leaves() {
    assert!(matches!(
        joined(None).on_message(Message::Goodbye(Goodbye)),
        Ok(Accepted::Goodbye)
    ));
}

#[test]
fn unexpected_messages_are_refused() {
    protocol_refusal(
        joined(None).on_message(Message::Ack(Ack { sequence: 1 })),
        "unexpected Ack message from a sensor",
    );
    protocol_refusal(
        joined(None).on_message(Message::Hello(hello(1))),
        "unexpected Hello message from a sensor",
    );
}
