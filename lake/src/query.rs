//! `receiver query`: the packets of a time range (and sensors) that match a tcpdump filter,
//! from every segment of the lake, without duplicates, in time order.
//!
//! Segments are pruned by their manifests' time ranges and sensors, index row groups by
//! their time statistics; the rows left give the byte ranges to fetch (coalesced into
//! few requests); libpcap's offline filter decides on each packet, so that the answer is
//! what `tcpdump -r` over the whole lake would give.
//!
//! The TLS key log lines of every segment read for the time range (those without a
//! matching packet too: a session's keys may sit in the segment before its packets) go
//! ahead of all the answer's packets, each line once, from the Decryption Secrets Blocks
//! fetched by the ranges the manifests list.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::ops::Range;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};

use crate::index::{self, BatchKey, Candidate, IndexError};
use crate::layout::{Lake, Listed};
use crate::pcapng::{self, Output};
use crate::prune::Constraints;
use parquet::errors::ParquetError;
use parquet::file::metadata::{FooterTail, ParquetMetaDataReader};

/// Ranges closer than this are fetched as one request: a gap costs less than a request.
const COALESCE_GAP: u64 = 8 << 10;
/// Range requests in flight at once.
const REQUESTS_IN_FLIGHT: usize = 8;
/// Largest single request of coalesced ranges.
const MAX_REQUEST: u64 = 16 << 20;
/// Key log blocks closer than this are fetched as one request: narrower than for packets,
/// as the bytes between two blocks are packets the query may not want.
const SECRETS_COALESCE_GAP: u64 = 1 << 10;

/// What a query asks for.
pub struct Query {
    /// Nanoseconds since the epoch, both inclusive.
    pub from: u64,
    pub to: u64,
    /// Only these sensors' packets (none: all).
    pub sensors: Vec<String>,
    /// A tcpdump filter (empty: every packet).
    pub filter: String,
}

/// What the query did, for `--stats`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub segments: usize,
    pub segments_pruned: usize,
    pub segments_read: usize,
    /// Read whole, their index missing or unreadable.
    pub segments_scanned: usize,
    pub row_groups_pruned: usize,
    pub bytes_fetched: u64,
    pub lake_bytes: u64,
    pub candidates: u64,
    pub matched: u64,
    pub duplicates: u64,
    /// TLS key log lines in the answer (each once).
    pub key_lines: u64,
    /// TLS key log lines the answer's format has no place for (classic pcap).
    pub key_lines_not_written: u64,
    /// Key blocks listed in a manifest that could not be read (damaged or past the
    /// segment's end): their lines are not in the answer.
    pub key_blocks_unreadable: u64,
}

