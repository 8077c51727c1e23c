//! `--metrics`: both programs' Prometheus endpoints, scraped over HTTP with curl during a
//! live replay of the corpus, agree with their exit summaries; a taken port is a one-line
//! usage error. The live status line shows on a terminal (a pseudo-terminal from
//! `script`), and never when stderr is a pipe.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbed::capstream::{
    receiver_sessions, sensor_figures, start_sensor, summary_figure, tshark_count, Receiver,
    Scratch,
};
use testbed::prometheus::{count, scrape, sum};
use testbed::{corpus, require_root, require_tool, workspace_bin, Lab, Netns};

/// Inside the test's namespaces; the host-loopback ones are in this suite's range.
const RECEIVER_METRICS: &str = "127.0.0.1:5500";
const SENSOR_METRICS: &str = "127.0.0.1:5501";
const TAKEN_PORT: &str = "127.0.0.1:5502";
const PPS: u32 = 8000;
/// What the status line erases a line with; never seen in a pipe.
const CLEAR: &str = "\r\x1b[2K";

/// Scrapes until `ready` holds for the figures it picks, twice in a row over more than the
/// programs' one-second publishing period; returns the last scrape.
fn settled(
    what: &str,
    mut scrape_once: impl FnMut() -> String,
    figures: impl Fn(&str) -> Vec<u64>,
    ready: impl Fn(&[u64]) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut previous: Option<Vec<u64>> = None;
    loop {
        let text = scrape_once();
        let now = figures(&text);
        if ready(&now) && previous.as_ref() == Some(&now) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the figures never settled; last scrape:\n{text}"
        );
        previous = Some(now);
        std::thread::sleep(Duration::from_millis(1500));
    }
}

#[test]
fn scraped_figures_match_the_exit_summaries() {
    require_root();
    require_tool("curl", "curl");
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("metrics").unwrap();
    let (mut receiver, out) = Receiver::writing(
        Some(&lab.cap),
        &dir,
        "capture.pcap",
        &["--metrics", RECEIVER_METRICS],
    )
    .unwrap();
    let mut sensor = start_sensor(
        Some(&lab.cap),
        &receiver,
        &[
            "--iface",
            iface,
            "--mode",
            "pcap",
            "--sensor-id",
            "metrics-test",
            "--metrics",
            SENSOR_METRICS,
        ],
    )
    .unwrap();
    lab.replay(0, &corpus::pcap(), PPS).unwrap();

    // The sensor, once all it matched is delivered and nothing moves any more.
    let on_iface = [("interface", iface)];
    let scraped = settled(
        "sensor",
        || scrape(Some(&lab.cap), SENSOR_METRICS).unwrap(),
        |t| {
            vec![
                count(t, "capstream_sensor_packets_matched_total", &on_iface),
                count(t, "capstream_sensor_packets_delivered_total", &on_iface),
            ]
        },
        |f| f[0] > 0 && f[0] == f[1],
    );
    assert_eq!(
        count(&scraped, "capstream_sensor_connected", &[]),
        1,
        "{scraped}"
    );
    assert!(
        sum(&scraped, "capstream_sensor_rtt_seconds", &[]).is_some_and(|rtt| rtt > 0.0),
        "a connected sensor has a QUIC round-trip time:\n{scraped}"
    );
    sensor.stop().unwrap();
    let sensor_summary = sensor.summary().unwrap();
    let summary = sensor_figures(&sensor_summary, iface).unwrap();
    let figure = |name: &str| count(&scraped, name, &on_iface);
    assert_eq!(
        figure("capstream_sensor_packets_seen_total"),
        summary.seen,
        "{}",
        summary.line
    );
    assert_eq!(
        figure("capstream_sensor_packets_matched_total"),
        summary.matched
    );
    assert_eq!(
        figure("capstream_sensor_packets_delivered_total"),
        summary.delivered
    );
    assert_eq!(figure("capstream_sensor_drops_total"), summary.dropped);
    for reason in ["kernel_buffer", "interface", "sensor_buffer"] {
        let labels = [("interface", iface), ("reason", reason)];
        assert_eq!(
            sum(&scraped, "capstream_sensor_drops_total", &labels).map(|v| v as u64),
            Some(summary.reason(reason)),
            "drops for {reason}: {}",
            summary.line
        );
    }
    for (name, value) in [
        ("capstream_sensor_batches_total", summary.batches),
        ("capstream_sensor_raw_bytes_total", summary.raw_bytes),
        ("capstream_sensor_wire_bytes_total", summary.wire_bytes),
    ] {
        assert_eq!(figure(name), value, "{name}: {}", summary.line);
    }
    assert_eq!(
        count(&scraped, "capstream_sensor_reconnects_total", &[]),
        summary_figure(&sensor_summary, "/reconnects").unwrap(),
        "{sensor_summary:#}"
    );

    // The receiver publishes a closed session's final figures once more before they linger.
    let of_sensor = [("sensor", "metrics-test")];
    let delivered = summary.delivered;
    let scraped = settled(
        "receiver",
        || scrape(Some(&lab.cap), RECEIVER_METRICS).unwrap(),
        |t| {
            vec![
                count(t, "capstream_receiver_packets_written_total", &of_sensor),
                count(t, "capstream_receiver_sensor_matched_total", &of_sensor),
                count(t, "capstream_receiver_sensors_connected", &[]),
            ]
        },
        |f| f[0] == delivered && f[1] == summary.matched && f[2] == 0,
    );
    receiver.stop().unwrap();
    let sessions = receiver_sessions(&receiver.proc.summary().unwrap());
    assert_eq!(sessions.len(), 1, "{}", receiver.proc.stderr());
    let session = &sessions[0];
    let written = count(
        &scraped,
        "capstream_receiver_packets_written_total",
        &of_sensor,
    );
    assert_eq!(written, session.packets, "{}", session.line);
    assert_eq!(written as usize, tshark_count(&out).unwrap());
    let figure = |name: &str| count(&scraped, name, &of_sensor);
    assert_eq!(
        figure("capstream_receiver_bytes_written_total"),
        session.bytes
    );
    assert_eq!(figure("capstream_receiver_batches_total"), session.batches);
    assert_eq!(
        figure("capstream_receiver_sensor_drops_total"),
        summary.dropped
    );
    // The compression the summary shows is the scrape's: the same bytes either side.
    assert_eq!(
        (
            figure("capstream_receiver_raw_bytes_total"),
            figure("capstream_receiver_wire_bytes_total")
        ),
        (session.raw_bytes, session.wire_bytes),
        "{}",
        session.line
    );

    // The logs went to pipes: no status line in them.
    for log in [receiver.proc.stderr(), sensor.stderr()] {
        assert!(
            !log.contains(CLEAR) && !log.contains("pkt/s"),
            "a status line leaked into a pipe:\n{log:?}"
        );
    }
}

