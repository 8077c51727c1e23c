//! Command line: where to listen, what to write, which certificate to present, what
//! sensors must prove; and `receiver certs`, which issues certificates for mutual TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use common::units::parse_duration;

const AFTER_HELP: &str = "\
Examples:
  Merge every sensor into one nanosecond pcap file (-w, as in tcpdump):
    receiver -w capture.pcap

  The same from a config file, or from the environment:
    echo 'out = \"capture.pcap\"' > receiver.toml && receiver --config receiver.toml
    CAPSTREAM_RECEIVER_OUT=capture.pcap receiver

  Keep each sensor interface apart (names, filters, counters) in pcapng:
    receiver --out capture.pcapng

  Watch live:
    receiver --out - | tcpdump -nn -r -
    receiver --out - | wireshark -k -i -

  Accept only sensors with a certificate from your own CA, named by it in the output:
    receiver certs init --dir /etc/capstream/pki
    receiver certs sensor tap-1 --dir /etc/capstream/pki
    receiver --out capture.pcapng --client-ca /etc/capstream/pki/ca.crt \\
      --cert /etc/capstream/pki/receiver.crt --key /etc/capstream/pki/receiver.key

  Or accept only sensors that know a shared token:
    head -c 32 /dev/urandom | base64 > token && chmod 600 token
    receiver --out capture.pcapng --token-file token

On first start the receiver creates a self-signed certificate in --state-dir and prints its
path and SHA-256 fingerprint: give sensors that file (--ca) or that fingerprint (--fingerprint).";

const CERTS_HELP: &str = "\
Examples:
  Create a private CA and a receiver certificate (for localhost, 127.0.0.1, ::1, this
  host's name, and the names sensors use to reach it):
    receiver certs init --dir /etc/capstream/pki --name collector.example

  Issue a certificate for the sensor tap-1 (valid one year); the output names it tap-1:
    receiver certs sensor tap-1 --dir /etc/capstream/pki

Both print the receiver and sensor command lines to use next. ca.key signs every
certificate: keep it on the receiver, or offline.";

/// Receives packet streams from Capstream sensors over QUIC and merges them, in timestamp
/// order, into one pcap or pcapng capture.
#[derive(Debug, Parser)]
#[command(
    name = "receiver",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Output file, or `-` for stdout (e.g. `--out /var/capture/all.pcapng`).
    #[arg(short = 'w', long, value_name = "PATH", default_value = "capture.pcap")]
    pub out: PathBuf,

    /// Output format; default: pcapng when --out ends in .pcapng, else pcap
    /// (e.g. `--format pcapng`).
    #[arg(long, value_enum)]
    pub format: Option<Format>,

    /// UDP address to listen on (e.g. `--listen 0.0.0.0:4433`); the default takes IPv4 and
    /// IPv6.
    #[arg(long, value_name = "ADDR", default_value = "[::]:4433", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Directory for the generated certificate and key, and the key that lets a restarted
    /// receiver reset its predecessor's connections so sensors resume at once
    /// (e.g. `--state-dir /var/lib/capstream`); default: the per-user data directory,
    /// e.g. ~/.local/share/capstream.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Present this PEM certificate chain instead of the generated one
    /// (e.g. `--cert /etc/capstream/receiver.crt --key /etc/capstream/receiver.key`).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// The PEM private key for --cert (e.g. `--key /etc/capstream/receiver.key`).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Extra DNS name or IP address for the generated certificate, when sensors reach this
    /// receiver by a name it does not know (e.g. `--cert-name collector.example`). Takes
    /// effect when the certificate is created: delete the old one to regenerate it.
    #[arg(long, value_name = "NAME")]
    pub cert_name: Vec<String>,

    /// Require of every sensor a client certificate signed by a CA in this PEM file; the
    /// name in the certificate (its first DNS name, else its common name) names the sensor
    /// in the output and the logs (e.g. `--client-ca /etc/capstream/pki/ca.crt`, made by
    /// `receiver certs init`).
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// Require of every sensor the shared token in this file (its content without
    /// surrounding whitespace, at least 16 bytes); sensors pass the same file with
    /// `--token-file` (e.g. `--token-file /etc/capstream/token`). With --client-ca, both
    /// are required.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// How long packets wait so that the packets of all sensors go out in timestamp order
    /// (e.g. `--reorder-window 250ms`). Longer tolerates slower sensors; shorter delivers
    /// sooner.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_window)]
    pub reorder_window: Duration,

    /// Most bytes per second one sensor may send (e.g. `--sensor-rate 50MiB`); a faster one
    /// is slowed down, so its own buffer fills and drops, counted. Default: no limit.
    #[arg(long, value_name = "BYTES", value_parser = parse_sensor_rate)]
    pub sensor_rate: Option<u64>,

    /// Most packet data of one sensor held in the receiver before it is written (e.g.
    /// `--sensor-held 256MiB`); beyond it that sensor is not read until its data is out.
    #[arg(long, value_name = "BYTES", default_value = "64MiB", value_parser = parse_sensor_held)]
    pub sensor_held: usize,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Issue a private CA and certificates for mutual TLS, so that the receiver accepts
    /// only your sensors and names each by its certificate
    #[command(subcommand, after_help = CERTS_HELP, arg_required_else_help = true)]
    Certs(Certs),
}

