//! The protocol tested on bytes alone: round trips, strict refusals, and arbitrary input.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use protocol::*;

fn hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        session_id: 0xdead_beef_0102_0304,
        session_secret: [9; 16],
        sensor_id: "edge-1".into(),
        hostname: "edge-1.example".into(),
        os: "linux".into(),
        interfaces: vec![InterfaceInfo {
            name: "eth0".into(),
            link_type: 1,
            snaplen: 262_144,
            filter: "port 53".into(),
        }],
        token: None,
        available: Vec::new(),
        on_demand: false,
        tls_key_log: true,
    }
}

fn decode_one(bytes: &[u8]) -> Result<Option<Message>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decode_frame(&mut buf)
}

#[test]
fn control_messages_round_trip() {
    let messages = [
        Message::Hello(hello()),
        Message::Stats(Stats {
            session_id: 7,
            interfaces: vec![InterfaceStats {
                interface_id: 0,
                seen: 10,
                matched: 9,
                delivered: 8,
                drops: vec![(DropReason::KERNEL_BUFFER, 1)],
            }],
        }),
        Message::Ack(Ack { sequence: 42 }),
        Message::Goodbye(Goodbye),
        Message::Error(ErrorMsg {
            code: ErrorCode::VERSION,
            message: "nope".into(),
        }),
        Message::Hello(Hello {
            available: vec!["eth0".into(), "lo".into()],
            on_demand: true,
            interfaces: Vec::new(),
            ..hello()
        }),
        Message::ViewerHello(ViewerHello {
            version: PROTOCOL_VERSION,
            user: "alice@desk".into(),
            token: AuthToken::new(&b"0123456789abcdef"[..]),
        }),
        Message::SensorList(SensorList {
            sensors: vec![ListedSensor {
                name: "edge-1".into(),
                on_demand: true,
                interfaces: vec!["eth0".into()],
            }],
        }),
        Message::CaptureRequest(CaptureRequest {
            targets: vec![CaptureTarget {
                sensor: "edge-1".into(),
                interface: "eth0".into(),
            }],
            filter: "udp".into(),
            snaplen: 96,
            limits: CaptureLimits {
                duration_ms: 1000,
                packets: 500,
                bytes: 0,
            },
            requested_by: "viewer alice@desk".into(),
        }),
        Message::CaptureStarted(CaptureStarted {
            interfaces: hello().interfaces,
        }),
        Message::CaptureEnded(CaptureEnded {
            reason: "packet limit".into(),
            stats: InterfaceStats {
                interface_id: 0,
                seen: 3,
                matched: 2,
                delivered: 2,
                drops: vec![(DropReason::RATE_CAP, 1)],
            },
        }),
    ];
    let mut stream = BytesMut::new();
    for m in &messages {
        m.encode(&mut stream);
    }
    for m in &messages {
        assert_eq!(decode_frame(&mut stream).unwrap().as_ref(), Some(m));
    }
    assert!(stream.is_empty());
}

#[test]
fn frames_split_anywhere_decode_the_same() {
    let bytes = Message::Hello(hello()).to_bytes();
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(decode_frame(&mut buf).unwrap(), None, "cut at {cut}");
        buf.extend_from_slice(&bytes[cut..]);
        assert_eq!(
            decode_frame(&mut buf).unwrap(),
            Some(Message::Hello(hello()))
        );
    }
}

#[test]
fn batch_round_trips_packets_and_compresses_repetitive_data() {
    let mut builder = BatchBuilder::new(64 * 1024);
    let frame = vec![0xabu8; 1500];
    for i in 0..20u64 {
        let dir = [Direction::Unknown, Direction::Inbound, Direction::Outbound][i as usize % 3];
        assert_eq!(
            builder.push(1_000 + i, 1514, dir, &frame[..100 + i as usize]),
            PushOutcome::Added
        );
    }
    let encoded = builder.finish(9, 1, 0);
    assert!(builder.is_empty());
    assert_eq!(encoded.packets, 20);
    assert!(
        encoded.frame.len() < encoded.raw_len / 4,
        "snappy should shrink repeated bytes"
    );
    let Some(Message::Batch(batch)) = decode_one(&encoded.frame).unwrap() else {
        panic!("not a batch")
    };
    assert_eq!(batch.encoding, BatchEncoding::Snappy);
    let packets: Vec<Packet> = batch.packets().unwrap().collect();
    assert_eq!(packets.len(), 20);
    for (i, p) in packets.iter().enumerate() {
        assert_eq!(p.timestamp_ns, 1_000 + i as u64);
        assert_eq!(p.original_len, 1514);
        assert_eq!(p.data.len(), 100 + i);
    }
    assert_eq!(packets[2].direction, Direction::Outbound);
}

