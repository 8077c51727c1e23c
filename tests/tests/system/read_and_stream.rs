//! `sensor --read FILE` streams a capture file; the receiver writes a file or stdout.

use std::process::Stdio;
use std::time::Duration;

use testbed::capstream::{
    assert_refused, dev_filters, first_difference, number_after, start_sensor, summary_figure,
    tcpdump_records, tshark_count, Receiver, Record, Scratch,
};
use testbed::{corpus, require_root, Netns};

/// What tcpdump itself prints for the corpus under `filter` (offline semantics).
fn reference(filter: &str) -> Vec<Record> {
    tcpdump_records(&corpus::pcap(), filter).unwrap()
}

#[test]
fn read_matches_tcpdump_offline_for_every_dev_filter_in_both_formats() {
    require_root();
    let ns = Netns::new("csread").unwrap();
    let corpus = corpus::pcap().to_string_lossy().into_owned();
    for (i, filter) in dev_filters().unwrap().iter().enumerate() {
        let format = if i % 2 == 0 { "pcap" } else { "pcapng" };
        let dir = Scratch::new("read").unwrap();
        let out = dir.join(&format!("out.{format}"));
        let out_arg = out.to_string_lossy().into_owned();
        let mut receiver =
            Receiver::start(Some(&ns), &dir.join("state"), 4433, &["--out", &out_arg]).unwrap();
        let mut args = vec!["--read", corpus.as_str()];
        if !filter.is_empty() {
            args.extend(["--bpf", filter.as_str()]);
        }
        let mut sensor = start_sensor(Some(&ns), &receiver, &args).unwrap();
        let status = sensor.wait(Duration::from_secs(60)).unwrap();
        assert!(
            status.success(),
            "sensor --read failed: {}",
            sensor.stderr()
        );
        receiver.stop().unwrap();
        let expected = reference(filter);
        let got = tcpdump_records(&out, "").unwrap();
        assert!(
            got == expected,
            "filter {filter:?} ({format}): {}",
            first_difference(&expected, &got)
        );
        assert_eq!(
            tshark_count(&out).unwrap(),
            expected.len(),
            "tshark reads the {format} file"
        );
    }
}

#[test]
fn fingerprint_pins_the_receiver_and_stdout_streams_to_tcpdump() {
    require_root();
    let ns = Netns::new("csstdout").unwrap();
    let dir = Scratch::new("stdout").unwrap();
    let out = std::fs::File::create(dir.join("stdout.pcap")).unwrap();
    let mut receiver = Receiver::start_with_stdout(
        Some(&ns),
        &dir.join("state"),
        4433,
        &["--out", "-"],
        Stdio::from(out),
    )
    .unwrap();
    let corpus = corpus::pcap().to_string_lossy().into_owned();

    // A wrong fingerprint is refused before any packet is sent.
    let wrong = "00".repeat(32);
    let sensor = testbed::workspace_bin("sensor")
        .to_string_lossy()
        .into_owned();
    let refused = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            &sensor,
            "--read",
            &corpus,
            "--receiver",
            &receiver.addr,
            "--fingerprint",
            &wrong,
        ])
        .output()
        .unwrap();
    assert_eq!(
        refused.status.code(),
        Some(1),
        "wrong fingerprint must fail"
    );
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(
        msg.trim().lines().filter(|l| l.contains("error")).count(),
        1,
        "one-line error, got: {msg}"
    );

    // The right one streams everything.
    let mut ok = testbed::Proc::start(
        "sensor",
        &ns.command(&sensor)
            .into_iter()
            .chain(
                [
                    "--read",
                    &corpus,
                    "--bpf",
                    "udp",
                    "--receiver",
                    &receiver.addr,
                    "--fingerprint",
                    &receiver.fingerprint,
                ]
                .map(String::from),
            )
            .chain(receiver.credentials(&[], None).unwrap())
            .collect::<Vec<_>>(),
        Stdio::null(),
    )
    .unwrap();
    assert!(
        ok.wait(Duration::from_secs(60)).unwrap().success(),
        "{}",
        ok.stderr()
    );
    receiver.stop().unwrap();
    let got = tcpdump_records(&dir.join("stdout.pcap"), "").unwrap();
    let expected = reference("udp");
    assert!(
        got == expected,
        "stdout output differs from tcpdump -r udp: {}",
        first_difference(&expected, &got)
    );
    assert_eq!(
        got,
        reference("udp"),
        "stdout output equals tcpdump -r with the same filter"
    );
}

