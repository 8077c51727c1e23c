//! The intent journal beside the output: which batch of which sensor session the files
//! hold, so that a receiver restarted after a crash tells each resuming sensor exactly where
//! to go on, and no packet is written twice or lost.
//!
//! Before each flush that writes anything, the journal is replaced (a temporary file
//! renamed over it) with, for every file the flush appends to, its length before and after,
//! and the sessions' frontiers before and after. At start, if every file reached its
//! "after" length, the "after" frontiers hold; else the "before" ones do and every file is
//! cut back to its "before" length (a file the flush created is removed: it held only
//! batches no sensor was told are written).
//!
//! What it guarantees: exactly-once output across a crash of the receiver process (kill -9,
//! abort, out of memory), as the kernel keeps what was written. Not across a power loss or
//! a kernel crash: neither the journal nor the files are synced to the disk (that would
//! cost a disk round trip per writer round); then delivery is at least once, as before.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use program::private_file::{create as create_private, open_existing};

/// Sessions a journal remembers at most (more are not read back).
pub const MAX_SESSIONS: usize = 4096;
/// A journal larger than this is not read.
const MAX_JOURNAL_LEN: u64 = 16 << 20;
const HEADER: &str = "capstream-journal 1";

/// What one flush appends to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub path: PathBuf,
    pub before: u64,
    pub after: u64,
}

/// The first records of a batch that are in the output, the rest not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialBatch {
    pub interface_id: u16,
    pub sequence: u64,
    pub records: u64,
}

/// How much of one sensor session the output holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    pub session: u64,
    /// SHA-256 of the session's secret: only its owner may resume it.
    pub secret_hash: [u8; 32],
    /// Every batch up to this one.
    pub acked: u64,
    /// Batches above `acked` that are whole in the output.
    pub done: Vec<u64>,
    /// Batches of which the first records are.
    pub partial: Vec<PartialBatch>,
}

pub struct Journal {
    path: PathBuf,
    tmp: PathBuf,
    /// What the file gets, built anew each time.
    text: String,
    frontiers: Vec<Frontier>,
    /// The frontiers at the end of the last completed flush, as text: the next "before".
    last: String,
    /// Those of the flush under way, once its journal is written.
    next: Option<String>,
    /// A buffer kept for the next "after".
    spare: String,
}

impl Journal {
    /// Opens the journal at `path`; if an earlier run left one, applies it: cuts the files
    /// back where its last flush did not complete, and returns the sessions' frontiers.
    pub fn open(path: PathBuf) -> io::Result<(Self, Vec<Frontier>)> {
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let mut journal = Self {
            path,
            tmp: tmp.into(),
            text: String::new(),
            frontiers: Vec::new(),
            last: String::new(),
            next: None,
            spare: String::new(),
        };
        let frontiers = journal.recover()?;
        Ok((journal, frontiers))
    }

