//! Authentication end to end, with the real programs on 127.0.0.1 (ports 4441-4459): mutual
//! TLS set up with `receiver certs`, the shared token, the token a receiver requires by
//! default, and the receiver certificates a sensor must refuse. Every refused sensor exits 1 with one line saying what to do, and
//! leaves nothing in the receiver's output: no packet, no interface.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rcgen::{
    date_time_ymd, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyPair,
};
use testbed::capstream::{
    pcapng_interfaces, receiver_sessions, tcpdump_records, PcapngInterface, Receiver, Record,
    Scratch,
};
use testbed::{corpus, run, workspace_bin};

/// `args` followed by `more`.
fn and<'a>(args: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    [args, more].concat()
}

fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// What the sensors stream: the corpus's UDP packets.
fn reference() -> Vec<Record> {
    tcpdump_records(&corpus::pcap(), "udp").unwrap()
}

/// Runs a workspace program to its end (at most 60 s).
fn run_bin(program: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(workspace_bin(program))
        .args(args)
        .output()
        .unwrap()
}

/// `receiver certs ...`: must succeed; returns what it printed.
fn certs(args: &[&str]) -> String {
    run(
        &arg(&workspace_bin("receiver")),
        &[&["certs"][..], args].concat(),
    )
    .unwrap()
}

/// A receiver on 127.0.0.1:`port` writing `dir/<out>` as pcapng, with `args`.
fn receiver(dir: &Scratch, port: u16, out: &str, args: &[&str]) -> (Receiver, PathBuf) {
    let out = dir.join(out);
    let out_arg = arg(&out);
    let state = dir.join(&format!("state-{port}"));
    let all = [&["--out", out_arg.as_str()][..], args].concat();
    (Receiver::start(None, &state, port, &all).unwrap(), out)
}

/// A receiver like [`receiver`] presenting the certificate `receiver certs init` made in
/// `pki`.
fn pki_receiver(
    dir: &Scratch,
    port: u16,
    out: &str,
    pki: &str,
    args: &[&str],
) -> (Receiver, PathBuf) {
    let (cert, key) = (file(pki, "receiver.crt"), file(pki, "receiver.key"));
    receiver(
        dir,
        port,
        out,
        &and(&["--cert", &cert, "--key", &key], args),
    )
}

/// `dir/name`.
fn file(dir: &str, name: &str) -> String {
    format!("{dir}/{name}")
}

