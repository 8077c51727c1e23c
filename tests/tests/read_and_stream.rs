//! `sensor --read FILE` streams a capture file; the receiver writes a file or stdout.

use std::process::Stdio;
use std::time::Duration;

use testbed::capstream::{
    dev_filters, start_sensor, tcpdump_dump, tshark_count, Receiver, Scratch,
};
use testbed::{corpus_dir, require_root, Netns};

/// What tcpdump itself prints for the corpus under `filter` (offline semantics).
fn reference(filter: &str) -> Vec<String> {
    tcpdump_dump(&corpus_dir().join("tcpdump-tests.pcap"), filter).unwrap()
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
        let got = tcpdump_dump(&out, "").unwrap();
        assert_eq!(
            got.len(),
            expected.len(),
            "filter {filter:?} ({format}): packet count"
        );
        assert!(
            got == expected,
            "filter {filter:?} ({format}): packets differ from tcpdump -r"
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
    let got = tcpdump_dump(&dir.join("stdout.pcap"), "").unwrap();
    assert_eq!(
        got,
        reference("udp"),
        "stdout output equals tcpdump -r with the same filter"
    );
}

#[test]
fn bad_input_gives_one_line_errors_and_exit_code_2() {
    require_root();
    let sensor = testbed::workspace_bin("sensor")
        .to_string_lossy()
        .into_owned();
    let receiver = testbed::workspace_bin("receiver")
        .to_string_lossy()
        .into_owned();
    let dir = Scratch::new("badinput").unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let ca = ca.to_string_lossy().into_owned();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            &sensor,
            vec![
                "--iface",
                "lo",
                "--bpf",
                "port 99999",
                "--receiver",
                "127.0.0.1:4433",
                "--ca",
                &ca,
            ],
            "99999",
        ),
        (
            &sensor,
            vec![
                "--iface",
                "lo",
                "--bpf",
                "tcp and and",
                "--receiver",
                "127.0.0.1:4433",
                "--ca",
                &ca,
            ],
            "syntax error",
        ),
        (
            &sensor,
            vec![
                "--iface",
                "nosuchif0",
                "--receiver",
                "127.0.0.1:4433",
                "--ca",
                &ca,
            ],
            "nosuchif0",
        ),
        (
            &sensor,
            vec!["--iface", "lo", "--receiver", "127.0.0.1:4433"],
            "--ca",
        ),
        (
            &sensor,
            vec!["--iface", "lo", "--receiver", "nowhere", "--ca", &ca],
            "nowhere",
        ),
        (
            &sensor,
            vec![
                "--read",
                "/nonexistent.pcap",
                "--receiver",
                "127.0.0.1:4433",
                "--ca",
                &ca,
            ],
            "nonexistent",
        ),
        (
            &sensor,
            vec![
                "--iface",
                "lo",
                "--snaplen",
                "0",
                "--receiver",
                "127.0.0.1:4433",
                "--ca",
                &ca,
            ],
            "snaplen",
        ),
        (&receiver, vec!["--format", "pcapx"], "pcapx"),
        (&receiver, vec!["--reorder-window", "soon"], "soon"),
        (
            &receiver,
            vec!["--listen", "not-an-address"],
            "not-an-address",
        ),
    ];
    for (bin, args, needle) in cases {
        // `timeout` turns a program that wrongly starts running into a failure, not a hang.
        let out = std::process::Command::new("timeout")
            .arg("20")
            .arg(bin)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: exit code; stderr: {stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{args:?}: error should mention {needle:?}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "{args:?} panicked: {stderr}"
        );
    }
}
