//! The viewer role (`--viewer-listen`): viewers list the connected sensors and their
//! interfaces and start on-demand captures on them. A viewer proves itself with the viewer
//! token or a client certificate from `--viewer-ca`, never with a sensor's credentials.
//!
//! For a capture, the receiver opens one stream per chosen sensor on that sensor's
//! connection and asks it (see `protocol::CaptureRequest`); when every sensor has started,
//! the viewer gets `CaptureStarted`, then the packets of all of them through the receiver's
//! merge (time order, as in the output file), as a pcapng stream, until every sensor's
//! capture has ended or the viewer leaves. Every request is logged with who asked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use program::names::clean;
use protocol::{
    CaptureEnded, CaptureRequest, CaptureStarted, CaptureTarget, DropReason, ErrorCode, ErrorMsg,
    InterfaceInfo, ListedSensor, Message, SensorList,
};
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use receiver::sink::{PcapNgSink, Sink, SinkInterface};
use tokio::sync::mpsc;

use crate::auth::{certificate_name, RefusalLog};
use crate::merge::Merge;
use receiver::viewer_token::ViewerToken;

/// How long a viewer has to finish its handshake and say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long sensors have to say whether their capture started.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How often merged packets are sent on to the viewer.
const RELEASE_EVERY: Duration = Duration::from_millis(100);
/// Packet data held in one capture's merge before it is written regardless of order.
const MAX_HELD: usize = 64 << 20;
/// Viewers served at once.
const MAX_VIEWERS: usize = 64;

/// The sensors connected now, as viewers see them.
#[derive(Default)]
pub struct Sensors {
    by_conn: Mutex<HashMap<u64, Listed>>,
}

#[derive(Clone)]
struct Listed {
    name: String,
    connection: Connection,
    interfaces: Vec<String>,
    on_demand: bool,
}

/// A sensor's place in [`Sensors`], given up when dropped (its connection ended).
pub struct Registration {
    sensors: Arc<Sensors>,
    conn: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sensors
            .by_conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.conn);
    }
}

impl Sensors {
    /// Lists a sensor whose Hello was accepted, until the returned registration is dropped.
    pub fn register(
        self: &Arc<Self>,
        conn: u64,
        name: String,
        connection: Connection,
        interfaces: Vec<String>,
        on_demand: bool,
    ) -> Registration {
        let listed = Listed {
            name,
            connection,
            interfaces: interfaces.iter().map(|i| clean(i)).collect(),
            on_demand,
        };
        self.by_conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn, listed);
        Registration {
            sensors: Arc::clone(self),
            conn,
        }
    }

    fn snapshot(&self) -> Vec<Listed> {
        let mut all: Vec<Listed> = self
            .by_conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// What viewers must prove: the viewer token (checked as the sensors' is), or a client
/// certificate from `--viewer-ca`.
pub struct ViewerAuth {
    token: Arc<ViewerToken>,
    /// `--viewer-ca`: a verified client certificate is proof enough.
    certificates: bool,
    refusals: RefusalLog,
}

impl ViewerAuth {
    pub fn new(token: Arc<ViewerToken>, certificates: bool) -> Self {
        Self {
            token,
            certificates,
            refusals: RefusalLog::default(),
        }
    }
}

/// Serves viewers on `endpoint` until the process ends.
pub async fn serve(
    endpoint: Endpoint,
    sensors: Arc<Sensors>,
    auth: Arc<ViewerAuth>,
    window: Duration,
) {
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= MAX_VIEWERS {
            incoming.refuse();
            continue;
        }
        tasks.spawn(viewer(
            incoming,
            Arc::clone(&sensors),
            Arc::clone(&auth),
            window,
        ));
    }
}

