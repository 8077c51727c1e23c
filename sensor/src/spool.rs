//! A size-capped on-disk FIFO of batch frames, for batches that do not fit in memory.
//!
//! The transport keeps the oldest unacknowledged batches in memory (`--buffer`). Newer
//! ones that do not fit are pushed here, in order, and popped back, oldest first, as
//! acknowledgements free memory. When the spool is full too, `push` says so, and the
//! caller decides what becomes of the batch: nothing is lost silently here.
//!
//! The spool is scratch space for one sensor process, not a journal: a sensor removes its
//! own files on drop, and leftovers of its session id when it opens. So nothing is ever
//! fsynced: writes land in the page cache and reach the disk only if the kernel writes
//! them back, so a push costs the transport task a checksum and a memory copy, and so
//! does a pop while the data is still cached. That is why plain blocking `std::fs` calls
//! are fine here, even from an async task: a push or pop of a 256 KiB batch takes about
//! 0.1 ms, 2 to 3 GB/s (the `throughput` test below measures it).
//!
//! On disk the spool is a run of segment files named
//! `capstream-<session id, 16 hex digits>-<segment number>.spool`, so that sensors can
//! share a directory. A new segment starts when the current one would pass
//! `SEGMENT_BYTES`, and a segment is deleted as soon as its last record is popped, so
//! space comes back as the front is consumed, not only when the spool empties.
//!
//! Each record is a 34-byte header, then the frame, all integers little-endian:
//!
//! ```text
//! magic "CSP1" | sequence u64 | interface_id u16 | packets u32 | raw_len u64
//!     | frame_len u32 | crc32 u32 | frame (frame_len bytes)
//! ```
//!
//! The CRC-32 (IEEE, as in zlib) covers the header from `sequence` to `frame_len`, then the
//! frame, so a torn or damaged record is reported as an error naming its file instead of
//! being sent on.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, IoSlice, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Where a segment stops taking records. Small enough that consumed space comes back
/// soon, large enough that a 256 KiB batch does not open a file each time.
const SEGMENT_BYTES: u64 = 16 << 20;

const MAGIC: [u8; 4] = *b"CSP1";

/// Bytes of the header in front of each frame; they count against the cap as well.
pub const HEADER_LEN: usize = 34;

/// Read buffer of the front segment: headers and small frames come in one read, while
/// frames larger than this are read straight into their own buffer.
const READ_BUFFER: usize = 64 << 10;

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

/// One segment file; every segment in `Spool::segments` holds at least one record.
struct Segment {
    path: PathBuf,
    /// Records written and not yet popped.
    records: usize,
    /// Their bytes, headers included: from the read position to the end of the last
    /// whole record.
    bytes: u64,
}

/// The back segment, open for appending.
struct Writer {
    file: File,
    /// End of the last whole record: where a failed write is cut back to.
    len: u64,
}

/// The front segment, open for reading.
struct Reader {
    file: BufReader<File>,
    /// Offset of the next record, for error messages.
    offset: u64,
}

/// A size-capped FIFO of batches on disk. See the module documentation.
pub struct Spool {
    dir: PathBuf,
    /// `capstream-<session id>-`: the file names this spool owns.
    prefix: String,
    max_bytes: u64,
    segment_bytes: u64,
    /// Number of the next segment file to create.
    next_segment: u64,
    /// Oldest first.
    segments: VecDeque<Segment>,
    /// Appends to the back segment; `None` when that one is sealed (or there is none) and
    /// the next push starts a new segment.
    writer: Option<Writer>,
    /// Reads the front segment; opened by the first pop from it.
    reader: Option<Reader>,
    len: usize,
    bytes: u64,
}

impl Spool {
    /// Opens (creating) `dir` for this sensor process, with at most `max_bytes` on disk
    /// (frames plus per-record headers). Files are named after `session_id`, so that two
    /// sensors can share a dir; leftover files of this session id are removed. A file is
    /// created and removed right away, so that an unusable directory is reported now, with
    /// what to do, rather than at the first overflow.
    pub fn open(dir: &Path, session_id: u64, max_bytes: u64) -> io::Result<Spool> {
        Self::open_with(dir, session_id, max_bytes, SEGMENT_BYTES)
    }

