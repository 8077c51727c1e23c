//! Capstream receiver: accepts sensors over QUIC + TLS 1.3 and merges their packets, in
//! timestamp order, into one pcap or pcapng capture.
//!
//! Data flows one way: connection tasks (decode, check) → bounded queue → the writer task
//! (merge → sink).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
mod auth;
mod certs;
mod connection;
mod merge;
mod quota;
mod server;
mod stats;
mod tls;
mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_auth;

use receiver::cli::{self, Cli, Command};
use receiver::sink;

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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return common::cli::usage_error("receiver", e),
    };
    if let Some(Command::Certs(command)) = &cli.command {
        return exit_code(certs::run(command));
    }
    common::cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("receiver: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    exit_code(runtime.block_on(run(cli)))
}

/// 0, or the one-line error with 2 for bad input and 1 for a failed run.
fn exit_code(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("receiver: error: {e:#}");
            ExitCode::from(if e.is::<BadInput>() { 2 } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    check_out_dir(&cli.out).map_err(BadInput)?;
    // What sensors must prove, read first: a bad file stops the start before anything else.
    let client_roots = match &cli.client_ca {
        Some(path) => Some(tls::client_roots(path).map_err(BadInput)?),
        None => None,
    };
    let token = match &cli.token_file {
        Some(path) => {
            let (token, warning) =
                common::cli::read_token_file(path).map_err(|e| BadInput(anyhow!(e)))?;
            if let Some(warning) = warning {
                tracing::warn!("{warning}");
            }
            Some(token)
        }
        None => None,
    };
    let identity = match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => tls::load(cert, key),
        _ => tls::load_or_create(&state_dir(&cli)?, &cli.cert_name),
    }
    .map_err(BadInput)?;
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
    let endpoint = listen(cli.listen, server_config, reset_key).map_err(|e| {
        BadInput(anyhow!(
            "cannot listen on UDP {}: {e} (is another receiver running there?)",
            cli.listen
        ))
    })?;
    // Opened only once listening works, so a refused start leaves no empty file behind.
    let sink = sink::open(&cli.out, cli.format())
        .map_err(|e| BadInput(anyhow!("cannot create {}: {e}", cli.out.display())))?;
    let bound = endpoint.local_addr().unwrap_or(cli.listen);
    tracing::info!(
        "listening on {bound}, writing {} as {}",
        cli.out.display(),
        cli.format().name()
    );
    tracing::info!(
        "certificate {} SHA-256 fingerprint {}",
        identity.cert_path.display(),
        identity.fingerprint()
    );
    match (&cli.client_ca, auth.requires_token()) {
        (Some(ca), true) => tracing::info!(
            "sensors need a client certificate from {} and the token",
            ca.display()
        ),
        (Some(ca), false) => {
            tracing::info!("sensors need a client certificate from {}", ca.display())
        }
        (None, true) => tracing::info!("sensors need the token"),
        (None, false) => {}
    }

    let to_file = cli.out.as_os_str() != "-";
    let summaries = server::run(
        endpoint,
        sink,
        cli.reorder_window,
        to_file,
        auth,
        quota::Quotas {
            rate: cli.sensor_rate,
            held: cli.sensor_held,
        },
        shutdown_signal(),
    )
    .await?;
    tracing::info!("closed {}", cli.out.display());
    eprintln!("receiver: {} sensor session(s)", summaries.len());
    for s in &summaries {
        eprintln!("  {}", s.line());
    }
    Ok(())
}

fn listen(
    addr: std::net::SocketAddr,
    config: quinn::ServerConfig,
    reset_key: ring::hmac::Key,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    let mut endpoint_config = quinn::EndpointConfig::new(std::sync::Arc::new(reset_key));
    // Plain random connection ids: quinn's default ones carry a check keyed per process,
    // which makes a restarted receiver ignore, rather than reset, its predecessor's.
    endpoint_config.cid_generator(|| Box::new(RandomCids));
    quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime)
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

/// The first SIGINT or SIGTERM (Ctrl-C elsewhere).
async fn shutdown_signal() {
    match common::cli::Signals::new() {
        Ok(mut signals) => signals.next().await,
        Err(e) => {
            // The default action of the signals still ends the process, unflushed.
            tracing::warn!("cannot catch signals: {e}");
            std::future::pending().await
        }
    }
}
