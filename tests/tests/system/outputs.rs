//! The receiver's outputs beyond one file: the live PCAP-over-IP stream read by tshark (with
//! or without a file), a slow live client that drops only its own packets, rotation with
//! retention and through a full disk, and a file per sensor with path-safe names. Everything
//! runs on the host's loopback, on ports 5310-5334. A restarted receiver continues its file.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use testbed::capstream::{
    assert_refused, first_difference, number_after, pcapng_interfaces, start_sensor,
    summary_figure, tcpdump_records, tshark_count, Receiver, Record, Scratch,
};
use testbed::{corpus, require_root, run, Proc, Tmpfs};

fn arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// What tcpdump reads from the corpus under `filter`.
fn reference(filter: &str) -> Vec<Record> {
    tcpdump_records(&corpus::pcap(), filter).unwrap()
}

/// Streams `file` through a sensor (`extra` added) into `receiver`, to the end.
fn replay(receiver: &Receiver, file: &str, extra: &[&str]) {
    let mut args = vec!["--read", file];
    args.extend_from_slice(extra);
    let mut sensor = start_sensor(None, receiver, &args).unwrap();
    let status = sensor.wait(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "sensor failed: {}", sensor.stderr());
}

/// A receiver on UDP `port` writing `dir/capture.pcap` and serving it live on TCP `live`.
fn writing_and_serving(dir: &Scratch, port: u16, live: &str) -> (Receiver, PathBuf) {
    let out = dir.join("capture.pcap");
    let args = ["--out", &arg(&out), "--serve-pcap", live];
    let receiver = Receiver::start(None, &dir.join("state"), port, &args).unwrap();
    (receiver, out)
}

