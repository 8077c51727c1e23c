//! Command line: where to listen, what to write, which certificate to present, what
//! sensors must prove; and `receiver certs`, which issues certificates for mutual TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use program::units::parse_duration;

use crate::sink::kafka::KafkaCompression;
use crate::sink::{Format, Precision};

const AFTER_HELP: &str = "\
Examples:
  Merge every sensor into one nanosecond pcap file (-w, as in tcpdump):
    receiver -w capture.pcap

  The same from a config file, or from the environment:
    echo 'out = \"capture.pcap\"' > receiver.toml && receiver --config receiver.toml
    CAPSTREAM_RECEIVER_OUT=capture.pcap receiver

  Keep each sensor interface apart (names, filters, counters) in pcapng:
    receiver --out capture.pcapng

  Which process sent each packet (sensors run with --attribute): pcapng only, as each
  packet's comment (classic pcap has no place for it):
    receiver --out capture.pcapng && tshark -r capture.pcapng -T fields -e frame.comment

  Watch live:
    receiver --out - | tcpdump -nn -r -
    receiver --out - | wireshark -k -i -

  Serve the merged packets live (PCAP-over-IP) to tshark, Wireshark, Arkime or Zeek, any
  number of clients, beside the file:
    receiver --out capture.pcapng --serve-pcap 127.0.0.1:57012
    tshark -i TCP@127.0.0.1:57012

  The same on any address, over TLS: each client sends the viewer token (created in
  --state-dir as viewer-token) as its first line, e.g. through socat:
    receiver --out capture.pcapng --serve-pcap 0.0.0.0:57012 --serve-pcap-tls
    socat OPENSSL:collector:57012,cafile=receiver.crt -,ignoreeof < viewer-token | tshark -r -

  Push the live stream to a reader that listens (Arkime's pcap-over-ip-server mode), again
  whenever it comes back:
    socat -u TCP-LISTEN:57013,reuseaddr - | tcpdump -r - &
    receiver --out capture.pcapng --push-pcap 127.0.0.1:57013

  A new file every hour or every GiB, named by its start (UTC), the last day's kept:
    receiver --out '/data/cap-%Y%m%d-%H%M%S.pcapng' --rotate-time 1h --rotate-size 1GiB \\
      --keep 24

  One file per sensor, named after it:
    receiver --out '/data/{sensor}.pcapng' --split-by sensor

  One file per process (or per container) of sensors run with --attribute:
    receiver --out '/data/{process}.pcapng' --split-by process

  Accept only sensors with a certificate from your own CA, named by it in the output:
    receiver certs init --dir /etc/capstream/pki
    receiver certs sensor tap-1 --dir /etc/capstream/pki
    receiver --out capture.pcapng --client-ca /etc/capstream/pki/ca.crt \\
      --cert /etc/capstream/pki/receiver.crt --key /etc/capstream/pki/receiver.key

  Sensors must know a token by default: on first start the receiver creates one in
  --state-dir (token, mode 0600) and prints the sensor command line to use. On this host,
  `sensor -i eth0` finds the certificate and the token by itself; elsewhere, copy the token
  (mode 0600). Your own token instead (sensors pass the same file):
    head -c 32 /dev/urandom | base64 > token && chmod 600 token
    receiver --out capture.pcapng --token-file token

  Let Wireshark start captures on sensors run with --allow-on-demand (viewers give the
  viewer token, <state-dir>/viewer-token, to capstream-extcap; see `capstream-extcap --help`):
    receiver --out capture.pcapng --viewer-listen [::]:4434

  Accept any sensor that can reach the port (a lab; logged as a warning):
    receiver --out capture.pcapng --allow-unauthenticated

  Upload the finished capture to an S3-compatible store (here a local MinIO or moto):
    AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_ENDPOINT_URL=http://127.0.0.1:9000 \\
      receiver --out capture.pcapng --upload s3://captures/site-a

  Every sensor batch as one Kafka message (a pcapng of its own, keyed by sensor and
  interface), beside the file; the topic must exist:
    receiver --out capture.pcapng --kafka kafka-1:9093,kafka-2:9093 --kafka-topic packets \\
      --kafka-ca /etc/kafka/ca.crt --kafka-compression zstd

On first start the receiver creates a self-signed certificate and a token in --state-dir and
prints the certificate's path and SHA-256 fingerprint: give sensors that file (--ca) or that
fingerprint (--fingerprint), and the token (--token-file).";

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
    args_conflicts_with_subcommands = true,
    group(clap::ArgGroup::new("publishing").args(["upload", "lake"]).multiple(true))
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Output file, or `-` for stdout (e.g. `--out /var/capture/all.pcapng`); default
    /// capture.pcap, or none with --serve-pcap, --push-pcap or --kafka. An existing FIFO or
    /// character device (e.g. `--out /dev/null`) is written as stdout is. The file name may
    /// hold strftime fields, in UTC (e.g. `--out /data/cap-%Y%m%d-%H%M%S.pcapng`), and
    /// `{sensor}` (`{process}`, `{container}`) with --split-by.
    /// An existing file is continued, never replaced (or written beside, numbered, if it is
    /// not a capture this receiver can append to); a journal beside it lets resuming
    /// sensors go on exactly where the file ends after a crash. Files are created 0600.
    /// Packets attributed to processes (`sensor --attribute`) keep their process only in
    /// pcapng, as packet comments (and a custom option): classic pcap has no place for it.
    #[arg(short = 'w', long, value_name = "PATH")]
    pub out: Option<PathBuf>,

    /// Output format; default: pcapng when --out ends in .pcapng, else pcap
    /// (e.g. `--format pcapng`).
    #[arg(long, value_enum)]
    pub format: Option<Format>,

    /// UDP address to listen on (e.g. `--listen 0.0.0.0:4433`); the default takes IPv4 and
    /// IPv6.
    #[arg(long, value_name = "ADDR", default_value = "[::]:4433", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Directory for the generated certificate and key, the generated tokens (the sensors'
    /// `token`; `viewer-token`, for viewers and the TLS live stream), and the key
    /// that lets a restarted
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
    /// `receiver certs init`). The certificate is then the proof: no token is required
    /// unless --token-file is given too.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// Require of every sensor the shared token in this file (its content without
    /// surrounding whitespace, at least 16 bytes) instead of the one generated in
    /// --state-dir; sensors pass the same file with `--token-file` (e.g.
    /// `--token-file /etc/capstream/token`). With --client-ca, both are required.
    /// Default: the generated token, unless --client-ca or --allow-unauthenticated.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Accept sensors that prove nothing (no token, no client certificate): anyone who can
    /// reach the port may then write packets into the output. Off by default; logged as a
    /// warning.
    #[arg(long, conflicts_with_all = ["token_file", "client_ca"])]
    pub allow_unauthenticated: bool,

    /// How long packets wait so that the packets of all sensors go out in timestamp order
    /// (e.g. `--reorder-window 250ms`). Longer tolerates slower sensors; shorter delivers
    /// sooner. It is also how long TLS keys (`sensor --keylog`) may trail their packets: on
    /// stopping, the receiver reads sensors that send keys for one more window.
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

    /// Serve the merged packets live as classic pcap over TCP (PCAP-over-IP) to any number
    /// of clients, from the moment each connects (e.g. `--serve-pcap 127.0.0.1:57012`, then
    /// `tshark -i TCP@127.0.0.1:57012`). Best effort: a client that reads too slowly has
    /// its packets dropped, counted, never slowing capture or the file; without --out,
    /// batches are acknowledged once handed to the stream. Plain TCP, without
    /// authentication, on loopback only; with --serve-pcap-tls on any address (clients
    /// then speak TLS and send the viewer token), or in clear on another address with
    /// --serve-pcap-allow-remote.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_serve_pcap)]
    pub serve_pcap: Option<SocketAddr>,

    /// The one link type of classic pcap outputs (a pcap file, stdout, the live stream):
    /// a name (ethernet, raw, linux-sll, linux-sll2, ieee802-11, null, loop) or a LINKTYPE_
    /// number (e.g. `--link-type ethernet`). Sensors with another one are refused by a pcap
    /// file and skipped (counted) by a live stream beside a file. Default: the first
    /// authenticated sensor's.
    #[arg(long, value_name = "TYPE", value_parser = parse_link_type)]
    pub link_type: Option<u16>,

    /// Let a plain --serve-pcap listen on an address other than loopback: whoever reaches it
    /// reads every captured packet, in clear (logged as a warning). Prefer --serve-pcap-tls;
    /// else restrict it by other means (a firewall, a Kubernetes NetworkPolicy).
    #[arg(long, requires = "serve_pcap")]
    pub serve_pcap_allow_remote: bool,

    /// Serve --serve-pcap over TLS, with the receiver's certificate (--cert, else the
    /// generated receiver.crt), to clients that send the viewer token as the first line
    /// (the token file as it is); others get one line saying so and are closed, logged and
    /// counted. Any address may then be used. For PCAP-over-IP readers behind socat or
    /// stunnel, e.g. `socat OPENSSL:collector:57012,cafile=receiver.crt -,ignoreeof
    /// < viewer-token | tshark -r -` (ignoreeof: socat keeps the connection open once the
    /// token is sent).
    #[arg(
        long,
        requires = "serve_pcap",
        conflicts_with = "serve_pcap_allow_remote"
    )]
    pub serve_pcap_tls: bool,

    /// Timestamp precision of the live stream (--serve-pcap, --push-pcap): `us`, classic
    /// pcap with microseconds (magic a1b2c3d4), which every reader takes (Arkime's
    /// PCAP-over-IP reader only this one before its 5.0), or `ns`, nanoseconds (magic
    /// a1b23c4d), as the sensors stamp packets and files hold them.
    #[arg(long, value_enum, value_name = "PRECISION", default_value = "us")]
    pub serve_pcap_precision: Precision,

    /// Also send the live stream to a reader that listens for it, as classic pcap over
    /// TCP (e.g. Arkime's readerMethod=pcap-over-ip-server, or
    /// `socat -u TCP-LISTEN:57012 - |
    /// tcpdump -r -`): `--push-pcap 127.0.0.1:57012`. When the
    /// reader goes away, the receiver connects again (backoff 0.25 s to 5 s) and starts
    /// with a new pcap header; meanwhile up to 16 MiB wait for it, the rest is dropped,
    /// counted (log, exit summary, capstream_receiver_push_not_delivered_total). In clear:
    /// a HOST other than loopback needs --push-pcap-allow-remote.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_push_pcap)]
    pub push_pcap: Option<String>,

    /// Let --push-pcap send to a host other than loopback: every captured packet then
    /// crosses the network in clear (logged as a warning).
    #[arg(long, requires = "push_pcap")]
    pub push_pcap_allow_remote: bool,

    // The viewer role (README "Wireshark on demand").
    /// Serve viewers (Wireshark's capstream-extcap) on this UDP address, over QUIC and TLS
    /// 1.3 with this receiver's certificate: they list the connected sensors and their
    /// interfaces, and start on-demand captures on sensors run with --allow-on-demand,
    /// whose packets they get live, merged in time order (e.g. `--viewer-listen
    /// [::]:4434`). Viewers prove themselves with the viewer token (--viewer-token-file),
    /// never a sensor's, or a client certificate (--viewer-ca). Default: no viewers.
    #[arg(long, value_name = "ADDR:PORT")]
    pub viewer_listen: Option<SocketAddr>,

    /// The viewer token that viewers (--viewer-listen) and live-stream clients
    /// (--serve-pcap-tls) must give: this file's content without surrounding whitespace, at
    /// least 16 bytes (e.g. `--viewer-token-file /etc/capstream/viewer-token`). Default:
    /// --state-dir's viewer-token, created on first need (mode 0600, 64 hex digits). It must
    /// differ from the sensors' token: sensors write packets, viewers read them all.
    #[arg(long, value_name = "PATH")]
    pub viewer_token_file: Option<PathBuf>,

    /// Also accept viewers with a client certificate signed by a CA in this PEM file, which
    /// names them in the logs (e.g. `--viewer-ca /etc/capstream/viewer-pki/ca.crt`, made by
    /// `receiver certs init --dir viewer-pki`, certificates by `receiver certs sensor NAME
    /// --dir viewer-pki`); a CA of its own, not --client-ca's, so that no sensor certificate
    /// opens the viewer role. Viewers without a certificate still need the viewer token.
    #[arg(long, value_name = "FILE", requires = "viewer_listen")]
    pub viewer_ca: Option<PathBuf>,

    /// Start a new file before writing to one this large (e.g. `--rotate-size 1GiB`). Files
    /// never replace one another: a name already taken gets a counter (cap-1.pcap).
    #[arg(long, value_name = "BYTES", value_parser = parse_rotate_size)]
    pub rotate_size: Option<u64>,

    /// Start a new file once the current one is this old, if it holds packets
    /// (e.g. `--rotate-time 1h --out /data/cap-%Y%m%d-%H%M.pcapng`).
    #[arg(long, value_name = "DURATION", value_parser = parse_rotate_time)]
    pub rotate_time: Option<Duration>,

    /// Keep the N newest completed files of this receiver, deleting older ones (e.g.
    /// `--keep 24` with `--rotate-time 1h`: a day, plus the file being written).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep: Option<u64>,

    /// Delete this receiver's oldest completed files while they hold more than this
    /// (e.g. `--keep-bytes 500GiB`); the newest completed file always stays.
    #[arg(long, value_name = "BYTES", value_parser = program::units::parse_size)]
    pub keep_bytes: Option<u64>,

    /// Write one file per sensor instead of one merged file, named after the sensor
    /// (certificate name, else its id) made safe for a file name, at `{sensor}` in --out
    /// or before its extension (e.g. `--split-by sensor --out /data/{sensor}-%H%M.pcapng`).
    /// Or one file per process (`process`: SENSOR-NAME-PID, at `{process}`) or per container
    /// (`container`: its id, at `{container}`) of sensors run with --attribute, packet by
    /// packet: packets of no known process go to "unattributed", of processes in no
    /// container to "no-container" (e.g. `--split-by process --out /data/cap.pcapng` gives
    /// /data/cap-tap-1-curl-4242.pcapng). At most 512 files of their own are open at once
    /// (beyond: the shared "more-processes" or "more-containers", counted); one idle for a
    /// minute is completed.
    #[arg(long, value_enum, value_name = "WHAT")]
    pub split_by: Option<SplitBy>,

    /// Upload each finished output file to an S3-compatible store as PREFIX/<file name>
    /// (e.g. `--upload s3://captures/site-a`), never over an existing object (a taken key
    /// gets a counter: PREFIX/<name>-1.pcap). Credentials, region and endpoint come from
    /// the usual variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, and
    /// AWS_ENDPOINT_URL for stores other than AWS (http:// only on loopback, else with
    /// --upload-allow-http). The bucket must answer at start.
    #[arg(long, value_name = "S3_URL")]
    pub upload: Option<String>,

    /// Allow a plain-HTTP AWS_ENDPOINT_URL on another host: the captures then cross the
    /// network unencrypted. A loopback endpoint (a local MinIO) needs no flag.
    #[arg(long, requires = "upload")]
    pub upload_allow_http: bool,

    /// How long the receiver waits at exit for uploads still going on (e.g.
    /// `--upload-timeout 10m`; a second SIGINT or SIGTERM gives up sooner); files not
    /// uploaded by then are named and the exit code is 1. Give systemd's TimeoutStopSec
    /// more than this. With --lake, the same wait for the last segments to be published
    /// (those left are published by the next run).
    #[arg(long, value_name = "DURATION", default_value = "5m", requires = "publishing",
          value_parser = parse_duration)]
    pub upload_timeout: Duration,

    /// Produce every sensor batch as one message to a Kafka topic, through these bootstrap
    /// brokers, HOST:PORT, comma-separated (e.g. `--kafka 10.0.0.5:9092,10.0.0.6:9092
    /// --kafka-topic packets`). Each message is one sensor interface's batch as a pcapng of
    /// its own (any message, written to a file, opens in Wireshark), keyed SENSOR/HOST/IFACE
    /// so an interface stays in one partition, with headers sensor, interface, session,
    /// sequence, packets, first_timestamp_ns, last_timestamp_ns, link_type. A batch is
    /// acknowledged to its sensor only once the broker acknowledged its message (acks from
    /// all in-sync replicas): a broker outage holds the sensors back, nothing is lost. With
    /// or without --out. A broker not on loopback needs TLS (--kafka-tls, --kafka-ca) or
    /// --kafka-allow-plaintext.
    #[arg(long, value_name = "BROKER[,BROKER...]", value_delimiter = ',',
          value_parser = parse_kafka_broker, requires = "kafka_topic")]
    pub kafka: Vec<String>,

    /// Write the merged stream into a capture lake, a directory or an S3 prefix (e.g.
    /// `--lake /data/lake` or `--lake s3://captures/prod`): immutable pcapng segments under
    /// date=YYYY-MM-DD/hour=HH/receiver=NAME/, each with a Parquet index (a row per packet:
    /// time, sensor, addresses, ports...) and a manifest written last, so a query never sees
    /// half a segment. Receivers sharing a lake never collide (--receiver-name); read it back
    /// with `receiver query --lake ...` or any Parquet reader (DuckDB, Athena). Sensors are
    /// acknowledged once a batch is written to the staging segment (--lake-staging); S3 takes
    /// the same AWS_* variables as --upload. With or without --out, --serve-pcap, --kafka.
    #[arg(long, value_name = "DIR|S3_URL")]
    pub lake: Option<String>,

    /// Close a lake segment once it holds this much (e.g. `--segment-size 256MiB`).
    #[arg(long, value_name = "BYTES", default_value = "64MiB", requires = "lake",
          value_parser = parse_rotate_size)]
    pub segment_size: u64,

    /// Close a lake segment once it is this old (e.g. `--segment-time 5m`): a query sees
    /// packets at the latest this long after they came.
    #[arg(long, value_name = "DURATION", default_value = "60s", requires = "lake",
          value_parser = parse_rotate_time)]
    pub segment_time: Duration,

    /// This receiver's name in the lake's layout (e.g. `--receiver-name rx-eu-1`); default:
    /// the host name. Each receiver sharing a lake needs its own.
    #[arg(long, value_name = "NAME", requires = "lake")]
    pub receiver_name: Option<String>,

    /// Where lake segments are written until they are closed and published; a receiver
    /// started again publishes what it finds there (default: STATE_DIR/lake-staging).
    #[arg(long, value_name = "DIR", requires = "lake")]
    pub lake_staging: Option<PathBuf>,

    /// Delete this receiver's whole lake segments (manifest first) older than a duration or
    /// beyond a size (e.g. `--lake-keep 7d` or `--lake-keep 500GiB`; sizes end in B).
    /// Alternatively, let an S3 lifecycle rule expire the lake's objects.
    #[arg(long, value_name = "DURATION|BYTES", requires = "lake", value_parser = parse_lake_keep)]
    pub lake_keep: Option<lake::layout::Keep>,

    /// Allow a plain-HTTP AWS_ENDPOINT_URL on another host for an S3 lake.
    #[arg(long, requires = "lake")]
    pub lake_allow_http: bool,

    /// The topic of --kafka; it must exist (e.g. `--kafka-topic packets`).
    #[arg(long, value_name = "TOPIC", value_parser = parse_kafka_topic, requires = "kafka")]
    pub kafka_topic: Option<String>,

    /// Compress messages in the client: none, snappy, lz4 or zstd (e.g.
    /// `--kafka-compression zstd`: the most saved, the most CPU). Default none.
    #[arg(
        long,
        value_enum,
        value_name = "CODEC",
        default_value = "none",
        requires = "kafka"
    )]
    pub kafka_compression: KafkaCompression,

    /// Reach the brokers over TLS, verified against the system's CA certificates
    /// (`--kafka-tls`); --kafka-ca verifies against your own CA instead.
    #[arg(long, requires = "kafka")]
    pub kafka_tls: bool,

    /// Reach the brokers over TLS, verified against the CA certificates in this PEM file
    /// (e.g. `--kafka-ca /etc/kafka/ca.crt`).
    #[arg(long, value_name = "FILE", requires = "kafka")]
    pub kafka_ca: Option<PathBuf>,

    /// Present this PEM client certificate chain to the brokers (TLS, mutual
    /// authentication; e.g. `--kafka-cert receiver.crt --kafka-key receiver.key`).
    #[arg(long, value_name = "FILE", requires_all = ["kafka", "kafka_key"])]
    pub kafka_cert: Option<PathBuf>,

    /// The PEM private key of --kafka-cert.
    #[arg(long, value_name = "FILE", requires = "kafka_cert")]
    pub kafka_key: Option<PathBuf>,

    /// Log in to the brokers with SASL: plain, scram-sha-256 or scram-sha-512, as
    /// --kafka-user with the password in --kafka-password-file (e.g. `--kafka-sasl
    /// scram-sha-512 --kafka-user capstream --kafka-password-file /etc/capstream/kafka-pw`).
    /// PLAIN sends the password as it is: use it over TLS.
    #[arg(long, value_enum, value_name = "MECHANISM",
          requires_all = ["kafka", "kafka_user", "kafka_password_file"])]
    pub kafka_sasl: Option<KafkaSasl>,

    /// The SASL user name of --kafka-sasl.
    #[arg(long, value_name = "NAME", requires = "kafka_sasl")]
    pub kafka_user: Option<String>,

    /// The file holding the SASL password of --kafka-sasl (its first line; mode 0600).
    #[arg(long, value_name = "FILE", requires = "kafka_sasl")]
    pub kafka_password_file: Option<PathBuf>,

    /// Send to brokers not on loopback without TLS: captures (and a SASL PLAIN password)
    /// then cross the network in clear.
    #[arg(long, requires = "kafka")]
    pub kafka_allow_plaintext: bool,

    /// Serve Prometheus metrics over HTTP on this address (e.g. `--metrics 127.0.0.1:9100`,
    /// then `curl -s 127.0.0.1:9100/metrics | grep capstream_`); default: none. A sensor's
    /// series stay 5 minutes after its session ends, then go.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,

    /// No live status line on stderr (shown only when stderr is a terminal), e.g. when
    /// running in tmux with logs you want to copy (`--no-status`).
    #[arg(long)]
    pub no_status: bool,

    /// At exit, write the exit summary's figures as JSON to this file (mode 0600, replaced
    /// whole; e.g. `--summary-json /run/capstream/receiver-summary.json`): per sensor
    /// session what was written and received and the sensor's last statistics, the live
    /// stream's figures, the Kafka output's, the TLS keys' and the upload report. Also
    /// written when the run fails.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,

    /// Write no TLS keys. Sensors run with --keylog send the lines of their TLS key logs,
    /// and a pcapng output writes them in Decryption Secrets Blocks, each ahead of the
    /// handshake it opens (and again at the start of a rotated file whose handshakes need
    /// it), so that Wireshark and tshark read the file decrypted, no key file needed (to
    /// strip them from a file later: `editcap --discard-all-secrets`). For sites whose
    /// policy forbids keeping keys: the lines are still acknowledged and counted, never
    /// written. Classic pcap cannot hold keys at all (said once, when such a sensor joins).
    #[arg(long)]
    pub drop_secrets: bool,
}

