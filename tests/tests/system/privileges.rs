//! Least privilege: the capabilities each capture mode needs to start, and what the sensor
//! keeps once its capture is attached (README, "Privileges"), checked on real processes:
//! their credentials as /proc/<pid>/task/*/status shows them, and their captures.
//!
//! The capability table was found by hand the way the table test below checks it, and
//! what the sensor still needs after attaching by dropping everything and watching
//! `strace -f` for refused calls (there were none):
//!
//! ```sh
//! ip netns exec NS setpriv --reuid nobody --regid nogroup --clear-groups \
//!     --inh-caps -all,+net_raw,+bpf,+net_admin --ambient-caps -all,+net_raw,+bpf,+net_admin \
//!     --bounding-set -all,+net_raw,+bpf,+net_admin \
//!     sensor --mode tc -i cap0 --receiver 127.0.0.1:4433 --ca receiver.crt
//! ```
//!
//! with each capability set of the table (captures), and with each one left out (one
//! `sensor: error:` line, exit 1); the afxdp row adds `+ipc_lock` and `--dedicated`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testbed::capstream::{
    compare_captures, start_sensor, start_sensor_through, start_tcpdump, stop_reference,
    tcpdump_records, Receiver, Scratch,
};
use testbed::{corpus, require_root, run, Lab, Proc};

const NOBODY: u32 = 65534;
const PPS: u32 = 8000;

// linux/capability.h
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_IPC_LOCK: u32 = 14;
const CAP_BPF: u32 = 39;

fn cap_name(cap: u32) -> &'static str {
    match cap {
        CAP_NET_ADMIN => "net_admin",
        CAP_NET_RAW => "net_raw",
        CAP_IPC_LOCK => "ipc_lock",
        CAP_BPF => "bpf",
        _ => unreachable!("no capability {cap} in the table"),
    }
}

/// What a capture mode needs to start (README, "Privileges").
fn needed_to_start(mode: &str) -> Vec<u32> {
    match mode {
        "pcap" => vec![CAP_NET_RAW],
        "ebpf" | "tc" | "xdp" => vec![CAP_NET_RAW, CAP_BPF, CAP_NET_ADMIN],
        "afxdp" => vec![CAP_NET_RAW, CAP_BPF, CAP_NET_ADMIN, CAP_IPC_LOCK],
        _ => unreachable!("no mode {mode} in the table"),
    }
}

/// The running kernel's (major, minor).
fn kernel() -> (u32, u32) {
    let release = run("uname", &["-r"]).unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// What the sensor keeps once attached, as a capability mask (README, "Privileges"):
/// nothing, except on kernels that attach through netlink or refuse bpf() to the
/// unprivileged.
fn kept_after_attach(mode: &str) -> u64 {
    let kernel = kernel();
    let bpf_refused = kernel < (6, 5)
        && std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
            .map_or(true, |v| v.trim() != "0");
    let mut kept = 0;
    let netlink = match mode {
        "tc" => kernel < (6, 6),
        "xdp" | "afxdp" => kernel < (5, 9),
        _ => false,
    };
    if netlink {
        kept |= 1 << CAP_NET_ADMIN;
    }
    if mode != "pcap" && bpf_refused {
        kept |= 1 << CAP_BPF;
    }
    kept
}

/// One thread's credentials, from its /proc status.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Creds {
    uids: Vec<u32>,
    gids: Vec<u32>,
    groups: Vec<u32>,
    inheritable: u64,
    permitted: u64,
    effective: u64,
    bounding: u64,
    ambient: u64,
    no_new_privs: bool,
}

fn creds(status: &str) -> Creds {
    let field = |name: &str| -> &str {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in:\n{status}"))
            .trim()
    };
    let ids = |name: &str| -> Vec<u32> {
        field(name)
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    let mask = |name: &str| u64::from_str_radix(field(name), 16).unwrap();
    Creds {
        uids: ids("Uid"),
        gids: ids("Gid"),
        groups: ids("Groups"),
        inheritable: mask("CapInh"),
        permitted: mask("CapPrm"),
        effective: mask("CapEff"),
        bounding: mask("CapBnd"),
        ambient: mask("CapAmb"),
        no_new_privs: field("NoNewPrivs") == "1",
    }
}

/// Every thread of `pid` with its credentials: capabilities are per thread, so each one
/// must have given them up.
fn thread_creds(pid: u32) -> Vec<(String, Creds)> {
    let mut threads: Vec<(String, Creds)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let status = std::fs::read_to_string(path.join("status")).unwrap();
            let name = status.lines().next().unwrap_or("").to_string();
            (name, creds(&status))
        })
        .collect();
    threads.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        threads.len() >= 3,
        "the runtime and capture threads must be running: {threads:?}"
    );
    threads
}