async fn viewer(
    incoming: Incoming,
    sensors: Arc<Sensors>,
    auth: Arc<ViewerAuth>,
    window: Duration,
) {
    let peer = incoming.remote_address();
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let conn = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            return auth
                .refusals
                .refused(peer, format!("viewer handshake failed: {e}"))
        }
        Err(_) => return auth.refusals.refused(peer, "viewer handshake timed out"),
    };
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        _ => return auth.refusals.refused(peer, "viewer opened no stream"),
    };
    let mut buf = BytesMut::new();
    let hello = tokio::time::timeout(
        HELLO_TIMEOUT,
        program::frames::read_message(&mut recv, &mut buf),
    )
    .await;
    let hello = match hello {
        Ok(Ok(Some(Message::ViewerHello(hello)))) => hello,
        Ok(Err(why)) => return auth.refusals.refused(peer, format!("viewer: {why}")),
        _ => {
            return auth
                .refusals
                .refused(peer, "viewer: expected a viewer hello")
        }
    };
    let user = clean(&hello.user);
    let certificate = auth.certificates.then(|| certificate_name(&conn)).flatten();
    let who = match &certificate {
        Some(name) => format!("viewer {user} at {peer} (certificate {name})"),
        None if hello
            .token
            .as_ref()
            .is_some_and(|given| auth.token.matches(given.as_bytes())) =>
        {
            format!("viewer {user} at {peer} (viewer token)")
        }
        None => {
            let why = if hello.token.is_some() {
                "wrong viewer token"
            } else {
                "no viewer token"
            };
            auth.refusals
                .auth_failed(peer, format!("viewer {user}: {why}"));
            let message = format!(
                "{why}: pass --token-file with the receiver's viewer token (its \
                 <state-dir>/viewer-token or --viewer-token-file; a sensor token is not one)"
            );
            return refuse(&conn, &mut send, ErrorCode::UNAUTHENTICATED, message).await;
        }
    };
    let listed = sensors.snapshot();
    let list = SensorList {
        sensors: listed
            .iter()
            .map(|s| ListedSensor {
                name: s.name.clone(),
                on_demand: s.on_demand,
                interfaces: s.interfaces.clone(),
            })
            .collect(),
    };
    if send
        .write_all(&Message::SensorList(list).to_bytes())
        .await
        .is_err()
    {
        return;
    }
    tracing::info!("{who} listed {} sensor(s)", listed.len());
    match program::frames::read_message(&mut recv, &mut buf).await {
        // A listing only.
        Ok(None) => {}
        Ok(Some(Message::CaptureRequest(request))) => {
            capture(&conn, send, recv, &listed, request, &who, window).await;
        }
        Ok(Some(other)) => {
            let message = format!("unexpected {:?} message", other.message_type());
            refuse(&conn, &mut send, ErrorCode::PROTOCOL, message).await;
        }
        // Gone after the listing (Wireshark's interface list).
        Err(_) => {}
    }
}

/// Tells the viewer why, and closes.
async fn refuse(conn: &Connection, send: &mut SendStream, code: ErrorCode, message: String) {
    let error = Message::Error(ErrorMsg { code, message });
    if send.write_all(&error.to_bytes()).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    }
    conn.close(VarInt::from_u32(code.0.into()), b"");
}

/// One sensor's part of a capture.
struct Part {
    sensor: String,
    send: SendStream,
    recv: RecvStream,
    buf: BytesMut,
    interface: InterfaceInfo,
}

/// What a sensor's stream brings during a capture.
enum FromSensor {
    Batch(usize, protocol::Batch),
    Ended(usize, Result<CaptureEnded, String>),
}

async fn capture(
    conn: &Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    listed: &[Listed],
    request: CaptureRequest,
    who: &str,
    window: Duration,
) {
    let targets: Vec<String> = request
        .targets
        .iter()
        .map(|t| format!("{}/{}", clean(&t.sensor), clean(&t.interface)))
        .collect();
    tracing::info!(
        "{who} asks for an on-demand capture on {}, filter \"{}\"",
        targets.join(", "),
        clean(&request.filter)
    );
    let parts = match start(listed, &request, who).await {
        Ok(parts) => parts,
        Err(why) => {
            tracing::warn!("{who}: on-demand capture refused: {why}");
            return refuse(conn, &mut send, ErrorCode::CAPTURE_REFUSED, why).await;
        }
    };
    let interfaces: Vec<InterfaceInfo> = parts
        .iter()
        .map(|p| InterfaceInfo {
            name: format!("{}/{}", p.sensor, clean(&p.interface.name)),
            ..p.interface.clone()
        })
        .collect();
    let started = Message::CaptureStarted(CaptureStarted {
        interfaces: interfaces.clone(),
    });
    if send.write_all(&started.to_bytes()).await.is_err() {
        return;
    }
    tracing::info!("{who}: on-demand capture started on {}", targets.join(", "));
    let why = stream(parts, &interfaces, &mut send, &mut recv, window).await;
    tracing::info!(
        "{who}: on-demand capture on {} ended: {why}",
        targets.join(", ")
    );
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
}

