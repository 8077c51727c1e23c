//! `cargo xtask bench --only lake`: the capture lake (issue 16). Ingest: the shared corpus
//! looped (200 MB of packet data) streamed by `sensor --read` into a receiver writing a
//! pcapng file, then into one writing a lake (`--lake`, 64 MiB segments): the receiver's CPU
//! per packet of each, and the lake's index bytes over its segment bytes. Query: the corpus
//! looped to 1.1 GB into a lake, then one host and port over one minute with
//! `receiver query --stats` (bytes fetched over the lake's bytes, time) against `tcpdump -r`
//! with the same filter over every segment file. Ratios from one run each.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use testbed::capstream::{Receiver, Scratch};
use testbed::Netns;

use super::streaming::{loop_corpus_to, timed_sensor, Traffic};

/// Packet data of the ingest runs and of the query's lake.
const INGEST_BYTES: u64 = 200_000_000;
const LAKE_BYTES: u64 = 1_100_000_000;
/// The selective query: a DNS server of the corpus (42 packets per loop), over the first
/// minute of the looped capture (whose timestamps start at 0 and rise 1 µs a packet).
const FILTER: &str = "host 192.0.0.1 and udp port 53";
const FROM: &str = "1970-01-01T00:00:00Z";
const TO: &str = "00:01";

pub fn run(out_dir: &Path, ticks: f64) -> Result<()> {
    let corpus = testbed::corpus_dir().join("tcpdump-tests.pcap");
    let ns = Netns::new("bnlake")?;
    let scratch = Scratch::new("bench-lake")?;
    let input = loop_corpus_to(&corpus, &scratch.join("ingest.pcap"), INGEST_BYTES)?;

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

    let big = loop_corpus_to(&corpus, &scratch.join("lake.pcap"), LAKE_BYTES)?;
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
