//! `cargo xtask bench --only lake`: the capture lake (issue 16). Ingest: the shared corpus
//! looped (200 MB of packet data) streamed by `sensor --read` into a receiver writing a
//! pcapng file, then into one writing a lake (`--lake`, 64 MiB segments): the receiver's CPU
//! per packet of each, and the lake's index bytes over its segment bytes. Query: the corpus
//! looped to 1.1 GB into a lake, its timestamps spread over an hour (about 600 µs apart),
//! then one host and port over one minute with
//! `receiver query --stats` (bytes fetched over the lake's bytes, time) against `tcpdump -r`
//! with the same filter over every segment file. Ratios from one run each.
//!
//! Beside stenographer (Debian's `stenographer`, the real peer): the corpus replayed live by
//! tcpreplay on the capture bench's veth pair, captured at once by stenographer and by
//! `sensor --iface` into `receiver --lake`; then the same query both ways (`stenoread` and
//! `receiver query`): wall time, packets returned, and each store's bytes on disk.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::capstream::{
    number_after, sensor_figures, start_sensor, summary_figure, tshark_count, Receiver, Scratch,
};
use testbed::{Lab, Netns, Proc};

use super::streaming::{loop_corpus_to, timed_sensor, Traffic};

/// Packet data of the ingest runs and of the query's lake.
const INGEST_BYTES: u64 = 200_000_000;
const LAKE_BYTES: u64 = 1_100_000_000;
/// Microseconds between the query lake's packets: 1.1 GB of the corpus (about 5.2 million
/// packets) over about an hour.
const LAKE_STEP_US: u64 = 700;
/// The selective query: a DNS server of the corpus (42 packets per loop), over one minute
/// in the middle of the looped capture (whose timestamps start at 0).
const FILTER: &str = "host 192.0.0.1 and udp port 53";
const FROM: &str = "1970-01-01T00:30:00Z";
const TO: &str = "00:31";

pub fn run(out_dir: &Path, ticks: f64) -> Result<()> {
    let corpus = testbed::corpus_dir().join("tcpdump-tests.pcap");
    beside_stenographer(&corpus, out_dir)?;
    let ns = Netns::new("bnlake")?;
    let scratch = Scratch::new("bench-lake")?;
    let input = loop_corpus_to(&corpus, &scratch.join("ingest.pcap"), INGEST_BYTES, 1)?;

    let dir = Scratch::new("bench-lake-file")?;
    let (receiver, _out) = Receiver::writing(Some(&ns), &dir, "out.pcapng", &[])?;
    let file = timed_sensor(&ns, &input, ticks, &dir, receiver)?.0;
    drop(dir);
    let dir = Scratch::new("bench-lake-lake")?;
    let (lake, _) = lake_run(&ns, &dir, &input, ticks)?;
    let file_cpu = file.writer_cpu / input.packets as f64;
    let lake_cpu = lake.writer_cpu / input.packets as f64;
    let (segments, index) = sizes(&dir.join("lake"))?;
    drop(dir);
    std::fs::remove_file(&input.path)?;

    let big = loop_corpus_to(
        &corpus,
        &scratch.join("lake.pcap"),
        LAKE_BYTES,
        LAKE_STEP_US,
    )?;
    let dir = Scratch::new("bench-lake-query")?;
    let lake_dir = dir.join("lake");
    lake_run(&ns, &dir, &big, ticks)?;
    std::fs::remove_file(&big.path)?;
    let (big_segments, big_index) = sizes(&lake_dir)?;
    let lake_arg = lake_dir.to_string_lossy().into_owned();
    let answer = dir.join("answer.pcapng");
    let started = Instant::now();
    let query = std::process::Command::new(testbed::workspace_bin("receiver"))
        .args([
            "query", "--lake", &lake_arg, "--from", FROM, "--to", TO, "--stats", "-w",
        ])
        .arg(&answer)
        .arg(FILTER)
        .output()?;
    let query_seconds = started.elapsed().as_secs_f64();
    let stats = String::from_utf8_lossy(&query.stderr).into_owned();
    if !query.status.success() {
        bail!("receiver query failed: {stats}");
    }
    let fetched = stats_figure(&stats, " of ")?;
    let matched = stats_figure(&stats, " packet(s) matched")?;
    if matched == 0 {
        bail!("the query matched nothing: {stats}");
    }
    let started = Instant::now();
    for segment in files(&lake_dir, ".pcapng")? {
        let segment = segment.to_string_lossy().into_owned();
        testbed::run("tcpdump", &["-r", &segment, "-w", "/dev/null", FILTER])?;
    }
    let tcpdump_seconds = started.elapsed().as_secs_f64();

    let lake_total = big_segments + big_index;
    let json = serde_json::json!({
        "ingest_packets": input.packets,
        "file_cpu_us_per_packet": file_cpu * 1e6,
        "lake_cpu_us_per_packet": lake_cpu * 1e6,
        "cpu_ratio": lake_cpu / file_cpu,
        "index_over_segments": index as f64 / segments as f64,
        "query_lake_bytes": lake_total,
        "query_bytes_fetched": fetched,
        "query_fraction_fetched": fetched as f64 / lake_total as f64,
        "query_seconds": query_seconds,
        "tcpdump_seconds": tcpdump_seconds,
        "speedup": tcpdump_seconds / query_seconds,
        "query_matched": matched,
        "filter": FILTER,
    });
    println!(
        "\nLake: ingest {} packets ({} MB): receiver CPU {:.3} µs/packet into a pcapng file, \
         {:.3} µs/packet into a lake: {:.2}x. Index {:.1}% of segment bytes.\n\
         Query '{FILTER}' over one minute of a {:.2} GB lake ({} segments): {:.3}% of its \
         bytes fetched, {:.2} s, against {:.2} s for tcpdump -r over every segment: {:.1}x \
         ({matched} packets).",
        input.packets,
        input.bytes / 1_000_000,
        file_cpu * 1e6,
        lake_cpu * 1e6,
        lake_cpu / file_cpu,
        100.0 * index as f64 / segments as f64,
        lake_total as f64 / 1e9,
        files(&lake_dir, ".pcapng")?.len(),
        100.0 * fetched as f64 / lake_total as f64,
        query_seconds,
        tcpdump_seconds,
        tcpdump_seconds / query_seconds,
    );
    let path = out_dir.join("lake.json");
    std::fs::write(&path, format!("{json:#}\n"))?;
    eprintln!("xtask: the lake's figures in {}", path.display());
    Ok(())
}