/// A sensor streaming the corpus's UDP packets, which must deliver them all; returns its
/// stderr.
fn sensor_delivers(args: &[&str]) -> String {
    let out = run_bin(
        "sensor",
        &[args, &["--read", &corpus::pcap_arg(), "--bpf", "udp"]].concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sensor {args:?} failed: {stderr}");
    stderr
}

/// A sensor that must be refused: exit code 1 with one error line that contains `needle`,
/// and no attempt to reconnect.
fn sensor_refused(args: &[&str], needle: &str) -> String {
    let out = run_bin(
        "sensor",
        &[args, &["--read", &corpus::pcap_arg(), "--bpf", "udp"]].concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "sensor {args:?}: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("sensor: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "sensor {args:?}: one error line: {stderr}");
    assert!(
        errors[0].contains(needle),
        "sensor {args:?}: should say {needle:?}: {stderr}"
    );
    assert!(
        !stderr.contains("reconnecting") && !stderr.contains("retrying"),
        "sensor {args:?}: a refusal is final: {stderr}"
    );
    stderr
}

/// A receiver started with `args` that must refuse to start: exit code 2 and one line;
/// returns it.
fn receiver_refused(args: &[&str]) -> String {
    let refused = run_bin("receiver", args);
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    stderr
}

/// Stops a receiver that refused everyone: its output holds no interface and no packet.
fn stop_with_nothing_written(mut receiver: Receiver, out: &Path) -> String {
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    let summary = receiver.proc.summary().unwrap();
    assert_eq!(
        summary["sessions"].as_array().map(Vec::len),
        Some(0),
        "{log}"
    );
    let interfaces = pcapng_interfaces(out).unwrap();
    assert!(interfaces.is_empty(), "{interfaces:?}");
    log
}

/// The one interface of a receiver's output: its packets must be the reference's.
fn only_interface(out: &Path) -> PcapngInterface {
    let mut interfaces = pcapng_interfaces(out).unwrap();
    assert_eq!(interfaces.len(), 1, "{interfaces:?}");
    let only = interfaces.remove(0);
    assert!(
        only.records == reference(),
        "{} packets",
        only.records.len()
    );
    only
}

/// A certificate valid from January 1st of `from` to that of `to`, for `names`, signed by
/// the CA in `pki` (or self-signed without one): writes `pki/<file>.crt` and `.key`.
fn certificate(
    pki: &Path,
    file: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    (from, to): (i32, i32),
    signed: bool,
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    params.not_before = date_time_ymd(from, 1, 1);
    params.not_after = date_time_ymd(to, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = if signed {
        let read = |name: &str| std::fs::read_to_string(pki.join(name)).unwrap();
        let ca_key = KeyPair::from_pem(&read("ca.key")).unwrap();
        let ca = Issuer::from_ca_cert_pem(&read("ca.crt"), ca_key).unwrap();
        params.signed_by(&key, &ca).unwrap()
    } else {
        params.self_signed(&key).unwrap()
    };
    let (crt, key_file) = (
        pki.join(format!("{file}.crt")),
        pki.join(format!("{file}.key")),
    );
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (arg(&crt), arg(&key_file))
}

#[test]
fn mutual_tls_from_receiver_certs_names_sensors_by_certificate_and_refuses_the_rest() {
    let dir = Scratch::new("mtls").unwrap();
    let (pki, other) = (dir.join("pki"), dir.join("other"));
    let (pki_arg, other_arg) = (arg(&pki), arg(&other));
    let printed = certs(&["init", "--dir", &pki_arg]);
    assert!(
        printed.contains("receiver --cert") && printed.contains("--client-ca"),
        "{printed}"
    );
    let printed = certs(&["sensor", "tap-1", "--dir", &pki_arg]);
    assert!(
        printed.contains("--ca ca.crt --cert tap-1.crt --key tap-1.key"),
        "{printed}"
    );
    certs(&["init", "--dir", &other_arg]);
    certs(&["sensor", "tap-1", "--dir", &other_arg]);
    let client = ExtendedKeyUsagePurpose::ClientAuth;
    let (expired, expired_key) = certificate(
        &pki,
        "expired",
        &["tap-1"],
        client.clone(),
        (2020, 2021),
        true,
    );
    let (early, early_key) = certificate(&pki, "early", &["tap-1"], client, (2090, 2091), true);

    let ca = file(&pki_arg, "ca.crt");
    let (receiver, out) = pki_receiver(&dir, 4441, "mtls.pcapng", &pki_arg, &["--client-ca", &ca]);
    let to = ["--receiver", "127.0.0.1:4441", "--ca", &ca];
    let (tap, tap_key) = (file(&pki_arg, "tap-1.crt"), file(&pki_arg, "tap-1.key"));
    let (stranger, stranger_key) = (file(&other_arg, "tap-1.crt"), file(&other_arg, "tap-1.key"));
    sensor_refused(&to, "requires a client certificate: pass --cert and --key");
    sensor_refused(
        &and(&to, &["--cert", &stranger, "--key", &stranger_key]),
        "not issued by the CA the receiver trusts",
    );
    sensor_refused(
        &and(&to, &["--cert", &expired, "--key", &expired_key]),
        "expired or not yet valid",
    );
    sensor_refused(
        &and(&to, &["--cert", &early, "--key", &early_key]),
        "expired or not yet valid",
    );
    // Mismatched files never reach the network.
    let corpus = corpus::pcap_arg();
    let mismatched = run_bin(
        "sensor",
        &and(
            &to,
            &["--cert", &tap, "--key", &early_key, "--read", &corpus],
        ),
    );
    assert_eq!(mismatched.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&mismatched.stderr).contains("is not the key of"));

    // The id the sensor gives itself is data; its certificate names it.
    sensor_delivers(&and(
        &to,
        &["--cert", &tap, "--key", &tap_key, "--sensor-id", "impostor"],
    ));

    let mut receiver = receiver;
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    assert!(
        log.contains("127.0.0.1:") && log.contains(": refused: handshake failed"),
        "{log}"
    );
    let sessions = receiver_sessions(&receiver.proc.summary().unwrap());
    assert_eq!(sessions.len(), 1, "{log}");
    assert_eq!(sessions[0].sensor_id, "tap-1", "{log}");
    let only = only_interface(&out);
    assert!(only.name.starts_with("tap-1/"), "{}", only.name);
    assert!(
        only.description
            .starts_with("sensor tap-1 (client certificate) on "),
        "{}",
        only.description
    );
}

#[test]
fn sensors_refuse_receivers_they_cannot_verify() {
    let dir = Scratch::new("verify").unwrap();
    let (pki, other) = (dir.join("pki"), dir.join("other"));
    let (pki_arg, other_arg) = (arg(&pki), arg(&other));
    certs(&["init", "--dir", &pki_arg]);
    certs(&["init", "--dir", &other_arg]);
    let ca = file(&pki_arg, "ca.crt");

    let (real, real_out) = pki_receiver(&dir, 4442, "real.pcapng", &pki_arg, &[]);
    // Another CA, another fingerprint.
    let other_ca = file(&other_arg, "ca.crt");
    sensor_refused(
        &["--receiver", "127.0.0.1:4442", "--ca", &other_ca],
        "is --ca the receiver's certificate, or the CA that signed it?",
    );
    let wrong = "00".repeat(32);
    sensor_refused(
        &["--receiver", "127.0.0.1:4442", "--fingerprint", &wrong],
        "does not match --fingerprint",
    );

    // A man in the middle presents its own certificate (a receiver of its own, here) where
    // the sensor expects the real one, whether trusted by CA or by fingerprint.
    let (mitm, mitm_out) = receiver(&dir, 4443, "mitm.pcapng", &[]);
    sensor_refused(&["--receiver", "127.0.0.1:4443", "--ca", &ca], "impostor");
    sensor_refused(
        &[
            "--receiver",
            "127.0.0.1:4443",
            "--fingerprint",
            &real.fingerprint,
        ],
        "does not match --fingerprint",
    );
    stop_with_nothing_written(mitm, &mitm_out);
    stop_with_nothing_written(real, &real_out);

    // A receiver certificate out of its dates.
    let server = ExtendedKeyUsagePurpose::ServerAuth;
    for (port, name, dates, needle) in [
        (4444, "expired", (2020, 2021), "certificate expired"),
        (4445, "early", (2090, 2091), "certificate not valid yet"),
    ] {
        let names = ["localhost", "127.0.0.1"];
        let (crt, key) = certificate(&pki, name, &names, server.clone(), dates, false);
        let (receiver, out) = receiver(
            &dir,
            port,
            &format!("{port}.pcapng"),
            &["--cert", &crt, "--key", &key],
        );
        let stderr = sensor_refused(
            &["--receiver", &format!("127.0.0.1:{port}"), "--ca", &crt],
            needle,
        );
        assert!(stderr.contains("check both clocks"), "{stderr}");
        stop_with_nothing_written(receiver, &out);
    }
}

#[test]
fn a_shared_token_admits_only_the_sensors_that_know_it() {
    let dir = Scratch::new("token").unwrap();
    let secret = "jJ8w0lq3Vq9gH5vJr2yQm4c6Ue1tN7sK";
    let write = |name: &str, content: &str| {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        arg(&path)
    };
    let token = write("token", &format!("{secret}\n"));
    let wrong = write("wrong", "jJ8w0lq3Vq9gH5vJr2yQm4c6Ue1tN7sX\n");
    let short = write("short", "tooshort\n");

    // A token too short to be a secret stops the receiver at start.
    let state = arg(&dir.join("state-short"));
    let stderr = receiver_refused(&[
        "--listen",
        "127.0.0.1:4446",
        "--state-dir",
        &state,
        "--token-file",
        &short,
        "--out",
        &arg(&dir.join("never.pcapng")),
    ]);
    assert!(stderr.contains("fewer than the 16"), "{stderr}");

    let (mut receiver, out) = receiver(&dir, 4447, "token.pcapng", &["--token-file", &token]);
    let to = [
        "--receiver",
        "127.0.0.1:4447",
        "--fingerprint",
        receiver.fingerprint.as_str(),
    ];
    let needle = "wrong or missing token: pass --token-file";
    sensor_refused(&to, needle);
    let log = sensor_refused(&[&to[..], &["--token-file", &wrong]].concat(), needle);
    assert!(!log.contains("jJ8w0l"), "{log}");
    let log =
        sensor_delivers(&[&to[..], &["--token-file", &token, "--sensor-id", "tok-1"]].concat());
    assert!(!log.contains(secret), "{log}");

    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    assert!(
        !log.contains("jJ8w0l"),
        "the receiver never logs a token: {log}"
    );
    assert!(
        log.contains("127.0.0.1:") && log.contains(": refused: no token"),
        "{log}"
    );
    let sessions = receiver_sessions(&receiver.proc.summary().unwrap());
    assert_eq!(sessions.len(), 1, "{log}");
    assert_eq!(sessions[0].sensor_id, "tok-1");
    only_interface(&out);
}

/// Stops a receiver that took one sensor, `sensor_id`, whose packets are the output's one
/// interface; returns its log.
fn stop_with_one_sensor(mut receiver: Receiver, out: &Path, sensor_id: &str) -> String {
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    let sessions = receiver_sessions(&receiver.proc.summary().unwrap());
    assert_eq!(sessions.len(), 1, "{log}");
    assert_eq!(sessions[0].sensor_id, sensor_id, "{log}");
    only_interface(out);
    log
}

/// `path`'s mode bits and content.
fn mode_and_content(path: &Path) -> (u32, String) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    (mode, std::fs::read_to_string(path).unwrap())
}