#[test]
fn incompressible_batches_are_stored() {
    let mut builder = BatchBuilder::new(64 * 1024);
    let mut x: u32 = 1;
    let noise: Vec<u8> = (0..1400)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let _ = builder.push(1, 1400, Direction::Unknown, &noise);
    let encoded = builder.finish(1, 1, 0);
    let Some(Message::Batch(batch)) = decode_one(&encoded.frame).unwrap() else {
        panic!("not a batch")
    };
    assert_eq!(batch.encoding, BatchEncoding::Stored);
    assert_eq!(batch.packets().unwrap().next().unwrap().data[..], noise[..]);
}

/// After a batch that does not shrink, the next 1, 2, 4 ... batches are stored without
/// trying; a batch that does shrink ends the skipping.
#[test]
fn compression_is_skipped_while_traffic_does_not_compress() {
    let mut x: u32 = 7;
    let mut noise = || -> Vec<u8> {
        (0..1400)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    let zeros = [0u8; 1400];
    let mut builder = BatchBuilder::new(1);
    let mut encoding_of = |data: &[u8], sequence: u64| {
        let _ = builder.push(1, 1400, Direction::Unknown, data);
        let encoded = builder.finish(1, sequence, 0);
        match decode_one(&encoded.frame).unwrap() {
            Some(Message::Batch(batch)) => batch.encoding,
            other => panic!("not a batch: {other:?}"),
        }
    };
    use BatchEncoding::{Snappy, Stored};
    // Noise (tried, stored), zeros skipped once, zeros tried and compressed.
    assert_eq!(encoding_of(&noise(), 1), Stored);
    assert_eq!(encoding_of(&zeros, 2), Stored);
    assert_eq!(encoding_of(&zeros, 3), Snappy);
    // Misses at 4, 6 and 9: after each, skip 1, then 2, then 4 batches.
    for sequence in 4..10 {
        let data = noise();
        assert_eq!(encoding_of(&data, sequence), Stored);
    }
    let skipped_zeros: Vec<_> = (10..14).map(|s| encoding_of(&zeros, s)).collect();
    assert_eq!(
        skipped_zeros, [Stored; 4],
        "skipped after the third miss in a row"
    );
    assert_eq!(encoding_of(&zeros, 14), Snappy);
}

#[test]
fn builder_refuses_past_the_body_limit() {
    let mut builder = BatchBuilder::new(MAX_BATCH_BODY);
    let big = vec![0u8; MAX_SNAPLEN as usize];
    let mut added = 0;
    while builder.push(0, MAX_SNAPLEN, Direction::Unknown, &big) == PushOutcome::Added {
        added += 1;
    }
    assert_eq!(added, MAX_BATCH_BODY / (MAX_SNAPLEN as usize + 17));
    let encoded = builder.finish(1, 1, 0);
    // Zeros compress, so force the worst case too: the same records stored.
    let Some(Message::Batch(mut batch)) = decode_one(&encoded.frame).unwrap() else {
        panic!()
    };
    assert_eq!(batch.packets().unwrap().count(), added);
    batch.encoding = BatchEncoding::Stored;
    batch.body = Bytes::from(vec![0u8; MAX_BATCH_BODY]);
    let stored = Message::Batch(batch).to_bytes();
    assert!(
        matches!(decode_one(&stored), Ok(Some(Message::Batch(_)))),
        "the largest stored batch fits a frame"
    );
}

#[test]
fn unknown_version_is_refused_with_a_clear_error() {
    let mut h = hello();
    h.version = 99;
    let err = decode_one(&Message::Hello(h).to_bytes()).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnsupportedVersion {
            got: 99,
            supported: PROTOCOL_VERSION
        }
    );
    assert!(err.to_string().contains("version 99 is not supported"));
}

