//! Fan-in: 1, 8 and 32 sensors at once (`sensor --read`) into one receiver on the loopback
//! of a namespace of its own: aggregate MB/s of packet data written, the receiver's CPU
//! seconds and peak RSS, and whether the merged file is time-ordered and complete.
//!
//! The data is the same at every sensor count: the shared corpus looped to about
//! [`TARGET_BYTES`] of packet data, dealt round-robin. Packet `j` goes to sensor `j mod N`
//! with timestamp `T0 + j µs`, so every sensor's timestamps interleave with every other's
//! and the merged file must be exactly the looped corpus, in order.
//!
//! Each sensor reads a FIFO. The bench writes every file's pcap header, waits until the
//! receiver says every sensor joined, then writes all the packets at once. File replays
//! start in the past: a sensor joining after others had streamed for a while would bring
//! packets older than some already written, which no receiver could put in order, and the
//! figure would measure start-up rather than the merge.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::capstream::{Receiver, Scratch};
use testbed::Netns;

use super::pipeline::path_arg;
use super::streaming::{corpus_frames, read_corpus, sensor_reading, TARGET_BYTES};
use super::{children_cpu, median, usage};

/// Sensors at once.
const SENSOR_COUNTS: [usize; 3] = [1, 8, 32];
/// The first packet's timestamp, in nanoseconds.
const T0_NS: u64 = 1_700_000_000 * 1_000_000_000;
/// Target: N sensors reach at least this share of the aggregate MB/s of one.
const THROUGHPUT_SHARE: f64 = 0.8;
/// Target: the receiver's peak RSS with the most sensors.
const RECEIVER_RSS_MIB: f64 = 256.0;
/// Longest the sensors may take to join the receiver.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// One run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    seconds: f64,
    receiver_cpu: f64,
    sensors_cpu: f64,
    receiver_rss_kib: u64,
    check: Check,
    /// From the receiver's summary: packets written after newer ones, and packets written
    /// before the merge rules allowed because held data passed its memory bound.
    late: u64,
    forced: u64,
    waits: Waits,
}

/// Where the run waited, from the sensors' and the receiver's logs (ms, means per sensor).
#[derive(Debug, Clone, Copy, Default)]
struct Waits {
    /// Sensor: a batch ready, no room on the QUIC stream.
    stream: f64,
    /// Sensor: its buffer full of unacknowledged batches.
    acks: f64,
    /// Sensor: the last acknowledgements, everything sent.
    last_acks: f64,
    /// Sensor: nothing to send (reading its input).
    capture: f64,
    /// Receiver: a batch from arrival to written (then acknowledged), mean and longest.
    merge_mean: f64,
    merge_longest: f64,
    /// Receiver: a connection's reading blocked on the writer's queue.
    queue: f64,
    /// Sensor: before its first batch (joined, waiting for the bench's start).
    first_batch: f64,
    /// Sensor: closing its QUIC endpoint (waiting for the connection to drain).
    close: f64,
    /// Sensor: QUIC datagrams lost and congestion events (means per sensor).
    lost: f64,
    congestion: f64,
}

impl Waits {
    fn of(sensor_logs: &[String], receiver_log: &str) -> Self {
        let n = sensor_logs.len().max(1) as f64;
        let sensors = |label: &str| {
            sensor_logs
                .iter()
                .map(|log| sum_before(log, label))
                .sum::<u64>() as f64
                / n
        };
        let receiver = |label: &str| sum_before(receiver_log, label) as f64 / n;
        Self {
            stream: sensors(" ms for room on the stream"),
            acks: sensors(" ms for acknowledgements with the buffer full"),
            last_acks: sensors(" ms for the last acknowledgements"),
            capture: sensors(" ms for captured batches"),
            merge_mean: receiver(" ms on average"),
            merge_longest: receiver(" ms at most"),
            queue: receiver(" ms for the writer's queue"),
            first_batch: sensors(" ms before the first"),
            close: sensors(" ms closing the QUIC endpoint"),
            lost: sensors(" datagrams lost of"),
            congestion: sensors(" congestion events"),
        }
    }
}

/// What the merged file holds against what the sensors sent.
#[derive(Debug, Clone, Copy, Default)]
struct Check {
    written: u64,
    /// Records whose timestamp is older than the record before.
    backwards: u64,
    /// Records that are not one of the packets sent (wrong time, bytes or a duplicate).
    wrong: u64,
    missing: u64,
}

impl Check {
    fn complete(&self) -> bool {
        self.wrong == 0 && self.missing == 0
    }
}

/// The looped corpus: its link type and packets, in the order of their timestamps.
struct Packets<'a> {
    link_type: u32,
    corpus: Vec<&'a [u8]>,
    count: u64,
    bytes: u64,
}

