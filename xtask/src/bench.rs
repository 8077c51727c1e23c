//! `cargo xtask bench`: capture throughput and cost of every sensor mode, side by side
//! with `tcpdump -w file` and with the reference architecture (`tcpdump -U -w -` through a
//! socat TLS tunnel into a writer) on the same traffic; and streaming (`sensor --read`)
//! against that pipeline ([`streaming`]). Measured in one run on this machine.
//!
//! A veth pair joins two namespaces; tcpreplay sends pre-built files of 64-byte and
//! 1500-byte frames at top speed into the capture end. For each frame size, every
//! contestant (tcpdump, then the sensor in each mode streaming to a receiver) takes one
//! replay per round, contestants interleaved, and the figures are the medians over the
//! rounds. CPU time and peak RSS come from /proc just before each process is stopped.
//!
//! Results: tables on stdout, and `bench-out/capture.json` and `bench-out/streaming.json`
//! with every run.

mod micro;
mod pipeline;
mod streaming;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use testbed::capstream::{start_sensor, summary_figure, Receiver, Scratch};
use testbed::{Lab, Proc};

use crate::system::{cmd, setup};

/// Frames per replay, per frame size.
const FRAMES: usize = 300_000;
/// Rounds unless `--rounds` says otherwise.
pub const ROUNDS: usize = 3;
const FRAME_SIZES: [usize; 2] = [64, 1500];
/// Everything a run needs to reach the output after the replay ends.
const SETTLE: Duration = Duration::from_millis(1500);

/// Who captures: tcpdump as the baseline, the reference pipeline, or the sensor in a mode.
#[derive(Clone, Copy, PartialEq)]
enum Contestant {
    Tcpdump,
    Pipeline,
    Sensor(&'static str),
}

impl Contestant {
    fn name(self) -> String {
        match self {
            Self::Tcpdump => "tcpdump -w file".into(),
            Self::Pipeline => "tcpdump -U -w - | socat TLS -> writer".into(),
            Self::Sensor(mode) => format!("sensor --mode {mode}"),
        }
    }
}

const CONTESTANTS: [Contestant; 7] = [
    Contestant::Tcpdump,
    Contestant::Pipeline,
    Contestant::Sensor("pcap"),
    Contestant::Sensor("ebpf"),
    Contestant::Sensor("tc"),
    Contestant::Sensor("xdp"),
    Contestant::Sensor("afxdp"),
];

/// One run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    offered: u64,
    written: u64,
    dropped: u64,
    /// CPU seconds of the capturing side (tcpdump, or sensor, or tcpdump and the tunnel's
    /// socat) and of the receiving side (receiver, or the writer's socat).
    capture_cpu: f64,
    receiver_cpu: f64,
    capture_rss_kib: u64,
    receiver_rss_kib: u64,
}

/// Runs `only` ("capture", "streaming" or "micro"), or all, over `rounds` rounds.
pub fn run(only: Option<&str>, rounds: usize) -> Result<()> {
    setup()?;
    crate::ebpf::build(crate::root())?;
    cmd(
        "cargo",
        &["build", "--release", "-p", "sensor", "-p", "receiver"],
    )?;
    // The test bed starts the binaries it finds beside the running program: point it at
    // the release ones.
    std::env::set_var(
        "CAPSTREAM_BIN_DIR",
        crate::root().join("target/release").as_os_str(),
    );

    let out_dir = crate::root().join("bench-out");
    std::fs::create_dir_all(&out_dir)?;
    if only == Some("micro") {
        return micro::run(&out_dir);
    }
    let ticks: f64 = testbed::run("getconf", &["CLK_TCK"])?.trim().parse()?;
    if only != Some("streaming") {
        capture(&out_dir, rounds, ticks)?;
    }
    if only != Some("capture") {
        streaming::run(&out_dir, rounds, ticks)?;
    }
    if only.is_none() {
        micro::run(&out_dir)?;
    }
    Ok(())
}

/// Every capture mode, tcpdump and the pipeline on replayed traffic.
fn capture(out_dir: &Path, rounds: usize, ticks: f64) -> Result<()> {
    let lab = Lab::new(1)?;
    let iface = lab.links[0].1.clone();
    let mac = lab
        .cap
        .exec("cat", &[&format!("/sys/class/net/{iface}/address")])?;
    let mac = parse_mac(mac.trim())?;
    let scratch = Scratch::new("bench")?;
    let tls = pipeline::TlsPair::create(Some(&lab.cap), &scratch)?;

    let mut results: Vec<(usize, Contestant, Vec<Run>)> = Vec::new();
    for size in FRAME_SIZES {
        let traffic = scratch.join(&format!("frames-{size}.pcap"));
        write_traffic(&traffic, size, FRAMES, mac)?;
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); CONTESTANTS.len()];
        for round in 1..=rounds {
            for (i, contestant) in CONTESTANTS.iter().enumerate() {
                eprintln!(
                    "xtask: {size}-byte frames, round {round}/{rounds}: {}",
                    contestant.name()
                );
                let run = measure(&lab, &iface, *contestant, &traffic, &tls, ticks)
                    .with_context(|| format!("{} on {size}-byte frames", contestant.name()))?;
                runs[i].push(run);
            }
        }
        for (contestant, runs) in CONTESTANTS.iter().zip(runs) {
            results.push((size, *contestant, runs));
        }
    }

    println!("{}", table(&results, rounds));
    let json = out_dir.join("capture.json");
    std::fs::write(&json, to_json(&results))?;
    eprintln!("xtask: every run in {}", json.display());
    Ok(())
}

