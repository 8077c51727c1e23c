//! A size-capped on-disk FIFO of batch frames, for batches that do not fit in memory, that
//! outlives the sensor process.
//!
//! The transport keeps the oldest unacknowledged batches in memory (`--buffer`). Newer
//! ones that do not fit are pushed here, in order, and popped back, oldest first, as
//! acknowledgements free memory. When the spool is full too, `push` says so, and the
//! caller decides what becomes of the batch: nothing is lost silently here.
//!
//! The spool is a journal of one sensor (its `--sensor-id`, or hostname): a sensor killed
//! (SIGKILL, OOM, a crash) leaves its segments and a state file, and the next sensor of the
//! same identity adopts them: it resumes the same session (id and secret from the state
//! file), sends what the receiver has not acknowledged, and goes on numbering after the
//! last sequence the old process took. The state file is locked (`flock`) while a sensor
//! uses it, so two sensors never adopt the same segments. Nothing is fsynced: the page
//! cache survives the death of a process, which is what this guards against; a power cut
//! may cost the last seconds, and a torn record is then cut off or counted.
//!
//! Writes land in the page cache, so a push costs the transport task a MAC and a memory
//! copy, and so does a pop while the data is still cached: plain blocking `std::fs` calls
//! are fine here, even from an async task.
//!
//! On disk, in a directory that only its owner may write (0700 when the sensor creates
//! it; a group- or world-writable one is refused), all created 0600 without following
//! symlinks:
//!
//! * `capstream-<identity>.state`: magic `CSS1`, session id u64, session secret (16
//!   bytes), MAC key (32 bytes), last acknowledged sequence u64, last sequence taken u64;
//! * `capstream-<identity>-<segment number>.spool`: the records, each a 30-byte header,
//!   the frame and a 32-byte MAC, all integers little-endian:
//!
//! ```text
//! magic "CSP2" | sequence u64 | interface_id u16 | packets u32 | raw_len u64
//!     | frame_len u32 | frame (frame_len bytes) | HMAC-SHA256 (32 bytes)
//! ```
//!
//! `<identity>` is 16 hex digits of the SHA-256 of the sensor's id. The HMAC, keyed per
//! spool with the key in the 0600 state file, covers the header and the frame:
//! a record that was damaged, cut short or forged (by someone who could write the
//! directory but not read the state file) is refused. Segment files stay open while the
//! spool uses them and are read through their descriptors, never reopened by path.
//!
//! A damaged or missing segment is not fatal: its records are dropped and reported
//! ([`Damaged`]), and the caller counts them and sends empty batches in their place, so
//! that the session has no gap.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};

use program::private_file::open_existing;
use std::io::{self, ErrorKind, IoSlice, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ring::hmac;

/// Where a segment stops taking records. Small enough that consumed space comes back
/// soon, large enough that a 256 KiB batch does not open a file each time.
const SEGMENT_BYTES: u64 = 16 << 20;

const MAGIC: [u8; 4] = *b"CSP2";
const STATE_MAGIC: [u8; 4] = *b"CSS1";
const STATE_LEN: usize = 4 + 8 + 16 + 32 + 8 + 8;
/// Offset of the acknowledged and taken sequences in the state file.
const STATE_SEQUENCES_AT: u64 = 60;
const TAG_LEN: usize = 32;

/// Bytes of the header in front of each frame.
const HEAD_LEN: usize = 30;

/// Bytes of each record besides its frame (header and MAC); they count against the cap as
/// well.
pub const HEADER_LEN: usize = HEAD_LEN + TAG_LEN;

/// A batch as the spool keeps it: its metadata and the encoded frame bytes (opaque).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    pub sequence: u64,
    pub interface_id: u16,
    pub packets: u32,
    pub raw_len: u64,
    pub frame: Bytes,
}

impl Spooled {
    /// What this batch takes on disk, header included: what counts against the cap.
    fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.frame.len() as u64
    }
}

/// What the spool knows of a record without reading it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub sequence: u64,
    pub interface_id: u16,
    pub packets: u32,
    len: u64,
}

/// Records that could not be read back, dropped with their segment.
#[derive(Debug)]
pub struct Damaged {
    pub error: io::Error,
    pub lost: Vec<Meta>,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.lost.len();
        let batches = if n == 1 { "batch" } else { "batches" };
        write!(f, "{}; dropped the {n} {batches} left in it", self.error)
    }
}

/// The session a spool belongs to: resumed from the state file, or new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionKeys {
    pub session_id: u64,
    pub secret: [u8; 16],
}

/// One segment file, open; every segment in `Spool::segments` holds at least one record.
struct Segment {
    path: PathBuf,
    file: File,
    /// Adopted: sequences missing between the previous segment and this one (a segment
    /// deleted, or cut short, while no sensor ran), popped first as empty batches.
    gaps_before: VecDeque<u64>,
    /// The records not yet popped, oldest first.
    records: VecDeque<Meta>,
    /// Offset of the next record to read.
    read_at: u64,
    /// End of the last whole record: where a failed write is cut back to.
    end: u64,
}

/// A size-capped FIFO of batches on disk. See the module documentation.
pub struct Spool {
    dir: PathBuf,
    /// `capstream-<identity>-`: the segment files this spool owns.
    prefix: String,
    state_path: PathBuf,
    /// Locked for as long as the spool is open.
    state: File,
    session: SessionKeys,
    key: hmac::Key,
    /// The last sequence acknowledged and the last taken, as the state file has them.
    acked: u64,
    taken: u64,
    max_bytes: u64,
    segment_bytes: u64,
    next_segment: u64,
    /// Oldest first.
    segments: VecDeque<Segment>,
    /// Whether the back segment takes appends; a sealed one (adopted, or torn) does not.
    appending: bool,
    len: usize,
    bytes: u64,
    /// What was adopted from a previous process, for the caller's accounting.
    adopted: Adopted,
}

