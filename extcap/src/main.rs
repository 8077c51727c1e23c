//! capstream-extcap: Wireshark's extcap interface to a Capstream receiver's viewer role.
//!
//! Wireshark (and tshark, dumpcap) run it to list interfaces (`--extcap-interfaces`: every
//! interface of every sensor connected to the receiver, `capstream: SENSOR/IFACE`), to ask
//! for their link types and options (`--extcap-dlts`, `--extcap-config`), and to capture
//! (`--capture --fifo PATH --extcap-capture-filter FILTER`): the receiver asks the sensor
//! to capture with that filter in its kernel, and the merged packets come back as pcapng,
//! written to the fifo. The receiver is trusted as a sensor trusts it (`--ca` or
//! `--fingerprint`), and the viewer token (`--token-file`) or a client certificate proves
//! who asks.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use clap::Parser;
use program::exit::{self, Failure};
use protocol::{
    CaptureLimits, CaptureRequest, CaptureTarget, ErrorCode, Message, SensorList, ViewerHello,
};
use quinn::crypto::rustls::QuicClientConfig;
use sensor::error::{Error, Result};
use sensor::fingerprint::{parse_fingerprint, Fingerprint};
use sensor::tls::{self, Trust};

/// The name that starts the program's error line, and its options' variables
/// (`CAPSTREAM_EXTCAP_<OPTION>`).
const PROGRAM: &str = "capstream-extcap";
/// What interface values start with: `capstream:SENSOR/IFACE`.
const PREFIX: &str = "capstream:";
/// How long a capture waits for the receiver to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long listing waits: Wireshark lists interfaces as it starts, and waits for us.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

const AFTER_HELP: &str = "\
Wireshark runs this program; install it with `cargo xtask install-extcap` (into the
personal extcap folder `tshark -G folders` names: ~/.local/lib/wireshark/extcap/ from
Wireshark 4.2, ~/.config/wireshark/extcap/ before) and point it at a receiver started
with --viewer-listen, in a file or the environment (listing takes its options from
there: Wireshark passes none then), e.g.:

  export CAPSTREAM_EXTCAP_RECEIVER=collector.example:4434
  export CAPSTREAM_EXTCAP_CA=/etc/capstream/receiver.crt
  export CAPSTREAM_EXTCAP_TOKEN_FILE=~/.config/capstream/viewer-token
  tshark -D                                    # capstream: SENSOR/IFACE for every sensor
  tshark -i capstream:dmz-tap-1/eth0 -f 'udp port 53' -w dns.pcapng

By hand, the same as Wireshark does it:
  capstream-extcap --extcap-interfaces
  capstream-extcap --capture --extcap-interface capstream:dmz-tap-1/eth0 \\
    --extcap-capture-filter 'tcp port 443' --fifo out.pcapng --also dmz-tap-2/eth0";

/// Wireshark's extcap interface to a Capstream receiver's viewer role: lists the
/// interfaces of every connected sensor and captures on them on demand, the filter running
/// in the sensor's kernel.
#[derive(Debug, Parser)]
#[command(name = "capstream-extcap", version, after_help = AFTER_HELP)]
struct Cli {
    /// extcap: list the interfaces (those of every sensor connected to the receiver).
    #[arg(long)]
    extcap_interfaces: bool,

    /// extcap: the Wireshark version asking; without a value, print this program's.
    #[arg(long, value_name = "VERSION", num_args = 0..=1, default_missing_value = "")]
    extcap_version: Option<String>,

    /// extcap: the interface of --extcap-dlts, --extcap-config and --capture
    /// (`capstream:SENSOR/IFACE`).
    #[arg(long, value_name = "IFACE")]
    extcap_interface: Option<String>,

    /// extcap: list the link types of --extcap-interface.
    #[arg(long)]
    extcap_dlts: bool,

    /// extcap: list the options Wireshark's dialog shows for --extcap-interface.
    #[arg(long)]
    extcap_config: bool,

    /// extcap: capture on --extcap-interface into --fifo.
    #[arg(long, requires_all = ["extcap_interface", "fifo"])]
    capture: bool,

