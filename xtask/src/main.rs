//! `cargo xtask <command>`: the project's own build, demo and test orchestration.

mod bench;
mod demo;
mod ebpf;
mod fuzz;
mod system;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "Capstream build, demo and test tasks",
    bin_name = "cargo xtask"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing, build, and run a receiver and a sensor on replayed traffic
    /// in a private network namespace; leaves demo-out/capture.pcapng and prints a summary.
    Demo,
    /// Install what is missing, then run every check CI runs: fmt, clippy, the Windows
    /// build check, a short run of each fuzz target, unit tests and the system tests (as
    /// root).
    Test,
    /// Install the system packages and Rust targets the build and tests need.
    Setup,
    /// Build the eBPF programs the sensor embeds (installing nightly's rust-src and
    /// building bpf-linker first when missing); then rebuild the sensor.
    BuildEbpf,
    /// Measure capture throughput, loss, CPU and memory of every sensor mode beside
    /// `tcpdump -w file` and a tcpdump | socat TLS pipeline on the same traffic, and
    /// streaming (`sensor --read`) beside that pipeline, and the criterion
    /// micro-benchmarks (root; several minutes); see BENCHMARKS.md.
    Bench {
        /// Run one part only (all when not given), e.g. `--only micro`.
        #[arg(long, value_parser = ["capture", "streaming", "micro"])]
        only: Option<String>,
        /// Interleaved rounds per contestant; the tables show the median.
        #[arg(long, default_value_t = bench::ROUNDS)]
        rounds: usize,
    },
    /// Run the cargo-fuzz targets (nightly; installs cargo-fuzz when missing), after
    /// writing their seed corpora; fails if any finds a crash. See fuzz/README.md.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// Targets to run (all when none is given): decode_frame, batch_body, pcap_read.
        targets: Vec<String>,
    },
}

/// The workspace root.
fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
}

fn main() {
    let result = match Cli::parse().command {
        Command::Demo => demo::run(),
        Command::Test => test::run(),
        Command::Setup => system::setup(),
        Command::BuildEbpf => ebpf::build(root()),
        Command::Bench { only, rounds } => bench::run(only.as_deref(), rounds.max(1)),
        Command::Fuzz { seconds, targets } => fuzz::run(root(), seconds, &targets),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