/// Asserts that every thread runs as `uid`/`gid` (and, unless root, with no supplementary
/// groups), exactly `kept` permitted and effective, nothing inheritable or ambient, and
/// no_new_privs.
fn assert_privileges(proc: &Proc, uid: u32, gid: u32, kept: u64) {
    for (thread, c) in thread_creds(proc.pid()) {
        let what = format!("{thread}: {c:?}\n{}", proc.stderr());
        assert_eq!(c.uids, [uid; 4], "{what}");
        assert_eq!(c.gids, [gid; 4], "{what}");
        if uid != 0 {
            assert!(c.groups.is_empty(), "{what}");
        }
        assert_eq!(c.effective, kept, "{what}");
        assert_eq!(c.permitted, kept, "{what}");
        assert_eq!(c.inheritable, 0, "{what}");
        assert_eq!(c.ambient, 0, "{what}");
        assert!(c.no_new_privs, "{what}");
    }
}

/// `setpriv` arguments that run a program as nobody with exactly `caps`.
fn as_nobody_with(caps: &[u32]) -> Vec<String> {
    let set: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", cap_name(*c))))
        .collect::<Vec<_>>()
        .join(",");
    [
        "setpriv",
        "--reuid",
        "nobody",
        "--regid",
        "nogroup",
        "--clear-groups",
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
        "--bounding-set",
        &set,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The arguments of `mode` on the lab's capture interface, capturing what `filter`
/// matches (`--mode afxdp` takes those frames away from the stack: ARP must pass).
fn mode_args<'a>(mode: &'a str, iface: &'a str, filter: &'a str) -> Vec<&'a str> {
    let mut args = vec!["--iface", iface, "--mode", mode];
    if mode == "afxdp" {
        args.push("--dedicated");
    }
    if !filter.is_empty() {
        args.extend(["--bpf", filter]);
    }
    args
}

/// Waits until the receiver's output holds at least `n` packets matching `filter`.
fn wait_for_packets(out: &Path, filter: &str, n: usize, sensor: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcpdump_records(out, filter).map_or(0, |r| r.len()) < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} {filter} packets reached the receiver:\n{}",
            sensor.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The line the sensor logs once it has given up its privileges.
fn privileges_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("privileges: running as "))
        .unwrap_or_else(|| panic!("no privileges line in:\n{log}"))
}

/// Pings the capture side from the other and waits for the echo requests in the
/// receiver's output (inbound: every mode sees them), then stops the sensor, which must
/// detach cleanly and leave no XDP program behind.
fn ping_captured_then_stop(lab: &Lab, out: &Path, sensor: &mut Proc) {
    // Without replies under --mode afxdp, which takes the requests away: ping may fail.
    lab.gen
        .exec("ping", &["-c", "3", "-i", "0.2", "-W", "1", "198.18.0.2"])
        .ok();
    wait_for_packets(out, "icmp[icmptype] == icmp-echo", 3, sensor);
    sensor.stop().unwrap();
    let log = sensor.stderr();
    assert!(!log.contains("cannot detach"), "{log}");
    let link = lab.cap.ip(&["link", "show", &lab.links[0].1]).unwrap();
    assert!(
        !link.contains("xdp"),
        "an XDP program stayed attached: {link}"
    );
}

/// `--user nobody` in tc and pcap mode: the sensor captures the corpus replay exactly as
/// tcpdump beside it does, while every one of its threads runs as nobody with only the
/// capabilities the README says it keeps (none on current kernels).
#[test]
fn a_sensor_switched_to_nobody_captures_what_tcpdump_captures() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    for mode in ["tc", "pcap"] {
        let dir = Scratch::new("priv-user").unwrap();
        let reference = dir.join("tcpdump.pcap");
        let (mut receiver, out) =
            Receiver::writing(Some(&lab.cap), &dir, "capture.pcap", &[]).unwrap();
        let mut args = mode_args(mode, iface, "");
        args.extend(["--user", "nobody"]);
        let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
        let tcpdump = start_tcpdump(&lab.cap, iface, "", &[], &reference).unwrap();
        assert_privileges(&sensor, NOBODY, NOBODY, kept_after_attach(mode));
        if kept_after_attach(mode) == 0 {
            assert!(
                privileges_line(&sensor.stderr()).contains(
                    "running as nobody (uid 65534, gid 65534) with no capabilities; \
                     no_new_privs set"
                ),
                "{}",
                sensor.stderr()
            );
        }

        lab.replay(0, &corpus::pcap(), PPS).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        // Still nobody and still without capabilities after capturing.
        assert_privileges(&sensor, NOBODY, NOBODY, kept_after_attach(mode));
        let expected = stop_reference(tcpdump, &reference);
        sensor.stop().unwrap();
        receiver.stop().unwrap();

        let log = sensor.stderr();
        assert!(!log.contains("cannot detach"), "{log}");
        let got = tcpdump_records(&out, "").unwrap();
        assert_eq!(
            expected.len(),
            corpus::PACKETS,
            "tcpdump saw the whole corpus"
        );
        if let Err(difference) = compare_captures(&expected, &got, 0) {
            panic!("--mode {mode} --user nobody: {difference}\nsensor log:\n{log}");
        }
    }
}