    /// extcap: where the pcapng stream goes (a fifo Wireshark reads, or a file).
    #[arg(long, value_name = "PATH")]
    fifo: Option<PathBuf>,

    /// extcap: the capture filter, as tcpdump takes it; it runs in the sensor's kernel.
    #[arg(long, value_name = "FILTER", default_value = "")]
    extcap_capture_filter: String,

    /// The receiver's viewer endpoint (`receiver --viewer-listen`) as HOST:PORT
    /// (e.g. `--receiver collector.example:4434`).
    #[arg(long, value_name = "HOST:PORT")]
    receiver: Option<String>,

    /// Trust the receiver certificate(s) or CA(s) in this PEM file (e.g. the receiver's
    /// receiver.crt).
    #[arg(long, value_name = "FILE", conflicts_with = "fingerprint")]
    ca: Option<PathBuf>,

    /// Trust only the receiver certificate with this SHA-256 fingerprint (the receiver
    /// prints it when it starts).
    #[arg(long, value_name = "SHA256", value_parser = parse_fingerprint)]
    fingerprint: Option<Fingerprint>,

    /// TLS name to verify in the receiver's certificate; default: HOST of --receiver.
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,

    /// The receiver's viewer token (its <state-dir>/viewer-token, or its
    /// --viewer-token-file); a sensor token is refused.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// A client certificate from the receiver's --viewer-ca, instead of the token.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,

    /// The PEM private key of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,

    /// Also capture on these sensor interfaces (`SENSOR/IFACE`, comma-separated or
    /// repeated): one capture, merged in time order.
    #[arg(long, value_name = "SENSOR/IFACE", value_delimiter = ',')]
    also: Vec<String>,

    /// Stop after this many packets (per sensor interface; 0: no limit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    limit_packets: u64,

    /// Stop after this long (e.g. `10m`); default: the sensor's cap.
    #[arg(long, value_name = "DUR", value_parser = program::units::parse_duration)]
    limit_duration: Option<Duration>,

    /// Bytes kept of each packet, 1..=262144.
    #[arg(long, value_name = "N", default_value_t = protocol::MAX_SNAPLEN,
          value_parser = clap::value_parser!(u32).range(1..=protocol::MAX_SNAPLEN as i64))]
    snaplen: u32,
}

fn main() -> ExitCode {
    default_config();
    let cli = match program::cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.extcap_version.as_deref() == Some("") && !cli.extcap_interfaces {
        println!("{}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if cli.extcap_dlts {
        println!("dlt {{number=1}}{{name=EN10MB}}{{display=Ethernet}}");
        return ExitCode::SUCCESS;
    }
    if cli.extcap_config {
        print_config();
        return ExitCode::SUCCESS;
    }
    if !cli.extcap_interfaces && !cli.capture && cli.extcap_interface.is_some() {
        // Wireshark checks a capture filter as it is typed: a message means invalid.
        if let Some(why) = invalid_filter(&cli.extcap_capture_filter) {
            println!("{why}");
        }
        return ExitCode::SUCCESS;
    }
    if !cli.extcap_interfaces && !cli.capture {
        return exit::fail(
            PROGRAM,
            Failure::BadInput,
            "Wireshark runs this program: give --extcap-interfaces, or --capture with \
             --extcap-interface and --fifo (see --help)",
        );
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return exit::fail(
                PROGRAM,
                Failure::RunFailed,
                format_args!("cannot start the async runtime: {e}"),
            )
        }
    };
    let result = runtime.block_on(run(cli));
    // A thread still blocked on a fifo nobody reads must not keep the program alive.
    runtime.shutdown_background();
    exit::finish(PROGRAM, result, Error::failure)
}

async fn run(cli: Cli) -> Result<()> {
    if cli.extcap_interfaces {
        println!(
            "extcap {{version={}}}{{help=https://github.com/capstream}}",
            env!("CARGO_PKG_VERSION")
        );
        let (_conn, list, _streams) = connect(&cli, LIST_TIMEOUT).await?;
        for sensor in &list.sensors {
            for interface in &sensor.interfaces {
                let name = format!("{}/{interface}", sensor.name);
                println!("interface {{value={PREFIX}{name}}}{{display=capstream: {name}}}");
            }
        }
        return Ok(());
    }
    capture(&cli).await
}