#[test]
fn a_default_receiver_requires_the_token_it_generated() {
    let dir = Scratch::new("default-token").unwrap();
    let metrics = "127.0.0.1:4459";
    let (mut first_run, out) = receiver(&dir, 4448, "default.pcapng", &["--metrics", metrics]);
    first_run
        .proc
        .wait_for("on another host", std::time::Duration::from_secs(5))
        .unwrap();
    let token = dir.join("state-4448").join("token");
    let (mode, first) = mode_and_content(&token);
    assert_eq!(mode, 0o600, "the token is its owner's alone");
    assert_eq!(first.len(), 65, "{first:?}");
    assert!(
        first[..64]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && first.ends_with('\n'),
        "64 lowercase hex digits and a newline: {first:?}"
    );
    let log = first_run.proc.stderr();
    let command = format!(
        "on another host: sensor --receiver 127.0.0.1:4448 --fingerprint {} --token-file <copy of {}, mode 0600> -i IFACE",
        first_run.fingerprint,
        token.display()
    );
    assert!(log.contains(&command), "{log}");

    // A sensor without the token is refused, one line, and nothing of it is written.
    let to = [
        "--receiver",
        "127.0.0.1:4448",
        "--fingerprint",
        first_run.fingerprint.as_str(),
    ];
    sensor_refused(&to, "wrong or missing token: pass --token-file");
    // Counted, whatever the log's rate limit leaves out.
    let scrape = run("curl", &["-s", &format!("http://{metrics}/metrics")]).unwrap();
    assert!(
        scrape
            .lines()
            .any(|l| l == "capstream_receiver_auth_failures_total 1"),
        "{scrape}"
    );
    let log = stop_with_nothing_written(first_run, &out);
    assert!(log.contains(": refused: no token"), "{log}");

    // Restarted on the same state: the same token, untouched, and it admits the sensor.
    let (again, out) = receiver(&dir, 4448, "again.pcapng", &[]);
    assert_eq!(mode_and_content(&token), (0o600, first));
    assert!(!again.proc.stderr().contains("created the token"));
    let token_arg = arg(&token);
    let to = [
        "--receiver",
        "127.0.0.1:4448",
        "--fingerprint",
        again.fingerprint.as_str(),
        "--token-file",
        token_arg.as_str(),
        "--sensor-id",
        "with-token",
    ];
    sensor_delivers(&to);
    stop_with_one_sensor(again, &out, "with-token");
}