#[test]
fn a_taken_metrics_port_is_a_usage_error() {
    let dir = Scratch::new("metrics-port").unwrap();
    let _taken = std::net::TcpListener::bind(TAKEN_PORT).unwrap();
    let out = dir.join("out.pcap");
    let state = dir.join("state");
    let receiver = Command::new(workspace_bin("receiver"))
        .args(["--listen", "127.0.0.1:5503", "--metrics", TAKEN_PORT])
        .arg("--state-dir")
        .arg(&state)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let corpus = corpus::pcap();
    let sensor = Command::new(workspace_bin("sensor"))
        .args(["--receiver", "127.0.0.1:5503", "--metrics", TAKEN_PORT])
        .args(["--fingerprint", &"00".repeat(32)])
        .arg("--read")
        .arg(&corpus)
        .output()
        .unwrap();
    for (program, run) in [("receiver", receiver), ("sensor", sensor)] {
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{program}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains(" INFO ")).collect();
        assert_eq!(lines.len(), 1, "{program}: {stderr}");
        assert!(
            lines[0].starts_with(&format!(
                "{program}: error: cannot serve metrics on {TAKEN_PORT}"
            )),
            "{program}: {stderr}"
        );
    }
    assert!(!out.exists(), "a refused start leaves no output behind");
}

/// Runs `argv` inside `ns` under `script`, which gives it a pseudo-terminal for stdin,
/// stdout and stderr; returns what it wrote there, once it exited successfully.
fn on_a_terminal(ns: &Netns, argv: &[String]) -> String {
    let mut command = ns.command(&argv[0]);
    command.extend_from_slice(&argv[1..]);
    let out = Command::new("script")
        .args(["-qfec", &command.join(" "), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} on a terminal: {}:\n{text:?}",
        argv[0],
        out.status
    );
    text
}

/// The status line is erased right before `at` in what a terminal was sent.
fn cleared_before(shown: &str, at: &str) -> bool {
    shown
        .find(at)
        .is_some_and(|i| shown[..i].ends_with(CLEAR) || shown[..i].ends_with('\n'))
}