/// Wireshark lists interfaces by running this program with no option of its own: then,
/// without --config or CAPSTREAM_EXTCAP_CONFIG, the options come from
/// `~/.config/capstream/extcap.toml` (the user's configuration directory) when it exists.
fn default_config() {
    const VARIABLE: &str = "CAPSTREAM_EXTCAP_CONFIG";
    let given = std::env::args_os().any(|a| {
        let a = a.to_string_lossy();
        a == "--config" || a.starts_with("--config=")
    });
    if given || std::env::var_os(VARIABLE).is_some() {
        return;
    }
    let file = dirs::config_dir().map(|dir| dir.join("capstream").join("extcap.toml"));
    if let Some(file) = file.filter(|f| f.is_file()) {
        // Still one thread: nothing else reads the environment yet.
        std::env::set_var(VARIABLE, file);
    }
}

/// Connects to the viewer endpoint and says who asks; the receiver answers with its list.
async fn connect(
    cli: &Cli,
    timeout: Duration,
) -> Result<(
    quinn::Connection,
    SensorList,
    (quinn::SendStream, quinn::RecvStream, BytesMut),
)> {
    let receiver = cli.receiver.as_deref().ok_or_else(|| {
        Error::input(
            "no receiver: set receiver = \"HOST:PORT\" (the receiver's --viewer-listen) in \
             ~/.config/capstream/extcap.toml, or CAPSTREAM_EXTCAP_RECEIVER, or --receiver in \
             Wireshark's capture options",
        )
    })?;
    let trust = match (&cli.fingerprint, &cli.ca) {
        (Some(fp), _) => Trust::Fingerprint(*fp),
        (None, Some(ca)) => Trust::CaFiles(vec![ca.clone()]),
        (None, None) => {
            return Err(Error::input(
                "how is the receiver trusted? set --ca FILE (its receiver.crt) or \
                 --fingerprint SHA256 (or CAPSTREAM_EXTCAP_CA, CAPSTREAM_EXTCAP_FINGERPRINT)",
            ))
        }
    };
    let token = cli.token_file.as_deref().map(tls::load_token).transpose()?;
    let client_cert = cli.cert.as_deref().zip(cli.key.as_deref());
    let tls = tls::client_config(&trust, client_cert, protocol::VIEWER_ALPN)?;
    let quic = QuicClientConfig::try_from(tls.config)
        .map_err(|e| Error::runtime(format!("TLS setup failed: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // A quiet capture keeps its connection.
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    config.transport_config(Arc::new(transport));

    let (host, port) = receiver
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().ok()?,
            ))
        })
        .ok_or_else(|| Error::input(format!("--receiver {receiver}: expected HOST:PORT")))?;
    let remote = tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut found| found.next())
        .ok_or_else(|| Error::runtime(format!("cannot resolve receiver host {host}")))?;
    let local: std::net::SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| Error::runtime("bad address"))?
    } else {
        "[::]:0"
            .parse()
            .map_err(|_| Error::runtime("bad address"))?
    };
    let endpoint = quinn::Endpoint::client(local)
        .map_err(|e| Error::runtime(format!("cannot open a UDP socket: {e}")))?;
    let server_name = cli.server_name.clone().unwrap_or_else(|| host.to_string());
    let connecting = endpoint
        .connect_with(config, remote, &server_name)
        .map_err(|e| {
            Error::input(format!(
                "cannot connect to {remote} as \"{server_name}\": {e}"
            ))
        })?;
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            if let Some(refused) = certificate_refused(&e) {
                return Err(Error::input(format!("the receiver refused: {refused}")));
            }
            let seen = tls
                .verification
                .lock()
                .ok()
                .and_then(|mut v| v.error.take());
            let why = seen.map_or_else(|| e.to_string(), |verify| verify.to_string());
            return Err(Error::runtime(format!(
                "cannot connect to the receiver's viewer endpoint {remote}: {why} (check \
                 --receiver, --ca/--fingerprint, and that the receiver runs with --viewer-listen)"
            )));
        }
        Err(_) => {
            return Err(Error::runtime(format!(
                "no answer from the receiver's viewer endpoint {remote} within {}s (check \
                 --receiver, and that the receiver runs with --viewer-listen)",
                timeout.as_secs()
            )))
        }
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| lost(&conn, format!("cannot open a stream to {remote}: {e}")))?;
    let user = std::env::var("USER").unwrap_or_else(|_| "someone".into());
    let hello = Message::ViewerHello(ViewerHello {
        version: protocol::PROTOCOL_VERSION,
        user: format!("{user}@{}", gethostname::gethostname().to_string_lossy()),
        token,
    });
    send.write_all(&hello.to_bytes())
        .await
        .map_err(|e| lost(&conn, format!("receiver {remote}: {e}")))?;
    let mut buf = BytesMut::new();
    match reply(&conn, &mut recv, &mut buf).await? {
        Message::SensorList(list) => Ok((conn, list, (send, recv, buf))),
        other => Err(unexpected(other)),
    }
}

