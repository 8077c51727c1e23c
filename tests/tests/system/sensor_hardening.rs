//! The sensor under a hostile or changing network, with real processes in a fresh network
//! namespace (its own loopback, so port 4433 and the test's DNS traffic are private):
//!
//! * the design's commands work as written on one host: `receiver --out capture.pcap`, then
//!   `sensor --iface lo --bpf "port 53"`, no other flag (H2);
//! * a forged Version Negotiation, a forged TLS alert and an impostor's certificate on
//!   reconnects do not stop a sensor: it retries, and delivers everything once the real
//!   receiver is back (M4);
//! * a sensor with a spool killed with SIGKILL and restarted delivers every spooled packet
//!   once (M5).
//!
//! Each compares the output with tcpdump's capture of the same loopback traffic.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use testbed::capstream::{
    compare_captures, sensor_figures, start_sensor_to, start_tcpdump, stop_reference,
    tcpdump_records, Receiver, Scratch,
};
use testbed::relay::Answer;
use testbed::{require_root, wait_until, workspace_bin, Faults, Netns, Proc, Relay, SummaryFile};

fn sleep(secs: f64) {
    std::thread::sleep(Duration::from_secs_f64(secs));
}

/// `program args...` inside `ns` with HOME set to `home`, so that the per-user state
/// directory (~/.local/share/capstream) is the test's own.
/// The exit summary goes to a file named by the environment
/// (`CAPSTREAM_<PROGRAM>_SUMMARY_JSON`), so that the command line stays as written.
fn start_at_home(ns: &Netns, home: &Path, program: &str, args: &[&str]) -> Proc {
    let summary = SummaryFile::new(program).unwrap();
    let mut argv = ns.command("env");
    argv.push(format!("HOME={}", home.display()));
    argv.push(format!(
        "CAPSTREAM_{}_SUMMARY_JSON={}",
        program.to_uppercase(),
        summary.arg()
    ));
    argv.push(workspace_bin(program).to_string_lossy().into_owned());
    argv.extend(args.iter().map(|a| a.to_string()));
    Proc::start(program, &argv, Stdio::null())
        .unwrap()
        .with_summary(summary)
}

/// Sends `count` DNS queries (one-question A lookups, numbered by their id) from inside
/// `ns` to 127.0.0.1:53, where nothing answers, a few milliseconds apart.
fn dns_queries(ns: &Netns, first_id: u16, count: u16) {
    let script = format!(
        "import socket, struct, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range({first_id}, {first_id} + {count}):\n\
         \x20   q = struct.pack('>HHHHHH', i, 0x0100, 1, 0, 0, 0) + b'\\x07example\\x03com\\x00' + struct.pack('>HH', 1, 1)\n\
         \x20   s.sendto(q, ('127.0.0.1', 53))\n\
         \x20   time.sleep(0.005)\n"
    );
    ns.exec("python3", &["-c", &script]).unwrap();
}

/// Lets the last queries pass the sensor's 100 ms batch timer and the receiver's 1 s
/// reorder window.
fn settle() {
    sleep(1.5);
}

/// The output holds exactly tcpdump's capture, and the sensor's identity holds on `iface`:
/// matched = delivered + dropped, nothing unacknowledged, delivered = written.
fn assert_same_as_tcpdump(
    what: &str,
    expected: usize,
    reference: &[testbed::capstream::Record],
    out: &Path,
    sensor: &Proc,
    receiver_log: &str,
    iface: &str,
) {
    let sensor_log = sensor.stderr();
    assert_eq!(reference.len(), expected, "{what}: tcpdump saw every query");
    let got = tcpdump_records(out, "").unwrap();
    if let Err(difference) = compare_captures(reference, &got, 0) {
        panic!("{what}: output != tcpdump: {difference}\nsensor:\n{sensor_log}\nreceiver:\n{receiver_log}");
    }
    let f = sensor_figures(&sensor.summary().unwrap(), iface).unwrap();
    assert_eq!(f.matched, f.delivered + f.dropped, "{what}: {}", f.line);
    assert_eq!(f.unacknowledged, Some(0), "{what}: {}", f.line);
    assert_eq!(f.delivered, got.len() as u64, "{what}: {}", f.line);
}

