//! The accept loop, and the wiring of connections to the one writer task.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use quinn::{Endpoint, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::auth::{Auth, LOG_WINDOW};
use crate::connection::connection;
use crate::quota::Quotas;
use crate::sink::Sink;
use crate::stats::SensorSummary;
use crate::writer::{ConnId, Event, Writer};

const MAX_CONNECTIONS: usize = 1024;
/// Batches queued between the connections and the writer. Each may hold up to 8 MiB
/// decompressed (typically 256 KiB): this bounds that memory; a full queue slows the
/// sensors through QUIC flow control.
const EVENT_QUEUE: usize = 64;

/// Serves sensors into `sink` until `stop` completes (or the output fails), then tells the
/// connected sensors, writes out everything held and completes the output.
/// `retry_output`: wait out output errors (a file on a full disk) rather than stop. `auth`:
/// what sensors must prove before anything of theirs is accepted; `quotas`: what each may
/// take.
pub async fn run(
    endpoint: Endpoint,
    sink: Box<dyn Sink>,
    reorder_window: Duration,
    retry_output: bool,
    auth: Auth,
    quotas: Quotas,
    stop: impl Future<Output = ()>,
) -> Result<Vec<SensorSummary>> {
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let writer = Writer::new(sink, reorder_window, retry_output);
    let mut writer = tokio::spawn(writer.run(events_rx, shutdown_rx.clone()));
    let server = tokio::spawn(serve(
        endpoint,
        events_tx,
        Arc::new(auth),
        quotas,
        shutdown_rx,
    ));
    let result = tokio::select! {
        _ = stop => {
            tracing::info!("stopping: telling sensors, writing what is held");
            let _ = shutdown_tx.send(true);
            let _ = server.await;
            writer.await
        }
        // The writer only ends early when the output failed.
        result = &mut writer => {
            let _ = shutdown_tx.send(true);
            result
        }
    };
    result.context("the writer task failed")?
}

/// Accepts sensors until `shutdown` turns true, then waits for their tasks to end.
pub async fn serve(
    endpoint: Endpoint,
    events: mpsc::Sender<Event>,
    auth: Arc<Auth>,
    quotas: Quotas,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    let mut next_conn: ConnId = 1;
    let mut summary_tick = tokio::time::interval(LOG_WINDOW);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                while tasks.try_join_next().is_some() {}
                if tasks.len() >= MAX_CONNECTIONS {
                    tracing::warn!("{}: refused: {MAX_CONNECTIONS} sensors already connected", incoming.remote_address());
                    incoming.refuse();
                    continue;
                }
                let conn = next_conn;
                next_conn += 1;
                tasks.spawn(connection(
                    incoming,
                    conn,
                    events.clone(),
                    Arc::clone(&auth),
                    quotas,
                    shutdown.clone(),
                ));
            }
            _ = summary_tick.tick() => auth.refusals.summarize(),
            _ = shutdown.changed() => break,
        }
    }
    while tasks.join_next().await.is_some() {}
    auth.refusals.summarize();
    endpoint.close(VarInt::from_u32(0), b"receiver stopped");
}