/// One replay of `traffic` captured by `contestant`.
fn measure(
    lab: &Lab,
    iface: &str,
    contestant: Contestant,
    traffic: &Path,
    tls: &pipeline::TlsPair,
    ticks: f64,
) -> Result<Run> {
    let dir = Scratch::new("bench-run")?;
    let offered = FRAMES as u64;
    match contestant {
        Contestant::Tcpdump => {
            let out = dir.join("tcpdump.pcap");
            let mut tcpdump = start_baseline(lab, iface, &out)?;
            replay(lab, traffic)?;
            std::thread::sleep(SETTLE);
            let (capture_cpu, capture_rss_kib) = usage(tcpdump.pid(), ticks)?;
            tcpdump.stop()?;
            let log = tcpdump.stderr();
            Ok(Run {
                offered,
                written: number_before(&log, "packets captured")?,
                dropped: number_before(&log, "packets dropped by kernel")?,
                capture_cpu,
                capture_rss_kib,
                ..Run::default()
            })
        }
        Contestant::Pipeline => measure_pipeline(lab, iface, traffic, tls, ticks, &dir),
        Contestant::Sensor(mode) => {
            let (mut receiver, out) = Receiver::writing(Some(&lab.cap), &dir, "out.pcap", &[])?;
            let mut args = vec!["--iface", iface, "--mode", mode];
            if mode == "afxdp" {
                args.push("--dedicated");
            }
            let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args)?;
            replay(lab, traffic)?;
            std::thread::sleep(SETTLE);
            let (capture_cpu, capture_rss_kib) = usage(sensor.pid(), ticks)?;
            sensor.stop()?;
            let (receiver_cpu, receiver_rss_kib) = usage(receiver.proc.pid(), ticks)?;
            receiver.stop()?;
            let log = sensor.stderr();
            let dropped = summary_figure(&log, ", dropped ")?;
            let written = count_records(&out)?;
            let _ = std::fs::remove_file(&out);
            Ok(Run {
                offered,
                written,
                dropped,
                capture_cpu,
                receiver_cpu,
                capture_rss_kib,
                receiver_rss_kib,
            })
        }
    }
}

/// The reference pipeline on live traffic: `tcpdump -U -w -` (same buffer and snap length
/// as the baseline) into `socat -u STDIN OPENSSL:...`, into `socat -u OPENSSL-LISTEN:...
/// STDOUT > file`, all in the capture namespace.
fn measure_pipeline(
    lab: &Lab,
    iface: &str,
    traffic: &Path,
    tls: &pipeline::TlsPair,
    ticks: f64,
    dir: &Scratch,
) -> Result<Run> {
    let out = dir.join("pipeline.pcap");
    let logs = ["tcpdump.log", "tunnel.log", "writer.log"].map(|l| dir.join(l));
    let mut writer = pipeline::start_writer(Some(&lab.cap), tls, &out, &logs[2])?;
    let mut tcpdump = pipeline::command_in(Some(&lab.cap), "tcpdump")
        .args([
            "-i", iface, "-s", "262144", "-B", "32768", "-Z", "root", "-U", "-w", "-",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&logs[0])?)
        .spawn()
        .context("cannot start tcpdump")?;
    let pipe = tcpdump.stdout.take().context("tcpdump's stdout")?;
    let mut tunnel = pipeline::start_tunnel(Some(&lab.cap), tls, Stdio::from(pipe), &logs[1])?;
    pipeline::wait_for_log(&mut tcpdump, &logs[0], "listening on", "tcpdump")?;
    replay(lab, traffic)?;
    std::thread::sleep(SETTLE);
    let (tcpdump_cpu, tcpdump_rss) = usage(tcpdump.id(), ticks)?;
    let (tunnel_cpu, tunnel_rss) = usage(tunnel.id(), ticks)?;
    let (writer_cpu, writer_rss) = usage(writer.id(), ticks)?;
    testbed::run("kill", &["-TERM", &tcpdump.id().to_string()])?;
    pipeline::wait_ok(&mut tcpdump, "tcpdump", &logs[0])?;
    pipeline::wait_ok(&mut tunnel, "socat (tunnel)", &logs[1])?;
    pipeline::wait_ok(&mut writer, "socat (writer)", &logs[2])?;
    let log = std::fs::read_to_string(&logs[0])?;
    Ok(Run {
        offered: FRAMES as u64,
        written: count_records(&out)?,
        dropped: number_before(&log, "packets dropped by kernel")?,
        capture_cpu: tcpdump_cpu + tunnel_cpu,
        receiver_cpu: writer_cpu,
        capture_rss_kib: tcpdump_rss + tunnel_rss,
        receiver_rss_kib: writer_rss,
    })
}

