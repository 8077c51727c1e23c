//! Capstream receiver: accepts sensors over QUIC + TLS 1.3 and merges their packets, in
//! timestamp order, into one pcap or pcapng capture.
//!
//! Data flows one way: connection tasks (decode, check) → bounded queue → the writer task
//! (merge → sink).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use program::exit::{self, Failure};
mod auth;
mod certs;
mod connection;
mod merge;
mod query;
mod quota;
mod server;
mod stats;
mod telemetry;
mod tls;
mod upload;
mod viewer;
mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_auth;
#[cfg(test)]
mod tests_sessions;

use receiver::cli::{self, Cli, Command};
use receiver::sink;
use sink::files::naming::Pattern;
use sink::files::{FileConfig, Files, InUse, Keep, OnFinished, Rotation};
use sink::{Sink, Tee};

/// The name that starts the program's error line.
const PROGRAM: &str = "receiver";

/// How long the series of a sensor session that ended stay on the metrics endpoint.
const METRICS_LINGER: std::time::Duration = std::time::Duration::from_secs(300);

/// A failure of what the user asked for (exit 2) rather than of the run (exit 1).
#[derive(Debug)]
struct BadInput(anyhow::Error);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for BadInput {}

fn main() -> ExitCode {
    let cli = match program::cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Some(Command::Certs(command)) = &cli.command {
        return exit_code(certs::run(command));
    }
    program::cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return exit::fail(
                PROGRAM,
                Failure::RunFailed,
                format_args!("cannot start the async runtime: {e}"),
            )
        }
    };
    if let Some(Command::Query(args)) = &cli.command {
        return exit_code(runtime.block_on(query::run(args)));
    }
    exit_code(runtime.block_on(run(cli)))
}

/// 0, or the one-line error (with its causes) with 2 for bad input and 1 for a failed run.
fn exit_code(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<BadInput>() => {
            exit::fail(PROGRAM, Failure::BadInput, format_args!("{e:#}"))
        }
        Err(e) => exit::fail(PROGRAM, Failure::RunFailed, format_args!("{e:#}")),
    }
}

