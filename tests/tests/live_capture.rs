//! Live capture on a veth in its own namespace, compared packet by packet with what tcpdump
//! captures on the same interface, with the same filter, during the same replay.

use std::time::Duration;

use testbed::capstream::{
    dev_filters, start_sensor, start_tcpdump, tcpdump_dump, tshark_count, Receiver, Scratch,
};
use testbed::{corpus_dir, require_root, Lab};

/// Replay rate: fast enough to be a real load, slow enough that tcpdump, the reference,
/// drops nothing on a 2-core machine.
const PPS: u32 = 8000;

fn corpus() -> std::path::PathBuf {
    corpus_dir().join("tcpdump-tests.pcap")
}

/// Lets the last frames pass the capture rings and the sensor's 100 ms batch timer.
fn settle() {
    std::thread::sleep(Duration::from_millis(600));
}

#[test]
fn every_dev_filter_captures_exactly_what_tcpdump_captures() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.clone();
    let mut failures = Vec::new();
    let mut total_compared = 0;
    for filter in dev_filters().unwrap() {
        let dir = Scratch::new("live").unwrap();
        let out = dir.join("capture.pcap");
        let reference = dir.join("tcpdump.pcap");
        let out_arg = out.to_string_lossy().into_owned();
        let mut receiver = Receiver::start(
            Some(&lab.cap),
            &dir.join("state"),
            4433,
            &["--out", &out_arg],
        )
        .unwrap();
        let mut args = vec!["--iface", iface.as_str()];
        if !filter.is_empty() {
            args.extend(["--bpf", filter.as_str()]);
        }
        let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
        let mut tcpdump = start_tcpdump(&lab.cap, &iface, &filter, &reference).unwrap();

        lab.replay(0, &corpus(), PPS).unwrap();
        settle();
        tcpdump.stop().unwrap();
        sensor.stop().unwrap();
        receiver.stop().unwrap();

        let tcpdump_log = tcpdump.stderr();
        assert!(
            tcpdump_log.contains(" 0 packets dropped by kernel"),
            "the reference dropped packets, so the comparison means nothing: {tcpdump_log}"
        );
        let expected = tcpdump_dump(&reference, "").unwrap();
        let got = tcpdump_dump(&out, "").unwrap();
        if filter.is_empty() {
            assert_eq!(
                expected.len(),
                7907,
                "tcpdump must see the whole corpus without a filter"
            );
        }
        total_compared += expected.len();
        if expected != got {
            let first = expected
                .iter()
                .zip(&got)
                .position(|(a, b)| a != b)
                .unwrap_or(expected.len().min(got.len()));
            failures.push(format!(
                "filter {filter:?}: tcpdump captured {} packets, capstream wrote {}; first difference at packet {first}:\n  tcpdump:   {}\n  capstream: {}\nsensor log:\n{}",
                expected.len(),
                got.len(),
                expected.get(first).map(|s| s.lines().next().unwrap_or("")).unwrap_or("(none)"),
                got.get(first).map(|s| s.lines().next().unwrap_or("")).unwrap_or("(none)"),
                sensor.stderr(),
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        total_compared > 7907,
        "the filters matched almost nothing: {total_compared}"
    );
}

#[test]
fn two_sensors_merge_into_one_time_ordered_file_in_both_formats() {
    require_root();
    let lab = Lab::new(2).unwrap();
    for format in ["pcapng", "pcap"] {
        let dir = Scratch::new("merge").unwrap();
        let out = dir.join(&format!("merged.{format}"));
        let out_arg = out.to_string_lossy().into_owned();
        let mut receiver = Receiver::start(
            Some(&lab.cap),
            &dir.join("state"),
            4433,
            &["--out", &out_arg, "--format", format],
        )
        .unwrap();
        let mut sensors: Vec<_> = lab
            .links
            .iter()
            .enumerate()
            .map(|(i, (_, cap))| {
                let id = format!("sensor-{i}");
                start_sensor(
                    Some(&lab.cap),
                    &receiver,
                    &["--iface", cap, "--sensor-id", &id],
                )
                .unwrap()
            })
            .collect();
        // Both links replay at once, so the two streams interleave in time.
        std::thread::scope(|s| {
            for i in 0..2 {
                let lab = &lab;
                s.spawn(move || lab.replay(i, &corpus(), PPS / 2).unwrap());
            }
        });
        settle();
        for s in &mut sensors {
            s.stop().unwrap();
        }
        receiver.stop().unwrap();

        // tcpdump and tshark both read the file, and agree on its size.
        let dump = tcpdump_dump(&out, "").unwrap();
        assert_eq!(
            dump.len(),
            2 * 7907,
            "{format}: both sensors' packets, nothing lost; receiver log:\n{}",
            receiver.proc.stderr()
        );
        assert_eq!(
            tshark_count(&out).unwrap(),
            2 * 7907,
            "{format}: tshark reads every packet"
        );

        // One time-ordered stream: nanosecond timestamps never go backwards.
        let times: Vec<u128> = dump
            .iter()
            .map(|p| {
                let t = p.split_whitespace().next().unwrap();
                let (s, ns) = t.split_once('.').unwrap();
                s.parse::<u128>().unwrap() * 1_000_000_000 + ns.parse::<u128>().unwrap()
            })
            .collect();
        let backwards = times.windows(2).filter(|w| w[1] < w[0]).count();
        assert_eq!(
            backwards, 0,
            "{format}: the merged file is not in time order"
        );

        if format == "pcapng" {
            // Each sensor interface is its own interface block, named HOST/IFACE.
            let path = out.to_string_lossy().into_owned();
            let names = testbed::run(
                "tshark",
                &["-r", &path, "-T", "fields", "-e", "frame.interface_name"],
            )
            .unwrap();
            for cap in ["cap0", "cap1"] {
                let n = names
                    .lines()
                    .filter(|l| l.ends_with(&format!("/{cap}")))
                    .count();
                assert_eq!(n, 7907, "packets of interface {cap} in the pcapng file");
            }
        }
    }
}