#[test]
fn another_protocol_is_recognised() {
    let err = decode_one(b"\x01\x00\x00\x00\x10GET / HTTP/1.1\r\n\r\n").unwrap_err();
    assert_eq!(err, DecodeError::BadMagic);
    assert_eq!(
        decode_one(b"GET / HTTP/1.1\r\n").unwrap_err(),
        DecodeError::UnknownType(b'G')
    );
}

#[test]
fn oversized_frame_is_refused_before_its_body_arrives() {
    let mut header = BytesMut::new();
    header.put_u8(MessageType::Batch as u8);
    header.put_u32(u32::MAX);
    assert!(matches!(
        decode_one(&header),
        Err(DecodeError::TooLong { field: "frame", .. })
    ));
}

#[test]
fn decompression_bomb_is_refused() {
    // A snappy header that claims a 1 GiB body.
    let mut body = BytesMut::new();
    let mut n: u32 = 1 << 30;
    while n >= 0x80 {
        body.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    body.put_u8(n as u8);
    let batch = Batch {
        session_id: 1,
        sequence: 1,
        interface_id: 0,
        packet_count: 1,
        encoding: BatchEncoding::Snappy,
        body: body.freeze(),
    };
    let decoded = decode_one(&Message::Batch(batch).to_bytes())
        .unwrap()
        .unwrap();
    let Message::Batch(batch) = decoded else {
        panic!()
    };
    assert!(matches!(batch.packets(), Err(DecodeError::TooLong { .. })));
}

#[test]
fn batch_with_lying_counts_is_refused() {
    let mut builder = BatchBuilder::new(1024);
    let _ = builder.push(1, 60, Direction::Inbound, &[1u8; 60]);
    let encoded = builder.finish(1, 1, 0);
    let Some(Message::Batch(mut batch)) = decode_one(&encoded.frame).unwrap() else {
        panic!()
    };
    batch.packet_count = 2;
    assert!(batch.packets().is_err());
    batch.packet_count = 0;
    assert!(batch.packets().is_err());
}

#[test]
fn captured_length_above_original_is_refused() {
    let mut records = BytesMut::new();
    records.put_u64(1);
    records.put_u32(10); // original
    records.put_u32(20); // captured
    records.put_u8(0);
    records.put_slice(&[0u8; 20]);
    let batch = Batch {
        session_id: 1,
        sequence: 1,
        interface_id: 0,
        packet_count: 1,
        encoding: BatchEncoding::Stored,
        body: records.freeze(),
    };
    assert!(batch.packets().is_err());
}

#[test]
fn a_token_round_trips_and_never_shows_in_debug() {
    let secret = "correct horse battery staple";
    let mut h = hello();
    h.token = AuthToken::new(secret.as_bytes().to_vec());
    let Some(Message::Hello(back)) = decode_one(&Message::Hello(h.clone()).to_bytes()).unwrap()
    else {
        panic!()
    };
    assert_eq!(back, h);
    assert_eq!(back.token.as_ref().unwrap().as_bytes(), secret.as_bytes());
    let shown = format!("{back:?} {:?}", Message::Hello(back.clone()));
    assert!(!shown.contains("horse"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    // No token and an empty one are the same on the wire; the bounds hold.
    assert_eq!(AuthToken::new(Vec::new()), None);
    assert!(AuthToken::new(vec![b't'; MAX_TOKEN_LEN]).is_some());
    assert_eq!(AuthToken::new(vec![b't'; MAX_TOKEN_LEN + 1]), None);
}

#[test]
fn encoder_cuts_overlong_strings_to_what_the_decoder_accepts() {
    let mut h = hello();
    h.hostname = "é".repeat(1000);
    let Some(Message::Hello(back)) = decode_one(&Message::Hello(h).to_bytes()).unwrap() else {
        panic!()
    };
    assert!(back.hostname.len() <= 255 && back.hostname.chars().all(|c| c == 'é'));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(msg)) = decode_frame(&mut buf) {
            if let Message::Batch(b) = msg {
                if let Ok(packets) = b.packets() {
                    packets.for_each(drop);
                }
            }
        }
    }

    #[test]
    fn arbitrary_batch_bodies_never_panic(
        encoding in prop_oneof![Just(BatchEncoding::Stored), Just(BatchEncoding::Snappy)],
        count in 0u32..8,
        body in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let batch = Batch { session_id: 1, sequence: 1, interface_id: 0, packet_count: count, encoding, body: Bytes::from(body) };
        if let Ok(packets) = batch.packets() {
            prop_assert_eq!(packets.count(), count as usize);
        }
    }

    #[test]
    fn packets_round_trip(packets in proptest::collection::vec(
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300), 0u32..100, 0u8..3), 0..50)
    ) {
        let mut builder = BatchBuilder::new(1 << 20);
        for (ts, data, extra, dir) in &packets {
            let dir = [Direction::Unknown, Direction::Inbound, Direction::Outbound][*dir as usize];
            prop_assert_eq!(builder.push(*ts, data.len() as u32 + extra, dir, data), PushOutcome::Added);
        }
        let encoded = builder.finish(5, 6, 7);
        let Some(Message::Batch(batch)) = decode_one(&encoded.frame).unwrap() else { panic!() };
        prop_assert_eq!((batch.session_id, batch.sequence, batch.interface_id), (5, 6, 7));
        let back: Vec<Packet> = batch.packets().unwrap().collect();
        prop_assert_eq!(back.len(), packets.len());
        for (p, (ts, data, extra, _)) in back.iter().zip(&packets) {
            prop_assert_eq!(p.timestamp_ns, *ts);
            prop_assert_eq!(&p.data[..], &data[..]);
            prop_assert_eq!(p.original_len, data.len() as u32 + extra);
        }
    }

    #[test]
    fn hello_round_trips(host in "\\PC{0,300}", iface in "[a-z0-9.]{1,15}", filter in "\\PC{0,200}", snaplen in 1u32..=MAX_SNAPLEN) {
        let mut h = hello();
        h.hostname = host;
        h.interfaces[0].name = iface;
        h.interfaces[0].filter = filter;
        h.interfaces[0].snaplen = snaplen;
        let Some(Message::Hello(back)) = decode_one(&Message::Hello(h.clone()).to_bytes()).unwrap() else { panic!() };
        prop_assert!(h.hostname.starts_with(&back.hostname));
        prop_assert_eq!(&back.interfaces, &h.interfaces);
    }
}

