//! Faults, with real processes, namespaces and traffic: a receiver killed with SIGKILL and
//! restarted (and aborted at a fault point between write and acknowledgement), a 10-second network partition, a lossy reordering path, a sensor stopped
//! under load, a receiver out of disk space, and 50 sensors at once.
//!
//! Each test proves the accounting identity for every sensor interface, with nothing left
//! unexplained:
//!
//! * the sensor's exit summary: `matched = delivered + dropped after matching (sensor
//!   buffer full) + unacknowledged`, and `unacknowledged 0` after a clean exit. Kernel and
//!   driver drops happen before a frame reaches the sensor, so `matched` does not count
//!   them; where they occur they are checked against the reference capture instead;
//! * `delivered` (what the receiver acknowledged) = the packets the receiver's summary
//!   says it wrote for that sensor = the packets in the output file(s);
//! * where tcpdump captured beside the sensor, the output equals tcpdump's capture packet
//!   for packet, byte for byte and to the nanosecond (`--mode pcap` and `tc` read the same
//!   kernel timestamps as tcpdump), less only counted drops;
//! * no packet twice, also across a receiver killed with SIGKILL or aborted between a write
//!   and its acknowledgement and started again with the same command: the journal beside
//!   the output tells it what the dead one wrote.
//!
//! Traffic is the tcpdump test corpus replayed by tcpreplay (looped for longer runs) out of
//! `gen0` into `cap0`, where the sensor captures. Nothing here asserts a speed: the
//! timeouts only keep a broken run from hanging.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use testbed::capstream::{
    compare_captures, complete_records, pcapng_interfaces, peak_rss_kib, receiver_packets_of,
    receiver_sessions, sensor_figures, start_sensor, start_sensor_to, start_tcpdump,
    stop_reference, tcpdump_records, tshark_count, InterfaceFigures, Receiver, Record, Scratch,
};
use testbed::{corpus, require_root, run, wait_until, Faults, Lab, Netns, Proc, Relay, Tmpfs};

fn sleep(secs: f64) {
    std::thread::sleep(Duration::from_secs_f64(secs));
}

/// Lets the last frames pass the capture ring, the sensor's 100 ms batch timer and the
/// receiver's 1 s reorder window.
fn settle() {
    sleep(1.5);
}

/// tcpreplay sending the corpus `loops` times out of gen0 at `pps`, in the background.
fn start_replay(lab: &Lab, pps: u32, loops: u32) -> Proc {
    let corpus = corpus::pcap().to_string_lossy().into_owned();
    let mut argv = lab.gen.command("tcpreplay");
    for arg in [
        "-q",
        "--pps",
        &pps.to_string(),
        "--loop",
        &loops.to_string(),
        "-i",
        &lab.links[0].0,
        &corpus,
    ] {
        argv.push(arg.to_string());
    }
    Proc::start("tcpreplay", &argv, Stdio::null()).unwrap()
}

/// A `--mode pcap` sensor named `sensor_id` on the lab's capture end, into `receiver`, and
/// tcpdump capturing beside it into `reference`.
fn pcap_sensor_beside_tcpdump(
    lab: &Lab,
    receiver: &Receiver,
    sensor_id: &str,
    reference: &std::path::Path,
) -> (Proc, Proc) {
    let iface = lab.links[0].1.as_str();
    let args = ["--iface", iface, "--mode", "pcap", "--sensor-id", sensor_id];
    let sensor = start_sensor(Some(&lab.cap), receiver, &args).unwrap();
    let tcpdump = start_tcpdump(&lab.cap, iface, "", &[], reference).unwrap();
    (sensor, tcpdump)
}

/// Waits for the replay to end and its last frames to settle; returns tcpdump's capture.
fn end_of_replay(
    replay: &mut Proc,
    tcpdump: Proc,
    reference_file: &std::path::Path,
) -> Vec<Record> {
    finish_replay(replay);
    settle();
    stop_reference(tcpdump, reference_file)
}

/// Stops the sensor (which must exit 0, its receiver's log shown if not), then the receiver.
fn stop_both(sensor: &mut Proc, receiver: &mut Receiver) {
    sensor
        .stop()
        .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", receiver.proc.stderr()));
    receiver.stop().unwrap();
}

/// The programs a check reads the summaries of, and what a failed check shows.
struct Logs<'a> {
    sensor: &'a Proc,
    receiver: &'a Proc,
    extra: String,
}

