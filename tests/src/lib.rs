//! The test bed: real network namespaces joined by veth pairs, and real processes started in
//! them. The system tests in `tests/` and `cargo xtask demo` both run on it.
//!
//! Nothing here is mocked. Everything it sets up is torn down on drop, including after a
//! failed assertion.

pub mod capstream;
pub mod corpus;
pub mod fleet;
pub mod kafka;
pub mod lake;
pub mod moto;
mod netns;
pub mod pcap_over_ip;
mod process;
pub mod prometheus;
pub mod relay;
pub mod seaweedfs;
pub mod tls;
pub mod tmpfs;

pub use moto::Moto;
pub use netns::{Lab, Netns};
pub use process::{run, Proc, SummaryFile};
pub use relay::{Faults, Relay, RelayStats};
pub use tmpfs::Tmpfs;

use std::path::PathBuf;

/// The directory cargo put this workspace's binaries in (`target/debug` or `target/release`),
/// found from the running executable so that it follows `CARGO_TARGET_DIR` and the profile;
/// `CAPSTREAM_BIN_DIR` overrides it (the benchmarks run release binaries).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAPSTREAM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current executable path");
    let mut dir = exe
        .parent()
        .expect("executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of one of the workspace's binaries; fails with the command to run when it is missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p {name}`",
        path.display()
    );
    path
}

/// The shared test corpus beside the repository (`../shared/corpus`).
pub fn corpus_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus");
    dir.canonicalize().unwrap_or(dir)
}

/// Fails unless running as root: namespaces, veth and live capture need it. Tests must fail,
/// not skip, when they cannot run.
pub fn require_root() {
    let uid = run("id", &["-u"]).unwrap_or_default();
    assert_eq!(
        uid.trim(),
        "0",
        "these tests create network namespaces and capture live: run them as root"
    );
}

/// Polls `done` every 200 ms until it holds or `timeout` passes; says whether it held.
pub fn wait_until(timeout: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Fails, saying how to get it, unless `program` can be run (`program --version`).
pub fn require_tool(program: &str, package: &str) {
    let found = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        found,
        "{program} is missing (Debian package {package}): `cargo xtask setup` installs it"
    );
}