/// Waits until the receiver has taken in its `n`th live client, so that it misses nothing.
fn wait_for_clients(receiver: &Receiver, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while receiver.proc.stderr().matches(" joined").count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no live client {n} joined:\n{}",
            receiver.proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// tshark reading the live stream at `addr` into `out`, as a user would run it, once the
/// receiver has taken it in as its `nth` client.
fn start_tshark(receiver: &Receiver, addr: &str, out: &Path, nth: usize) -> Proc {
    let argv: Vec<String> = ["tshark", "-i", &format!("TCP@{addr}"), "-w", &arg(out)]
        .map(String::from)
        .to_vec();
    let tshark = Proc::start("tshark", &argv, Stdio::null())
        .expect("tshark is missing: `cargo xtask setup` installs it");
    wait_for_clients(receiver, nth);
    tshark
}

/// The files the receiver completed, in order, from its log.
fn completed(log: &str) -> Vec<PathBuf> {
    log.lines()
        .filter_map(|l| {
            l.split_once(" completed ")
                .map(|(_, p)| PathBuf::from(p.trim()))
        })
        .collect()
}

#[test]
fn tshark_reads_the_live_stream_as_the_file_has_it() {
    let dir = Scratch::new("live").unwrap();
    let (mut receiver, out) = writing_and_serving(&dir, 5310, "127.0.0.1:5311");
    let live = dir.join("live.pcap");
    let mut tshark = start_tshark(&receiver, "127.0.0.1:5311", &live, 1);
    replay(&receiver, &corpus::pcap_arg(), &[]);
    receiver.stop().unwrap();
    // The receiver ends the stream at exit: tshark sees the end and stops by itself.
    let status = tshark.wait(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "tshark: {}", tshark.stderr());

    let expected = reference("");
    let file = tcpdump_records(&out, "").unwrap();
    let streamed = tcpdump_records(&live, "").unwrap();
    assert!(
        file == expected,
        "file: {}",
        first_difference(&expected, &file)
    );
    assert!(
        streamed == file,
        "live stream vs file: {}",
        first_difference(&file, &streamed)
    );
    assert_eq!(tshark_count(&live).unwrap(), corpus::PACKETS);
    let summary = receiver.proc.summary().unwrap();
    let live = |name: &str| summary_figure(&summary, &format!("/live_stream/{name}")).unwrap();
    assert_eq!(
        (live("clients"), live("sent"), live("dropped")),
        (1, corpus::PACKETS as u64, 0),
        "{summary:#}"
    );
}

#[test]
fn without_a_file_the_live_stream_acknowledges_the_sensors() {
    let dir = Scratch::new("liveonly").unwrap();
    let live = dir.join("live.pcap");
    let args = ["--serve-pcap", "127.0.0.1:5320"];
    let mut receiver = Receiver::start(None, &dir.join("state"), 5319, &args).unwrap();
    let mut tshark = start_tshark(&receiver, "127.0.0.1:5320", &live, 1);
    // The sensor exits successfully only once every batch is acknowledged.
    replay(&receiver, &corpus::pcap_arg(), &["--bpf", "tcp"]);
    receiver.stop().unwrap();
    let status = tshark.wait(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "tshark: {}", tshark.stderr());
    let expected = reference("tcp");
    let streamed = tcpdump_records(&live, "").unwrap();
    assert!(
        streamed == expected,
        "{}",
        first_difference(&expected, &streamed)
    );
    assert!(!dir.join("capture.pcap").exists() && !Path::new("capture.pcap").exists());
}

#[test]
fn a_client_that_never_reads_drops_its_own_packets_only() {
    let dir = Scratch::new("slow").unwrap();
    // 20 corpus copies, about 36 MB: more than a stalled client's queue and socket hold.
    let big = dir.join("big.pcap");
    let copies: Vec<String> = std::iter::repeat_n(corpus::pcap_arg(), 20).collect();
    let mut mergecap = vec!["-a", "-F", "pcap", "-w"];
    let big_arg = arg(&big);
    mergecap.push(&big_arg);
    mergecap.extend(copies.iter().map(String::as_str));
    run("mergecap", &mergecap).expect("mergecap is missing: `cargo xtask setup` installs it");
    let total = 20 * corpus::PACKETS;

    let (mut receiver, out) = writing_and_serving(&dir, 5312, "127.0.0.1:5313");
    let live = dir.join("live.pcap");
    let stalled = std::net::TcpStream::connect("127.0.0.1:5313").unwrap();
    wait_for_clients(&receiver, 1);
    let mut tshark = start_tshark(&receiver, "127.0.0.1:5313", &live, 2);
    replay(&receiver, &arg(&big), &[]);
    receiver.stop().unwrap();
    let status = tshark.wait(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "tshark: {}", tshark.stderr());
    drop(stalled);

    // The file and the reading client have everything.
    let file = tcpdump_records(&out, "").unwrap();
    assert_eq!(file.len(), total, "the file is complete");
    let streamed = tcpdump_records(&live, "").unwrap();
    assert!(
        streamed == file,
        "the reading client: {}",
        first_difference(&file, &streamed)
    );
    // The stalled one lost packets, counted when it was let go, as sent + dropped = all.
    let log = receiver.proc.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("dropped because it read too slowly"))
        .unwrap_or_else(|| panic!("no drop line for the stalled client:\n{log}"));
    let sent = number_after(line, "): ").unwrap();
    let dropped = number_after(line, "packets sent, ").unwrap();
    eprintln!("{line}");
    assert!(dropped > 0, "{line}");
    assert_eq!(sent + dropped, total as u64, "{line}");
    let summary = receiver.proc.summary().unwrap();
    let summary_dropped = summary_figure(&summary, "/live_stream/dropped").unwrap();
    assert_eq!(
        summary_dropped, dropped,
        "the exit summary counts them: {summary:#}"
    );
}

