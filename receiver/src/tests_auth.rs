//! Sensor authentication over real QUIC on loopback: client certificates (`--client-ca`) and
//! the shared token (`--token-file`). Every refused peer leaves nothing in the output.

use std::time::Duration;

use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use protocol::{AuthToken, ErrorCode, Message};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::auth::Auth;
use crate::sink::Format;
use crate::tests::{
    batch_frame, connect_as, error_code, hello, join, read_replies, say_goodbye, start_server_with,
    ClientCert, TestServer,
};

/// A CA made in memory, issuing client certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap().der().clone();
        Self {
            issuer: Issuer::new(params, key),
            cert,
        }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        roots
    }

    /// A client certificate for `name`, valid within the given dates.
    fn client_valid(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> ClientCert {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    /// A client certificate for `name`, valid now.
    fn client(&self, name: &str) -> ClientCert {
        self.client_valid(name, date_time_ymd(2020, 1, 1), date_time_ymd(4000, 1, 1))
    }
}

/// A peer the handshake refuses. Its own handshake ends before the receiver has checked its
/// certificate, so the refusal may come as the connection's close: then the Hello it sends
/// must get no answer. Returns why the connection ended.
async fn refused_by_tls(server: &TestServer, cert: Option<ClientCert>) -> String {
    let (_endpoint, conn) = match connect_as(server, protocol::ALPN, cert).await {
        Ok(connected) => connected,
        Err(e) => return e,
    };
    if let Ok((mut send, mut recv)) = conn.open_bi().await {
        let hello = Message::Hello(hello(0xbad, "refused")).to_bytes();
        if send.write_all(&hello).await.is_ok() {
            let _ = send.write_all(&batch_frame(0xbad, 1, &[1])).await;
            let replies = read_replies(&mut recv).await;
            assert!(replies.is_empty(), "a refused peer got {replies:?}");
        }
    }
    tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the receiver closes a refused connection")
        .to_string()
}

/// Sends Hello (with `token`) and a batch at once; returns the receiver's answer.
async fn with_token(
    server: &TestServer,
    cert: Option<ClientCert>,
    token: Option<&str>,
) -> Vec<Message> {
    let (_endpoint, conn) = connect_as(server, protocol::ALPN, cert).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut h = hello(0x70c, "tokenless");
    h.token = token.and_then(|t| AuthToken::new(t.as_bytes().to_vec()));
    send.write_all(&Message::Hello(h).to_bytes()).await.unwrap();
    // Sent before any answer: must not be accepted either.
    let _ = send.write_all(&batch_frame(0x70c, 1, &[1])).await;
    read_replies(&mut recv).await
}

/// A sensor that may send: joins, sends one packet at `t`, says goodbye.
async fn accepted(
    server: &TestServer,
    cert: Option<ClientCert>,
    token: Option<&str>,
    session: u64,
    t: u64,
) {
    let (_endpoint, conn) = connect_as(server, protocol::ALPN, cert).await.unwrap();
    let mut h = hello(session, "hostA");
    h.token = token.and_then(|t| AuthToken::new(t.as_bytes().to_vec()));
    let (mut send, mut recv, resume) = join(&conn, &h).await;
    assert_eq!(resume, 0);
    send.write_all(&batch_frame(session, 1, &[t]))
        .await
        .unwrap();
    say_goodbye(send, &mut recv, 1).await;
    conn.close(0u32.into(), b"");
}

/// A pcapng server with a 50 ms reorder window.
fn server(client_roots: Option<rustls::RootCertStore>, auth: Auth) -> TestServer {
    start_server_with(
        Duration::from_millis(50),
        Format::Pcapng,
        client_roots,
        auth,
    )
}

/// Stops the server, which must have served one sensor session with one packet; returns
/// the interfaces of its output and the session's summary line.
async fn finish(server: TestServer) -> (Vec<(String, String)>, String) {
    server.stop.send(()).unwrap();
    let summaries = server.done.await.unwrap().unwrap();
    assert_eq!(summaries.len(), 1);
    let (interfaces, packets) = interfaces_and_packets(&server.out.bytes());
    assert_eq!((interfaces.len(), packets), (1, 1), "{interfaces:?}");
    (interfaces, summaries[0].line())
}

/// The interfaces of a pcapng output, as (name, description), and its packet count.
fn interfaces_and_packets(bytes: &[u8]) -> (Vec<(String, String)>, usize) {
    let mut reader = PcapNgReader::new(bytes).unwrap();
    let (mut interfaces, mut packets) = (Vec::new(), 0);
    while let Some(block) = reader.next_block() {
        match block.unwrap().0 {
            Block::InterfaceDescription(idb) => {
                let (mut name, mut description) = (String::new(), String::new());
                for o in idb.options {
                    match o {
                        InterfaceDescriptionOption::IfName(n) => name = n.into_owned(),
                        InterfaceDescriptionOption::IfDescription(d) => {
                            description = d.into_owned()
                        }
                        _ => {}
                    }
                }
                interfaces.push((name, description));
            }
            Block::EnhancedPacket(_) => packets += 1,
            _ => {}
        }
    }
    (interfaces, packets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_certificates_name_sensors_and_every_other_peer_is_refused() {
    let ca = Ca::new("Test CA");
    let server = server(Some(ca.roots()), Auth::new(None, true));

    let missing = refused_by_tls(&server, None).await;
    assert!(
        missing.contains("error 116"),
        "certificate_required: {missing}"
    );
    let stranger = refused_by_tls(&server, Some(Ca::new("Other CA").client("tap-1"))).await;
    assert!(stranger.contains("error 48"), "unknown_ca: {stranger}");
    let expired = ca.client_valid(
        "tap-1",
        date_time_ymd(2020, 1, 1),
        date_time_ymd(2021, 1, 1),
    );
    let expired = refused_by_tls(&server, Some(expired)).await;
    assert!(
        expired.contains("error 45"),
        "certificate_expired: {expired}"
    );
    let early = ca.client_valid(
        "tap-1",
        date_time_ymd(2090, 1, 1),
        date_time_ymd(2091, 1, 1),
    );
    let early = refused_by_tls(&server, Some(early)).await;
    assert!(early.contains("error 45"), "certificate_expired: {early}");

    // The certificate's name, not the id the sensor gives itself ("id-hostA"), names it.
    accepted(&server, Some(ca.client("tap-1")), None, 0xa, 10).await;

    let (interfaces, line) = finish(server).await;
    assert!(
        line.starts_with("sensor tap-1 (hostA, 127.0.0.1:"),
        "{line}"
    );
    assert_eq!(interfaces[0].0, "tap-1/eth0[31m");
    assert!(
        interfaces[0]
            .1
            .starts_with("sensor tap-1 (client certificate) on hostA (linux)"),
        "{interfaces:?}"
    );
}

const TOKEN: &str = "0123456789abcdef-the-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_is_required_before_anything_is_accepted() {
    let server = server(
        None,
        Auth::new(AuthToken::new(TOKEN.as_bytes().to_vec()), false),
    );
    for token in [None, Some("0123456789abcdef-the-tokeN"), Some("x")] {
        let replies = with_token(&server, None, token).await;
        assert_eq!(
            error_code(&replies),
            Some(ErrorCode::UNAUTHENTICATED),
            "{replies:?}"
        );
        assert_eq!(replies.len(), 1, "no Ack before the refusal: {replies:?}");
        let Some(Message::Error(e)) = replies.last() else {
            unreachable!()
        };
        assert!(e.message.contains("pass --token-file"), "{}", e.message);
    }
    accepted(&server, None, Some(TOKEN), 0xb, 20).await;

    let (interfaces, _) = finish(server).await;
    assert_eq!(interfaces[0].0, "hostA/eth0[31m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_both_a_certificate_and_the_token_are_required() {
    let ca = Ca::new("Test CA");
    let server = server(
        Some(ca.roots()),
        Auth::new(AuthToken::new(TOKEN.as_bytes().to_vec()), true),
    );
    let replies = with_token(&server, Some(ca.client("tap-2")), None).await;
    assert_eq!(error_code(&replies), Some(ErrorCode::UNAUTHENTICATED));
    assert!(refused_by_tls(&server, None).await.contains("error 116"));
    accepted(&server, Some(ca.client("tap-2")), Some(TOKEN), 0xc, 30).await;

    let (interfaces, _) = finish(server).await;
    assert_eq!(interfaces[0].0, "tap-2/eth0[31m");
}
