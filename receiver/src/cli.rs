//! Command line: where to listen, what to write, which certificate to present.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use common::units::parse_duration;

const AFTER_HELP: &str = "\
Examples:
  Merge every sensor into one nanosecond pcap file:
    receiver --out capture.pcap

  Keep each sensor interface apart (names, filters, counters) in pcapng:
    receiver --out capture.pcapng

  Watch live:
    receiver --out - | tcpdump -nn -r -
    receiver --out - | wireshark -k -i -

On first start the receiver creates a self-signed certificate in --state-dir and prints its
path and SHA-256 fingerprint: give sensors that file (--ca) or that fingerprint (--fingerprint).";

/// Receives packet streams from Capstream sensors over QUIC and merges them, in timestamp
/// order, into one pcap or pcapng capture.
#[derive(Debug, Parser)]
#[command(name = "receiver", version, after_help = AFTER_HELP)]
pub struct Cli {
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

    /// The PEM private key for --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Extra DNS name or IP address for the generated certificate, when sensors reach this
    /// receiver by a name it does not know (e.g. `--cert-name collector.example`). Takes
    /// effect when the certificate is created: delete the old one to regenerate it.
    #[arg(long, value_name = "NAME")]
    pub cert_name: Vec<String>,

    /// How long packets wait so that the packets of all sensors go out in timestamp order
    /// (e.g. `--reorder-window 250ms`). Longer tolerates slower sensors; shorter delivers
    /// sooner.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_window)]
    pub reorder_window: Duration,
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
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
    }
}