/// tcpdump saw all `frames` replayed; the output holds its capture exactly, each packet
/// once; and the sensor's accounting identity holds.
fn assert_delivered_once(
    what: &str,
    expected: &[Record],
    frames: usize,
    out: &std::path::Path,
    iface: &str,
    logs: &Logs,
) -> InterfaceFigures {
    assert_eq!(
        expected.len(),
        frames,
        "{what}: tcpdump saw the whole replay"
    );
    let got = tcpdump_records(out, "").unwrap();
    assert_eq!(duplicates(&got), 0, "{what}: packets written twice");
    if let Err(difference) = compare_captures(expected, &got, 0) {
        panic!(
            "{what}: output != tcpdump: {difference}\n{}\nsensor:\n{}\nreceiver:\n{}",
            logs.extra,
            logs.sensor.stderr(),
            logs.receiver.stderr()
        );
    }
    assert_identity(what, logs.sensor, iface, got.len() as u64)
}

fn finish_replay(replay: &mut Proc) {
    let status = replay.wait(Duration::from_secs(300)).unwrap();
    assert!(status.success(), "tcpreplay failed: {}", replay.stderr());
}

/// Drops of frames that never reached the sensor: not part of `matched`.
fn dropped_before_matching(f: &InterfaceFigures) -> u64 {
    f.reason("kernel_buffer") + f.reason("interface")
}

/// The sensor's side of the identity for one interface, given the packets the output
/// holds for it: `matched = delivered + dropped after matching + unacknowledged`,
/// `unacknowledged = 0` and `delivered = written`. Returns the figures.
fn assert_identity(what: &str, sensor: &Proc, iface: &str, written: u64) -> InterfaceFigures {
    let sensor_log = sensor.stderr();
    let f = sensor_figures(&sensor.summary().unwrap(), iface).unwrap();
    let reasons: u64 = f.reasons.iter().map(|(_, n)| n).sum();
    assert_eq!(
        reasons, f.dropped,
        "{what}: the drop reasons do not add up to the drops: {}",
        f.line
    );
    let unacked = f.unacknowledged.unwrap_or_else(|| {
        panic!(
            "{what}: the summary does not say what was left unacknowledged: {}",
            f.line
        )
    });
    assert_eq!(
        unacked, 0,
        "{what}: packets left unacknowledged (lost) at a clean exit:\n{sensor_log}"
    );
    let after_matching = f.dropped - dropped_before_matching(&f);
    assert_eq!(
        f.matched,
        f.delivered + after_matching + unacked,
        "{what}: matched != delivered + dropped after matching + unacknowledged:\n{sensor_log}"
    );
    assert_eq!(
        f.delivered, written,
        "{what}: the sensor says the receiver acknowledged {} packets, the output holds \
         {written}:\n{sensor_log}",
        f.delivered
    );
    f
}

/// The receiver's side: its summary's packets for `sensor_id` equal those in the output.
fn assert_receiver_wrote(what: &str, receiver: &Proc, sensor_id: &str, written: u64) {
    let said = receiver_packets_of(&receiver.summary().unwrap(), sensor_id).unwrap();
    let receiver_log = receiver.stderr();
    assert_eq!(
        said, written,
        "{what}: the receiver's summary says {said} packets for {sensor_id}, the output \
         holds {written}:\n{receiver_log}"
    );
}

type Key<'a> = (u128, u32, &'a [u8]);

fn key(r: &Record) -> Key<'_> {
    (r.timestamp_ns, r.original_len, &r.data)
}

/// Records present more than once (same timestamp, length and bytes).
fn duplicates(records: &[Record]) -> usize {
    let mut seen = HashSet::with_capacity(records.len());
    records.iter().filter(|r| !seen.insert(key(r))).count()
}

/// Whether `got` is `expected` with some records left out, order kept; else where not.
fn subsequence(expected: &[Record], got: &[Record]) -> Result<(), String> {
    let mut from = 0;
    for (i, r) in got.iter().enumerate() {
        match expected[from..].iter().position(|e| e == r) {
            Some(at) => from += at + 1,
            None => {
                return Err(format!(
                    "packet {i} of {} ({r}) is not in the reference after position {from}",
                    got.len()
                ))
            }
        }
    }
    Ok(())
}

/// Whether the sensor's last word on its connection is that it has one: no line about
/// reconnecting at all, or a `reconnected` after the last `reconnecting`.
fn connected(sensor_log: &str) -> bool {
    sensor_log
        .lines()
        .rev()
        .find(|l| l.contains("reconnect"))
        .is_none_or(|l| l.contains("reconnected"))
}