/// The receiver's next message; its refusal as an error.
async fn reply(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<Message> {
    let remote = conn.remote_address();
    match program::frames::read_message(recv, buf).await {
        Ok(Some(Message::Error(e))) => {
            let text = program::names::clean(&e.message);
            Err(
                if e.code == ErrorCode::CAPTURE_REFUSED || e.code == ErrorCode::UNAUTHENTICATED {
                    Error::input(format!("the receiver refused: {text}"))
                } else {
                    Error::runtime(format!("the receiver refused: {text}"))
                },
            )
        }
        Ok(Some(message)) => Ok(message),
        Ok(None) => Err(Error::runtime(format!(
            "receiver {remote} ended the stream"
        ))),
        Err(why) => Err(lost(conn, format!("receiver {remote}: {why}"))),
    }
}

/// The connection broke: the receiver's refusal of this viewer's certificate when that is
/// why (it may come at any step, as the handshake completes on this side first), else `what`.
fn lost(conn: &quinn::Connection, what: String) -> Error {
    match conn.close_reason().as_ref().and_then(certificate_refused) {
        Some(refused) => Error::input(format!("the receiver refused: {refused}")),
        None => Error::runtime(what),
    }
}

/// What it means when the receiver closed the connection with a TLS alert about this
/// viewer's client certificate (QUIC carries alert N as error 0x100 + N).
fn certificate_refused(e: &quinn::ConnectionError) -> Option<&'static str> {
    let quinn::ConnectionError::ConnectionClosed(close) = e else {
        return None;
    };
    let code = u64::from(close.error_code);
    (0x100..0x200).contains(&code).then_some(match code & 0xff {
        48 => "this viewer's certificate (--cert) was not issued by the receiver's --viewer-ca",
        45 => "this viewer's certificate (--cert) is expired or not yet valid",
        _ => "this viewer's certificate (--cert) was not accepted",
    })
}

fn unexpected(message: Message) -> Error {
    Error::runtime(format!(
        "the receiver sent an unexpected {:?} message",
        message.message_type()
    ))
}

/// `SENSOR/IFACE`, from `capstream:SENSOR/IFACE` or as given.
fn target(name: &str) -> Result<CaptureTarget> {
    let name = name.strip_prefix(PREFIX).unwrap_or(name);
    let (sensor, interface) = name.rsplit_once('/').ok_or_else(|| {
        Error::input(format!(
            "interface \"{name}\" is not SENSOR/IFACE (see --extcap-interfaces)"
        ))
    })?;
    Ok(CaptureTarget {
        sensor: sensor.to_string(),
        interface: interface.to_string(),
    })
}