/// Streams `input` into a receiver writing a lake in `dir`/lake; the run's figures.
fn lake_run(
    ns: &Netns,
    dir: &Scratch,
    input: &Traffic,
    ticks: f64,
) -> Result<(super::streaming::Run, serde_json::Value)> {
    let lake = dir.join("lake");
    std::fs::create_dir_all(&lake)?;
    let lake_arg = lake.to_string_lossy().into_owned();
    let receiver = Receiver::start(
        Some(ns),
        &dir.join("state"),
        4433,
        &["--lake", &lake_arg, "--receiver-name", "bench"],
    )?;
    timed_sensor(ns, input, ticks, dir, receiver)
}

/// Bytes of the lake's segments and of its indexes.
fn sizes(lake: &Path) -> Result<(u64, u64)> {
    let total = |suffix| -> Result<u64> {
        files(lake, suffix)?
            .iter()
            .map(|p| Ok(std::fs::metadata(p)?.len()))
            .sum()
    };
    Ok((total(".pcapng")?, total(".parquet")?))
}

/// The lake's files whose names end in `suffix`.
fn files(lake: &Path, suffix: &str) -> Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    let mut dirs = vec![lake.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
    }
    Ok(found)
}

/// The number just before `label` in `text` (the query's `--stats` line).
fn stats_figure(text: &str, label: &str) -> Result<u64> {
    let head = &text[..text.find(label).context("no figure")?];
    let start = head
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    head[start..]
        .parse()
        .with_context(|| format!("no number before {label:?} in {text}"))
}

/// The live replay of the stenographer comparison: the corpus (7,907 packets) this many
/// times at this rate (about 32 s), slow enough that both capture every packet.
const REPLAY_LOOPS: u32 = 4;
const REPLAY_PPS: u32 = 1000;
/// The query both ways, in the language both understand (stenographer's has no `udp port`):
/// a DNS server of the corpus, 42 packets per loop.
const STENO_QUERY: &str = "host 192.0.0.1 and port 53";
/// Every packet stenographer holds: its queries need a condition, and this bench's capture
/// is minutes old.
const STENO_EVERYTHING: &str = "after 24h ago";
/// Runs of each query; the median wall time is reported.
const QUERY_RUNS: usize = 5;
/// stenotype's file age: a file (and its index) is readable once closed. Its minimum is its
/// block age, 10 s.
const STENO_FILE_AGE: Duration = Duration::from_secs(10);
/// stenographer's API port, on 127.0.0.1 of the capture namespace.
const STENO_PORT: u16 = 18987;

/// A running stenographer and its stenotype. Stopped (SIGTERM, then SIGKILL) on drop.
struct Stenographer {
    proc: Proc,
}

