//! `cargo xtask <command>`: the project's own build, demo and test orchestration.

mod bench;
mod demo;
mod ebpf;
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
    /// build check, unit tests and the system tests (as root).
    Test,
    /// Install the system packages and Rust targets the build and tests need.
    Setup,
    /// Build the eBPF programs the sensor embeds (installing nightly's rust-src and
    /// building bpf-linker first when missing); then rebuild the sensor.
    BuildEbpf,
    /// Measure capture throughput, loss, CPU and memory of every sensor mode beside
    /// `tcpdump -w file` on the same traffic (root; a few minutes); see BENCHMARKS.md.
    Bench,
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
        Command::Bench => bench::run(),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
