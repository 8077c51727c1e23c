//! `cargo xtask bench`: capture throughput and cost of every sensor mode, side by side
//! with `tcpdump -w file` and with the reference architecture (`tcpdump -U -w -` through a
//! socat TLS tunnel into a writer) on the same traffic; and streaming (`sensor --read`)
//! against that pipeline ([`streaming`]). Measured in one run on this machine.
//!
//! A veth pair joins two namespaces; the project's own generator ([`generator`]) sends
//! 64-byte and 1500-byte frames as fast as it can into the capture end. For each frame
//! size, every contestant (tcpdump, then the sensor in each mode streaming to a receiver)
//! takes one burst per round, contestants interleaved, and the figures are the medians
//! over the rounds. CPU time and peak RSS come from /proc just before each process is
//! stopped. Fan-in ([`fanin`]): 1, 8 and 32 sensors streaming files into one receiver.
//!
//! Attribution's cost: the capture bench runs the sensor in pcap, ebpf, tc and xdp modes
//! with `--attribute` too, and compares their capture CPU with the same modes' without it
//! (`--only attribution`: those eight contestants alone).
//!
//! Loss-free rate ([`ndr`]): each contestant's highest rate with no frame lost, by binary
//! search.
//!
//! Results: tables on stdout, and `bench-out/capture.json` (or `attribution.json`),
//! `bench-out/streaming.json`,
//! `bench-out/fanin.json` and `bench-out/ndr.json` with every run.

mod fanin;
pub mod generator;
mod lake;
mod micro;
mod ndr;
mod pipeline;
mod streaming;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use testbed::capstream::{sensor_figures, start_sensor, Receiver, Scratch};
use testbed::{Lab, Proc};

use crate::system::{cmd, setup};

/// Frame sizes and the frames sent per run of each: more than any kernel buffer of the
/// contestants holds (5M x 64 B = 320 MB; 1M x 1500 B = 1.5 GB), and enough for CPU
/// figures to about 1% at the kernel's 10 ms resolution.
const TRAFFIC: [(usize, u64); 2] = [(64, 5_000_000), (1500, 1_000_000)];
/// Rounds unless `--rounds` says otherwise.
pub const ROUNDS: usize = 3;
/// Everything a run needs to reach the output after the burst ends.
const SETTLE: Duration = Duration::from_millis(1500);

