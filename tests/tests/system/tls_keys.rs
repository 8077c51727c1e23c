//! TLS keys travel with the packets: `sensor --keylog` follows the key log curl writes
//! (SSLKEYLOGFILE), and the receiver's pcapng carries the keys in Decryption Secrets Blocks,
//! so that tshark, in one pass and with no key file, reads the HTTP requests inside the TLS
//! sessions to `openssl s_server -www`.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use testbed::capstream::{start_sensor, start_tcpdump, stop_reference, Receiver, Scratch};
use testbed::prometheus::{scrape, sum};
use testbed::tls::{request_paths, secret_paths, secrets_blocks, without_secrets, TlsServer, PORT};
use testbed::{require_root, Lab, Proc};

const REQUESTS: usize = 20;

fn all_paths() -> BTreeSet<String> {
    secret_paths(0..REQUESTS)
}

/// A receiver and a sensor on `cap0`, for the requests the caller makes meanwhile.
struct Run {
    receiver: Receiver,
    sensor: Proc,
}

impl Run {
    fn start(
        lab: &Lab,
        dir: &Scratch,
        out: &str,
        receiver_args: &[&str],
        sensor_args: &[&str],
    ) -> (Self, PathBuf) {
        let (receiver, out) = Receiver::writing(Some(&lab.cap), dir, out, receiver_args).unwrap();
        let mut all = vec!["--iface", "cap0", "--sensor-id", "tls"];
        all.extend_from_slice(sensor_args);
        let sensor = start_sensor(Some(&lab.cap), &receiver, &all).unwrap();
        (Self { receiver, sensor }, out)
    }

    /// Stops both; returns the receiver's stderr and both summaries.
    fn stop(mut self) -> (String, serde_json::Value, serde_json::Value) {
        self.sensor.stop().unwrap();
        let sensor = self.sensor.summary().unwrap();
        self.receiver.stop().unwrap();
        let stderr = self.receiver.proc.stderr();
        let summary = self.receiver.proc.summary().unwrap();
        (stderr, summary, sensor)
    }
}

/// What capturing `requests` curl requests to `server` left.
struct Captured {
    out: PathBuf,
    keylog: PathBuf,
    /// The receiver's.
    stderr: String,
    summary: serde_json::Value,
    sensor: serde_json::Value,
}

/// A receiver writing `out` (with `receiver_args`) and a sensor in `mode` following the key
/// log of `requests` curl requests to `server`, stopped once they are done.
fn capture_requests(
    lab: &Lab,
    dir: &Scratch,
    server: &TlsServer,
    mode: &str,
    out: &str,
    receiver_args: &[&str],
    requests: usize,
) -> Captured {
    let keylog = dir.join("keys.log");
    let keylog_arg = keylog.to_str().unwrap().to_string();
    let port_filter = format!("tcp port {PORT}");
    // Packets leave the sensor at once, before the keys logged after their handshakes:
    // only the receiver's hold puts the keys first.
    let (run_, out) = Run::start(
        lab,
        dir,
        out,
        receiver_args,
        &[
            "--mode",
            mode,
            "--flush-interval",
            "1ms",
            "--keylog",
            &keylog_arg,
            &port_filter,
        ],
    );
    for n in 0..requests {
        server.request(lab, &keylog, n);
    }
    let (stderr, summary, sensor) = run_.stop();
    Captured {
        out,
        keylog,
        stderr,
        summary,
        sensor,
    }
}