/// The sensor's session figures (batches sent, acknowledged and sent again; reconnects).
fn session_line(sensor: &Proc) -> String {
    sensor.summary().map_or_else(
        |e| format!("(no summary: {e:#})"),
        |s| format!("batches {}, reconnects {}", s["batches"], s["reconnects"]),
    )
}

/// A veth pair from `a` to `b`, both ends up with the given /30 addresses.
fn veth(a: &Netns, a_dev: &str, a_addr: &str, b: &Netns, b_dev: &str, b_addr: &str) {
    run(
        "ip",
        &[
            "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev, "netns",
            &b.name,
        ],
    )
    .unwrap();
    for (ns, dev, addr) in [(a, a_dev, a_addr), (b, b_dev, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", dev]).unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
}

/// The state directory, the output both receivers write, and tcpdump's capture.
fn restart_paths(dir: &Scratch) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("state"),
        dir.join("capture.pcap"),
        dir.join("tcpdump.pcap"),
    )
}

/// SIGKILL of the receiver 3 s into a 9 s stream, the same command again 2 s later (same
/// port, state directory and file): the file holds exactly what tcpdump captured, each
/// packet once. The journal beside the file tells the restarted receiver which batches the
/// killed one wrote, so the resuming sensor's resent batches are not written again.
#[test]
fn receiver_killed_and_restarted_mid_stream_loses_nothing() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("kill9").unwrap();
    let (state, out, reference_file) = restart_paths(&dir);
    let out_arg = out.to_string_lossy().into_owned();
    let args = ["--out", out_arg.as_str()];
    let mut killed = Receiver::start(Some(&lab.cap), &state, 4433, &args).unwrap();
    let (mut sensor, tcpdump) = pcap_sensor_beside_tcpdump(&lab, &killed, "kill9", &reference_file);

    // 7907 frames (the corpus) at 900 per second: about 9 s.
    let started = Instant::now();
    let mut replay = start_replay(&lab, 900, 1);
    sleep(3.0);
    killed.proc.signal("KILL").unwrap();
    killed.proc.wait(Duration::from_secs(10)).unwrap();
    let killed_at = started.elapsed();
    // The killed receiver's file is readable up to its last write: a partial last record
    // is all SIGKILL may leave.
    let (one, cut_bytes) = complete_records(&out).unwrap();
    assert!(
        !one.is_empty() && one.len() < corpus::PACKETS,
        "the kill did not fall mid-stream: {} packets in the file",
        one.len()
    );
    sleep(2.0);
    let mut receiver = Receiver::start(Some(&lab.cap), &state, 4433, &args).unwrap();
    let restarted_at = started.elapsed();
    let reconnected = sensor.wait_for("reconnected", Duration::from_secs(90));
    let reconnected_at = started.elapsed();
    let expected = end_of_replay(&mut replay, tcpdump, &reference_file);
    stop_both(&mut sensor, &mut receiver);
    let (sensor_log, receiver_log) = (sensor.stderr(), receiver.proc.stderr());
    reconnected.unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{receiver_log}"));
    assert!(
        sensor_log.contains("reconnecting"),
        "the sensor never said it lost the receiver:\n{sensor_log}"
    );
    let logs = Logs {
        sensor: &sensor,
        receiver: &receiver.proc,
        extra: format!("first run wrote {} packets", one.len()),
    };
    // Exactly once: no packet lost, none twice, across the kill.
    let f = assert_delivered_once("kill -9", &expected, corpus::PACKETS, &out, iface, &logs);
    assert_eq!(
        f.dropped, 0,
        "the buffer holds 9 s of this stream:\n{sensor_log}"
    );
    // What the restarted receiver says it wrote comes after what the killed one left: the
    // file starts with the killed receiver's packets (less what the journal cut back, all
    // unacknowledged), and the rest is new.
    let got = tcpdump_records(&out, "").unwrap();
    let said = receiver_packets_of(&receiver.proc.summary().unwrap(), "kill9").unwrap() as usize;
    assert!(said > 0, "nothing new reached the restarted receiver");
    let kept = got.len() - said;
    assert!(
        kept <= one.len() && got[..kept] == one[..kept],
        "the restarted receiver's {said} packets are not what follows the killed one's {} \
         ({kept} kept)",
        one.len()
    );
    eprintln!(
        "receiver SIGKILL at {killed_at:.1?}, restarted at {restarted_at:.1?}, sensor \
         reconnected by {reconnected_at:.1?}: the killed receiver wrote {} packets (+{cut_bytes} \
         bytes of a partial record), {kept} kept, the restarted one {said}; {} = tcpdump's {}; \
         sensor: {}; {}",
        one.len(),
        got.len(),
        expected.len(),
        f.line,
        session_line(&sensor)
    );
}

