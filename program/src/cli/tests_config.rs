//! [`super::parse`]'s layers on a small command shaped like the sensor's: a required
//! choice of source, a repeatable flag, a switch, a default and a checked value.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgGroup, Parser};

use super::{command, resolve, Outcome, Refusal};

#[derive(Debug, Parser)]
#[command(name = "probe")]
#[command(group(ArgGroup::new("source").required(true).args(["iface", "read"])))]
struct Probe {
    #[arg(short = 'i', long, conflicts_with = "read")]
    iface: Vec<String>,
    #[arg(short = 'r', long)]
    read: Option<String>,
    #[arg(long, default_value = "32MiB")]
    buffer: String,
    #[arg(long)]
    zero_copy: bool,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10))]
    level: Option<u32>,
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("program-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, text: &str) -> String {
        let path = self.0.join("probe.toml");
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str], vars: &[(&str, &str)]) -> Result<Outcome<Probe>, Refusal> {
    let argv: Vec<OsString> = std::iter::once("probe")
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect();
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    resolve(command::<Probe>(), argv, &vars)
}

fn probe(args: &[&str], vars: &[(&str, &str)]) -> Probe {
    match run(args, vars) {
        Ok(Outcome::Run(probe)) => probe,
        Ok(_) => panic!("not a run"),
        Err(Refusal::Clap(e, origin)) => panic!("{e} {origin:?}"),
        Err(Refusal::Config(e)) => panic!("{e}"),
    }
}

fn refusal(args: &[&str], vars: &[(&str, &str)]) -> String {
    match run(args, vars) {
        Ok(_) => panic!("accepted {args:?} {vars:?}"),
        Err(Refusal::Clap(e, origin)) => format!("{} {}", e.render(), origin.unwrap_or_default()),
        Err(Refusal::Config(e)) => e,
    }
}

#[test]
fn command_line_beats_environment_beats_file_beats_default() {
    let dir = Dir::new("layers");
    let file =
        dir.file("iface = [\"f0\", \"f1\"]\nbuffer = \"1MiB\"\nzero-copy = true\nlevel = 3\n");
    let config = ["--config", file.as_str()];
    let p = probe(&config, &[]);
    assert_eq!(
        (p.iface, p.buffer.as_str(), p.zero_copy, p.level),
        (
            vec!["f0".to_string(), "f1".to_string()],
            "1MiB",
            true,
            Some(3)
        )
    );
    let env = [
        ("CAPSTREAM_PROBE_BUFFER", "2MiB"),
        ("CAPSTREAM_PROBE_IFACE", "e0, e1"),
        ("CAPSTREAM_PROBE_ZERO_COPY", "false"),
    ];
    let p = probe(&config, &env);
    assert_eq!(
        (p.iface, p.buffer.as_str(), p.zero_copy, p.level),
        (vec!["e0".into(), "e1".into()], "2MiB", false, Some(3))
    );
    let p = probe(&["--config", &file, "--buffer", "3MiB", "-i", "c0"], &env);
    assert_eq!(
        (p.iface, p.buffer.as_str()),
        (vec!["c0".to_string()], "3MiB")
    );
    // The file may come from the environment too; without any, clap's default.
    let p = probe(&[], &[("CAPSTREAM_PROBE_CONFIG", file.as_str())]);
    assert_eq!(p.level, Some(3));
    assert_eq!(probe(&["-i", "x"], &[]).buffer, "32MiB");
}

#[test]
fn a_flag_overrides_what_conflicts_with_it_from_below() {
    let dir = Dir::new("conflicts");
    let file = dir.file("iface = \"f0\"\n");
    let p = probe(&["--config", &file, "-r", "trace.pcap"], &[]);
    assert_eq!((p.iface.len(), p.read.as_deref()), (0, Some("trace.pcap")));
    let p = probe(&["--config", &file], &[("CAPSTREAM_PROBE_READ", "t.pcap")]);
    assert_eq!((p.iface.len(), p.read.as_deref()), (0, Some("t.pcap")));
    // Within one place, clap says they conflict.
    let both = dir.file("iface = \"f0\"\nread = \"t.pcap\"\n");
    assert!(refusal(&["--config", &both], &[]).contains("cannot be used with"));
}

