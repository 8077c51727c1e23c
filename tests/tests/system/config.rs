//! Options from a config file, the environment and the command line, on the real programs
//! (127.0.0.1, ports 5601-5609): each place wins over the one below it, a sensor configured
//! by a file or by the environment alone delivers everything to a receiver configured the
//! same way, tcpdump's habits (a trailing filter expression, `-w`) work, bad files and
//! variables are one line and exit code 2, and the completion scripts and man pages name
//! the options.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use testbed::capstream::{tcpdump_records, Record, Scratch};
use testbed::{corpus, workspace_bin, Proc};

fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// What the sensors stream: the corpus's UDP packets.
fn reference() -> Vec<Record> {
    tcpdump_records(&corpus::pcap(), "udp").unwrap()
}

/// Runs a workspace program to its end (at most 60 s) with `env` added to its environment.
fn run_bin(program: &str, args: &[&str], env: &[(&str, String)]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(workspace_bin(program))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A receiver started with `args` and `env` only (no --listen or --out of the test bed's),
/// once it listens; and the line that says where.
fn receiver(args: &[&str], env: &[(&str, String)]) -> (Proc, String) {
    let mut argv = vec!["env".to_string()];
    argv.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    argv.push(arg(&workspace_bin("receiver")));
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut proc = Proc::start("receiver", &argv, Stdio::null()).unwrap();
    proc.wait_for("fingerprint", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}: {}", proc.stderr()));
    let line = proc
        .stderr()
        .lines()
        .find(|l| l.contains("listening on"))
        .unwrap()
        .to_string();
    (proc, line)
}

/// A sensor run to its end, which must deliver; its stderr.
fn sensor_delivers(args: &[&str], env: &[(&str, String)]) -> String {
    let out = run_bin("sensor", args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sensor {args:?} {env:?}: {stderr}");
    stderr
}

fn stop_and_compare(mut receiver: Proc, out: &Path) {
    receiver.stop().unwrap();
    let got = tcpdump_records(out, "").unwrap();
    let want = reference();
    assert_eq!(got.len(), want.len(), "{}", out.display());
    assert!(
        got == want,
        "{} differs from the corpus's UDP packets",
        out.display()
    );
}

#[test]
fn the_command_line_wins_over_the_environment_which_wins_over_the_file() {
    let dir = Scratch::new("config-layers").unwrap();
    let state = dir.join("state");
    let file = dir.join("receiver.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:5601\"\nout = \"{}\"\nstate-dir = \"{}\"\n\
             reorder-window = \"250ms\"\n",
            arg(&dir.join("from-file.pcap")),
            arg(&state)
        ),
    )
    .unwrap();
    let config = arg(&file);
    let cert = arg(&state.join("receiver.crt"));
    let token = arg(&state.join("token"));
    let corpus = arg(&corpus::pcap());

    // The file alone; a sensor configured by its own file, the filter after the options.
    let (proc, line) = receiver(&["--config", &config], &[]);
    assert!(
        line.contains("listening on 127.0.0.1:5601, writing")
            && line.contains("from-file.pcap as pcap"),
        "{line}"
    );
    let sensor_file = dir.join("sensor.toml");
    std::fs::write(
        &sensor_file,
        format!(
            "read = \"{corpus}\"\nreceiver = \"127.0.0.1:5601\"\nca = [\"{cert}\"]\n\
             token-file = \"{token}\"\nsensor-id = \"from-file\"\n"
        ),
    )
    .unwrap();
    sensor_delivers(&["--config", &arg(&sensor_file), "udp"], &[]);
    stop_and_compare(proc, &dir.join("from-file.pcap"));

    // The environment over the file: another output, named by CAPSTREAM_RECEIVER_CONFIG.
    let env = [
        ("CAPSTREAM_RECEIVER_CONFIG", config.clone()),
        ("CAPSTREAM_RECEIVER_OUT", arg(&dir.join("from-env.pcap"))),
        ("CAPSTREAM_RECEIVER_LISTEN", "127.0.0.1:5602".to_string()),
    ];
    let (proc, line) = receiver(&[], &env);
    assert!(
        line.contains("127.0.0.1:5602") && line.contains("from-env.pcap"),
        "{line}"
    );
    // A sensor configured by the environment alone.
    let sensor_env = [
        ("CAPSTREAM_SENSOR_READ", corpus.clone()),
        ("CAPSTREAM_SENSOR_RECEIVER", "127.0.0.1:5602".to_string()),
        ("CAPSTREAM_SENSOR_CA", cert.clone()),
        ("CAPSTREAM_SENSOR_TOKEN_FILE", token.clone()),
        ("CAPSTREAM_SENSOR_BPF", "udp".to_string()),
    ];
    sensor_delivers(&[], &sensor_env);
    stop_and_compare(proc, &dir.join("from-env.pcap"));
    assert!(!dir.join("from-file.pcap.1").exists());

    // The command line over both, with tcpdump's -w; and over the sensor's environment.
    let out = dir.join("from-flag.pcapng");
    let (proc, line) = receiver(&["-w", &arg(&out), "--listen", "127.0.0.1:5603"], &env);
    assert!(
        line.contains("127.0.0.1:5603") && line.contains("from-flag.pcapng as pcapng"),
        "{line}"
    );
    sensor_delivers(&["--receiver", "127.0.0.1:5603"], &sensor_env);
    stop_and_compare(proc, &out);
}

/// Runs `program` with `args` and `env`, which must fail with exit code 2 and one line.
fn refused(program: &str, args: &[&str], env: &[(&str, String)]) -> String {
    let out = run_bin(program, args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{program} {args:?} {env:?}: {stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{program} {args:?}: one line: {stderr}"
    );
    assert!(
        stderr.starts_with(&format!("{program}: error: ")),
        "{stderr}"
    );
    stderr
}

#[test]
fn bad_config_files_and_variables_are_one_line_naming_the_place() {
    let dir = Scratch::new("config-bad").unwrap();
    let file = dir.join("sensor.toml");
    let config = arg(&file);
    let base =
        "receiver = \"127.0.0.1:5604\"\nfingerprint = \"".to_string() + &"ab".repeat(32) + "\"\n";
    let cases = [
        (
            "iface = [\"lo\"]\ninterface = \"lo\"\n",
            "unknown key 'interface'",
        ),
        ("iface = \"lo\"\nsnaplen = \"all\"\n", "key 'snaplen'"),
        (
            "iface = \"lo\"\nbatch-size = [1]\n",
            "key 'batch-size': expected a string, got an array",
        ),
        (
            "iface = \"lo\"\nzero-copy = 1\n",
            "key 'zero-copy': expected true or false",
        ),
        ("iface = \"lo\"\nmode = \"turbo\"\n", "key 'mode'"),
        (
            "iface = \"lo\"\nbuffer = \"1MiB\n",
            "line 4: invalid basic string",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&file, format!("{base}{text}")).unwrap();
        let e = refused("sensor", &["--config", &config], &[]);
        assert!(e.contains(want) && e.contains(&config), "{text:?}: {e}");
    }
    let e = refused(
        "sensor",
        &["--config", &arg(&dir.join("missing.toml"))],
        &[],
    );
    assert!(e.contains("cannot read config file"), "{e}");
    std::fs::write(&file, format!("{base}iface = \"lo\"\n")).unwrap();
    for (name, value, want) in [
        (
            "CAPSTREAM_SENSOR_IFAC",
            "lo",
            "unknown environment variable CAPSTREAM_SENSOR_IFAC",
        ),
        (
            "CAPSTREAM_SENSOR_BUSY_POLL",
            "maybe",
            "CAPSTREAM_SENSOR_BUSY_POLL: expected true or false",
        ),
        (
            "CAPSTREAM_SENSOR_FLUSH_INTERVAL",
            "2h",
            "environment variable CAPSTREAM_SENSOR_FLUSH_INTERVAL",
        ),
    ] {
        let e = refused(
            "sensor",
            &["--config", &config],
            &[(name, value.to_string())],
        );
        assert!(e.contains(want), "{name}: {e}");
    }
    // The filter once: as --bpf or after the options.
    let e = refused(
        "sensor",
        &["--config", &config, "--bpf", "udp", "port", "53"],
        &[],
    );
    assert!(e.contains("'--bpf <EXPR>' cannot be used with"), "{e}");
    let e = refused(
        "receiver",
        &["--config", &config],
        &[("CAPSTREAM_RECEIVER_SENSOR_RATE", "1".to_string())],
    );
    assert!(e.contains("unknown key 'fingerprint'"), "{e}");

    // --check-config says what the sensor would run with, and refuses what it would.
    let out = run_bin(
        "sensor",
        &["--config", &config, "--check-config", "port", "53"],
        &[("CAPSTREAM_SENSOR_SNAPLEN", "128".to_string())],
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for part in [
        "--snaplen=128",
        "--iface=lo",
        "--receiver=127.0.0.1:5604",
        "port 53",
    ] {
        assert!(shown.contains(part), "{part}: {shown}");
    }
    std::fs::write(&file, "iface = \"lo\"\n").unwrap();
    // On a host with no receiver of its own (an empty home, no state directory), nothing
    // says where to send.
    let home = arg(&dir.join("empty-home"));
    let e = refused(
        "sensor",
        &["--config", &config, "--check-config"],
        &[("HOME", home), ("XDG_DATA_HOME", String::new())],
    );
    assert!(e.contains("--receiver"), "{e}");
}

#[test]
fn completions_and_man_pages_are_generated_and_name_the_options() {
    let dir = Scratch::new("config-generate").unwrap();
    let programs = [
        (
            "sensor",
            &[
                "--iface",
                "--receiver",
                "--snaplen",
                "--config",
                "--check-config",
            ][..],
        ),
        ("receiver", &["--out", "--listen", "--config", "certs"][..]),
    ];
    for (program, options) in programs {
        for what in ["bash", "zsh", "fish", "elvish", "powershell", "man"] {
            let out = run_bin(program, &["--generate", what], &[]);
            assert!(out.status.success(), "{program} --generate {what}");
            // roff writes a hyphen as `\-`.
            let text = String::from_utf8_lossy(&out.stdout).replace("\\-", "-");
            for option in options {
                let bare = option.trim_start_matches('-');
                assert!(
                    text.contains(bare),
                    "{program} --generate {what} lacks {option}"
                );
            }
            let file = dir.join(&format!("{program}.{what}"));
            std::fs::write(&file, &out.stdout).unwrap();
            if what == "bash" {
                let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
                assert!(
                    check.status.success(),
                    "{program}'s bash completion: {check:?}"
                );
            }
        }
        let man = dir.join(&format!("{program}.man"));
        let rendered = Command::new("man")
            .arg("-l")
            .arg(&man)
            .env("MANPAGER", "cat")
            .output();
        let rendered = rendered.unwrap_or_else(|e| {
            panic!("man is missing ({e}): `cargo xtask setup` installs it (package man-db)")
        });
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(
            rendered.status.success() && text.contains("--config"),
            "man -l {}: {}",
            man.display(),
            String::from_utf8_lossy(&rendered.stderr)
        );
    }
}