/// Who captures: tcpdump as the baseline, the reference pipeline, or the sensor in a mode.
#[derive(Clone, Copy, PartialEq)]
enum Contestant {
    Tcpdump,
    Pipeline,
    Sensor(&'static str),
    /// The sensor in a mode with `--attribute`: what attribution costs.
    Attributing(&'static str),
}

impl Contestant {
    fn name(self) -> String {
        match self {
            Self::Tcpdump => "tcpdump -w file".into(),
            Self::Pipeline => "tcpdump -U -w - | socat TLS -> writer".into(),
            Self::Sensor(mode) => format!("sensor --mode {mode}"),
            Self::Attributing(mode) => format!("sensor --mode {mode} --attribute"),
        }
    }
}

/// The modes the capture bench runs with `--attribute` too.
const ATTRIBUTING: [&str; 4] = ["pcap", "ebpf", "tc", "xdp"];

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
    /// Every drop, then those before the frame reached the capturing process (the kernel
    /// buffer or ring) and those of the sensor's own buffer (whole batches).
    dropped: u64,
    dropped_kernel: u64,
    dropped_sensor_buffer: u64,
    /// The generator's rate during the run, and the frames the link refused and it sent
    /// again (see [`generator`]).
    generator_pps: f64,
    refused: u64,
    /// CPU seconds of the capturing side (tcpdump, or sensor, or tcpdump and the tunnel's
    /// socat) from the traffic's start, and of the receiving side (receiver, or the writer's
    /// socat).
    capture_cpu: f64,
    /// CPU seconds the capturing side took before the traffic started (loading programs,
    /// reading /proc, connecting): once per run, so kept out of the per-frame figure.
    startup_cpu: f64,
    receiver_cpu: f64,
    capture_rss_kib: u64,
    receiver_rss_kib: u64,
}

/// Runs `only` ("capture", "attribution", "streaming", "fanin", "micro", "ndr" or "lake"), or
/// all, over `rounds` rounds; each loss-free rate trial lasts `trial`. The capture,
/// attribution and loss-free-rate parts run the sensor in `modes` only (all when empty).
pub fn run(only: Option<&str>, rounds: usize, trial: Duration, modes: &[String]) -> Result<()> {
    let wanted = |c: &Contestant| match c {
        Contestant::Sensor(mode) | Contestant::Attributing(mode) => {
            modes.is_empty() || modes.iter().any(|m| m == mode)
        }
        Contestant::Tcpdump | Contestant::Pipeline => true,
    };
    setup()?;
    let part = |name: &str| only.is_none_or(|o| o == name);
    // Live capture (the lake's beside stenographer too) and the filter-cost
    // micro-benchmark load the in-kernel programs.
    let attribution_only = only == Some("attribution");
    if part("capture") || part("micro") || part("ndr") || part("lake") || attribution_only {
        crate::ebpf::build(crate::root())?;
    }
    cmd(
        "cargo",
        &["build", "--release", "-p", "sensor", "-p", "receiver"],
    )?;
    // The test bed starts the binaries it finds beside the running program: point it at
    // the release ones, unless CAPSTREAM_BIN_DIR names others (an earlier build, for a
    // before/after comparison).
    if std::env::var_os("CAPSTREAM_BIN_DIR").is_none() {
        std::env::set_var(
            "CAPSTREAM_BIN_DIR",
            crate::root().join("target/release").as_os_str(),
        );
    }

    let out_dir = crate::root().join("bench-out");
    std::fs::create_dir_all(&out_dir)?;
    let ticks: f64 = testbed::run("getconf", &["CLK_TCK"])?.trim().parse()?;
    if part("capture") {
        let all: Vec<Contestant> = CONTESTANTS
            .into_iter()
            .chain(ATTRIBUTING.map(Contestant::Attributing))
            .filter(wanted)
            .collect();
        capture(&out_dir.join("capture.json"), &all, rounds, ticks)?;
    }
    if attribution_only {
        let pairs: Vec<Contestant> = ATTRIBUTING
            .into_iter()
            .flat_map(|mode| [Contestant::Sensor(mode), Contestant::Attributing(mode)])
            .filter(wanted)
            .collect();
        capture(&out_dir.join("attribution.json"), &pairs, rounds, ticks)?;
    }
    if part("streaming") {
        streaming::run(&out_dir, rounds, ticks)?;
    }
    if part("fanin") {
        fanin::run(&out_dir, rounds, ticks)?;
    }
    if part("micro") {
        micro::run(&out_dir)?;
    }
    if part("ndr") {
        let contestants: Vec<Contestant> = CONTESTANTS
            .into_iter()
            .filter(|c| *c != Contestant::Pipeline)
            .filter(wanted)
            .collect();
        ndr::run(&out_dir, trial, ticks, &contestants)?;
    }
    if part("lake") {
        lake::run(&out_dir, ticks)?;
    }
    Ok(())
}

/// `contestants` (every capture mode, tcpdump and the pipeline) on the generator's
/// traffic; every run into `json`.
fn capture(json: &Path, contestants: &[Contestant], rounds: usize, ticks: f64) -> Result<()> {
    let lab = Lab::new(1)?;
    let iface = lab.links[0].1.clone();
    let mac = lab
        .cap
        .exec("cat", &[&format!("/sys/class/net/{iface}/address")])?;
    let mac = parse_mac(mac.trim())?;
    let scratch = Scratch::new("bench")?;
    let tls = pipeline::TlsPair::create(Some(&lab.cap), &scratch)?;

    let mut results: Vec<(usize, Contestant, Vec<Run>)> = Vec::new();
    let mut references = String::new();
    for (size, count) in TRAFFIC {
        let traffic = generator::Options {
            iface: lab.links[0].0.clone(),
            dst_mac: mac,
            size,
            count,
            rate: None,
            xdp_live: false,
            cpu: None,
        };
        references.push_str(&reference_rates(&lab, &scratch, &traffic)?);
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); contestants.len()];
        for round in 1..=rounds {
            for (i, contestant) in contestants.iter().enumerate() {
                eprintln!(
                    "xtask: {size}-byte frames, round {round}/{rounds}: {}",
                    contestant.name()
                );
                let on = Capture {
                    lab: &lab,
                    iface: &iface,
                    filter: None,
                    cpu: None,
                };
                let run = measure(&on, *contestant, &traffic, Some(&tls), ticks)
                    .with_context(|| format!("{} on {size}-byte frames", contestant.name()))?;
                runs[i].push(run);
            }
        }
        for (contestant, runs) in contestants.iter().zip(runs) {
            results.push((size, *contestant, runs));
        }
    }

    println!("{references}{}", table(&results, rounds));
    std::fs::write(json, to_json(&results))?;
    eprintln!("xtask: every run in {}", json.display());
    Ok(())
}