#[test]
fn rotated_files_hold_the_capture_in_order_and_keep_deletes_the_oldest() {
    let expected = reference("");

    // pcapng: every file repeats the interface and reads on its own.
    let dir = Scratch::new("rotate").unwrap();
    let pattern = dir.join("cap-%Y%m%d-%H%M%S.pcapng");
    let mut receiver = Receiver::start(
        None,
        &dir.join("state"),
        5314,
        &["--out", &arg(&pattern), "--rotate-size", "256KiB"],
    )
    .unwrap();
    replay(&receiver, &corpus::pcap_arg(), &[]);
    receiver.stop().unwrap();
    let files = completed(&receiver.proc.stderr());
    assert!(files.len() >= 5, "{files:?}");
    let mut all = Vec::new();
    for file in &files {
        let size = std::fs::metadata(file).unwrap().len();
        assert!(
            size < 256 * 1024 + 70_000,
            "{} is {size} bytes",
            file.display()
        );
        let interfaces = pcapng_interfaces(file).unwrap();
        assert_eq!(interfaces.len(), 1, "{}", file.display());
        assert!(
            interfaces[0].name.ends_with("/tcpdump-tests.pcap"),
            "{:?}",
            interfaces[0].name
        );
        let records = tcpdump_records(file, "").unwrap();
        assert_eq!(tshark_count(file).unwrap(), records.len());
        assert!(!records.is_empty(), "{}", file.display());
        all.extend(records);
    }
    assert!(
        all == expected,
        "rotated files concatenated: {}",
        first_difference(&expected, &all)
    );

    // pcap with --keep 2: only the two newest files stay, and hold the end of the capture.
    let dir = Scratch::new("keep").unwrap();
    let pattern = dir.join("cap.pcap");
    let mut receiver = Receiver::start(
        None,
        &dir.join("state"),
        5315,
        &[
            "--out",
            &arg(&pattern),
            "--rotate-size",
            "256KiB",
            "--keep",
            "2",
        ],
    )
    .unwrap();
    replay(&receiver, &corpus::pcap_arg(), &[]);
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    let files = completed(&log);
    assert!(files.len() >= 5, "{files:?}");
    let left: Vec<PathBuf> = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    let newest = &files[files.len() - 2..];
    let mut sorted = left.clone();
    sorted.sort();
    let mut want = newest.to_vec();
    want.sort();
    assert_eq!(sorted, want, "{log}");
    assert_eq!(log.matches("beyond --keep").count(), files.len() - 2);
    // Same name pattern: counters in file order, so names are not reused.
    assert_eq!(
        newest[1],
        dir.join(&format!("cap-{}.pcap", files.len() - 1))
    );
    let tail: Vec<Record> = newest
        .iter()
        .flat_map(|f| tcpdump_records(f, "").unwrap())
        .collect();
    assert!(
        expected.ends_with(&tail),
        "the kept files hold the end of the capture"
    );
}

#[test]
fn rotation_waits_out_a_full_disk_without_loss() {
    require_root();
    let dir = Scratch::new("rotatefull").unwrap();
    let disk = Tmpfs::mount("rotatefull", 8 << 20).unwrap();
    let ballast = disk.fill_leaving(512 << 10).unwrap();
    let args = [
        "--out",
        &arg(&disk.join("cap.pcap")),
        "--rotate-size",
        "256KiB",
    ];
    let mut receiver = Receiver::start(None, &dir.join("state"), 5321, &args).unwrap();
    let mut sensor = start_sensor(None, &receiver, &["--read", &corpus::pcap_arg()]).unwrap();
    receiver
        .proc
        .wait_for("No space left", Duration::from_secs(60))
        .unwrap();
    std::fs::remove_file(&ballast).unwrap();
    let status = sensor.wait(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "sensor: {}", sensor.stderr());
    receiver.stop().unwrap();
    let files = completed(&receiver.proc.stderr());
    assert!(files.len() >= 5, "{files:?}");
    let all: Vec<Record> = files
        .iter()
        .flat_map(|f| tcpdump_records(f, "").unwrap())
        .collect();
    let expected = reference("");
    assert!(
        all == expected,
        "rotated files after the disk filled: {}",
        first_difference(&expected, &all)
    );
}

