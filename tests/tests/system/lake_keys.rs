//! TLS keys in the capture lake: `sensor --keylog` lines reach the lake's segments as
//! Decryption Secrets Blocks, a segment holding keys and no packet is published all the
//! same, and `receiver query` answers carry the keys of the segments they read, so that
//! tshark decrypts an answer alone, in one pass.

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use testbed::capstream::{start_sensor, Receiver, Scratch};
use testbed::lake::{lake_files, query, query_answer};
use testbed::prometheus::{scrape, sum};
use testbed::tls::{request_paths, secret_paths, secrets_blocks, without_secrets, TlsServer, PORT};
use testbed::{require_root, Lab, Proc};

const REQUESTS: usize = 20;

/// What curl requests over TLS 1.3 left in a lake.
struct Captured {
    lake: PathBuf,
    /// Lines of the key log curl wrote.
    lines: usize,
    /// The receiver's stderr and exit summary.
    log: String,
    summary: serde_json::Value,
}

/// `receiver --lake LAKE` in the capturing namespace, its state in `dir`, closing
/// segments at `segment_time`.
fn lake_receiver(lab: &Lab, dir: &Scratch, lake: &Path, segment_time: &str) -> Receiver {
    let args = [
        "--lake",
        lake.to_str().unwrap(),
        "--receiver-name",
        "rx1",
        "--segment-time",
        segment_time,
    ];
    Receiver::start(Some(&lab.cap), &dir.join("state"), 4433, &args).unwrap()
}

/// A TLS server, a receiver writing a lake in `dir` and a sensor on `cap0` following the
/// key log of the requests made meanwhile, capturing what `filter` matches.
struct LakeRun {
    server: TlsServer,
    keylog: PathBuf,
    lake: PathBuf,
    receiver: Receiver,
    sensor: Proc,
}

impl LakeRun {
    fn start(
        lab: &Lab,
        dir: &Scratch,
        filter: &str,
        segment_time: &str,
        sensor_args: &[&str],
    ) -> Self {
        let server = TlsServer::start(lab, dir, "-tls1_3");
        let keylog = dir.join("keys.log");
        let lake = dir.join("lake");
        std::fs::create_dir_all(&lake).unwrap();
        let receiver = lake_receiver(lab, dir, &lake, segment_time);
        let keylog_arg = keylog.to_str().unwrap().to_string();
        let mut args = vec![
            "--iface",
            "cap0",
            "--sensor-id",
            "tls",
            "--mode",
            "tc",
            "--flush-interval",
            "1ms",
            "--keylog",
            &keylog_arg,
        ];
        args.extend_from_slice(sensor_args);
        args.push(filter);
        let sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
        Self {
            server,
            keylog,
            lake,
            receiver,
            sensor,
        }
    }

    fn requests(&self, lab: &Lab, requests: std::ops::Range<usize>) {
        for n in requests {
            self.server.request(lab, &self.keylog, n);
        }
    }

    fn lines(&self) -> usize {
        std::fs::read_to_string(&self.keylog)
            .unwrap()
            .lines()
            .count()
    }

    /// Stops the sensor and the receiver.
    fn stop(mut self) -> Captured {
        self.sensor.stop().unwrap();
        self.receiver.stop().unwrap();
        let lines = self.lines();
        let summary = self.receiver.proc.summary().unwrap();
        Captured {
            lake: self.lake,
            lines,
            log: self.receiver.proc.stderr(),
            summary,
        }
    }
}

/// `requests` curl requests captured by a [`LakeRun`] with one-second segments: every key
/// line was written.
fn capture_into_lake(lab: &Lab, dir: &Scratch, filter: &str, requests: usize) -> Captured {
    let run = LakeRun::start(lab, dir, filter, "1s", &[]);
    run.requests(lab, 0..requests);
    let captured = run.stop();
    let summary = &captured.summary;
    assert_eq!(
        summary["tls_keys"]["written"], captured.lines as u64,
        "{summary:#}"
    );
    captured
}

/// Checks that the pcapng `answer` decrypts requests `0..requests` alone, holding each of
/// the key log's `lines` once.
fn assert_decrypts_alone(answer: &Path, requests: usize, lines: usize, context: &str) {
    assert_eq!(
        request_paths(answer, &[]),
        secret_paths(0..requests),
        "{context}"
    );
    assert_eq!(secrets_blocks(answer).1, lines, "each key line once");
    // Control: the answer without its secrets shows no request.
    assert!(request_paths(&without_secrets(answer), &[]).is_empty());
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
    assert_decrypts_alone(&answer, REQUESTS, lines, &format!("{stderr}\n{log}"));
    assert!(
        stderr.contains(&format!(
            "{lines} TLS key log line(s) written, 0 not written"
        )),
        "{stderr}"
    );

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

const SENSOR_METRICS: &str = "127.0.0.1:9465";

/// A receiver killed (SIGKILL) with a staged segment holding key lines the sensor saw
/// acknowledged, so that no other copy of them exists: started again, it publishes that
/// segment with its keys (found by scanning its blocks), and a query's answer decrypts the
/// requests made before the kill and after.
#[test]
fn keys_of_a_killed_receivers_staged_segment_are_published() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("lake-keys-kill").unwrap();
    let port_filter = format!("tcp port {PORT}");
    // Segments closed only at the exit: the kill finds the first one staged.
    let mut run = LakeRun::start(
        &lab,
        &dir,
        &port_filter,
        "1h",
        &["--metrics", SENSOR_METRICS],
    );
    run.requests(&lab, 0..REQUESTS / 2);
    let lines = run.lines() as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let delivered = loop {
        let metrics = scrape(Some(&lab.cap), SENSOR_METRICS).unwrap();
        let delivered = sum(
            &metrics,
            "capstream_sensor_tls_key_log_delivered_total",
            &[],
        );
        if delivered == Some(lines) || Instant::now() > deadline {
            break delivered;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        delivered,
        Some(lines),
        "key lines acknowledged before the kill"
    );
    run.receiver.proc.signal("KILL").unwrap();
    run.receiver.proc.wait(Duration::from_secs(10)).unwrap();
    assert!(
        manifests(&run.lake).is_empty(),
        "nothing published before the kill"
    );

    run.receiver = lake_receiver(&lab, &dir, &run.lake, "1h");
    run.sensor
        .wait_for("reconnected", Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", run.receiver.proc.stderr()));
    run.requests(&lab, REQUESTS / 2..REQUESTS);
    let Captured {
        lake, lines, log, ..
    } = run.stop();
    assert!(log.contains("staged by an earlier run"), "{log}");

    let answer = dir.join("answer.pcapng");
    let (_, stderr) = query(lake.to_str().unwrap(), &answer, &[&port_filter]).unwrap();
    assert_decrypts_alone(&answer, REQUESTS, lines, &format!("{stderr}\n{log}"));
}
