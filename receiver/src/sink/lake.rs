//! The lake output (`--lake DIR|s3://bucket/prefix`): the merged stream as immutable pcapng
//! segments, each with a Parquet index and a manifest (see the `lake` crate).
//!
//! A segment is written in the staging directory; a flush hands it (and the batch keys of
//! its packets, in a `.rows` file beside it) to the kernel before sensors are acknowledged,
//! as the file output does: a killed receiver loses nothing acknowledged. At
//! `--segment-size` or `--segment-time` it is closed: synced, its index and then its
//! manifest written in staging (synced too), and the publisher copies segment, index and manifest (last) into the
//! lake, then removes them from staging. A receiver started again finishes and publishes
//! what an earlier run left staged, its index rebuilt from the `.rows` file.
//!
//! TLS key log lines go in Decryption Secrets Blocks, whose byte ranges the manifest lists
//! for `receiver query`. As with rotated files, the lines whose ClientHello a segment did
//! not hold start the next segment, so that each segment decrypts alone.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ::lake::dissect::Headers;
use ::lake::index::{self, Process, Row};
use ::lake::layout::Keep;
use ::lake::manifest::{self, Interface, Manifest};
use ::lake::Lake;
use bytes::Bytes;
use program::backoff::Backoff;
use protocol::InterfaceStats;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::secrets::Pending;
use super::{OutPacket, PcapNgSink, Refusal, Sink, SinkInterface};

/// Bytes of one packet's entry in a staged segment's `.rows` file.
const ROW_KEY_LEN: usize = 48;
/// The retry of a whole object the store refused, after object_store's own retries of each
/// request: the lake's publisher and `--upload` (the binary's uploader) wait alike.
pub const STORE_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

/// What `--lake` and its options ask for.
pub struct LakeConfig {
    pub lake: Lake,
    /// `--receiver-name`, already a file name part.
    pub receiver: String,
    pub staging: PathBuf,
    pub segment_size: u64,
    pub segment_time: Duration,
    pub keep: Option<Keep>,
}

/// The sink: the segment being written, and the interfaces new segments describe.
pub struct LakeSink {
    receiver: String,
    staging: PathBuf,
    segment_size: u64,
    segment_time: Duration,
    /// Every interface added, and whether its session closed.
    interfaces: Vec<(SinkInterface, bool)>,
    segment: Option<Segment>,
    /// Key log lines whose ClientHello no segment has held yet: the next one starts with
    /// them.
    carried: Pending,
    publish: mpsc::UnboundedSender<String>,
}

/// The publisher, for the exit: waits for it to empty staging.
pub struct LakeHandle {
    worker: JoinHandle<()>,
    counters: Arc<Counters>,
    url: String,
}

#[derive(Default)]
struct Counters {
    segments: AtomicU64,
    bytes: AtomicU64,
    failed_attempts: AtomicU64,
    deleted: AtomicU64,
    staged: AtomicU64,
}

/// A file whose bytes written are counted: where each packet's block starts.
struct Counted {
    file: BufWriter<File>,
    written: u64,
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

struct Segment {
    stem: String,
    opened: Instant,
    sink: PcapNgSink<Counted>,
    /// The segment's interface of each of the sink's, if it describes it.
    map: Vec<Option<u32>>,
    interfaces: Vec<Interface>,
    rows: Vec<Row>,
    processes: Vec<Process>,
    /// Each pid's entries in `processes`: a lookup per attributed packet without a scan.
    processes_by_pid: HashMap<u32, Vec<u32>>,
    keys: BufWriter<File>,
    /// Where its Decryption Secrets Blocks are, for the manifest.
    secrets: Vec<Range<u64>>,
}

impl LakeSink {
    /// Opens the staging directory and starts the publisher, which first publishes what an
    /// earlier run left staged.
    pub fn open(config: LakeConfig) -> io::Result<(Self, LakeHandle)> {
        fs::create_dir_all(&config.staging)?;
        let (tx, rx) = mpsc::unbounded_channel();
        for stem in recover(&config.staging, &config.receiver)? {
            tracing::info!("publishing segment {stem}, staged by an earlier run");
            let _ = tx.send(stem);
        }
        let counters = Arc::new(Counters::default());
        let worker = tokio::spawn(publish(
            config.lake.clone(),
            config.staging.clone(),
            config.receiver.clone(),
            config.keep,
            rx,
            Arc::clone(&counters),
        ));
        let handle = LakeHandle {
            worker,
            counters,
            url: config.lake.url.clone(),
        };
        Ok((
            Self {
                receiver: config.receiver,
                staging: config.staging,
                segment_size: config.segment_size,
                segment_time: config.segment_time,
                interfaces: Vec::new(),
                segment: None,
                carried: Pending::default(),
                publish: tx,
            },
            handle,
        ))
    }