/// `tcpdump -w file` as a user would run it for a long capture: no immediate mode, a
/// 32 MiB kernel buffer so that it too has room for bursts.
fn start_baseline(lab: &Lab, iface: &str, out: &Path) -> Result<Proc> {
    let mut argv = lab.cap.command("tcpdump");
    let out = out.to_string_lossy().into_owned();
    argv.extend(
        [
            "-i", iface, "-s", "262144", "-B", "32768", "-Z", "root", "-w", &out,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut proc = Proc::start("tcpdump", &argv, std::process::Stdio::null())?;
    proc.wait_for("listening on", Duration::from_secs(10))?;
    Ok(proc)
}

fn replay(lab: &Lab, traffic: &Path) -> Result<()> {
    let file = traffic.to_str().context("traffic path is not UTF-8")?;
    lab.gen.exec(
        "tcpreplay",
        &["-q", "--topspeed", "-K", "-i", &lab.links[0].0, file],
    )?;
    Ok(())
}

/// CPU seconds (user + system) and peak RSS (KiB) of a running process, from /proc;
/// `ticks` is the clock ticks per second of /proc's CPU times.
fn usage(pid: u32, ticks: f64) -> Result<(f64, u64)> {
    // utime and stime are fields 14 and 15 of the whole line.
    let cpu = stat_ticks(&format!("/proc/{pid}/stat"), 14)?;
    Ok((
        cpu / ticks,
        testbed::capstream::peak_rss_kib(pid).unwrap_or(0),
    ))
}

/// CPU seconds (user + system) of this process's children that have exited and been waited
/// for (with theirs): the difference around waiting for a child is that child's CPU time.
fn children_cpu(ticks: f64) -> Result<f64> {
    // cutime and cstime are fields 16 and 17.
    Ok(stat_ticks("/proc/self/stat", 16)? / ticks)
}

/// The sum of fields `first` and `first + 1` (numbered from 1, as in proc(5)) of a /proc
/// stat file.
fn stat_ticks(path: &str, first: usize) -> Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    // The fields after the command name (field 2), in parentheses and maybe with spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unreadable /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let at = first - 3;
    Ok((fields[at].parse::<u64>()? + fields[at + 1].parse::<u64>()?) as f64)
}

/// Follows a process's peak RSS (KiB) until it exits (or turns zombie); the thread returns
/// the last figure read.
fn watch_peak_rss(pid: u32) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while let Ok(kib) = testbed::capstream::peak_rss_kib(pid) {
            peak = kib;
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

/// The number that starts the line ending in `suffix`, as tcpdump prints its counts
/// ("123 packets captured").
fn number_before(log: &str, suffix: &str) -> Result<u64> {
    let line = log
        .lines()
        .find(|l| l.trim_end().ends_with(suffix))
        .with_context(|| format!("no {suffix:?} in:\n{log}"))?;
    let number = line.split_whitespace().next().unwrap_or("");
    number.parse().with_context(|| format!("in {line:?}"))
}

/// Packet records in a classic pcap file.
fn count_records(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut at = 24;
    let mut n = 0;
    while at + 16 <= bytes.len() {
        let captured = u32::from_le_bytes(bytes[at + 8..at + 12].try_into()?) as usize;
        at += 16 + captured;
        n += 1;
    }
    Ok(n)
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC address {text:?}"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC address {text:?}"))
}

/// `count` Ethernet/IPv4/UDP frames of `size` bytes to `dst_mac`, 198.18.0.1 → 198.18.0.3
/// (no host there: the capture end's stack drops them quietly).
fn write_traffic(path: &Path, size: usize, count: usize, dst_mac: [u8; 6]) -> Result<()> {
    let frame = udp_frame(size, dst_mac)?;
    let mut out = Vec::with_capacity(24 + count * (16 + size));
    out.extend_from_slice(&pcap_header(65535, 1));
    let len = u32::try_from(size)?;
    for i in 0..count {
        let usec = u32::try_from(i % 1_000_000)?;
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&usec.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&frame);
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

/// An Ethernet/IPv4/UDP frame of `size` bytes (zero payload) to `dst_mac`, 198.18.0.1 →
/// 198.18.0.3, port 9999 → 9.
fn udp_frame(size: usize, dst_mac: [u8; 6]) -> Result<Vec<u8>> {
    if size < 42 {
        bail!("frames need at least 42 bytes for the headers");
    }
    let mut frame = vec![0u8; size];
    frame[..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = u16::try_from(size - 14)?;
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 3]);
    let checksum = !ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .fold(0u32, |s, w| {
            let s = s + w;
            (s & 0xffff) + (s >> 16)
        }) as u16;
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let udp_len = u16::try_from(size - 34)?;
    frame[34..36].copy_from_slice(&9999u16.to_be_bytes());
    frame[36..38].copy_from_slice(&9u16.to_be_bytes());
    frame[38..40].copy_from_slice(&udp_len.to_be_bytes());
    Ok(frame)
}

