//! Streaming: `sensor --read BIG.pcap` into a receiver on loopback writing a file, the same
//! into a receiver producing to Kafka (a tansu broker in memory, `--kafka`), against the
//! same file through `tcpdump -r BIG.pcap -U -w - | socat OPENSSL` into
//! `socat OPENSSL-LISTEN > out`.
//!
//! Two files of about [`TARGET_BYTES`] of packet data: the shared corpus looped (realistic
//! traffic), and Ethernet/IPv4/UDP frames of 1500 bytes with random payloads
//! (incompressible). Contestants alternate within each round; figures are medians.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use testbed::capstream::{summary_figure, Receiver, Scratch};
use testbed::kafka::Tansu;
use testbed::{Netns, SummaryFile};

use super::pipeline::{command_in, path_arg, start_tunnel, start_writer, wait_ok, TlsPair};
use super::{children_cpu, count_records, median, usage};

/// Packet data per file (captured bytes, without pcap headers).
pub(super) const TARGET_BYTES: u64 = 200_000_000;
const RANDOM_FRAME: usize = 1500;

#[derive(Clone, Copy, PartialEq)]
enum Who {
    Sensor,
    SensorKafka,
    Pipeline,
}

impl Who {
    const ALL: [Self; 3] = [Self::Sensor, Self::SensorKafka, Self::Pipeline];

    fn name(self) -> &'static str {
        match self {
            Self::Sensor => "sensor --read | receiver",
            Self::SensorKafka => "sensor --read | receiver --kafka",
            Self::Pipeline => "tcpdump -r | socat TLS -> socat > file",
        }
    }
}

/// The Kafka topic of the Kafka runs, on a broker started for each run (it keeps
/// everything in memory).
const KAFKA_TOPIC: &str = "bench";
const KAFKA_PORT: u16 = 9092;

/// One input file.
pub(super) struct Traffic {
    pub(super) label: &'static str,
    pub(super) path: PathBuf,
    pub(super) packets: u64,
    pub(super) bytes: u64,
}

/// One run's figures.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Run {
    written: u64,
    pub(super) seconds: f64,
    /// Raw batch bytes over wire bytes, from the sensor's summary; 1 for the pipeline.
    ratio: f64,
    /// CPU seconds of the sending side (sensor; tcpdump and socat) and of the writer.
    sender_cpu: f64,
    pub(super) writer_cpu: f64,
    writer_rss_kib: u64,
}

pub fn run(out_dir: &Path, rounds: usize, ticks: f64) -> Result<()> {
    let corpus = testbed::corpus_dir().join("tcpdump-tests.pcap");
    let files_dir = out_dir.join("streaming");
    std::fs::create_dir_all(&files_dir)?;
    let traffic = [
        loop_corpus(&corpus, &files_dir.join("corpus-looped.pcap"))?,
        random_frames(&files_dir.join("random-payload.pcap"))?,
    ];
    let ns = Netns::new("csbench")?;
    let scratch = Scratch::new("bench-stream")?;
    let tls = TlsPair::create(Some(&ns), &scratch)?;

    let mut results: Vec<(&Traffic, Who, Vec<Run>)> = Vec::new();
    for t in &traffic {
        let mut runs = [Vec::new(), Vec::new(), Vec::new()];
        for round in 1..=rounds {
            for (i, who) in Who::ALL.into_iter().enumerate() {
                eprintln!(
                    "xtask: streaming {}, round {round}/{rounds}: {}",
                    t.label,
                    who.name()
                );
                let run = match who {
                    Who::Sensor => sensor_run(&ns, t, ticks),
                    Who::SensorKafka => sensor_kafka_run(&ns, t, ticks),
                    Who::Pipeline => pipeline_run(&ns, &tls, t, ticks),
                }
                .with_context(|| format!("{} on {}", who.name(), t.label))?;
                if run.written != t.packets {
                    bail!(
                        "{} wrote {} of {} packets of {}",
                        who.name(),
                        run.written,
                        t.packets,
                        t.label
                    );
                }
                runs[i].push(run);
            }
        }
        for (who, runs) in Who::ALL.into_iter().zip(runs) {
            results.push((t, who, runs));
        }
    }
    for t in &traffic {
        let _ = std::fs::remove_file(&t.path);
    }
    let _ = std::fs::remove_dir(&files_dir);

    println!("{}", table(&results, rounds));
    let json = out_dir.join("streaming.json");
    std::fs::write(&json, to_json(&results))?;
    eprintln!("xtask: every streaming run in {}", json.display());
    Ok(())
}