#[test]
fn allow_unauthenticated_admits_any_sensor_and_says_so() {
    let dir = Scratch::new("open").unwrap();
    let (mut receiver, out) = receiver(&dir, 4449, "open.pcapng", &["--allow-unauthenticated"]);
    receiver
        .proc
        .wait_for(
            "--allow-unauthenticated: any host",
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    assert!(
        !dir.join("state-4449").join("token").exists(),
        "no token is made when none is required"
    );
    let log = receiver.proc.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains(" WARN ") && l.contains("--allow-unauthenticated: any host")),
        "{log}"
    );
    sensor_delivers(&[
        "--receiver",
        "127.0.0.1:4449",
        "--fingerprint",
        receiver.fingerprint.as_str(),
        "--sensor-id",
        "anyone",
    ]);
    stop_with_one_sensor(receiver, &out, "anyone");
}

#[test]
fn a_live_stream_off_loopback_must_be_asked_for_by_name() {
    let dir = Scratch::new("live-remote").unwrap();
    let state = arg(&dir.join("state"));
    let stderr = receiver_refused(&[
        "--listen",
        "127.0.0.1:4450",
        "--state-dir",
        &state,
        "--serve-pcap",
        "0.0.0.0:4451",
    ]);
    assert!(
        stderr.starts_with("receiver: error: --serve-pcap 0.0.0.0:4451")
            && stderr.contains("--serve-pcap-allow-remote"),
        "{stderr}"
    );
    assert!(
        std::net::TcpStream::connect("127.0.0.1:4451").is_err(),
        "nothing listens"
    );

    let mut allowed = Receiver::start(
        None,
        &dir.join("state"),
        4450,
        &["--serve-pcap", "0.0.0.0:4451", "--serve-pcap-allow-remote"],
    )
    .unwrap();
    allowed
        .proc
        .wait_for("whoever reaches TCP", std::time::Duration::from_secs(5))
        .unwrap();
    let log = allowed.proc.stderr();
    assert!(
        log.lines().any(|l| l.contains(" WARN ")
            && l.contains("whoever reaches TCP 0.0.0.0:4451 reads every captured packet")),
        "{log}"
    );
    allowed.stop().unwrap();
}