/// The header of a classic little-endian microsecond pcap file.
fn pcap_header(snaplen: u32, link_type: u32) -> [u8; 24] {
    let mut header = [0u8; 24];
    header[..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    header[4..6].copy_from_slice(&2u16.to_le_bytes());
    header[6..8].copy_from_slice(&4u16.to_le_bytes());
    header[16..20].copy_from_slice(&snaplen.to_le_bytes());
    header[20..24].copy_from_slice(&link_type.to_le_bytes());
    header
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn table(results: &[(usize, Contestant, Vec<Run>)], rounds: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nCapture, {FRAMES} frames per replay at tcpreplay --topspeed, median of {rounds} \
         interleaved rounds\n"
    );
    let _ = writeln!(
        out,
        "| frames | who | written | dropped | capture CPU s/Mpkt | receiver CPU s/Mpkt | capture peak RSS MiB | receiver peak RSS MiB |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    let per_million = |cpu: f64| cpu / (FRAMES as f64 / 1e6);
    for (size, contestant, runs) in results {
        let pick = |f: fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let receiving = |figure: String| match contestant {
            Contestant::Tcpdump => "-".to_string(),
            _ => figure,
        };
        let _ = writeln!(
            out,
            "| {size} B | {} | {:.0} | {:.0} | {:.2} | {} | {:.1} | {} |",
            cell(&contestant.name()),
            pick(|r| r.written as f64),
            pick(|r| r.dropped as f64),
            per_million(pick(|r| r.capture_cpu)),
            receiving(format!("{:.2}", per_million(pick(|r| r.receiver_cpu)))),
            pick(|r| r.capture_rss_kib as f64) / 1024.0,
            receiving(format!(
                "{:.1}",
                pick(|r| r.receiver_rss_kib as f64) / 1024.0
            )),
        );
    }
    // The target: sensor + receiver CPU per packet at most half the pipeline's.
    let _ = writeln!(
        out,
        "\nSensor + receiver CPU against the tcpdump | TLS pipeline's (target: at most 0.5x)\n"
    );
    let total = |runs: &[Run]| {
        median(
            &mut runs
                .iter()
                .map(|r| r.capture_cpu + r.receiver_cpu)
                .collect::<Vec<_>>(),
        )
    };
    for (size, contestant, runs) in results {
        let Contestant::Sensor(_) = contestant else {
            continue;
        };
        let Some((_, _, baseline)) = results
            .iter()
            .find(|(s, c, _)| s == size && *c == Contestant::Pipeline)
        else {
            continue;
        };
        let (ours, theirs) = (per_million(total(runs)), per_million(total(baseline)));
        let x = ours / theirs;
        let _ = writeln!(
            out,
            "- {size} B, {}: {ours:.2} vs {theirs:.2} s/Mpkt = {x:.2}x ({})",
            contestant.name(),
            if x <= 0.5 { "met" } else { "missed" }
        );
    }
    out
}

fn to_json(results: &[(usize, Contestant, Vec<Run>)]) -> String {
    json_array(results.iter().flat_map(|(size, contestant, runs)| {
        runs.iter().map(move |run| {
            format!(
                "{{\"frame_bytes\": {size}, \"who\": \"{}\", \"offered\": {}, \"written\": {}, \
                 \"dropped\": {}, \"capture_cpu_s\": {:.3}, \"receiver_cpu_s\": {:.3}, \
                 \"capture_peak_rss_kib\": {}, \"receiver_peak_rss_kib\": {}}}",
                contestant.name(),
                run.offered,
                run.written,
                run.dropped,
                run.capture_cpu,
                run.receiver_cpu,
                run.capture_rss_kib,
                run.receiver_rss_kib
            )
        })
    }))
}

/// A JSON array of `objects`, one a line.
fn json_array(objects: impl Iterator<Item = String>) -> String {
    let rows: Vec<String> = objects.map(|o| format!("  {o}")).collect();
    format!("[\n{}\n]\n", rows.join(",\n"))
}

/// `text` for a Markdown table cell: its pipes escaped.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}
