//! `cargo xtask install-extcap`: builds capstream-extcap and puts it in the personal extcap
//! folder of the Wireshark installed here, where Wireshark and tshark find it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Copies `binary`, else capstream-extcap built now (release), into Wireshark's personal
/// extcap folder.
pub fn install(root: &Path, binary: Option<&Path>) -> Result<()> {
    let folder = personal_extcap_folder()?;
    let built = match binary {
        Some(binary) => binary.to_path_buf(),
        None => {
            let manifest = root.join("Cargo.toml");
            crate::system::cmd(
                "cargo",
                &[
                    "build",
                    "--release",
                    "-p",
                    "extcap",
                    "--manifest-path",
                    &manifest.to_string_lossy(),
                ],
            )?;
            root.join("target/release/capstream-extcap")
        }
    };
    std::fs::create_dir_all(&folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let installed = folder.join("capstream-extcap");
    // A new file rather than writing over one that a running capture may be executing.
    let staged = folder.join(".capstream-extcap.new");
    std::fs::copy(&built, &staged)
        .with_context(|| format!("cannot copy {} to {}", built.display(), staged.display()))?;
    std::fs::rename(&staged, &installed)
        .with_context(|| format!("cannot install {}", installed.display()))?;
    println!(
        "installed {}; configure it with CAPSTREAM_EXTCAP_RECEIVER, CAPSTREAM_EXTCAP_CA (or \
         _FINGERPRINT) and CAPSTREAM_EXTCAP_TOKEN_FILE, or in Wireshark's capture options, \
         then `tshark -D` lists capstream interfaces",
        installed.display()
    );
    Ok(())
}

/// The folder `tshark -G folders` names: "Personal Extcap path" (Wireshark 4.2 and
/// later: ~/.local/lib/wireshark/extcap), else the extcap folder of the personal
/// configuration, where earlier versions look (~/.config/wireshark/extcap).
pub fn personal_extcap_folder() -> Result<PathBuf> {
    let out = Command::new("tshark")
        .args(["-G", "folders"])
        .output()
        .context("cannot run `tshark -G folders`: is Wireshark (tshark) installed?")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let folder = |label: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(label))
            .map(|rest| PathBuf::from(rest.trim()))
    };
    if let Some(extcap) = folder("Personal Extcap path:") {
        return Ok(extcap);
    }
    match folder("Personal configuration:") {
        Some(config) => Ok(config.join("extcap")),
        None => bail!("`tshark -G folders` names no personal folder: {text}"),
    }
}