/// The fault point between write and acknowledgement: a receiver that aborts right after
/// its Nth flush (N from 1 to 10), before acknowledging it, and is started again with the
/// same command. 20 runs of a short stream, each file exactly tcpdump's capture: nothing
/// lost, nothing twice.
#[test]
fn receiver_aborted_between_write_and_acknowledgement_writes_each_packet_once() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    for run in 0..20u32 {
        let flush = run % 10 + 1;
        let dir = Scratch::new(&format!("fault{run}")).unwrap();
        let (state, out, reference_file) = restart_paths(&dir);
        let out_arg = out.to_string_lossy().into_owned();
        let args = ["--out", out_arg.as_str()];
        let fault = format!("CAPSTREAM_FAULT=abort-after-flush:{flush}");
        // No core file from the abort.
        let wrapper = ["prlimit", "--core=0", "env", fault.as_str()];
        let mut aborting =
            Receiver::start_through(Some(&lab.cap), &wrapper, &state, 4433, &args).unwrap();
        let sensor_id = format!("fault{run}");
        let (mut sensor, tcpdump) =
            pcap_sensor_beside_tcpdump(&lab, &aborting, &sensor_id, &reference_file);
        // 7907 frames (the corpus) at 4000 per second: about 2 s, some 20 flushes.
        let mut replay = start_replay(&lab, 4000, 1);
        let status = aborting.proc.wait(Duration::from_secs(60)).unwrap();
        let aborted_log = aborting.proc.stderr();
        assert!(
            !status.success() && aborted_log.contains("aborting after flush"),
            "run {run}: the receiver did not stop at the fault point ({status}):\n{aborted_log}"
        );
        let mut receiver = Receiver::start(Some(&lab.cap), &state, 4433, &args).unwrap();
        let expected = end_of_replay(&mut replay, tcpdump, &reference_file);
        let reconnected = sensor.wait_for("reconnected", Duration::from_secs(60));
        stop_both(&mut sensor, &mut receiver);
        let receiver_log = receiver.proc.stderr();
        reconnected.unwrap_or_else(|e| panic!("run {run}: {e:#}\nreceiver:\n{receiver_log}"));
        let logs = Logs {
            sensor: &sensor,
            receiver: &receiver.proc,
            extra: format!("run {run}, abort after flush {flush}:\n{aborted_log}"),
        };
        let what = format!("run {run} (abort after flush {flush})");
        assert_delivered_once(&what, &expected, corpus::PACKETS, &out, iface, &logs);
        eprintln!("{what}: {} packets, each once", expected.len());
    }
}

