//! `cargo xtask bench --only micro`: the criterion micro-benchmarks. The wire format and
//! Snappy per MB (protocol/benches/batch.rs), the pcap and pcapng sinks per MB
//! (receiver/benches/sinks.rs) and the in-kernel filter per packet under
//! BPF_PROG_TEST_RUN beside libpcap's interpreter (sensor/benches/filter_cost.rs).
//!
//! Criterion leaves each case's figures in target/criterion/**/new/{benchmark,estimates}.json;
//! this reads them back into `bench-out/micro.json` and prints the tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::cell;
use crate::system::cmd;

/// (package and features, bench target, its criterion groups).
const BENCHES: [(&[&str], &str, &[&str]); 3] = [
    (&["-p", "protocol"], "batch", &["protocol", "snappy"]),
    (&["-p", "receiver"], "sinks", &["sink"]),
    // The filter's programs need no AF_XDP, so no libxdp build either.
    (
        &["-p", "sensor", "--no-default-features"],
        "filter_cost",
        &["bpf"],
    ),
];

/// One criterion case, as it reported it.
struct Case {
    group: String,
    id: String,
    /// Per iteration.
    median_ns: f64,
    mean_ns: f64,
    /// Bytes per iteration, for the per-MB cases.
    bytes: Option<u64>,
}

impl Case {
    fn mb_per_s(&self) -> Option<f64> {
        self.bytes.map(|b| b as f64 / self.median_ns * 1e3)
    }
}

pub fn run(out_dir: &Path) -> Result<()> {
    let criterion = crate::root().join("target/criterion");
    // Where the benchmarks write, whatever their working directory.
    std::env::set_var("CRITERION_HOME", &criterion);
    for (package, bench, groups) in BENCHES {
        // Only this run's cases in the tables: criterion keeps earlier ones.
        for group in groups {
            match std::fs::remove_dir_all(criterion.join(group)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context(format!("cannot clear target/criterion/{group}"))
                }
                _ => {}
            }
        }
        cmd(
            "cargo",
            &[&["bench"], package, &["--bench", bench]].concat(),
        )?;
    }
    let cases = read_cases(&criterion)?;
    println!("{}", table(&cases));
    let json_path = out_dir.join("micro.json");
    std::fs::write(&json_path, to_json(&cases)?)?;
    eprintln!("xtask: every case in {}", json_path.display());
    Ok(())
}

/// Every case under `dir` (criterion's output), sorted by group and id.
fn read_cases(dir: &Path) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for path in benchmark_files(dir)? {
        let read = |p: &Path| -> Result<Value> {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
        };
        let benchmark = read(&path)?;
        let estimates = read(&path.with_file_name("estimates.json"))?;
        let text = |v: &Value, key: &str| v[key].as_str().unwrap_or_default().to_string();
        let point = |key: &str| estimates[key]["point_estimate"].as_f64();
        let (Some(median_ns), Some(mean_ns)) = (point("median"), point("mean")) else {
            anyhow::bail!("{}: no median or mean", path.display());
        };
        cases.push(Case {
            group: text(&benchmark, "group_id"),
            id: text(&benchmark, "function_id"),
            median_ns,
            mean_ns,
            bytes: benchmark["throughput"]["Bytes"].as_u64(),
        });
    }
    cases.sort_by(|a, b| (&a.group, &a.id).cmp(&(&b.group, &b.id)));
    Ok(cases)
}

/// Every `new/benchmark.json` below `dir`.
fn benchmark_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.ends_with("new/benchmark.json") {
                found.push(path);
            }
        }
    }
    Ok(found)
}

fn table(cases: &[Case]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\nPer MB of packet data (criterion median)\n");
    let _ = writeln!(out, "| case | MB/s | µs per pass | MB per pass |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    for case in cases {
        let (Some(mb_per_s), Some(bytes)) = (case.mb_per_s(), case.bytes) else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {}/{} | {mb_per_s:.0} | {:.1} | {:.3} |",
            case.group,
            case.id,
            case.median_ns / 1e3,
            bytes as f64 / 1e6
        );
    }

    // bpf cases are "<who>/<filter>/<frame>"; a filter may hold a slash (net 10.0.0.0/8).
    let mut rows: BTreeMap<(String, String), BTreeMap<String, f64>> = BTreeMap::new();
    let mut columns: Vec<String> = Vec::new();
    for case in cases.iter().filter(|c| c.group == "bpf") {
        let (Some((who, rest)), Some((_, frame))) =
            (case.id.split_once('/'), case.id.rsplit_once('/'))
        else {
            continue;
        };
        let filter = &rest[..rest.len() - frame.len() - 1];
        if !columns.iter().any(|c| c == who) {
            columns.push(who.to_string());
        }
        rows.entry((filter.to_string(), frame.to_string()))
            .or_default()
            .insert(who.to_string(), case.median_ns);
    }
    if !rows.is_empty() {
        columns.sort_by_key(|c| (c != "libpcap", c.clone()));
        let _ = writeln!(
            out,
            "\nFilter cost, ns per packet (BPF_PROG_TEST_RUN mean; libpcap: its user-space \
             interpreter)\n"
        );
        let _ = writeln!(out, "| filter | frame | {} |", columns.join(" | "));
        let _ = writeln!(out, "| --- | --- |{}", " --- |".repeat(columns.len()));
        for ((filter, frame), by_who) in &rows {
            let figures: Vec<String> = columns
                .iter()
                .map(|c| by_who.get(c).map_or("-".into(), |ns| format!("{ns:.1}")))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {frame} | {} |",
                cell(filter),
                figures.join(" | ")
            );
        }
    }
    out
}

fn to_json(cases: &[Case]) -> Result<String> {
    let cases: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({
                "group": c.group,
                "id": c.id,
                "median_ns": c.median_ns,
                "mean_ns": c.mean_ns,
                "bytes": c.bytes,
                "mb_per_s": c.mb_per_s(),
            })
        })
        .collect();
    Ok(serde_json::to_string_pretty(&cases)? + "\n")
}
