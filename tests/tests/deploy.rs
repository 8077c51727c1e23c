//! The systemd units in `deploy/systemd/`: neither runs as root, the sensor's capability
//! set is the one README.md documents for the default mode, the receiver has none, and
//! each starts a binary this workspace builds.
//!
//! `systemd-analyze verify` parses them too (it needs the binaries at the ExecStart paths):
//!
//! ```sh
//! systemd-analyze verify --man=no deploy/systemd/*.service
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// A unit file's `[Service]` assignments, in order (a key may repeat).
fn service_section(unit: &str) -> Vec<(String, String)> {
    let path = repo().join("deploy/systemd").join(unit);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "{unit}: keep each setting on one line"
        );
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{unit}: not an assignment: {line}"));
        if section == "Service" {
            out.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    out
}

/// The last value of `key` (systemd's rule for single-valued settings).
fn value<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn words(value: Option<&str>) -> BTreeSet<String> {
    value
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The capabilities README.md lists as needed to start `mode` in its "Privileges" table.
fn documented_start_set(mode: &str) -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("\n### Privileges")
        .nth(1)
        .expect("README.md has a Privileges section");
    let row = section
        .lines()
        .find(|l| l.starts_with(&format!("| `{mode}`")))
        .unwrap_or_else(|| panic!("no row for {mode} in README.md's Privileges table"));
    let start = row.split('|').nth(2).expect("a 'needs to start' column");
    start
        .split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("CAP_"))
        .collect()
}

/// Whether `name` is a binary of this workspace: a member package of that name with a
/// `src/main.rs`.
fn is_workspace_bin(name: &str) -> bool {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let member = manifest.contains(&format!("\"{name}\""));
    let package = std::fs::read_to_string(repo().join(name).join("Cargo.toml"))
        .is_ok_and(|m| m.contains(&format!("name = \"{name}\"")));
    member && package && repo().join(name).join("src/main.rs").exists()
}

/// Checks what both units must have: a dedicated unprivileged user, no_new_privs, a
/// read-only system, and an ExecStart running `binary` (a workspace binary).
fn check_common(unit: &str, settings: &[(String, String)], binary: &str) {
    let user = value(settings, "User");
    let dynamic = value(settings, "DynamicUser") == Some("yes");
    assert!(
        dynamic || user.is_some_and(|u| !u.is_empty()),
        "{unit}: runs as root (set User= or DynamicUser=yes)"
    );
    assert!(
        !matches!(user, Some("root" | "0")),
        "{unit}: must not run as root"
    );
    assert_eq!(value(settings, "NoNewPrivileges"), Some("yes"), "{unit}");
    assert_eq!(value(settings, "ProtectSystem"), Some("strict"), "{unit}");
    assert_eq!(value(settings, "ProtectHome"), Some("yes"), "{unit}");
    assert_eq!(value(settings, "PrivateTmp"), Some("yes"), "{unit}");
    let exec = value(settings, "ExecStart").unwrap_or_else(|| panic!("{unit}: no ExecStart"));
    let program = exec
        .trim_start_matches(['-', '@', ':', '+', '!'])
        .split_whitespace()
        .next()
        .unwrap();
    let name = Path::new(program).file_name().unwrap().to_string_lossy();
    assert_eq!(name, binary, "{unit}: ExecStart={exec}");
    assert!(
        is_workspace_bin(&name),
        "{unit}: {name} is not a binary of this workspace"
    );
}

#[test]
fn the_sensor_unit_grants_exactly_what_the_default_mode_needs_and_nothing_as_root() {
    let unit = "capstream-sensor.service";
    let settings = service_section(unit);
    check_common(unit, &settings, "sensor");
    // The default --mode auto picks tc.
    let documented = documented_start_set("tc");
    assert_eq!(
        documented,
        ["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_RAW"]
            .map(String::from)
            .into(),
        "README.md's tc row changed: update the units and this test"
    );
    assert_eq!(
        words(value(&settings, "CapabilityBoundingSet")),
        documented,
        "{unit}"
    );
    assert_eq!(
        words(value(&settings, "AmbientCapabilities")),
        documented,
        "{unit}"
    );
    let exec = value(&settings, "ExecStart").unwrap();
    for flag in ["--iface", "--receiver", "--ca"] {
        assert!(exec.contains(flag), "{unit}: ExecStart lacks {flag}");
    }
    assert!(
        value(&settings, "EnvironmentFile").is_some(),
        "{unit}: the interface and receiver come from an EnvironmentFile"
    );
    assert!(
        !exec.contains("--user"),
        "{unit}: systemd already starts it unprivileged"
    );
}

#[test]
fn the_receiver_unit_has_no_capabilities_and_its_own_state_directory() {
    let unit = "capstream-receiver.service";
    let settings = service_section(unit);
    check_common(unit, &settings, "receiver");
    assert_eq!(value(&settings, "DynamicUser"), Some("yes"), "{unit}");
    assert_eq!(
        value(&settings, "CapabilityBoundingSet"),
        Some(""),
        "{unit}"
    );
    assert!(
        words(value(&settings, "AmbientCapabilities")).is_empty(),
        "{unit}"
    );
    assert_eq!(
        value(&settings, "StateDirectory"),
        Some("capstream"),
        "{unit}"
    );
    let exec = value(&settings, "ExecStart").unwrap();
    assert!(
        exec.contains("--state-dir /var/lib/capstream"),
        "{unit}: --state-dir must be the StateDirectory: {exec}"
    );
    // Its output, by default, is in the one directory a dynamic user may write.
    let environment = value(&settings, "Environment").unwrap_or("");
    assert!(
        exec.contains("--out ${CAPSTREAM_OUT}")
            && environment.contains("CAPSTREAM_OUT=/var/lib/capstream/"),
        "{unit}: ExecStart={exec} Environment={environment}"
    );
}