/// What a spool took over from a sensor that did not end its session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// Records adopted, and their packets by interface id.
    pub batches: usize,
    pub packets: Vec<u64>,
    /// Sequences the old process took but did not spool or see acknowledged (they were in
    /// its memory): sent as empty batches so that the session has no gap. The older ones
    /// come before the adopted records, the newer ones after them.
    pub lost_before: Vec<u64>,
    pub lost_after: Vec<u64>,
    /// Sequences missing between adopted segments, which the spool pops as empty batches.
    pub lost_between: usize,
}

/// Checks, and creates if missing (0700), a spool directory, before the privileges are
/// given up; returns whether it was created (it is then handed to `--user`). A group- or
/// world-writable directory is refused: anyone who may write it could swap segments.
pub fn prepare_dir(dir: &Path) -> io::Result<bool> {
    let unusable = |e: io::Error| unusable(dir, &e);
    let created = !dir.exists();
    if created {
        // Parents as any directory (others may need to pass through them), the spool
        // directory itself its owner's alone.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            if parent.exists() && !parent.is_dir() {
                return Err(unusable(ErrorKind::NotADirectory.into()));
            }
            fs::create_dir_all(parent).map_err(unusable)?;
        }
        #[cfg_attr(not(unix), allow(unused_mut))]
        let mut builder = fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(unusable)?;
    }
    let meta = fs::metadata(dir).map_err(unusable)?;
    if !meta.is_dir() {
        return Err(unusable(ErrorKind::NotADirectory.into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(io::Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "spool directory {} may be written by others than its owner (mode \
                     {mode:03o}): chmod go-w it, or pass another --spool-dir",
                    dir.display()
                ),
            ));
        }
    }
    Ok(created)
}

impl Spool {
    /// Opens the spool of the sensor named `sensor_id` in `dir` (see [`prepare_dir`]), with
    /// at most `max_bytes` on disk (frames plus per-record headers). A state file left by
    /// a sensor of that name that did not end its session is resumed, with its segments;
    /// otherwise the spool starts empty in session `fresh`.
    pub fn open(
        dir: &Path,
        sensor_id: &str,
        fresh: SessionKeys,
        max_bytes: u64,
    ) -> io::Result<Spool> {
        Self::open_with(dir, sensor_id, fresh, max_bytes, SEGMENT_BYTES)
    }

