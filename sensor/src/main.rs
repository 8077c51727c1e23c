//! Capstream sensor: captures frames matching a tcpdump filter and streams them, batched
//! and compressed, over QUIC to a receiver.
//!
//! Data flows one way: capture (one thread per interface) → batcher (in that thread) →
//! bounded channel → delivery (the outbox of unacknowledged batches, reconnects) →
//! transport (one QUIC connection at a time).

use std::process::ExitCode;
use std::sync::Arc;

use program::exit::{self, Failure};
use tokio::sync::{mpsc, Notify};

mod batcher;
mod capture;
mod cli;
mod delivery;
#[cfg(unix)]
mod keylog;
mod on_demand;
mod outbox;
mod privileges;
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod seccomp;
mod spool;
mod stats;
mod telemetry;
mod transport;

use batcher::{Batcher, SessionBatching};
use capture::{Source, Stopper};
use cli::Cli;
use error::{Error, Result};
use outbox::Outbox;
use sensor::{error, tls};
use stats::{Counters, LinkStats};

/// The name that starts the program's error line.
const PROGRAM: &str = "sensor";

/// How long the series of something that ended stay on the metrics endpoint.
const METRICS_LINGER: std::time::Duration = std::time::Duration::from_secs(300);

/// Batches between the capture threads and the delivery loop. The outbox behind it is the
/// real buffer; this smooths the hand-over while the delivery loop waits for a CPU: 16 held
/// 13 ms of 1500-byte frames at 220 kpps, and a busy 2-core host dropped some (bench).
/// At most 64 x 256 KiB (incompressible batches) = 16 MiB.
const CHANNEL_BATCHES: usize = 64;

