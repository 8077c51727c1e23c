//! Back-pressure: a receiver that stops taking data must not make the sensor grow without
//! bound or stall capture. The sensor's buffer of unacknowledged batches fills, then whole
//! batches are dropped at it and counted (or, with `--spool-dir`, kept on disk), and
//! everything else is delivered once the receiver comes back.

use std::time::Duration;

use testbed::capstream::{
    sensor_figures, start_sensor, tcpdump_records, InterfaceFigures, Receiver, Scratch,
};
use testbed::{corpus, require_root, Lab};

/// Corpus replays while the receiver is frozen: about 13 MB of compressed batches, three
/// times the sensor's 4 MiB buffer.
const LOOPS: &str = "24";

/// Replays the corpus `LOOPS` times while the receiver is frozen, then lets it go on and
/// stops the sensor (started with `--buffer 4MiB` and `extra`). Checks what must always hold
/// and returns the sensor's figures and log.
fn stream_into_a_frozen_receiver(extra: &[&str]) -> (InterfaceFigures, String) {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("backpressure").unwrap();
    let (mut receiver, out) = Receiver::writing(Some(&lab.cap), &dir, "capture.pcap", &[]).unwrap();
    let mut args = vec!["--iface", iface, "--mode", "pcap", "--buffer", "4MiB"];
    args.extend_from_slice(extra);
    let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    receiver.proc.signal("STOP").unwrap();
    let corpus = corpus::pcap();
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
    let f = sensor_figures(&sensor.summary().unwrap(), iface).unwrap();
    let offered = corpus::PACKETS as u64 * LOOPS.parse::<u64>().unwrap();
    let buffer_full = f.reason("sensor_buffer");
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
        f.matched + f.reason("kernel_buffer"),
        offered,
        "every replayed frame reached the sensor or is counted as a kernel drop\n{log}"
    );
    let written = tcpdump_records(&out, "").unwrap().len() as u64;
    assert_eq!(
        written, f.delivered,
        "the output holds what was acknowledged"
    );
    eprintln!(
        "{extra:?}: offered {offered}, delivered {}, dropped at the sensor's buffer \
         {buffer_full}, kernel drops {}",
        f.delivered,
        f.reason("kernel_buffer")
    );
    (f, log)
}

#[test]
fn a_frozen_receiver_makes_the_sensor_drop_whole_batches_counted() {
    let (f, log) = stream_into_a_frozen_receiver(&[]);
    assert!(
        f.reason("sensor_buffer") > 0,
        "4 MiB cannot hold this stream: some must be dropped at the buffer\n{log}"
    );
}

#[test]
fn a_spool_on_disk_holds_what_memory_cannot() {
    let dir = Scratch::new("spool").unwrap();
    let spool = dir.join("spool").to_string_lossy().into_owned();
    let (f, log) = stream_into_a_frozen_receiver(&["--spool-dir", &spool]);
    assert_eq!(
        f.reason("sensor_buffer"),
        0,
        "the spool holds what the 4 MiB buffer cannot\n{log}"
    );
    assert!(f.delivered > 0);
    let left: Vec<_> = std::fs::read_dir(&spool).unwrap().collect();
    assert!(
        left.is_empty(),
        "the spool is emptied and removed: {left:?}"
    );
}
