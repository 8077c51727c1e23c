//! `cargo xtask build-ebpf`: builds `sensor-ebpf` for `bpfel-unknown-none`, first
//! installing what a fresh machine lacks (the pinned nightly's rust-src, and bpf-linker
//! built against that toolchain's own libLLVM). Nothing prebuilt is downloaded.
//!
//! The toolchain is pinned in `sensor-ebpf/rust-toolchain.toml` and bpf-linker to
//! [`BPF_LINKER_VERSION`], so that a fresh machine next year builds with the same compiler
//! and LLVM as today rather than whatever "nightly" then is.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::system::cmd;

const TARGET: &str = "bpfel-unknown-none";
/// The bpf-linker release built (with its own Cargo.lock) when none of it is installed.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the object lands; sensor/build.rs embeds it from here.
pub fn object_path(root: &Path) -> PathBuf {
    root.join("sensor-ebpf/target")
        .join(TARGET)
        .join("release/sensor-ebpf")
}

pub fn build(root: &Path) -> Result<()> {
    let toolchain = nightly(root)?;
    ensure_rust_src(&toolchain)?;
    ensure_bpf_linker(root, &toolchain.sysroot)?;
    eprintln!(
        "xtask: building the eBPF programs (sensor-ebpf, {TARGET}, {})",
        toolchain.name
    );
    let status = Command::new("cargo")
        .arg(format!("+{}", toolchain.name))
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
        .env("LD_LIBRARY_PATH", toolchain.sysroot.join("lib"))
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .with_context(|| format!("cannot run cargo +{}", toolchain.name))?;
    if !status.success() {
        bail!("building sensor-ebpf failed ({status})");
    }
    eprintln!("xtask: eBPF object at {}", object_path(root).display());
    Ok(())
}

/// The pinned nightly, as rustup knows it on this machine.
pub(crate) struct Nightly {
    /// What `cargo +NAME` takes.
    pub name: String,
    pub sysroot: PathBuf,
}

/// The channel `sensor-ebpf/rust-toolchain.toml` pins, e.g. `nightly-2026-05-20`.
fn pinned_channel(root: &Path) -> Result<String> {
    let path = root.join("sensor-ebpf/rust-toolchain.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
    table
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(toml::Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("{} has no [toolchain] channel", path.display()))
}

/// The sysroot of toolchain `name`, if rustup has it.
fn sysroot_of(name: &str) -> Option<PathBuf> {
    Command::new("rustc")
        .arg(format!("+{name}"))
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

/// The date of the channel a toolchain was installed from (`date = "2026-05-20"` in its
/// channel manifest): a toolchain installed as plain `nightly` that day is the pinned one.
fn channel_date(sysroot: &Path) -> Option<String> {
    let manifest = sysroot.join("lib/rustlib/multirust-channel-manifest.toml");
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(manifest).ok()?).ok()?;
    table.get("date")?.as_str().map(str::to_string)
}

/// The pinned nightly (the eBPF programs and the fuzz targets need it): under its own name
/// when rustup has it, else the machine's `nightly` when that is the same build, else
/// installed by rustup.
pub(crate) fn nightly(root: &Path) -> Result<Nightly> {
    let channel = pinned_channel(root)?;
    if let Some(sysroot) = sysroot_of(&channel) {
        return Ok(Nightly {
            name: channel,
            sysroot,
        });
    }
    let date = channel.strip_prefix("nightly-").unwrap_or_default();
    if let Some(sysroot) = sysroot_of("nightly") {
        if channel_date(&sysroot).as_deref() == Some(date) {
            return Ok(Nightly {
                name: "nightly".into(),
                sysroot,
            });
        }
    }
    eprintln!(
        "xtask: installing {channel} (pinned in sensor-ebpf/rust-toolchain.toml; the eBPF \
         programs and the fuzz targets need it)"
    );
    cmd(
        "rustup",
        &[
            "toolchain",
            "install",
            &channel,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ],
    )?;
    let sysroot =
        sysroot_of(&channel).with_context(|| format!("cannot find {channel}'s sysroot"))?;
    Ok(Nightly {
        name: channel,
        sysroot,
    })
}

fn ensure_rust_src(toolchain: &Nightly) -> Result<()> {
    if toolchain
        .sysroot
        .join("lib/rustlib/src/rust/library")
        .is_dir()
    {
        return Ok(());
    }
    let name = &toolchain.name;
    eprintln!("xtask: adding rust-src to {name} (to build core for {TARGET})");
    cmd(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", name],
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

/// Whether the pinned bpf-linker is installed and runs.
fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim()
                    == format!("bpf-linker {BPF_LINKER_VERSION}")
        })
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
        "xtask: building bpf-linker {BPF_LINKER_VERSION} from crates.io against the pinned \
         nightly's LLVM {major} (about a minute; links the eBPF programs)"
    );
    let features = format!("llvm-{major}");
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
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