impl Stenographer {
    /// Starts stenographer in `ns` with `config`, its temporary directory under `tmp`; waits
    /// until stenotype has opened its first packet file (its socket is then capturing).
    fn start(ns: &Netns, config: &Path, tmp: &Path, packets: &Path) -> Result<Self> {
        std::fs::create_dir_all(tmp)?;
        let mut argv = vec!["env".to_string(), format!("TMPDIR={}", tmp.display())];
        argv.extend(ns.command("stenographer"));
        argv.extend(["-config".into(), config.display().to_string()]);
        argv.push("-syslog=false".into());
        let steno = Self {
            proc: Proc::start("stenographer", &argv, std::process::Stdio::null())?,
        };
        let started = testbed::wait_until(Duration::from_secs(30), || {
            std::fs::read_dir(packets).is_ok_and(|mut d| d.next().is_some())
        });
        if !started {
            bail!(
                "stenotype did not start; stenographer said:\n{}",
                steno.proc.stderr()
            );
        }
        Ok(steno)
    }

    /// stenographer and its stenotype (which outlives a stenographer stopped alone). Go
    /// starts it from any of its threads, so every thread's children.
    fn pids(&self) -> Vec<u32> {
        let pid = self.proc.pid();
        let mut pids = vec![pid];
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for thread in threads.flatten() {
            let children = std::fs::read_to_string(thread.path().join("children"));
            pids.extend(
                children
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        pids
    }
}

impl Drop for Stenographer {
    fn drop(&mut self) {
        let pids = self.pids();
        let alive = |pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        };
        for pid in &pids {
            let _ = testbed::run("kill", &["-TERM", &pid.to_string()]);
        }
        let _ = self.proc.wait(Duration::from_secs(5));
        testbed::wait_until(Duration::from_secs(5), || !pids.iter().any(alive));
        for pid in pids.iter().filter(|p| alive(p)) {
            let _ = testbed::run("kill", &["-KILL", &pid.to_string()]);
        }
    }
}

/// The same live replay into stenographer and into a lake, then the same query both ways.
fn beside_stenographer(corpus: &Path, out_dir: &Path) -> Result<()> {
    let lab = Lab::new(1)?;
    let (gen_iface, iface) = lab.links[0].clone();
    let dir = Scratch::new("bench-lake-steno")?;
    let (packets, index, lake) = (dir.join("packets"), dir.join("index"), dir.join("lake"));
    for d in [&packets, &index, &lake] {
        std::fs::create_dir_all(d)?;
    }
    let config = dir.join("stenographer.json");
    let config_json = serde_json::json!({
        "Threads": [{
            "PacketsDirectory": packets,
            "IndexDirectory": index,
            // The shared disk is nearly full; stenographer would delete its files otherwise.
            "DiskFreePercentage": 1,
        }],
        "StenotypePath": "/usr/sbin/stenotype",
        "Interface": iface,
        "Port": STENO_PORT,
        "Host": "127.0.0.1",
        "CertPath": "/etc/stenographer/certs",
        // Root, not stenographer's default `nobody`, which cannot enter its temporary
        // directory here; 256 blocks of 1 MiB rather than 2,048 (2 GiB of memory).
        "Flags": [
            "--uid=root", "--gid=root", "--seccomp=none",
            format!("--fileage_sec={}", STENO_FILE_AGE.as_secs()), "--blocks=256",
        ],
    });
    std::fs::write(&config, format!("{config_json:#}\n"))?;
    let steno = Stenographer::start(&lab.cap, &config, &dir.join("tmp"), &packets)?;
    let lake_arg = lake.to_string_lossy().into_owned();
    let mut receiver = Receiver::start(
        Some(&lab.cap),
        &dir.join("state"),
        4433,
        &[
            "--lake",
            &lake_arg,
            "--receiver-name",
            "bench",
            "--segment-time",
            "10s",
        ],
    )?;
    let mut sensor = start_sensor(Some(&lab.cap), &receiver, &["--iface", &iface])?;

    let corpus_arg = corpus.to_string_lossy().into_owned();
    let (loops, pps) = (REPLAY_LOOPS.to_string(), REPLAY_PPS.to_string());
    let replay = lab.gen.exec(
        "tcpreplay",
        &[
            "-q",
            "--loop",
            &loops,
            "--pps",
            &pps,
            "-i",
            &gen_iface,
            &corpus_arg,
        ],
    )?;
    let sent = number_after(&replay, "Actual: ")?;
    // The sensor's and receiver's stops close and publish the lake's last segment.
    sensor.stop()?;
    let sensor_figures = sensor_figures(&sensor.summary()?, &iface)?;
    receiver.stop()?;
    let lake_written = summary_figure(&receiver.proc.summary()?, "/sessions/0/written/packets")?;

    let stenoread = |query: &str, out: &Path| -> Result<()> {
        let mut argv = vec![format!("STENOGRAPHER_CONFIG={}", config.display())];
        argv.extend(lab.cap.command("stenoread"));
        argv.extend([query.to_string(), "-w".into(), out.display().to_string()]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        testbed::run("env", &argv).map(drop)
    };
    // stenotype's last packets become readable once the kernel retires their block (10 s)
    // and their file closes (a file age later): until stenographer holds every packet sent,
    // or a minute.
    let steno_all = dir.join("steno-all.pcap");
    let deadline = Instant::now() + 6 * STENO_FILE_AGE;
    let steno_captured = loop {
        stenoread(STENO_EVERYTHING, &steno_all)?;
        let captured = tshark_count(&steno_all)?;
        if captured as u64 >= sent || Instant::now() >= deadline {
            break captured;
        }
        std::thread::sleep(Duration::from_secs(5));
    };
    std::fs::remove_file(&steno_all)?;

    let steno_answer = dir.join("steno-answer.pcap");
    let steno_seconds = median_seconds(|| stenoread(STENO_QUERY, &steno_answer))?;
    let steno_matched = tshark_count(&steno_answer)?;
    let lake_answer = dir.join("lake-answer.pcapng");
    let lake_seconds = median_seconds(|| {
        testbed::run(
            &testbed::workspace_bin("receiver").to_string_lossy(),
            &[
                "query",
                "--lake",
                &lake_arg,
                "-w",
                &lake_answer.to_string_lossy(),
                STENO_QUERY,
            ],
        )
        .map(drop)
    })?;
    let lake_matched = tshark_count(&lake_answer)?;
    drop(steno);

    let steno_disk = disk_use(&[&packets, &index])?;
    let lake_disk = disk_use(&[&lake])?;
    let (segments, indexes) = sizes(&lake)?;
    let json = serde_json::json!({
        "replay": format!("corpus x{REPLAY_LOOPS} at {REPLAY_PPS} pps (tcpreplay)"),
        "sent": sent,
        "stenographer_captured": steno_captured,
        "sensor_delivered": sensor_figures.delivered,
        "sensor_dropped": sensor_figures.dropped,
        "lake_written": lake_written,
        "query": STENO_QUERY,
        "query_runs": QUERY_RUNS,
        "stenoread_seconds_median": steno_seconds,
        "lake_query_seconds_median": lake_seconds,
        "stenoread_packets": steno_matched,
        "lake_query_packets": lake_matched,
        "stenographer_bytes": steno_disk.0,
        "stenographer_allocated_bytes": steno_disk.1,
        "stenographer_packets_bytes": disk_use(&[&packets])?.0,
        "stenographer_index_bytes": disk_use(&[&index])?.0,
        "lake_segments_bytes": segments,
        "lake_indexes_bytes": indexes,
        "lake_bytes": lake_disk.0,
        "lake_allocated_bytes": lake_disk.1,
    });
    println!(
        "\nBeside stenographer: {sent} packets replayed at {REPLAY_PPS} pps; stenographer \
         captured {steno_captured}, the lake {lake_written} (sensor dropped {}). Query \
         '{STENO_QUERY}' (median of {QUERY_RUNS}): stenoread {:.3} s, {steno_matched} packets; \
         receiver query {:.3} s, {lake_matched} packets. On disk: stenographer {} bytes \
         ({} allocated), the lake {} bytes ({} allocated).",
        sensor_figures.dropped,
        steno_seconds,
        lake_seconds,
        steno_disk.0,
        steno_disk.1,
        lake_disk.0,
        lake_disk.1,
    );
    let path = out_dir.join("lake-stenographer.json");
    std::fs::write(&path, format!("{json:#}\n"))?;
    eprintln!(
        "xtask: the stenographer comparison's figures in {}",
        path.display()
    );
    Ok(())
}

/// The median wall time of [`QUERY_RUNS`] runs of `query`.
fn median_seconds(mut query: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(QUERY_RUNS);
    for _ in 0..QUERY_RUNS {
        let started = Instant::now();
        query()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Bytes of every file under `dirs`, and the bytes allocated to them on disk.
fn disk_use(dirs: &[&Path]) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut allocated) = (0, 0);
    for dir in dirs {
        for file in files(dir, "")? {
            let meta = std::fs::metadata(&file)?;
            bytes += meta.len();
            allocated += meta.blocks() * 512;
        }
    }
    Ok((bytes, allocated))
}