/// Both generators' rates with nothing capturing, for the reference line: tcpreplay
/// `--topspeed` on a file of the same frames, and the project's generator.
fn reference_rates(lab: &Lab, scratch: &Scratch, traffic: &generator::Options) -> Result<String> {
    let file = scratch.join(&format!("frames-{}.pcap", traffic.size));
    write_traffic(&file, traffic.size, traffic.count, traffic.dst_mac)?;
    eprintln!(
        "xtask: {}-byte frames with nothing capturing: tcpreplay, then the generator",
        traffic.size
    );
    let tcpreplay = generator::tcpreplay_pps(&lab.gen, &traffic.iface, &file)?;
    let _ = std::fs::remove_file(&file);
    let ours = generator::run_in(&lab.gen, traffic)?;
    Ok(format!(
        "{}-byte frames, nothing capturing: tcpreplay --topspeed reaches {:.0} pps, the \
         generator {:.0} pps ({:.1}x)\n",
        traffic.size,
        tcpreplay,
        ours.pps(),
        ours.pps() / tcpreplay
    ))
}

/// Where and how the contestants capture.
struct Capture<'a> {
    lab: &'a Lab,
    /// The capture end of the veth.
    iface: &'a str,
    /// A tcpdump filter for every contestant (all frames when `None`).
    filter: Option<&'a str>,
    /// The CPU every capturing process is pinned to, if any.
    cpu: Option<usize>,
}