/// SASL mechanisms of --kafka-sasl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KafkaSasl {
    Plain,
    #[value(name = "scram-sha-256")]
    ScramSha256,
    #[value(name = "scram-sha-512")]
    ScramSha512,
}

pub use crate::sink::files::SplitBy;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read packets back from a capture lake (`--lake`): a time range, sensors and a
    /// tcpdump filter, from every receiver's segments, without duplicates, in time order
    #[command(after_help = QUERY_HELP)]
    Query(QueryArgs),
    /// Issue a private CA and certificates for mutual TLS, so that the receiver accepts
    /// only your sensors and names each by its certificate
    #[command(subcommand, after_help = CERTS_HELP, arg_required_else_help = true)]
    Certs(Certs),
}

const QUERY_HELP: &str = "Examples:
  receiver query --lake /data/lake --from -15m 'host 198.18.0.5 and tcp port 443' -w out.pcapng
  receiver query --lake s3://captures/prod --from 2026-12-05T10:00:00Z --to 10:05 -w - | tshark -r -
  receiver query --lake /data/lake --list
Times: RFC 3339 (2026-12-05T10:00:00Z), a time of day in UTC (10:05, on --from's date, else
today), `now`, or relative to now (-15m, -2h, -1d). What cannot match is skipped by the index
(the time range, the sensors, and the hosts and ports of a filter joined by `and` only); the
filter itself is libpcap's, so the answer equals tcpdump -r over the whole lake with it.";

