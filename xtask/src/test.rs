//! `cargo xtask test`: every check CI runs, in the order that fails fastest.

use anyhow::Result;

use crate::system::{cmd, setup};

pub fn run() -> Result<()> {
    // Many tests replay the shared corpus: without it they would fail one by one, each
    // with "No such file", after the whole set-up and build.
    let corpus = testbed::corpus::pcap();
    if !corpus.is_file() {
        anyhow::bail!(
            "the tests need the shared corpus beside this checkout, and {} is missing: clone \
             the repository next to the shared/ directory",
            corpus.display()
        );
    }
    setup()?;
    cmd("cargo", &["fmt", "--all", "--", "--check"])?;
    let ebpf_manifest = crate::root().join("sensor-ebpf/Cargo.toml");
    cmd(
        "cargo",
        &[
            "fmt",
            "--manifest-path",
            &ebpf_manifest.to_string_lossy(),
            "--",
            "--check",
        ],
    )?;
    // Before clippy and the build: the sensor embeds the object.
    crate::ebpf::build(crate::root())?;
    cmd(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // A short run of every fuzz target, so that they keep building and their seeds keep
    // passing; the long runs are `cargo xtask fuzz` (fuzz/README.md).
    crate::fuzz::run(crate::root(), crate::fuzz::CI_SECONDS, &[])?;
    cmd(
        "cargo",
        &[
            "check",
            "-p",
            "sensor",
            "-p",
            "receiver",
            "-p",
            "extcap",
            "--target",
            "x86_64-pc-windows-gnu",
        ],
    )?;
    cmd("cargo", &["build", "--workspace", "--bins"])?;
    // One test at a time: the system tests replay traffic and compare with tcpdump, and
    // two replays at once on a 2-core machine could make the reference drop packets.
    // nextest ends with one summary line for the whole run.
    cmd(
        "cargo",
        &[
            "nextest",
            "run",
            "--workspace",
            "--test-threads",
            "1",
            "--no-fail-fast",
        ],
    )
}
