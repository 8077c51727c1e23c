//! The Prometheus endpoint both programs serve with `--metrics`: the `metrics` crate's
//! recorder, rendered by a small HTTP server of our own on threads of its own. The
//! exporter's own listener cannot be bounded; this one is: a few clients at once, each with
//! a deadline for its request and for taking the answer, one request per connection. Idle
//! or slow clients therefore cannot pile up and take the process's file descriptors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Clients served at once; a connection beyond is closed at once.
pub const MAX_CLIENTS: usize = 8;
/// A client has this long to send its request, and this long to take the answer.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
/// Longest request read: a scrape's request line and headers are far shorter.
const MAX_REQUEST: usize = 8 * 1024;

/// Serves `http://ADDR/metrics` (any path answers) from now on. Series not updated for
/// `linger` disappear: the programs update their live series every second, so only those
/// of what ended (a sensor's session) go, `linger` after it ended.
pub fn serve(addr: SocketAddr, linger: Duration) -> Result<(), String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let handle = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::ALL, Some(linger))
        .install_recorder()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept(listener, handle))
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    Ok(())
}

fn accept(listener: TcpListener, handle: PrometheusHandle) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // Out of descriptors, most likely: let some close rather than spin.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if active.load(Ordering::Acquire) >= MAX_CLIENTS {
            continue; // dropped: closed at once
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (handle, done) = (handle.clone(), Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name("metrics-client".into())
            .spawn(move || {
                let _ = answer(stream, &handle);
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Reads one request (up to the blank line ending its headers) within the deadline and
/// answers it with the current metrics, then closes.
fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let deadline = Instant::now() + CLIENT_DEADLINE;
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || request.len() >= MAX_REQUEST {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    handle.run_upkeep();
    let body = handle.render();
    stream.set_write_timeout(Some(CLIENT_DEADLINE))?;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}