/// The receiver in its own namespace behind a veth pair; the sensor's end goes down for
/// 10 s mid-stream and comes back: everything captured meanwhile is delivered after.
#[test]
fn ten_second_partition_delays_but_loses_nothing() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let far = Netns::new("csfar").unwrap();
    // 198.18.100.0/30: the sensor's side .1 in the capture namespace, the receiver .2.
    veth(
        &lab.cap,
        "uplink0",
        "198.18.100.1/30",
        &far,
        "downlink0",
        "198.18.100.2/30",
    );
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("partition").unwrap();
    let (out, reference_file) = (dir.join("capture.pcap"), dir.join("tcpdump.pcap"));
    let out_arg = out.to_string_lossy().into_owned();
    let mut receiver = Receiver::start_listening(
        Some(&far),
        &dir.join("state"),
        "198.18.100.2:4433",
        &["--out", &out_arg, "--cert-name", "198.18.100.2"],
    )
    .unwrap();
    let (mut sensor, tcpdump) =
        pcap_sensor_beside_tcpdump(&lab, &receiver, "partition", &reference_file);

    // Two passes at 1000 frames per second: about 16 s, the partition from 2.5 s to 12.5 s.
    let started = Instant::now();
    let mut replay = start_replay(&lab, 1000, 2);
    sleep(2.5);
    let written_before = complete_records(&out).map_or(0, |(r, _)| r.len());
    lab.cap
        .ip(&["link", "set", "dev", "uplink0", "down"])
        .unwrap();
    let down_at = started.elapsed();
    sleep(10.0);
    lab.cap
        .ip(&["link", "set", "dev", "uplink0", "up"])
        .unwrap();
    let up_at = started.elapsed();
    // Whether the connection outlived the partition or was replaced, the sensor must be
    // streaming again before it is stopped.
    let resumed = wait_until(Duration::from_secs(90), || connected(&sensor.stderr()));
    assert!(
        resumed,
        "the sensor did not reconnect within 90 s of the link coming back:\n{}\nreceiver:\n{}",
        sensor.stderr(),
        receiver.proc.stderr()
    );
    let resumed_at = started.elapsed();
    let expected = end_of_replay(&mut replay, tcpdump, &reference_file);
    stop_both(&mut sensor, &mut receiver);
    let sensor_log = sensor.stderr();

    let logs = Logs {
        sensor: &sensor,
        receiver: &receiver.proc,
        extra: String::new(),
    };
    let f = assert_delivered_once(
        "partition",
        &expected,
        2 * corpus::PACKETS,
        &out,
        iface,
        &logs,
    );
    assert_eq!(
        f.dropped, 0,
        "the buffer holds 10 s of this stream:\n{sensor_log}"
    );
    assert_receiver_wrote("partition", &receiver.proc, "partition", f.delivered);
    eprintln!(
        "link down at {down_at:.1?}, up at {up_at:.1?}, no reconnect pending at {resumed_at:.1?} \
         ({}); {written_before} packets written before the partition, {} in all = tcpdump's; \
         sensor: {}; {}",
        if sensor_log.contains("reconnected") {
            "the sensor reconnected"
        } else {
            "the connection outlived the partition"
        },
        f.delivered,
        f.line,
        session_line(&sensor)
    );
    let reconnects: Vec<&str> = sensor_log
        .lines()
        .filter(|l| l.contains("reconnect"))
        .collect();
    eprintln!("the sensor's reconnect lines:\n{}", reconnects.join("\n"));
}

/// Sensor and receiver talk through a relay that loses 5% of the datagrams each way and
/// holds back 5% by 5 ms so that later ones overtake them: QUIC recovers, nothing is lost
/// or doubled.
///
/// The relay runs in this test process, its sockets opened inside the capture namespace
/// (`setns` in a setup thread): sensor, relay and receiver all meet on that namespace's
/// 127.0.0.1 while the sensor captures on cap0, so the root namespace is left alone.
#[test]
fn lossy_reordering_path_loses_and_doubles_nothing() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("relay").unwrap();
    let reference_file = dir.join("tcpdump.pcap");
    let (mut receiver, out) = Receiver::writing(Some(&lab.cap), &dir, "capture.pcap", &[]).unwrap();
    let faults = Faults::lossy_reordering();
    let relay = Relay::start(
        Some(&lab.cap),
        "127.0.0.1:4434".parse().unwrap(),
        receiver.addr.parse().unwrap(),
        faults,
    )
    .unwrap();
    let args = ["--iface", iface, "--mode", "pcap", "--sensor-id", "relayed"];
    let mut sensor = start_sensor_to(Some(&lab.cap), "127.0.0.1:4434", &receiver, &args).unwrap();
    let tcpdump = start_tcpdump(&lab.cap, iface, "", &[], &reference_file).unwrap();

    // Two passes at 2000 frames per second: about 8 s.
    let mut replay = start_replay(&lab, 2000, 2);
    let expected = end_of_replay(&mut replay, tcpdump, &reference_file);
    stop_both(&mut sensor, &mut receiver);
    let stats = relay.stats();
    drop(relay);
    let sensor_log = sensor.stderr();

    // The faults really happened: datagrams lost and held back both ways, and overtaken
    // on the way to the receiver. (The acknowledgements coming back are too sparse for a
    // 5 ms hold to be overtaken every time.)
    for (way, d) in [
        ("to the receiver", stats.to_server),
        ("to the sensor", stats.to_client),
    ] {
        assert!(
            d.dropped > 0 && d.held_back > 0,
            "the relay lost or held back nothing {way} (seed {}): {stats}",
            faults.seed
        );
    }
    assert!(
        stats.to_server.reordered > 0,
        "no datagram to the receiver was overtaken (seed {}): {stats}",
        faults.seed
    );
    let logs = Logs {
        sensor: &sensor,
        receiver: &receiver.proc,
        extra: format!("relay (seed {}): {stats}", faults.seed),
    };
    let f = assert_delivered_once("relay", &expected, 2 * corpus::PACKETS, &out, iface, &logs);
    assert_eq!(f.dropped, 0, "{sensor_log}");
    assert_receiver_wrote("relay", &receiver.proc, "relayed", f.delivered);
    eprintln!(
        "relay (seed {}): {stats}; {} packets = tcpdump's; sensor: {}; {}",
        faults.seed,
        f.delivered,
        f.line,
        session_line(&sensor)
    );
}