/// With `--user root` the sensor stays root, but with none of root's capabilities: its
/// permitted, effective and bounding sets are the documented kept set, in every mode.
/// (Started as root without `--user`, it runs as nobody: see the next test.)
#[test]
fn without_user_the_sensor_keeps_root_but_not_its_capabilities() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    for mode in ["pcap", "ebpf", "tc", "xdp", "afxdp"] {
        let dir = Scratch::new("priv-root").unwrap();
        let (mut receiver, out) =
            Receiver::writing(Some(&lab.cap), &dir, "capture.pcap", &[]).unwrap();
        let mut args = mode_args(mode, iface, "icmp");
        args.extend(["--user", "root"]);
        let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
        let kept = kept_after_attach(mode);
        assert_privileges(&sensor, 0, 0, kept);
        for (thread, c) in thread_creds(sensor.pid()) {
            assert_eq!(c.bounding, kept, "{thread}: {c:?}");
        }
        if kept == 0 {
            assert!(
                privileges_line(&sensor.stderr())
                    .contains("running as root (uid 0, gid 0) with no capabilities"),
                "{}",
                sensor.stderr()
            );
        }
        // And it captures.
        ping_captured_then_stop(&lab, &out, &mut sensor);
        receiver.stop().unwrap();
    }
}

/// Started as root without `--user`, the sensor runs as nobody once attached, with only
/// the documented kept capabilities and a seccomp filter, and captures.
#[test]
fn started_as_root_without_user_the_sensor_runs_as_nobody() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    for mode in ["pcap", "tc"] {
        let dir = Scratch::new("priv-default").unwrap();
        let (mut receiver, out) =
            Receiver::writing(Some(&lab.cap), &dir, "capture.pcap", &[]).unwrap();
        let args = mode_args(mode, iface, "icmp");
        let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
        assert_privileges(&sensor, NOBODY, NOBODY, kept_after_attach(mode));
        assert!(
            privileges_line(&sensor.stderr()).contains("running as nobody"),
            "{}",
            sensor.stderr()
        );
        // And every thread runs under the seccomp filter.
        for task in std::fs::read_dir(format!("/proc/{}/task", sensor.pid())).unwrap() {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            assert!(status.contains("Seccomp:\t2\n"), "{mode}: {status}");
        }
        ping_captured_then_stop(&lab, &out, &mut sensor);
        receiver.stop().unwrap();
    }
}

/// The README's table, row by row: started as nobody with exactly the capabilities listed
/// for its mode, the sensor attaches, captures and then holds only the kept set; with any
/// one of them left out it fails with one `sensor: error:` line that names what is missing.
#[test]
fn each_mode_starts_with_exactly_the_documented_capabilities_and_not_one_fewer() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    for mode in ["pcap", "ebpf", "tc", "xdp", "afxdp"] {
        let needed = needed_to_start(mode);
        let dir = Scratch::new("priv-table").unwrap();
        let (mut receiver, out) =
            Receiver::writing(Some(&lab.cap), &dir, "capture.pcap", &[]).unwrap();
        let args = mode_args(mode, iface, "icmp");

        let wrapper = as_nobody_with(&needed);
        let mut sensor =
            start_sensor_through(Some(&lab.cap), &strs(&wrapper), &receiver, &args).unwrap();
        assert_privileges(&sensor, NOBODY, NOBODY, kept_after_attach(mode));
        ping_captured_then_stop(&lab, &out, &mut sensor);

        for missing in &needed {
            let fewer: Vec<u32> = needed.iter().copied().filter(|c| c != missing).collect();
            let mut argv = lab.cap.command("timeout");
            argv.extend(["-s", "KILL", "20"].map(String::from));
            argv.extend(as_nobody_with(&fewer));
            argv.push(
                testbed::workspace_bin("sensor")
                    .to_string_lossy()
                    .into_owned(),
            );
            let cert = receiver.cert.to_string_lossy().into_owned();
            argv.extend(
                ["--receiver", receiver.addr.as_str(), "--ca", cert.as_str()]
                    .iter()
                    .chain(&args)
                    .map(|s| s.to_string()),
            );
            argv.extend(receiver.credentials(&[], Some("nobody")).unwrap());
            let output = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            let what = format!(
                "--mode {mode} without CAP_{}:\n{stderr}",
                cap_name(*missing).to_uppercase()
            );
            assert_eq!(output.status.code(), Some(1), "{what}");
            // Log lines carry a timestamp; the error is the one line that does not.
            let errors: Vec<&str> = stderr
                .lines()
                .filter(|l| !l.starts_with(|c: char| c.is_ascii_digit()))
                .collect();
            assert_eq!(errors.len(), 1, "{what}");
            assert!(errors[0].starts_with("sensor: error: "), "{what}");
            assert!(
                errors[0].contains(&format!("CAP_{}", cap_name(*missing).to_uppercase())),
                "the error names the missing capability: {what}"
            );
        }
        receiver.stop().unwrap();
    }
}