fn main() -> ExitCode {
    let cli = match program::cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    program::cli::init_logging();
    // Linux keeps capabilities per thread: the captures are attached and privileges given
    // up before the async runtime starts its threads, so that none of them keeps any.
    let prepared = match prepare(&cli) {
        Ok(prepared) => prepared,
        Err(e) => return exit::fail(PROGRAM, e.failure(), e),
    };
    // After the privileges are given up: the endpoint's thread has none.
    if let Some(addr) = cli.metrics {
        if let Err(e) = program::metrics::serve(addr, METRICS_LINGER) {
            return exit::fail(PROGRAM, Failure::BadInput, e);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sensor-io")
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
    exit::finish(
        PROGRAM,
        runtime.block_on(run(cli, prepared)),
        Error::failure,
    )
}

/// What is set up before the async runtime starts.
struct Prepared {
    tls: tls::ClientTls,
    token: Option<protocol::AuthToken>,
    /// The receivers in this sensor's order.
    fleet: delivery::Fleet,
    socket: std::net::UdpSocket,
    backends: Vec<Box<dyn capture::CaptureBackend>>,
    sensor_id: String,
    /// New, or resumed from the spool.
    session: spool::SessionKeys,
    spool: Option<spool::Spool>,
    /// Where `--summary-json` goes at exit.
    summary: Option<program::private_file::Pending>,
    /// The `--keylog` patterns, checked.
    keylog: Vec<String>,
    on_demand: Arc<on_demand::OnDemand>,
}

/// Reads the TLS and token files, resolves the receiver and opens and attaches every
/// capture, all while still privileged (a key may be readable by root only), then gives
/// up the privileges the captures no longer need (see [`privileges`]). Runs while the
/// sensor has one thread.
fn prepare(cli: &Cli) -> Result<Prepared> {
    // Everything the user typed is checked before anything touches the network.
    let keylog = key_log_patterns(&cli.keylog)?;
    let (trust, token) = receiver_credentials(cli)?;
    let client_cert = cli.cert.as_deref().zip(cli.key.as_deref());
    let tls = tls::client_config(&trust, client_cert, protocol::ALPN)?;
    let receivers = transport::resolve(&cli.receivers())?;
    let first = receivers
        .first()
        .ok_or_else(|| Error::input("no receiver address"))?;
    let socket = transport::bind_socket(first.addr)?;
    let local_port = socket
        .local_addr()
        .map_err(|e| Error::runtime(format!("cannot read the UDP socket's port: {e}")))?
        .port();
    let source = match &cli.read {
        Some(path) => Source::File(path.clone()),
        None => Source::Interfaces(cli.iface.clone()),
    };
    let selectors = cli.selectors();
    selectors.check().map_err(Error::input)?;
    let opts = capture::Options {
        snaplen: cli.snaplen,
        filter: cli.filter().map_err(Error::input)?,
        exclude: matches!(source, Source::Interfaces(_)).then(|| capture::OwnFlow {
            receivers: receivers.iter().map(|r| r.addr).collect(),
            local_port,
        }),
        ring_size: cli.ring_size,
        xdp_attach: cli.xdp_attach,
        afxdp: cli.afxdp(),
        attribute: cli.attribute || !selectors.is_empty(),
        selectors,
    };
    let user = privileges::run_as(cli.user.as_ref())?;
    // Before any capture starts, so that a bad --spool-dir is the only thing said.
    let new_spool_dir = match &cli.spool_dir {
        Some(dir) => spool::prepare_dir(dir)
            .map_err(|e| Error::input(e.to_string()))?
            .then_some(dir.as_path()),
        None => None,
    };
    let backends = capture::open(cli.mode, &source, &opts)?;
    let on_demand = Arc::new(on_demand::OnDemand::new(on_demand::Settings {
        allowed: cli.allow_on_demand,
        live: cli.read.is_none(),
        mode: cli.mode,
        template: opts,
        batch_size: cli.batch_size,
        flush_interval: cli.flush_interval,
        max_duration: cli.on_demand_max_duration,
        max_rate: cli.on_demand_max_rate,
        max_captures: cli.on_demand_max_captures,
    }));
    let mut needs: Vec<privileges::Need> = backends
        .iter()
        .flat_map(|b| b.needs_after_attach())
        .collect();
    if cli.allow_on_demand {
        // Opening a capture later takes what opening one now does.
        needs.extend(on_demand::needs(cli.mode));
    }
    privileges::give_up(user.as_ref(), &needs, new_spool_dir)?;
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    if cli.allow_on_demand {
        tracing::warn!(
            "seccomp: no fence (--allow-on-demand: captures are opened while the sensor runs)"
        );
    } else {
        seccomp::restrict(
            &backends
                .iter()
                .flat_map(|b| b.packet_sockets())
                .collect::<Vec<_>>(),
        )?;
    }
    // The spool is written as --user, and its files are that user's.
    let sensor_id = cli
        .sensor_id
        .clone()
        .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());
    // The sensor id orders the receivers: the same id, the same order, on any host.
    let fleet = delivery::Fleet::new(&sensor_id, &receivers)
        .ok_or_else(|| Error::input("no receiver address"))?;
    if fleet.can_fail_over() {
        let order: Vec<String> = fleet.order().iter().map(|t| t.addr.to_string()).collect();
        tracing::info!(
            "receivers in the order of sensor id \"{}\": {}",
            program::names::clean(&sensor_id),
            order.join(", ")
        );
    }
    let fresh = spool::SessionKeys {
        session_id: rand::random(),
        secret: rand::random(),
    };
    let spool = cli
        .spool_dir
        .as_ref()
        .map(|dir| {
            spool::Spool::open(dir, &sensor_id, fresh, cli.spool_size).map_err(|e| match &user {
                Some(user) => Error::input(format!("{e}, as --user {}", user.name)),
                None => Error::input(e.to_string()),
            })
        })
        .transpose()?;
    // Written at exit as --user, into a file opened now: said now if it cannot be.
    let summary = cli
        .summary_json
        .as_deref()
        .map(|path| {
            program::private_file::Pending::create(path).map_err(|e| {
                let as_user = user.as_ref().map(|u| format!(", as --user {}", u.name));
                Error::input(format!(
                    "cannot write --summary-json {}: {e}{}",
                    path.display(),
                    as_user.unwrap_or_default()
                ))
            })
        })
        .transpose()?;
    Ok(Prepared {
        tls,
        token,
        fleet,
        socket,
        backends,
        sensor_id,
        session: spool.as_ref().map_or(fresh, spool::Spool::session),
        spool,
        summary,
        keylog,
        on_demand,
    })
}

#[cfg(unix)]
fn key_log_patterns(patterns: &[String]) -> Result<Vec<String>> {
    keylog::check_patterns(patterns)
}

#[cfg(not(unix))]
fn key_log_patterns(patterns: &[String]) -> Result<Vec<String>> {
    match patterns.first() {
        Some(_) => Err(Error::input("--keylog is for Linux and other Unix systems")),
        None => Ok(Vec::new()),
    }
}

/// How the receiver is trusted and what token the Hello carries: as given, or else those of
/// the receiver on this host, from its state directory, when they can be read.
fn receiver_credentials(cli: &Cli) -> Result<(tls::Trust, Option<protocol::AuthToken>)> {
    let local = cli
        .uses_local_receiver()
        .then(|| cli.state_dir.clone().or_else(cli::default_state_dir))
        .flatten();
    let readable = |name: &str| {
        local
            .as_ref()
            .map(|dir| dir.join(name))
            .filter(|path| std::fs::File::open(path).is_ok())
    };
    let trust = match cli.fingerprint {
        Some(fp) => tls::Trust::Fingerprint(fp),
        None if !cli.ca.is_empty() => tls::Trust::CaFiles(cli.ca.clone()),
        None => match readable("receiver.crt") {
            Some(cert) => tls::Trust::CaFiles(vec![cert]),
            None => {
                let looked = match &local {
                    Some(dir) => format!("no readable receiver.crt in {}", dir.display()),
                    None if !cli.receiver.is_empty() => {
                        "a --receiver is trusted by --ca or --fingerprint, not by this \
                         host's receiver.crt"
                            .into()
                    }
                    None => "no per-user data directory here".into(),
                };
                return Err(Error::input(format!(
                    "which receiver? give --receiver HOST:PORT and --ca FILE or --fingerprint \
                     SHA256 (the receiver prints both when it starts), plus --token-file FILE \
                     when the receiver asks for one ({looked}; --state-dir DIR names the state \
                     directory of a receiver on this host)"
                )));
            }
        },
    };
    let token = match &cli.token_file {
        Some(path) => Some(tls::load_token(path)?),
        None => readable("token")
            .map(|path| tls::load_token(&path))
            .transpose()?,
    };
    Ok((trust, token))
}

async fn run(cli: Cli, prepared: Prepared) -> Result<()> {
    let Prepared {
        tls,
        token,
        fleet,
        socket,
        mut backends,
        sensor_id,
        session,
        spool,
        summary,
        keylog,
        on_demand,
    } = prepared;
    let session_id = session.session_id;
    let counters: Vec<Arc<Counters>> = backends.iter().map(|_| Arc::default()).collect();
    let mut stoppers: Vec<Stopper> = backends.iter_mut().map(|b| b.stopper()).collect();
    let names: Vec<String> = backends.iter().map(|b| b.info().name.clone()).collect();
    let capturing: Vec<String> = backends
        .iter()
        .map(|b| {
            format!(
                "{} ({}, filter \"{}\")",
                b.info().name,
                b.link_type_name(),
                b.info().filter
            )
        })
        .collect();

    let hostname = gethostname::gethostname().to_string_lossy().into_owned();
    let session_ids = Arc::new(std::sync::atomic::AtomicU64::new(session_id));
    let hello = protocol::Hello {
        version: protocol::PROTOCOL_VERSION,
        session_id,
        session_secret: session.secret,
        sensor_id,
        hostname,
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        interfaces: backends.iter().map(|b| b.info().clone()).collect(),
        token,
        available: on_demand.available.clone(),
        on_demand: on_demand.allowed,
        tls_key_log: !keylog.is_empty(),
    };

    let first_sequence = spool.as_ref().map_or(1, spool::Spool::next_sequence);
    if let Some(adopted) = spool.as_ref().map(spool::Spool::adopted) {
        if adopted.batches > 0 || !adopted.lost_before.is_empty() {
            tracing::warn!(
                "spool: resuming session {session_id:016x} of a sensor that did not end it: \
                 {} batch(es) ({} packets) to send again; {} batch(es) it held in memory are \
                 lost (sent empty)",
                adopted.batches,
                adopted.packets.iter().sum::<u64>(),
                adopted.lost_before.len() + adopted.lost_between + adopted.lost_after.len()
            );
        }
        // Counted as matched here, so that what they deliver adds up.
        for (c, n) in counters.iter().zip(&adopted.packets) {
            c.matched
                .fetch_add(*n, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let outbox = Outbox::new(cli.buffer, spool);

    // Signals are caught from here on: a first one ends the session cleanly.
    let shutdown = Arc::new(Notify::new());
    spawn_signal_handler(Arc::clone(&shutdown));

    // The first attempt starts before capture, so that a wrong CA or fingerprint is
    // reported at once. An unreachable receiver is not fatal: batches wait for it.
    let failover_after = fleet.can_fail_over().then_some(cli.failover_after);
    let client = transport::Client::new(
        socket,
        transport::Settings {
            receivers: cli.receivers(),
            server_name: cli.server_name.clone(),
            idle_timeout: transport::idle_timeout(failover_after),
        },
        tls,
        Arc::clone(&on_demand),
    )?;
    let remote = fleet.current().addr;
    let started = tokio::select! {
        started = delivery::start(client, fleet, &hello) => started?,
        _ = shutdown.notified() => {
            return Err(Error::runtime(format!(
                "interrupted while connecting to receiver {remote}"
            )))
        }
    };

    let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
    let session = SessionBatching::new(
        Arc::clone(&session_ids),
        first_sequence,
        tx,
        cli.batch_size,
        cli.flush_interval,
    );
    let mut threads = Vec::with_capacity(backends.len() + 1);
    // Captures still running: the key log follower ends after the last.
    let captures = Arc::new(std::sync::atomic::AtomicUsize::new(backends.len()));
    let key_log = Arc::new(stats::KeyLogCounters::default());
    for (i, backend) in backends.into_iter().enumerate() {
        let id = u16::try_from(i).map_err(|_| Error::input("too many interfaces"))?;
        let batcher = Batcher::new(
            session.clone(),
            id,
            Arc::clone(&counters[i]),
            backend.backpressure(),
        );
        let running = Arc::clone(&captures);
        let spawned = std::thread::Builder::new()
            .name(format!("capture-{i}"))
            .spawn(move || {
                let ended = backend.run(batcher);
                running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                ended
            });
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                stoppers.iter().for_each(|s| s());
                return Err(Error::runtime(format!(
                    "cannot start a capture thread: {e}"
                )));
            }
        }
    }
    #[cfg(unix)]
    if !keylog.is_empty() {
        // Its batches are numbered with the packets', on interface 0: the receiver takes
        // their lines out of the interface's order and writes them at once.
        let batcher = Batcher::new(
            session.clone(),
            0,
            Arc::clone(&key_log.lines),
            // As the packets: a replay waits for room, a live capture drops and counts.
            match cli.read {
                Some(_) => batcher::Backpressure::Wait,
                None => batcher::Backpressure::Drop,
            },
        );
        let follower = keylog::Follower::new(keylog.clone(), Arc::clone(&key_log));
        let running = Arc::clone(&captures);
        let whole_files = cli.read.is_some();
        match std::thread::Builder::new()
            .name("keylog".into())
            .spawn(move || follower.run(batcher, &running, whole_files))
        {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                stoppers.iter().for_each(|s| s());
                return Err(Error::runtime(format!(
                    "cannot start the key log thread: {e}"
                )));
            }
        }
    }
    // The channel closes when the last capture thread drops its sender; with no standing
    // capture (--on-demand), when the session ends.
    if cli.on_demand {
        let idle = std::sync::Mutex::new(Some(session));
        stoppers.push(Box::new(move || {
            idle.lock().unwrap_or_else(|e| e.into_inner()).take();
        }));
        eprintln!(
            "ready: no standing capture, taking on-demand captures through receiver {remote}"
        );
    } else {
        drop(session);
        eprintln!(
            "ready: capturing on {}, streaming to {remote}",
            capturing.join(", "),
        );
    }

    let link = Arc::new(LinkStats::default());
    let mut telemetry = telemetry::Telemetry::new(&names, &counters, Arc::clone(&link));
    if !keylog.is_empty() {
        telemetry = telemetry.with_key_log(Arc::clone(&key_log));
    }
    let telemetry = tokio::spawn(telemetry.run());
    program::status::enable(!cli.no_status);

    let (outcome, result) = delivery::run(
        started,
        delivery::Input {
            session_id: Arc::clone(&session_ids),
            hello,
            batches: rx,
            outbox,
            counters: &counters,
            key_log: &key_log,
            link: &link,
            stoppers: &stoppers,
            shutdown,
            give_up_after: cli.give_up_after,
            failover_after,
        },
    )
    .await;

    // Capture threads end on their own once the channel is gone or they were stopped.
    let joined = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::runtime("a capture thread panicked")))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();

    telemetry.abort();
    program::status::clear();
    let session_id = session_ids.load(std::sync::atomic::Ordering::Relaxed);
    print_summary(session_id, &names, &counters, &link, &outcome);
    if !keylog.is_empty() {
        eprintln!("{}", key_log.summary_line());
    }
    if let Some(line) = on_demand.summary_line() {
        eprintln!("{line}");
    }
    let summary_written = match (summary, &cli.summary_json) {
        (Some(file), Some(path)) => {
            let key_log = (!keylog.is_empty()).then_some(&*key_log);
            let figures = Figures {
                session_id,
                names: &names,
                counters: &counters,
                key_log,
                link: &link,
                outcome: &outcome,
            };
            write_summary_json(file, path, &figures)
        }
        _ => Ok(()),
    };
    result?;
    joined.into_iter().collect::<Result<Vec<()>>>()?;
    summary_written
}