/// `sensor --read INPUT` in `ns`, streaming to `receiver`, with `extra` flags; its stderr
/// goes to `log`.
pub(super) fn sensor_reading(
    ns: &Netns,
    input: &Path,
    receiver: &Receiver,
    log: &Path,
    extra: &[&str],
) -> Result<Command> {
    let (input, cert) = (path_arg(input), path_arg(&receiver.cert));
    let mut cmd = command_in(
        Some(ns),
        &testbed::workspace_bin("sensor").to_string_lossy(),
    );
    cmd.args([
        "--read",
        input.as_str(),
        "--receiver",
        receiver.addr.as_str(),
        "--ca",
        cert.as_str(),
    ])
    .args(receiver.credentials(extra, None)?)
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(File::create(log)?);
    Ok(cmd)
}

/// The sensor reads `t` and streams it to a receiver writing a pcap file; the time runs
/// from the sensor's start to its exit, which waits for the receiver to acknowledge (have
/// written) every batch.
fn sensor_run(ns: &Netns, t: &Traffic, ticks: f64) -> Result<Run> {
    let dir = Scratch::new("bench-stream-run")?;
    let (receiver, out) = Receiver::writing(Some(ns), &dir, "out.pcap", &[])?;
    let mut run = timed_sensor(ns, t, ticks, &dir, receiver)?.0;
    run.written = count_records(&out)?;
    Ok(run)
}

/// [`sensor_run`] into a receiver whose one output is a Kafka topic: a batch is
/// acknowledged once the broker acknowledged its message. What was written is the
/// receiver's count of the packets it handed over, all acknowledged by the broker.
fn sensor_kafka_run(ns: &Netns, t: &Traffic, ticks: f64) -> Result<Run> {
    let dir = Scratch::new("bench-stream-run")?;
    let mut broker = Tansu::start(Some(ns), KAFKA_PORT)?;
    broker.create_topic(KAFKA_TOPIC, 3)?;
    let bootstrap = broker.bootstrap();
    let receiver = Receiver::start(
        Some(ns),
        &dir.join("state"),
        4433,
        &["--kafka", &bootstrap, "--kafka-topic", KAFKA_TOPIC],
    )?;
    let (mut run, summary) = timed_sensor(ns, t, ticks, &dir, receiver)?;
    broker.stop()?;
    if summary_figure(&summary, "/kafka/unacknowledged")? != 0 {
        bail!("messages left unacknowledged by the broker:\n{summary:#}");
    }
    run.written = summary_figure(&summary, "/sessions/0/written/packets")?;
    Ok(run)
}

/// Times the sensor reading `t` into `receiver`, then stops the receiver; returns the
/// run's figures (but what was written) and the receiver's exit summary.
pub(super) fn timed_sensor(
    ns: &Netns,
    t: &Traffic,
    ticks: f64,
    dir: &Scratch,
    mut receiver: Receiver,
) -> Result<(Run, serde_json::Value)> {
    let log = dir.join("sensor.log");
    let summary = SummaryFile::new("sensor")?;
    let summary_arg = summary.arg();
    let mut cmd = sensor_reading(
        ns,
        &t.path,
        &receiver,
        &log,
        &["--summary-json", &summary_arg],
    )?;

    let (receiver_before, _) = usage(receiver.proc.pid(), ticks)?;
    let cpu_before = children_cpu(ticks)?;
    let started = Instant::now();
    let mut sensor = cmd.spawn().context("cannot start the sensor")?;
    wait_ok(&mut sensor, "sensor", &log)?;
    let seconds = started.elapsed().as_secs_f64();
    let sender_cpu = children_cpu(ticks)? - cpu_before;
    let (receiver_after, writer_rss_kib) = usage(receiver.proc.pid(), ticks)?;
    receiver.stop()?;

    let summary = summary.read()?;
    let raw = summary_figure(&summary, "/interfaces/0/raw_bytes")?;
    let wire = summary_figure(&summary, "/interfaces/0/wire_bytes")?;
    let run = Run {
        written: 0,
        seconds,
        ratio: raw as f64 / wire.max(1) as f64,
        sender_cpu,
        writer_cpu: receiver_after - receiver_before,
        writer_rss_kib,
    };
    Ok((run, receiver.proc.summary()?))
}