impl Packets<'_> {
    fn frame(&self, j: u64) -> &[u8] {
        self.corpus[(j % self.corpus.len() as u64) as usize]
    }

    /// Sensor `i`'s pcap file of `n`: its pcap header and its share of the packets.
    fn file_of(&self, i: usize, n: usize) -> Result<Vec<u8>> {
        let mut file = Vec::with_capacity((self.bytes / n as u64 + self.count) as usize);
        file.extend_from_slice(&super::pcap_header(262_144, self.link_type));
        for j in (i as u64..self.count).step_by(n) {
            let frame = self.frame(j);
            let micros = T0_NS / 1000 + j;
            let len = u32::try_from(frame.len())?;
            for word in [
                u32::try_from(micros / 1_000_000)?,
                (micros % 1_000_000) as u32,
                len,
                len,
            ] {
                file.extend_from_slice(&word.to_le_bytes());
            }
            file.extend_from_slice(frame);
        }
        Ok(file)
    }
}

pub fn run(out_dir: &Path, rounds: usize, ticks: f64) -> Result<()> {
    let corpus_path = testbed::corpus_dir().join("tcpdump-tests.pcap");
    let bytes = read_corpus(&corpus_path)?;
    let (link_type, corpus) = corpus_frames(&bytes, &corpus_path)?;
    let mut packets = Packets {
        link_type,
        corpus,
        count: 0,
        bytes: 0,
    };
    while packets.bytes < TARGET_BYTES {
        packets.bytes += packets.frame(packets.count).len() as u64;
        packets.count += 1;
    }
    let files: Vec<Vec<Arc<Vec<u8>>>> = SENSOR_COUNTS
        .iter()
        .map(|&n| {
            (0..n)
                .map(|i| packets.file_of(i, n).map(Arc::new))
                .collect()
        })
        .collect::<Result<_>>()?;
    let ns = Netns::new("csfanin")?;
    // The waits the sensors and the receiver report (debug), for the table of where the
    // time went.
    std::env::set_var(
        "RUST_LOG",
        "info,sensor::delivery=debug,sensor::transport=debug,receiver::writer=debug,\
         receiver::connection=debug",
    );

    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); SENSOR_COUNTS.len()];
    for round in 1..=rounds {
        for (k, n) in SENSOR_COUNTS.iter().enumerate() {
            eprintln!("xtask: fan-in, round {round}/{rounds}: {n} sensor(s)");
            let run = fan_in(&ns, &files[k], &packets, ticks)
                .with_context(|| format!("fan-in of {n} sensor(s)"))?;
            runs[k].push(run);
        }
    }

    std::env::remove_var("RUST_LOG");
    println!("{}", table(&runs, &packets, rounds));
    let json = out_dir.join("fanin.json");
    std::fs::write(&json, to_json(&runs, &packets))?;
    eprintln!("xtask: every fan-in run in {}", json.display());
    Ok(())
}

/// One run: `files.len()` sensors, one file each, into one receiver.
fn fan_in(ns: &Netns, files: &[Arc<Vec<u8>>], packets: &Packets, ticks: f64) -> Result<Run> {
    let dir = Scratch::new("bench-fanin")?;
    let (mut receiver, out) = Receiver::writing(Some(ns), &dir, "out.pcap", &[])?;
    let gate = Arc::new(Barrier::new(files.len() + 1));
    let mut sensors = Sensors(Vec::new());
    let mut writers = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let fifo = dir.join(&format!("sensor-{i}.pcap"));
        testbed::run("mkfifo", &[&path_arg(&fifo)])?;
        let log = dir.join(&format!("sensor-{i}.log"));
        let id = format!("fanin-{i}");
        let mut cmd = sensor_reading(ns, &fifo, &receiver, &log, &["--sensor-id", &id])?;
        sensors
            .0
            .push((cmd.spawn().context("cannot start a sensor")?, log));
        let (file, gate) = (Arc::clone(file), Arc::clone(&gate));
        writers.push(std::thread::spawn(move || feed(&fifo, &file, &gate)));
    }
    wait_joined(&receiver, &mut sensors, files.len())?;

    let (receiver_before, _) = usage(receiver.proc.pid(), ticks)?;
    let cpu_before = children_cpu(ticks)?;
    let started = Instant::now();
    gate.wait();
    for (child, log) in &mut sensors.0 {
        super::pipeline::wait_ok(child, "sensor", log)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let sensor_logs: Vec<String> = sensors
        .0
        .iter()
        .map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default())
        .collect();
    let sensors_cpu = children_cpu(ticks)? - cpu_before;
    let (receiver_after, receiver_rss_kib) = usage(receiver.proc.pid(), ticks)?;
    for writer in writers {
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("a FIFO writer panicked"))??;
    }
    receiver.stop()?;
    let log = receiver.proc.stderr();
    Ok(Run {
        seconds,
        receiver_cpu: receiver_after - receiver_before,
        sensors_cpu,
        receiver_rss_kib,
        check: check_merged(&out, packets)?,
        late: sum_before(&log, " written late"),
        forced: sum_before(&log, " forced out"),
        waits: Waits::of(&sensor_logs, &log),
    })
}