fn print_summary(
    session_id: u64,
    names: &[String],
    counters: &[Arc<Counters>],
    link: &LinkStats,
    outcome: &delivery::Outcome,
) {
    eprintln!(
        "summary: session {session_id:016x}: {} batches sent, {} acknowledged by the receiver, \
         {} sent again after {} reconnect(s){}",
        outcome.batches,
        outcome.acked,
        outcome.resent,
        link.reconnects.load(std::sync::atomic::Ordering::Relaxed),
        failovers_phrase(outcome),
    );
    for (i, (name, c)) in names.iter().zip(counters).enumerate() {
        let unacked = outcome.unacked.get(i).copied().unwrap_or(0);
        eprintln!("{}", c.summary_line(name, unacked));
    }
}

/// With several receivers: the failovers and the last receiver, for the session line.
fn failovers_phrase(outcome: &delivery::Outcome) -> String {
    match outcome.receiver {
        Some(receiver) if outcome.failovers > 0 => format!(
            " and {} failover(s); last receiver {receiver}",
            outcome.failovers
        ),
        Some(receiver) => format!("; receiver {receiver}"),
        None => String::new(),
    }
}

/// What the exit summary reports.
struct Figures<'a> {
    session_id: u64,
    names: &'a [String],
    counters: &'a [Arc<Counters>],
    /// With `--keylog`.
    key_log: Option<&'a stats::KeyLogCounters>,
    link: &'a LinkStats,
    outcome: &'a delivery::Outcome,
}

