//! Sessions over real QUIC on loopback: bound to the secret they were opened with, named
//! in the output only by a hash, and capped per source.

use std::time::Duration;

use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use protocol::{ErrorCode, Message};

use crate::auth::Auth;
use crate::sink::Format;
use crate::tests::{
    batch_frame, connect_as, error_code, hello, join, read_replies, say_goodbye, start_server_with,
    TestServer,
};
use crate::writer::{session_tag, MAX_SESSIONS_PER_SOURCE};

/// Reads the receiver's Acks until one reaches `sequence`.
async fn acked_up_to(recv: &mut quinn::RecvStream, sequence: u64) {
    let mut buf = bytes::BytesMut::new();
    loop {
        while let Some(m) = protocol::decode_frame(&mut buf).unwrap() {
            if matches!(m, Message::Ack(a) if a.sequence >= sequence) {
                return;
            }
        }
        let chunk = recv.read_chunk(1 << 16, true).await.unwrap().unwrap();
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// The receiver's first message on a stream.
async fn read_first(recv: &mut quinn::RecvStream) -> Vec<Message> {
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Some(m) = protocol::decode_frame(&mut buf).unwrap() {
            return vec![m];
        }
        let chunk = recv.read_chunk(1 << 16, true).await.unwrap().unwrap();
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// A receiver writing pcapng that asks nothing of sensors.
fn open_server() -> TestServer {
    start_server_with(
        Duration::from_millis(50),
        Format::Pcapng,
        None,
        Auth::default(),
    )
}

/// A client that knows a session's id (and its interfaces, and its token) but not its
/// secret cannot take it over, while it is connected or away: the sensor's own batches
/// are all written, and the session's id appears nowhere in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_is_resumed_only_with_its_secret() {
    let server = open_server();
    let session = 0x0123_4567_89ab_cdef;
    let me = hello(session, "owner");
    let mut thief = me.clone();
    thief.session_secret = [2; 16];
    let try_thief = || async {
        let (_e, conn) = connect_as(&server, protocol::ALPN, None).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&Message::Hello(thief.clone()).to_bytes())
            .await
            .unwrap();
        let replies = read_replies(&mut recv).await;
        assert_eq!(
            error_code(&replies),
            Some(ErrorCode::SESSION_REFUSED),
            "{replies:?}"
        );
    };

    let (_e1, first) = connect_as(&server, protocol::ALPN, None).await.unwrap();
    let (mut send, mut recv, resume) = join(&first, &me).await;
    assert_eq!(resume, 0);
    send.write_all(&batch_frame(session, 1, &[10]))
        .await
        .unwrap();
    // Connected: the thief is refused, and the owner's connection stays.
    try_thief().await;
    send.write_all(&batch_frame(session, 2, &[20]))
        .await
        .unwrap();
    // Both in the output before the owner vanishes.
    acked_up_to(&mut recv, 2).await;
    first.close(7u32.into(), b"cut");
    // Away (or still going): refused either way.
    try_thief().await;

    let (_e2, second) = connect_as(&server, protocol::ALPN, None).await.unwrap();
    let (mut send, mut recv, resume) = join(&second, &me).await;
    assert_eq!(resume, 2, "the owner resumes where it was");
    send.write_all(&batch_frame(session, 3, &[30]))
        .await
        .unwrap();
    say_goodbye(send, &mut recv, 3).await;
    second.close(0u32.into(), b"");

    server.stop.send(()).unwrap();
    let summaries = server.done.await.unwrap().unwrap();
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].written.packets, 3, "{}", summaries[0].line());
    let bytes = server.out.bytes();
    let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
    let mut descriptions = Vec::new();
    while let Some(block) = reader.next_block() {
        if let Block::InterfaceDescription(idb) = block.unwrap().0 {
            for option in idb.options {
                if let InterfaceDescriptionOption::IfDescription(d) = option {
                    descriptions.push(d.into_owned());
                }
            }
        }
    }
    assert_eq!(descriptions.len(), 1, "{descriptions:?}");
    let tag = session_tag(session);
    assert!(
        descriptions[0].ends_with(&format!("session {tag}")),
        "{descriptions:?}"
    );
    assert!(
        !descriptions[0].contains("0123456789abcdef"),
        "{descriptions:?}"
    );
}

/// One source opens at most [`MAX_SESSIONS_PER_SOURCE`] sessions that are connected; one
/// more is told to come back later (UNAVAILABLE), and once one of them is away, the oldest
/// away session makes room for a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_of_one_source_are_capped() {
    let server = open_server();
    let mut open = Vec::new();
    for i in 0..MAX_SESSIONS_PER_SOURCE as u64 {
        let (endpoint, conn) = connect_as(&server, protocol::ALPN, None).await.unwrap();
        let (send, recv, _) = join(&conn, &hello(0x1000 + i, "many")).await;
        open.push((endpoint, conn, send, recv));
    }
    // The first reply to a Hello for `id` from a new connection (kept open with it).
    let first_reply = |id: u64| {
        let server = &server;
        async move {
            let (endpoint, conn) = connect_as(server, protocol::ALPN, None).await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&Message::Hello(hello(id, "many")).to_bytes())
                .await
                .unwrap();
            let replies = read_first(&mut recv).await;
            (replies, (endpoint, conn, send, recv))
        }
    };
    let (refused, _) = first_reply(0x2000).await;
    assert_eq!(
        error_code(&refused),
        Some(ErrorCode::UNAVAILABLE),
        "{refused:?}"
    );
    // One goes away: once the receiver sees it gone, its session makes room.
    let (_, gone, _, _) = open.remove(0);
    gone.close(7u32.into(), b"cut");
    let mut tries = 0;
    let _admitted = loop {
        let (reply, kept) = first_reply(0x2001).await;
        match reply.last() {
            Some(Message::Ack(a)) => {
                assert_eq!(a.sequence, 0);
                break kept;
            }
            _ if tries < 100 && error_code(&reply) == Some(ErrorCode::UNAVAILABLE) => tries += 1,
            _ => panic!("{reply:?}"),
        }
    };
    drop(open);
    server.stop.send(()).unwrap();
    let summaries = server.done.await.unwrap().unwrap();
    assert_eq!(summaries.len(), MAX_SESSIONS_PER_SOURCE + 1);
}

/// A peer that has proved nothing gets no room for a large frame: a first frame that is not
/// a Hello, or a Hello header claiming more than 256 KiB, is refused on its header, before
/// its body is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_or_foreign_first_frame_is_refused_on_its_header() {
    let server = open_server();
    for (kind, needle) in [
        (protocol::MessageType::Batch, "expected Hello first"),
        (protocol::MessageType::Hello, "hello"),
    ] {
        let (_e, conn) = connect_as(&server, protocol::ALPN, None).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // A frame header claiming 8 MiB, and nothing after it.
        let mut header = vec![kind as u8];
        header.extend_from_slice(&(8u32 << 20).to_be_bytes());
        send.write_all(&header).await.unwrap();
        let replies = read_replies(&mut recv).await;
        let Some(Message::Error(e)) = replies.last() else {
            panic!("{kind:?}: {replies:?}")
        };
        assert_eq!(e.code, ErrorCode::PROTOCOL);
        assert!(e.message.contains(needle), "{kind:?}: {}", e.message);
    }
    server.stop.send(()).unwrap();
    assert!(server.done.await.unwrap().unwrap().is_empty());
}