/// A QUIC client of the tests' own, speaking to a receiver on 127.0.0.1 from `local` (any
/// address of 127.0.0.0/8), trusting its generated certificate.
mod hostile {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use protocol::{decode_frame, AuthToken, Hello, InterfaceInfo, Message};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    pub fn endpoint(local: &str, cert: &Path) -> quinn::Endpoint {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(cert).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![protocol::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client(local.parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        endpoint
    }

    /// A handshake, which the receiver may refuse.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        to: SocketAddr,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        match tokio::time::timeout(
            Duration::from_secs(15),
            endpoint.connect(to, "localhost").unwrap(),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(quinn::ConnectionError::TimedOut),
        }
    }

    /// A Hello for session `id` with `interfaces` interfaces.
    pub fn hello(id: u64, interfaces: usize, token: &[u8]) -> Hello {
        Hello {
            version: protocol::PROTOCOL_VERSION,
            session_id: id,
            session_secret: rand::random(),
            sensor_id: "hostile".into(),
            hostname: "hostile".into(),
            os: "linux".into(),
            interfaces: (0..interfaces)
                .map(|i| InterfaceInfo {
                    name: format!("eth{i}"),
                    link_type: 1,
                    snaplen: 262_144,
                    filter: "not port 22".into(),
                })
                .collect(),
            token: AuthToken::new(token.to_vec()),
            available: Vec::new(),
            on_demand: false,
            tls_key_log: false,
        }
    }

    /// Says `hello` on a new stream of `conn`; the receiver's first reply, if any.
    pub async fn say_hello(conn: &quinn::Connection, hello: Hello) -> Option<Message> {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&Message::Hello(hello).to_bytes())
            .await
            .ok()?;
        let mut buf = bytes::BytesMut::new();
        loop {
            if let Some(m) = decode_frame(&mut buf).ok()? {
                return Some(m);
            }
            let chunk =
                tokio::time::timeout(Duration::from_secs(15), recv.read_chunk(1 << 16, true))
                    .await
                    .ok()?
                    .ok()??;
            buf.extend_from_slice(&chunk.bytes);
        }
    }
}