#[test]
fn key_log_lines_travel_in_batches_of_their_own() {
    let mut builder = BatchBuilder::new(1 << 16);
    let line = b"CLIENT_RANDOM 00112233 aabbcc";
    assert_eq!(builder.push_tls_key_log(5, line), PushOutcome::Added);
    // Packets do not join a batch of key log lines: the caller sends it first.
    assert_eq!(
        builder.push(6, 60, Direction::Inbound, &[1u8; 60]),
        PushOutcome::Full
    );
    let encoded = builder.finish(1, 2, 0);
    assert_eq!((encoded.packets, encoded.tls_key_log_lines), (0, 1));
    let Ok(Some(Message::Batch(batch))) = decode_one(&encoded.frame) else {
        panic!("a batch");
    };
    let records = batch.packets().unwrap();
    assert_eq!(records.kind(), RecordKind::TlsKeyLog);
    let back: Vec<Packet> = records.collect();
    assert_eq!(back[0].kind, RecordKind::TlsKeyLog);
    assert_eq!(&back[0].data[..], line);

    // A batch mixing the two kinds is refused.
    let mut frame = BytesMut::from(&encoded.frame[..]);
    let mut mixed = BatchBuilder::new(1 << 16);
    let _ = mixed.push(6, 3, Direction::Inbound, &[1, 2, 3]);
    let packet = mixed.finish(1, 2, 0);
    let records_at = Batch::HEADER_LEN;
    frame.extend_from_slice(&packet.frame[records_at..]);
    let body_len = (frame.len() - FRAME_HEADER_LEN) as u32;
    frame[1..5].copy_from_slice(&body_len.to_be_bytes());
    let count_at = Batch::HEADER_LEN - 5;
    frame[count_at..count_at + 4].copy_from_slice(&2u32.to_be_bytes());
    let Ok(Some(Message::Batch(batch))) = decode_one(&frame) else {
        panic!("a batch");
    };
    assert!(batch.packets().is_err());
}