#[test]
fn a_file_per_sensor_with_safe_names_even_for_hostile_ones() {
    let dir = Scratch::new("split").unwrap();
    let out_dir = dir.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let mut receiver = Receiver::start(
        None,
        &dir.join("state"),
        5316,
        &[
            "--out",
            &arg(&out_dir.join("cap-{sensor}.pcapng")),
            "--split-by",
            "sensor",
        ],
    )
    .unwrap();
    replay(
        &receiver,
        &corpus::pcap_arg(),
        &["--sensor-id", "../../x", "--bpf", "udp"],
    );
    replay(
        &receiver,
        &corpus::pcap_arg(),
        &["--sensor-id", "tap-1", "--bpf", "tcp"],
    );
    receiver.stop().unwrap();

    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["cap-_._.__x.pcapng", "cap-tap-1.pcapng"]);
    assert!(!dir.path.join("x.pcapng").exists() && !dir.path.join("x").exists());
    for (name, filter) in [("cap-_._.__x.pcapng", "udp"), ("cap-tap-1.pcapng", "tcp")] {
        let got = tcpdump_records(&out_dir.join(name), "").unwrap();
        let expected = reference(filter);
        assert!(
            got == expected,
            "{name}: {}",
            first_difference(&expected, &got)
        );
    }
}

/// A restart never destroys a capture: `receiver --out cap.pcap` stopped after the corpus
/// and started again with the same command goes on in the same file (pcapng: a new
/// section), which tcpdump and tshark read whole, both runs in order; the file is 0600.
#[test]
fn a_restarted_receiver_continues_its_file() {
    let expected = reference("");
    for (port, name) in [(5330, "cap.pcap"), (5331, "cap.pcapng")] {
        let dir = Scratch::new("restart").unwrap();
        let out = dir.join(name);
        let args = ["--out", &arg(&out)];
        let mut logs = String::new();
        for _ in 0..2 {
            let mut receiver = Receiver::start(None, &dir.join("state"), port, &args).unwrap();
            replay(&receiver, &corpus::pcap_arg(), &[]);
            receiver.stop().unwrap();
            logs += &receiver.proc.stderr();
        }
        let got = tcpdump_records(&out, "").unwrap();
        let twice: Vec<Record> = expected.iter().chain(&expected).cloned().collect();
        assert!(
            got == twice,
            "{name}: both runs, in order: {}\n{logs}",
            first_difference(&twice, &got)
        );
        assert_eq!(tshark_count(&out).unwrap(), 2 * corpus::PACKETS, "{name}");
        assert!(logs.contains("continuing the capture there"), "{logs}");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}: readable by its owner only");
    }
}