/// `VmRSS` of `pid` in KiB and its open file descriptors.
fn rss_kib_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// Many connections from one address that never say Hello hold only a few of the
/// receiver's places for peers that have not authenticated: the rest are refused at once,
/// logged at a bounded rate, and a real sensor from another address joins meanwhile.
#[test]
fn connections_that_prove_nothing_are_capped_per_address_and_a_sensor_still_joins() {
    let dir = Scratch::new("preauth").unwrap();
    let (receiver, out) = receiver(&dir, 4452, "preauth.pcapng", &[]);
    let rt = hostile::runtime();
    let to: std::net::SocketAddr = "127.0.0.1:4452".parse().unwrap();
    let endpoint = rt.block_on(async { hostile::endpoint("127.0.0.2:0", &receiver.cert) });
    let (held, refused) = rt.block_on(async {
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..40 {
            match hostile::connect(&endpoint, to).await {
                Ok(conn) => held.push(conn),
                Err(_) => refused += 1,
            }
        }
        (held, refused)
    });
    assert!(
        held.len() <= 8 && refused >= 32,
        "{} connections of one address held, {refused} refused",
        held.len()
    );
    // Meanwhile, a sensor with the token, from 127.0.0.1.
    let token = arg(&dir.join("state-4452").join("token"));
    sensor_delivers(&[
        "--receiver",
        "127.0.0.1:4452",
        "--fingerprint",
        receiver.fingerprint.as_str(),
        "--token-file",
        &token,
        "--sensor-id",
        "real",
    ]);
    drop(held);
    let log = stop_with_one_sensor(receiver, &out, "real");
    let lines = log.lines().filter(|l| l.contains("127.0.0.2:")).count();
    assert!(
        (1..=4).contains(&lines),
        "refusals of one address are logged at a bounded rate: {lines} lines\n{log}"
    );
}

/// The "done when" for M2: a client holding the token says Hello with 1,000
/// distinct session ids, 64 interfaces each, and goes; the receiver keeps a bounded number
/// of sessions, its memory and file descriptors stay bounded, and a real sensor still
/// delivers everything afterwards.
#[test]
fn a_thousand_session_ids_leave_the_receiver_bounded() {
    let dir = Scratch::new("sessions").unwrap();
    let metrics = "127.0.0.1:4453";
    let (mut receiver, out) = receiver(&dir, 4454, "sessions.pcapng", &["--metrics", metrics]);
    let token = dir.join("state-4454").join("token");
    let token_bytes = std::fs::read_to_string(&token).unwrap().trim().to_string();
    let pid = receiver.proc.pid();
    let (rss_before, fds_before) = rss_kib_and_fds(pid);
    let rt = hostile::runtime();
    let to: std::net::SocketAddr = "127.0.0.1:4454".parse().unwrap();
    let (admitted, unavailable) = rt.block_on(async {
        let endpoint = hostile::endpoint("127.0.0.3:0", &receiver.cert);
        let (mut admitted, mut unavailable) = (0, 0);
        for id in 0..1000u64 {
            let conn = hostile::connect(&endpoint, to).await.unwrap();
            let hello = hostile::hello(0x00ba_d000_0000 + id, 64, token_bytes.as_bytes());
            match hostile::say_hello(&conn, hello).await {
                Some(protocol::Message::Ack(_)) => admitted += 1,
                Some(protocol::Message::Error(e)) if e.code == protocol::ErrorCode::UNAVAILABLE => {
                    unavailable += 1
                }
                other => panic!("session {id}: {other:?}"),
            }
            conn.close(0u32.into(), b"gone");
        }
        endpoint.wait_idle().await;
        (admitted, unavailable)
    });
    assert_eq!(admitted + unavailable, 1000);
    let scrape = testbed::run("curl", &["-s", &format!("http://{metrics}/metrics")]).unwrap();
    let sessions: f64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("capstream_receiver_sessions "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{scrape}"));
    assert!(
        sessions <= 32.0,
        "sessions kept from one address: {sessions}"
    );
    let (rss_after, fds_after) = rss_kib_and_fds(pid);
    assert!(
        rss_after < rss_before + 96 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(
        fds_after < fds_before + 16,
        "fds grew from {fds_before} to {fds_after}"
    );

    // A real sensor still delivers.
    let token_arg = arg(&token);
    sensor_delivers(&[
        "--receiver",
        "127.0.0.1:4454",
        "--fingerprint",
        receiver.fingerprint.as_str(),
        "--token-file",
        &token_arg,
        "--sensor-id",
        "real",
    ]);
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    let real: Vec<_> = receiver_sessions(&receiver.proc.summary().unwrap())
        .into_iter()
        .filter(|s| s.sensor_id == "real")
        .collect();
    assert_eq!(real.len(), 1, "{log}");
    assert_eq!(real[0].packets as usize, reference().len(), "{log}");
    let _ = out;
}

/// A classic pcap file of raw IPv4 packets (LINKTYPE_RAW, 101): `n` small UDP datagrams.
fn raw_ip_pcap(path: &Path, n: u32) {
    let mut bytes = Vec::new();
    for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65535, 101] {
        // magic, version 2.4 (as two u16: 2 then 4), thiszone, sigfigs, snaplen, link type
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.splice(4..8, [2u8, 0, 4, 0]);
    for i in 0..n {
        let mut ip = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,
        ];
        ip.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]);
        for v in [1_700_000_000 + i, 0, ip.len() as u32, ip.len() as u32] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&ip);
    }
    std::fs::write(path, bytes).unwrap();
}

