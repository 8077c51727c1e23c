//! `sensor --read FILE` streams a capture file; the receiver writes a file or stdout.

use std::process::Stdio;
use std::time::Duration;

use testbed::capstream::{
    assert_refused, dev_filters, first_difference, start_sensor, tcpdump_records, tshark_count,
    Receiver, Record, Scratch,
};
use testbed::{corpus_dir, require_root, Netns};

/// What tcpdump itself prints for the corpus under `filter` (offline semantics).
fn reference(filter: &str) -> Vec<Record> {
    tcpdump_records(&corpus_dir().join("tcpdump-tests.pcap"), filter).unwrap()
}

#[test]
fn read_matches_tcpdump_offline_for_every_dev_filter_in_both_formats() {
    require_root();
    let ns = Netns::new("csread").unwrap();
    let corpus = corpus_dir()
        .join("tcpdump-tests.pcap")
        .to_string_lossy()
        .into_owned();
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
    let corpus = corpus_dir()
        .join("tcpdump-tests.pcap")
        .to_string_lossy()
        .into_owned();

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