    /// `Spool::open` with another segment size (the tests use tiny ones).
    fn open_with(
        dir: &Path,
        sensor_id: &str,
        fresh: SessionKeys,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> io::Result<Spool> {
        let unusable = |e: io::Error| unusable(dir, &e);
        let identity = identity(sensor_id);
        let state_path = dir.join(format!("capstream-{identity}.state"));
        let mut state = create_file(&state_path, false).map_err(unusable)?;
        lock(&state).map_err(|e| {
            if e.kind() == ErrorKind::WouldBlock {
                io::Error::new(
                    ErrorKind::AddrInUse,
                    format!(
                        "spool directory {} is in use by another sensor named {sensor_id:?} \
                         (give each sensor its own --sensor-id or --spool-dir)",
                        dir.display()
                    ),
                )
            } else {
                unusable(e)
            }
        })?;
        let mut raw = [0u8; STATE_LEN];
        let resumed = read_at(&state, &mut raw, 0).is_ok() && raw[..4] == STATE_MAGIC;
        let (session, key_bytes, acked, taken) = if resumed {
            let mut secret = [0u8; 16];
            secret.copy_from_slice(&raw[12..28]);
            let mut key = [0u8; 32];
            key.copy_from_slice(&raw[28..60]);
            (
                SessionKeys {
                    session_id: u64::from_le_bytes(field(&raw, 4)),
                    secret,
                },
                key,
                u64::from_le_bytes(field(&raw, 60)),
                u64::from_le_bytes(field(&raw, 68)),
            )
        } else {
            let key: [u8; 32] = rand::random();
            (fresh, key, 0, 0)
        };
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            prefix: format!("capstream-{identity}-"),
            state_path,
            state: state.try_clone().map_err(unusable)?,
            session,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key_bytes),
            acked,
            taken,
            max_bytes,
            segment_bytes,
            next_segment: 0,
            segments: VecDeque::new(),
            appending: false,
            len: 0,
            bytes: 0,
            adopted: Adopted::default(),
        };
        if !resumed {
            let mut raw = [0u8; STATE_LEN];
            raw[..4].copy_from_slice(&STATE_MAGIC);
            raw[4..12].copy_from_slice(&session.session_id.to_le_bytes());
            raw[12..28].copy_from_slice(&session.secret);
            raw[28..60].copy_from_slice(&key_bytes);
            state.set_len(0).map_err(unusable)?;
            state.write_all(&raw).map_err(unusable)?;
        }
        spool.adopt().map_err(unusable)?;
        Ok(spool)
    }

    /// Takes over the segments a previous process of this sensor left: keeps the records
    /// after the last acknowledged sequence, seals the segments (new records go to new
    /// ones), and works out the sequences that were lost with that process's memory.
    fn adopt(&mut self) -> io::Result<()> {
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let number = name
                .to_str()
                .and_then(|n| n.strip_prefix(&self.prefix))
                .and_then(|n| n.strip_suffix(".spool"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(number) = number {
                found.push((number, entry.path()));
            }
        }
        found.sort();
        self.next_segment = found.last().map_or(0, |(n, _)| n + 1);
        for (_, path) in found {
            match self.adopt_segment(&path) {
                Ok(Some(segment)) => {
                    for r in &segment.records {
                        self.len += 1;
                        self.bytes += r.len;
                        self.adopted.batches += 1;
                        let i = usize::from(r.interface_id);
                        if self.adopted.packets.len() <= i {
                            self.adopted.packets.resize(i + 1, 0);
                        }
                        self.adopted.packets[i] += u64::from(r.packets);
                    }
                    self.segments.push_back(segment);
                }
                Ok(None) => remove_segment(&path),
                Err(e) => {
                    tracing::warn!("spool: {}; skipped", e);
                    remove_segment(&path);
                }
            }
        }
        let mut previous: Option<u64> = None;
        for segment in &mut self.segments {
            if let (Some(before), Some(first)) = (previous, segment.records.front()) {
                segment.gaps_before = (before + 1..first.sequence).collect();
                self.adopted.lost_between += segment.gaps_before.len();
                self.len += segment.gaps_before.len();
            }
            previous = segment.records.back().map(|r| r.sequence).or(previous);
        }
        let held: Vec<u64> = self
            .segments
            .iter()
            .flat_map(|s| s.records.iter().map(|r| r.sequence))
            .collect();
        match (held.first(), held.last()) {
            (Some(&first), Some(&last)) => {
                self.adopted.lost_before = (self.acked + 1..first).collect();
                self.adopted.lost_after = (last + 1..=self.taken).collect();
            }
            _ => self.adopted.lost_before = (self.acked + 1..=self.taken).collect(),
        }
        Ok(())
    }

    /// Indexes one leftover segment: its whole records after the acknowledged sequence. A
    /// torn last record is cut off. `None`: nothing left to send in it.
    fn adopt_segment(&mut self, path: &Path) -> io::Result<Option<Segment>> {
        // A leftover segment, read (and its torn tail cut), never through a symlink.
        let file = open_existing(path).map_err(|e| read_error(path, 0, e))?;
        let size = file.metadata().map_err(|e| read_error(path, 0, e))?.len();
        let mut records = VecDeque::new();
        let mut at = 0;
        let mut read_at_first = None;
        while at + HEADER_LEN as u64 <= size {
            let mut h = [0u8; HEAD_LEN];
            read_at(&file, &mut h, at).map_err(|e| read_error(path, at, e))?;
            let frame_len = u64::from(u32::from_le_bytes(field(&h, 26)));
            if h[..4] != MAGIC || at + HEADER_LEN as u64 + frame_len > size {
                break;
            }
            let meta = Meta {
                sequence: u64::from_le_bytes(field(&h, 4)),
                interface_id: u16::from_le_bytes(field(&h, 12)),
                packets: u32::from_le_bytes(field(&h, 14)),
                len: HEADER_LEN as u64 + frame_len,
            };
            if meta.sequence > self.acked {
                read_at_first.get_or_insert(at);
                records.push_back(meta);
            }
            at += meta.len;
        }
        if at < size {
            // What follows the last whole record cannot be trusted: a torn write.
            tracing::warn!(
                "spool: {} ends in {} byte(s) of a torn record; cut off",
                path.display(),
                size - at
            );
            let _ = file.set_len(at);
        }
        Ok(read_at_first.map(|read_at| Segment {
            path: path.to_path_buf(),
            file,
            gaps_before: VecDeque::new(),
            records,
            read_at,
            end: at,
        }))
    }

    /// The session these records belong to.
    pub fn session(&self) -> SessionKeys {
        self.session
    }

    /// What was adopted from a previous process (empty for a new spool).
    pub fn adopted(&self) -> &Adopted {
        &self.adopted
    }

    /// The first sequence this process may take: after every one the last process took.
    pub fn next_sequence(&self) -> u64 {
        self.taken + 1
    }

    /// A new session (the receiver could not resume the old one): written to the state
    /// file, so that a restart resumes this one.
    pub fn set_session(&mut self, session: SessionKeys) -> io::Result<()> {
        let mut raw = [0u8; 24];
        raw[..8].copy_from_slice(&session.session_id.to_le_bytes());
        raw[8..].copy_from_slice(&session.secret);
        write_at(&self.state, &raw, 4)?;
        self.session = session;
        Ok(())
    }

    /// Notes that the batch `sequence` exists (taken by a capture) or that the receiver
    /// has everything up to `acked`: one small write to the state file when either grows.
    pub fn note(&mut self, taken: u64, acked: u64) -> io::Result<()> {
        if taken <= self.taken && acked <= self.acked {
            return Ok(());
        }
        self.taken = self.taken.max(taken);
        self.acked = self.acked.max(acked);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.acked.to_le_bytes());
        raw[8..].copy_from_slice(&self.taken.to_le_bytes());
        write_at(&self.state, &raw, STATE_SEQUENCES_AT)
    }

    /// The session ended with everything acknowledged: the state file goes, so that the
    /// next sensor of this name starts a new session.
    pub fn finish(self) {
        if self.is_empty() {
            remove_segment(&self.state_path);
        }
    }

    /// Appends one batch at the back. `Ok(false)` when it would take the spool past
    /// `max_bytes`; nothing is written then. On a write error (a full disk, say) the
    /// partial record is cut off again, so the spool stays readable and holds what it
    /// held before.
    pub fn push(&mut self, batch: &Spooled) -> io::Result<bool> {
        let frame_len = u32::try_from(batch.frame.len()).map_err(|_| {
            io::Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a {}-byte batch frame is too large to spool",
                    batch.frame.len()
                ),
            )
        })?;
        let record_len = batch.record_len();
        if self.bytes.saturating_add(record_len) > self.max_bytes {
            return Ok(false);
        }
        let (head, tag) = self.encode_header(batch, frame_len);

        // Keep appending to the back segment while the record fits in it; a record larger
        // than a whole segment gets one of its own.
        let fits = self.appending
            && self
                .segments
                .back()
                .is_some_and(|s| s.end + record_len <= self.segment_bytes);
        if !fits {
            let path = self
                .dir
                .join(format!("{}{:06}.spool", self.prefix, self.next_segment));
            let file = create_file(&path, true).map_err(|e| write_error(&path, e))?;
            self.next_segment += 1;
            self.segments.push_back(Segment {
                path,
                file,
                gaps_before: VecDeque::new(),
                records: VecDeque::new(),
                read_at: 0,
                end: 0,
            });
            self.appending = true;
        }
        let Some(back) = self.segments.back_mut() else {
            // Unreachable: a segment was just made if there was none.
            return Err(io::Error::other("spool lost track of its segment files"));
        };
        if let Err(e) = write_all_vectored(&mut back.file, &[&head, &batch.frame, tag.as_ref()]) {
            let err = write_error(&back.path, e);
            if back.records.is_empty() {
                let gone = self.segments.pop_back();
                if let Some(segment) = gone {
                    remove_segment(&segment.path);
                }
                self.appending = false;
            } else if back.file.set_len(back.end).is_err() {
                // A torn tail that could not be cut: nothing is appended behind it, and
                // reading stops at its last whole record.
                self.appending = false;
            }
            return Err(err);
        }
        back.end += record_len;
        back.records.push_back(Meta {
            sequence: batch.sequence,
            interface_id: batch.interface_id,
            packets: batch.packets,
            len: record_len,
        });
        self.len += 1;
        self.bytes += record_len;
        Ok(true)
    }

    /// Takes the oldest batch off the front, or `None` when empty.
    ///
    /// A record that cannot be read back (damaged, truncated, forged) is an error naming
    /// the file. Nothing after it in that segment can be trusted, so the whole segment is
    /// dropped with it, and the error lists what it held; the next pop goes on with the
    /// next segment.
    pub fn pop(&mut self) -> Result<Option<Spooled>, Damaged> {
        let Some(front) = self.segments.front_mut() else {
            return Ok(None);
        };
        if let Some(sequence) = front.gaps_before.pop_front() {
            self.len -= 1;
            let empty = crate::batcher::empty_batch(sequence, 0);
            return Ok(Some(Spooled {
                sequence,
                interface_id: 0,
                packets: 0,
                raw_len: 0,
                frame: empty.batch.frame,
            }));
        }
        let Some(meta) = front.records.front().copied() else {
            // Unreachable: segments are removed when their last record goes.
            self.remove_front();
            return Ok(None);
        };
        match read_record(front, meta, &self.key) {
            Ok(batch) => {
                front.records.pop_front();
                front.read_at += meta.len;
                self.len -= 1;
                self.bytes -= meta.len;
                if front.records.is_empty() {
                    self.remove_front();
                }
                Ok(Some(batch))
            }
            Err(error) => {
                let lost: Vec<Meta> = front.records.drain(..).collect();
                self.len -= lost.len();
                self.bytes -= lost.iter().map(|m| m.len).sum::<u64>();
                self.remove_front();
                Err(Damaged { error, lost })
            }
        }
    }

    /// Batches held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes on disk counted against `max_bytes`: frames plus their headers.
    // Nothing but the tests reads it yet; drop the `allow` once something does.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Forgets the front segment and deletes its file.
    fn remove_front(&mut self) {
        if self.segments.len() == 1 {
            self.appending = false;
        }
        if let Some(segment) = self.segments.pop_front() {
            remove_segment(&segment.path);
        }
    }

    /// The record's header and its MAC.
    fn encode_header(&self, batch: &Spooled, frame_len: u32) -> ([u8; HEAD_LEN], hmac::Tag) {
        let mut h = [0u8; HEAD_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..12].copy_from_slice(&batch.sequence.to_le_bytes());
        h[12..14].copy_from_slice(&batch.interface_id.to_le_bytes());
        h[14..18].copy_from_slice(&batch.packets.to_le_bytes());
        h[18..26].copy_from_slice(&batch.raw_len.to_le_bytes());
        h[26..30].copy_from_slice(&frame_len.to_le_bytes());
        let mut mac = hmac::Context::with_key(&self.key);
        mac.update(&h);
        mac.update(&batch.frame);
        (h, mac.sign())
    }
}

