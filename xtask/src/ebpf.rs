//! `cargo xtask build-ebpf`: builds `sensor-ebpf` for `bpfel-unknown-none`, first
//! installing what a fresh machine lacks (nightly's rust-src, and bpf-linker built against
//! the nightly toolchain's own libLLVM). Nothing prebuilt is downloaded.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::system::cmd;

const TOOLCHAIN: &str = "nightly";
const TARGET: &str = "bpfel-unknown-none";

/// Where the object lands; sensor/build.rs embeds it from here.
pub fn object_path(root: &Path) -> PathBuf {
    root.join("sensor-ebpf/target")
        .join(TARGET)
        .join("release/sensor-ebpf")
}

pub fn build(root: &Path) -> Result<()> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src()?;
    ensure_bpf_linker(root, &sysroot)?;
    eprintln!("xtask: building the eBPF programs (sensor-ebpf, {TARGET})");
    let status = Command::new("cargo")
        .arg(format!("+{TOOLCHAIN}"))
        .args([
            "build",
            "--release",
            "--locked",
            "--features",
            "programs",
            "--bin",
            "sensor-ebpf",
        ])
        .current_dir(root.join("sensor-ebpf"))
        // BTF lets the kernel and Aya describe the maps; -Z build-std comes from
        // sensor-ebpf/.cargo/config.toml.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        // bpf-linker loads the toolchain's libLLVM at run time.
        .env("LD_LIBRARY_PATH", sysroot.join("lib"))
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("cannot run cargo +nightly")?;
    if !status.success() {
        bail!("building sensor-ebpf failed ({status})");
    }
    eprintln!("xtask: eBPF object at {}", object_path(root).display());
    Ok(())
}

/// Installs the nightly toolchain when missing (the fuzz targets need it too) and returns
/// its sysroot.
pub(crate) fn nightly_sysroot() -> Result<PathBuf> {
    let probe = |args: &[&str]| {
        Command::new("rustc")
            .arg(format!("+{TOOLCHAIN}"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if probe(&["--version"]).is_none() {
        eprintln!("xtask: installing the nightly toolchain (the eBPF programs need it)");
        cmd(
            "rustup",
            &["toolchain", "install", TOOLCHAIN, "--profile", "minimal"],
        )?;
    }
    probe(&["--print", "sysroot"])
        .map(PathBuf::from)
        .context("cannot find the nightly toolchain's sysroot")
}

fn ensure_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", TOOLCHAIN])
        .output()
        .context("cannot run rustup")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to nightly (to build core for {TARGET})");
    cmd(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", TOOLCHAIN],
    )
}

/// The nightly toolchain's libLLVM, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`, and its
/// major version.
fn toolchain_llvm(sysroot: &Path) -> Result<(String, u32)> {
    let lib = sysroot.join("lib");
    for entry in
        std::fs::read_dir(&lib).with_context(|| format!("cannot list {}", lib.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .with_context(|| format!("cannot read the LLVM version of {name}"))?;
            return Ok((name, major));
        }
    }
    bail!(
        "the nightly toolchain has no libLLVM.so.* in {}",
        lib.display()
    )
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds bpf-linker from source against the toolchain's libLLVM: a directory whose
/// `lib/` holds `libLLVM.so` and the versioned name, both pointing at the toolchain's copy,
/// serves as LLVM_PREFIX.
fn ensure_bpf_linker(root: &Path, sysroot: &Path) -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let (llvm_name, major) = toolchain_llvm(sysroot)?;
    let prefix = root.join("target/bpf-linker-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let llvm = sysroot.join("lib").join(&llvm_name);
    for link in [lib.join("libLLVM.so"), lib.join(&llvm_name)] {
        let _ = std::fs::remove_file(&link);
        symlink(&llvm, &link).with_context(|| format!("cannot create {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker from crates.io against nightly's LLVM {major} \
         (about a minute; links the eBPF programs)"
    );
    let features = format!("llvm-{major}");
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            &features,
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("cannot run cargo install")?;
    if !status.success() || !bpf_linker_works() {
        bail!("building bpf-linker against {} failed", llvm.display());
    }
    Ok(())
}