#[test]
fn bad_input_gives_one_line_errors_and_exit_code_2() {
    require_root();
    let dir = Scratch::new("badinput").unwrap();
    let bad_ca = dir.join("ca.pem");
    std::fs::write(&bad_ca, "not a certificate").unwrap();
    let bad_ca = bad_ca.to_string_lossy().into_owned();
    let fp = "ab".repeat(32);
    let to = ["--receiver", "127.0.0.1:4433", "--fingerprint", fp.as_str()];
    let sensor = |args: &[&str], needle: &str| {
        assert_refused("sensor", &[args, &to[..]].concat(), needle);
    };
    sensor(&["--iface", "lo", "--bpf", "port 99999"], "99999");
    sensor(&["--iface", "lo", "--bpf", "tcp and and"], "syntax error");
    sensor(&["--iface", "nosuchif0"], "nosuchif0");
    sensor(&["--read", "/nonexistent.pcap"], "nonexistent");
    sensor(&["--iface", "lo", "--snaplen", "0"], "snaplen");
    sensor(&["--iface", "lo", "--batch-size", "lots"], "lots");
    sensor(&["--iface", "lo", "--read", "/x.pcap"], "--read");
    sensor(
        &["--iface", "nosuchif0", "--mode", "xdp"],
        "unknown interface nosuchif0",
    );
    sensor(&["--iface", "any", "--mode", "ebpf"], "--mode pcap");
    sensor(
        &["--iface", "lo", "--mode", "tc", "--bpf", "tcp and and"],
        "syntax error",
    );
    sensor(&["--iface", "lo", "--ring-size", "3MiB"], "power of two");
    sensor(
        &["--iface", "lo", "--mode", "xdp", "--xdp-attach", "later"],
        "later",
    );
    sensor(&["--iface", "lo", "--buffer", "1KiB"], "buffer size");
    sensor(&["--iface", "lo", "--give-up-after", "soon"], "soon");
    sensor(
        &["--iface", "lo", "--spool-dir", "/etc/hostname/spool"],
        "/etc/hostname/spool",
    );
    // Wrong trust or address: each case gives its own.
    let on_lo = |rest: &[&str], needle: &str| {
        assert_refused("sensor", &[&["--iface", "lo"][..], rest].concat(), needle);
    };
    on_lo(&["--receiver", "127.0.0.1:4433"], "--ca");
    on_lo(&["--receiver", "nowhere", "--fingerprint", &fp], "nowhere");
    on_lo(
        &["--receiver", "127.0.0.1:4433", "--fingerprint", "xyz"],
        "xyz",
    );
    on_lo(&["--receiver", "127.0.0.1:4433", "--ca", &bad_ca], "ca.pem");
    assert_refused("receiver", &["--format", "pcapx"], "pcapx");
    assert_refused("receiver", &["--reorder-window", "soon"], "soon");
    assert_refused(
        "receiver",
        &["--listen", "not-an-address"],
        "not-an-address",
    );
    assert_refused("receiver", &["--cert", &bad_ca, "--key", &bad_ca], "ca.pem");
    let state = dir.join("state").to_string_lossy().into_owned();
    assert_refused(
        "receiver",
        &[
            "--state-dir",
            &state,
            "--listen",
            "127.0.0.1:0",
            "--out",
            "/nonexistent/dir/x.pcap",
        ],
        "/nonexistent/dir/x.pcap",
    );
}

