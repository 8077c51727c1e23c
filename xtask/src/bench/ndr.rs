//! `cargo xtask bench --only ndr`: each contestant's loss-free rate, RFC 2544's
//! "throughput": the highest offered rate at which it wrote every frame of a trial, found
//! by binary search, for 64-byte and 1500-byte frames.
//!
//! The bed is the capture bench's veth pair, split over the two CPUs: the generator pinned
//! to CPU 0, the contestant (tcpdump, or the sensor and its receiver), the capture end's
//! receive processing (RPS) and its NAPI threads pinned to CPU 1. The generator is XDP live
//! frames when the kernel allows it, else the AF_PACKET generator ([`generator`]); the
//! report says which and why. Every contestant runs the filter `udp dst port 9`, which
//! matches the generator's frames only, and a trial's loss is frames offered minus frames
//! the contestant wrote.
//!
//! The search: one trial at the generator's full speed (a contestant that loses nothing
//! there is at least as fast as the generator: the figure is then a lower bound); after a
//! loss, a trial just below the rate the contestant wrote at, then halving the interval
//! between the highest clean rate and the lowest lossy one until it is within
//! [`RESOLUTION`], at most [`MAX_TRIALS`] trials in all.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use testbed::Lab;

use super::{generator, json_array, measure, milli, parse_mac, Capture, Contestant, Run};

const FRAME_BYTES: [usize; 2] = [64, 1500];
/// The generator's frames only (the bench's frame goes to UDP port 9).
const FILTER: &str = "udp dst port 9";
const GENERATOR_CPU: usize = 0;
const CAPTURE_CPU: usize = 1;
/// The search stops once the lossy and the clean rate are this close (relative).
const RESOLUTION: f64 = 0.02;
const MAX_TRIALS: usize = 6;

/// One trial: the rate asked for (`None`: full speed) and what came of it.
struct Trial {
    asked_pps: Option<u64>,
    run: Run,
    /// CPU 1's softirq seconds over the trial (the capture end's receive processing).
    softirq_s: f64,
}

impl Trial {
    fn lost(&self) -> u64 {
        self.run.offered.saturating_sub(self.run.written)
    }

    /// CPU seconds of the contestant (tcpdump, or sensor and receiver) per million frames.
    fn cpu_s_per_mpkt(&self) -> f64 {
        (self.run.capture_cpu + self.run.receiver_cpu) / (self.run.offered as f64 / 1e6)
    }
}

/// A contestant's search.
struct Search {
    size: usize,
    contestant: Contestant,
    trials: Vec<Trial>,
}

impl Search {
    /// The loss-free trial of the highest offered rate.
    fn best(&self) -> Option<&Trial> {
        self.trials
            .iter()
            .filter(|t| t.lost() == 0)
            .max_by(|a, b| a.run.generator_pps.total_cmp(&b.run.generator_pps))
    }

    fn loss_free_pps(&self) -> f64 {
        self.best().map_or(0.0, |t| t.run.generator_pps)
    }

    /// Lossless even at the generator's full speed, and the link never held the generator
    /// back: the rate is a lower bound. (When the capture end pushes back, as the veth
    /// does once its NAPI ring is full, the generator's full speed is the capture's pace.)
    fn at_ceiling(&self) -> bool {
        self.trials
            .first()
            .is_some_and(|t| t.asked_pps.is_none() && t.lost() == 0 && t.run.refused == 0)
    }
}