    /// `Spool::open` with another segment size (the tests use tiny ones).
    fn open_with(
        dir: &Path,
        session_id: u64,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> io::Result<Spool> {
        let unusable = |e: io::Error| unusable(dir, &e);
        fs::create_dir_all(dir).map_err(unusable)?;
        let prefix = format!("capstream-{session_id:016x}-");
        for entry in fs::read_dir(dir).map_err(unusable)? {
            let entry = entry.map_err(unusable)?;
            let name = entry.file_name();
            let ours = name
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".spool"));
            if ours {
                match fs::remove_file(entry.path()) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(unusable(e)),
                    _ => {}
                }
            }
        }
        let probe = dir.join(format!("{prefix}probe.spool"));
        File::create(&probe).map_err(unusable)?;
        fs::remove_file(&probe).map_err(unusable)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            prefix,
            max_bytes,
            segment_bytes,
            next_segment: 0,
            segments: VecDeque::new(),
            writer: None,
            reader: None,
            len: 0,
            bytes: 0,
        })
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
        let header = encode_header(batch, frame_len);

        // Keep appending to the back segment while the record fits in it; a record larger
        // than a whole segment gets one of its own.
        let (mut writer, fresh) = match self.writer.take() {
            Some(w) if w.len + record_len <= self.segment_bytes => (w, false),
            _ => {
                let path = self.segment_path(self.next_segment);
                let file = OpenOptions::new()
                    .append(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| write_error(&path, e))?;
                self.next_segment += 1;
                self.segments.push_back(Segment {
                    path,
                    records: 0,
                    bytes: 0,
                });
                (Writer { file, len: 0 }, true)
            }
        };
        let Some(back) = self.segments.back_mut() else {
            // Unreachable: the writer always belongs to the back segment.
            return Err(io::Error::other("spool lost track of its segment files"));
        };

        if let Err(e) = write_all_vectored(&mut writer.file, &header, &batch.frame) {
            let err = write_error(&back.path, e);
            if fresh {
                drop(writer);
                let _ = fs::remove_file(&back.path);
                self.segments.pop_back();
            } else if writer.file.set_len(writer.len).is_ok() {
                // Appends go on after the last whole record.
                self.writer = Some(writer);
            }
            // Otherwise the segment keeps a torn tail that could not be cut: it is left
            // sealed, so nothing is appended behind it and reading stops at its last
            // whole record.
            return Err(err);
        }
        writer.len += record_len;
        back.records += 1;
        back.bytes += record_len;
        self.writer = Some(writer);
        self.len += 1;
        self.bytes += record_len;
        Ok(true)
    }

    /// Takes the oldest batch off the front, or `None` when empty.
    ///
    /// A record that cannot be read back (damaged, truncated, or its file gone) is an
    /// error naming the file. Nothing after it in that segment can be trusted, so the
    /// whole segment is dropped with it: `len()` before and after tells the caller how
    /// many batches were lost, and the next pop goes on with the next segment.
    pub fn pop(&mut self) -> io::Result<Option<Spooled>> {
        let Some(front) = self.segments.front_mut() else {
            return Ok(None);
        };
        let read = match self.reader.take() {
            Some(reader) => Ok(reader),
            None => File::open(&front.path)
                .map(|file| Reader {
                    file: BufReader::with_capacity(READ_BUFFER, file),
                    offset: 0,
                })
                .map_err(|e| read_error(&front.path, 0, e)),
        }
        .and_then(|mut reader| {
            let batch = read_record(&mut reader, front)?;
            Ok((reader, batch))
        });
        match read {
            Ok((reader, batch)) => {
                let record_len = batch.record_len();
                front.records -= 1;
                front.bytes -= record_len;
                self.len -= 1;
                self.bytes -= record_len;
                if front.records == 0 {
                    drop(reader);
                    self.remove_front();
                } else {
                    self.reader = Some(reader);
                }
                Ok(Some(batch))
            }
            Err(e) => {
                let lost = front.records;
                self.len -= lost;
                self.bytes -= front.bytes;
                self.remove_front();
                let batches = if lost == 1 { "batch" } else { "batches" };
                Err(io::Error::new(
                    e.kind(),
                    format!("{e}; dropped the {lost} {batches} left in it"),
                ))
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

    fn segment_path(&self, number: u64) -> PathBuf {
        self.dir.join(format!("{}{number:06}.spool", self.prefix))
    }

    /// Forgets the front segment and deletes its file (the reader is already closed).
    fn remove_front(&mut self) {
        if self.segments.len() == 1 {
            self.writer = None;
        }
        if let Some(segment) = self.segments.pop_front() {
            remove_segment(&segment.path);
        }
    }
}

impl Drop for Spool {
    /// Removes this spool's files: they mean nothing to another process.
    fn drop(&mut self) {
        self.reader = None;
        self.writer = None;
        for segment in self.segments.drain(..) {
            remove_segment(&segment.path);
        }
    }
}

/// Deletes a segment file. A failure only costs disk space until someone removes the
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

fn encode_header(batch: &Spooled, frame_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..12].copy_from_slice(&batch.sequence.to_le_bytes());
    h[12..14].copy_from_slice(&batch.interface_id.to_le_bytes());
    h[14..18].copy_from_slice(&batch.packets.to_le_bytes());
    h[18..26].copy_from_slice(&batch.raw_len.to_le_bytes());
    h[26..30].copy_from_slice(&frame_len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[4..30]);
    crc.update(&batch.frame);
    h[30..34].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Reads the record at the reader's position, `segment` being the file it reads.
fn read_record(reader: &mut Reader, segment: &Segment) -> io::Result<Spooled> {
    let at = reader.offset;
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
    let mut h = [0u8; HEADER_LEN];
    reader
        .file
        .read_exact(&mut h)
        .map_err(|e| read_error(path, at, e))?;
    if h[0..4] != MAGIC {
        return Err(corrupt("no record starts there"));
    }
    let frame_len = u32::from_le_bytes(field(&h, 26)) as u64;
    // The header is not checked yet, so its length must not decide an allocation: what
    // this segment still holds bounds it.
    if HEADER_LEN as u64 + frame_len > segment.bytes {
        return Err(corrupt("the record length runs past the segment"));
    }
    let mut frame = vec![0u8; frame_len as usize];
    reader
        .file
        .read_exact(&mut frame)
        .map_err(|e| read_error(path, at, e))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[4..30]);
    crc.update(&frame);
    if crc.finalize() != u32::from_le_bytes(field(&h, 30)) {
        return Err(corrupt("checksum mismatch"));
    }
    reader.offset += HEADER_LEN as u64 + frame_len;
    Ok(Spooled {
        sequence: u64::from_le_bytes(field(&h, 4)),
        interface_id: u16::from_le_bytes(field(&h, 12)),
        packets: u32::from_le_bytes(field(&h, 14)),
        raw_len: u64::from_le_bytes(field(&h, 18)),
        frame: Bytes::from(frame),
    })
}

/// `N` header bytes from `at`.
fn field<const N: usize>(h: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&h[at..at + N]);
    out
}