impl Stats {
    pub fn line(&self) -> String {
        format!(
            "{} segment(s): {} pruned, {} read ({} scanned without index); {} row group(s) \
             pruned; {} of {} bytes fetched; {} candidate(s), {} packet(s) matched, {} \
             duplicate(s) dropped; {} TLS key log line(s) written, {} not written, {} key \
             block(s) unreadable",
            self.segments,
            self.segments_pruned,
            self.segments_read,
            self.segments_scanned,
            self.row_groups_pruned,
            self.bytes_fetched,
            self.lake_bytes,
            self.candidates,
            self.matched,
            self.duplicates,
            self.key_lines,
            self.key_lines_not_written,
            self.key_blocks_unreadable
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot read the lake {url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("bad filter {filter:?}: {why}")]
    Filter { filter: String, why: String },
    #[error("cannot write the answer: {0}")]
    Write(#[from] std::io::Error),
}

/// Checks a filter as libpcap compiles it for Ethernet: said before anything is read.
pub fn check_filter(filter: &str) -> Result<(), QueryError> {
    Filters::new(filter).program(1).map(drop)
}

/// Compiled filters, one per link type.
struct Filters {
    filter: String,
    programs: HashMap<u16, Option<pcap::BpfProgram>>,
}

impl Filters {
    fn new(filter: &str) -> Self {
        Self {
            filter: filter.trim().to_string(),
            programs: HashMap::new(),
        }
    }

    fn program(&mut self, link_type: u16) -> Result<Option<&pcap::BpfProgram>, QueryError> {
        if self.filter.is_empty() {
            return Ok(None);
        }
        if !self.programs.contains_key(&link_type) {
            let bad = |why: String| QueryError::Filter {
                filter: self.filter.clone(),
                why,
            };
            let dead = pcap::Capture::dead(pcap::Linktype(i32::from(link_type)))
                .map_err(|e| bad(e.to_string()))?;
            let program = dead
                .compile(&self.filter, true)
                .map_err(|e| bad(e.to_string()))?;
            self.programs.insert(link_type, Some(program));
        }
        Ok(self.programs.get(&link_type).and_then(Option::as_ref))
    }

    fn matches(&mut self, link_type: u16, data: &[u8]) -> Result<bool, QueryError> {
        Ok(self.program(link_type)?.is_none_or(|p| p.filter(data)))
    }
}

/// A packet of the answer, held until all are in and sorted.
struct Found {
    timestamp_ns: u64,
    /// Segment order, then place in it: ties in time keep the order written.
    order: (usize, u64),
    interface: u32,
    block: Bytes,
}

/// What a query reports as it goes (segments done of all), and warnings.
pub trait Progress {
    fn segments(&mut self, total: usize);
    fn segment_done(&mut self, bytes: u64);
    fn warn(&mut self, message: &str);
}

/// Runs `query` over `lake`, writing the answer to `out`.
pub async fn run<W: Write>(
    lake: &Lake,
    query: &Query,
    out: &mut Output<W>,
    progress: &mut dyn Progress,
) -> Result<Stats, QueryError> {
    let store_error = |source| QueryError::Store {
        url: lake.url.clone(),
        source,
    };
    let mut filters = Filters::new(&query.filter);
    let constraints = Constraints::of(&query.filter);
    let listing = lake.list().await.map_err(store_error)?;
    for (path, why) in &listing.unreadable {
        progress.warn(&format!("ignoring manifest {path}: {why}"));
    }
    let mut stats = Stats {
        segments: listing.segments.len(),
        lake_bytes: listing
            .segments
            .iter()
            .map(|s| s.manifest.segment_bytes + s.manifest.index_bytes)
            .sum(),
        ..Stats::default()
    };
    let mut wanted: Vec<&Listed> = listing
        .segments
        .iter()
        .filter(|s| {
            let m = &s.manifest;
            m.last_ns >= query.from
                && m.first_ns <= query.to
                && (query.sensors.is_empty()
                    || m.interfaces
                        .iter()
                        .any(|i| query.sensors.contains(&i.sensor)))
        })
        .collect();
    // In order of their first packets: what is older than the next segment's first packet
    // is final, and written out before that segment is read (the answer streams; only the
    // packets of overlapping segments are held).
    wanted.sort_by_key(|s| s.manifest.first_ns);
    stats.segments_pruned = stats.segments - wanted.len();
    progress.segments(wanted.len());
    // Output interfaces by (sensor, name, link type, session): one block per sensor
    // interface, however many segments and receivers it spans.
    let mut interfaces: HashMap<(String, String, u16, u64), u32> = HashMap::new();
    let mut seen: HashSet<BatchKey> = HashSet::new();
    let mut found: Vec<Found> = Vec::new();
    write_key_lines(lake, &wanted, out, &mut stats, progress).await?;
    for (order, segment) in wanted.iter().enumerate() {
        let m = &segment.manifest;
        stats.matched += write_older(&mut found, m.first_ns, out)?;
        if m.packets == 0 {
            // Keys only (written above): no index to read.
            stats.segments_read += 1;
            progress.segment_done(0);
            continue;
        }
        let before = stats.bytes_fetched;
        let indexed = match fetch_index(lake, &segment.index_path(), query, &constraints).await {
            Ok(Ok((sparse, fetched))) => {
                stats.bytes_fetched += fetched;
                index::read(sparse, query.from, query.to, m.segment_bytes, &constraints)
                    .map_err(|e| e.to_string())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(object_store::Error::NotFound { .. }) => Err("it is missing".to_string()),
            Err(e) => return Err(store_error(e)),
        };
        let (candidates, blocks) = match indexed {
            Ok((candidates, skipped)) => {
                stats.row_groups_pruned += skipped;
                let candidates: Vec<Candidate> = candidates
                    .into_iter()
                    .filter(|c| wanted_interface(query, segment, c.interface))
                    .collect();
                let ranges: Vec<Range<u64>> = candidates
                    .iter()
                    .map(|c| c.offset..c.offset + u64::from(c.length))
                    .collect();
                let (blocks, fetched) = fetch(lake, segment, &ranges, COALESCE_GAP)
                    .await
                    .map_err(store_error)?;
                stats.bytes_fetched += fetched;
                (candidates, blocks)
            }
            Err(why) => {
                progress.warn(&format!(
                    "the index of segment {} cannot be used ({why}): scanning the segment",
                    segment.segment_path()
                ));
                stats.segments_scanned += 1;
                let whole = lake
                    .get(&segment.segment_path())
                    .await
                    .map_err(store_error)?;
                stats.bytes_fetched += whole.len() as u64;
                let candidates: Vec<Candidate> = pcapng::scan(&whole)
                    .into_iter()
                    .filter(|c| c.timestamp_ns >= query.from && c.timestamp_ns <= query.to)
                    .filter(|c| wanted_interface(query, segment, c.interface))
                    .collect();
                let blocks = candidates
                    .iter()
                    .map(|c| {
                        whole.slice(c.offset as usize..(c.offset + u64::from(c.length)) as usize)
                    })
                    .collect();
                (candidates, blocks)
            }
        };
        stats.segments_read += 1;
        stats.candidates += candidates.len() as u64;
        for (c, block) in candidates.iter().zip(blocks) {
            let Some(packet) = pcapng::packet(&block) else {
                progress.warn(&format!(
                    "segment {} holds no packet at byte {}: skipped",
                    segment.segment_path(),
                    c.offset
                ));
                continue;
            };
            let Some(interface) = m.interfaces.get(packet.interface as usize) else {
                continue;
            };
            if !filters.matches(interface.link_type, packet.data)? {
                continue;
            }
            // Only indexed packets carry their batch's key; a scanned segment's are kept.
            if c.key.is_some_and(|key| !seen.insert(key)) {
                stats.duplicates += 1;
                continue;
            }
            let key = (
                interface.sensor.clone(),
                interface.name.clone(),
                interface.link_type,
                interface.session,
            );
            let next = interfaces.len() as u32;
            let out_interface = match interfaces.get(&key) {
                Some(&i) => i,
                None => {
                    out.add_interface(&interface.name, interface.link_type, interface.snaplen)?;
                    interfaces.insert(key, next);
                    next
                }
            };
            found.push(Found {
                timestamp_ns: packet.timestamp_ns,
                order: (order, c.offset),
                interface: out_interface,
                block: block.clone(),
            });
        }
        progress.segment_done(stats.bytes_fetched - before);
    }
    stats.matched += write_older(&mut found, u64::MAX, out)?;
    let link_type = listing
        .segments
        .iter()
        .find_map(|s| s.manifest.interfaces.first())
        .map_or(1, |i| i.link_type);
    out.complete(link_type)?;
    Ok(stats)
}

/// Writes, in time order, the packets of `found` older than `before` and drops them;
/// returns how many.
fn write_older<W: Write>(
    found: &mut Vec<Found>,
    before: u64,
    out: &mut Output<W>,
) -> Result<u64, QueryError> {
    found.sort_by_key(|f| (f.timestamp_ns, f.order));
    let older = found.partition_point(|f| f.timestamp_ns < before);
    for f in found.drain(..older) {
        if let Some(packet) = pcapng::packet(&f.block) {
            out.write(f.interface, &packet)?;
        }
    }
    Ok(older as u64)
}

/// Bytes fetched from the end of an index first: its footer, usually whole.
const INDEX_TAIL: u64 = 64 << 10;

/// What of the index at `path` the query reads: its footer, then the column chunks of the
/// row groups its statistics allow (see [`index::Plan`]); and the bytes fetched. The outer
/// error is the store's, the inner one says the index cannot be used.
async fn fetch_index(
    lake: &Lake,
    path: &object_store::path::Path,
    query: &Query,
    constraints: &Constraints,
) -> Result<Result<(index::Sparse, u64), IndexError>, object_store::Error> {
    let len = lake.size(path).await?;
    if len < 12 {
        return Ok(Err(IndexError::Parquet(ParquetError::EOF(
            "shorter than a Parquet footer".into(),
        ))));
    }
    let tail_start = len - INDEX_TAIL.min(len);
    let mut tail = lake.get_range(path, tail_start..len).await?;
    let mut tail_start = tail_start;
    let mut fetched = tail.len() as u64;
    let footer = tail.get(tail.len().saturating_sub(8)..).unwrap_or_default();
    let metadata_len = match FooterTail::try_from(footer) {
        Ok(tail) => tail.metadata_length() as u64,
        Err(e) => return Ok(Err(e.into())),
    };
    if metadata_len + 8 > len {
        return Ok(Err(IndexError::OutOfRange));
    }
    if metadata_len + 8 > tail.len() as u64 {
        tail_start = len - metadata_len - 8;
        tail = lake.get_range(path, tail_start..len).await?;
        fetched += tail.len() as u64;
    }
    let metadata = tail
        .len()
        .checked_sub(8 + metadata_len as usize)
        .and_then(|start| tail.get(start..tail.len() - 8));
    let Some(metadata) = metadata else {
        return Ok(Err(IndexError::OutOfRange));
    };
    let plan = ParquetMetaDataReader::decode_metadata(metadata)
        .map_err(IndexError::from)
        .and_then(|metadata| {
            let plan = index::Plan::new(&metadata, query.from, query.to, constraints)?;
            Ok(plan.ranges(&metadata))
        });
    let ranges: Vec<Range<u64>> = match plan {
        // What the tail holds already is not fetched again.
        Ok(ranges) => ranges
            .into_iter()
            .filter(|r| r.start < tail_start)
            .collect(),
        Err(e) => return Ok(Err(e)),
    };
    if ranges.iter().any(|r| r.end > len) {
        return Ok(Err(IndexError::OutOfRange));
    }
    let chunks = lake.get_ranges(path, &ranges).await?;
    fetched += ranges.iter().map(|r| r.end - r.start).sum::<u64>();
    let mut parts = vec![(tail_start, tail)];
    parts.extend(ranges.iter().map(|r| r.start).zip(chunks));
    Ok(Ok((index::Sparse { len, parts }, fetched)))
}

fn wanted_interface(query: &Query, segment: &Listed, interface: u32) -> bool {
    query.sensors.is_empty()
        || segment
            .manifest
            .interfaces
            .get(interface as usize)
            .is_some_and(|i| query.sensors.contains(&i.sensor))
}

/// Writes the TLS key log lines of the segments `wanted`, each once, in one block, ahead
/// of every packet: a key must precede the packets it decrypts, and a segment's keys may
/// be for another's packets (the next segment's, another receiver's after a failover),
/// whose times say nothing of where the keys belong. Classic pcap holds none: counted.
async fn write_key_lines<W: Write>(
    lake: &Lake,
    wanted: &[&Listed],
    out: &mut Output<W>,
    stats: &mut Stats,
    progress: &mut dyn Progress,
) -> Result<(), QueryError> {
    let fetched: Vec<SegmentKeys> = futures_util::stream::iter(wanted)
        .map(|segment| fetch_key_lines(lake, segment))
        .buffered(REQUESTS_IN_FLIGHT)
        .try_collect()
        .await
        .map_err(|source| QueryError::Store {
            url: lake.url.clone(),
            source,
        })?;
    let mut seen: HashSet<&[u8]> = HashSet::new();
    let mut lines = Vec::new();
    for (segment, keys) in wanted.iter().zip(&fetched) {
        stats.bytes_fetched += keys.fetched;
        stats.key_blocks_unreadable += keys.unreadable.len() as u64;
        for at in &keys.unreadable {
            progress.warn(&format!(
                "segment {}: no TLS key log at byte {at}: skipped",
                segment.segment_path()
            ));
        }
        for line in keys.lines.split_inclusive(|&b| b == b'\n') {
            if seen.insert(line) {
                lines.extend_from_slice(line);
            }
        }
    }
    let count = seen.len() as u64;
    if count > 0 {
        if out.write_secrets(&lines)? {
            stats.key_lines = count;
        } else {
            stats.key_lines_not_written = count;
        }
    }
    Ok(())
}

/// What a segment's key log blocks hold.
struct SegmentKeys {
    /// The lines, as they are in the blocks.
    lines: Vec<u8>,
    /// Where a listed range holds no key log block (or lies past the segment's end).
    unreadable: Vec<u64>,
    fetched: u64,
}

/// The key log lines of `segment`'s Decryption Secrets Blocks, fetched by the ranges its
/// manifest lists.
async fn fetch_key_lines(
    lake: &Lake,
    segment: &Listed,
) -> Result<SegmentKeys, object_store::Error> {
    let m = &segment.manifest;
    // A range past the segment's end (a damaged manifest) would fail the whole request.
    let (ranges, past_end): (Vec<Range<u64>>, Vec<Range<u64>>) = m
        .secrets
        .iter()
        .cloned()
        .partition(|r| r.start < r.end && r.end <= m.segment_bytes);
    let mut unreadable: Vec<u64> = past_end.iter().map(|r| r.start).collect();
    let (blocks, fetched) = fetch(lake, segment, &ranges, SECRETS_COALESCE_GAP).await?;
    let mut lines = Vec::new();
    for (range, block) in ranges.iter().zip(blocks) {
        match pcapng::secrets(&block) {
            Some(text) => {
                lines.extend_from_slice(text);
                // Lines are taken one by one later: a last one without its newline stays
                // apart from the next block's first.
                if !text.is_empty() && !text.ends_with(b"\n") {
                    lines.push(b'\n');
                }
            }
            None => unreadable.push(range.start),
        }
    }
    Ok(SegmentKeys {
        lines,
        unreadable,
        fetched,
    })
}

/// The blocks at `ranges` of the segment, fetched as few requests (ranges less than `gap`
/// apart coalesced); also the bytes those requests fetched.
async fn fetch(
    lake: &Lake,
    segment: &Listed,
    ranges: &[Range<u64>],
    gap: u64,
) -> Result<(Vec<Bytes>, u64), object_store::Error> {
    if ranges.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut merged: Vec<Range<u64>> = Vec::new();
    let mut sorted: Vec<Range<u64>> = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end + gap && r.end - last.start <= MAX_REQUEST => {
                last.end = last.end.max(r.end);
            }
            _ => merged.push(r),
        }
    }
    let fetched_bytes = merged.iter().map(|r| r.end - r.start).sum();
    // One request per merged range, a few at a time: what is counted is what is fetched
    // (a store's own get_ranges would coalesce again, over wider gaps).
    let path = segment.segment_path();
    let fetched: Vec<Bytes> = futures_util::stream::iter(merged.iter().cloned())
        .map(|r| lake.get_range(&path, r))
        .buffered(REQUESTS_IN_FLIGHT)
        .try_collect()
        .await?;
    let blocks = ranges
        .iter()
        .map(|r| {
            // The merged range holding `r`: the first that ends at or after it.
            let i = merged.partition_point(|m| m.end < r.end);
            fetched[i]
                .slice((r.start - merged[i].start) as usize..(r.end - merged[i].start) as usize)
        })
        .collect();
    Ok((blocks, fetched_bytes))
}