/// Searches each of `contestants`' loss-free rate at each frame size (tcpdump among them is
/// the baseline of the ratios).
pub fn run(out_dir: &Path, trial: Duration, ticks: f64, contestants: &[Contestant]) -> Result<()> {
    let lab = Lab::new(1)?;
    let (gen_iface, iface) = lab.links[0].clone();
    let mac = lab
        .cap
        .exec("cat", &[&format!("/sys/class/net/{iface}/address")])?;
    let mac = parse_mac(mac.trim())?;
    // The capture end's receive processing on the capture CPU: RPS for frames that come
    // through the backlog, threaded NAPI (pinned with the contestant) for those that come
    // through the veth's NAPI (XDP attached, or GRO on). The NAPI must exist to be made
    // threaded; the setting outlives it.
    let queues = format!("/sys/class/net/{iface}/queues/rx-0/rps_cpus");
    lab.cap.exec(
        "sh",
        &[
            "-c",
            &format!(
                "echo {:x} > {queues} && ethtool -K {iface} gro on && \
                 echo 1 > /sys/class/net/{iface}/threaded && ethtool -K {iface} gro off",
                1 << CAPTURE_CPU
            ),
        ],
    )?;
    let xdp_live = live_frames_work(&lab, &gen_iface, &iface, mac)?;
    let on = Capture {
        lab: &lab,
        iface: &iface,
        filter: Some(FILTER),
        cpu: Some(CAPTURE_CPU),
    };

    let mut searches = Vec::new();
    let mut ceilings = String::new();
    for size in FRAME_BYTES {
        let traffic = |rate: Option<u64>, count: u64| generator::Options {
            iface: gen_iface.clone(),
            dst_mac: mac,
            size,
            count,
            rate,
            xdp_live,
            cpu: Some(GENERATOR_CPU),
        };
        // Full speed with nothing capturing, for the count of a full-speed trial.
        let probe = generator::run_in(&lab.gen, &traffic(None, 500_000))?;
        let ceiling = probe.pps();
        let _ = writeln!(
            ceilings,
            "- {size} B: the generator alone offers {:.0} kpps",
            ceiling / 1e3
        );
        // The capture bench's contestants but the pipeline (tcpdump is the baseline here).
        for &contestant in contestants {
            let mut search = Search {
                size,
                contestant,
                trials: Vec::new(),
            };
            let mut rate: Option<u64> = None;
            let (mut clean, mut lossy) = (0.0f64, f64::INFINITY);
            while search.trials.len() < MAX_TRIALS {
                let count = (rate.map_or(ceiling, |r| r as f64) * trial.as_secs_f64()) as u64;
                eprintln!(
                    "xtask: ndr, {size}-byte frames, {}: trial {} at {}",
                    contestant.name(),
                    search.trials.len() + 1,
                    rate.map_or("full speed".to_string(), |r| format!("{r} pps"))
                );
                let softirq_before = softirq_seconds(CAPTURE_CPU, ticks)?;
                let run = measure(&on, contestant, &traffic(rate, count.max(1)), None, ticks)
                    .with_context(|| format!("{} on {size}-byte frames", contestant.name()))?;
                let t = Trial {
                    asked_pps: rate,
                    run,
                    softirq_s: softirq_seconds(CAPTURE_CPU, ticks)? - softirq_before,
                };
                eprintln!(
                    "xtask: offered {} at {:.0} pps, written {}, lost {}",
                    t.run.offered,
                    t.run.generator_pps,
                    t.run.written,
                    t.lost()
                );
                let (offered_pps, lost, written_pps) = (
                    t.run.generator_pps,
                    t.lost(),
                    t.run.written as f64 / (t.run.offered as f64 / t.run.generator_pps),
                );
                search.trials.push(t);
                if lost == 0 {
                    if rate.is_none() {
                        break;
                    }
                    clean = clean.max(offered_pps);
                } else {
                    lossy = lossy.min(offered_pps);
                }
                if lossy - clean <= RESOLUTION * lossy {
                    break;
                }
                // After the first loss, just below what the contestant kept up with; then
                // halve the interval.
                let next = if clean == 0.0 && search.trials.len() == 1 {
                    written_pps * 0.97
                } else {
                    (clean + lossy) / 2.0
                };
                rate = Some(next.max(1.0) as u64);
            }
            searches.push(search);
        }
    }

    let generator_line = if xdp_live {
        "XDP live frames".to_string()
    } else {
        "the AF_PACKET generator (XDP live frames refused, see above)".to_string()
    };
    println!(
        "{}",
        table(&searches, trial, &format!("{generator_line}\n{ceilings}"))
    );
    let json = out_dir.join("ndr.json");
    std::fs::write(&json, to_json(&searches, xdp_live))?;
    eprintln!("xtask: every search in {}", json.display());
    Ok(())
}

/// Whether the generator can send through XDP live frames here: a short burst that must
/// reach the capture end (which needs GRO on, for NAPI, until an XDP program is attached).
/// When not, says why and leaves GRO off.
fn live_frames_work(lab: &Lab, gen_iface: &str, iface: &str, mac: [u8; 6]) -> Result<bool> {
    const PROBE: u64 = 10_000;
    lab.cap.exec("ethtool", &["-K", iface, "gro", "on"])?;
    let received = || -> Result<u64> {
        let path = format!("/sys/class/net/{iface}/statistics/rx_packets");
        Ok(lab.cap.exec("cat", &[&path])?.trim().parse()?)
    };
    let before = received()?;
    let probe = generator::Options {
        iface: gen_iface.to_string(),
        dst_mac: mac,
        size: 64,
        count: PROBE,
        rate: None,
        xdp_live: true,
        cpu: Some(GENERATOR_CPU),
    };
    let outcome = generator::run_in(&lab.gen, &probe);
    let arrived = received()? - before;
    match outcome {
        Ok(_) if arrived >= PROBE => return Ok(true),
        Ok(_) => eprintln!(
            "xtask: XDP live frames sent {PROBE} frames of which {arrived} arrived: using the \
             AF_PACKET generator"
        ),
        Err(e) => {
            eprintln!("xtask: XDP live frames unavailable ({e:#}): using the AF_PACKET generator")
        }
    }
    lab.cap.exec("ethtool", &["-K", iface, "gro", "off"])?;
    Ok(false)
}

/// Seconds CPU `cpu` has spent in softirqs since boot (/proc/stat).
fn softirq_seconds(cpu: usize, ticks: f64) -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let label = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
        .with_context(|| format!("no {label} in /proc/stat"))?;
    // cpuN user nice system idle iowait irq softirq ...
    let softirq: u64 = line
        .split_whitespace()
        .nth(7)
        .context("short /proc/stat line")?
        .parse()?;
    Ok(softirq as f64 / ticks)
}