/// `receiver query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The lake: a directory or s3://BUCKET/PREFIX (AWS_* variables as for --upload).
    #[arg(long, value_name = "DIR|S3_URL")]
    pub lake: String,

    /// Packets from this time on (default: the lake's beginning).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub from: Option<String>,

    /// Packets up to this time, inclusive (default: the lake's end).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub to: Option<String>,

    /// Only this sensor's packets (repeatable; e.g. `--sensor edge-1 --sensor edge-2`).
    #[arg(long, value_name = "NAME")]
    pub sensor: Vec<String>,

    /// Write the answer to FILE, or `-` for stdout.
    #[arg(
        short = 'w',
        long = "write",
        value_name = "FILE",
        required_unless_present = "list"
    )]
    pub write: Option<PathBuf>,

    /// The answer's format: pcapng (an interface block per sensor interface, packet
    /// comments kept, the TLS keys of the segments read in Decryption Secrets Blocks) or
    /// pcap (nanosecond timestamps, one link type, no place for keys: their count is said
    /// on stderr).
    #[arg(long, value_enum, default_value = "pcapng")]
    pub format: Format,

    /// Say on stderr what was read: segments pruned and read, bytes fetched, packets matched.
    #[arg(long)]
    pub stats: bool,

    /// List the lake's sensors and the time ranges it covers, instead of querying.
    #[arg(long, conflicts_with_all = ["write", "filter"])]
    pub list: bool,

    /// Allow a plain-HTTP AWS_ENDPOINT_URL on another host.
    #[arg(long)]
    pub allow_http: bool,

    /// A tcpdump filter (e.g. `'host 198.18.0.5 and tcp port 443'`); several words are
    /// joined as tcpdump joins them. None: every packet.
    #[arg(value_name = "FILTER", trailing_var_arg = true)]
    pub filter: Vec<String>,
}

