//! End to end over real QUIC on loopback: a throwaway client speaks the protocol to the
//! receiver's server, which writes pcapng into memory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use protocol::{
    decode_frame, BatchBuilder, Direction, DropReason, ErrorCode, Goodbye, Hello, InterfaceInfo,
    InterfaceStats, Message, Stats,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{oneshot, Barrier};

use crate::auth::Auth;
use crate::quota::Quotas;
use crate::sink::testing::Shared;
use crate::sink::Format;
use crate::sink::{PcapNgSink, PcapSink, Sink};
use crate::{server, tls};

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) stop: oneshot::Sender<()>,
    pub(crate) done: tokio::task::JoinHandle<anyhow::Result<Vec<crate::stats::SensorSummary>>>,
    pub(crate) out: Shared,
}

fn start_server(window: Duration, format: Format) -> TestServer {
    start_server_with(window, format, None, Auth::default())
}

/// A server that may require client certificates from `client_roots`, and what `auth` says.
pub(crate) fn start_server_with(
    window: Duration,
    format: Format,
    client_roots: Option<rustls::RootCertStore>,
    auth: Auth,
) -> TestServer {
    let quotas = Quotas {
        rate: None,
        held: 64 << 20,
    };
    spawn_server(window, format, client_roots, auth, quotas)
}

fn spawn_server(
    window: Duration,
    format: Format,
    client_roots: Option<rustls::RootCertStore>,
    auth: Auth,
    quotas: Quotas,
) -> TestServer {
    let dir = std::env::temp_dir().join(format!(
        "capstream-receiver-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let identity = tls::load_or_create(&dir, &[]).unwrap();
    // Everything is in memory now.
    let _ = std::fs::remove_dir_all(&dir);
    let config = tls::server_config(&identity, client_roots).unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let out = Shared::default();
    let sink: Box<dyn Sink> = match format {
        Format::Pcap => Box::new(PcapSink::new(out.clone())),
        Format::Pcapng => Box::new(PcapNgSink::new(out.clone()).unwrap()),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(server::run(
        endpoint,
        crate::writer::Writer::new(sink, window, false),
        server::Admission {
            auth: std::sync::Arc::new(auth),
            quotas,
            sensors: Default::default(),
            key_log_grace: window,
        },
        async {
            let _ = stopped.await;
        },
    ));
    TestServer {
        addr,
        cert: identity.chain[0].clone(),
        stop,
        done,
        out,
    }
}

async fn connect(
    server: &TestServer,
    alpn: &[u8],
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    connect_as(server, alpn, None).await
}

/// A client certificate chain and its key.
pub(crate) type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Connects, presenting `client_cert` if given.
pub(crate) async fn connect_as(
    server: &TestServer,
    alpn: &[u8],
    client_cert: Option<ClientCert>,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server.cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(server.addr, "localhost")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    Ok((endpoint, conn))
}

/// Reads frames until the receiver's Goodbye or Error, or the stream's end.
pub(crate) async fn read_replies(recv: &mut quinn::RecvStream) -> Vec<Message> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    loop {
        while let Some(m) = decode_frame(&mut buf).unwrap() {
            let last = matches!(m, Message::Goodbye(_) | Message::Error(_));
            out.push(m);
            if last {
                return out;
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(1 << 16, true)).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk.bytes),
            _ => return out,
        }
    }
}

pub(crate) fn hello(session_id: u64, host: &str) -> Hello {
    Hello {
        version: protocol::PROTOCOL_VERSION,
        session_id,
        session_secret: [1; 16],
        sensor_id: format!("id-{host}"),
        hostname: host.into(),
        os: "linux".into(),
        interfaces: vec![InterfaceInfo {
            // A control character in the name must not reach the output.
            name: "eth0\u{1b}[31m".into(),
            link_type: 1,
            snaplen: 262_144,
            filter: "port 53".into(),
        }],
        token: None,
        available: Vec::new(),
        on_demand: false,
        tls_key_log: false,
    }
}

/// A well-behaved sensor: Hello, then (after `sync`) two batches of the given timestamps,
/// Stats and Goodbye. Returns the receiver's replies.
async fn good_sensor(
    server: &TestServer,
    session_id: u64,
    host: &str,
    batches: [&[u64]; 2],
    sync: Arc<Barrier>,
) -> Vec<Message> {
    let (_endpoint, conn) = connect(server, protocol::ALPN).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Message::Hello(hello(session_id, host)).to_bytes())
        .await
        .unwrap();
    // Both sensors are joined before either sends packets, so that the merge sees both.
    sync.wait().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut builder = BatchBuilder::new(1 << 16);
    let mut delivered = 0;
    for (i, times) in batches.iter().enumerate() {
        for &t in *times {
            let _ = builder.push(t, 64, Direction::Inbound, &[t as u8; 42]);
            delivered += 1;
        }
        let batch = builder.finish(session_id, i as u64 + 1, 0);
        send.write_all(&batch.frame).await.unwrap();
    }
    let stats = Stats {
        session_id,
        interfaces: vec![InterfaceStats {
            interface_id: 0,
            seen: delivered + 3,
            matched: delivered + 2,
            delivered,
            drops: vec![(DropReason::KERNEL_BUFFER, 2)],
        }],
    };
    send.write_all(&Message::Stats(stats).to_bytes())
        .await
        .unwrap();
    // Both have sent their packets before either leaves.
    sync.wait().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    send.write_all(&Message::Goodbye(Goodbye).to_bytes())
        .await
        .unwrap();
    send.finish().unwrap();
    let replies = read_replies(&mut recv).await;
    conn.close(0u32.into(), b"");
    replies
}