#[test]
fn the_status_line_shows_on_a_terminal_only() {
    require_root();
    require_tool("script", "bsdutils");
    let ns = Netns::new("csstatus").unwrap();
    let dir = Scratch::new("status").unwrap();
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let state = dir.join("state");
    let cert = state.join("receiver.crt");
    // The receiver on a terminal, stopped (SIGTERM) by `timeout` once the sensors are done.
    let receiver_argv: Vec<String> = vec![
        "timeout".into(),
        "--preserve-status".into(),
        "-s".into(),
        "TERM".into(),
        "10".into(),
        path(&workspace_bin("receiver")),
        "--listen".into(),
        "127.0.0.1:4433".into(),
        "--state-dir".into(),
        path(&state),
        "--out".into(),
        path(&dir.join("out.pcap")),
    ];
    let sensor_argv = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            path(&workspace_bin("sensor")),
            "--receiver".into(),
            "127.0.0.1:4433".into(),
            "--ca".into(),
            path(&cert),
            "--token-file".into(),
            path(&state.join("token")),
            "--read".into(),
            path(&corpus::pcap()),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let (receiver, sensor, quiet) = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| on_a_terminal(&ns, &receiver_argv));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cert.exists() {
            assert!(
                Instant::now() < deadline,
                "the receiver made no certificate"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Past its certificate, the receiver binds at once.
        std::thread::sleep(Duration::from_millis(500));
        let sensor = on_a_terminal(&ns, &sensor_argv(&[]));
        let quiet = on_a_terminal(&ns, &sensor_argv(&["--no-status"]));
        (receiver.join().unwrap(), sensor, quiet)
    });

    assert!(
        sensor.contains(&format!("{CLEAR}sensor: ")) && sensor.contains("pkt/s matched"),
        "no status line from the sensor on a terminal:\n{sensor:?}"
    );
    assert!(
        cleared_before(&sensor, "summary: session"),
        "the status line is erased before the summary:\n{sensor:?}"
    );
    assert!(
        !quiet.contains(CLEAR) && !quiet.contains("pkt/s"),
        "--no-status shows no status line:\n{quiet:?}"
    );

    assert!(
        receiver.contains(&format!("{CLEAR}receiver: "))
            && receiver.contains("sensor(s) connected"),
        "no status line from the receiver on a terminal:\n{receiver:?}"
    );
    // A log line while the status shows: erased first, so the log line stands alone.
    let line = receiver
        .split('\n')
        .find(|l| l.contains("left cleanly"))
        .unwrap_or_else(|| panic!("no log line of a sensor leaving:\n{receiver:?}"));
    let drawn = line.rsplit(CLEAR).next().unwrap_or(line);
    assert!(
        drawn.contains("left cleanly") && !drawn.contains("sensor(s) connected"),
        "a log line ran into the status line: {line:?}"
    );
    assert!(
        cleared_before(&receiver, "receiver: 2 sensor session(s)"),
        "the status line is erased before the summary:\n{receiver:?}"
    );
}

/// Idle clients cannot take the receiver's file descriptors through `--metrics`: with
/// 1,100 idle TCP connections to it, under the usual soft limit of 1,024 descriptors, the
/// receiver still creates its next rotated files (the whole corpus is written) and still
/// answers a scrape.
#[test]
fn idle_metrics_clients_do_not_stop_rotation_or_scrapes() {
    require_tool("curl", "curl");
    require_tool("prlimit", "util-linux");
    const METRICS: &str = "127.0.0.1:5505";
    let dir = Scratch::new("metrics-idle").unwrap();
    let out = dir.join("rotated.pcap");
    let out_arg = out.to_string_lossy().into_owned();
    let mut receiver = Receiver::start_through(
        None,
        &["prlimit", "--nofile=1024:20000"],
        &dir.join("state"),
        5504,
        &[
            "--out",
            &out_arg,
            "--rotate-size",
            "64KiB",
            "--metrics",
            METRICS,
        ],
    )
    .unwrap();
    let idle: Vec<std::net::TcpStream> = (0..1100)
        .filter_map(|_| std::net::TcpStream::connect(METRICS).ok())
        .collect();
    assert!(idle.len() >= 1000, "only {} connections opened", idle.len());

    let corpus = corpus::pcap();
    let token = receiver.token.clone().expect("the receiver's token");
    let sensor = Command::new("timeout")
        .arg("60")
        .arg(workspace_bin("sensor"))
        .args(["--receiver", "127.0.0.1:5504", "--fingerprint"])
        .arg(&receiver.fingerprint)
        .arg("--token-file")
        .arg(&token)
        .arg("--read")
        .arg(&corpus)
        .output()
        .unwrap();
    let sensor_log = String::from_utf8_lossy(&sensor.stderr);
    assert!(sensor.status.success(), "{sensor_log}");
    // A scrape is answered while the idle connections stay open (a few tries: the first
    // clients hold their places for the request deadline).
    let scraped = Command::new("curl")
        .args([
            "-sf",
            "--max-time",
            "3",
            "--retry",
            "10",
            "--retry-all-errors",
        ])
        .args(["--retry-delay", "1", &format!("http://{METRICS}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&scraped.stdout);
    assert!(
        scraped.status.success() && text.contains("capstream_receiver_sessions"),
        "{text}"
    );
    drop(idle);
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    let sessions = receiver_sessions(&receiver.proc.summary().unwrap());
    assert_eq!(sessions.len(), 1, "{log}");
    let all = testbed::capstream::tcpdump_records(&corpus, "").unwrap();
    assert_eq!(sessions[0].packets as usize, all.len(), "{log}");
    let files = std::fs::read_dir(&dir.path)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("rotated")
        })
        .count();
    assert!(files >= 2, "{files} file(s): no rotation\n{log}");
    assert!(!log.contains("Too many open files"), "{log}");
}