/// Asks every target's sensor; all start, or none runs and the first refusal is said.
async fn start(
    listed: &[Listed],
    request: &CaptureRequest,
    who: &str,
) -> Result<Vec<Part>, String> {
    if request.targets.is_empty() {
        return Err("the request names no interface".into());
    }
    let mut parts = Vec::with_capacity(request.targets.len());
    for target in &request.targets {
        let Some(sensor) = listed.iter().find(|s| s.name == target.sensor) else {
            let names: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
            return Err(format!(
                "no sensor \"{}\" is connected (connected: {})",
                clean(&target.sensor),
                names.join(", ")
            ));
        };
        let (mut send, recv) = sensor
            .connection
            .open_bi()
            .await
            .map_err(|e| format!("sensor {}: cannot open a stream to it: {e}", sensor.name))?;
        let ask = Message::CaptureRequest(CaptureRequest {
            targets: vec![CaptureTarget {
                sensor: sensor.name.clone(),
                interface: target.interface.clone(),
            }],
            requested_by: who.to_string(),
            ..request.clone()
        });
        send.write_all(&ask.to_bytes())
            .await
            .map_err(|e| format!("sensor {}: {e}", sensor.name))?;
        parts.push(Part {
            sensor: sensor.name.clone(),
            send,
            recv,
            buf: BytesMut::new(),
            interface: InterfaceInfo {
                name: String::new(),
                link_type: 0,
                snaplen: 0,
                filter: String::new(),
            },
        });
    }
    for part in &mut parts {
        let reply = tokio::time::timeout(
            START_TIMEOUT,
            program::frames::read_message(&mut part.recv, &mut part.buf),
        )
        .await;
        let why = match reply {
            Ok(Ok(Some(Message::CaptureStarted(mut started)))) if started.interfaces.len() == 1 => {
                part.interface = started.interfaces.remove(0);
                continue;
            }
            Ok(Ok(Some(Message::Error(e)))) => clean(&e.message),
            Ok(Ok(_)) => "it answered out of protocol".into(),
            Ok(Err(why)) => why,
            Err(_) => "it did not answer in time".into(),
        };
        // Dropping the other parts' streams stops what started.
        return Err(format!("sensor {}: {why}", part.sensor));
    }
    Ok(parts)
}