async fn run(cli: Cli) -> Result<()> {
    cli.check_outputs().map_err(|e| BadInput(anyhow!(e)))?;
    cli.check_exposure().map_err(|e| BadInput(anyhow!(e)))?;
    cli.check_kafka_exposure()
        .map_err(|e| BadInput(anyhow!(e)))?;
    // The lake must answer (a bucket, a directory), said before anything is created.
    let lake = match &cli.lake {
        Some(url) => Some(lake_config(&cli, url).await.map_err(BadInput)?),
        None => None,
    };
    // Its file is opened now, so that one that cannot be written is said at once.
    let summary_file = match &cli.summary_json {
        Some(path) => Some(program::private_file::Pending::create(path).map_err(|e| {
            BadInput(anyhow!(
                "cannot write --summary-json {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };
    #[cfg(unix)]
    raise_open_file_limit();
    let pattern = match cli.out_file() {
        Some(out) => {
            let pattern = Pattern::parse(out, cli.split_by).map_err(|e| BadInput(anyhow!(e)))?;
            check_out_dir(out).map_err(BadInput)?;
            Some(pattern)
        }
        None => None,
    };
    // The Kafka output's settings, and whether its broker has the topic (one that does not
    // answer yet is tried again in the background): said before anything is created.
    let kafka = match kafka_config(&cli).map_err(BadInput)? {
        Some(config) => Some(
            sink::kafka::reach(config)
                .await
                .map_err(|e| BadInput(anyhow!(e)))?,
        ),
        None => None,
    };
    // What sensors must prove, read first: a bad file stops the start before anything else.
    let client_roots = match &cli.client_ca {
        Some(path) => Some(tls::client_roots(path).map_err(BadInput)?),
        None => None,
    };
    // The certificate given, checked before anything is created.
    let given_identity = match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => Some(tls::load(cert, key).map_err(BadInput)?),
        _ => None,
    };
    // The token: the one given, else by default the one generated in the state directory;
    // none with a client CA (the certificate is the proof) or when asked for none.
    // (Made before the certificate, so that a generated certificate means a token is there;
    // said only once the start cannot be refused any more, so a refusal stays one line.)
    let (token_path, token_created) =
        match (&cli.token_file, &cli.client_ca, cli.allow_unauthenticated) {
            (Some(path), _, _) => (Some(path.clone()), false),
            (None, None, false) => {
                let path = state_dir(&cli)?.join("token");
                let created = receiver::token::load_or_create(&path).map_err(BadInput)?;
                (Some(path), created)
            }
            _ => (None, false),
        };
    let token = match &token_path {
        Some(path) => {
            let (token, warning) =
                program::cli::read_token_file(path).map_err(|e| BadInput(anyhow!(e)))?;
            if let Some(warning) = warning {
                tracing::warn!("{warning}");
            }
            if let Some(why) = auth::weak_token(&token) {
                tracing::warn!(
                    "the token in {} looks guessable ({why}): make one with \
                     `head -c 32 /dev/urandom | base64`",
                    path.display()
                );
            }
            Some(token)
        }
        None => None,
    };
    // The viewer token the live stream's TLS clients and the viewer role's clients must
    // send, read before anything is created that a refusal would leave behind.
    let viewer = match cli.serve_pcap_tls || cli.viewer_listen.is_some() {
        true => Some(std::sync::Arc::new(viewer_token(&cli, token.as_ref())?)),
        false => None,
    };
    let identity = match given_identity {
        Some(identity) => identity,
        None => tls::load_or_create(&state_dir(&cli)?, &cli.cert_name).map_err(BadInput)?,
    };
    // The live stream's TLS, with the viewer token read above.
    let secure = match (&viewer, cli.serve_pcap_tls) {
        (Some(viewer), true) => Some(sink::live::Secure {
            tls: tls::stream_config(&identity).map_err(BadInput)?,
            viewer: std::sync::Arc::clone(viewer),
        }),
        _ => None,
    };
    let auth = auth::Auth::new(token, client_roots.is_some());
    let server_config = tls::server_config(&identity, client_roots).map_err(BadInput)?;
    let reset_key = match state_dir(&cli).and_then(|dir| tls::reset_key(&dir)) {
        Ok(key) => key,
        Err(e) => {
            tracing::warn!(
                "{e:#}: sensors will notice a restart of this receiver only after their idle \
                 timeout"
            );
            let secret: [u8; 32] = rand::random();
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)
        }
    };
    let uploader = match &cli.upload {
        Some(url) => Some(
            start_uploader(url, cli.out_file(), cli.upload_allow_http)
                .await
                .map_err(BadInput)?,
        ),
        None => None,
    };
    let endpoint = listen(cli.listen, server_config, reset_key).map_err(|e| {
        BadInput(anyhow!(
            "cannot listen on UDP {}: {e} (is another receiver running there?)",
            cli.listen
        ))
    })?;
    if let Some(addr) = cli.metrics {
        program::metrics::serve(addr, METRICS_LINGER).map_err(|e| BadInput(anyhow!(e)))?;
    }
    // Bound before the outputs are opened, as the sensors' endpoint is.
    let viewers = match (cli.viewer_listen, &viewer) {
        (Some(addr), Some(viewer_token)) => {
            Some(viewer_endpoint(&cli, addr, &identity, viewer_token).map_err(BadInput)?)
        }
        _ => None,
    };
    // Opened only once listening works, so a refused start leaves no empty file behind.
    let Outputs {
        sink,
        live,
        kafka,
        lake,
    } = open_outputs(
        &cli,
        pattern,
        uploader.as_ref(),
        secure.clone(),
        kafka,
        lake,
    )
    .await?;
    let bound = endpoint.local_addr().unwrap_or(cli.listen);
    if let (Some(path), true) = (&token_path, token_created) {
        tracing::info!("created the token sensors must send, {}", path.display());
    }
    let mut outputs = Vec::new();
    if let Some(out) = cli.out_path() {
        outputs.push(format!(
            "writing {} as {}",
            out.display(),
            cli.format().name()
        ));
    }
    if let Some(addr) = live.as_ref().and_then(|l| l.addr) {
        let how = match &secure {
            Some(_) => " over TLS",
            None => "",
        };
        outputs.push(format!("serving live pcap on TCP {addr}{how}"));
    }
    if let Some(target) = &cli.push_pcap {
        outputs.push(format!("pushing live pcap to TCP {target}"));
    }
    if let Some(kafka) = &kafka {
        outputs.push(format!(
            "producing to Kafka topic {} on {}",
            kafka.topic, kafka.brokers
        ));
    }
    if let Some(url) = &cli.lake {
        outputs.push(format!("writing the lake {url}"));
    }
    tracing::info!("listening on {bound}, {}", outputs.join(", "));
    tracing::info!(
        "certificate {} SHA-256 fingerprint {}",
        identity.cert_path.display(),
        identity.fingerprint()
    );
    match (&cli.client_ca, &token_path) {
        (Some(ca), Some(token)) => tracing::info!(
            "sensors need a client certificate from {} and the token in {}",
            ca.display(),
            token.display()
        ),
        (Some(ca), None) => {
            tracing::info!("sensors need a client certificate from {}", ca.display())
        }
        (None, Some(token)) => tracing::info!("sensors need the token in {}", token.display()),
        (None, None) => tracing::warn!(
            "--allow-unauthenticated: any host that reaches UDP {bound} can write packets into \
             the output under any sensor name; require a token (the default) or client \
             certificates (--client-ca) instead"
        ),
    }
    for line in sensor_commands(&cli, bound, &identity.fingerprint(), token_path.as_deref()) {
        tracing::info!("{line}");
    }
    if let Some(viewer) = &viewer {
        if let Some(warning) = &viewer.warning {
            tracing::warn!("{warning}");
        }
        if viewer.created {
            tracing::info!(
                "created the viewer token viewers and live-stream clients must send, {}",
                viewer.path.display()
            );
        }
    }
    if let (Some(secure), Some(addr)) = (&secure, live.as_ref().and_then(|l| l.addr)) {
        let viewer = &secure.viewer;
        tracing::info!(
            "live-stream clients send the viewer token in {} as their first line, e.g. socat \
             OPENSSL:{}:{},cafile={} -,ignoreeof < {} | tshark -r -",
            viewer.path.display(),
            display_host(addr.ip()),
            addr.port(),
            identity.cert_path.display(),
            viewer.path.display()
        );
    }
    if let (Some(target), true) = (&cli.push_pcap, cli.push_pcap_allow_remote) {
        tracing::warn!("--push-pcap-allow-remote: every captured packet goes to {target} in clear");
    }
    if let (Some(addr), true) = (cli.serve_pcap, cli.serve_pcap_allow_remote) {
        if !addr.ip().is_loopback() {
            tracing::warn!(
                "--serve-pcap-allow-remote: whoever reaches TCP {addr} reads every captured \
                 packet, in clear and without authentication"
            );
        }
    }

    let sensors = std::sync::Arc::new(viewer::Sensors::default());
    if let Some((viewer_endpoint, viewer_auth)) = viewers {
        tokio::spawn(viewer::serve(
            viewer_endpoint,
            std::sync::Arc::clone(&sensors),
            std::sync::Arc::new(viewer_auth),
            cli.reorder_window,
        ));
    }

    // A full disk and a broker outage are waited out; a broken pipe is not.
    let retry_output = cli.out_file().is_some() || kafka.is_some() || cli.lake.is_some();
    program::status::enable(!cli.no_status);
    let summaries = server::run(
        endpoint,
        writer::Writer::new(sink, cli.reorder_window, retry_output)
            .with_secrets(secrets_policy(&cli)),
        server::Admission {
            auth: std::sync::Arc::new(auth),
            quotas: quota::Quotas {
                rate: cli.sensor_rate,
                held: cli.sensor_held,
            },
            sensors,
            key_log_grace: cli.reorder_window,
        },
        shutdown_signal(),
    )
    .await;
    program::status::clear();
    let live_summary = match live {
        Some(live) => Some(live.close().await),
        None => None,
    };
    if let Ok(summaries) = &summaries {
        eprintln!("receiver: {} sensor session(s)", summaries.len());
        for s in summaries {
            eprintln!("  {}", s.line());
        }
    }
    if let Some(live) = &live_summary {
        eprintln!("receiver: {}", live.line());
    }
    if let Some(keys) = receiver::sink::secrets::COUNTERS.line() {
        eprintln!("receiver: {keys}");
    }
    let split_overflow =
        receiver::sink::files::SPLIT_OVERFLOW.load(std::sync::atomic::Ordering::Relaxed);
    if split_overflow > 0 {
        eprintln!(
            "receiver: --split-by: {split_overflow} packets went to the shared file, {} files \
             of their own being open",
            receiver::sink::files::MAX_OPEN_FILES
        );
    }
    let kafka_summary = match kafka {
        Some(kafka) => Some(kafka.close().await),
        None => None,
    };
    if let Some(kafka) = &kafka_summary {
        eprintln!("receiver: {}", kafka.line());
    }
    // Segments closed at the end are published, or left staged for the next run.
    let lake_summary = match lake {
        Some(lake) => Some(lake.close(cli.upload_timeout, shutdown_signal()).await),
        None => None,
    };
    if let Some(lake) = &lake_summary {
        eprintln!("receiver: {}", lake.line());
    }
    // Files completed before a failure are still uploaded, or named as not uploaded.
    let upload_report = match uploader {
        Some(uploader) => Some(uploader.finish(cli.upload_timeout, shutdown_signal()).await),
        None => None,
    };
    if let Some(report) = &upload_report {
        eprintln!("receiver: {}", report.line());
    }
    let summary_written = match (summary_file, &cli.summary_json) {
        (Some(file), Some(path)) => {
            let json = stats::summary_json(
                summaries.as_deref().ok(),
                live_summary.as_ref(),
                kafka_summary.as_ref(),
                upload_report.as_ref(),
                &receiver::sink::secrets::COUNTERS,
                split_overflow,
            );
            file.commit(format!("{json:#}\n").as_bytes())
                .with_context(|| format!("cannot write the summary to {}", path.display()))
        }
        _ => Ok(()),
    };
    summaries?;
    upload_report.map_or(Ok(()), |report| report.result())?;
    summary_written
}

/// What becomes of the TLS keys sensors send: only a pcapng file or stdout, and the lake's
/// segments, hold them.
fn secrets_policy(cli: &Cli) -> writer::Secrets {
    match (cli.drop_secrets, cli.out_path(), cli.format()) {
        (true, _, _) => writer::Secrets::Drop,
        // Beside a classic pcap too: the segments keep what the file cannot.
        (false, Some(_), receiver::sink::Format::Pcap) if cli.lake.is_some() => {
            writer::Secrets::WriteSome(
                "they go to the lake only: the --out file is classic pcap, which cannot hold \
                 them (write pcapng: --format pcapng or an --out ending in .pcapng)",
            )
        }
        (false, _, _) if cli.lake.is_some() => writer::Secrets::Write,
        (false, Some(_), receiver::sink::Format::Pcapng) => writer::Secrets::Write,
        (false, Some(_), _) => writer::Secrets::CannotHold(
            "classic pcap cannot hold keys (write pcapng: --format pcapng or an --out ending \
             in .pcapng)",
        ),
        (false, None, _) => writer::Secrets::CannotHold(
            "only a pcapng file or pipe or the lake holds keys, and this receiver writes none \
             (the live stream is classic pcap; Kafka messages carry none)",
        ),
    }
}

/// The outputs the writer feeds, and the handles main ends them with.
struct Outputs {
    sink: Box<dyn Sink>,
    live: Option<sink::live::Live>,
    kafka: Option<sink::kafka::Kafka>,
    lake: Option<sink::lake::LakeHandle>,
}

/// The outputs asked for, as the one sink the writer feeds: the live stream first, so that
/// it is fed even while a file's flush fails, then the file or stdout, then Kafka (whose
/// flush fails while the broker does not answer).
async fn open_outputs(
    cli: &Cli,
    pattern: Option<Pattern>,
    uploader: Option<&upload::Uploader>,
    secure: Option<sink::live::Secure>,
    kafka: Option<sink::kafka::Reached>,
    lake: Option<sink::lake::LakeConfig>,
) -> Result<Outputs> {
    let mut outputs: Vec<Box<dyn Sink>> = Vec::new();
    let lake = match lake {
        Some(config) => {
            let staging = config.staging.clone();
            let (sink, handle) = sink::lake::LakeSink::open(config).map_err(|e| {
                BadInput(anyhow!(
                    "cannot use the lake staging directory {}: {e}",
                    staging.display()
                ))
            })?;
            outputs.push(Box::new(sink));
            Some(handle)
        }
        None => None,
    };
    let mut live = None;
    if cli.is_live() {
        let stream = sink::live::Stream {
            listen: cli.serve_pcap,
            secure,
            push: cli.push_pcap.clone(),
            precision: cli.serve_pcap_precision,
        };
        let (sink, handle) = sink::live::serve(stream).await.map_err(|e| {
            let addr = cli.serve_pcap.map(|a| a.to_string()).unwrap_or_default();
            BadInput(anyhow!(
                "cannot listen on TCP {addr} for --serve-pcap: {e} (is something else \
                 listening there?)"
            ))
        })?;
        let mut sink = sink.with_link_type(cli.link_type);
        // Beside a file or Kafka, which take every link type, the stream skips (and
        // counts) the interfaces of another one rather than refuse their sensors.
        if cli.out_path().is_some() || kafka.is_some() {
            sink = sink.beside_a_file();
        }
        outputs.push(Box::new(sink));
        live = Some(handle);
    }
    match (cli.out_path(), pattern) {
        (Some(out), Some(pattern)) => {
            let config = FileConfig {
                pattern,
                format: cli.format(),
                split_by: cli.split_by,
                rotation: Rotation {
                    size: cli.rotate_size,
                    every: cli.rotate_time,
                },
                keep: Keep {
                    files: cli.keep.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                    bytes: cli.keep_bytes,
                },
                // Where finished files go next (the uploader), when asked for.
                on_finished: uploader.map(|u| {
                    let submitter = u.submitter();
                    Box::new(move |path| submitter.submit(path)) as OnFinished
                }),
                // --keep deletes a file only once it is uploaded.
                in_use: uploader.map(|u| {
                    let submitter = u.submitter();
                    Box::new(move |path: &std::path::Path| submitter.is_pending(path)) as InUse
                }),
            };
            let files = Files::open(config)
                .map_err(|e| BadInput(anyhow!("cannot create {}: {e}", out.display())))?;
            outputs.push(Box::new(files));
        }
        (Some(out), None) => outputs.push(
            sink::stream(out, cli.format())
                .map_err(|e| BadInput(anyhow!("cannot write {}: {e}", out.display())))?,
        ),
        (None, _) => {}
    }
    let kafka = kafka.map(|reached| {
        let (sink, handle) = sink::kafka::start(reached);
        outputs.push(Box::new(sink));
        handle
    });
    // A classic pcap file or stdout holds the link type given, else the first sensor's.
    let required = cli
        .link_type
        .filter(|_| cli.out_path().is_some() && cli.format() == sink::Format::Pcap);
    let sink: Box<dyn Sink> = match (outputs.len(), required) {
        (1, None) => outputs.remove(0),
        (_, None) => Box::new(Tee::new(outputs)),
        (_, Some(link_type)) => Box::new(Tee::new(outputs).requiring_link_type(link_type)),
    };
    Ok(Outputs {
        sink,
        live,
        kafka,
        lake,
    })
}

/// What --lake and its options ask for; the lake must answer now.
async fn lake_config(cli: &Cli, url: &str) -> Result<sink::lake::LakeConfig> {
    let lake = query::open(url, cli.lake_allow_http).await?;
    let receiver = match &cli.receiver_name {
        Some(name) => name.clone(),
        None => tls::hostname()
            .context("--lake: no host name to name this receiver by: pass --receiver-name")?,
    };
    let staging = match &cli.lake_staging {
        Some(dir) => dir.clone(),
        None => state_dir(cli)?.join("lake-staging"),
    };
    Ok(sink::lake::LakeConfig {
        lake,
        receiver: sink::files::naming::sanitize(&receiver),
        staging,
        segment_size: cli.segment_size,
        segment_time: cli.segment_time,
        keep: cli.lake_keep,
    })
}

/// What --kafka and its options ask for: TLS and SASL read and checked now.
fn kafka_config(cli: &Cli) -> Result<Option<sink::kafka::KafkaConfig>> {
    let Some(topic) = cli.kafka_topic.clone().filter(|_| !cli.kafka.is_empty()) else {
        return Ok(None);
    };
    let client = cli.kafka_cert.as_deref().zip(cli.kafka_key.as_deref());
    let tls = if cli.kafka_tls || cli.kafka_ca.is_some() || client.is_some() {
        Some(tls::kafka_client_config(cli.kafka_ca.as_deref(), client)?)
    } else {
        None
    };
    let sasl = match (cli.kafka_sasl, &cli.kafka_user, &cli.kafka_password_file) {
        (Some(mechanism), Some(user), Some(file)) => {
            use rskafka::client::{Credentials, SaslConfig};
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read --kafka-password-file {}", file.display()))?;
            if let Some(warning) = program::cli::readable_by_others(file, "--kafka-password-file") {
                tracing::warn!("{warning}");
            }
            let password = text.lines().next().unwrap_or_default().to_string();
            if password.is_empty() {
                return Err(anyhow!(
                    "--kafka-password-file {} holds no password on its first line",
                    file.display()
                ));
            }
            let credentials = Credentials::new(user.clone(), password);
            Some(match mechanism {
                cli::KafkaSasl::Plain => SaslConfig::Plain(credentials),
                cli::KafkaSasl::ScramSha256 => SaslConfig::ScramSha256(credentials),
                cli::KafkaSasl::ScramSha512 => SaslConfig::ScramSha512(credentials),
            })
        }
        _ => None,
    };
    Ok(Some(sink::kafka::KafkaConfig {
        brokers: cli.kafka.clone(),
        topic,
        compression: cli.kafka_compression,
        tls,
        sasl,
    }))
}

async fn start_uploader(
    url: &str,
    out: Option<&std::path::Path>,
    allow_http: bool,
) -> Result<upload::Uploader> {
    if out.is_none() {
        return Err(anyhow!(
            "--upload needs --out FILE: only files can be uploaded, not a stream (stdout, a \
             device, a pipe) or the live stream"
        ));
    }
    upload::Uploader::start(url, allow_http).await
}

fn listen(
    addr: std::net::SocketAddr,
    config: quinn::ServerConfig,
    reset_key: ring::hmac::Key,
) -> std::io::Result<quinn::Endpoint> {
    let socket = udp_socket(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    let mut endpoint_config = quinn::EndpointConfig::new(std::sync::Arc::new(reset_key));
    // Plain random connection ids: quinn's default ones carry a check keyed per process,
    // which makes a restarted receiver ignore, rather than reset, its predecessor's.
    endpoint_config.cid_generator(|| Box::new(RandomCids));
    quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime)
}

/// What the UDP receive buffer is asked to hold: bursts from many sensors arrive faster
/// than one thread takes them in, and a datagram the kernel drops costs a retransmission
/// and halves that sensor's sending rate.
const UDP_RECEIVE_BUFFER: usize = 8 << 20;

fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As std binds it: `[::]` takes IPv4 too where the system allows.
        let _ = socket.set_only_v6(false);
    }
    // The kernel caps the size at net.core.rmem_max; a smaller buffer still works.
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER) {
        tracing::debug!("cannot set the UDP receive buffer: {e}");
    }
    // Linux reports twice what it grants (the bookkeeping share).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < UDP_RECEIVE_BUFFER / 4 {
        tracing::info!(
            "the UDP receive buffer is {} KiB; with many sensors or fast ones, raise \
             net.core.rmem_max to {} (sysctl) so that bursts are not dropped",
            granted / 1024,
            UDP_RECEIVE_BUFFER
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Connection ids of 8 random bytes.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The viewer token (`--viewer-token-file`, else the state directory's), which must not be
/// the sensors' token.
fn viewer_token(
    cli: &Cli,
    sensor_token: Option<&protocol::AuthToken>,
) -> Result<receiver::viewer_token::ViewerToken> {
    let viewer =
        receiver::viewer_token::ViewerToken::load(cli.viewer_token_file.as_deref(), || {
            state_dir(cli)
        })
        .map_err(BadInput)?;
    if sensor_token.is_some_and(|t| viewer.is(t)) {
        return Err(BadInput(anyhow!(
            "the viewer token in {} is the sensors' token: give viewers a token of their own \
             (--viewer-token-file), or a sensor could read every packet",
            viewer.path.display()
        ))
        .into());
    }
    Ok(viewer)
}

/// Where clients reach an address this receiver listens on, as a command line takes it:
/// this host's name for an unspecified address, IPv6 in brackets.
fn display_host(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        ip if ip.is_unspecified() => tls::hostname().unwrap_or_else(|_| "HOST".into()),
        ip @ std::net::IpAddr::V6(_) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}

/// The command lines that start a sensor sending here: from another host (the fingerprint,
/// a copy of the token, a client certificate), and from this one.
fn sensor_commands(
    cli: &Cli,
    bound: std::net::SocketAddr,
    fingerprint: &str,
    token: Option<&std::path::Path>,
) -> Vec<String> {
    let host = display_host(bound.ip());
    let mut proof = String::new();
    if cli.client_ca.is_some() {
        proof += " --cert NAME.crt --key NAME.key";
    }
    let mut remote = format!(
        "sensor --receiver {host}:{} --fingerprint {fingerprint}",
        bound.port()
    );
    if let Some(token) = token {
        remote += &format!(" --token-file <copy of {}, mode 0600>", token.display());
    }
    let mut lines = vec![format!("on another host: {remote}{proof} -i IFACE")];
    // Here, the sensor finds the generated certificate and token in the state directory.
    let generated = cli.cert.is_none() && cli.token_file.is_none();
    if generated && bound.port() == 4433 {
        let state = match &cli.state_dir {
            Some(dir) => format!(" --state-dir {}", dir.display()),
            None => String::new(),
        };
        lines.push(format!(
            "on this host: sensor{state}{proof} -i IFACE (finds the certificate and the token \
             by itself)"
        ));
    }
    lines
}

/// Raises the soft limit on open files to the hard one: every sensor connection, file of a
/// sensor and live or metrics client holds a descriptor, and the usual soft limit (1024) is
/// far below what the system allows.
#[cfg(unix)]
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the rlimit it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the rlimit it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            tracing::debug!(
                "cannot raise the open-file limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The output's directory must exist: said before anything is created or bound.
fn check_out_dir(out: &std::path::Path) -> Result<()> {
    if out.as_os_str() == "-" {
        return Ok(());
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(anyhow!(
            "cannot create {}: directory {} does not exist",
            out.display(),
            dir.display()
        ))
    }
}

fn state_dir(cli: &Cli) -> Result<PathBuf> {
    match &cli.state_dir {
        Some(dir) => Ok(dir.clone()),
        None => dirs::data_dir()
            .map(|d| d.join("capstream"))
            .context("no per-user data directory here: pass --state-dir"),
    }
}

/// The viewer role's endpoint (`--viewer-listen`) and what viewers must prove: the viewer
/// token (checked apart from the sensors' by [`viewer_token`]), or a certificate from
/// `--viewer-ca`.
fn viewer_endpoint(
    cli: &Cli,
    addr: std::net::SocketAddr,
    identity: &tls::Identity,
    viewer_token: &std::sync::Arc<receiver::viewer_token::ViewerToken>,
) -> Result<(quinn::Endpoint, viewer::ViewerAuth)> {
    let roots = match &cli.viewer_ca {
        Some(path) => Some(tls::roots_of(path, "--viewer-ca")?),
        None => None,
    };
    // A sensor's certificate must not open the viewer role.
    if let (Some(viewer_ca), Some(client_ca)) = (&cli.viewer_ca, &cli.client_ca) {
        if std::fs::read(viewer_ca).ok() == std::fs::read(client_ca).ok() {
            return Err(anyhow!(
                "--viewer-ca {} holds the sensors' CA (--client-ca): give viewers a CA of \
                 their own (`receiver certs init --dir viewer-pki`)",
                viewer_ca.display()
            ));
        }
    }
    let path = &viewer_token.path;
    let config = tls::viewer_server_config(identity, roots)?;
    let endpoint = quinn::Endpoint::server(config, addr).map_err(|e| {
        anyhow!("cannot listen on UDP {addr} for --viewer-listen: {e} (is something else there?)")
    })?;
    let bound = endpoint.local_addr().unwrap_or(addr);
    match &cli.viewer_ca {
        Some(ca) => tracing::info!(
            "serving viewers on UDP {bound}: they need the viewer token in {} or a client \
             certificate from {}",
            path.display(),
            ca.display()
        ),
        None => tracing::info!(
            "serving viewers on UDP {bound}: they need the viewer token in {}",
            path.display()
        ),
    }
    tracing::info!(
        "for viewers: CAPSTREAM_EXTCAP_RECEIVER=HOST:{} CAPSTREAM_EXTCAP_FINGERPRINT={} \
         CAPSTREAM_EXTCAP_TOKEN_FILE=<copy of {}, mode 0600> tshark -D",
        bound.port(),
        identity.fingerprint(),
        path.display()
    );
    Ok((
        endpoint,
        viewer::ViewerAuth::new(std::sync::Arc::clone(viewer_token), cli.viewer_ca.is_some()),
    ))
}

/// The first SIGINT or SIGTERM (Ctrl-C elsewhere).
async fn shutdown_signal() {
    match program::cli::Signals::new() {
        Ok(mut signals) => signals.next().await,
        Err(e) => {
            // The default action of the signals still ends the process, unflushed.
            tracing::warn!("cannot catch signals: {e}");
            std::future::pending().await
        }
    }
}