/// The receiver needs no privilege at all: as nobody, with a state directory and an
/// output directory of its own, it takes a sensor's stream and writes it.
#[test]
fn the_receiver_runs_as_nobody() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("priv-receiver").unwrap();
    let (state, outdir) = (dir.join("state"), dir.join("out"));
    for d in [&state, &outdir] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let out = outdir.join("capture.pcapng");
    let wrapper = as_nobody_with(&[]);
    let mut receiver =
        Receiver::writing_through(Some(&lab.cap), &strs(&wrapper), &state, &out, &[]).unwrap();
    for (thread, c) in thread_creds(receiver.proc.pid()) {
        assert_eq!(c.uids, [NOBODY; 4], "{thread}: {c:?}");
        assert_eq!(c.effective | c.permitted | c.ambient, 0, "{thread}: {c:?}");
    }
    let mut sensor = start_sensor(Some(&lab.cap), &receiver, &["--iface", iface]).unwrap();
    lab.replay(0, &corpus::pcap(), PPS).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    sensor.stop().unwrap();
    receiver.stop().unwrap();
    assert_eq!(
        tcpdump_records(&out, "").unwrap().len(),
        corpus::PACKETS,
        "receiver log:\n{}",
        receiver.proc.stderr()
    );
    let owner = |p: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap());
    assert_eq!(owner(&out), NOBODY);
    assert_eq!(owner(&state.join("receiver.key")), NOBODY);
}

/// The spool is written as `--user`: a spool directory the sensor creates is handed to
/// that user, and one it cannot write is refused before the sensor connects.
#[test]
fn the_spool_directory_is_the_users() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let iface = lab.links[0].1.as_str();
    let dir = Scratch::new("priv-spool").unwrap();
    let (mut receiver, _) = Receiver::writing(Some(&lab.cap), &dir, "capture.pcap", &[]).unwrap();

    let created = dir.join("spool/new");
    let created_arg = created.to_string_lossy().into_owned();
    let args = [
        "--iface",
        iface,
        "--user",
        "nobody",
        "--spool-dir",
        &created_arg,
    ];
    let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&created).unwrap());
    assert_eq!(owner, NOBODY, "the new spool directory belongs to --user");
    sensor.stop().unwrap();

    let roots = dir.join("roots");
    std::fs::create_dir(&roots).unwrap();
    let roots_arg = roots.to_string_lossy().into_owned();
    let args = [
        "--iface",
        iface,
        "--user",
        "nobody",
        "--spool-dir",
        &roots_arg,
    ];
    let err = start_sensor(Some(&lab.cap), &receiver, &args)
        .err()
        .expect("root's directory is not nobody's to write");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!(
            "sensor: error: cannot use spool directory {roots_arg}: permission denied"
        )) && text.contains("as --user nobody"),
        "{text}"
    );
    receiver.stop().unwrap();
}

/// An unknown `--user` is a usage error, found before anything is opened: exit 2, one line.
#[test]
fn an_unknown_user_is_one_line_and_exit_2() {
    let output = Command::new(testbed::workspace_bin("sensor"))
        .args([
            "--iface",
            "lo",
            "--receiver",
            "127.0.0.1:4433",
            "--fingerprint",
            &"ab".repeat(32),
            "--user",
            "capstream-no-such-user",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("sensor: error: ")
            && stderr.contains("no user named capstream-no-such-user"),
        "{stderr}"
    );
}