/// The sensors of a run with their logs; any still running when dropped (after a failure)
/// are killed.
struct Sensors(Vec<(Child, PathBuf)>);

impl Drop for Sensors {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Writes `file` into the FIFO at `path`: the pcap header, then, once every writer and the
/// bench have met at `gate`, the packets.
fn feed(path: &Path, file: &[u8], gate: &Barrier) -> Result<()> {
    // Opening blocks until the sensor opens its end.
    let mut fifo = File::options()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // A 1 MiB pipe instead of 64 KiB: fewer wake-ups. Failing leaves the default, which
    // only costs some speed.
    // SAFETY: fcntl on a descriptor this function owns, with an integer argument.
    unsafe { libc::fcntl(fifo.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    fifo.write_all(&file[..24])?;
    gate.wait();
    fifo.write_all(&file[24..])?;
    Ok(())
}

/// Waits until the receiver's log says `n` sensors joined; fails if a sensor exits first
/// or [`JOIN_TIMEOUT`] passes.
fn wait_joined(receiver: &Receiver, sensors: &mut Sensors, n: usize) -> Result<()> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        let log = receiver.proc.stderr();
        let joined = log.matches(": joined with ").count();
        if joined >= n {
            return Ok(());
        }
        for (child, path) in &mut sensors.0 {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "a sensor exited ({status}) before the start: {}",
                    std::fs::read_to_string(path).unwrap_or_default().trim()
                );
            }
        }
        if Instant::now() >= deadline {
            bail!("{joined} of {n} sensors joined within {JOIN_TIMEOUT:?}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the receiver's output (classic pcap, nanosecond or microsecond) and compares it
/// with the packets sent: every packet is identified by its timestamp.
fn check_merged(out: &Path, packets: &Packets) -> Result<Check> {
    let bytes = std::fs::read(out).with_context(|| format!("cannot read {}", out.display()))?;
    let per_unit = match bytes.get(..4) {
        Some([0x4d, 0x3c, 0xb2, 0xa1]) => 1,
        Some([0xd4, 0xc3, 0xb2, 0xa1]) => 1000,
        _ => bail!("{} is not a little-endian classic pcap", out.display()),
    };
    let word = |at: usize| u64::from(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()));
    let mut seen = vec![false; packets.count as usize];
    let mut check = Check::default();
    let mut previous = 0;
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let ts = word(at) * 1_000_000_000 + word(at + 4) * per_unit;
        let captured = word(at + 8) as usize;
        let data = bytes
            .get(at + 16..at + 16 + captured)
            .context("truncated record in the output")?;
        check.written += 1;
        check.backwards += u64::from(ts < previous);
        previous = ts;
        let offset = ts.wrapping_sub(T0_NS);
        let j = offset / 1000;
        let known = offset % 1000 == 0
            && j < packets.count
            && !seen[j as usize]
            && data == packets.frame(j);
        if known {
            seen[j as usize] = true;
        } else {
            check.wrong += 1;
        }
        at += 16 + captured;
    }
    check.missing = seen.iter().filter(|s| !**s).count() as u64;
    Ok(check)
}

/// The sum of the numbers just before `label` on every line of `log` (the receiver's
/// summary says "..., 12 written late ...").
fn sum_before(log: &str, label: &str) -> u64 {
    log.lines()
        .filter_map(|line| {
            let (before, _) = line.split_once(label)?;
            before.rsplit([' ', ',']).next()?.parse::<u64>().ok()
        })
        .sum()
}

fn table(runs: &[Vec<Run>], packets: &Packets, rounds: usize) -> String {
    let mut out = String::new();
    let mb = packets.bytes as f64 / 1e6;
    let _ = writeln!(
        out,
        "\nFan-in: {} packets, {mb:.0} MB of packet data split across N sensors (sensor --read) \
         into one receiver, median of {rounds} interleaved rounds\n",
        packets.count
    );
    let _ = writeln!(
        out,
        "| sensors | seconds | aggregate MB/s | receiver CPU s | sensors CPU s | receiver peak RSS MiB | written | time-ordered | complete |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut rates = Vec::new();
    for (n, runs) in SENSOR_COUNTS.iter().zip(runs) {
        let pick = |f: &dyn Fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let rate = pick(&|r| mb / r.seconds);
        rates.push(rate);
        let backwards: u64 = runs.iter().map(|r| r.check.backwards).sum();
        let late: u64 = runs.iter().map(|r| r.late).sum();
        let ordered = if backwards == 0 {
            "yes".to_string()
        } else {
            format!(
                "no: {backwards} steps back, {late} late in {} runs",
                runs.len()
            )
        };
        let incomplete = runs.iter().filter(|r| !r.check.complete()).count();
        let complete = if incomplete == 0 {
            "yes".to_string()
        } else {
            format!("no, in {incomplete} of {} runs", runs.len())
        };
        let _ = writeln!(
            out,
            "| {n} | {:.2} | {rate:.0} | {:.2} | {:.2} | {:.1} | {:.0} | {ordered} | {complete} |",
            pick(&|r| r.seconds),
            pick(&|r| r.receiver_cpu),
            pick(&|r| r.sensors_cpu),
            pick(&|r| r.receiver_rss_kib as f64) / 1024.0,
            pick(&|r| r.check.written as f64),
        );
    }
    let _ = writeln!(
        out,
        "\nWhere the time went (ms, means per sensor; medians of the rounds): the sensor's \
         delivery loop waiting for room on the QUIC stream, for acknowledgements with its \
         buffer full, for the last acknowledgements, for its input; the receiver holding a \
         batch in the merge (arrival to written, mean and longest), a connection waiting for \
         the writer's queue; the sensor closing its QUIC endpoint at exit; its QUIC datagrams lost and congestion \
         events (counts)\n\n\
         | sensors | before first batch | stream room | acks (buffer full) | last acks | input | merge hold mean | merge hold longest | writer queue | closing | datagrams lost | congestion events |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (n, runs) in SENSOR_COUNTS.iter().zip(runs) {
        let pick = |f: &dyn Fn(&Waits) -> f64| {
            median(&mut runs.iter().map(|r| f(&r.waits)).collect::<Vec<_>>())
        };
        let _ = writeln!(
            out,
            "| {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            pick(&|w| w.first_batch),
            pick(&|w| w.stream),
            pick(&|w| w.acks),
            pick(&|w| w.last_acks),
            pick(&|w| w.capture),
            pick(&|w| w.merge_mean),
            pick(&|w| w.merge_longest),
            pick(&|w| w.queue),
            pick(&|w| w.close),
            pick(&|w| w.lost),
            pick(&|w| w.congestion),
        );
    }
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let (one, most) = (rates[0], rates[rates.len() - 1]);
    let share = most / one;
    let _ = writeln!(
        out,
        "\n- {} sensors: {most:.0} MB/s, {share:.2}x of 1 sensor's {one:.0} MB/s (target {THROUGHPUT_SHARE}x: {})",
        SENSOR_COUNTS[SENSOR_COUNTS.len() - 1],
        verdict(share >= THROUGHPUT_SHARE)
    );
    let peak = runs[runs.len() - 1]
        .iter()
        .map(|r| r.receiver_rss_kib)
        .max()
        .unwrap_or(0) as f64
        / 1024.0;
    let _ = writeln!(
        out,
        "- receiver peak RSS with {} sensors, highest of the rounds: {peak:.1} MiB (target at most {RECEIVER_RSS_MIB} MiB: {})",
        SENSOR_COUNTS[SENSOR_COUNTS.len() - 1],
        verdict(peak <= RECEIVER_RSS_MIB)
    );
    let all = runs.iter().flatten();
    let ordered = all.clone().all(|r| r.check.backwards == 0);
    let complete = all.clone().all(|r| r.check.complete());
    let _ = writeln!(
        out,
        "- every merged file time-ordered: {}; complete: {}",
        verdict(ordered),
        verdict(complete)
    );
    out
}

fn to_json(runs: &[Vec<Run>], packets: &Packets) -> String {
    super::json_array(SENSOR_COUNTS.iter().zip(runs).flat_map(|(n, runs)| {
        runs.iter().map(move |r| {
            serde_json::json!({
                "sensors": n,
                "packets": packets.count,
                "packet_bytes": packets.bytes,
                "seconds": super::milli(r.seconds),
                "mb_per_s": (packets.bytes as f64 / 1e5 / r.seconds).round() / 10.0,
                "receiver_cpu_s": super::milli(r.receiver_cpu),
                "sensors_cpu_s": super::milli(r.sensors_cpu),
                "receiver_peak_rss_kib": r.receiver_rss_kib,
                "written": r.check.written,
                "steps_back": r.check.backwards,
                "wrong": r.check.wrong,
                "missing": r.check.missing,
                "late": r.late,
                "forced": r.forced,
            })
        })
    }))
}