fn output_of(dir: &Scratch) -> (PathBuf, String) {
    let out = dir.join("capture.pcap");
    let arg = out.to_string_lossy().into_owned();
    (out, arg)
}

/// `receiver --out capture.pcap` and `sensor --iface lo --bpf "port 53"`, nothing else:
/// the sensor finds the receiver on localhost:4433 and trusts the certificate (and sends
/// the token, when there is one) in the receiver's default state directory.
#[test]
fn the_design_commands_work_as_written_on_one_host() {
    require_root();
    let ns = Netns::new("onehost").unwrap();
    let dir = Scratch::new("onehost").unwrap();
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let (out, out_arg) = output_of(&dir);
    let mut receiver = start_at_home(&ns, &home, "receiver", &["--out", &out_arg]);
    receiver
        .wait_for("listening on", Duration::from_secs(20))
        .unwrap();
    receiver
        .wait_for("fingerprint", Duration::from_secs(5))
        .unwrap();
    let reference_file = dir.join("tcpdump.pcap");
    let tcpdump = start_tcpdump(&ns, "lo", "port 53", &[], &reference_file).unwrap();
    let mut sensor = start_at_home(&ns, &home, "sensor", &["--iface", "lo", "--bpf", "port 53"]);
    sensor
        .wait_for("connected to receiver", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", receiver.stderr()));

    dns_queries(&ns, 1, 50);
    settle();
    let reference = stop_reference(tcpdump, &reference_file);
    sensor
        .stop()
        .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", receiver.stderr()));
    receiver.stop().unwrap();
    assert_same_as_tcpdump(
        "one host",
        50,
        &reference,
        &out,
        &sensor,
        &receiver.stderr(),
        "lo",
    );
}

/// Without a receiver certificate to find, the sensor says in one line which options to
/// give, and exits 2: with no option at all (clap says it, so that --check-config does
/// too), and with a --receiver but nothing to trust it by.
#[test]
fn without_a_local_receiver_the_error_names_the_options() {
    require_root();
    let dir = Scratch::new("noreceiver").unwrap();
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let refused = |args: &[&str]| {
        let out = std::process::Command::new("env")
            .arg(format!("HOME={}", home.display()))
            .arg(workspace_bin("sensor"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        stderr
    };
    let stderr = refused(&["--iface", "lo", "--bpf", "port 53"]);
    for option in ["--receiver <HOST:PORT>", "--ca <FILE>", "--fingerprint"] {
        assert!(stderr.contains(option), "should name {option}: {stderr}");
    }
    let stderr = refused(&["--iface", "lo", "--receiver", "198.18.0.1:4433"]);
    for option in [
        "--receiver HOST:PORT",
        "--ca FILE",
        "--fingerprint",
        "--token-file",
    ] {
        assert!(stderr.contains(option), "should name {option}: {stderr}");
    }
}

/// A sensor streams through a relay; then the relay plays an attacker on the path: it
/// drops the connection and answers every reconnect with a forged Version Negotiation,
/// then with a forged Initial closing with a TLS alert, then hands the sensor to an
/// impostor receiver with another certificate; then it lets the real receiver be reached
/// again. The sensor keeps running and retrying, and at the
/// end the output holds every query, as tcpdump saw them.
#[test]
fn forged_version_negotiation_tls_alert_and_impostor_do_not_stop_a_sensor() {
    require_root();
    let ns = Netns::new("spoofed").unwrap();
    let dir = Scratch::new("spoofed").unwrap();
    let (out, out_arg) = output_of(&dir);
    let mut receiver =
        Receiver::start(Some(&ns), &dir.join("state"), 4433, &["--out", &out_arg]).unwrap();
    let mut impostor = Receiver::start(
        Some(&ns),
        &dir.join("impostor-state"),
        4435,
        &["--out", &dir.join("impostor.pcap").to_string_lossy()],
    )
    .unwrap();
    let relay = Relay::start(
        Some(&ns),
        "127.0.0.1:4434".parse().unwrap(),
        receiver.addr.parse().unwrap(),
        Faults::none(),
    )
    .unwrap();
    let reference_file = dir.join("tcpdump.pcap");
    let tcpdump = start_tcpdump(&ns, "lo", "udp port 53", &[], &reference_file).unwrap();
    let args = ["--iface", "lo", "--mode", "pcap", "--bpf", "udp port 53"];
    let mut sensor = start_sensor_to(Some(&ns), "127.0.0.1:4434", &receiver, &args).unwrap();
    sensor
        .wait_for("connected to receiver", Duration::from_secs(20))
        .unwrap();
    dns_queries(&ns, 1, 40);
    settle();

    // Forged Version Negotiation: the connection dies (idle timeout), and every attempt
    // to reconnect is answered with it.
    relay.answer(Answer::VersionNegotiation);
    dns_queries(&ns, 100, 40);
    let negotiated = |log: &str| log.matches("offers no QUIC version").count();
    assert!(
        wait_until(Duration::from_secs(60), || negotiated(&sensor.stderr())
            >= 2),
        "the sensor met no forged Version Negotiation twice:\n{}",
        sensor.stderr()
    );

    // A forged Initial that closes the connection with a TLS alert ("certificate
    // required"), which the first connection would take as a misconfiguration.
    relay.answer(Answer::CloseWithAlert(116));
    dns_queries(&ns, 150, 20);
    assert!(
        wait_until(Duration::from_secs(30), || sensor
            .stderr()
            .contains("requires a client certificate")),
        "the sensor met no forged TLS alert:\n{}",
        sensor.stderr()
    );

    // An impostor with a certificate the sensor does not trust.
    relay.answer(Answer::ForwardTo(impostor.addr.parse().unwrap()));
    dns_queries(&ns, 200, 40);
    assert!(
        wait_until(Duration::from_secs(30), || sensor
            .stderr()
            .contains("TLS handshake with receiver")),
        "the sensor never met the impostor:\n{}",
        sensor.stderr()
    );

    // The real receiver again.
    relay.answer(Answer::Forward);
    assert!(
        wait_until(Duration::from_secs(30), || sensor
            .stderr()
            .contains("reconnected to receiver")),
        "the sensor did not reconnect:\n{}",
        sensor.stderr()
    );
    dns_queries(&ns, 300, 40);
    settle();
    let reference = stop_reference(tcpdump, &reference_file);
    sensor
        .stop()
        .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", receiver.proc.stderr()));
    receiver.stop().unwrap();
    impostor.stop().unwrap();
    assert_same_as_tcpdump(
        "spoofed",
        180,
        &reference,
        &out,
        &sensor,
        &receiver.proc.stderr(),
        "lo",
    );
    eprintln!("relay: {}", relay.stats());
}

/// `count` UDP datagrams to 127.0.0.1:53 from inside `ns`, each 1400 random bytes (so that
/// they neither compress nor repeat), a little apart.
fn random_datagrams(ns: &Netns, count: u32) {
    let script = format!(
        "import os, socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range({count}):\n\
         \x20   s.sendto(os.urandom(1400), ('127.0.0.1', 53))\n\
         \x20   time.sleep(0.0003)\n"
    );
    ns.exec("python3", &["-c", &script]).unwrap();
}

/// Whether `got` is `expected` with some packets left out, in order.
fn is_subsequence(
    expected: &[testbed::capstream::Record],
    got: &[testbed::capstream::Record],
) -> bool {
    let mut rest = expected.iter();
    got.iter().all(|g| rest.any(|e| e == g))
}

/// A sensor with a spool, cut off from its receiver long enough to spool megabytes, is
/// killed with SIGKILL and started again with the same command: it resumes its session
/// and delivers every spooled packet, each once, then goes on. (What the killed sensor held
/// in memory died with it; the restarted one says how many batches that was and sends
/// them empty, so that the session has no gap.)
#[test]
fn a_spool_survives_a_killed_sensor() {
    require_root();
    let ns = Netns::new("spoolkill").unwrap();
    let dir = Scratch::new("spoolkill").unwrap();
    let (out, out_arg) = output_of(&dir);
    let mut receiver =
        Receiver::start(Some(&ns), &dir.join("state"), 4433, &["--out", &out_arg]).unwrap();
    let relay = Relay::start(
        Some(&ns),
        "127.0.0.1:4434".parse().unwrap(),
        receiver.addr.parse().unwrap(),
        Faults::none(),
    )
    .unwrap();
    let spool = dir.join("spool");
    let spool_arg = spool.to_string_lossy().into_owned();
    let reference_file = dir.join("tcpdump.pcap");
    let tcpdump = start_tcpdump(&ns, "lo", "udp port 53", &[], &reference_file).unwrap();
    let args = [
        "--iface",
        "lo",
        "--mode",
        "pcap",
        "--bpf",
        "udp port 53",
        "--buffer",
        "4MiB",
        "--spool-dir",
        &spool_arg,
        "--sensor-id",
        "spooled",
    ];
    let mut first = start_sensor_to(Some(&ns), "127.0.0.1:4434", &receiver, &args).unwrap();
    first
        .wait_for("connected to receiver", Duration::from_secs(20))
        .unwrap();
    dns_queries(&ns, 1, 40);
    settle();

    // Cut off: about 8 MiB, twice what memory holds.
    relay.answer(Answer::Drop);
    random_datagrams(&ns, 6000);
    settle();
    let spooled = || {
        std::fs::read_dir(&spool)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert!(spooled() > 0, "nothing spooled:\n{}", first.stderr());
    first.signal("KILL").unwrap();
    let _ = first.wait(Duration::from_secs(10));
    let first_log = first.stderr();

    relay.answer(Answer::Forward);
    let mut second = start_sensor_to(Some(&ns), "127.0.0.1:4434", &receiver, &args).unwrap();
    let second_log = second.stderr();
    let resumed = second_log
        .lines()
        .find(|l| l.contains("spool: resuming session"))
        .unwrap_or_else(|| panic!("no resumed spool:\n{second_log}"))
        .to_string();
    // "... resuming session X of a sensor that did not end it: N batch(es) (P packets) ..."
    let adopted: u64 = resumed
        .split(" (")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in: {resumed}"));
    assert!(adopted > 0, "{resumed}");
    second
        .wait_for("connected to receiver", Duration::from_secs(20))
        .unwrap();
    dns_queries(&ns, 100, 40);
    settle();
    let reference = stop_reference(tcpdump, &reference_file);
    second
        .stop()
        .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", receiver.proc.stderr()));
    receiver.stop().unwrap();
    let second_log = second.stderr();
    let got = tcpdump_records(&out, "").unwrap();
    let what = format!(
        "{resumed}\nfirst sensor:\n{first_log}\nsecond sensor:\n{second_log}\nreceiver:\n{}",
        receiver.proc.stderr()
    );

    assert_eq!(reference.len(), 40 + 6000 + 40, "tcpdump saw everything");
    let mut unique = got.clone();
    unique.sort_by(|a, b| a.data.cmp(&b.data));
    unique.dedup_by(|a, b| a.data == b.data);
    assert_eq!(unique.len(), got.len(), "packets written twice\n{what}");
    assert!(
        is_subsequence(&reference, &got),
        "output is not tcpdump's capture less some packets\n{what}"
    );
    // Before the cut, every spooled packet, and after the restart: nothing else lost.
    assert_eq!(got[..40], reference[..40], "{what}");
    assert_eq!(
        got[got.len() - 40..],
        reference[reference.len() - 40..],
        "{what}"
    );
    assert_eq!(got.len() as u64, 40 + adopted + 40, "{what}");
    let f = sensor_figures(&second.summary().unwrap(), "lo").unwrap();
    assert_eq!(f.matched, f.delivered + f.dropped, "{}", f.line);
    assert_eq!(f.unacknowledged, Some(0), "{}", f.line);
    assert_eq!(f.delivered, adopted + 40, "{}", f.line);
    assert_eq!(spooled(), 0, "the spool is emptied");
}

/// Removes a directory on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A receiver reached by name moves to another address (DNS fail-over, a new host): the
/// sensor resolves the name again when it reconnects, follows it, and loses nothing.
///
/// The name lives in the namespace's own hosts file: `ip netns exec` shows
/// `/etc/netns/<namespace>/hosts` as `/etc/hosts` to what it runs, and the resolver reads
/// it again at each lookup.
#[test]
fn a_receiver_that_moves_is_followed_by_its_name() {
    require_root();
    let ns = Netns::new("moved").unwrap();
    let dir = Scratch::new("moved").unwrap();
    let etc = PathBuf::from("/etc/netns").join(&ns.name);
    std::fs::create_dir_all(&etc).unwrap();
    let _etc = RemoveOnDrop(etc.clone());
    let hosts = etc.join("hosts");
    // Rewritten in place later: the namespace's processes see this very file.
    std::fs::write(&hosts, "127.0.0.1 localhost collector.test\n").unwrap();

    let state = dir.join("state");
    let first_out = dir.join("first.pcap");
    let mut first = Receiver::start_listening(
        Some(&ns),
        &state,
        "127.0.0.1:4433",
        &[
            "--out",
            &first_out.to_string_lossy(),
            "--cert-name",
            "collector.test",
        ],
    )
    .unwrap();
    let reference_file = dir.join("tcpdump.pcap");
    let tcpdump = start_tcpdump(&ns, "lo", "udp port 53", &[], &reference_file).unwrap();
    let args = ["--iface", "lo", "--mode", "pcap", "--bpf", "udp port 53"];
    let mut sensor = start_sensor_to(Some(&ns), "collector.test:4433", &first, &args).unwrap();
    sensor
        .wait_for("connected to receiver", Duration::from_secs(20))
        .unwrap();
    dns_queries(&ns, 1, 40);
    settle();
    first.stop().unwrap();

    // The receiver comes back elsewhere, with the same certificate, and the name follows.
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.2 collector.test\n").unwrap();
    let second_out = dir.join("second.pcap");
    let mut second = Receiver::start_listening(
        Some(&ns),
        &state,
        "127.0.0.2:4433",
        &["--out", &second_out.to_string_lossy()],
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || sensor
            .stderr()
            .contains("reconnected to receiver 127.0.0.2:4433")),
        "the sensor did not follow the name:\n{}",
        sensor.stderr()
    );
    dns_queries(&ns, 100, 40);
    settle();
    let reference = stop_reference(tcpdump, &reference_file);
    sensor
        .stop()
        .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", second.proc.stderr()));
    second.stop().unwrap();
    let sensor_log = sensor.stderr();
    assert!(
        sensor_log.contains("is now at 127.0.0.2:4433"),
        "{sensor_log}"
    );

    assert_eq!(reference.len(), 80, "tcpdump saw every query");
    let mut got = tcpdump_records(&first_out, "").unwrap();
    got.extend(tcpdump_records(&second_out, "").unwrap());
    if let Err(difference) = compare_captures(&reference, &got, 0) {
        panic!("both outputs != tcpdump: {difference}\nsensor:\n{sensor_log}");
    }
    let f = sensor_figures(&sensor.summary().unwrap(), "lo").unwrap();
    assert_eq!(f.matched, f.delivered + f.dropped, "{}", f.line);
    assert_eq!(f.unacknowledged, Some(0), "{}", f.line);
    assert_eq!(f.delivered, 80, "{}", f.line);
}
