//! The live stream as its readers take it: over TLS with the viewer token (socat, then
//! tshark), refused without it; in microsecond pcap by default, under Arkime's rules for a
//! PCAP-over-IP stream, on a live capture in a namespace; and pushed to a reader that
//! listens (socat, then tcpdump), again after it restarts. Everything else runs on the
//! host's loopback, on ports 5440-5449.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use testbed::capstream::{
    assert_refused, compare_captures, first_difference, start_sensor, start_tcpdump,
    stop_reference, summary_figure, tcpdump_records, tshark_count, Receiver, Record, Scratch,
};
use testbed::pcap_over_ip::arkime_records;
use testbed::{corpus, require_root, require_tool, run, Lab, Proc};

fn arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// What tcpdump reads from the corpus.
fn reference() -> Vec<Record> {
    tcpdump_records(&corpus::pcap(), "").unwrap()
}

/// Streams the corpus through a sensor into `receiver`, to the end.
fn replay(receiver: &Receiver) {
    let mut sensor = start_sensor(None, receiver, &["--read", &corpus::pcap_arg()]).unwrap();
    let status = sensor.wait(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "sensor failed: {}", sensor.stderr());
}

/// `script` run by sh, as a user types a pipeline; each command in it is bounded by
/// `timeout`, so that nothing outlives a failed test.
fn pipeline(name: &str, script: &str) -> Proc {
    let argv = ["sh", "-c", script].map(String::from);
    Proc::start(name, &argv, Stdio::null()).unwrap()
}

/// Waits until the receiver's log holds `needle` `n` times.
fn wait_for_count(receiver: &Receiver, needle: &str, n: usize) {
    let found = testbed::wait_until(Duration::from_secs(30), || {
        receiver.proc.stderr().matches(needle).count() >= n
    });
    assert!(found, "no {n}x {needle:?}:\n{}", receiver.proc.stderr());
}

/// What a refused client is told instead of the pcap header.
const REFUSAL: &str =
    "capstream live stream: refused: send the viewer token (its file) as the first line\n";

#[test]
fn the_tls_stream_needs_the_viewer_token_and_then_holds_what_the_file_holds() {
    require_tool("socat", "socat");
    let dir = Scratch::new("live-tls").unwrap();
    let (out, state) = (dir.join("capture.pcap"), dir.join("state"));
    let args = [
        "--out",
        &arg(&out),
        "--serve-pcap",
        "127.0.0.1:5441",
        "--serve-pcap-tls",
    ];
    let mut receiver = Receiver::start(None, &state, 5440, &args).unwrap();
    let (cert, viewer_token) = (arg(&state.join("receiver.crt")), state.join("viewer-token"));
    let token = std::fs::read_to_string(&viewer_token).unwrap();
    assert!(
        token.len() == 65 && token.ends_with('\n'),
        "64 hex digits and a newline: {token:?}"
    );
    // The log says where the token is and how to send it.
    for needle in ["created the viewer token", "-,ignoreeof <"] {
        receiver
            .proc
            .wait_for(needle, Duration::from_secs(5))
            .unwrap();
    }
    // The token from its file: `ignoreeof` keeps socat reading on once it is sent; without
    // it, socat shuts its sending side at the file's end and waits up to -t for the answer.
    let socat = |options: &str, stdio: &str, stdin: &str| {
        format!(
            "timeout 120 socat {options} OPENSSL:127.0.0.1:5441,cafile={cert} {stdio} < {stdin}"
        )
    };

    // Refused: no token, a wrong one, the sensors' token. Each client reads one line instead
    // of a pcap stream, and tshark reads nothing.
    let wrong = dir.join("wrong-token");
    std::fs::write(&wrong, format!("{}\n", "5a".repeat(32))).unwrap();
    // Each sends its file and shuts its sending side, but the last sends nothing at all and
    // keeps the connection open: it is refused once the 10 s for the token have passed.
    let refusals = [
        ("no token", "-", "/dev/null".to_string()),
        ("a wrong token", "-", arg(&wrong)),
        ("the sensors' token", "-", arg(&state.join("token"))),
        ("nothing sent", "-,ignoreeof", "/dev/null".to_string()),
    ];
    for (what, stdio, stdin) in &refusals {
        let told = dir.join("told");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{} | tee {} | timeout 60 tshark -r - -T fields -e frame.number",
                socat("-t 30", stdio, stdin),
                arg(&told)
            ))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() && stdout.trim().is_empty(),
            "{what}: tshark must read nothing ({}): {stdout}",
            out.status
        );
        assert_eq!(std::fs::read_to_string(&told).unwrap(), REFUSAL, "{what}");
    }

    // With the token: every packet of the file, as tshark reads it through socat.
    let live = dir.join("live.pcap");
    let mut client = pipeline(
        "socat | tshark",
        &format!(
            "{} | timeout 120 tshark -r - -F pcap -w {}",
            socat("", "-,ignoreeof", &arg(&viewer_token)),
            arg(&live)
        ),
    );
    wait_for_count(&receiver, " joined", 1);
    replay(&receiver);
    receiver.stop().unwrap();
    let status = client.wait(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "socat | tshark: {}", client.stderr());
    let file = tcpdump_records(&out, "").unwrap();
    let streamed = tcpdump_records(&live, "").unwrap();
    assert!(
        file == reference(),
        "file: {}",
        first_difference(&reference(), &file)
    );
    assert!(
        streamed == file,
        "TLS stream vs file: {}",
        first_difference(&file, &streamed)
    );
    assert_eq!(tshark_count(&live).unwrap(), corpus::PACKETS);
    let summary = receiver.proc.summary().unwrap();
    let figure = |name: &str| summary_figure(&summary, &format!("/live_stream/{name}")).unwrap();
    assert_eq!(
        (
            figure("clients"),
            figure("refused"),
            figure("sent"),
            figure("dropped")
        ),
        (1, refusals.len() as u64, corpus::PACKETS as u64, 0),
        "{summary:#}"
    );
    let log = receiver.proc.stderr();
    assert!(log.contains("refused 127.0.0.1:"), "logged:\n{log}");
}