#[test]
fn one_pass_decrypts_every_request_in_both_tls_versions_and_modes() {
    require_root();
    let lab = Lab::new(1).unwrap();
    for (tls, mode) in [
        ("-tls1_3", "tc"),
        ("-tls1_2", "tc"),
        ("-tls1_3", "pcap"),
        ("-tls1_2", "pcap"),
    ] {
        let dir = Scratch::new("tls-keys").unwrap();
        let server = TlsServer::start(&lab, &dir, tls);
        let Captured {
            out,
            keylog,
            stderr,
            summary,
            sensor,
        } = capture_requests(&lab, &dir, &server, mode, "out.pcapng", &[], REQUESTS);
        let what = format!("{tls} --mode {mode}");
        assert_eq!(request_paths(&out, &[]), all_paths(), "{what}\n{stderr}");
        let lines = std::fs::read_to_string(&keylog).unwrap().lines().count() as u64;
        assert_eq!(sensor["tls_key_log"]["read"], lines, "{what}: {sensor:#}");
        assert_eq!(
            sensor["tls_key_log"]["delivered"], lines,
            "{what}: {sensor:#}"
        );
        assert_eq!(summary["tls_keys"]["written"], lines, "{what}: {summary:#}");
        assert_eq!(
            summary["tls_keys"]["without_packets"], 0,
            "{what}: {summary:#}"
        );
        assert!(
            stderr.contains(&format!("TLS keys: {lines} key log lines written")),
            "{stderr}"
        );
        assert_eq!(
            secrets_blocks(&out).1 as u64,
            lines,
            "{what}: each line once"
        );

        // Control: the same file without its secrets shows no request.
        let stripped = without_secrets(&out);
        assert_eq!(secrets_blocks(&stripped), (0, 0));
        assert!(request_paths(&stripped, &[]).is_empty(), "{what}");
    }
}

#[test]
fn drop_secrets_writes_none_and_pcap_says_it_cannot_hold_keys() {
    require_root();
    let lab = Lab::new(1).unwrap();
    for (out, receiver_args, said) in [
        (
            "out.pcapng",
            &["--drop-secrets"][..],
            "TLS keys: 0 key log lines written",
        ),
        ("out.pcap", &[][..], "classic pcap cannot hold keys"),
    ] {
        let dir = Scratch::new("tls-keys-none").unwrap();
        let server = TlsServer::start(&lab, &dir, "-tls1_3");
        let Captured {
            out,
            keylog,
            stderr,
            summary,
            ..
        } = capture_requests(&lab, &dir, &server, "tc", out, receiver_args, 3);
        assert_eq!(stderr.matches(said).count(), 1, "{stderr}");
        let lines = std::fs::read_to_string(&keylog).unwrap().lines().count() as u64;
        assert_eq!(summary["tls_keys"]["not_written"], lines, "{summary:#}");
        assert!(request_paths(&out, &[]).is_empty());
        // Yet the packets are there: the key log decrypts them.
        let with_keys = format!("tls.keylog_file:{}", keylog.display());
        assert_eq!(request_paths(&out, &["-o", &with_keys]).len(), 3);
        if out.extension().is_some_and(|e| e == "pcapng") {
            assert_eq!(secrets_blocks(&out), (0, 0));
        }
    }
}

#[test]
fn each_rotated_file_of_a_sensor_decrypts_its_own_requests_alone() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("tls-keys-rotate").unwrap();
    let server = TlsServer::start(&lab, &dir, "-tls1_3");
    let Captured {
        keylog,
        stderr,
        summary,
        ..
    } = capture_requests(
        &lab,
        &dir,
        &server,
        "tc",
        "{sensor}-%H%M%S.pcapng",
        &["--rotate-size", "64KiB", "--split-by", "sensor"],
        REQUESTS,
    );
    let files: Vec<PathBuf> = std::fs::read_dir(dir.join(""))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcapng"))
        .collect();
    let with_keys = format!("tls.keylog_file:{}", keylog.display());
    let mut alone_total = BTreeSet::new();
    let mut with_requests = 0;
    for file in &files {
        let alone = request_paths(file, &[]);
        let reference = request_paths(file, &["-o", &with_keys]);
        assert_eq!(alone, reference, "{}: {stderr}", file.display());
        with_requests += usize::from(!alone.is_empty());
        alone_total.extend(alone);
    }
    eprintln!(
        "{} files, {with_requests} with requests, {} requests decrypted alone",
        files.len(),
        alone_total.len()
    );
    assert!(
        with_requests >= 2,
        "{files:?}: rotation must split the requests"
    );
    // Only a session cut by a rotation cannot be read, in either file.
    assert!(
        alone_total.len() + files.len() > REQUESTS,
        "{alone_total:?} in {files:?}"
    );
    assert!(
        summary["tls_keys"]["carried"].as_u64().unwrap() > 0,
        "{summary:#}"
    );
}