/// 16 hex digits naming a sensor's files: a hash, so that any --sensor-id makes a safe
/// file name.
fn identity(sensor_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, sensor_id.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deletes a file of the spool. A failure only costs disk space until someone removes the
/// file, so it is logged rather than returned: the caller's batch is fine.
fn remove_segment(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != ErrorKind::NotFound {
            tracing::warn!(
                "cannot remove spool file {}: {}",
                path.display(),
                reason(&e)
            );
        }
    }
}

/// Reads the record `meta` at the segment's read position and checks its MAC.
fn read_record(segment: &Segment, meta: Meta, key: &hmac::Key) -> io::Result<Spooled> {
    let at = segment.read_at;
    let path = &segment.path;
    let corrupt = |what: &str| {
        io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "spool file {} is corrupt at byte {at}: {what}",
                path.display()
            ),
        )
    };
    let mut h = [0u8; HEAD_LEN];
    read_at(&segment.file, &mut h, at).map_err(|e| read_error(path, at, e))?;
    if h[0..4] != MAGIC {
        return Err(corrupt("no record starts there"));
    }
    let frame_len = u64::from(u32::from_le_bytes(field(&h, 26)));
    // The header is not checked yet, so its length must not decide an allocation: what
    // was written there bounds it.
    if HEADER_LEN as u64 + frame_len != meta.len {
        return Err(corrupt("the record length is not the one written"));
    }
    let mut record = vec![0u8; meta.len as usize];
    read_at(&segment.file, &mut record, at).map_err(|e| read_error(path, at, e))?;
    let (signed, tag) = record.split_at(record.len() - TAG_LEN);
    if hmac::verify(key, signed, tag).is_err() {
        return Err(corrupt("MAC mismatch (damaged or forged)"));
    }
    let record = Bytes::from(record);
    Ok(Spooled {
        sequence: u64::from_le_bytes(field(&h, 4)),
        interface_id: u16::from_le_bytes(field(&h, 12)),
        packets: u32::from_le_bytes(field(&h, 14)),
        raw_len: u64::from_le_bytes(field(&h, 18)),
        frame: record.slice(HEAD_LEN..HEAD_LEN + frame_len as usize),
    })
}

