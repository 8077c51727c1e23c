//! Embeds the eBPF object built by `cargo xtask build-ebpf`, when there is one.
//!
//! Without it the sensor still builds (and runs its libpcap backend); its eBPF modes then
//! say how to get them. CAPSTREAM_EBPF_OBJECT points at another object.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(capstream_ebpf)");
    println!("cargo::rerun-if-env-changed=CAPSTREAM_EBPF_OBJECT");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let object = std::env::var_os("CAPSTREAM_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../sensor-ebpf/target/bpfel-unknown-none/release/sensor-ebpf")
        });
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let embedded = out.join("sensor-ebpf.o");
    if object.is_file() {
        std::fs::copy(&object, &embedded).expect("cannot copy the eBPF object into OUT_DIR");
        println!("cargo::rustc-cfg=capstream_ebpf");
    }
}