#[test]
fn key_logs_followed_through_truncation_deletion_recreation_and_globs() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("tls-keys-follow").unwrap();
    let server = TlsServer::start(&lab, &dir, "-tls1_3");
    let logs = dir.join("logs");
    std::fs::create_dir(&logs).unwrap();
    let first = logs.join("a.log");
    let glob = format!("{}/*.log", logs.display());
    let (run_, out) = Run::start(
        &lab,
        &dir,
        "out.pcapng",
        &["--metrics", RECEIVER_METRICS],
        &[
            "--mode",
            "tc",
            "--metrics",
            SENSOR_METRICS,
            "--keylog",
            &glob,
            &format!("tcp port {PORT}"),
        ],
    );
    let settle = || std::thread::sleep(Duration::from_millis(300));
    for n in 0..5 {
        server.request(&lab, &first, n);
    }
    // Truncated once its lines were read (what a truncation removes unread is gone).
    settle();
    std::fs::write(&first, "").unwrap();
    settle();
    for n in 5..10 {
        server.request(&lab, &first, n);
    }
    std::fs::remove_file(&first).unwrap();
    settle();
    for n in 10..15 {
        server.request(&lab, &first, n);
    }
    let second = logs.join("b.log");
    for n in 15..REQUESTS {
        server.request(&lab, &second, n);
    }
    // Bad lines are counted and skipped.
    let mut appending = std::fs::OpenOptions::new()
        .append(true)
        .open(&second)
        .unwrap();
    appending
        .write_all(b"not a key log line\nCLIENT_RANDOM zz 00\n# a comment\n")
        .unwrap();
    // The metrics say it all once the receiver has written every line read.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (sensor_metrics, receiver_metrics) = loop {
        let sensor = scrape(Some(&lab.cap), SENSOR_METRICS).unwrap();
        let receiver = scrape(Some(&lab.cap), RECEIVER_METRICS).unwrap();
        let read = sum(&sensor, "capstream_sensor_tls_key_log_read_total", &[]);
        let written = sum(&receiver, "capstream_receiver_tls_keys_written_total", &[]);
        let malformed = sum(&sensor, "capstream_sensor_tls_key_log_malformed_total", &[]);
        if (read.is_some() && read == written && malformed == Some(2.0))
            || std::time::Instant::now() > deadline
        {
            break (sensor, receiver);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (stderr, summary, sensor) = run_.stop();
    assert_eq!(request_paths(&out, &[]), all_paths(), "{stderr}");
    assert_eq!(sensor["tls_key_log"]["malformed"], 2, "{sensor:#}");
    let read = sensor["tls_key_log"]["read"].as_u64().unwrap();
    assert_eq!(summary["tls_keys"]["written"], read, "{summary:#}");
    assert_eq!(
        sum(
            &sensor_metrics,
            "capstream_sensor_tls_key_log_malformed_total",
            &[]
        ),
        Some(2.0),
        "{sensor_metrics}"
    );
    assert_eq!(
        sum(
            &receiver_metrics,
            "capstream_receiver_tls_keys_written_total",
            &[]
        ),
        Some(read as f64),
        "{receiver_metrics}"
    );
}

const SENSOR_METRICS: &str = "127.0.0.1:9465";
const RECEIVER_METRICS: &str = "127.0.0.1:9464";

#[test]
fn a_pattern_matching_nothing_is_a_warning() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("tls-keys-warn").unwrap();
    let missing = format!("{}/later-*.log", dir.join("").display());
    let (run_, _) = Run::start(
        &lab,
        &dir,
        "out.pcapng",
        &[],
        &["--mode", "tc", "--keylog", &missing],
    );
    let stderr = run_.sensor.stderr();
    assert!(
        stderr.contains(&format!("--keylog {missing}: matches no file yet")),
        "{stderr}"
    );
    run_.stop();
    testbed::capstream::assert_refused(
        "sensor",
        &[
            "--read",
            "/dev/null",
            "--keylog",
            "/tmp/[unclosed",
            "--fingerprint",
            &"ab".repeat(32),
        ],
        "--keylog /tmp/[unclosed: not a valid glob",
    );
}

