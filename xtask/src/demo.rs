//! `cargo xtask demo`: the whole path, end to end, on this machine.
//!
//! Two network namespaces joined by a veth pair stand in for a network: traffic is replayed
//! (and pinged) into one end, a sensor captures the other end and streams to a receiver on
//! that namespace's loopback, which writes `demo-out/capture.pcapng`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use testbed::capstream::{start_sensor, Receiver};
use testbed::{corpus_dir, Lab};

use crate::system::{cmd, setup};

pub fn run() -> Result<()> {
    setup()?;
    crate::ebpf::build(crate::root())?;
    cmd("cargo", &["build", "-p", "sensor", "-p", "receiver"])?;

    let out_dir = PathBuf::from("demo-out");
    std::fs::create_dir_all(&out_dir)?;
    let out_dir = out_dir.canonicalize()?;
    let capture = out_dir.join("capture.pcapng");
    let _ = std::fs::remove_file(&capture);

    eprintln!("xtask: creating namespaces and a veth pair (198.18.0.1 <-> 198.18.0.2)");
    let lab = Lab::new(1)?;
    let iface = lab.links[0].1.clone();
    let capture_arg = capture.to_string_lossy().into_owned();
    let mut receiver = Receiver::start(
        Some(&lab.cap),
        &out_dir.join("state"),
        4433,
        &["--out", &capture_arg],
    )?;
    eprintln!(
        "xtask: receiver listening on {} (certificate fingerprint {})",
        receiver.addr, receiver.fingerprint
    );
    let mut sensor = start_sensor(Some(&lab.cap), &receiver, &["--iface", &iface])?;
    eprintln!("xtask: sensor capturing on {iface}");

    let corpus = corpus_dir().join("tcpdump-tests.pcap");
    if corpus.exists() {
        eprintln!(
            "xtask: replaying {} (7,907 frames of many protocols)",
            corpus.display()
        );
        lab.replay(0, &corpus, 10_000)?;
    } else {
        eprintln!("xtask: no shared corpus beside the repository; pinging only");
    }
    eprintln!("xtask: pinging 198.18.0.2 from the other namespace");
    lab.gen
        .exec("ping", &["-c", "20", "-i", "0.05", "-q", "198.18.0.2"])?;
    std::thread::sleep(Duration::from_millis(500));

    sensor.stop().context("stopping the sensor")?;
    receiver.stop().context("stopping the receiver")?;

    println!("\n== sensor ==\n{}", sensor.stderr().trim_end());
    println!("\n== receiver ==\n{}", receiver.proc.stderr().trim_end());
    let capture_str = capture.to_string_lossy().into_owned();
    let first = testbed::run("tcpdump", &["-r", &capture_str, "-nn", "-c", "5"])?;
    println!(
        "\n== tcpdump -r {} -c 5 ==\n{}",
        capture.display(),
        first.trim_end()
    );
    let count = testbed::run(
        "tshark",
        &["-r", &capture_str, "-T", "fields", "-e", "frame.number"],
    )?;
    println!(
        "\nxtask: {} packets in {} ({} bytes); open it with: wireshark {}",
        count.lines().count(),
        capture.display(),
        std::fs::metadata(&capture)?.len(),
        capture.display()
    );
    Ok(())
}
