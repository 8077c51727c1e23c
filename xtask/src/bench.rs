//! `cargo xtask bench`: capture throughput and cost of every sensor mode, side by side
//! with `tcpdump -w file` on the same traffic, measured in one run on this machine.
//!
//! A veth pair joins two namespaces; tcpreplay sends pre-built files of 64-byte and
//! 1500-byte frames at top speed into the capture end. For each frame size, every
//! contestant (tcpdump, then the sensor in each mode streaming to a receiver) takes one
//! replay per round, contestants interleaved, and the figures are the medians over the
//! rounds. CPU time and peak RSS come from /proc just before each process is stopped.
//!
//! Results: a table on stdout, and `bench-out/capture.json` with every run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use testbed::capstream::{start_sensor, summary_figure, Receiver, Scratch};
use testbed::{Lab, Proc};

use crate::system::{cmd, setup};

/// Frames per replay, per frame size.
const FRAMES: usize = 300_000;
const ROUNDS: usize = 3;
const FRAME_SIZES: [usize; 2] = [64, 1500];
/// Everything a run needs to reach the output after the replay ends.
const SETTLE: Duration = Duration::from_millis(1500);

/// Who captures: tcpdump as the baseline, or the sensor in a mode.
#[derive(Clone, Copy)]
enum Contestant {
    Tcpdump,
    Sensor(&'static str),
}

impl Contestant {
    fn name(self) -> String {
        match self {
            Self::Tcpdump => "tcpdump -w file".into(),
            Self::Sensor(mode) => format!("sensor --mode {mode}"),
        }
    }
}

const CONTESTANTS: [Contestant; 6] = [
    Contestant::Tcpdump,
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
    /// CPU seconds of the capturing process (tcpdump or sensor) and of the receiver.
    capture_cpu: f64,
    receiver_cpu: f64,
    capture_rss_kib: u64,
    receiver_rss_kib: u64,
}

pub fn run() -> Result<()> {
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
    let lab = Lab::new(1)?;
    let iface = lab.links[0].1.clone();
    let mac = lab
        .cap
        .exec("cat", &[&format!("/sys/class/net/{iface}/address")])?;
    let mac = parse_mac(mac.trim())?;
    let scratch = Scratch::new("bench")?;
    let ticks: f64 = testbed::run("getconf", &["CLK_TCK"])?.trim().parse()?;

    let mut results: Vec<(usize, Contestant, Vec<Run>)> = Vec::new();
    for size in FRAME_SIZES {
        let traffic = scratch.join(&format!("frames-{size}.pcap"));
        write_traffic(&traffic, size, FRAMES, mac)?;
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); CONTESTANTS.len()];
        for round in 1..=ROUNDS {
            for (i, contestant) in CONTESTANTS.iter().enumerate() {
                eprintln!(
                    "xtask: {size}-byte frames, round {round}/{ROUNDS}: {}",
                    contestant.name()
                );
                let run = measure(&lab, &iface, *contestant, &traffic, ticks)
                    .with_context(|| format!("{} on {size}-byte frames", contestant.name()))?;
                runs[i].push(run);
            }
        }
        for (contestant, runs) in CONTESTANTS.iter().zip(runs) {
            results.push((size, *contestant, runs));
        }
    }

    println!("{}", table(&results));
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
            let (capture_cpu, capture_rss_kib) = usage(&tcpdump, ticks)?;
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
        Contestant::Sensor(mode) => {
            let (mut receiver, out) = Receiver::writing(Some(&lab.cap), &dir, "out.pcap", &[])?;
            let mut args = vec!["--iface", iface, "--mode", mode];
            if mode == "afxdp" {
                args.push("--dedicated");
            }
            let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args)?;
            replay(lab, traffic)?;
            std::thread::sleep(SETTLE);
            let (capture_cpu, capture_rss_kib) = usage(&sensor, ticks)?;
            sensor.stop()?;
            let (receiver_cpu, receiver_rss_kib) = usage(&receiver.proc, ticks)?;
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
fn usage(proc: &Proc, ticks: f64) -> Result<(f64, u64)> {
    let pid = proc.pid();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unreadable /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let cpu: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok((cpu as f64 / ticks, hwm))
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

    let mut out = Vec::with_capacity(24 + count * (16 + size));
    // Classic pcap, microseconds, Ethernet.
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
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

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn table(results: &[(usize, Contestant, Vec<Run>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nCapture, {FRAMES} frames per replay at tcpreplay --topspeed, median of {ROUNDS} \
         interleaved rounds\n"
    );
    let _ = writeln!(
        out,
        "| frames | who | written | dropped | capture CPU s/Mpkt | receiver CPU s/Mpkt | capture peak RSS MiB | receiver peak RSS MiB |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (size, contestant, runs) in results {
        let pick = |f: fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let per_million = |cpu: f64| cpu / (FRAMES as f64 / 1e6);
        let _ = writeln!(
            out,
            "| {size} B | {} | {:.0} | {:.0} | {:.2} | {} | {:.1} | {} |",
            contestant.name(),
            pick(|r| r.written as f64),
            pick(|r| r.dropped as f64),
            per_million(pick(|r| r.capture_cpu)),
            match contestant {
                Contestant::Tcpdump => "-".to_string(),
                Contestant::Sensor(_) => format!("{:.2}", per_million(pick(|r| r.receiver_cpu))),
            },
            pick(|r| r.capture_rss_kib as f64) / 1024.0,
            match contestant {
                Contestant::Tcpdump => "-".to_string(),
                Contestant::Sensor(_) =>
                    format!("{:.1}", pick(|r| r.receiver_rss_kib as f64) / 1024.0),
            },
        );
    }
    out
}

fn to_json(results: &[(usize, Contestant, Vec<Run>)]) -> String {
    let mut out = String::from("[\n");
    let mut first = true;
    for (size, contestant, runs) in results {
        for run in runs {
            if !first {
                out.push_str(",\n");
            }
            first = false;
            let _ = write!(
                out,
                "  {{\"frame_bytes\": {size}, \"who\": \"{}\", \"offered\": {}, \"written\": {}, \
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
            );
        }
    }
    out.push_str("\n]\n");
    out
}
