//! TLS keys in the capture lake: `sensor --keylog` lines reach the lake's segments as
//! Decryption Secrets Blocks, a segment holding keys and no packet is published all the
//! same, and `receiver query` answers carry the keys of the segments they read, so that
//! tshark decrypts an answer alone, in one pass.

use std::path::{Path, PathBuf};

use testbed::capstream::{start_sensor, Receiver, Scratch};
use testbed::lake::{lake_files, query, query_answer};
use testbed::tls::{request_paths, secret_paths, secrets_blocks, without_secrets, TlsServer, PORT};
use testbed::{require_root, Lab};

const REQUESTS: usize = 20;

/// What `requests` curl requests over TLS 1.3 left in a lake.
struct Captured {
    lake: PathBuf,
    /// Lines of the key log curl wrote.
    lines: usize,
    /// The receiver's stderr and exit summary.
    log: String,
    summary: serde_json::Value,
}

/// A receiver writing a lake in `dir` (segments closed every second) and a sensor on
/// `cap0` following the key log of `requests` curl requests, capturing what `filter`
/// matches; both stopped once the requests are done. Every key line was written.
fn capture_into_lake(lab: &Lab, dir: &Scratch, filter: &str, requests: usize) -> Captured {
    let server = TlsServer::start(lab, dir, "-tls1_3");
    let keylog = dir.join("keys.log");
    let lake = dir.join("lake");
    std::fs::create_dir_all(&lake).unwrap();
    let mut receiver = Receiver::start(
        Some(&lab.cap),
        &dir.join("state"),
        4433,
        &[
            "--lake",
            lake.to_str().unwrap(),
            "--receiver-name",
            "rx1",
            "--segment-time",
            "1s",
        ],
    )
    .unwrap();
    let mut sensor = start_sensor(
        Some(&lab.cap),
        &receiver,
        &[
            "--iface",
            "cap0",
            "--sensor-id",
            "tls",
            "--mode",
            "tc",
            "--flush-interval",
            "1ms",
            "--keylog",
            keylog.to_str().unwrap(),
            filter,
        ],
    )
    .unwrap();
    for n in 0..requests {
        server.request(lab, &keylog, n);
    }
    sensor.stop().unwrap();
    receiver.stop().unwrap();
    let lines = std::fs::read_to_string(&keylog).unwrap().lines().count();
    let summary = receiver.proc.summary().unwrap();
    assert_eq!(summary["tls_keys"]["written"], lines as u64, "{summary:#}");
    Captured {
        lake,
        lines,
        log: receiver.proc.stderr(),
        summary,
    }
}

/// The manifests of the lake's segments.
fn manifests(lake: &Path) -> Vec<serde_json::Value> {
    lake_files(lake, ".manifest.json")
        .iter()
        .map(|path| serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap())
        .collect()
}

/// 20 curl requests over TLS 1.3, captured into a lake of one-second segments: the answer
/// of `receiver query` for the TLS port decrypts them all with no key file (each key line
/// once), nothing without its Decryption Secrets Blocks; a classic pcap answer says on
/// stderr how many key lines it could not hold.
#[test]
fn a_lake_query_answer_decrypts_the_tls_requests_alone() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("lake-keys").unwrap();
    let port_filter = format!("tcp port {PORT}");
    let Captured {
        lake,
        lines,
        log,
        summary,
    } = capture_into_lake(&lab, &dir, &port_filter, REQUESTS);
    assert_eq!(summary["tls_keys"]["without_packets"], 0, "{summary:#}");
    let segments = manifests(&lake);
    eprintln!("{} segment(s) in the lake", segments.len());
    assert!(
        segments.iter().any(|m| m["secrets"].is_array()),
        "no segment lists keys: {segments:#?}"
    );

    let lake_arg = lake.to_str().unwrap();
    let answer = dir.join("answer.pcapng");
    let (records, stderr) = query(lake_arg, &answer, &["--stats", &port_filter]).unwrap();
    assert!(!records.is_empty(), "{stderr}");
    assert_eq!(
        request_paths(&answer, &[]),
        secret_paths(0..REQUESTS),
        "{stderr}\n{log}"
    );
    assert_eq!(secrets_blocks(&answer).1, lines, "each key line once");
    assert!(
        stderr.contains(&format!(
            "{lines} TLS key log line(s) written, 0 not written"
        )),
        "{stderr}"
    );
    // Control: the answer without its secrets shows no request.
    assert!(request_paths(&without_secrets(&answer), &[]).is_empty());

    // Classic pcap has no place for keys: said once, with the count.
    let (_, stderr) = query(
        lake_arg,
        &dir.join("answer.pcap"),
        &["--format", "pcap", &port_filter],
    )
    .unwrap();
    let said = format!("classic pcap cannot hold TLS keys: {lines} key log line(s)");
    assert_eq!(stderr.matches(&said).count(), 1, "{stderr}");
}

/// Keys logged while the sensor captures no packet (its filter matches none of the TLS
/// traffic) make segments of keys only: they are published, not dropped, and a query's
/// answer holds every line.
#[test]
fn keys_without_packets_are_kept_in_the_lake() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("lake-keys-only").unwrap();
    let Captured {
        lake,
        lines,
        log,
        summary,
    } = capture_into_lake(&lab, &dir, "udp port 9", 3);
    // No ClientHello followed them here: counted, and kept in the lake all the same.
    assert_eq!(
        summary["tls_keys"]["without_packets"], lines as u64,
        "{summary:#}"
    );
    let segments = manifests(&lake);
    assert!(!segments.is_empty(), "no segment published\n{log}");
    for m in &segments {
        assert_eq!(m["packets"], 0, "{m:#}");
        assert!(
            !m["secrets"].as_array().unwrap().is_empty(),
            "a segment of nothing: {m:#}"
        );
    }

    let answer = dir.join("answer.pcapng");
    let stderr = query_answer(None, &[], lake.to_str().unwrap(), &answer, &["--stats"]).unwrap();
    assert_eq!(secrets_blocks(&answer).1, lines, "{stderr}\n{log}");
    assert!(stderr.contains("0 packet(s) matched"), "{stderr}");
}