/// With a file per sensor, a sensor's file is completed once it has left: 150 sensors in
/// turn leave 150 complete files and the receiver holding only a few descriptors, never one
/// per sensor ever seen.
#[test]
fn files_per_sensor_are_closed_as_their_sensors_leave() {
    let dir = Scratch::new("fds").unwrap();
    let small = dir.join("small.pcap");
    run(
        "tcpdump",
        &["-r", &corpus::pcap_arg(), "-c", "5", "-w", &arg(&small)],
    )
    .unwrap();
    let out_dir = dir.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let args = [
        "--out",
        &arg(&out_dir.join("{sensor}.pcap")),
        "--split-by",
        "sensor",
    ];
    let mut receiver = Receiver::start(None, &dir.join("state"), 5332, &args).unwrap();
    let sensors = 150;
    for n in 0..sensors {
        replay(&receiver, &arg(&small), &["--sensor-id", &format!("s{n}")]);
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", receiver.proc.pid()))
        .unwrap()
        .count();
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    assert!(
        fds < 50,
        "{fds} descriptors open after {sensors} sensors:\n{log}"
    );
    assert_eq!(completed(&log).len(), sensors, "{log}");
    let expected: Vec<Record> = tcpdump_records(&small, "").unwrap();
    for n in [0, sensors - 1] {
        let got = tcpdump_records(&out_dir.join(format!("s{n}.pcap")), "").unwrap();
        assert!(
            got == expected,
            "s{n}: {}",
            first_difference(&expected, &got)
        );
    }
}

#[test]
fn meaningless_output_combinations_are_one_line_errors() {
    let dir = Scratch::new("combos").unwrap();
    let state = arg(&dir.join("state"));
    let refused = |args: &[&str], needle: &str| {
        let mut all = vec!["--state-dir", state.as_str(), "--listen", "127.0.0.1:5317"];
        all.extend_from_slice(args);
        assert_refused("receiver", &all, needle);
    };
    refused(
        &["--out", "-", "--rotate-size", "1MiB"],
        "--out - is a stream",
    );
    refused(
        &["--out", "-", "--split-by", "sensor"],
        "--out - is a stream",
    );
    refused(
        &["--out", "/dev/null", "--rotate-time", "1h"],
        "--out /dev/null is a stream",
    );
    refused(
        &["--serve-pcap", "127.0.0.1:5318", "--rotate-time", "1h"],
        "add --out",
    );
    refused(&["--out", "x.pcap", "--keep", "3"], "--rotate-size");
    refused(&["--out", "x-{sensor}.pcap"], "--split-by sensor");
    refused(
        &["--out", "/tmp/%Y/x.pcap", "--rotate-time", "1h"],
        "not the directory",
    );
    refused(&["--out", "x-%Q.pcap"], "bad % field");
    refused(
        &["--out", "cap-%D.pcap", "--split-by", "sensor"],
        "puts '/' in the file name",
    );
    refused(&["--rotate-size", "1KiB"], "64KiB");
    refused(&["--serve-pcap", "nowhere"], "nowhere");
    let pki = arg(&dir.join("pki"));
    assert_refused(
        "receiver",
        &["certs", "sensor", "../x", "--dir", pki.as_str()],
        "sensor name",
    );
    assert!(!dir.join("x.crt").exists());
}

/// `--out` naming a FIFO or a character device writes a stream there, as `--out -` does:
/// tcpdump reading the FIFO gets the capture whole, and `/dev/null` takes it all, with no
/// numbered file or journal left beside either.
#[test]
fn named_pipes_and_devices_are_written_as_streams() {
    let dir = Scratch::new("streams").unwrap();
    let fifo = dir.join("fifo.pcap");
    run("mkfifo", &[&arg(&fifo)]).unwrap();
    let copy = dir.join("copy.pcap");
    let mut tcpdump = Proc::start(
        "tcpdump",
        &[
            "tcpdump".to_string(),
            "-r".into(),
            arg(&fifo),
            "--time-stamp-precision=nano".into(),
            "-w".into(),
            arg(&copy),
            "-Z".into(),
            "root".into(),
        ],
        Stdio::null(),
    )
    .unwrap();
    let mut receiver =
        Receiver::start(None, &dir.join("state"), 5333, &["--out", &arg(&fifo)]).unwrap();
    replay(&receiver, &corpus::pcap_arg(), &[]);
    receiver.stop().unwrap();
    let status = tcpdump.wait(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "tcpdump: {}", tcpdump.stderr());
    let expected = reference("");
    let got = tcpdump_records(&copy, "").unwrap();
    assert!(got == expected, "{}", first_difference(&expected, &got));

    let mut receiver =
        Receiver::start(None, &dir.join("state"), 5334, &["--out", "/dev/null"]).unwrap();
    replay(&receiver, &corpus::pcap_arg(), &[]);
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    let (_, summary) = log
        .split_once("sensor session(s)")
        .expect("the exit summary");
    assert_eq!(
        number_after(summary, "): ").unwrap(),
        corpus::PACKETS as u64,
        "{log}"
    );
    let mut beside: Vec<String> = std::fs::read_dir(dir.join(""))
        .unwrap()
        .chain(std::fs::read_dir("/dev").unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("fifo") || n.starts_with("null") || n.contains("journal"))
        .collect();
    beside.sort();
    assert_eq!(beside, ["fifo.pcap", "null"], "{log}");
}