#[test]
fn bad_files_and_variables_are_named_with_what_is_expected() {
    let dir = Dir::new("bad");
    let cases = [
        ("ifaces = [\"a\"]\n", "unknown key 'ifaces'"),
        ("iface = \"a\"\nbuffer = 5.5e99999\n", "line 2"),
        (
            "iface = \"a\"\nbuffer = [\"1MiB\"]\n",
            "key 'buffer': expected a string, got an array",
        ),
        (
            "iface = [1, {}]\n",
            "key 'iface': expected an array of strings",
        ),
        (
            "iface = \"a\"\nzero-copy = \"yes\"\n",
            "key 'zero-copy': expected true or false",
        ),
        ("iface = \"a\"\nlevel = 11\n", "config file"),
        ("iface = \"a\"\n[section]\n", "unknown key 'section'"),
    ];
    for (text, want) in cases {
        let file = dir.file(text);
        let e = refusal(&["--config", &file], &[]);
        assert!(e.contains(want) && e.contains(&file), "{text:?}: {e}");
    }
    let e = refusal(&["--config", "/nonexistent/probe.toml"], &[]);
    assert!(
        e.contains("cannot read config file /nonexistent/probe.toml"),
        "{e}"
    );
    let e = refusal(&["-i", "a"], &[("CAPSTREAM_PROBE_TYPO", "1")]);
    assert!(
        e.contains("unknown environment variable CAPSTREAM_PROBE_TYPO"),
        "{e}"
    );
    let e = refusal(&["-i", "a"], &[("CAPSTREAM_PROBE_ZERO_COPY", "maybe")]);
    assert!(
        e.contains("CAPSTREAM_PROBE_ZERO_COPY: expected true or false"),
        "{e}"
    );
    let e = refusal(&["-i", "a"], &[("CAPSTREAM_PROBE_LEVEL", "0")]);
    assert!(
        e.contains("environment variable CAPSTREAM_PROBE_LEVEL"),
        "{e}"
    );
    // A bad value on the command line names no other place.
    let e = refusal(&["-i", "a", "--level", "0"], &[]);
    assert!(
        !e.contains("environment") && !e.contains("config file"),
        "{e}"
    );
}

#[test]
fn check_config_prints_the_whole_command_line() {
    let dir = Dir::new("check");
    let file = dir.file("iface = [\"f0\"]\nbuffer = \"1 MiB\"\n");
    let Ok(Outcome::Check(args)) = run(&["--config", &file, "--check-config", "--level", "2"], &[])
    else {
        panic!("not a check");
    };
    let shown = super::shell_words(&args);
    assert!(
        shown.starts_with("probe --iface=f0 '--buffer=1 MiB' --config "),
        "{shown}"
    );
    assert!(shown.ends_with("--level 2"), "{shown}");
    assert!(matches!(
        run(&["--check-config"], &[]),
        Err(Refusal::Clap(..))
    ));
}

#[test]
fn completions_and_man_pages_name_every_option() {
    for what in super::generate::TARGETS {
        // Without the required options: generating needs none.
        let Ok(Outcome::Generate(w)) = run(&["--generate", what], &[]) else {
            panic!("{what}");
        };
        let mut out = Vec::new();
        super::generate::write(command::<Probe>(), &w, &mut out).unwrap();
        // roff writes a hyphen as `\-`.
        let text = String::from_utf8(out).unwrap().replace("\\-", "-");
        for option in ["iface", "zero-copy", "config", "check-config"] {
            assert!(text.contains(option), "{what} lacks {option}");
        }
        // clap_complete's bash script offers hidden options too; the man page does not.
        if what == "man" {
            assert!(!text.contains("generate"), "the man page shows --generate");
        }
    }
}