/// `tcpdump -r FILE -U -w - | socat -u STDIN OPENSSL:...` into `socat -u OPENSSL-LISTEN:...
/// STDOUT > out.pcap`; the time runs from tcpdump's start to the writer's exit.
fn pipeline_run(ns: &Netns, tls: &TlsPair, t: &Traffic, ticks: f64) -> Result<Run> {
    let dir = Scratch::new("bench-stream-run")?;
    let out = dir.join("out.pcap");
    let (writer_log, tunnel_log, tcpdump_log) = (
        dir.join("writer.log"),
        dir.join("tunnel.log"),
        dir.join("tcpdump.log"),
    );
    let mut writer = start_writer(Some(ns), tls, &out, &writer_log)?;
    let watch = super::watch_peak_rss(writer.id());
    let input = path_arg(&t.path);

    let cpu_before = children_cpu(ticks)?;
    let started = Instant::now();
    let mut tcpdump = command_in(Some(ns), "tcpdump")
        .args(["-r", input.as_str(), "-Z", "root", "-U", "-w", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&tcpdump_log)?)
        .spawn()
        .context("cannot start tcpdump")?;
    let pipe = tcpdump.stdout.take().context("tcpdump's stdout")?;
    let mut tunnel = start_tunnel(Some(ns), tls, Stdio::from(pipe), &tunnel_log)?;
    wait_ok(&mut writer, "socat (writer)", &writer_log)?;
    let seconds = started.elapsed().as_secs_f64();
    let writer_cpu = children_cpu(ticks)? - cpu_before;
    wait_ok(&mut tcpdump, "tcpdump", &tcpdump_log)?;
    wait_ok(&mut tunnel, "socat (tunnel)", &tunnel_log)?;
    let sender_cpu = children_cpu(ticks)? - cpu_before - writer_cpu;

    Ok(Run {
        written: count_records(&out)?,
        seconds,
        ratio: 1.0,
        sender_cpu,
        writer_cpu,
        writer_rss_kib: watch.join().unwrap_or(0),
    })
}

/// The corpus's records again and again until [`TARGET_BYTES`] of packet data, with
/// timestamps rising 1 µs per packet.
fn loop_corpus(corpus: &Path, path: &Path) -> Result<Traffic> {
    loop_corpus_to(corpus, path, TARGET_BYTES)
}

/// [`loop_corpus`] up to `target` bytes of packet data.
pub(super) fn loop_corpus_to(corpus: &Path, path: &Path, target: u64) -> Result<Traffic> {
    let bytes = read_corpus(corpus)?;
    let (link_type, frames) = corpus_frames(&bytes, corpus)?;
    let mut writer = PcapWriter::create(path, link_type)?;
    while writer.bytes < target {
        for frame in &frames {
            writer.record(frame)?;
        }
    }
    writer.finish("corpus (looped)")
}

/// The bytes of the shared corpus file at `corpus`.
pub(super) fn read_corpus(corpus: &Path) -> Result<Vec<u8>> {
    std::fs::read(corpus).with_context(|| {
        format!(
            "cannot read {}: the shared corpus must sit beside the repository",
            corpus.display()
        )
    })
}

/// The link type and the packets (captured bytes) of `bytes`, the corpus read from
/// `corpus`, in file order.
pub(super) fn corpus_frames<'a>(bytes: &'a [u8], corpus: &Path) -> Result<(u32, Vec<&'a [u8]>)> {
    if bytes.get(..4) != Some(&[0xd4, 0xc3, 0xb2, 0xa1][..]) {
        bail!(
            "{} is not a little-endian microsecond pcap",
            corpus.display()
        );
    }
    let link_type = u32::from_le_bytes(bytes[20..24].try_into()?);
    let mut frames: Vec<&[u8]> = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let captured = u32::from_le_bytes(bytes[at + 8..at + 12].try_into()?) as usize;
        let frame = bytes
            .get(at + 16..at + 16 + captured)
            .context("truncated corpus record")?;
        frames.push(frame);
        at += 16 + captured;
    }
    Ok((link_type, frames))
}