/// Sends `bytes` on a stream with the right ALPN and returns the receiver's answer.
async fn bad_sensor(server: &TestServer, bytes: &[u8]) -> Vec<Message> {
    let (_endpoint, conn) = connect(server, protocol::ALPN).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    read_replies(&mut recv).await
}

pub(crate) fn error_code(replies: &[Message]) -> Option<ErrorCode> {
    match replies.last() {
        Some(Message::Error(e)) => Some(e.code),
        _ => None,
    }
}

fn last_ack(replies: &[Message]) -> Option<u64> {
    replies.iter().rev().find_map(|m| match m {
        Message::Ack(a) => Some(a.sequence),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sensors_merge_in_time_order_and_bad_peers_are_refused() {
    let server = start_server(Duration::from_secs(5), Format::Pcapng);
    let sync = Arc::new(Barrier::new(2));
    let mut wrong_version = hello(9, "old");
    wrong_version.version = protocol::PROTOCOL_VERSION + 1;
    let wrong_version = Message::Hello(wrong_version).to_bytes();
    let (a, b, garbage, old, alpn) = tokio::join!(
        good_sensor(
            &server,
            0xa,
            "hostA",
            [&[1000, 3000], &[5000, 7000]],
            sync.clone()
        ),
        good_sensor(&server, 0xb, "hostB", [&[2000, 4000], &[6000, 8000]], sync),
        bad_sensor(&server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        bad_sensor(&server, &wrong_version),
        connect(&server, b"h3"),
    );
    assert_eq!(
        error_code(&garbage),
        Some(ErrorCode::PROTOCOL),
        "{garbage:?}"
    );
    assert_eq!(error_code(&old), Some(ErrorCode::VERSION), "{old:?}");
    assert!(
        alpn.is_err(),
        "a peer of another protocol fails the handshake"
    );
    for replies in [&a, &b] {
        assert!(
            matches!(replies.last(), Some(Message::Goodbye(_))),
            "{replies:?}"
        );
        assert_eq!(last_ack(replies), Some(2), "{replies:?}");
    }

    server.stop.send(()).unwrap();
    let summaries = server.done.await.unwrap().unwrap();
    assert_eq!(summaries.len(), 2);
    for s in &summaries {
        assert_eq!(
            (s.written.packets, s.received.batches),
            (4, 2),
            "{}",
            s.line()
        );
        assert!(
            s.line()
                .contains("kernel buffer full 2), matched by the sensor 6")
                && !s.line().contains("not in this output"),
            "{}",
            s.line()
        );
    }

    let bytes = server.out.bytes();
    let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
    let (mut names, mut times, mut isbs) = (Vec::new(), Vec::new(), 0);
    while let Some(block) = reader.next_block() {
        match block.unwrap().0 {
            Block::InterfaceDescription(idb) => {
                for o in idb.options {
                    if let InterfaceDescriptionOption::IfName(n) = o {
                        names.push(n.into_owned());
                    }
                }
            }
            Block::EnhancedPacket(epb) => times.push(epb.timestamp.as_nanos() as u64),
            Block::InterfaceStatistics(_) => isbs += 1,
            _ => {}
        }
    }
    names.sort();
    assert_eq!(names, ["hostA/eth0[31m", "hostB/eth0[31m"]);
    assert_eq!(times, [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000]);
    assert_eq!(isbs, 2);
}

#[tokio::test]
async fn an_idle_receiver_still_writes_a_valid_file() {
    let server = start_server(Duration::from_secs(1), Format::Pcapng);
    server.stop.send(()).unwrap();
    assert!(server.done.await.unwrap().unwrap().is_empty());
    let bytes = server.out.bytes();
    let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
    assert!(reader.next_block().is_none());
}

#[tokio::test]
async fn classic_pcap_refuses_a_second_link_type_and_keeps_the_first_sensor() {
    let server = start_server(Duration::from_millis(100), Format::Pcap);
    let (_e1, first) = connect(&server, protocol::ALPN).await.unwrap();
    let (mut send, mut recv) = first.open_bi().await.unwrap();
    send.write_all(&Message::Hello(hello(1, "eth")).to_bytes())
        .await
        .unwrap();
    let mut builder = BatchBuilder::new(1 << 16);
    let _ = builder.push(42, 60, Direction::Unknown, &[0; 60]);
    send.write_all(&builder.finish(1, 1, 0).frame)
        .await
        .unwrap();

    let mut sll = hello(2, "sll");
    sll.interfaces[0].link_type = 113;
    let refused = bad_sensor(&server, &Message::Hello(sll).to_bytes()).await;
    let Some(Message::Error(e)) = refused.last() else {
        panic!("{refused:?}");
    };
    assert_eq!(e.code, ErrorCode::UNSUPPORTED_LINK_TYPE);
    assert!(
        e.message.contains("link type EN10MB (1)")
            && e.message.contains("link type 113 (LINUX_SLL)")
            && e.message.contains("--format pcapng"),
        "{}",
        e.message
    );

    // The first sensor is still served.
    say_goodbye(send, &mut recv, 1).await;
    first.close(0u32.into(), b"");

    server.stop.send(()).unwrap();
    server.done.await.unwrap().unwrap();
    let bytes = server.out.bytes();
    let mut reader = pcap_file::pcap::PcapReader::new(&bytes[..]).unwrap();
    assert_eq!(reader.header().datalink, pcap_file::DataLink::ETHERNET);
    assert_eq!(
        reader
            .next_packet()
            .unwrap()
            .unwrap()
            .timestamp()
            .as_nanos(),
        42
    );
    assert!(reader.next_packet().is_none());
}

/// Opens a session's stream and sends Hello; returns the stream pair after the receiver's
/// first Ack, which says where the session resumes.
pub(crate) async fn join(
    conn: &quinn::Connection,
    hello: &Hello,
) -> (quinn::SendStream, quinn::RecvStream, u64) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Message::Hello(hello.clone()).to_bytes())
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Some(m) = decode_frame(&mut buf).unwrap() {
            let Message::Ack(ack) = m else {
                panic!("expected the resume Ack, got {m:?}")
            };
            return (send, recv, ack.sequence);
        }
        let chunk = recv.read_chunk(1 << 16, true).await.unwrap().unwrap();
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// Ends a session: Goodbye, then the receiver's last Ack (`acked`) and Goodbye.
pub(crate) async fn say_goodbye(
    mut send: quinn::SendStream,
    recv: &mut quinn::RecvStream,
    acked: u64,
) {
    send.write_all(&Message::Goodbye(Goodbye).to_bytes())
        .await
        .unwrap();
    send.finish().unwrap();
    let replies = read_replies(recv).await;
    assert_eq!(last_ack(&replies), Some(acked), "{replies:?}");
    assert!(matches!(replies.last(), Some(Message::Goodbye(_))));
}

pub(crate) fn batch_frame(session_id: u64, sequence: u64, times: &[u64]) -> bytes::Bytes {
    let mut builder = BatchBuilder::new(1 << 16);
    for &t in times {
        let _ = builder.push(t, 60, Direction::Inbound, &[t as u8; 60]);
    }
    builder.finish(session_id, sequence, 0).frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_resumes_on_a_new_connection_without_duplicates() {
    let server = start_server(Duration::from_millis(50), Format::Pcapng);
    let me = hello(0x5e55, "roamer");

    let (_e1, first) = connect(&server, protocol::ALPN).await.unwrap();
    let (mut send, _recv, resume) = join(&first, &me).await;
    assert_eq!(resume, 0, "a new session starts from nothing");
    for (seq, t) in [(1, 10), (2, 20)] {
        send.write_all(&batch_frame(0x5e55, seq, &[t]))
            .await
            .unwrap();
    }
    // Let both be written, then vanish without Goodbye.
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.close(7u32.into(), b"cut");

    let (_e2, second) = connect(&server, protocol::ALPN).await.unwrap();
    let (mut send, mut recv, resume) = join(&second, &me).await;
    assert_eq!(resume, 2, "both batches are in the output");
    // A sensor that missed the last Ack sends batch 2 again: it must not be written twice.
    for (seq, t) in [(2, 20), (3, 30)] {
        send.write_all(&batch_frame(0x5e55, seq, &[t]))
            .await
            .unwrap();
    }
    // While it is open, another sensor claiming the same session with other interfaces is refused.
    let mut impostor = hello(0x5e55, "roamer");
    impostor.interfaces[0].name = "eth9".into();
    let refused = bad_sensor(&server, &Message::Hello(impostor).to_bytes()).await;
    assert!(error_code(&refused).is_some(), "{refused:?}");

    say_goodbye(send, &mut recv, 3).await;
    second.close(0u32.into(), b"");

    server.stop.send(()).unwrap();
    let summaries = server.done.await.unwrap().unwrap();
    let line = summaries[0].line();
    assert_eq!(summaries[0].written.packets, 3, "{line}");
    assert!(
        line.contains("1 reconnect(s), 1 duplicate batch(es) ignored"),
        "{line}"
    );
    let bytes = server.out.bytes();
    let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
    let mut times = Vec::new();
    while let Some(block) = reader.next_block() {
        if let Block::EnhancedPacket(epb) = block.unwrap().0 {
            times.push(epb.timestamp.as_nanos() as u64);
        }
    }
    assert_eq!(times, [10, 20, 30]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequence_gap_is_refused_and_garbage_datagrams_change_nothing() {
    let server = start_server(Duration::from_millis(50), Format::Pcapng);
    // Raw UDP noise at the QUIC port, before and during a session.
    let noise = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for len in [1, 20, 1200, 1500] {
        noise.send_to(&vec![0xa5; len], server.addr).unwrap();
    }
    let (_e, conn) = connect(&server, protocol::ALPN).await.unwrap();
    let (mut send, mut recv, _) = join(&conn, &hello(0x6a9, "gappy")).await;
    noise.send_to(b"\x40garbage", server.addr).unwrap();
    send.write_all(&batch_frame(0x6a9, 5, &[1])).await.unwrap();
    send.write_all(&batch_frame(0x6a9, 7, &[2])).await.unwrap();
    let replies = read_replies(&mut recv).await;
    let Some(Message::Error(e)) = replies.last() else {
        panic!("{replies:?}")
    };
    assert_eq!(e.code, ErrorCode::PROTOCOL);
    assert!(
        e.message.contains("batch sequence 7 where 6"),
        "{}",
        e.message
    );
    server.stop.send(()).unwrap();
    let summaries = server.done.await.unwrap().unwrap();
    assert_eq!(summaries[0].written.packets, 1, "{}", summaries[0].line());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sensor_over_its_quotas_is_slowed_not_cut() {
    // One batch held at a time, and a rate below what the batches need in one second.
    let quotas = Quotas {
        rate: Some(64 << 10),
        held: 1,
    };
    let server = spawn_server(
        Duration::from_millis(20),
        Format::Pcapng,
        None,
        Auth::default(),
        quotas,
    );
    let (_e, conn) = connect(&server, protocol::ALPN).await.unwrap();
    let (mut send, mut recv, _) = join(&conn, &hello(0x9a, "greedy")).await;
    // 20 batches of 20 packets of 600 bytes: about 240 KB, several seconds' worth.
    for seq in 1..=20u64 {
        let times: Vec<u64> = (0..20).map(|i| seq * 100 + i).collect();
        let mut builder = BatchBuilder::new(1 << 16);
        for &t in &times {
            let payload: Vec<u8> = (0..600).map(|i| (t as usize * 31 + i * 7) as u8).collect();
            let _ = builder.push(t, 600, Direction::Inbound, &payload);
        }
        send.write_all(&builder.finish(0x9a, seq, 0).frame)
            .await
            .unwrap();
    }
    say_goodbye(send, &mut recv, 20).await;
    conn.close(0u32.into(), b"");
    server.stop.send(()).unwrap();
    let summaries = server.done.await.unwrap().unwrap();
    assert_eq!(summaries[0].written.packets, 400, "{}", summaries[0].line());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_names_are_data_without_control_characters() {
    let server = start_server(Duration::from_millis(20), Format::Pcapng);
    let mut evil = hello(0xe71, "../../etc/x\u{1b}[31m\n");
    evil.sensor_id = "../../../root/.ssh/authorized_keys\r".into();
    evil.interfaces[0].name = "../eth0\u{7}".into();
    let (_e, conn) = connect(&server, protocol::ALPN).await.unwrap();
    let (mut send, mut recv, _) = join(&conn, &evil).await;
    send.write_all(&batch_frame(0xe71, 1, &[5])).await.unwrap();
    say_goodbye(send, &mut recv, 1).await;
    conn.close(0u32.into(), b"");
    server.stop.send(()).unwrap();
    let summaries = server.done.await.unwrap().unwrap();
    let line = summaries[0].line();
    assert!(!line.chars().any(char::is_control), "{line:?}");
    let bytes = server.out.bytes();
    let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
    let mut texts = Vec::new();
    while let Some(block) = reader.next_block() {
        if let Block::InterfaceDescription(idb) = block.unwrap().0 {
            for o in idb.options {
                match o {
                    InterfaceDescriptionOption::IfName(n) => texts.push(n.into_owned()),
                    InterfaceDescriptionOption::IfDescription(d) => texts.push(d.into_owned()),
                    _ => {}
                }
            }
        }
    }
    assert_eq!(texts[0], "../../etc/x[31m/../eth0", "kept as data, as text");
    assert!(
        texts.iter().all(|t| !t.chars().any(char::is_control)),
        "{texts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_receiver_waits_for_the_keys_of_the_handshakes_it_holds() {
    let window = Duration::from_secs(2);
    let server = start_server(window, Format::Pcapng);
    let mut me = hello(0x6b65, "keys");
    me.tls_key_log = true;
    let (_endpoint, conn) = connect(&server, protocol::ALPN).await.unwrap();
    let (mut send, mut recv, acked) = join(&conn, &me).await;
    assert_eq!(acked, 0);
    let random = [7u8; 32];
    let client_hello = crate::sink::testing::client_hello(random);
    let mut packets = BatchBuilder::new(1 << 16);
    let _ = packets.push(1_000, 0, Direction::Outbound, &client_hello);
    send.write_all(&packets.finish(me.session_id, 1, 0).frame)
        .await
        .unwrap();
    // Stopped with the ClientHello held and its key not yet sent, as a sensor reads key
    // logs a little after the handshake: the key must still come first in the file.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let line = format!("CLIENT_RANDOM {} {}", "07".repeat(32), "ab".repeat(48));
    let mut keys = BatchBuilder::new(1 << 16);
    let _ = keys.push_tls_key_log(2_000, line.as_bytes());
    let _ = send
        .write_all(&keys.finish(me.session_id, 2, 0).frame)
        .await;
    let replies = read_replies(&mut recv).await;
    assert_eq!(last_ack(&replies), Some(2), "{replies:?}");
    assert_eq!(error_code(&replies), Some(ErrorCode::SHUTTING_DOWN));
    server.done.await.unwrap().unwrap();

    let bytes = server.out.bytes();
    let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
    let mut kinds = Vec::new();
    while let Some(block) = reader.next_block() {
        match block.unwrap().0 {
            Block::EnhancedPacket(_) => kinds.push("packet"),
            Block::Unknown(b) if b.type_ == 0x0a => kinds.push("secrets"),
            _ => {}
        }
    }
    assert_eq!(kinds, ["secrets", "packet"]);
}