/// One burst of `traffic` captured by `contestant`.
fn measure(
    on: &Capture,
    contestant: Contestant,
    traffic: &generator::Options,
    tls: Option<&pipeline::TlsPair>,
    ticks: f64,
) -> Result<Run> {
    let (lab, iface) = (on.lab, on.iface);
    let dir = Scratch::new("bench-run")?;
    match contestant {
        Contestant::Tcpdump => {
            let out = dir.join("tcpdump.pcap");
            let mut tcpdump = start_baseline(lab, iface, on.filter, &out)?;
            pin(on, tcpdump.pid())?;
            let startup_cpu = usage(tcpdump.pid(), ticks)?.0;
            let sent = generator::run_in(&lab.gen, traffic)?;
            std::thread::sleep(SETTLE);
            let (cpu, capture_rss_kib) = usage(tcpdump.pid(), ticks)?;
            tcpdump.stop()?;
            let log = tcpdump.stderr();
            let dropped = number_before(&log, "packets dropped by kernel")?;
            Ok(Run {
                written: number_before(&log, "packets captured")?,
                dropped,
                dropped_kernel: dropped,
                capture_cpu: cpu - startup_cpu,
                startup_cpu,
                capture_rss_kib,
                ..Run::sent(&sent)
            })
        }
        Contestant::Pipeline => {
            let tls = tls.context("the pipeline needs the receiver's TLS pair")?;
            measure_pipeline(lab, iface, traffic, tls, ticks, &dir)
        }
        Contestant::Sensor(mode) | Contestant::Attributing(mode) => {
            let (mut receiver, out) = Receiver::writing(Some(&lab.cap), &dir, "out.pcap", &[])?;
            let mut args = vec!["--iface", iface, "--mode", mode];
            if mode == "afxdp" {
                args.push("--dedicated");
            }
            if let Contestant::Attributing(_) = contestant {
                args.push("--attribute");
            }
            args.extend(on.filter);
            let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args)?;
            pin(on, receiver.proc.pid())?;
            pin(on, sensor.pid())?;
            let startup_cpu = usage(sensor.pid(), ticks)?.0;
            let sent = generator::run_in(&lab.gen, traffic)?;
            std::thread::sleep(SETTLE);
            let (cpu, capture_rss_kib) = usage(sensor.pid(), ticks)?;
            sensor.stop()?;
            let (receiver_cpu, receiver_rss_kib) = usage(receiver.proc.pid(), ticks)?;
            receiver.stop()?;
            let figures = sensor_figures(&sensor.summary()?, iface)?;
            let written = count_records(&out)?;
            let _ = std::fs::remove_file(&out);
            Ok(Run {
                written,
                dropped: figures.dropped,
                dropped_kernel: figures.reason("kernel_buffer"),
                dropped_sensor_buffer: figures.reason("sensor_buffer"),
                capture_cpu: cpu - startup_cpu,
                startup_cpu,
                receiver_cpu,
                capture_rss_kib,
                receiver_rss_kib,
                ..Run::sent(&sent)
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
    traffic: &generator::Options,
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
    let startup_cpu = usage(tcpdump.id(), ticks)?.0 + usage(tunnel.id(), ticks)?.0;
    let sent = generator::run_in(&lab.gen, traffic)?;
    std::thread::sleep(SETTLE);
    let (tcpdump_cpu, tcpdump_rss) = usage(tcpdump.id(), ticks)?;
    let (tunnel_cpu, tunnel_rss) = usage(tunnel.id(), ticks)?;
    let (writer_cpu, writer_rss) = usage(writer.id(), ticks)?;
    testbed::run("kill", &["-TERM", &tcpdump.id().to_string()])?;
    pipeline::wait_ok(&mut tcpdump, "tcpdump", &logs[0])?;
    pipeline::wait_ok(&mut tunnel, "socat (tunnel)", &logs[1])?;
    pipeline::wait_ok(&mut writer, "socat (writer)", &logs[2])?;
    let log = std::fs::read_to_string(&logs[0])?;
    let dropped = number_before(&log, "packets dropped by kernel")?;
    Ok(Run {
        written: count_records(&out)?,
        dropped,
        dropped_kernel: dropped,
        capture_cpu: tcpdump_cpu + tunnel_cpu - startup_cpu,
        startup_cpu,
        receiver_cpu: writer_cpu,
        capture_rss_kib: tcpdump_rss + tunnel_rss,
        receiver_rss_kib: writer_rss,
        ..Run::sent(&sent)
    })
}

impl Run {
    /// A run's figures so far: what the generator offered.
    fn sent(sent: &generator::Sent) -> Self {
        Self {
            offered: sent.frames,
            generator_pps: sent.pps(),
            refused: sent.refused,
            ..Self::default()
        }
    }
}

/// `tcpdump -w file` as a user would run it for a long capture: no immediate mode, a
/// 32 MiB kernel buffer so that it too has room for bursts.
fn start_baseline(lab: &Lab, iface: &str, filter: Option<&str>, out: &Path) -> Result<Proc> {
    let mut argv = lab.cap.command("tcpdump");
    let out = out.to_string_lossy().into_owned();
    argv.extend(
        [
            "-i", iface, "-s", "262144", "-B", "32768", "-Z", "root", "-w", &out,
        ]
        .iter()
        .chain(&filter)
        .map(|s| s.to_string()),
    );
    let mut proc = Proc::start("tcpdump", &argv, std::process::Stdio::null())?;
    proc.wait_for("listening on", Duration::from_secs(10))?;
    Ok(proc)
}

/// Pins every thread of process `pid` (and the threads it starts later) to the capture CPU,
/// if there is one, and with it the NAPI threads of the capture interface (threaded NAPI),
/// which exist once an XDP program made the veth use NAPI.
fn pin(on: &Capture, pid: u32) -> Result<()> {
    let Some(cpu) = on.cpu else {
        return Ok(());
    };
    let cpu = cpu.to_string();
    let napi = format!("napi/{}-", on.iface);
    let mut pids = vec![pid];
    for entry in std::fs::read_dir("/proc")? {
        let Ok(task) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{task}/comm")).unwrap_or_default();
        if comm.starts_with(&napi) {
            pids.push(task);
        }
    }
    for pid in pids {
        testbed::run("taskset", &["-a", "-cp", &cpu, &pid.to_string()])?;
    }
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

/// Packet records in a classic pcap file, read header by header (the loss-free rate's files
/// reach gigabytes).
fn count_records(path: &Path) -> Result<u64> {
    use std::io::{BufReader, Read, Seek, SeekFrom};
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    reader.seek(SeekFrom::Start(24))?;
    let mut header = [0u8; 16];
    let mut n = 0;
    loop {
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(n),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
        let captured = u32::from_le_bytes(header[8..12].try_into()?);
        reader.seek_relative(i64::from(captured))?;
        n += 1;
    }
}

pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
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
fn write_traffic(path: &Path, size: usize, count: u64, dst_mac: [u8; 6]) -> Result<()> {
    let frame = udp_frame(size, dst_mac)?;
    let mut out = Vec::with_capacity(24 + count as usize * (16 + size));
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
        "\nCapture at the generator's full rate, median of {rounds} interleaved rounds \
         (dropped: all, then kernel buffer / sensor buffer)\n"
    );
    let _ = writeln!(
        out,
        "| frames | who | generator kpps | offered | written | dropped | capture CPU s/Mpkt | receiver CPU s/Mpkt | capture peak RSS MiB | receiver peak RSS MiB |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (size, contestant, runs) in results {
        let pick = |f: fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let offered = pick(|r| r.offered as f64);
        let per_million = |cpu: f64| cpu / (offered / 1e6);
        let receiving = |figure: String| match contestant {
            Contestant::Tcpdump => "-".to_string(),
            _ => figure,
        };
        let _ = writeln!(
            out,
            "| {size} B | {} | {:.0} | {offered:.0} | {:.0} | {:.0} ({:.0} / {:.0}) | {:.2} | {} | {:.1} | {} |",
            cell(&contestant.name()),
            pick(|r| r.generator_pps) / 1e3,
            pick(|r| r.written as f64),
            pick(|r| r.dropped as f64),
            pick(|r| r.dropped_kernel as f64),
            pick(|r| r.dropped_sensor_buffer as f64),
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
    // Per million frames offered.
    let total = |runs: &[Run]| {
        median(
            &mut runs
                .iter()
                .map(|r| (r.capture_cpu + r.receiver_cpu) / (r.offered as f64 / 1e6))
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
        let (ours, theirs) = (total(runs), total(baseline));
        let x = ours / theirs;
        let _ = writeln!(
            out,
            "- {size} B, {}: {ours:.2} vs {theirs:.2} s/Mpkt = {x:.2}x ({})",
            contestant.name(),
            if x <= 0.5 { "met" } else { "missed" }
        );
    }
    attribution_cost(results, &mut out);
    out
}

/// Capture CPU per frame with `--attribute` against the same mode's without it, where the
/// run had both (target: at most 1.1x).
fn attribution_cost(results: &[(usize, Contestant, Vec<Run>)], out: &mut String) {
    // Per frame offered, from the traffic's start; and the start-up, once per run.
    let medians = |size: usize, contestant: Contestant| {
        results
            .iter()
            .find(|(s, c, _)| *s == size && *c == contestant)
            .map(|(_, _, runs)| {
                let per_frame = median(
                    &mut runs
                        .iter()
                        .map(|r| r.capture_cpu / (r.offered as f64 / 1e6))
                        .collect::<Vec<_>>(),
                );
                let startup = median(&mut runs.iter().map(|r| r.startup_cpu).collect::<Vec<_>>());
                (per_frame, startup)
            })
    };
    let mut header = false;
    for (size, contestant, _) in results {
        let Contestant::Attributing(mode) = *contestant else {
            continue;
        };
        let (Some((on, on_startup)), Some((off, off_startup))) = (
            medians(*size, *contestant),
            medians(*size, Contestant::Sensor(mode)),
        ) else {
            continue;
        };
        if !std::mem::replace(&mut header, true) {
            let _ = writeln!(
                out,
                "\nCapture CPU with --attribute against without, same run, from the traffic's \
                 start (target: at most 1.1x); start-up CPU beside it\n"
            );
        }
        let x = on / off;
        let _ = writeln!(
            out,
            "- {size} B, --mode {mode}: {on:.3} vs {off:.3} s/Mpkt = {x:.2}x ({}); start-up \
             {:.0} vs {:.0} ms",
            if x <= 1.1 { "met" } else { "missed" },
            on_startup * 1e3,
            off_startup * 1e3,
        );
    }
}

fn to_json(results: &[(usize, Contestant, Vec<Run>)]) -> String {
    json_array(results.iter().flat_map(|(size, contestant, runs)| {
        runs.iter().map(move |run| {
            serde_json::json!({
                "frame_bytes": size,
                "who": contestant.name(),
                "generator_pps": run.generator_pps.round(),
                "refused_and_resent": run.refused,
                "offered": run.offered,
                "written": run.written,
                "dropped": run.dropped,
                "dropped_kernel": run.dropped_kernel,
                "dropped_sensor_buffer": run.dropped_sensor_buffer,
                "capture_cpu_s": milli(run.capture_cpu),
                "startup_cpu_s": milli(run.startup_cpu),
                "receiver_cpu_s": milli(run.receiver_cpu),
                "capture_peak_rss_kib": run.capture_rss_kib,
                "receiver_peak_rss_kib": run.receiver_rss_kib,
            })
        })
    }))
}

/// A JSON array of `objects`, one a line.
fn json_array(objects: impl Iterator<Item = serde_json::Value>) -> String {
    let rows: Vec<String> = objects.map(|o| format!("  {o}")).collect();
    format!("[\n{}\n]\n", rows.join(",\n"))
}

/// `x` to three decimals, as the JSON files give seconds.
fn milli(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `text` for a Markdown table cell: its pipes escaped.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}
