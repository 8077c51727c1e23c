//! The accept loop, and the wiring of connections to the one writer task.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use quinn::{Endpoint, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::auth::{Auth, LOG_WINDOW};
use crate::connection::connection;
use crate::quota::Quotas;
use crate::stats::SensorSummary;
use crate::viewer::Sensors;
use crate::writer::{ConnId, Event, Writer};

/// Sensors connected at once, their Hello accepted.
const MAX_AUTHENTICATED: usize = 1024;
/// Connections not yet authenticated (handshaking, or before their Hello is accepted), in
/// all and from one address: counted apart from the sensors, so that peers that prove
/// nothing can never take their places.
const MAX_UNAUTHENTICATED: usize = 64;
const MAX_UNAUTHENTICATED_PER_ADDRESS: usize = 8;
/// Past this many unauthenticated connections, a new peer whose address QUIC has not
/// validated is first sent a Retry: a spoofed source address never gets past it.
const RETRY_ABOVE: usize = 16;
/// Batches queued between the connections and the writer. Each may hold up to 8 MiB
/// decompressed (typically 256 KiB): this bounds that memory; a full queue slows the
/// sensors through QUIC flow control.
const EVENT_QUEUE: usize = 64;

/// Serves sensors into `writer`'s output until `stop` completes (or the output fails), then
/// tells the connected sensors, writes out everything held and completes the output. `auth`:
/// what sensors must prove before anything of theirs is accepted; `quotas`: what each may
/// take.
pub async fn run(
    endpoint: Endpoint,
    writer: Writer,
    admission: Admission,
    stop: impl Future<Output = ()>,
) -> Result<Vec<SensorSummary>> {
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut writer = tokio::spawn(writer.run(events_rx, shutdown_rx.clone()));
    let server = tokio::spawn(serve(endpoint, events_tx, admission, shutdown_rx));
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
    admission: Admission,
    mut shutdown: watch::Receiver<bool>,
) {
    let auth = Arc::clone(&admission.auth);
    let mut tasks = JoinSet::new();
    let mut next_conn: ConnId = 1;
    let mut summary_tick = tokio::time::interval(LOG_WINDOW);
    let pending = Arc::new(Mutex::new(Pending::default()));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                while tasks.try_join_next().is_some() {}
                let peer = incoming.remote_address();
                let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let (unauthenticated, of_peer) = {
                    let p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    (p.total, p.by_address.get(&peer.ip()).copied().unwrap_or(0))
                };
                let authenticated = tasks.len().saturating_sub(unauthenticated);
                let full = if authenticated >= MAX_AUTHENTICATED {
                    Some(format!("{MAX_AUTHENTICATED} sensors already connected"))
                } else if unauthenticated >= MAX_UNAUTHENTICATED {
                    Some(format!("{MAX_UNAUTHENTICATED} connections already authenticating"))
                } else if of_peer >= MAX_UNAUTHENTICATED_PER_ADDRESS {
                    Some(format!(
                        "{MAX_UNAUTHENTICATED_PER_ADDRESS} connections of this address already \
                         authenticating"
                    ))
                } else {
                    None
                };
                if let Some(why) = full {
                    auth.refusals.refused(peer, why);
                    incoming.refuse();
                    continue;
                }
                if unauthenticated >= RETRY_ABOVE && !incoming.remote_address_validated() {
                    // The peer comes back with a token proving its address, or never.
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().ignore();
                    }
                    continue;
                }
                let counted = Unauthenticated::new(Arc::clone(&pending), peer.ip());
                let conn = next_conn;
                next_conn += 1;
                tasks.spawn(connection(
                    incoming,
                    counted,
                    conn,
                    events.clone(),
                    admission.clone(),
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

/// What every sensor connection is held to, and where it is listed once joined: what
/// sensors must prove, what each may take, and the sensors viewers see.
#[derive(Clone)]
pub struct Admission {
    pub auth: Arc<Auth>,
    pub quotas: Quotas,
    pub sensors: Arc<Sensors>,
    /// How long a stopping receiver goes on reading a sensor that follows TLS key logs (the
    /// reorder window): a key arrives after the packets it decrypts, and a line the next
    /// receiver got would land after them in the file, where one-pass readers miss it.
    pub key_log_grace: Duration,
}

/// The connections not yet authenticated, in all and by address.
#[derive(Default)]
pub struct Pending {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One connection counted in [`Pending`] until it is dropped: when its Hello is accepted,
/// or when it ends.
pub struct Unauthenticated {
    pending: Arc<Mutex<Pending>>,
    ip: IpAddr,
}

impl Unauthenticated {
    pub fn new(pending: Arc<Mutex<Pending>>, ip: IpAddr) -> Self {
        {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            p.total += 1;
            *p.by_address.entry(ip).or_default() += 1;
        }
        Self { pending, ip }
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.total = p.total.saturating_sub(1);
        if let Some(n) = p.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                p.by_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_connections_are_counted_until_dropped() {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = Unauthenticated::new(Arc::clone(&pending), a);
        let second = Unauthenticated::new(Arc::clone(&pending), a);
        let other = Unauthenticated::new(Arc::clone(&pending), b);
        let counts = |p: &Arc<Mutex<Pending>>| {
            let p = p.lock().unwrap();
            (p.total, p.by_address.get(&a).copied(), p.by_address.len())
        };
        assert_eq!(counts(&pending), (3, Some(2), 2));
        drop(first);
        drop(other);
        assert_eq!(counts(&pending), (1, Some(1), 1));
        drop(second);
        assert_eq!(counts(&pending), (0, None, 0));
    }
}