/// Attributed packets carry an index into the batch's process table, which holds each
/// process once; unattributed packets in the same batch carry none.
#[test]
fn attributed_packets_share_the_batch_process_table() {
    let curl = Process {
        pid: 41,
        tid: 42,
        uid: 1000,
        cmd: "/usr/bin/curl".into(),
        args: "curl http://198.18.0.2:8000/".into(),
        thread_name: "curl".into(),
        cgroup: "/system.slice/docker-abc.scope".into(),
        container_id: "abc".into(),
        pod_uid: String::new(),
    };
    let python = Process {
        pid: 7,
        thread_name: "python3".into(),
        ..Process::default()
    };
    let mut builder = BatchBuilder::new(64 * 1024);
    let frame = [0x11u8; 60];
    for (i, who) in [Some(&curl), None, Some(&python), Some(&curl), Some(&python)]
        .into_iter()
        .enumerate()
    {
        let outcome = match who {
            Some(p) => {
                builder.push_attributed(i as u64, 60, Direction::Outbound, &frame, p.pid.into(), p)
            }
            None => builder.push(i as u64, 60, Direction::Inbound, &frame),
        };
        assert_eq!(outcome, PushOutcome::Added);
    }
    let encoded = builder.finish(1, 1, 0);
    assert_eq!(encoded.packets, 5);
    // Two process records, not four.
    assert!(
        encoded.raw_len < 5 * (17 + 60) + 5 * 2 + 2 * 140,
        "{}",
        encoded.raw_len
    );
    let Some(Message::Batch(batch)) = decode_one(&encoded.frame).unwrap() else {
        panic!("not a batch")
    };
    let packets: Vec<Packet> = batch.packets().unwrap().collect();
    let owners: Vec<Option<u32>> = packets
        .iter()
        .map(|p| p.process.as_ref().map(|p| p.process.pid))
        .collect();
    assert_eq!(owners, [Some(41), None, Some(7), Some(41), Some(7)]);
    assert_eq!(packets[0].process.as_ref().map(|a| &a.process), Some(&curl));
    assert_eq!(packets[0].process.as_ref().unwrap().comment, curl.comment());
    assert_eq!(packets[1].direction, Direction::Inbound);
    assert!(packets.iter().all(|p| p.data[..] == frame[..]));
    let comment = curl.comment();
    assert!(comment.starts_with("PID: 41\nCmd: /usr/bin/curl\nArgs: curl http://198.18.0.2:8000/\nThreadId: 42\nThreadName: curl\nUserId: 1000\n"), "{comment}");
    assert!(comment.ends_with("ContainerId: abc"), "{comment}");
    // The same fields for tools, as JSON: every key.
    let fields: serde_json::Value =
        serde_json::from_str(&packets[0].process.as_ref().unwrap().fields).unwrap();
    assert_eq!(fields["pid"], 41);
    assert_eq!(fields["tid"], 42);
    assert_eq!(fields["uid"], 1000);
    assert_eq!(fields["cmd"], "/usr/bin/curl");
    assert_eq!(fields["args"], "curl http://198.18.0.2:8000/");
    assert_eq!(fields["thread_name"], "curl");
    assert_eq!(fields["container_id"], "abc");
    assert_eq!(fields["pod_uid"], "");
    assert_eq!(fields.as_object().unwrap().len(), 9);
}