#[derive(Debug, Subcommand)]
pub enum Certs {
    /// Create a private CA (ca.crt, ca.key) and a receiver certificate signed by it
    /// (receiver.crt, receiver.key) in --dir. Run again to renew the receiver certificate
    /// or add names: an existing CA is kept
    #[command(after_help = CERTS_HELP)]
    Init(InitArgs),
    /// Issue NAME.crt and NAME.key in --dir for one sensor, signed by the CA there; the
    /// receiver names the sensor NAME
    #[command(after_help = CERTS_HELP)]
    Sensor(SensorArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory for the CA and the receiver's certificate; created if missing
    /// (e.g. `--dir /etc/capstream/pki`).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,

    /// Extra DNS name or IP address sensors use to reach the receiver, besides localhost,
    /// 127.0.0.1, ::1 and this host's name (repeatable; e.g. `--name collector.example`).
    #[arg(long, value_name = "NAME")]
    pub name: Vec<String>,

    /// Days the receiver certificate is valid (the CA: ten years).
    #[arg(long, value_name = "N", default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
}

#[derive(Debug, Args)]
pub struct SensorArgs {
    /// The sensor's name: 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'
    /// or '-' (e.g. `tap-1`).
    #[arg(value_name = "NAME", value_parser = parse_sensor_name)]
    pub name: String,

    /// Directory holding the CA made by `receiver certs init`
    /// (e.g. `--dir /etc/capstream/pki`).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,

    /// Days the certificate is valid.
    #[arg(long, value_name = "N", default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,

    /// Replace NAME.crt and NAME.key if they exist.
    #[arg(long)]
    pub force: bool,
}

/// A sensor name that is also a usable DNS name and file name.
fn parse_sensor_name(s: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if s.is_empty() || s.len() > 64 || !s.chars().all(allowed) {
        return Err(format!(
            "invalid sensor name '{s}': use 1 to 64 letters, digits, '.', '_' or '-'"
        ));
    }
    if s.starts_with(['.', '-']) {
        return Err(format!(
            "invalid sensor name '{s}': it may not start with '.' or '-'"
        ));
    }
    // The CA's and the receiver's own files live beside the sensors'.
    if s == "ca" || s == "receiver" {
        return Err(format!(
            "'{s}' names the {s}'s own files in --dir: choose another sensor name"
        ));
    }
    Ok(s.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Classic pcap with nanosecond timestamps; one link type for all sensors.
    Pcap,
    /// pcapng: one interface block per sensor interface, with names, filters and counters.
    Pcapng,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pcap => "pcap",
            Self::Pcapng => "pcapng",
        }
    }
}

impl Cli {
    pub fn format(&self) -> Format {
        self.format
            .unwrap_or_else(|| match self.out.extension().and_then(|e| e.to_str()) {
                Some(ext) if ext.eq_ignore_ascii_case("pcapng") => Format::Pcapng,
                _ => Format::Pcap,
            })
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("invalid listen address '{s}' (use IP:PORT, e.g. 0.0.0.0:4433 or [::]:4433)")
    })
}

fn parse_sensor_rate(s: &str) -> Result<u64, String> {
    let n = common::units::parse_size(s)?;
    if n < 64 * 1024 {
        return Err(format!("sensor rate '{s}' is below 64KiB per second"));
    }
    Ok(n)
}

fn parse_sensor_held(s: &str) -> Result<usize, String> {
    let n = common::units::parse_size(s)?;
    if !(1 << 20..=1 << 40).contains(&n) {
        return Err(format!(
            "sensor held size '{s}' must be between 1MiB and 1TiB"
        ));
    }
    usize::try_from(n).map_err(|_| format!("'{s}' is too large for this machine"))
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    // A sensor that says goodbye waits for its packets to go out, 15 s at most.
    if d > Duration::from_secs(10) {
        return Err(format!("reorder window '{s}' is longer than 10s"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_follows_the_file_name_unless_given() {
        let cli = Cli::parse_from(["receiver", "--out", "x.PCAPNG"]);
        assert_eq!(cli.format(), Format::Pcapng);
        let cli = Cli::parse_from(["receiver", "--out", "x.pcapng", "--format", "pcap"]);
        assert_eq!(cli.format(), Format::Pcap);
        assert_eq!(Cli::parse_from(["receiver"]).format(), Format::Pcap);
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            vec!["receiver", "--listen", "localhost"],
            vec!["receiver", "--reorder-window", "2h"],
            vec!["receiver", "--cert", "a.pem"],
            vec!["receiver", "--format", "pcapx"],
            vec!["receiver", "--sensor-rate", "1KiB"],
            vec!["receiver", "--sensor-held", "lots"],
            vec!["receiver", "--out", "x.pcap", "certs", "init", "--dir", "d"],
            vec!["receiver", "certs", "init"],
            vec!["receiver", "certs", "sensor", "--dir", "d"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn certs_subcommands_leave_the_flat_flags_alone() {
        let cli = Cli::parse_from(["receiver", "--out", "x.pcap", "--client-ca", "ca.crt"]);
        assert!(cli.command.is_none());
        assert_eq!(
            cli.client_ca.as_deref(),
            Some(std::path::Path::new("ca.crt"))
        );
        let cli = Cli::parse_from(["receiver", "certs", "sensor", "tap-1", "--dir", "pki"]);
        let Some(Command::Certs(Certs::Sensor(args))) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (args.name.as_str(), args.days, args.force),
            ("tap-1", 365, false)
        );
        let cli = Cli::parse_from([
            "receiver",
            "certs",
            "init",
            "--dir",
            "pki",
            "--name",
            "c.example",
        ]);
        assert!(matches!(cli.command, Some(Command::Certs(Certs::Init(_)))));
    }

    #[test]
    fn sensor_names() {
        for good in ["a", "tap-1", "dmz.tap_2", &"x".repeat(64)] {
            assert_eq!(parse_sensor_name(good).as_deref(), Ok(good));
        }
        for bad in [
            "",
            ".a",
            "-a",
            "a b",
            "a/b",
            "ä",
            &"x".repeat(65),
            "ca",
            "receiver",
        ] {
            assert!(parse_sensor_name(bad).is_err(), "{bad}");
        }
    }
}