/// Writes header and frame with as few system calls as the kernel allows (one, normally).
fn write_all_vectored(file: &mut File, header: &[u8], frame: &[u8]) -> io::Result<()> {
    let mut slices = [IoSlice::new(header), IoSlice::new(frame)];
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

/// The usual causes in words that fit in a sentence; anything else as the system says it.
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

        /// The names of the files in it, sorted.
        fn files(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
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

    fn flip_byte(path: &Path, at: u64) {
        let mut data = fs::read(path).unwrap();
        data[at as usize] ^= 0x40;
        fs::write(path, data).unwrap();
    }

    #[test]
    fn keeps_fifo_order_across_segments() {
        let dir = TempDir::new("fifo");
        let mut spool = Spool::open_with(&dir.0, 1, u64::MAX, 1000).unwrap();
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
        assert!(dir.files().len() > 10, "{:?}", dir.files());
        for b in &batches {
            assert_eq!(spool.pop().unwrap().as_ref(), Some(b));
        }
        assert_eq!(spool.pop().unwrap(), None);
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert_eq!(dir.files(), Vec::<String>::new());
    }

    #[test]
    fn interleaved_pushes_and_pops_match_a_queue() {
        let dir = TempDir::new("interleaved");
        let mut spool = Spool::open_with(&dir.0, 2, 20_000, 2_000).unwrap();
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
                assert_eq!(spool.pop().unwrap(), model.pop_front());
            }
            assert_eq!(spool.len(), model.len());
            assert_eq!(
                spool.bytes(),
                model.iter().map(Spooled::record_len).sum::<u64>()
            );
        }
        while let Some(b) = model.pop_front() {
            assert_eq!(spool.pop().unwrap(), Some(b));
        }
        assert_eq!(spool.pop().unwrap(), None);
        assert_eq!(dir.files(), Vec::<String>::new());
    }

    #[test]
    fn refuses_past_the_cap_and_has_room_again_after_pops() {
        let dir = TempDir::new("cap");
        let record = HEADER_LEN as u64 + 100;
        let mut spool = Spool::open_with(&dir.0, 3, 3 * record, 1 << 20).unwrap();
        for s in 1..=3 {
            assert!(spool.push(&batch(s, 100)).unwrap());
        }
        assert_eq!(spool.bytes(), 3 * record);
        let on_disk = fs::metadata(dir.0.join(&dir.files()[0])).unwrap().len();
        assert_eq!(on_disk, 3 * record);

        // Even one byte over is refused, and nothing is written.
        assert!(!spool.push(&batch(4, 1)).unwrap());
        assert!(!spool.push(&batch(4, 100)).unwrap());
        assert_eq!(spool.len(), 3);
        assert_eq!(spool.bytes(), 3 * record);
        let on_disk = fs::metadata(dir.0.join(&dir.files()[0])).unwrap().len();
        assert_eq!(on_disk, 3 * record);

        assert_eq!(spool.pop().unwrap().unwrap().sequence, 1);
        assert_eq!(spool.bytes(), 2 * record);
        assert!(!spool.push(&batch(4, 101)).unwrap());
        assert!(spool.push(&batch(4, 100)).unwrap());
        assert_eq!(spool.bytes(), 3 * record);
        let order: Vec<u64> = std::iter::from_fn(|| spool.pop().unwrap())
            .map(|b| b.sequence)
            .collect();
        assert_eq!(order, [2, 3, 4]);

        // A cap below one header takes nothing.
        let mut tiny = Spool::open_with(&dir.0, 4, HEADER_LEN as u64 - 1, 1 << 20).unwrap();
        assert!(!tiny.push(&batch(1, 0)).unwrap());
        assert!(tiny.is_empty());
    }

    #[test]
    fn deletes_segments_as_they_are_consumed_and_on_drop() {
        let dir = TempDir::new("delete");
        let record = HEADER_LEN as u64 + 100;
        // Two records per segment.
        let mut spool = Spool::open_with(&dir.0, 0xabc, u64::MAX, 2 * record).unwrap();
        for s in 1..=6 {
            spool.push(&batch(s, 100)).unwrap();
        }
        let prefix = "capstream-0000000000000abc-";
        assert_eq!(
            dir.files(),
            [0, 1, 2].map(|n| format!("{prefix}{n:06}.spool"))
        );
        spool.pop().unwrap();
        assert_eq!(dir.files().len(), 3);
        spool.pop().unwrap();
        assert_eq!(dir.files(), [1, 2].map(|n| format!("{prefix}{n:06}.spool")));
        // Emptying the back segment, the one being written, deletes it too; the next
        // push starts a new one.
        for _ in 0..4 {
            spool.pop().unwrap();
        }
        assert_eq!(dir.files(), Vec::<String>::new());
        spool.push(&batch(7, 100)).unwrap();
        assert_eq!(dir.files(), [format!("{prefix}000003.spool")]);
        spool.push(&batch(8, 100)).unwrap();
        spool.push(&batch(9, 100)).unwrap();
        assert_eq!(dir.files().len(), 2);
        drop(spool);
        assert_eq!(dir.files(), Vec::<String>::new());
        assert!(dir.0.is_dir());
    }

    #[test]
    fn a_damaged_frame_is_an_error_naming_the_file() {
        let dir = TempDir::new("corrupt-frame");
        let record = HEADER_LEN as u64 + 50;
        let mut spool = Spool::open_with(&dir.0, 5, u64::MAX, 3 * record).unwrap();
        for s in 1..=5 {
            spool.push(&batch(s, 50)).unwrap();
        }
        // Segment 0 holds batches 1 to 3; damage the frame of batch 2.
        let first = dir.0.join(&dir.files()[0]);
        flip_byte(&first, record + HEADER_LEN as u64 + 10);
        assert_eq!(spool.pop().unwrap().unwrap().sequence, 1);
        let err = spool.pop().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(msg.contains(&first.display().to_string()), "{msg}");
        assert!(msg.contains("checksum mismatch"), "{msg}");
        assert!(msg.ends_with("; dropped the 2 batches left in it"), "{msg}");
        // Batches 2 and 3 went with their segment; the next one reads fine.
        assert_eq!(spool.len(), 2);
        assert_eq!(spool.bytes(), 2 * record);
        assert!(!first.exists());
        assert_eq!(spool.pop().unwrap().unwrap().sequence, 4);
        assert_eq!(spool.pop().unwrap().unwrap().sequence, 5);
        assert_eq!(spool.pop().unwrap(), None);
    }

    #[test]
    fn damaged_headers_and_short_files_are_errors() {
        let record = HEADER_LEN as u64 + 50;
        // Magic, sequence, frame length: each is caught before anything is returned.
        for (at, what) in [
            (0, "no record starts there"),
            (5, "checksum mismatch"),
            (29, "the record length runs past the segment"),
        ] {
            let dir = TempDir::new("corrupt-header");
            let mut spool = Spool::open(&dir.0, 6, u64::MAX).unwrap();
            spool.push(&batch(1, 50)).unwrap();
            spool.push(&batch(2, 50)).unwrap();
            flip_byte(&dir.0.join(&dir.files()[0]), at);
            let msg = spool.pop().unwrap_err().to_string();
            assert!(msg.contains(what), "{msg}");
            assert!(msg.contains("corrupt at byte 0"), "{msg}");
            assert!(spool.is_empty());
            assert_eq!(spool.pop().unwrap(), None);
            // The spool goes on working.
            spool.push(&batch(3, 50)).unwrap();
            assert_eq!(spool.pop().unwrap().unwrap().sequence, 3);
        }

        // A file cut short, as by someone else's truncation.
        let dir = TempDir::new("short");
        let mut spool = Spool::open(&dir.0, 7, u64::MAX).unwrap();
        spool.push(&batch(1, 50)).unwrap();
        spool.push(&batch(2, 50)).unwrap();
        let file = dir.0.join(&dir.files()[0]);
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(record + 20)
            .unwrap();
        assert_eq!(spool.pop().unwrap().unwrap().sequence, 1);
        let msg = spool.pop().unwrap_err().to_string();
        assert!(msg.contains(&format!("corrupt at byte {record}")), "{msg}");
        assert!(msg.contains("cut short"), "{msg}");

        // A file removed behind the spool's back.
        spool.push(&batch(3, 50)).unwrap();
        fs::remove_file(dir.0.join(&dir.files()[0])).unwrap();
        let err = spool.pop().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains("cannot read spool file"), "{err}");
        assert!(spool.is_empty());
    }

    #[test]
    fn two_sessions_share_a_directory() {
        let dir = TempDir::new("shared");
        let mut a = Spool::open_with(&dir.0, 0xa, u64::MAX, 500).unwrap();
        let mut b = Spool::open_with(&dir.0, 0xb, u64::MAX, 500).unwrap();
        for s in 1..=10 {
            a.push(&batch(s, 200)).unwrap();
            b.push(&batch(100 + s, 150)).unwrap();
        }
        for s in 1..=10 {
            assert_eq!(a.pop().unwrap(), Some(batch(s, 200)));
        }
        assert_eq!(a.pop().unwrap(), None);
        drop(a);
        assert!(dir
            .files()
            .iter()
            .all(|f| f.starts_with("capstream-000000000000000b-")));
        assert_eq!(b.len(), 10);
        for s in 1..=10 {
            assert_eq!(b.pop().unwrap(), Some(batch(100 + s, 150)));
        }
    }

    #[test]
    fn open_removes_leftovers_of_its_own_session_only() {
        let dir = TempDir::new("leftovers");
        let mine = dir.0.join("capstream-00000000000000c1-000000.spool");
        let theirs = dir.0.join("capstream-00000000000000c2-000000.spool");
        let other = dir.0.join("capstream-00000000000000c1-notes.txt");
        for f in [&mine, &theirs, &other] {
            fs::write(f, b"old").unwrap();
        }
        let mut spool = Spool::open(&dir.0, 0xc1, u64::MAX).unwrap();
        assert!(!mine.exists());
        assert!(theirs.exists());
        assert!(other.exists());
        // Numbering starts again at 0, in a fresh file.
        spool.push(&batch(1, 10)).unwrap();
        assert!(mine.exists());
        assert_eq!(spool.pop().unwrap(), Some(batch(1, 10)));
    }

    #[test]
    fn open_creates_the_directory() {
        let dir = TempDir::new("create");
        let nested = dir.0.join("a/b");
        let mut spool = Spool::open(&nested, 9, 1 << 20).unwrap();
        assert!(spool.push(&batch(1, 10)).unwrap());
        assert_eq!(spool.pop().unwrap(), Some(batch(1, 10)));
    }

    #[test]
    fn an_unusable_directory_is_a_clear_error() {
        // Root may write anywhere, but nobody can make a directory under a regular file.
        let dir = TempDir::new("unusable");
        let file = dir.0.join("plain-file");
        fs::write(&file, b"").unwrap();
        let bad = file.join("spool");
        let err = Spool::open(&bad, 1, 1 << 20).err().unwrap();
        let msg = err.to_string();
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
        for segment_bytes in [SEGMENT_BYTES, HEADER_LEN as u64 + 100_000] {
            disk_full(&tmp.0, segment_bytes);
        }
    }

    fn disk_full(dir: &Path, segment_bytes: u64) {
        let mut spool = Spool::open_with(dir, 0xf0, u64::MAX, segment_bytes).unwrap();
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
        // The torn record was cut off: the files hold exactly the records pushed, and
        // pops give them back.
        let on_disk: u64 = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, spool.bytes());
        // A segment the failing push started is gone, not left empty.
        assert!(fs::read_dir(dir)
            .unwrap()
            .all(|e| e.unwrap().metadata().unwrap().len() > 0));
        for s in 1..=pushed {
            assert_eq!(spool.pop().unwrap(), Some(batch(s, 100_000)));
        }
        assert_eq!(spool.pop().unwrap(), None);
        // With its segment consumed and deleted, the space is back.
        assert!(spool.push(&batch(pushed + 1, 100_000)).unwrap());
        assert_eq!(spool.pop().unwrap(), Some(batch(pushed + 1, 100_000)));
    }
}