/// Arkime's reader takes only microsecond pcap (before 5.0), Ethernet, caplen == origlen:
/// the default stream of a live capture, with no snap length given anywhere, is that, and
/// holds what tcpdump captured beside the sensor.
#[test]
fn the_default_stream_of_a_live_capture_is_microsecond_pcap_under_arkimes_rules() {
    require_root();
    require_tool("socat", "socat");
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("live-arkime").unwrap();
    let args = ["--serve-pcap", "127.0.0.1:5443"];
    let mut receiver = Receiver::start(Some(&lab.cap), &dir.join("state"), 5442, &args).unwrap();
    // A plain client, as Arkime's pcap-over-ip-client or `socat | zeek -r -` connects.
    let live = dir.join("live.pcap");
    let mut client = lab.cap.command("socat");
    client.extend(["-u", "TCP:127.0.0.1:5443", "-"].map(String::from));
    let stdout = Stdio::from(std::fs::File::create(&live).unwrap());
    let mut client = Proc::start("socat", &client, stdout).unwrap();
    wait_for_count(&receiver, " joined", 1);
    let mut sensor = start_sensor(Some(&lab.cap), &receiver, &["--iface", iface]).unwrap();
    let reference = dir.join("tcpdump.pcap");
    let tcpdump = start_tcpdump(&lab.cap, iface, "", &[], &reference).unwrap();
    lab.replay(0, &corpus::pcap(), 8000).unwrap();
    // The last frames pass the capture ring and the sensor's batch timer.
    std::thread::sleep(Duration::from_millis(600));
    let expected = stop_reference(tcpdump, &reference);
    sensor.stop().unwrap();
    receiver.stop().unwrap();
    let status = client.wait(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "socat: {}", client.stderr());

    let bytes = std::fs::read(&live).unwrap();
    assert!(
        matches!(
            bytes[..4],
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xd4, 0xc3, 0xb2, 0xa1]
        ),
        "magic {:02x?}",
        &bytes[..4]
    );
    let records = arkime_records(&bytes).unwrap_or_else(|e| panic!("Arkime refuses it: {e}"));
    assert!(records >= corpus::PACKETS / 2, "{records} packets");
    // libpcap (tcpdump, and Zeek's `-r -`) reads the same packets as tcpdump captured, at
    // the microsecond.
    let streamed = tcpdump_records(&live, "").unwrap();
    assert_eq!(streamed.len(), records);
    let skew = compare_captures(&expected, &streamed, 1_000).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{records} packets, largest skew from tcpdump {skew} ns");
}