/// `N` bytes of `h` from `at`.
fn field<const N: usize>(h: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&h[at..at + N]);
    out
}

/// Creates (`new`: exclusively) or opens a file of the spool for reading and appending:
/// 0600 whatever the umask, and never through a symlink.
fn create_file(path: &Path, new: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    if new {
        options.append(true).create_new(true);
    } else {
        options.write(true).create(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(nofollow());
    }
    options.open(path)
}

#[cfg(target_os = "linux")]
fn nofollow() -> i32 {
    libc::O_NOFOLLOW
}

#[cfg(all(unix, not(target_os = "linux")))]
fn nofollow() -> i32 {
    0
}

/// An exclusive lock on the state file, without waiting: `WouldBlock` when another
/// sensor holds it.
#[cfg(unix)]
fn lock(file: &File) -> io::Result<()> {
    use rustix::fs::{flock, FlockOperation};
    flock(file, FlockOperation::NonBlockingLockExclusive).map_err(io::Error::from)
}

#[cfg(not(unix))]
fn lock(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], at: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, at)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut at: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, at)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                at += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(windows)]
fn write_at(file: &File, mut buf: &[u8], mut at: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, at)? {
            0 => return Err(ErrorKind::WriteZero.into()),
            n => {
                buf = &buf[n..];
                at += n as u64;
            }
        }
    }
    Ok(())
}

/// Writes a record's parts with as few system calls as the kernel allows (one, normally).
fn write_all_vectored(file: &mut File, parts: &[&[u8]; 3]) -> io::Result<()> {
    let mut slices = parts.map(IoSlice::new);
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_error(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot write spool file {}: {}", path.display(), reason(&e)),
    )
}

fn read_error(path: &Path, at: u64, e: io::Error) -> io::Error {
    if e.kind() == ErrorKind::UnexpectedEof {
        io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "spool file {} is corrupt at byte {at}: the record is cut short",
                path.display()
            ),
        )
    } else {
        io::Error::new(
            e.kind(),
            format!("cannot read spool file {}: {}", path.display(), reason(&e)),
        )
    }
}

/// The one-line error for a spool directory that cannot be used.
fn unusable(dir: &Path, e: &io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!(
            "cannot use spool directory {}: {} (pass a writable --spool-dir)",
            dir.display(),
            reason(e)
        ),
    )
}