/// Both programs' `--summary-json` (which the other tests read) says what their exit
/// summary's prose says, key by key, on a real run: a sensor reading the corpus, a
/// receiver writing a file beside a live stream nobody reads.
#[test]
fn the_json_summaries_say_what_the_prose_summaries_say() {
    require_root();
    let ns = Netns::new("cssummary").unwrap();
    let dir = Scratch::new("summary").unwrap();
    let out = dir.join("out.pcapng").to_string_lossy().into_owned();
    let args = ["--out", out.as_str(), "--serve-pcap", "127.0.0.1:57012"];
    let mut receiver = Receiver::start(Some(&ns), &dir.join("state"), 4433, &args).unwrap();
    let corpus = corpus::pcap();
    let corpus = corpus.to_string_lossy();
    let mut sensor = start_sensor(
        Some(&ns),
        &receiver,
        &["--read", &corpus, "--sensor-id", "json-1"],
    )
    .unwrap();
    let status = sensor.wait(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{}", sensor.stderr());
    receiver.stop().unwrap();

    // The sensor: the session line, then one line per interface.
    let (log, json) = (sensor.stderr(), sensor.summary().unwrap());
    let session = log
        .lines()
        .find(|l| l.starts_with("summary: session "))
        .unwrap_or_else(|| panic!("no session line:\n{log}"));
    let tag = json["session"].as_str().unwrap();
    assert!(
        session.starts_with(&format!("summary: session {tag}: ")),
        "{session} / {tag}"
    );
    for (label, pointer) in [
        (&*format!("{tag}: "), "/batches/sent"),
        ("batches sent, ", "/batches/acknowledged"),
        ("by the receiver, ", "/batches/resent"),
        ("sent again after ", "/reconnects"),
    ] {
        assert_eq!(
            number_after(session, label).unwrap(),
            figure(&json, pointer),
            "{label}: {session}"
        );
    }
    let interfaces = json["interfaces"].as_array().unwrap();
    assert_eq!(interfaces.len(), 1, "{json:#}");
    for interface in interfaces {
        let name = interface["name"].as_str().unwrap();
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("  {name}: seen ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{log}"));
        for (label, key) in [
            ": seen ",
            ", matched ",
            ", delivered ",
            ", dropped ",
            ", unacknowledged ",
            ", batches ",
            ", raw bytes ",
            ", wire bytes ",
        ]
        .map(|l| (l, l.trim_matches([':', ',', ' ']).replace(' ', "_")))
        {
            assert_eq!(
                number_after(line, label).unwrap(),
                figure(interface, &format!("/{key}")),
                "{line}"
            );
        }
        for (prose, key) in [
            ("kernel buffer full: ", "kernel_buffer"),
            ("interface/driver: ", "interface"),
            ("sensor buffer full: ", "sensor_buffer"),
            ("spool damaged: ", "spool_damaged"),
        ] {
            assert_eq!(
                number_after(line, prose).unwrap(),
                figure(interface, &format!("/drops/{key}")),
                "{line}"
            );
        }
        assert_eq!(
            interface["drops"].as_object().unwrap().len(),
            4,
            "{interface}"
        );
    }
    assert_eq!(
        figure(&interfaces[0], "/delivered"),
        corpus::PACKETS as u64,
        "{json:#}"
    );

    // The receiver: one line per session, then the live stream's.
    let (log, json) = (receiver.proc.stderr(), receiver.proc.summary().unwrap());
    let sessions = json["sessions"].as_array().unwrap();
    assert!(
        log.contains(&format!("receiver: {} sensor session(s)", sessions.len())),
        "{log}"
    );
    assert_eq!(sessions.len(), 1, "{json:#}");
    for s in sessions {
        let label = s["label"].as_str().unwrap();
        assert!(label.starts_with("sensor json-1 ("), "{label}");
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("  {label}: ")))
            .unwrap_or_else(|| panic!("no line for {label}:\n{log}"));
        let rest = &line[label.len() + 2..];
        assert_eq!(
            number_after(line, &format!("{label}: ")).unwrap(),
            figure(s, "/written/packets"),
            "{line}"
        );
        assert_eq!(
            number_after(rest, "packets, ").unwrap(),
            figure(s, "/written/bytes"),
            "{line}"
        );
        assert_eq!(
            number_after(rest, "bytes, ").unwrap(),
            figure(s, "/received/batches"),
            "{line}"
        );
        let ratio =
            figure(s, "/received/raw_bytes") as f64 / figure(s, "/received/wire_bytes") as f64;
        assert!(
            line.contains(&format!("compression {ratio:.2}x")),
            "{ratio:.2}: {line}"
        );
        // Said only when not zero (reconnects and duplicates together).
        let reconnects_or_duplicates =
            figure(s, "/received/reconnects") + figure(s, "/received/duplicates") > 0;
        for (phrase, pointer, shown) in [
            (
                " reconnect(s)",
                "/received/reconnects",
                reconnects_or_duplicates,
            ),
            (
                " duplicate batch(es) ignored",
                "/received/duplicates",
                reconnects_or_duplicates,
            ),
            (" forced out before", "/written/forced", false),
            (
                " sent again after a receiver restart",
                "/written/resumed",
                false,
            ),
            (" stamped over a day past", "/written/ahead", false),
            (" written late", "/written/late", false),
        ] {
            let n = figure(s, pointer);
            if n > 0 || shown {
                assert!(rest.contains(&format!(" {n}{phrase}")), "{phrase}: {line}");
            } else {
                assert!(!rest.contains(phrase), "{phrase}: {line}");
            }
        }
        let stats = s["sensor_stats"]["interfaces"].as_array().unwrap();
        let total = |key: &str| -> u64 { stats.iter().map(|i| figure(i, key)).sum() };
        let dropped: u64 = stats
            .iter()
            .flat_map(|i| i["drops"].as_object().unwrap().values())
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(
            number_after(line, "dropped by the sensor ").unwrap(),
            dropped,
            "{line}"
        );
        assert_eq!(
            number_after(line, "matched by the sensor ").unwrap(),
            total("/matched"),
            "{line}"
        );
    }
    let live = &json["live_stream"];
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("receiver: live stream "))
        .unwrap_or_else(|| panic!("no live stream line:\n{log}"));
    assert!(
        line.starts_with(&format!("{}: ", live["address"].as_str().unwrap())),
        "{line}"
    );
    for (label, key) in [
        (": ", "clients"),
        ("client(s), ", "sent"),
        ("packets sent, ", "dropped"),
        ("too slowly, ", "no_client"),
    ] {
        assert_eq!(
            number_after(line, label).unwrap(),
            figure(live, &format!("/{key}")),
            "{line}"
        );
    }
    assert_eq!(figure(live, "/no_client"), corpus::PACKETS as u64, "{live}");
    assert_eq!(figure(live, "/other_link_type"), 0, "{live}");
    assert!(!line.contains("another link type"), "{line}");
    assert!(json["upload"].is_null(), "{json:#}");
}

/// A number in a JSON summary, by pointer.
fn figure(json: &serde_json::Value, pointer: &str) -> u64 {
    summary_figure(json, pointer).unwrap()
}