/// --push-pcap: the receiver connects to a reader that listens, and again once it has gone
/// and come back; each reader gets a whole pcap stream.
#[test]
fn push_delivers_to_a_listening_reader_and_again_after_it_restarts() {
    require_tool("socat", "socat");
    let dir = Scratch::new("live-push").unwrap();
    // The reader of Arkime's pcap-over-ip-server mode, as `socat TCP-LISTEN:5445 - |
    // tcpdump -r -`, the pipe a named one so that each end is a process of its own: tcpdump
    // takes `count` packets and leaves, socat is stopped (the reader going away).
    let listen = |file: &Path, count: usize| {
        let fifo = file.with_extension("fifo");
        run("mkfifo", &[&arg(&fifo)]).unwrap();
        let tcpdump = [
            "tcpdump",
            "-r",
            &arg(&fifo),
            "-c",
            &count.to_string(),
            "-w",
            &arg(file),
        ];
        let tcpdump = Proc::start("tcpdump", &tcpdump.map(String::from), Stdio::null()).unwrap();
        let pipe = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let socat = ["socat", "-u", "TCP-LISTEN:5445,reuseaddr", "-"].map(String::from);
        let socat = Proc::start("socat", &socat, Stdio::from(pipe)).unwrap();
        (socat, tcpdump)
    };
    let (first, second) = (dir.join("first.pcap"), dir.join("second.pcap"));
    let (mut socat, mut tcpdump) = listen(&first, corpus::PACKETS);
    let mut receiver = Receiver::start(
        None,
        &dir.join("state"),
        5444,
        &["--push-pcap", "127.0.0.1:5445"],
    )
    .unwrap();
    wait_for_count(&receiver, "pushing to the reader at", 1);
    replay(&receiver);
    let status = tcpdump.wait(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "first reader: {}", tcpdump.stderr());
    // The reader goes away: socat ends on SIGTERM (exit 143), closing the connection.
    socat.signal("TERM").unwrap();
    socat.wait(Duration::from_secs(10)).unwrap();
    wait_for_count(&receiver, "the reader at 127.0.0.1:5445 left", 1);

    // A reader again on the same port: the receiver comes back to it.
    let (mut socat, mut tcpdump) = listen(&second, corpus::PACKETS);
    wait_for_count(&receiver, "pushing to the reader at", 2);
    replay(&receiver);
    let status = tcpdump.wait(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "second reader: {}", tcpdump.stderr());
    receiver.stop().unwrap();
    // The receiver ended the stream: socat sees its end and stops by itself.
    let status = socat.wait(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "second socat: {}", socat.stderr());

    let expected = reference();
    for file in [&first, &second] {
        let got = tcpdump_records(file, "").unwrap();
        assert!(
            got == expected,
            "{}: {}",
            file.display(),
            first_difference(&expected, &got)
        );
    }
    let summary = receiver.proc.summary().unwrap();
    let push = |name: &str| summary_figure(&summary, &format!("/live_stream/push/{name}")).unwrap();
    assert_eq!(
        (push("connections"), push("sent"), push("not_delivered")),
        (2, 2 * corpus::PACKETS as u64, 0),
        "{summary:#}"
    );
}

/// A reader that never comes: what waited for it is counted as not delivered at exit, and
/// the failure to connect is said once, not at every attempt.
#[test]
fn push_counts_what_a_reader_that_never_came_did_not_get() {
    let dir = Scratch::new("live-push-away").unwrap();
    let mut receiver = Receiver::start(
        None,
        &dir.join("state"),
        5449,
        &["--push-pcap", "127.0.0.1:5448"],
    )
    .unwrap();
    replay(&receiver);
    receiver.stop().unwrap();
    let summary = receiver.proc.summary().unwrap();
    let push = |name: &str| summary_figure(&summary, &format!("/live_stream/push/{name}")).unwrap();
    assert_eq!(
        (push("connections"), push("sent"), push("not_delivered")),
        (0, 0, corpus::PACKETS as u64),
        "{summary:#}"
    );
    let log = receiver.proc.stderr();
    assert_eq!(
        log.matches("cannot connect to the reader at 127.0.0.1:5448")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains(&format!("{} not delivered", corpus::PACKETS)),
        "the exit summary says it:\n{log}"
    );
}

#[test]
fn bad_live_stream_options_are_one_line_and_exit_2() {
    let dir = Scratch::new("live-bad").unwrap();
    let state = arg(&dir.join("state"));
    let base = ["--listen", "127.0.0.1:5446", "--state-dir", state.as_str()];
    let with =
        |more: &[&str]| -> Vec<String> { base.iter().chain(more).map(|s| s.to_string()).collect() };
    let refused = |more: &[&str], needle: &str| {
        let args = with(more);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused("receiver", &args, needle);
    };
    refused(&["--push-pcap", "nowhere"], "nowhere");
    refused(
        &[
            "--serve-pcap",
            "127.0.0.1:5447",
            "--serve-pcap-precision",
            "ms",
        ],
        "ms",
    );
    refused(&["--serve-pcap", "0.0.0.0:5447"], "--serve-pcap-tls");
    refused(
        &["--push-pcap", "198.18.0.1:5447"],
        "--push-pcap-allow-remote",
    );
    let short = dir.join("short");
    std::fs::write(&short, "short\n").unwrap();
    refused(
        &[
            "--serve-pcap",
            "127.0.0.1:5447",
            "--serve-pcap-tls",
            "--viewer-token-file",
            &arg(&short),
        ],
        "fewer than the 16",
    );
    // The sensors' token as the viewer token: a sensor could read everything.
    let same = dir.join("same");
    std::fs::write(&same, "jJ8w0lq3Vq9gH5vJr2yQm4c6Ue1tN7sK\n").unwrap();
    std::fs::set_permissions(&same, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    refused(
        &[
            "--serve-pcap",
            "127.0.0.1:5447",
            "--serve-pcap-tls",
            "--token-file",
            &arg(&same),
            "--viewer-token-file",
            &arg(&same),
        ],
        "is the sensors' token",
    );
}