/// The usual causes in words that fit in a sentence; anything else as the system says it.
fn reason(e: &io::Error) -> String {
    match e.kind() {
        ErrorKind::PermissionDenied => "permission denied".into(),
        ErrorKind::NotFound => "no such file or directory".into(),
        ErrorKind::NotADirectory => "a component of the path is not a directory".into(),
        ErrorKind::ReadOnlyFilesystem => "read-only file system".into(),
        ErrorKind::StorageFull => "no space left on device".into(),
        ErrorKind::QuotaExceeded => "disk quota exceeded".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A directory under the system temp dir, removed with everything in it on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "capstream-spool-test-{}-{n}-{name}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        /// The names of the segment files in it, sorted.
        fn segments(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".spool"))
                .collect();
            names.sort();
            names
        }

        fn segment(&self, i: usize) -> PathBuf {
            self.0.join(&self.segments()[i])
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn keys(session_id: u64) -> SessionKeys {
        SessionKeys {
            session_id,
            secret: [session_id as u8; 16],
        }
    }

    fn open(dir: &TempDir, id: &str, max_bytes: u64, segment_bytes: u64) -> Spool {
        Spool::open_with(&dir.0, id, keys(1), max_bytes, segment_bytes).unwrap()
    }

    /// A batch whose every field, and frame, follows from `sequence` and `len`.
    fn batch(sequence: u64, len: usize) -> Spooled {
        Spooled {
            sequence,
            interface_id: (sequence % 7) as u16,
            packets: sequence as u32 * 3,
            raw_len: sequence * 1000 + len as u64,
            frame: (0..len)
                .map(|i| (i as u64 ^ sequence.wrapping_mul(31)) as u8)
                .collect(),
        }
    }

    fn pop(spool: &mut Spool) -> Option<Spooled> {
        spool.pop().unwrap_or_else(|d| panic!("{d}"))
    }

    fn flip_byte(path: &Path, at: u64) {
        let mut data = fs::read(path).unwrap();
        data[at as usize] ^= 0x40;
        fs::write(path, data).unwrap();
    }

    #[test]
    fn keeps_fifo_order_across_segments() {
        let dir = TempDir::new("fifo");
        let mut spool = open(&dir, "a", u64::MAX, 1000);
        // Sizes from empty to larger than a whole segment.
        let sizes = [0, 1, 100, 500, 900, 1500, 7, 3000, 64, 0, 333];
        let batches: Vec<Spooled> = (0..60)
            .map(|i| batch(i + 1, sizes[i as usize % sizes.len()]))
            .collect();
        let mut expected_bytes = 0;
        for b in &batches {
            assert!(spool.push(b).unwrap());
            expected_bytes += HEADER_LEN as u64 + b.frame.len() as u64;
            assert_eq!(spool.bytes(), expected_bytes);
        }
        assert_eq!(spool.len(), batches.len());
        assert!(dir.segments().len() > 10, "{:?}", dir.segments());
        for b in &batches {
            assert_eq!(pop(&mut spool).as_ref(), Some(b));
        }
        assert_eq!(pop(&mut spool), None);
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert_eq!(dir.segments(), Vec::<String>::new());
    }

    #[test]
    fn interleaved_pushes_and_pops_match_a_queue() {
        let dir = TempDir::new("interleaved");
        let mut spool = open(&dir, "a", 20_000, 2_000);
        let mut model = VecDeque::new();
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut sequence = 0;
        for _ in 0..5000 {
            let r = next();
            if r % 5 < 3 {
                sequence += 1;
                let b = batch(sequence, (next() % 1200) as usize);
                let fits =
                    model.iter().map(Spooled::record_len).sum::<u64>() + b.record_len() <= 20_000;
                assert_eq!(spool.push(&b).unwrap(), fits);
                if fits {
                    model.push_back(b);
                }
            } else {
                assert_eq!(pop(&mut spool), model.pop_front());
            }
            assert_eq!(spool.len(), model.len());
            assert_eq!(
                spool.bytes(),
                model.iter().map(Spooled::record_len).sum::<u64>()
            );
        }
        while let Some(b) = model.pop_front() {
            assert_eq!(pop(&mut spool), Some(b));
        }
        assert_eq!(pop(&mut spool), None);
        assert_eq!(dir.segments(), Vec::<String>::new());
    }

    #[test]
    fn refuses_past_the_cap_and_has_room_again_after_pops() {
        let dir = TempDir::new("cap");
        let record = HEADER_LEN as u64 + 100;
        let mut spool = open(&dir, "a", 3 * record, 1 << 20);
        for s in 1..=3 {
            assert!(spool.push(&batch(s, 100)).unwrap());
        }
        assert_eq!(spool.bytes(), 3 * record);
        assert_eq!(fs::metadata(dir.segment(0)).unwrap().len(), 3 * record);

        // Even one byte over is refused, and nothing is written.
        assert!(!spool.push(&batch(4, 1)).unwrap());
        assert!(!spool.push(&batch(4, 100)).unwrap());
        assert_eq!(spool.len(), 3);
        assert_eq!(fs::metadata(dir.segment(0)).unwrap().len(), 3 * record);

        assert_eq!(pop(&mut spool).unwrap().sequence, 1);
        assert_eq!(spool.bytes(), 2 * record);
        assert!(!spool.push(&batch(4, 101)).unwrap());
        assert!(spool.push(&batch(4, 100)).unwrap());
        let order: Vec<u64> = std::iter::from_fn(|| pop(&mut spool))
            .map(|b| b.sequence)
            .collect();
        assert_eq!(order, [2, 3, 4]);

        // A cap below one header takes nothing.
        let mut tiny = open(&dir, "b", HEADER_LEN as u64 - 1, 1 << 20);
        assert!(!tiny.push(&batch(1, 0)).unwrap());
        assert!(tiny.is_empty());
    }

    /// Segments go as they are consumed; what a sensor leaves (killed, say) stays for the
    /// next one, and a finished session leaves nothing at all.
    #[test]
    fn deletes_segments_as_they_are_consumed_and_keeps_the_rest() {
        let dir = TempDir::new("delete");
        let record = HEADER_LEN as u64 + 100;
        // Two records per segment.
        let mut spool = open(&dir, "a", u64::MAX, 2 * record);
        for s in 1..=6 {
            spool.push(&batch(s, 100)).unwrap();
        }
        let prefix = format!("capstream-{}-", identity("a"));
        assert_eq!(
            dir.segments(),
            [0, 1, 2].map(|n| format!("{prefix}{n:06}.spool"))
        );
        pop(&mut spool);
        pop(&mut spool);
        assert_eq!(
            dir.segments(),
            [1, 2].map(|n| format!("{prefix}{n:06}.spool"))
        );
        for _ in 0..4 {
            pop(&mut spool);
        }
        assert_eq!(dir.segments(), Vec::<String>::new());
        spool.push(&batch(7, 100)).unwrap();
        assert_eq!(dir.segments(), [format!("{prefix}000003.spool")]);
        drop(spool);
        assert_eq!(dir.segments(), [format!("{prefix}000003.spool")]);

        let mut again = open(&dir, "a", u64::MAX, 2 * record);
        assert_eq!(pop(&mut again), Some(batch(7, 100)));
        again.finish();
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 0);
    }

    /// A damaged record drops its segment, whose batches are listed for the caller to
    /// count; the next segment reads fine.
    #[test]
    fn a_damaged_frame_drops_its_segment_and_lists_it() {
        let dir = TempDir::new("corrupt-frame");
        let record = HEADER_LEN as u64 + 50;
        let mut spool = open(&dir, "a", u64::MAX, 3 * record);
        for s in 1..=5 {
            spool.push(&batch(s, 50)).unwrap();
        }
        // Segment 0 holds batches 1 to 3; damage the frame of batch 2.
        let first = dir.segment(0);
        flip_byte(&first, record + 40);
        assert_eq!(pop(&mut spool).unwrap().sequence, 1);
        let damaged = spool.pop().unwrap_err();
        assert_eq!(damaged.error.kind(), ErrorKind::InvalidData);
        let msg = damaged.to_string();
        assert!(msg.contains(&first.display().to_string()), "{msg}");
        assert!(msg.contains("MAC mismatch"), "{msg}");
        assert!(msg.ends_with("; dropped the 2 batches left in it"), "{msg}");
        let lost: Vec<(u64, u16, u32)> = damaged
            .lost
            .iter()
            .map(|m| (m.sequence, m.interface_id, m.packets))
            .collect();
        assert_eq!(lost, [(2, 2, 6), (3, 3, 9)]);
        assert_eq!(spool.len(), 2);
        assert_eq!(spool.bytes(), 2 * record);
        assert!(!first.exists());
        assert_eq!(pop(&mut spool).unwrap().sequence, 4);
        assert_eq!(pop(&mut spool).unwrap().sequence, 5);
        assert_eq!(pop(&mut spool), None);
    }

    #[test]
    fn damaged_headers_short_and_removed_files_are_reported() {
        let record = HEADER_LEN as u64 + 50;
        for (at, what) in [
            (0, "no record starts there"),
            (5, "MAC mismatch"),
            (29, "the record length is not the one written"),
        ] {
            let dir = TempDir::new("corrupt-header");
            let mut spool = open(&dir, "a", u64::MAX, SEGMENT_BYTES);
            spool.push(&batch(1, 50)).unwrap();
            spool.push(&batch(2, 50)).unwrap();
            flip_byte(&dir.segment(0), at);
            let msg = spool.pop().unwrap_err().to_string();
            assert!(msg.contains(what), "{msg}");
            assert!(msg.contains("corrupt at byte 0"), "{msg}");
            assert!(spool.is_empty());
            assert_eq!(pop(&mut spool), None);
            // The spool goes on working.
            spool.push(&batch(3, 50)).unwrap();
            assert_eq!(pop(&mut spool).unwrap().sequence, 3);
        }

        // A file cut short, as by someone else's truncation.
        let dir = TempDir::new("short");
        let mut spool = open(&dir, "a", u64::MAX, SEGMENT_BYTES);
        spool.push(&batch(1, 50)).unwrap();
        spool.push(&batch(2, 50)).unwrap();
        OpenOptions::new()
            .write(true)
            .open(dir.segment(0))
            .unwrap()
            .set_len(record + 20)
            .unwrap();
        assert_eq!(pop(&mut spool).unwrap().sequence, 1);
        let msg = spool.pop().unwrap_err().to_string();
        assert!(msg.contains(&format!("corrupt at byte {record}")), "{msg}");
        assert!(msg.contains("cut short"), "{msg}");

        // A file removed behind the spool's back: its descriptor still reads it.
        spool.push(&batch(3, 50)).unwrap();
        fs::remove_file(dir.segment(0)).unwrap();
        assert_eq!(pop(&mut spool).unwrap().sequence, 3);
    }

    /// A record rewritten by someone who may write the directory but not read the key is
    /// refused, even with its lengths and magic right; a symlink is not followed.
    #[test]
    fn a_forged_record_or_a_symlink_is_refused() {
        let dir = TempDir::new("forged");
        let mut spool = open(&dir, "a", u64::MAX, SEGMENT_BYTES);
        spool.push(&batch(1, 50)).unwrap();
        let path = dir.segment(0);
        let other = TempDir::new("forger");
        let mut forger = open(&other, "a", u64::MAX, SEGMENT_BYTES);
        let mut forged = batch(1, 50);
        forged.frame = Bytes::from(vec![0xee; 50]);
        forger.push(&forged).unwrap();
        let bytes = fs::read(other.segment(0)).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&bytes))
            .unwrap();
        assert!(spool
            .pop()
            .unwrap_err()
            .to_string()
            .contains("MAC mismatch"));

        #[cfg(unix)]
        {
            let target = dir.0.join("target");
            fs::write(&target, b"").unwrap();
            let link = dir.0.join("link");
            std::os::unix::fs::symlink(&target, &link).unwrap();
            assert!(create_file(&link, false).is_err());
            assert!(open_existing(&link).is_err());
        }
    }

    /// What a killed sensor left is adopted by the next of the same name: the same session,
    /// the records not acknowledged, numbering after the last sequence taken, and the
    /// sequences that died in its memory listed.
    #[test]
    fn a_killed_sensors_spool_is_adopted() {
        let dir = TempDir::new("adopt");
        let mut spool = Spool::open_with(&dir.0, "tap", keys(7), u64::MAX, SEGMENT_BYTES).unwrap();
        for s in 3..=6 {
            spool.push(&batch(s, 40)).unwrap();
        }
        // 1 and 2 were in memory; 1 was acknowledged; 7 and 8 were taken after the spool.
        spool.note(8, 1).unwrap();
        assert_eq!(pop(&mut spool).unwrap().sequence, 3);
        drop(spool);

        let mut again = Spool::open_with(&dir.0, "tap", keys(9), u64::MAX, SEGMENT_BYTES).unwrap();
        assert_eq!(again.session(), keys(7));
        assert_eq!(again.next_sequence(), 9);
        let adopted = again.adopted().clone();
        assert_eq!(adopted.batches, 4, "3 was only in memory: sent again");
        assert_eq!(adopted.lost_before, [2]);
        assert_eq!(adopted.lost_after, [7, 8]);
        assert_eq!(adopted.packets.iter().sum::<u64>(), (3 + 4 + 5 + 6) * 3);
        let order: Vec<u64> = std::iter::from_fn(|| pop(&mut again))
            .map(|b| b.sequence)
            .collect();
        assert_eq!(order, [3, 4, 5, 6]);
        // A new session, then a restart: that one is resumed.
        again.set_session(keys(11)).unwrap();
        drop(again);
        let third = Spool::open_with(&dir.0, "tap", keys(12), u64::MAX, SEGMENT_BYTES).unwrap();
        assert_eq!(third.session(), keys(11));
        third.finish();
        let fresh = Spool::open_with(&dir.0, "tap", keys(13), u64::MAX, SEGMENT_BYTES).unwrap();
        assert_eq!(fresh.session(), keys(13));
        assert_eq!(fresh.next_sequence(), 1);
    }

    /// A segment deleted while no sensor ran: the next one sends its sequences as empty
    /// batches, so that the session has no gap.
    #[test]
    fn a_missing_segment_is_sent_as_empty_batches() {
        let dir = TempDir::new("missing");
        let record = HEADER_LEN as u64 + 40;
        let mut spool = Spool::open_with(&dir.0, "tap", keys(3), u64::MAX, 2 * record).unwrap();
        for s in 1..=6 {
            spool.push(&batch(s, 40)).unwrap();
        }
        spool.note(6, 0).unwrap();
        drop(spool);
        fs::remove_file(dir.segment(1)).unwrap();
        let mut again = Spool::open_with(&dir.0, "tap", keys(4), u64::MAX, 2 * record).unwrap();
        assert_eq!(again.adopted().lost_between, 2);
        assert_eq!(again.len(), 6);
        let popped: Vec<(u64, u32)> = std::iter::from_fn(|| pop(&mut again))
            .map(|b| (b.sequence, b.packets))
            .collect();
        assert_eq!(popped, [(1, 3), (2, 6), (3, 0), (4, 0), (5, 15), (6, 18)]);
        assert!(again.is_empty());
    }

    /// Two sensors of the same name cannot use one directory at once; of two names, they
    /// can.
    #[test]
    fn one_sensor_per_name_and_directory() {
        let dir = TempDir::new("locked");
        let mut a = open(&dir, "a", u64::MAX, 500);
        let err = Spool::open(&dir.0, "a", keys(2), u64::MAX).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::AddrInUse);
        assert!(
            err.to_string().contains("in use by another sensor"),
            "{err}"
        );
        let mut b = open(&dir, "b", u64::MAX, 500);
        for s in 1..=10 {
            a.push(&batch(s, 200)).unwrap();
            b.push(&batch(100 + s, 150)).unwrap();
        }
        for s in 1..=10 {
            assert_eq!(pop(&mut a), Some(batch(s, 200)));
            assert_eq!(pop(&mut b), Some(batch(100 + s, 150)));
        }
        drop(a);
        open(&dir, "a", u64::MAX, 500);
    }

    #[cfg(unix)]
    #[test]
    fn files_are_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = TempDir::new("modes");
        let nested = dir.0.join("a/b");
        assert!(prepare_dir(&nested).unwrap());
        assert_eq!(mode(&nested), 0o700);
        assert!(!prepare_dir(&nested).unwrap());
        let mut spool = Spool::open(&nested, "a", keys(1), 1 << 20).unwrap();
        spool.push(&batch(1, 10)).unwrap();
        for entry in fs::read_dir(&nested).unwrap() {
            assert_eq!(mode(&entry.unwrap().path()), 0o600);
        }
        fs::set_permissions(&nested, fs::Permissions::from_mode(0o770)).unwrap();
        let err = prepare_dir(&nested).unwrap_err().to_string();
        assert!(
            err.contains("may be written by others") && err.contains("770"),
            "{err}"
        );
    }

    #[test]
    fn an_unusable_directory_is_a_clear_error() {
        // Root may write anywhere, but nobody can make a directory under a regular file.
        let dir = TempDir::new("unusable");
        let file = dir.0.join("plain-file");
        fs::write(&file, b"").unwrap();
        let bad = file.join("spool");
        let msg = prepare_dir(&bad).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "cannot use spool directory {}: a component of the path is not a directory \
                 (pass a writable --spool-dir)",
                bad.display()
            )
        );
    }

    /// A full disk during a push: the error comes back, and the spool stays readable and
    /// usable. On a 1 MiB tmpfs of its own, so it needs root (as `cargo xtask test` runs).
    #[cfg(target_os = "linux")]
    #[test]
    fn disk_full_leaves_the_spool_readable() {
        let tmp = TempDir::new("full");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&tmp.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(mounted, "cannot mount a tmpfs: this test needs root");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(&tmp.0);
        // The failing write appends to a segment, or starts one.
        for (i, segment_bytes) in [SEGMENT_BYTES, HEADER_LEN as u64 + 100_000]
            .into_iter()
            .enumerate()
        {
            disk_full(&tmp.0, &format!("full-{i}"), segment_bytes);
        }
    }

    fn disk_full(dir: &Path, id: &str, segment_bytes: u64) {
        let mut spool = Spool::open_with(dir, id, keys(1), u64::MAX, segment_bytes).unwrap();
        let mut pushed = 0;
        let err = loop {
            match spool.push(&batch(pushed + 1, 100_000)) {
                Ok(true) => pushed += 1,
                Ok(false) => unreachable!(),
                Err(e) => break e,
            }
        };
        println!("after {pushed} batches: {err}");
        assert_eq!(err.kind(), ErrorKind::StorageFull);
        assert!(err.to_string().contains("no space left on device"));
        assert_eq!(spool.len(), pushed as usize);
        // The torn record was cut off: the segments hold exactly the records pushed, and
        // pops give them back.
        let on_disk: u64 = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, spool.bytes());
        for s in 1..=pushed {
            assert_eq!(pop(&mut spool), Some(batch(s, 100_000)));
        }
        assert_eq!(pop(&mut spool), None);
        // With its segment consumed and deleted, the space is back.
        assert!(spool.push(&batch(pushed + 1, 100_000)).unwrap());
        assert_eq!(pop(&mut spool), Some(batch(pushed + 1, 100_000)));
        spool.finish();
    }
}