/// SIGTERM to a sensor 1 s into a 40000-frame burst at 20000 per second: it stops
/// capturing, delivers all it holds, says goodbye and exits 0. What it matched is written
/// or counted, and the output is the start of tcpdump's capture.
#[test]
fn sensor_sigterm_under_load_delivers_what_it_matched() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("sigterm").unwrap();
    let reference_file = dir.join("tcpdump.pcap");
    let (mut receiver, out) = Receiver::writing(Some(&lab.cap), &dir, "capture.pcap", &[]).unwrap();
    // The default mode (tc where the kernel allows, else pcap): both stamp as tcpdump does.
    let args = ["--iface", iface, "--sensor-id", "sigterm"];
    let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
    let tcpdump = start_tcpdump(&lab.cap, iface, "", &[], &reference_file).unwrap();

    let mut replay = start_replay(&lab, 20_000, 5);
    sleep(1.0);
    let stop_started = Instant::now();
    sensor
        .stop()
        .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", receiver.proc.stderr()));
    let stop_took = stop_started.elapsed();
    let expected = end_of_replay(&mut replay, tcpdump, &reference_file);
    receiver.stop().unwrap();
    let sensor_log = sensor.stderr();

    let got = tcpdump_records(&out, "").unwrap();
    let f = assert_identity("SIGTERM", &sensor, iface, got.len() as u64);
    assert_receiver_wrote("SIGTERM", &receiver.proc, "sigterm", got.len() as u64);
    assert_eq!(
        expected.len(),
        5 * corpus::PACKETS,
        "tcpdump saw the whole replay"
    );
    assert!(
        f.matched > 0 && (f.matched as usize) < expected.len(),
        "SIGTERM did not fall while frames were flowing: matched {} of {}",
        f.matched,
        expected.len()
    );
    assert_eq!(duplicates(&got), 0, "packets written twice");
    let before_matching = dropped_before_matching(&f);
    if before_matching == 0 {
        // Nothing lost on the way in: the output is exactly the first frames tcpdump saw.
        if let Err(difference) = compare_captures(&expected[..got.len()], &got, 0) {
            panic!("output != the start of tcpdump's capture: {difference}\n{sensor_log}");
        }
    } else if let Err(difference) = subsequence(&expected, &got) {
        panic!(
            "output is not tcpdump's capture less the kernel's drops: {difference}\n{sensor_log}"
        );
    }
    eprintln!(
        "SIGTERM after 1 s of 20000 frames/s: exit 0 after {stop_took:.1?}; {} packets \
         written of {} replayed; sensor: {}",
        got.len(),
        expected.len(),
        f.line
    );
}