    fn recover(&mut self) -> io::Result<Vec<Frontier>> {
        let mut text = String::new();
        match open_existing(&self.path) {
            Ok(file) => {
                if file.metadata()?.len() > MAX_JOURNAL_LEN {
                    tracing::warn!("{}: too large; ignored", self.path.display());
                    return Ok(Vec::new());
                }
                let mut file: File = file;
                if file.read_to_string(&mut text).is_err() {
                    tracing::warn!("{}: not text; ignored", self.path.display());
                    return Ok(Vec::new());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        let Some(parsed) = parse(&text) else {
            tracing::warn!(
                "{}: damaged (not written by this version?); ignored: sensors resuming now \
                 may have batches written twice",
                self.path.display()
            );
            return Ok(Vec::new());
        };
        let completed = parsed.extents.iter().all(|e| reached(&e.path, e.after));
        let (chosen, section) = if completed {
            (parsed.after, parsed.after_text)
        } else {
            for extent in &parsed.extents {
                cut_back(extent)?;
            }
            (parsed.before, parsed.before_text)
        };
        self.last = section.to_string();
        Ok(chosen)
    }

    /// Writes the journal for the flush that appends `extents`; `frontiers` fills in
    /// where every session will stand once it is done.
    pub fn record(
        &mut self,
        extents: &[Extent],
        frontiers: &mut dyn FnMut(&mut Vec<Frontier>),
    ) -> io::Result<()> {
        self.frontiers.clear();
        frontiers(&mut self.frontiers);
        let mut after = std::mem::take(&mut self.spare);
        after.clear();
        for f in self.frontiers.iter().take(MAX_SESSIONS) {
            write_frontier(&mut after, f);
        }
        self.text.clear();
        self.text.push_str(HEADER);
        self.text.push('\n');
        for e in extents {
            let _ = writeln!(
                self.text,
                "file {} {} {}",
                e.before,
                e.after,
                hex(&path_bytes(&e.path))
            );
        }
        self.text.push_str("before\n");
        self.text.push_str(&self.last);
        self.text.push_str("after\n");
        self.text.push_str(&after);
        self.text.push_str("end\n");
        self.next = Some(after);
        self.replace()
    }

    /// At a clean exit, with every file complete: the journal keeps the sessions that may
    /// still come back (of an earlier run, not back yet), and goes if there are none.
    pub fn close(&mut self, frontiers: &mut dyn FnMut(&mut Vec<Frontier>)) -> io::Result<()> {
        self.frontiers.clear();
        frontiers(&mut self.frontiers);
        if self.frontiers.is_empty() {
            return match fs::remove_file(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let leftover = std::mem::take(&mut self.frontiers);
        self.record(&[], &mut |out| out.extend(leftover.iter().cloned()))?;
        self.committed();
        Ok(())
    }

    /// The flush the journal was written for completed: its "after" is the next "before".
    pub fn committed(&mut self) {
        if let Some(next) = self.next.take() {
            self.spare = std::mem::replace(&mut self.last, next);
        }
    }

    /// Writes the text to a new temporary file and renames it over the journal: a reader
    /// finds the old journal or the new one, whole.
    fn replace(&mut self) -> io::Result<()> {
        match fs::remove_file(&self.tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = create_private(&self.tmp)?;
        file.write_all(self.text.as_bytes())?;
        drop(file);
        fs::rename(&self.tmp, &self.path)
    }
}

/// Whether the file is at least `len` long. A file gone since was completed and deleted
/// (`--keep`), or moved away by someone: nothing to cut there either way.
fn reached(path: &Path, len: u64) -> bool {
    fs::symlink_metadata(path).map_or(true, |m| m.len() >= len)
}

/// Undoes one file's part of a flush that did not complete.
fn cut_back(extent: &Extent) -> io::Result<()> {
    let shown = extent.path.display();
    if extent.before == 0 {
        match fs::remove_file(&extent.path) {
            Ok(()) => tracing::warn!(
                "{shown}: removed, made by a write the previous run did not complete"
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        return Ok(());
    }
    let file = match open_existing(&extent.path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len > extent.before {
        file.set_len(extent.before)?;
        tracing::warn!(
            "{shown}: cut from {len} to {} bytes, the end of the last write the previous run \
             completed (the sensors send the rest again)",
            extent.before
        );
    }
    Ok(())
}

struct Parsed<'a> {
    extents: Vec<Extent>,
    before: Vec<Frontier>,
    before_text: &'a str,
    after: Vec<Frontier>,
    after_text: &'a str,
}

fn parse(text: &str) -> Option<Parsed<'_>> {
    let rest = text.strip_prefix(HEADER)?.strip_prefix('\n')?;
    let (files, rest) = rest.split_once("before\n")?;
    let (before_text, rest) = rest.split_once("after\n")?;
    let (after_text, rest) = rest.split_once("end\n")?;
    if !rest.is_empty() {
        return None;
    }
    let extents = files
        .lines()
        .map(|line| {
            let mut words = line.strip_prefix("file ")?.split(' ');
            let before = words.next()?.parse().ok()?;
            let after = words.next()?.parse().ok()?;
            let path = path_from_bytes(unhex(words.next()?)?)?;
            Some(Extent {
                path,
                before,
                after,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Parsed {
        extents,
        before: parse_frontiers(before_text)?,
        before_text,
        after: parse_frontiers(after_text)?,
        after_text,
    })
}

/// `session ID SECRET ACKED DONE,... IFACE:SEQ:RECORDS,...` (`-` for an empty list).
fn write_frontier(out: &mut String, f: &Frontier) {
    let _ = write!(
        out,
        "session {:x} {} {} ",
        f.session,
        hex(&f.secret_hash),
        f.acked
    );
    if f.done.is_empty() {
        out.push('-');
    }
    for (i, d) in f.done.iter().enumerate() {
        let _ = write!(out, "{}{d}", if i > 0 { "," } else { "" });
    }
    out.push(' ');
    if f.partial.is_empty() {
        out.push('-');
    }
    for (i, p) in f.partial.iter().enumerate() {
        let sep = if i > 0 { "," } else { "" };
        let _ = write!(out, "{sep}{}:{}:{}", p.interface_id, p.sequence, p.records);
    }
    out.push('\n');
}

fn parse_frontiers(text: &str) -> Option<Vec<Frontier>> {
    text.lines()
        .take(MAX_SESSIONS)
        .map(|line| {
            let mut words = line.strip_prefix("session ")?.split(' ');
            let session = u64::from_str_radix(words.next()?, 16).ok()?;
            let secret_hash = unhex(words.next()?)?.try_into().ok()?;
            let acked = words.next()?.parse().ok()?;
            let done = list(words.next()?)
                .map(|d| d.parse().ok())
                .collect::<Option<Vec<u64>>>()?;
            let partial = list(words.next()?)
                .map(|p| {
                    let mut parts = p.split(':');
                    Some(PartialBatch {
                        interface_id: parts.next()?.parse().ok()?,
                        sequence: parts.next()?.parse().ok()?,
                        records: parts.next()?.parse().ok()?,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Frontier {
                session,
                secret_hash,
                acked,
                done,
                partial,
            })
        })
        .collect()
}

/// The items of a comma-separated list, `-` being empty.
fn list(words: &str) -> impl Iterator<Item = &str> {
    words.split(',').filter(|w| *w != "-")
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A path as the journal stores it: its bytes (any bytes on Unix, UTF-8 elsewhere).
fn path_bytes(path: &Path) -> Vec<u8> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt as _;
        path.as_os_str().as_bytes().to_vec()
    }
    #[cfg(not(unix))]
    {
        path.to_string_lossy().into_owned().into_bytes()
    }
}

/// A path back from the journal; `None` for bytes no path here has.
fn path_from_bytes(bytes: Vec<u8>) -> Option<PathBuf> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt as _;
        Some(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
    }
    #[cfg(not(unix))]
    {
        String::from_utf8(bytes).ok().map(PathBuf::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(label: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("capstream-journal-{label}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn frontier(session: u64, acked: u64) -> Frontier {
        Frontier {
            session,
            secret_hash: [7; 32],
            acked,
            done: vec![acked + 2, acked + 5],
            partial: vec![PartialBatch {
                interface_id: 1,
                sequence: acked + 1,
                records: 3,
            }],
        }
    }

    /// One journaled flush of `data` to `file`, stopped (as a crash) before or after the
    /// append.
    fn flush(journal: &mut Journal, file: &Path, data: &[u8], acked: u64, append: bool) {
        let before = fs::metadata(file).map_or(0, |m| m.len());
        let extent = Extent {
            path: file.to_path_buf(),
            before,
            after: before + data.len() as u64,
        };
        journal
            .record(&[extent], &mut |out| out.push(frontier(1, acked)))
            .unwrap();
        if append {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file)
                .unwrap();
            f.write_all(data).unwrap();
            journal.committed();
        }
    }

    #[test]
    fn a_completed_flush_holds_and_an_incomplete_one_is_undone() {
        let dir = Dir::new("undo");
        let path = dir.0.join(".cap.journal");
        let file = dir.0.join("cap.pcap");
        let other = dir.0.join("cap-1.pcap");
        let (mut journal, found) = Journal::open(path.clone()).unwrap();
        assert!(found.is_empty());
        flush(&mut journal, &file, b"0123456789", 10, true);
        flush(&mut journal, &file, b"abcdef", 20, true);
        drop(journal);
        let (mut journal, found) = Journal::open(path.clone()).unwrap();
        assert_eq!(found, [frontier(1, 20)], "the last flush completed");
        assert_eq!(fs::read(&file).unwrap(), b"0123456789abcdef");

        // A flush over two files, torn: the first got its bytes, the new one some.
        let before = fs::metadata(&file).unwrap().len();
        let extents = [
            Extent {
                path: file.clone(),
                before,
                after: before + 4,
            },
            Extent {
                path: other.clone(),
                before: 0,
                after: 8,
            },
        ];
        journal
            .record(&extents, &mut |out| out.push(frontier(1, 30)))
            .unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap()
            .write_all(b"WXYZ")
            .unwrap();
        fs::write(&other, b"half").unwrap();
        drop(journal);
        let (_, found) = Journal::open(path.clone()).unwrap();
        assert_eq!(found, [frontier(1, 20)], "the flush before holds");
        assert_eq!(fs::read(&file).unwrap(), b"0123456789abcdef");
        assert!(!other.exists(), "the file made by the torn flush is gone");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_damaged_journal_is_ignored_and_symlinks_are_not_followed() {
        let dir = Dir::new("damaged");
        let path = dir.0.join(".cap.journal");
        fs::write(&path, "capstream-journal 1\nfile x\n").unwrap();
        let (_, found) = Journal::open(path.clone()).unwrap();
        assert!(found.is_empty());
        fs::remove_file(&path).unwrap();
        let target = dir.0.join("target");
        fs::write(&target, "keep").unwrap();
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        let (mut journal, _) = Journal::open(path.clone()).unwrap();
        journal.record(&[], &mut |_| {}).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert!(parse(&fs::read_to_string(&path).unwrap()).is_some());
        // A clean exit: kept while a session may come back, gone once none may.
        journal.close(&mut |out| out.push(frontier(3, 1))).unwrap();
        let (mut journal, found) = Journal::open(path.clone()).unwrap();
        assert_eq!(found, [frontier(3, 1)]);
        journal.close(&mut |_| {}).unwrap();
        assert!(!path.exists());
    }

    use std::os::unix::fs::PermissionsExt as _;
}