/// Streams the merged packets of `parts` to the viewer as pcapng until every sensor's
/// capture ended or the viewer left; says which.
async fn stream(
    parts: Vec<Part>,
    interfaces: &[InterfaceInfo],
    send: &mut SendStream,
    recv: &mut RecvStream,
    window: Duration,
) -> String {
    let mut sink = match PcapNgSink::new(Vec::new()) {
        Ok(sink) => sink,
        Err(e) => return format!("cannot start the pcapng stream: {e}"),
    };
    let mut merge = Merge::new(window, MAX_HELD);
    for (i, interface) in interfaces.iter().enumerate() {
        let described = SinkInterface {
            name: interface.name.clone(),
            link_type: interface.link_type,
            snaplen: interface.snaplen,
            filter: interface.filter.clone(),
            description: format!("on-demand capture on {}", interface.name),
            sensor: parts[i].sensor.clone(),
            // An on-demand capture is no sensor session: nothing resumes or resends it.
            session: String::new(),
            session_id: 0,
        };
        match sink.add_interface(&described) {
            Ok(index) => merge.add_session(i as u64, vec![index], None),
            Err(e) => return format!("cannot describe {}: {e}", interface.name),
        }
    }
    let (events, mut from_sensors) = mpsc::channel(16);
    let mut stops = Vec::with_capacity(parts.len());
    let dropped: Vec<Arc<AtomicU64>> = parts.iter().map(|_| Arc::default()).collect();
    for (i, part) in parts.into_iter().enumerate() {
        stops.push(part.send);
        let lost = Arc::clone(&dropped[i]);
        tokio::spawn(read_sensor(i, part.recv, part.buf, events.clone(), lost));
    }
    drop(events);
    let mut running = stops.len();
    let mut ends: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(RELEASE_EVERY);
    let mut scratch = [0u8; 64];
    let mut viewer_open = true;
    let outcome = loop {
        tokio::select! {
            event = from_sensors.recv() => match event {
                Some(FromSensor::Batch(i, batch)) => match batch.packets() {
                    Ok(packets) => merge.add_batch(i as u64, batch.sequence, 0, packets, Instant::now()),
                    Err(e) => ends.push(format!("{}: bad batch: {e}", interfaces[i].name)),
                },
                Some(FromSensor::Ended(i, ended)) => {
                    merge.set_sending(i as u64, false);
                    running -= 1;
                    match ended {
                        Ok(mut ended) => {
                            let slow = dropped[i].load(Relaxed);
                            if slow > 0 {
                                ended.stats.drops.push((DropReason::VIEWER_SLOW, slow));
                            }
                            let _ = sink.write_stats(i as u32, &ended.stats);
                            ends.push(format!("{}: {}", interfaces[i].name, clean(&ended.reason)));
                        }
                        Err(why) => ends.push(format!("{}: {why}", interfaces[i].name)),
                    }
                    if running == 0 {
                        break ends.join("; ");
                    }
                }
                None => break ends.join("; "),
            },
            _ = tick.tick() => {
                if merge.release(Instant::now(), &mut sink).is_err() {
                    break "cannot encode packets".into();
                }
                if !flush_to(&mut sink, send).await {
                    break "the viewer went away".into();
                }
            }
            read = recv.read(&mut scratch), if viewer_open => match read {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    // The viewer stopped: so do the sensors, which then say they ended.
                    viewer_open = false;
                    for stop in &mut stops {
                        let _ = stop.finish();
                    }
                }
            },
        }
    };
    let _ = merge.drain_all(&mut sink);
    let _ = flush_to(&mut sink, send).await;
    // Counted when the capture ends for the viewer, however it ends.
    let slow: u64 = dropped.iter().map(|d| d.load(Relaxed)).sum();
    metrics::counter!("capstream_receiver_viewer_dropped_packets_total").increment(slow);
    if slow > 0 {
        format!("{outcome} ({slow} packets dropped: the viewer read too slowly)")
    } else {
        outcome
    }
}

/// Sends what the pcapng writer holds; false when the viewer is gone.
async fn flush_to(sink: &mut PcapNgSink<Vec<u8>>, send: &mut SendStream) -> bool {
    let _ = sink.flush();
    let bytes = std::mem::take(sink.output_mut());
    bytes.is_empty() || send.write_all(&bytes).await.is_ok()
}

/// Passes on one sensor's batches, then how its capture ended. The stream is always read:
/// a batch that finds the merge behind (the viewer reads too slowly) is dropped and counted
/// in `dropped`, so that a slow viewer never holds the sensor's connection (its standing
/// capture shares that connection's flow control).
async fn read_sensor(
    index: usize,
    mut recv: RecvStream,
    mut buf: BytesMut,
    events: mpsc::Sender<FromSensor>,
    dropped: Arc<AtomicU64>,
) {
    let ended = loop {
        match program::frames::read_message(&mut recv, &mut buf).await {
            Ok(Some(Message::Batch(batch))) => {
                let packets = u64::from(batch.packet_count);
                match events.try_send(FromSensor::Batch(index, batch)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        dropped.fetch_add(packets, Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            Ok(Some(Message::CaptureEnded(ended))) => break Ok(ended),
            Ok(Some(Message::Error(e))) => break Err(clean(&e.message)),
            Ok(Some(other)) => break Err(format!("unexpected {:?}", other.message_type())),
            Ok(None) => break Err("the sensor ended the stream".into()),
            Err(why) => break Err(why),
        }
    };
    let _ = events.send(FromSensor::Ended(index, ended)).await;
}
