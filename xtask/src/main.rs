//! `cargo xtask <command>`: the project's own build, demo and test orchestration.

mod bench;
mod demo;
mod ebpf;
mod extcap;
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
    /// Build capstream-extcap (release) and install it in the personal extcap folder of
    /// this host's Wireshark (as `tshark -G folders` names it), so that Wireshark and
    /// tshark list the interfaces of every sensor of a receiver's viewer role.
    InstallExtcap {
        /// Install this capstream-extcap, already built, instead of building one (e.g.
        /// `--binary target/debug/capstream-extcap`; the system tests do so).
        #[arg(long, value_name = "PATH")]
        binary: Option<std::path::PathBuf>,
    },
    /// Build the eBPF programs the sensor embeds (installing nightly's rust-src and
    /// building bpf-linker first when missing); then rebuild the sensor.
    BuildEbpf,
    /// Measure capture throughput, loss, CPU and memory of every sensor mode beside
    /// `tcpdump -w file` and a tcpdump | socat TLS pipeline on the same traffic, streaming
    /// (`sensor --read`) beside that pipeline, fan-in of 1, 8 and 32 sensors into one
    /// receiver, the criterion micro-benchmarks, and each capture's loss-free rate (RFC 2544
    /// throughput, `--only ndr`), the capture lake's ingest cost, index size and query
    /// (`--only lake`); the capture part also runs the sensor modes with --attribute
    /// (`--only attribution`: those and the same modes without, alone) (root; several
    /// minutes); see BENCHMARKS.md.
    Bench {
        /// Run one part only (all when not given), e.g. `--only fanin`.
        #[arg(
            long,
            value_parser = ["capture", "attribution", "streaming", "fanin", "micro", "ndr", "lake"]
        )]
        only: Option<String>,
        /// Interleaved rounds per contestant; the tables show the median.
        #[arg(long, default_value_t = bench::ROUNDS)]
        rounds: usize,
        /// Seconds of traffic per trial of the loss-free rate search (RFC 2544 says 10 s;
        /// shorter for a quick look), e.g. `--trial-seconds 3`.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        trial_seconds: u64,
        /// Only these sensor modes in the capture, attribution and loss-free-rate parts
        /// (repeatable; all when not given; tcpdump always runs, as the baseline), e.g.
        /// `--only ndr --mode xdp` for an A/B of one mode.
        #[arg(
            long = "mode",
            value_name = "MODE",
            value_parser = ["pcap", "ebpf", "tc", "xdp", "afxdp"]
        )]
        modes: Vec<String>,
    },
    /// Send UDP frames out of an interface as fast as the machine allows (or at --rate),
    /// through an AF_PACKET socket past the qdisc, and print frames sent and pps: the
    /// capture bench's generator (root). Example, in a namespace holding veth gen0:
    /// `ip netns exec NS target/debug/xtask generate --iface gen0 --dst-mac
    /// 02:00:00:00:00:02 --size 1500 --count 1000000`
    #[command(hide = true)]
    Generate {
        /// Interface to send out of, e.g. `--iface gen0`.
        #[arg(long)]
        iface: String,
        /// Destination MAC address of the frames, e.g. `--dst-mac 02:00:00:00:00:02`.
        #[arg(long, value_parser = |s: &str| bench::parse_mac(s).map_err(|e| e.to_string()))]
        dst_mac: [u8; 6],
        /// Frame size in bytes without the FCS, 42 to 9014, e.g. `--size 64`.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(42..=9014))]
        size: u16,
        /// Frames to send, e.g. `--count 2000000`.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: u64,
        /// Frames per second, e.g. `--rate 100000` (default: as fast as possible).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rate: Option<u64>,
        /// Send through XDP live frames (BPF_PROG_RUN, Linux 5.18+) instead of an AF_PACKET
        /// socket; the veth peer needs an XDP program or GRO on.
        #[arg(long)]
        xdp_live: bool,
        /// Run pinned to this CPU, e.g. `--cpu 0`.
        #[arg(long)]
        cpu: Option<usize>,
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
        Command::InstallExtcap { binary } => extcap::install(root(), binary.as_deref()),
        Command::Bench {
            only,
            rounds,
            trial_seconds,
            modes,
        } => bench::run(
            only.as_deref(),
            rounds.max(1),
            std::time::Duration::from_secs(trial_seconds),
            &modes,
        ),
        Command::Fuzz { seconds, targets } => fuzz::run(root(), seconds, &targets),
        Command::Generate {
            iface,
            dst_mac,
            size,
            count,
            rate,
            xdp_live,
            cpu,
        } => bench::generator::send(&bench::generator::Options {
            iface,
            dst_mac,
            size: usize::from(size),
            count,
            rate,
            xdp_live,
            cpu,
        })
        .map(|sent| println!("{}", sent.line())),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