/// The receiver's output on an 8 MiB tmpfs with 1 MiB free, for a 1.7 MB stream: it
/// reports the lack of space, stops acknowledging while the sensor holds the rest, and
/// when space returns writes it all. The file is then exactly tcpdump's capture, readable
/// by tcpdump and tshark.
#[test]
fn receiver_disk_full_holds_then_resumes_without_loss() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("diskfull").unwrap();
    let reference_file = dir.join("tcpdump.pcap");
    let disk = Tmpfs::mount("diskfull", 8 << 20).unwrap();
    let ballast = disk.fill_leaving(1 << 20).unwrap();
    let free_before = disk.available().unwrap();
    let out = disk.join("capture.pcap");
    let out_arg = out.to_string_lossy().into_owned();
    let mut receiver = Receiver::start(
        Some(&lab.cap),
        &dir.join("state"),
        4433,
        &["--out", &out_arg],
    )
    .unwrap();
    let (mut sensor, tcpdump) =
        pcap_sensor_beside_tcpdump(&lab, &receiver, "diskfull", &reference_file);

    let started = Instant::now();
    let mut replay = start_replay(&lab, 4000, 1);
    // The test watches the disk itself, so that a receiver that fails to say why it
    // stopped writing still shows, below, whether it resumed without loss.
    let full = wait_until(Duration::from_secs(60), || {
        disk.available().is_ok_and(|free| free < 256 << 10)
    });
    assert!(
        full,
        "the disk never filled ({} bytes free):\n{}",
        disk.available().unwrap(),
        receiver.proc.stderr()
    );
    let full_at = started.elapsed();
    // Full for a while: the receiver must notice and say so; the sensor holds what the
    // receiver cannot write.
    sleep(3.0);
    let no_space = |log: &str| log.to_lowercase().contains("no space");
    let reported = wait_until(Duration::from_secs(10), || {
        no_space(&receiver.proc.stderr())
    });
    let written_while_full = complete_records(&out).map_or(0, |(r, _)| r.len());
    std::fs::remove_file(&ballast).unwrap();
    let freed_at = started.elapsed();
    let expected = end_of_replay(&mut replay, tcpdump, &reference_file);
    // Give the receiver time to catch up before the sensor is asked to leave.
    let caught_up = wait_until(Duration::from_secs(60), || {
        complete_records(&out).is_ok_and(|(r, _)| r.len() >= expected.len())
    });
    let caught_up_at = started.elapsed();
    sensor
        .stop()
        .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", receiver.proc.stderr()));
    receiver.stop().unwrap();
    let (sensor_log, receiver_log) = (sensor.stderr(), receiver.proc.stderr());

    assert_eq!(
        expected.len(),
        corpus::PACKETS,
        "tcpdump saw the whole replay"
    );
    assert!(
        written_while_full < expected.len(),
        "the disk never filled: {written_while_full} packets written with the ballast in place"
    );
    let got = tcpdump_records(&out, "").unwrap_or_else(|e| {
        panic!("tcpdump cannot read the output: {e:#}\nreceiver:\n{receiver_log}")
    });
    assert_eq!(duplicates(&got), 0, "packets written twice");
    if let Err(difference) = compare_captures(&expected, &got, 0) {
        panic!(
            "output != tcpdump after the disk filled up (caught up: {caught_up}): \
             {difference}\nsensor:\n{sensor_log}\nreceiver:\n{receiver_log}"
        );
    }
    assert_eq!(
        tshark_count(&out).unwrap(),
        got.len(),
        "tshark reads every packet"
    );
    let f = assert_identity("disk full", &sensor, iface, got.len() as u64);
    assert_eq!(
        f.dropped, 0,
        "the sensor's buffer holds the whole stream:\n{sensor_log}"
    );
    assert_receiver_wrote("disk full", &receiver.proc, "diskfull", got.len() as u64);
    let error_line = receiver_log
        .lines()
        .find(|l| no_space(l))
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        reported,
        "everything was written in the end, but the receiver did not say the disk was full \
         (\"No space left\") while it was:\n{receiver_log}"
    );
    eprintln!(
        "{free_before} bytes free; disk full at {full_at:.1?}, the receiver said {error_line:?} \
         with {written_while_full} packets written; ballast removed at {freed_at:.1?}; all \
         {} packets written by {caught_up_at:.1?} = tcpdump's; sensor: {}",
        got.len(),
        f.line
    );
}