/// The figures of [`print_summary`] as JSON, written whole to `file`, `--summary-json path`.
fn write_summary_json(
    file: program::private_file::Pending,
    path: &std::path::Path,
    figures: &Figures,
) -> Result<()> {
    let Figures {
        session_id,
        names,
        counters,
        key_log,
        link,
        outcome,
    } = *figures;
    let interfaces: Vec<serde_json::Value> = names
        .iter()
        .zip(counters)
        .enumerate()
        .map(|(i, (name, c))| c.summary_json(name, outcome.unacked.get(i).copied().unwrap_or(0)))
        .collect();
    let summary = serde_json::json!({
        "session": format!("{session_id:016x}"),
        "batches": {
            "sent": outcome.batches,
            "acknowledged": outcome.acked,
            "resent": outcome.resent,
        },
        "reconnects": link.reconnects.load(std::sync::atomic::Ordering::Relaxed),
        "failovers": outcome.failovers,
        "receiver": outcome.receiver.map(|r| r.to_string()),
        "interfaces": interfaces,
        "tls_key_log": key_log.map(stats::KeyLogCounters::summary_json),
    });
    file.commit(format!("{summary:#}\n").as_bytes())
        .map_err(|e| {
            Error::runtime(format!(
                "cannot write the summary to {}: {e}",
                path.display()
            ))
        })
}

fn spawn_signal_handler(shutdown: Arc<Notify>) {
    tokio::spawn(async move {
        let mut signals = match program::cli::Signals::new() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot catch signals: {e}");
                return;
            }
        };
        signals.next().await;
        tracing::info!("signal received: ending the session (again to quit at once)");
        shutdown.notify_one();
        signals.next().await;
        program::status::clear();
        let failure = Failure::RunFailed;
        exit::fail(
            PROGRAM,
            failure,
            "interrupted twice; exiting without flushing (packets lost)",
        );
        std::process::exit(failure.code().into());
    });
}