#[test]
fn a_key_log_of_100000_lines_costs_the_sensor_little_memory() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("tls-keys-memory").unwrap();
    let keylog = dir.join("big.log");
    std::fs::write(&keylog, "").unwrap();
    let keylog_arg = keylog.to_str().unwrap().to_string();
    let (run_, _) = Run::start(
        &lab,
        &dir,
        "out.pcapng",
        &[],
        &["--mode", "tc", "--keylog", &keylog_arg],
    );
    std::thread::sleep(Duration::from_millis(500));
    let pid = run_.sensor.pid();
    let before = testbed::capstream::peak_rss_kib(pid).unwrap();
    let mut lines = String::with_capacity(100_000 * 180);
    for i in 0..100_000u64 {
        lines += &format!("CLIENT_TRAFFIC_SECRET_0 {i:064x} {:096x}\n", i * 7);
    }
    std::fs::write(&keylog, lines).unwrap();
    // The follower reads it at once; what it cost shows in the peak.
    std::thread::sleep(Duration::from_secs(3));
    let after = testbed::capstream::peak_rss_kib(pid).unwrap();
    let (_, summary, sensor) = run_.stop();
    eprintln!("sensor peak RSS: {before} KiB before the key log, {after} KiB after");
    assert!(
        after.saturating_sub(before) <= 16 * 1024,
        "the sensor grew from {before} KiB to {after} KiB"
    );
    assert_eq!(sensor["tls_key_log"]["read"], 100_000, "{sensor:#}");
    assert_eq!(sensor["tls_key_log"]["delivered"], 100_000, "{sensor:#}");
    assert_eq!(summary["tls_keys"]["written"], 100_000, "{summary:#}");
    assert_eq!(
        summary["tls_keys"]["without_packets"], 100_000,
        "{summary:#}"
    );
}

#[test]
fn keys_survive_a_receiver_restart_and_are_written_once() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("tls-keys-restart").unwrap();
    let server = TlsServer::start(&lab, &dir, "-tls1_3");
    let keylog = dir.join("keys.log");
    let keylog_arg = keylog.to_str().unwrap().to_string();
    let port_filter = format!("tcp port {PORT}");
    let (mut run_, out) = Run::start(
        &lab,
        &dir,
        "out.pcapng",
        &[],
        &["--mode", "tc", "--keylog", &keylog_arg, &port_filter],
    );
    for n in 0..REQUESTS {
        if n == REQUESTS / 2 {
            // Down while the next requests are made: the sensor keeps their packets and
            // keys, and sends them to the receiver started again on the same file.
            run_.receiver.stop().unwrap();
        }
        server.request(&lab, &keylog, n);
    }
    run_.receiver = Receiver::writing(Some(&lab.cap), &dir, "out.pcapng", &[])
        .unwrap()
        .0;
    let (stderr, _, sensor) = run_.stop();
    let lines = std::fs::read_to_string(&keylog).unwrap().lines().count();
    assert_eq!(request_paths(&out, &[]), all_paths(), "{stderr}");
    assert_eq!(secrets_blocks(&out).1, lines, "each line once: {stderr}");
    assert_eq!(
        sensor["tls_key_log"]["delivered"], lines as u64,
        "{sensor:#}"
    );
}

#[test]
fn a_replayed_capture_and_its_key_log_make_a_file_that_decrypts_alone() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("tls-keys-read").unwrap();
    let server = TlsServer::start(&lab, &dir, "-tls1_2");
    let (keylog, capture) = (dir.join("keys.log"), dir.join("tls.pcap"));
    let port_filter = format!("tcp port {PORT}");
    let tcpdump = start_tcpdump(&lab.cap, "cap0", &port_filter, &[], &capture).unwrap();
    for n in 0..3 {
        server.request(&lab, &keylog, n);
    }
    let recorded = stop_reference(tcpdump, &capture);
    assert!(!recorded.is_empty());
    let (mut receiver, out) = Receiver::writing(None, &dir, "out.pcapng", &[]).unwrap();
    // Lines already in the key log are read too: the replay holds their handshakes.
    let mut sensor = start_sensor(
        None,
        &receiver,
        &[
            "--read",
            capture.to_str().unwrap(),
            "--keylog",
            keylog.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(sensor.wait(Duration::from_secs(30)).unwrap().success());
    receiver.stop().unwrap();
    let expected = secret_paths(0..3);
    assert_eq!(
        request_paths(&out, &[]),
        expected,
        "{}",
        receiver.proc.stderr()
    );
}