/// 50 sensors on one interface streaming into one receiver for about 60 s: every sensor's
/// packets are all there, in its own pcapng interface, equal to tcpdump's capture less its
/// counted drops; and the receiver's memory stays bounded.
#[test]
fn fifty_sensors_for_a_minute_with_bounded_receiver_memory() {
    require_root();
    const SENSORS: usize = 50;
    const PPS: u32 = 400;
    const LOOPS: u32 = 3;
    // The receiver keeps up at 50 x 400 frames/s, so it should hold little: per sensor,
    // the reorder window (1 s x 400 x 211 B, 84 KB), a batch being decoded (256 KiB at
    // most by default), the QUIC connection and its stream window (quinn's default
    // 1.25 MB): 50 x 1.6 MB = 80 MB even with every window full, plus the runtime. 192 MiB
    // leaves room for allocator slack yet is below the 250 MB of packet data streamed: a
    // receiver that kept what it wrote, or whose buffers grew with time, fails.
    const RSS_BOUND_KIB: u64 = 192 * 1024;

    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("fifty").unwrap();
    let reference_file = dir.join("tcpdump.pcap");
    let (mut receiver, out) =
        Receiver::writing(Some(&lab.cap), &dir, "capture.pcapng", &[]).unwrap();
    let ids: Vec<String> = (0..SENSORS).map(|i| format!("fleet-{i:02}")).collect();
    let started = Instant::now();
    let mut sensors: Vec<Proc> = ids
        .iter()
        .map(|id| {
            let args = ["--iface", iface, "--mode", "pcap", "--sensor-id", id];
            start_sensor(Some(&lab.cap), &receiver, &args)
                .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", receiver.proc.stderr()))
        })
        .collect();
    let all_ready = started.elapsed();
    let tcpdump = start_tcpdump(&lab.cap, iface, "", &[], &reference_file).unwrap();

    let streaming = Instant::now();
    let mut replay = start_replay(&lab, PPS, LOOPS);
    finish_replay(&mut replay);
    settle();
    let streamed = streaming.elapsed();
    let expected = stop_reference(tcpdump, &reference_file);
    for s in &sensors {
        s.signal("TERM").unwrap();
    }
    for s in &mut sensors {
        let status = s.wait(Duration::from_secs(60)).unwrap();
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            s.name,
            s.stderr()
        );
    }
    let peak_kib = peak_rss_kib(receiver.proc.pid()).unwrap();
    receiver.stop().unwrap();
    let receiver_log = receiver.proc.stderr();

    assert_eq!(
        expected.len(),
        LOOPS as usize * corpus::PACKETS,
        "tcpdump saw the replay"
    );
    let sessions = receiver_sessions(&receiver.proc.summary().unwrap());
    let mut session_ids: Vec<&str> = sessions.iter().map(|s| s.sensor_id.as_str()).collect();
    session_ids.sort_unstable();
    session_ids.dedup();
    assert_eq!(
        session_ids.len(),
        SENSORS,
        "every sensor has a session in the receiver's summary:\n{receiver_log}"
    );

    // The file as a whole reads with tcpdump; each sensor's packets sit in its own
    // interface, described `sensor <id> on <host> (<os>)`.
    let total = tcpdump_records(&out, "").unwrap().len();
    let interfaces = pcapng_interfaces(&out).unwrap();
    assert_eq!(
        interfaces.iter().map(|i| i.records.len()).sum::<usize>(),
        total,
        "the pcapng reader and tcpdump disagree on the file"
    );
    let mut delivered_total = 0;
    let mut dropped_total = 0;
    let mut failures = Vec::new();
    for (id, sensor) in ids.iter().zip(&sensors) {
        let what = format!("sensor {id}");
        let needle = format!("sensor {id} on ");
        let got: Vec<Record> = interfaces
            .iter()
            .filter(|i| i.description.starts_with(&needle))
            .flat_map(|i| i.records.iter().cloned())
            .collect();
        let f = assert_identity(&what, sensor, iface, got.len() as u64);
        assert_receiver_wrote(&what, &receiver.proc, id, got.len() as u64);
        // Every frame tcpdump saw is, for this sensor, written or counted as dropped.
        let accounted = f.delivered + f.dropped;
        if accounted != expected.len() as u64 {
            failures.push(format!(
                "{what}: {accounted} frames delivered or dropped, tcpdump saw {}: {}",
                expected.len(),
                f.line
            ));
        }
        let check = if f.dropped == 0 {
            compare_captures(&expected, &got, 0).map(drop)
        } else {
            subsequence(&expected, &got)
        };
        if let Err(difference) = check {
            failures.push(format!("{what}: output vs tcpdump: {difference}"));
        }
        if duplicates(&got) != 0 {
            failures.push(format!(
                "{what}: {} packets written twice",
                duplicates(&got)
            ));
        }
        delivered_total += f.delivered;
        dropped_total += f.dropped;
    }
    assert!(
        failures.is_empty(),
        "{}\nreceiver:\n{receiver_log}",
        failures.join("\n")
    );
    assert_eq!(
        delivered_total, total as u64,
        "the file holds the sensors' packets, no others"
    );
    assert!(
        peak_kib <= RSS_BOUND_KIB,
        "the receiver's peak RSS {peak_kib} KiB exceeds {RSS_BOUND_KIB} KiB"
    );
    eprintln!(
        "{SENSORS} sensors ready after {all_ready:.1?}, {streamed:.1?} of traffic: {} frames \
         each, {total} packets written ({delivered_total} delivered, {dropped_total} counted \
         dropped); receiver peak RSS {} MiB (bound {} MiB)",
        expected.len(),
        peak_kib / 1024,
        RSS_BOUND_KIB / 1024
    );
}