/// The contestant's name in ndr.json.
fn key(contestant: Contestant) -> &'static str {
    match contestant {
        Contestant::Sensor(mode) | Contestant::Attributing(mode) => mode,
        Contestant::Tcpdump | Contestant::Pipeline => "tcpdump",
    }
}

fn table(searches: &[Search], trial: Duration, generator: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nLoss-free rate (0 frames lost over {} s), filter `{FILTER}`; generator: {generator}",
        trial.as_secs()
    );
    let _ = writeln!(
        out,
        "| frames | contestant | loss-free kpps | x tcpdump | CPU s/Mpkt (process) | CPU 1 softirq s/Mpkt | trials (kpps offered: frames lost) |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
    let tcpdump = |size: usize| {
        searches
            .iter()
            .find(|s| s.size == size && s.contestant == Contestant::Tcpdump)
    };
    for s in searches {
        let bound = if s.at_ceiling() { "≥ " } else { "" };
        let ratio = tcpdump(s.size)
            .map(|t| ratio_text(s, t))
            .unwrap_or_default();
        let trials: Vec<String> = s
            .trials
            .iter()
            .map(|t| {
                let held = if t.run.refused > 0 {
                    " (held back)"
                } else {
                    ""
                };
                format!("{:.0}: {}{held}", t.run.generator_pps / 1e3, t.lost())
            })
            .collect();
        let (cpu, softirq) = s.best().map_or(("-".into(), "-".into()), |t| {
            (
                format!("{:.2}", t.cpu_s_per_mpkt()),
                format!("{:.2}", t.softirq_s / (t.run.offered as f64 / 1e6)),
            )
        });
        let _ = writeln!(
            out,
            "| {} B | {} | {bound}{:.0} | {ratio} | {cpu} | {softirq} | {} |",
            s.size,
            key(s.contestant),
            s.loss_free_pps() / 1e3,
            trials.join(", ")
        );
    }
    let _ = writeln!(out, "\nTargets at 64 B (issue 19):");
    for (mode, target) in [
        ("xdp", 5.0),
        ("afxdp", 5.0),
        ("tc", 1.5),
        ("ebpf", 1.5),
        ("pcap", 1.0),
    ] {
        let ours = searches
            .iter()
            .find(|s| s.size == 64 && s.contestant == Contestant::Sensor(mode));
        let (Some(ours), Some(theirs)) = (ours, tcpdump(64)) else {
            continue;
        };
        let x = ours.loss_free_pps() / theirs.loss_free_pps().max(1.0);
        let verdict = if theirs.at_ceiling() {
            "cannot tell: tcpdump keeps up with the generator"
        } else if x >= target {
            "met"
        } else if ours.at_ceiling() {
            "cannot tell: the generator is the limit"
        } else {
            "missed"
        };
        let _ = writeln!(
            out,
            "- {mode}: {} x tcpdump (target {target}x): {verdict}",
            ratio_text(ours, theirs)
        );
    }
    out
}

/// `ours` loss-free rate over `theirs`, "≥" when ours is a lower bound, "≤" when theirs is.
fn ratio_text(ours: &Search, theirs: &Search) -> String {
    let x = ours.loss_free_pps() / theirs.loss_free_pps().max(1.0);
    match (ours.at_ceiling(), theirs.at_ceiling()) {
        (true, false) => format!("≥ {x:.2}"),
        (false, true) => format!("≤ {x:.2}"),
        (true, true) => "?".to_string(),
        (false, false) => format!("{x:.2}"),
    }
}

fn to_json(searches: &[Search], xdp_live: bool) -> String {
    json_array(searches.iter().map(|s| {
        let best = s.best();
        serde_json::json!({
            "contestant": key(s.contestant),
            "frame_bytes": s.size,
            "loss_free_pps": s.loss_free_pps().round(),
            "cpu_s_per_mpkt": best.map(|t| milli(t.cpu_s_per_mpkt())),
            "softirq_cpu_s_per_mpkt": best.map(|t| milli(t.softirq_s / (t.run.offered as f64 / 1e6))),
            "at_generator_ceiling": s.at_ceiling(),
            "generator": if xdp_live { "xdp-live-frames" } else { "af-packet" },
            "trials": s.trials.iter().map(|t| serde_json::json!({
                "asked_pps": t.asked_pps,
                "offered_pps": t.run.generator_pps.round(),
                "offered": t.run.offered,
                "written": t.run.written,
                "lost": t.lost(),
                "refused_and_resent": t.run.refused,
                "dropped_kernel": t.run.dropped_kernel,
                "capture_cpu_s": milli(t.run.capture_cpu),
                "receiver_cpu_s": milli(t.run.receiver_cpu),
                "softirq_cpu1_s": milli(t.softirq_s),
            })).collect::<Vec<_>>(),
        })
    }))
}