/// Ethernet/IPv4/UDP frames of [`RANDOM_FRAME`] bytes whose payload is pseudo-random
/// (xorshift), up to [`TARGET_BYTES`] of packet data.
fn random_frames(path: &Path) -> Result<Traffic> {
    let mut frame = super::udp_frame(RANDOM_FRAME, [0x02, 0, 0, 0, 0, 2])?;
    let mut writer = PcapWriter::create(path, 1)?;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    while writer.bytes < TARGET_BYTES {
        for chunk in frame[42..].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        writer.record(&frame)?;
    }
    writer.finish("random payloads")
}

/// A classic little-endian microsecond pcap written record by record.
struct PcapWriter {
    path: PathBuf,
    out: std::io::BufWriter<File>,
    packets: u64,
    bytes: u64,
}

impl PcapWriter {
    fn create(path: &Path, link_type: u32) -> Result<Self> {
        use std::io::Write as _;
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&super::pcap_header(262_144, link_type))?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            packets: 0,
            bytes: 0,
        })
    }

    fn record(&mut self, frame: &[u8]) -> Result<()> {
        use std::io::Write as _;
        let len = u32::try_from(frame.len())?;
        let secs = u32::try_from(self.packets / 1_000_000)?;
        let usecs = u32::try_from(self.packets % 1_000_000)?;
        for word in [secs, usecs, len, len] {
            self.out.write_all(&word.to_le_bytes())?;
        }
        self.out.write_all(frame)?;
        self.packets += 1;
        self.bytes += u64::from(len);
        Ok(())
    }

    fn finish(self, label: &'static str) -> Result<Traffic> {
        use std::io::Write as _;
        let Self {
            path,
            mut out,
            packets,
            bytes,
        } = self;
        out.flush()?;
        Ok(Traffic {
            label,
            path,
            packets,
            bytes,
        })
    }
}

fn table(results: &[(&Traffic, Who, Vec<Run>)], rounds: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nStreaming a file to a writer on loopback, median of {rounds} interleaved rounds\n"
    );
    let _ = writeln!(
        out,
        "| traffic | who | packets | packet data MB | seconds | MB/s | compression ratio | sender CPU s | writer CPU s | writer CPU ms/MB | writer peak RSS MiB |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut verdicts = String::new();
    // The sensor's rate into a file, for the verdict against the pipeline.
    let mut sensor_rate = 0.0;
    for (t, who, runs) in results {
        let pick = |f: &dyn Fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let mb = t.bytes as f64 / 1e6;
        let rate = pick(&|r| mb / r.seconds);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {mb:.0} | {:.2} | {rate:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
            t.label,
            super::cell(who.name()),
            t.packets,
            pick(&|r| r.seconds),
            pick(&|r| r.ratio),
            pick(&|r| r.sender_cpu),
            pick(&|r| r.writer_cpu),
            pick(&|r| r.writer_cpu * 1e3 / mb),
            pick(&|r| r.writer_rss_kib as f64) / 1024.0,
        );
        if *who == Who::Sensor {
            sensor_rate = rate;
        }
        if *who == Who::Pipeline {
            let sensor = sensor_rate;
            let x = sensor / rate;
            let _ = writeln!(
                verdicts,
                "- {}: sensor {sensor:.0} MB/s, pipeline {rate:.0} MB/s: {x:.2}x (target 2x: {})",
                t.label,
                if x >= 2.0 { "met" } else { "missed" }
            );
        }
    }
    out.push('\n');
    out.push_str(&verdicts);
    out
}

fn to_json(results: &[(&Traffic, Who, Vec<Run>)]) -> String {
    super::json_array(results.iter().flat_map(|(t, who, runs)| {
        runs.iter().map(move |run| {
            serde_json::json!({
                "traffic": t.label,
                "who": who.name(),
                "packets": t.packets,
                "packet_bytes": t.bytes,
                "written": run.written,
                "seconds": super::milli(run.seconds),
                "mb_per_s": (t.bytes as f64 / 1e5 / run.seconds).round() / 10.0,
                "compression_ratio": super::milli(run.ratio),
                "sender_cpu_s": super::milli(run.sender_cpu),
                "writer_cpu_s": super::milli(run.writer_cpu),
                "writer_cpu_ms_per_mb": super::milli(run.writer_cpu * 1e9 / t.bytes as f64),
                "writer_peak_rss_kib": run.writer_rss_kib,
            })
        })
    }))
}