    fn open_segment(&mut self) -> io::Result<&mut Segment> {
        if self.segment.is_none() {
            let stem = format!("{}-{}", self.receiver, epoch_ns(SystemTime::now()));
            let path = self.staging.join(format!("{stem}.pcapng"));
            let file = Counted {
                file: BufWriter::with_capacity(1 << 20, program::private_file::create(&path)?),
                written: 0,
            };
            let keys = BufWriter::new(program::private_file::create(
                &self.staging.join(format!("{stem}.rows")),
            )?);
            let mut segment = Segment {
                stem,
                opened: Instant::now(),
                sink: PcapNgSink::new(file)?,
                map: vec![None; self.interfaces.len()],
                interfaces: Vec::new(),
                rows: Vec::new(),
                processes: Vec::new(),
                processes_by_pid: HashMap::new(),
                keys,
                secrets: Vec::new(),
            };
            for (i, (interface, closed)) in self.interfaces.iter().enumerate() {
                if !closed {
                    segment.describe(i, interface)?;
                }
            }
            let from = segment.sink.output().written;
            segment
                .sink
                .carry_secrets(std::mem::take(&mut self.carried))?;
            segment.secrets_written_since(from);
            segment.write_draft(&self.staging)?;
            self.segment = Some(segment);
        }
        self.segment
            .as_mut()
            .ok_or_else(|| io::Error::other("no lake segment open"))
    }

    /// Closes the segment: synced, its index and manifest written, handed to the publisher.
    fn close_segment(&mut self) -> io::Result<()> {
        let Some(mut segment) = self.segment.take() else {
            return Ok(());
        };
        segment.sync()?;
        self.carried = segment.sink.take_pending_secrets();
        let segment_bytes = segment.sink.output().written;
        let stem = segment.stem.clone();
        // A segment with key lines but no packet is published all the same (keys only,
        // `packets` 0) rather than its lines only carried into the next segment: they were
        // acknowledged and counted written, no next segment may come (at the exit), and
        // their ClientHellos may be in another receiver's segments (a sensor that failed
        // over), which a query over the whole lake reads with them.
        if segment.rows.is_empty() && segment.secrets.is_empty() {
            // Nothing but headers: not worth a segment.
            drop(segment);
            remove_staged(&self.staging, &stem);
            return Ok(());
        }
        let Segment {
            mut rows,
            interfaces,
            processes,
            secrets,
            ..
        } = segment;
        finish_staged(
            &self.staging,
            &self.receiver,
            Closed {
                stem: &stem,
                rows: &mut rows,
                interfaces,
                processes: &processes,
                secrets,
                segment_bytes,
                closed: SystemTime::now(),
            },
        )?;
        let _ = self.publish.send(stem);
        Ok(())
    }
}

impl Segment {
    fn describe(&mut self, i: usize, interface: &SinkInterface) -> io::Result<()> {
        let local = self.sink.add_interface(interface)?;
        self.map[i] = Some(local);
        self.interfaces.push(Interface {
            name: interface.name.clone(),
            sensor: interface.sensor.clone(),
            link_type: interface.link_type,
            snaplen: interface.snaplen,
            session: interface.session_id,
        });
        Ok(())
    }

