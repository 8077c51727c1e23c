//! Back-pressure: a receiver that stops taking data must not make the sensor grow without
//! bound or stall capture. The sensor's buffer of unacknowledged batches fills, then whole
//! batches are dropped at it and counted, and everything else is delivered once the
//! receiver comes back.

use std::time::Duration;

use testbed::capstream::{sensor_figures, start_sensor, tcpdump_records, Receiver, Scratch};
use testbed::{corpus_dir, require_root, Lab};

/// Corpus replays while the receiver is frozen: about 13 MB of compressed batches, three
/// times the sensor's 4 MiB buffer.
const LOOPS: &str = "24";

#[test]
fn a_frozen_receiver_makes_the_sensor_drop_whole_batches_counted() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("backpressure").unwrap();
    let (mut receiver, out) = Receiver::writing(Some(&lab.cap), &dir, "capture.pcap", &[]).unwrap();
    let mut sensor = start_sensor(
        Some(&lab.cap),
        &receiver,
        &["--iface", iface, "--mode", "pcap", "--buffer", "4MiB"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    receiver.proc.signal("STOP").unwrap();
    let corpus = corpus_dir().join("tcpdump-tests.pcap");
    lab.gen
        .exec(
            "tcpreplay",
            &[
                "-q",
                "--pps",
                "40000",
                "--loop",
                LOOPS,
                "-i",
                &lab.links[0].0,
                &corpus.to_string_lossy(),
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    receiver.proc.signal("CONT").unwrap();
    // The sensor resumes (or reconnects, if the frozen receiver timed out) and delivers
    // what it held.
    std::thread::sleep(Duration::from_secs(3));
    sensor.stop().unwrap();
    receiver.stop().unwrap();

    let log = sensor.stderr();
    let f = sensor_figures(&log, iface).unwrap();
    let offered = 7907 * LOOPS.parse::<u64>().unwrap();
    let buffer_full = f.reason("sensor buffer full");
    assert!(
        buffer_full > 0,
        "4 MiB cannot hold {offered} packets: some must be dropped at the buffer\n{log}"
    );
    assert_eq!(
        f.unacknowledged,
        Some(0),
        "everything kept was delivered\n{log}"
    );
    // Kernel drops happen before a frame reaches the sensor, so outside `matched`.
    assert_eq!(
        f.matched,
        f.delivered + buffer_full,
        "matched = delivered + dropped at the sensor's buffer\n{log}"
    );
    assert_eq!(
        f.matched + f.reason("kernel buffer full"),
        offered,
        "every replayed frame reached the sensor or is counted as a kernel drop\n{log}"
    );
    let written = tcpdump_records(&out, "").unwrap().len() as u64;
    assert_eq!(
        written, f.delivered,
        "the output holds what was acknowledged"
    );
    eprintln!(
        "offered {offered}, delivered {}, dropped at the sensor's buffer {buffer_full}, \
         kernel drops {}",
        f.delivered,
        f.reason("kernel buffer full")
    );
}