/// Link type and record count of a classic pcap stream (little-endian, as the receiver
/// writes it on this machine).
fn pcap_link_type_and_records(bytes: &[u8]) -> (u32, usize) {
    let link_type = u32::from_le_bytes(bytes[20..24].try_into().unwrap());
    let (mut at, mut records) = (24, 0);
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        at += 16 + len;
        records += 1;
    }
    (link_type, records)
}

/// The first sensor to arrive no longer decides the link type of classic pcap outputs:
/// with --link-type ethernet, a raw-IP sensor that comes first is refused by a pcap file,
/// and skipped (counted) by a live stream beside a pcapng file, which keeps both; the
/// Ethernet sensor after it is written and served.
#[test]
fn the_first_sensor_does_not_decide_the_link_type() {
    let dir = Scratch::new("linktype").unwrap();
    let raw = dir.join("raw.pcap");
    raw_ip_pcap(&raw, 5);
    let raw = arg(&raw);
    let sensor_args = |receiver: &Receiver, port: u16, token: &str| -> Vec<String> {
        [
            "--receiver",
            &format!("127.0.0.1:{port}"),
            "--fingerprint",
            &receiver.fingerprint,
            "--token-file",
            token,
        ]
        .map(String::from)
        .to_vec()
    };

    // A pcap file.
    let (mut pcap, out) = receiver(
        &dir,
        4456,
        "ethernet.pcap",
        &["--format", "pcap", "--link-type", "ethernet"],
    );
    let token = arg(&dir.join("state-4456").join("token"));
    let to = sensor_args(&pcap, 4456, &token);
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    let refused = run_bin("sensor", &and(&to, &["--read", &raw]));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--link-type"), "{stderr}");
    sensor_delivers(&and(&to, &["--sensor-id", "ethernet"]));
    pcap.stop().unwrap();
    let written = tcpdump_records(&out, "").unwrap();
    assert!(written == reference(), "the Ethernet sensor's packets, all");

    // A live stream beside a pcapng file.
    let (mut receiver, out) = receiver(
        &dir,
        4457,
        "both.pcapng",
        &["--serve-pcap", "127.0.0.1:4458", "--link-type", "ethernet"],
    );
    let client = std::thread::spawn(|| {
        use std::io::Read;
        let mut stream = std::net::TcpStream::connect("127.0.0.1:4458").unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).unwrap();
        bytes
    });
    receiver
        .proc
        .wait_for("live stream: client", std::time::Duration::from_secs(10))
        .unwrap();
    let token = arg(&dir.join("state-4457").join("token"));
    let to = sensor_args(&receiver, 4457, &token);
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    let out_raw = run_bin("sensor", &and(&to, &["--read", &raw, "--sensor-id", "raw"]));
    assert!(
        out_raw.status.success(),
        "{}",
        String::from_utf8_lossy(&out_raw.stderr)
    );
    sensor_delivers(&and(&to, &["--sensor-id", "ethernet"]));
    receiver.stop().unwrap();
    let streamed = client.join().unwrap();
    assert_eq!(
        pcap_link_type_and_records(&streamed),
        (1, reference().len()),
        "the stream carries Ethernet, every Ethernet packet"
    );
    let log = receiver.proc.stderr();
    assert!(
        log.contains("5 not sent being of another link type"),
        "{log}"
    );
    let interfaces = pcapng_interfaces(&out).unwrap();
    assert_eq!(interfaces.len(), 2, "the file keeps both: {interfaces:?}");
}