    /// Notes the Decryption Secrets Block written since the segment's end was at `from`,
    /// if one was.
    fn secrets_written_since(&mut self, from: u64) {
        let to = self.sink.output().written;
        if to > from {
            self.secrets.push(from..to);
        }
    }

    /// The interfaces so far, for a run that finds the segment staged after a crash.
    fn write_draft(&self, staging: &Path) -> io::Result<()> {
        let text = serde_json::to_vec(&self.interfaces).map_err(io::Error::other)?;
        program::private_file::write(
            &staging.join(format!("{}.interfaces.json", self.stem)),
            &text,
        )
    }

    /// Everything written so far to the kernel: what a flush promises.
    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()?;
        self.keys.flush()
    }

    /// [`Self::flush`], and to the disk: before the segment is closed.
    fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        self.sink.output().file.get_ref().sync_data()?;
        self.keys.get_ref().sync_data()
    }

    /// The process table's entry for `process`, added if new.
    fn process(&mut self, process: Option<&protocol::Process>) -> Option<u32> {
        let p = process?;
        let same = self.processes_by_pid.entry(p.pid).or_default();
        let found = same.iter().copied().find(|&i| {
            let q = &self.processes[i as usize];
            q.comm == p.cmd && q.container_id == p.container_id
        });
        Some(match found {
            Some(i) => i,
            None => {
                let i = self.processes.len() as u32;
                self.processes.push(Process {
                    pid: p.pid,
                    comm: p.cmd.clone(),
                    container_id: p.container_id.clone(),
                });
                same.push(i);
                i
            }
        })
    }
}