async fn capture(cli: &Cli) -> Result<()> {
    let (Some(interface), Some(fifo)) = (&cli.extcap_interface, &cli.fifo) else {
        return Err(Error::input(
            "--capture needs --extcap-interface and --fifo",
        ));
    };
    let mut targets = vec![target(interface)?];
    for also in &cli.also {
        targets.push(target(also)?);
    }
    let (conn, _list, (mut send, mut recv, mut buf)) = connect(cli, CONNECT_TIMEOUT).await?;
    let request = Message::CaptureRequest(CaptureRequest {
        targets,
        filter: cli.extcap_capture_filter.trim().to_string(),
        snaplen: cli.snaplen,
        limits: CaptureLimits {
            duration_ms: cli
                .limit_duration
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            packets: cli.limit_packets,
            bytes: 0,
        },
        requested_by: String::new(),
    });
    send.write_all(&request.to_bytes())
        .await
        .map_err(|e| Error::runtime(format!("cannot ask the receiver: {e}")))?;
    match reply(&conn, &mut recv, &mut buf).await? {
        Message::CaptureStarted(_) => {}
        other => return Err(unexpected(other)),
    }
    // The fifo is written from a thread of its own: opening a fifo blocks until Wireshark
    // reads it, and each write until it has room.
    let path = fifo.clone();
    let (chunks, to_write) = std::sync::mpsc::sync_channel::<bytes::Bytes>(64);
    let writer = tokio::task::spawn_blocking(move || write_fifo(&path, &to_write));
    let mut signals = program::cli::Signals::new()
        .map_err(|e| Error::runtime(format!("cannot catch signals: {e}")))?;
    // The rest of the stream is pcapng; what came with the last message first.
    let copied = async {
        let mut chunk = buf.split().freeze();
        loop {
            if !chunk.is_empty() {
                let send = chunks.clone();
                let handed = tokio::task::spawn_blocking(move || send.send(chunk).is_ok()).await;
                if !matches!(handed, Ok(true)) {
                    return;
                }
            }
            chunk = match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(next)) => next.bytes,
                Ok(None) | Err(_) => return,
            };
        }
    };
    tokio::select! {
        () = copied => {}
        () = signals.next() => {}
    }
    drop(chunks);
    conn.close(0u32.into(), b"viewer stopped");
    // A fifo nobody opened holds the writer for ever: it is not waited for long.
    match tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .unwrap_or(Ok(Ok(())))
    {
        Ok(Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(Error::input(format!(
                "cannot write --fifo {}: {e}",
                fifo.display()
            )))
        }
        _ => {}
    }
    // Gives the close a moment to reach the receiver, which stops the sensors' captures.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// Writes every chunk to the fifo (or file) at `path` until there are no more; a reader
/// that went away (Wireshark stopped) ends it with BrokenPipe.
fn write_fifo(
    path: &std::path::Path,
    chunks: &std::sync::mpsc::Receiver<bytes::Bytes>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    while let Ok(chunk) = chunks.recv() {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}

/// Why libpcap refuses `filter` on Ethernet, if it does (the sensor checks it again on its
/// interface).
fn invalid_filter(filter: &str) -> Option<String> {
    if filter.trim().is_empty() {
        return None;
    }
    match pcap::Capture::dead(pcap::Linktype::ETHERNET) {
        Ok(capture) => capture.compile(filter, true).err().map(|e| e.to_string()),
        Err(_) => None,
    }
}

/// The options of Wireshark's dialog for a capstream interface.
fn print_config() {
    let args = [
        "{call=--receiver}{display=Receiver viewer endpoint}{type=string}{tooltip=HOST:PORT of the receiver's --viewer-listen}{group=Receiver}",
        "{call=--ca}{display=Receiver certificate or CA}{type=fileselect}{mustexist=true}{tooltip=PEM file: the receiver's receiver.crt or its CA}{group=Receiver}",
        "{call=--fingerprint}{display=Receiver certificate SHA-256}{type=string}{tooltip=instead of a CA file: the fingerprint the receiver prints}{group=Receiver}",
        "{call=--token-file}{display=Viewer token file}{type=fileselect}{mustexist=true}{tooltip=the receiver's viewer-token (not a sensor token)}{group=Receiver}",
        "{call=--also}{display=Also capture on}{type=string}{tooltip=more SENSOR/IFACE, comma-separated: one capture, merged in time order}{group=Capture}",
        "{call=--limit-packets}{display=Stop after packets}{type=unsigned}{default=0}{tooltip=per sensor interface; 0: no limit}{group=Capture}",
        "{call=--limit-duration}{display=Stop after (e.g. 10m)}{type=string}{tooltip=default: the sensor's cap}{group=Capture}",
    ];
    for (number, arg) in args.iter().enumerate() {
        println!("arg {{number={number}}}{arg}");
    }
}