/// `--lake-keep`: a duration (s, m, h, d) or a size ending in B (500GiB, 20GB).
fn parse_lake_keep(s: &str) -> Result<lake::layout::Keep, String> {
    let t = s.trim();
    if t.to_ascii_lowercase().ends_with('b') {
        return program::units::parse_size(t).map(lake::layout::Keep::Bytes);
    }
    parse_long_duration(t).map(lake::layout::Keep::Age)
}

/// A duration as [`program::units::parse_duration`] takes it, or whole days (`7d`).
pub fn parse_long_duration(s: &str) -> Result<Duration, String> {
    match s.strip_suffix('d') {
        Some(days) => days
            .parse::<u64>()
            .ok()
            .and_then(|d| d.checked_mul(86_400))
            .map(Duration::from_secs)
            .ok_or_else(|| format!("invalid duration '{s}' (e.g. 15m, 2h, 7d)")),
        None => program::units::parse_duration(s),
    }
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

/// `-`, or an existing character device or FIFO.
pub fn is_stream(out: &Path) -> bool {
    #[cfg(unix)]
    let device = {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(out)
            .is_ok_and(|m| m.file_type().is_char_device() || m.file_type().is_fifo())
    };
    #[cfg(not(unix))]
    let device = false;
    out.as_os_str() == "-" || device
}

impl Cli {
    pub fn format(&self) -> Format {
        let out = self.out_path();
        self.format.unwrap_or_else(|| {
            match out.and_then(|o| o.extension()).and_then(|e| e.to_str()) {
                Some(ext) if ext.eq_ignore_ascii_case("pcapng") => Format::Pcapng,
                _ => Format::Pcap,
            }
        })
    }

    /// The file or pipe to write: --out, else capture.pcap unless the live stream or
    /// Kafka is the only output.
    pub fn out_path(&self) -> Option<&Path> {
        match &self.out {
            Some(out) => Some(out),
            None if self.is_live() || !self.kafka.is_empty() || self.lake.is_some() => None,
            None => Some(Path::new("capture.pcap")),
        }
    }

    /// The output when it is a file: not `-` (stdout), and not an existing character device
    /// or FIFO (`--out /dev/null`, a named pipe), which are written as a stream is: no
    /// journal, no continuing, no rotation.
    pub fn out_file(&self) -> Option<&Path> {
        self.out_path().filter(|out| !is_stream(out))
    }

    /// Whether the live stream runs: served (--serve-pcap), pushed (--push-pcap) or both.
    pub fn is_live(&self) -> bool {
        self.serve_pcap.is_some() || self.push_pcap.is_some()
    }

    /// Exposures the user must ask for by name, as one line for the user.
    pub fn check_exposure(&self) -> Result<(), String> {
        if let Some(addr) = self.serve_pcap {
            let plain = !self.serve_pcap_tls && !self.serve_pcap_allow_remote;
            if plain && !addr.ip().is_loopback() {
                return Err(format!(
                    "--serve-pcap {addr} would give every captured packet, unauthenticated and \
                     in clear, to anyone who reaches it: add --serve-pcap-tls (TLS and the \
                     viewer token), use a loopback address (e.g. 127.0.0.1:{}), or add \
                     --serve-pcap-allow-remote to serve it in clear",
                    addr.port()
                ));
            }
        }
        match &self.push_pcap {
            Some(target) if !is_loopback(target) && !self.push_pcap_allow_remote => Err(format!(
                "--push-pcap {target} would send every captured packet across the network in \
                 clear: push to a loopback address (e.g. a local stunnel or socat that \
                 encrypts it), or add --push-pcap-allow-remote"
            )),
            _ => Ok(()),
        }
    }

    /// A broker reached without TLS, not on loopback, unless allowed: as one line.
    pub fn check_kafka_exposure(&self) -> Result<(), String> {
        let tls = self.kafka_tls || self.kafka_ca.is_some() || self.kafka_cert.is_some();
        if tls || self.kafka_allow_plaintext {
            return Ok(());
        }
        match self.kafka.iter().find(|b| !is_loopback(b)) {
            Some(broker) => Err(format!(
                "--kafka {broker} is not on loopback and would get every captured packet in \
                 clear: add --kafka-tls or --kafka-ca FILE, or --kafka-allow-plaintext"
            )),
            None => Ok(()),
        }
    }

    /// Combinations of output flags that mean nothing, as one line for the user.
    pub fn check_outputs(&self) -> Result<(), String> {
        let rotating = self.rotate_size.is_some() || self.rotate_time.is_some();
        let splitting = self.split_by.is_some();
        if (rotating || splitting) && self.out_file().is_none() {
            let flag = if rotating {
                "--rotate-size/--rotate-time"
            } else {
                "--split-by"
            };
            return Err(match self.out_path() {
                Some(out) => format!("{flag} needs a file: --out {} is a stream", out.display()),
                None => format!("{flag} needs a file: add --out PATH"),
            });
        }
        if self.lake.is_some() && self.out.is_none() && self.format.is_some() {
            return Err(
                "--format applies to --out: lake segments are always pcapng (add --out PATH, or \
                 drop --format)"
                    .into(),
            );
        }
        if self.lake.as_deref() == Some("-") {
            return Err("--lake takes a directory or s3://BUCKET/PREFIX, not stdout".into());
        }
        if (self.keep.is_some() || self.keep_bytes.is_some()) && !rotating {
            return Err(
                "--keep and --keep-bytes delete rotated files: add --rotate-size or \
                 --rotate-time"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A bootstrap broker: HOST:PORT (an IPv6 address in brackets).
fn parse_kafka_broker(s: &str) -> Result<String, String> {
    let invalid = || {
        format!(
            "invalid Kafka broker '{s}': use HOST:PORT, e.g. kafka-1.example:9092, \
             10.0.0.5:9092 or [2001:db8::5]:9092"
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(invalid)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        }
    };
    if port_ok && host_ok {
        Ok(s.to_string())
    } else {
        Err(invalid())
    }
}

/// A topic name as Kafka takes it: 1 to 249 letters, digits, '.', '_' or '-', not '.' or
/// '..'.
fn parse_kafka_topic(s: &str) -> Result<String, String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if s.is_empty() {
        return Err("the Kafka topic name is empty: give one, e.g. --kafka-topic packets".into());
    }
    if s.len() > 249 || !s.chars().all(legal) || s == "." || s == ".." {
        return Err(format!(
            "invalid Kafka topic name '{s}': use 1 to 249 letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(s.to_string())
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("invalid listen address '{s}' (use IP:PORT, e.g. 0.0.0.0:4433 or [::]:4433)")
    })
}

fn parse_sensor_rate(s: &str) -> Result<u64, String> {
    size_of_64k_or_more(s, "sensor rate")
}

/// A size of 64KiB or more; `what` names it in the error.
fn size_of_64k_or_more(s: &str, what: &str) -> Result<u64, String> {
    let n = program::units::parse_size(s)?;
    if n < 64 * 1024 {
        return Err(format!("{what} '{s}' is below 64KiB"));
    }
    Ok(n)
}

fn parse_sensor_held(s: &str) -> Result<usize, String> {
    let n = program::units::parse_size(s)?;
    if !(1 << 20..=1 << 40).contains(&n) {
        return Err(format!(
            "sensor held size '{s}' must be between 1MiB and 1TiB"
        ));
    }
    usize::try_from(n).map_err(|_| format!("'{s}' is too large for this machine"))
}

fn parse_serve_pcap(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("invalid --serve-pcap address '{s}' (use IP:PORT, e.g. 127.0.0.1:57012)")
    })
}

/// HOST:PORT, HOST a name or an address (IPv6 in brackets), resolved at each connection.
fn parse_push_pcap(s: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "invalid --push-pcap address '{s}' (use HOST:PORT, e.g. 127.0.0.1:57012 or \
             arkime.example:57012)"
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = !host.is_empty()
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    if port_ok && host_ok {
        Ok(s.to_string())
    } else {
        Err(bad())
    }
}

/// Whether a HOST:PORT (--push-pcap, --kafka) is this host: a loopback address, or
/// `localhost`. A name is not resolved at start (it may resolve elsewhere later).
fn is_loopback(target: &str) -> bool {
    let host = target.rsplit_once(':').map_or(target, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Link types by name (the usual LINKTYPE_ values), else a number.
const LINK_TYPES: [(&str, u16); 8] = [
    ("null", 0),
    ("ethernet", 1),
    ("en10mb", 1),
    ("raw", 101),
    ("ieee802-11", 105),
    ("loop", 108),
    ("linux-sll", 113),
    ("linux-sll2", 276),
];

fn parse_link_type(s: &str) -> Result<u16, String> {
    LINK_TYPES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, n)| *n)
        .or_else(|| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "invalid link type '{s}' (use a LINKTYPE_ number, or one of ethernet, raw, \
                 linux-sll, linux-sll2, ieee802-11, null, loop)"
            )
        })
}

fn parse_rotate_size(s: &str) -> Result<u64, String> {
    size_of_64k_or_more(s, "rotate size")
}

fn parse_rotate_time(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("rotate time '{s}' is below 1s"));
    }
    Ok(d)
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
            vec!["receiver", "--upload-timeout", "5s"],
            vec![
                "receiver",
                "--upload",
                "s3://b/p",
                "--upload-timeout",
                "soon",
            ],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
    }

    /// Brokers are HOST:PORT, the topic a legal Kafka name; the receiver then needs no file,
    /// and a broker off loopback needs TLS or the flag that allows clear text.
    #[test]
    fn kafka_brokers_and_topic_are_checked() {
        for args in [
            vec!["receiver", "--kafka", "nohost", "--kafka-topic", "t"],
            vec!["receiver", "--kafka", "h:0", "--kafka-topic", "t"],
            vec!["receiver", "--kafka", "h:99999", "--kafka-topic", "t"],
            vec!["receiver", "--kafka", "a b:9092", "--kafka-topic", "t"],
            vec!["receiver", "--kafka", "[::1:9092", "--kafka-topic", "t"],
            vec!["receiver", "--kafka", "h:9092", "--kafka-topic", ""],
            vec!["receiver", "--kafka", "h:9092", "--kafka-topic", "a/b"],
            vec!["receiver", "--kafka", "h:9092"],
            vec!["receiver", "--kafka-topic", "t"],
            vec!["receiver", "--kafka-sasl", "plain"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
        let cli = Cli::parse_from([
            "receiver",
            "--kafka",
            "127.0.0.1:9092,[::1]:9093,localhost:9094",
            "--kafka-topic",
            "packets.v1",
        ]);
        assert_eq!(cli.kafka.len(), 3);
        assert_eq!(cli.out_path(), None);
        assert_eq!(cli.check_kafka_exposure(), Ok(()));
        let remote = Cli::parse_from(["receiver", "--kafka", "k1:9092", "--kafka-topic", "t"]);
        assert!(remote.check_kafka_exposure().is_err());
        let tls = Cli::parse_from([
            "receiver",
            "--kafka",
            "k1:9092",
            "--kafka-topic",
            "t",
            "--kafka-tls",
        ]);
        assert_eq!(tls.check_kafka_exposure(), Ok(()));
    }

    #[test]
    fn upload_timeout_defaults_to_five_minutes() {
        let cli = Cli::parse_from(["receiver", "--upload", "s3://b/p"]);
        assert_eq!(cli.upload.as_deref(), Some("s3://b/p"));
        assert_eq!(cli.upload_timeout, Duration::from_secs(300));
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
    fn output_combinations() {
        let check = |args: &[&str]| {
            Cli::parse_from(std::iter::once("receiver").chain(args.iter().copied())).check_outputs()
        };
        assert!(check(&["--rotate-size", "1GiB", "--keep", "3"]).is_ok());
        assert!(check(&["--serve-pcap", "127.0.0.1:1"]).is_ok());
        assert!(check(&["--split-by", "sensor", "--out", "d/x.pcap"]).is_ok());
        for bad in [
            &["--out", "-", "--rotate-time", "1h"][..],
            &["--out", "-", "--split-by", "sensor"],
            &["--serve-pcap", "127.0.0.1:1", "--split-by", "sensor"],
            &["--keep-bytes", "1GiB"],
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
        let live_only = Cli::parse_from(["receiver", "--serve-pcap", "127.0.0.1:1"]);
        assert_eq!(live_only.out_path(), None);
        assert_eq!(
            Cli::parse_from(["receiver"]).out_path(),
            Some(Path::new("capture.pcap"))
        );
    }

    #[test]
    fn a_remote_live_stream_and_an_open_receiver_are_asked_for_by_name() {
        let check = |args: &[&str]| {
            Cli::parse_from(std::iter::once("receiver").chain(args.iter().copied()))
                .check_exposure()
        };
        assert!(check(&[]).is_ok());
        assert!(check(&["--serve-pcap", "127.0.0.1:57012"]).is_ok());
        assert!(check(&["--serve-pcap", "[::1]:57012"]).is_ok());
        let refused = check(&["--serve-pcap", "0.0.0.0:57012"]).unwrap_err();
        assert!(refused.contains("--serve-pcap-allow-remote"), "{refused}");
        assert!(check(&["--serve-pcap", "192.0.2.1:57012"]).is_err());
        assert!(check(&["--serve-pcap", "0.0.0.0:57012", "--serve-pcap-allow-remote"]).is_ok());
        for bad in [
            &["--serve-pcap-allow-remote"][..],
            &["--allow-unauthenticated", "--token-file", "t"],
            &["--allow-unauthenticated", "--client-ca", "ca.crt"],
        ] {
            let args = std::iter::once("receiver").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn link_types_by_name_or_number() {
        for (given, number) in [("ethernet", 1), ("LINUX-SLL2", 276), ("147", 147)] {
            assert_eq!(parse_link_type(given), Ok(number), "{given}");
        }
        for bad in ["ether", "70000", "-1", ""] {
            assert!(parse_link_type(bad).is_err(), "{bad}");
        }
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

    #[test]
    fn live_stream_flags() {
        let cli = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("receiver").chain(args.iter().copied()))
        };
        let default = cli(&["--serve-pcap", "127.0.0.1:1"]).unwrap();
        assert_eq!(default.serve_pcap_precision, Precision::Micro);
        let ns = cli(&[
            "--serve-pcap",
            "127.0.0.1:1",
            "--serve-pcap-precision",
            "ns",
        ])
        .unwrap();
        assert_eq!(ns.serve_pcap_precision, Precision::Nano);
        // Pushed only: no file by default either.
        let pushed = cli(&["--push-pcap", "localhost:57012"]).unwrap();
        assert_eq!(pushed.out_path(), None);
        for target in [
            "127.0.0.1:1",
            "[::1]:57012",
            "arkime.example:57012",
            "localhost:9",
        ] {
            assert_eq!(parse_push_pcap(target).as_deref(), Ok(target));
        }
        for bad in ["arkime", ":57012", "host:0", "host:70000", "a b:1", "[::1]"] {
            assert!(parse_push_pcap(bad).is_err(), "{bad}");
        }
        for bad in [
            &[
                "--serve-pcap",
                "127.0.0.1:1",
                "--serve-pcap-precision",
                "ms",
            ][..],
            &["--serve-pcap-tls"],
            &["--push-pcap-allow-remote"],
            &[
                "--serve-pcap",
                "0.0.0.0:1",
                "--serve-pcap-tls",
                "--serve-pcap-allow-remote",
            ],
        ] {
            assert!(cli(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_remote_stream_is_encrypted_unless_clear_is_asked_for() {
        let check = |args: &[&str]| {
            Cli::parse_from(std::iter::once("receiver").chain(args.iter().copied()))
                .check_exposure()
        };
        let refused = check(&["--serve-pcap", "0.0.0.0:57012"]).unwrap_err();
        assert!(refused.contains("--serve-pcap-tls"), "{refused}");
        assert!(check(&["--serve-pcap", "0.0.0.0:57012", "--serve-pcap-tls"]).is_ok());
        assert!(check(&["--push-pcap", "127.0.0.1:57012"]).is_ok());
        assert!(check(&["--push-pcap", "[::1]:57012"]).is_ok());
        assert!(check(&["--push-pcap", "localhost:57012"]).is_ok());
        let refused = check(&["--push-pcap", "arkime.example:57012"]).unwrap_err();
        assert!(refused.contains("--push-pcap-allow-remote"), "{refused}");
        assert!(check(&[
            "--push-pcap",
            "198.18.0.1:57012",
            "--push-pcap-allow-remote"
        ])
        .is_ok());
    }
}