impl Sink for LakeSink {
    fn check(&self, _interfaces: &[SinkInterface]) -> Result<(), Refusal> {
        Ok(())
    }

    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        let i = self.interfaces.len();
        self.interfaces.push((interface.clone(), false));
        if let Some(segment) = &mut self.segment {
            segment.map.push(None);
            segment.describe(i, interface)?;
            segment.write_draft(&self.staging)?;
        }
        Ok(i as u32)
    }

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()> {
        let full = self.segment.as_ref().is_some_and(|s| {
            s.sink.output().written >= self.segment_size || s.opened.elapsed() >= self.segment_time
        });
        if full {
            self.close_segment()?;
        }
        let segment = self.open_segment()?;
        let Some(Some(local)) = segment.map.get(packet.interface as usize).copied() else {
            return Err(io::Error::other("packet of an unknown interface"));
        };
        let offset = segment.sink.output().written;
        segment.sink.write_packet(&OutPacket {
            interface: local,
            ..*packet
        })?;
        let length = segment.sink.output().written - offset;
        let interface = &segment.interfaces[local as usize];
        let row = Row {
            timestamp_ns: packet.timestamp_ns,
            interface: local,
            session: interface.session,
            sequence: packet.batch.sequence,
            record: packet.batch.record,
            original_len: packet.original_len,
            offset,
            length: u32::try_from(length).unwrap_or(u32::MAX),
            headers: Headers::of(interface.link_type, packet.data),
            process: segment.process(packet.process.map(|a| &a.process)),
        };
        segment.keys.write_all(&row_key(&row))?;
        segment.rows.push(row);
        Ok(())
    }

    fn write_secrets(&mut self, interface: u32, lines: &[u8]) -> io::Result<bool> {
        let segment = self.open_segment()?;
        match segment.map.get(interface as usize).copied().flatten() {
            Some(local) => {
                let from = segment.sink.output().written;
                let kept = segment.sink.write_secrets(local, lines)?;
                segment.secrets_written_since(from);
                Ok(kept)
            }
            None => Ok(false),
        }
    }

    fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()> {
        match &mut self.segment {
            Some(s) => match s.map.get(interface as usize).copied().flatten() {
                Some(local) => s.sink.write_stats(local, stats),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let Some(segment) = &mut self.segment else {
            return Ok(());
        };
        segment.flush()?;
        if segment.opened.elapsed() >= self.segment_time {
            self.close_segment()?;
        }
        Ok(())
    }

    fn close_interfaces(&mut self, interfaces: &[u32]) {
        for &i in interfaces {
            if let Some(entry) = self.interfaces.get_mut(i as usize) {
                entry.1 = true;
            }
        }
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.close_segment()?;
        // No segment follows: what still waits had no packets here (counted, as a file's).
        self.carried.give_up();
        Ok(())
    }
}

impl LakeHandle {
    /// Waits up to `timeout` for the staged segments to be published, or until `give_up`.
    pub async fn close(
        self,
        timeout: Duration,
        give_up: impl std::future::Future<Output = ()>,
    ) -> LakeSummary {
        let mut worker = self.worker;
        let mut finished = true;
        tokio::select! {
            _ = &mut worker => {}
            _ = tokio::time::sleep(timeout) => { worker.abort(); finished = false; }
            _ = give_up => { worker.abort(); finished = false; }
        }
        let c = &self.counters;
        LakeSummary {
            url: self.url,
            segments: c.segments.load(Relaxed),
            bytes: c.bytes.load(Relaxed),
            failed_attempts: c.failed_attempts.load(Relaxed),
            deleted: c.deleted.load(Relaxed),
            staged: c.staged.load(Relaxed),
            finished,
        }
    }
}

/// What the lake output did, for the exit summary.
pub struct LakeSummary {
    pub url: String,
    pub segments: u64,
    pub bytes: u64,
    pub failed_attempts: u64,
    pub deleted: u64,
    /// Segments left staged (published by the next run).
    pub staged: u64,
    pub finished: bool,
}

impl LakeSummary {
    pub fn line(&self) -> String {
        let mut line = format!(
            "lake {}: {} segment(s) published ({} bytes), {} deleted by --lake-keep, {} \
             failed attempt(s)",
            self.url, self.segments, self.bytes, self.deleted, self.failed_attempts
        );
        if !self.finished || self.staged > 0 {
            line += "; segments left staged are published by the next run";
        }
        line
    }
}

/// Copies staged segments into the lake in order, retrying each until the store takes it;
/// one whose staged files cannot be read stays staged (counted, logged) and the next go on.
async fn publish(
    lake: Lake,
    staging: PathBuf,
    receiver: String,
    keep: Option<Keep>,
    mut stems: mpsc::UnboundedReceiver<String>,
    counters: Arc<Counters>,
) {
    while let Some(stem) = stems.recv().await {
        counters.staged.fetch_add(1, Relaxed);
        let mut retry = STORE_RETRY;
        let mut failures = 0u32;
        loop {
            match publish_one(&lake, &staging, &receiver, &stem).await {
                Ok(bytes) => {
                    counters.segments.fetch_add(1, Relaxed);
                    counters.bytes.fetch_add(bytes, Relaxed);
                    counters.staged.fetch_sub(1, Relaxed);
                    tracing::debug!("published segment {stem} to {}", lake.url);
                    break;
                }
                // The staged files themselves fail: trying again cannot help, and the
                // segments after it must not wait behind it.
                Err(e @ PublishError::Local(_)) => {
                    counters.failed_attempts.fetch_add(1, Relaxed);
                    tracing::error!(
                        "cannot publish segment {stem} to {}: {e}; it stays in {} for the next \
                         run",
                        lake.url,
                        staging.display()
                    );
                    break;
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::warn!(
                            "cannot publish segment {stem} to {}, retrying: {e}",
                            lake.url
                        );
                    }
                    failures += 1;
                    counters.failed_attempts.fetch_add(1, Relaxed);
                    tokio::time::sleep(retry.delay()).await;
                }
            }
        }
        if let Some(keep) = keep {
            match lake.retain(&receiver, keep).await {
                Ok(n) => {
                    counters.deleted.fetch_add(n as u64, Relaxed);
                }
                Err(e) => tracing::warn!("--lake-keep: cannot delete old segments: {e}"),
            }
        }
    }
}

/// Copies one staged segment (its manifest last), then removes it from staging.
async fn publish_one(
    lake: &Lake,
    staging: &Path,
    receiver: &str,
    stem: &str,
) -> Result<u64, PublishError> {
    let manifest_path = staging.join(format!("{stem}{}", ::lake::layout::MANIFEST_SUFFIX));
    let manifest_bytes = fs::read(&manifest_path)?;
    let manifest = Manifest::from_bytes(&manifest_bytes).map_err(io::Error::other)?;
    let started = started_at(stem).unwrap_or_else(SystemTime::now);
    let dir = lake.segment_dir(receiver, started);
    let mut bytes = 0;
    for name in [&manifest.segment, &manifest.index] {
        let data = Bytes::from(fs::read(staging.join(name))?);
        bytes += data.len() as u64;
        lake.put(&dir.clone().join(name.as_str()), data).await?;
    }
    let name = format!("{stem}{}", ::lake::layout::MANIFEST_SUFFIX);
    lake.put(&dir.join(name.as_str()), Bytes::from(manifest_bytes))
        .await?;
    remove_staged(staging, stem);
    let _ = fs::remove_file(&manifest_path);
    Ok(bytes)
}

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("reading the staged segment: {0}")]
    Local(#[from] io::Error),
    #[error("{0}")]
    Store(#[from] object_store::Error),
}

/// When the segment `stem` (`RECEIVER-NS`) was started.
fn started_at(stem: &str) -> Option<SystemTime> {
    let ns: u64 = stem.rsplit_once('-')?.1.parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
}

/// A closed segment, for its index and manifest.
struct Closed<'a> {
    stem: &'a str,
    rows: &'a mut [Row],
    interfaces: Vec<Interface>,
    processes: &'a [Process],
    secrets: Vec<Range<u64>>,
    segment_bytes: u64,
    /// When it was closed: the end of its time range if it holds no packet.
    closed: SystemTime,
}

fn epoch_ns(t: SystemTime) -> u64 {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// Writes the index and the manifest of a closed segment in staging.
fn finish_staged(staging: &Path, receiver: &str, segment: Closed<'_>) -> io::Result<()> {
    let Closed {
        stem,
        rows,
        interfaces,
        processes,
        secrets,
        segment_bytes,
        closed,
    } = segment;
    rows.sort_by_key(|r| r.timestamp_ns);
    // Keys only: no packet dates the segment, the receiver's clock does (started, closed).
    let (first_ns, last_ns) = match (rows.first(), rows.last()) {
        (Some(first), Some(last)) => (first.timestamp_ns, last.timestamp_ns),
        _ => (
            epoch_ns(started_at(stem).unwrap_or(closed)),
            epoch_ns(closed),
        ),
    };
    let index = index::write(rows, &interfaces, processes).map_err(io::Error::other)?;
    let index_name = format!("{stem}.parquet");
    program::private_file::write(&staging.join(&index_name), &index)?;
    let manifest = Manifest {
        version: manifest::VERSION,
        receiver: receiver.to_string(),
        segment: format!("{stem}.pcapng"),
        index: index_name,
        first_ns,
        last_ns,
        packets: rows.len() as u64,
        segment_bytes,
        index_bytes: index.len() as u64,
        interfaces,
        secrets,
    };
    program::private_file::write(
        &staging.join(format!("{stem}{}", ::lake::layout::MANIFEST_SUFFIX)),
        &manifest.to_bytes(),
    )
}

/// The staged segments to publish, those an earlier run left unfinished finished first:
/// cut to their last whole packet, their index rebuilt from the `.rows` file.
fn recover(staging: &Path, receiver: &str) -> io::Result<Vec<String>> {
    let mut stems = Vec::new();
    for entry in fs::read_dir(staging)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".pcapng") {
            stems.push(stem.to_string());
        } else if name.starts_with('.') && name.ends_with(".tmp") {
            // An index or manifest an earlier run was killed writing (program::private_file
            // writes beside its target, then renames): the segment is finished again below.
            let _ = fs::remove_file(staging.join(&name));
        }
    }
    stems.sort();
    let mut ready = Vec::new();
    for stem in stems {
        let manifest = staging.join(format!("{stem}{}", ::lake::layout::MANIFEST_SUFFIX));
        if manifest.exists() {
            ready.push(stem);
            continue;
        }
        match recover_one(staging, receiver, &stem) {
            Ok(true) => ready.push(stem),
            Ok(false) => remove_staged(staging, &stem),
            Err(e) => tracing::warn!(
                "cannot recover the staged segment {}: {e}; it stays there",
                staging.join(format!("{stem}.pcapng")).display()
            ),
        }
    }
    Ok(ready)
}

/// Finishes one segment a crash left staged; false if it holds no packet and no key log
/// line.
fn recover_one(staging: &Path, receiver: &str, stem: &str) -> io::Result<bool> {
    let path = staging.join(format!("{stem}.pcapng"));
    let mut segment = Vec::new();
    File::open(&path)?.read_to_end(&mut segment)?;
    let whole = ::lake::pcapng::whole_blocks_len(&segment);
    let interfaces: Vec<Interface> = match fs::read(staging.join(format!("{stem}.interfaces.json")))
    {
        Ok(text) => serde_json::from_slice(&text).map_err(io::Error::other)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let keys = fs::read(staging.join(format!("{stem}.rows"))).unwrap_or_default();
    let mut rows = Vec::new();
    for key in keys.chunks_exact(ROW_KEY_LEN) {
        let mut row = from_row_key(key);
        let end = row.offset + u64::from(row.length);
        if end > whole as u64 {
            break;
        }
        let block = &segment[row.offset as usize..end as usize];
        let (Some(packet), Some(interface)) = (
            ::lake::pcapng::packet(block),
            interfaces.get(row.interface as usize),
        ) else {
            break;
        };
        row.headers = Headers::of(interface.link_type, packet.data);
        rows.push(row);
    }
    let secrets = ::lake::pcapng::secrets_ranges(&segment[..whole]);
    // Cut after the last packet with its key, or the last key log block if later: a packet
    // without its key was never acknowledged, while key log lines need no key and may have
    // been. Lines that were not come again from the sensor, and a query reads each once; a
    // packet left before them without its key is in no index.
    let end = rows
        .last()
        .map(|r| r.offset + u64::from(r.length))
        .max(secrets.last().map(|r| r.end));
    let Some(end) = end else {
        return Ok(false);
    };
    let file = fs::OpenOptions::new().write(true).open(&path)?;
    let closed = file.metadata()?.modified()?;
    file.set_len(end)?;
    file.sync_data()?;
    finish_staged(
        staging,
        receiver,
        Closed {
            stem,
            rows: &mut rows,
            interfaces,
            processes: &[],
            secrets,
            segment_bytes: end,
            closed,
        },
    )?;
    Ok(true)
}

fn row_key(row: &Row) -> [u8; ROW_KEY_LEN] {
    let mut key = [0u8; ROW_KEY_LEN];
    key[0..8].copy_from_slice(&row.timestamp_ns.to_le_bytes());
    key[8..16].copy_from_slice(&row.session.to_le_bytes());
    key[16..24].copy_from_slice(&row.sequence.to_le_bytes());
    key[24..32].copy_from_slice(&row.offset.to_le_bytes());
    key[32..36].copy_from_slice(&row.interface.to_le_bytes());
    key[36..40].copy_from_slice(&row.record.to_le_bytes());
    key[40..44].copy_from_slice(&row.original_len.to_le_bytes());
    key[44..48].copy_from_slice(&row.length.to_le_bytes());
    key
}

fn from_row_key(key: &[u8]) -> Row {
    let u64_at = |at: usize| u64::from_le_bytes(key[at..at + 8].try_into().unwrap_or_default());
    let u32_at = |at: usize| u32::from_le_bytes(key[at..at + 4].try_into().unwrap_or_default());
    Row {
        timestamp_ns: u64_at(0),
        session: u64_at(8),
        sequence: u64_at(16),
        offset: u64_at(24),
        interface: u32_at(32),
        record: u32_at(36),
        original_len: u32_at(40),
        length: u32_at(44),
        headers: Headers::default(),
        process: None,
    }
}

/// Removes a segment's staged files but its manifest.
fn remove_staged(staging: &Path, stem: &str) {
    for ext in ["pcapng", "rows", "interfaces.json", "parquet"] {
        let _ = fs::remove_file(staging.join(format!("{stem}.{ext}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::testing;
    use ::lake::pcapng::{scan, secrets_ranges, Output};
    use ::lake::query::{Progress, Query};
    use protocol::Direction;

    struct Quiet;

    impl Progress for Quiet {
        fn segments(&mut self, _total: usize) {}
        fn segment_done(&mut self, _bytes: u64) {}
        fn warn(&mut self, message: &str) {
            panic!("{message}");
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("capstream-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("lake")).unwrap();
        dir
    }

    fn open(dir: &Path, segment_time: Duration) -> (LakeSink, LakeHandle, Lake) {
        let lake = Lake::local(&dir.join("lake")).unwrap();
        let (sink, handle) = LakeSink::open(LakeConfig {
            lake: lake.clone(),
            receiver: "rx1".into(),
            staging: dir.join("staging"),
            segment_size: 1 << 20,
            segment_time,
            keep: None,
        })
        .unwrap();
        (sink, handle, lake)
    }

    fn key_line(random: u8) -> String {
        format!(
            "CLIENT_RANDOM {} {}\n",
            format!("{random:02x}").repeat(32),
            "ab".repeat(48)
        )
    }

    /// Key lines in a segment that gets no packet are published in a segment of their own
    /// (packets 0, the ranges of its blocks in the manifest); the next segment starts with
    /// them too (their ClientHello has not come); a query's answer holds each line once,
    /// ahead of the packet.
    #[tokio::test]
    async fn a_segment_of_keys_only_is_published_and_its_keys_answered() {
        let dir = scratch("lake-keys-only");
        // Every packet finds its segment due: the keys' segment is closed before it.
        let (mut sink, handle, lake) = open(&dir, Duration::ZERO);
        let i = sink
            .add_interface(&testing::interface("h/eth0", 1, ""))
            .unwrap();
        let line = key_line(7);
        assert!(sink.write_secrets(i, line.as_bytes()).unwrap());
        sink.write_packet(&OutPacket {
            interface: i,
            timestamp_ns: epoch_ns(SystemTime::now()),
            original_len: 20,
            direction: Direction::Unknown,
            data: &[9u8; 20],
            process: None,
            batch: Default::default(),
        })
        .unwrap();
        Box::new(sink).finish().unwrap();
        let summary = handle
            .close(Duration::from_secs(10), std::future::pending())
            .await;
        assert_eq!(summary.segments, 2);
        let listing = lake.list().await.unwrap();
        let mut manifests: Vec<&Manifest> = listing.segments.iter().map(|s| &s.manifest).collect();
        manifests.sort_by_key(|m| m.packets);
        let (keys_only, with_packet) = (manifests[0], manifests[1]);
        assert_eq!((keys_only.packets, keys_only.secrets.len()), (0, 1));
        assert!(keys_only.first_ns > 0 && keys_only.first_ns <= keys_only.last_ns);
        assert_eq!((with_packet.packets, with_packet.secrets.len()), (1, 1));

        let mut out = Output::pcapng(Vec::new()).unwrap();
        let query = Query {
            from: 0,
            to: u64::MAX,
            sensors: Vec::new(),
            filter: String::new(),
        };
        let stats = ::lake::query::run(&lake, &query, &mut out, &mut Quiet)
            .await
            .unwrap();
        assert_eq!((stats.key_lines, stats.matched), (1, 1), "{}", stats.line());
        let Output::Pcapng { out: answer, .. } = out else {
            unreachable!()
        };
        let blocks = secrets_ranges(&answer);
        let packets = scan(&answer);
        assert_eq!((blocks.len(), packets.len()), (1, 1));
        assert!(blocks[0].end <= packets[0].offset, "the key first");
        let dsb = &answer[blocks[0].start as usize..blocks[0].end as usize];
        assert_eq!(::lake::pcapng::secrets(dsb), Some(line.as_bytes()));

        // Classic pcap has no place for them: counted.
        let mut out = Output::pcap(Vec::new());
        let stats = ::lake::query::run(&lake, &query, &mut out, &mut Quiet)
            .await
            .unwrap();
        assert_eq!((stats.key_lines, stats.key_lines_not_written), (0, 1));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A segment a killed receiver left staged with key lines and no packet is recovered
    /// with them: its blocks found by the block walker, a block cut short cut off.
    #[tokio::test]
    async fn recovery_keeps_the_keys_of_a_staged_segment() {
        let dir = scratch("lake-keys-recover");
        let (mut sink, handle, _) = open(&dir, Duration::from_secs(3600));
        let i = sink
            .add_interface(&testing::interface("h/eth0", 1, ""))
            .unwrap();
        for random in [1, 2] {
            sink.write_secrets(i, key_line(random).as_bytes()).unwrap();
        }
        sink.flush().unwrap();
        let stem = sink.segment.as_ref().unwrap().stem.clone();
        let written = sink.segment.as_ref().unwrap().secrets.clone();
        // Killed: nothing closed, and half a block more in the file.
        drop(sink);
        drop(handle);
        let staging = dir.join("staging");
        let path = staging.join(format!("{stem}.pcapng"));
        let whole = fs::metadata(&path).unwrap().len();
        let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0x0a, 0, 0, 0, 64, 0]).unwrap();
        drop(file);

        assert_eq!(
            recover(&staging, "rx1").unwrap(),
            std::slice::from_ref(&stem)
        );
        let manifest = Manifest::from_bytes(
            &fs::read(staging.join(format!("{stem}{}", ::lake::layout::MANIFEST_SUFFIX))).unwrap(),
        )
        .unwrap();
        assert_eq!(manifest.packets, 0);
        assert_eq!(manifest.secrets, written);
        assert_eq!(written.len(), 2);
        assert_eq!(manifest.segment_bytes, whole);
        assert_eq!(fs::metadata(&path).unwrap().len(), whole);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// What a run killed while writing an index or a manifest leaves beside it (a temporary
    /// file named by its process) is removed by the next run's recovery; a segment without
    /// its description holds nothing to publish and goes too.
    #[test]
    fn recovery_removes_what_a_killed_write_left() {
        let staging =
            std::env::temp_dir().join(format!("capstream-lake-staging-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).unwrap();
        let left = [
            ".rx1-1.parquet.4242.0.tmp",
            ".rx1-1.manifest.json.4242.1.tmp",
        ];
        for name in left {
            fs::write(staging.join(name), b"half").unwrap();
        }
        fs::write(staging.join("rx1-1.pcapng"), b"").unwrap();
        assert!(recover(&staging, "rx1").unwrap().is_empty());
        let rest: Vec<_> = fs::read_dir(&staging).unwrap().collect();
        assert!(rest.is_empty(), "{rest:?}");
        fs::remove_dir_all(&staging).unwrap();
    }
}
