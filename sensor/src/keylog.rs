//! `--keylog`: follows NSS TLS key logs (the files SSLKEYLOGFILE names) and sends their new
//! lines to the receiver in batches of their own, in the same numbered, acknowledged and
//! spooled stream as packets, so that a key is written once and never lost silently.
//!
//! One thread polls every pattern (a path or a glob) [`POLL`]ly, like `tail -F`: it reads
//! what each file gained, starts again from the top of a file that shrank (truncated) or
//! whose inode changed (re-created), reads to its end a file that was deleted, and picks up
//! new files a glob matches. Files there at start are followed from their end: their
//! lines are keys of handshakes the sensor did not capture (with `--read`, from their
//! start: the file replayed holds those handshakes). Lines are checked
//! ([`protocol::KeyLogLine`]); malformed ones are counted and skipped. Memory is one read
//! buffer, one partial line and one batch: beyond, lines wait in the outbox like packets
//! (`--buffer`, `--spool-dir`), and lines that find it full are dropped and counted.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use protocol::{KeyLogLine, MAX_KEY_LOG_LINE};

use crate::batcher::{Batcher, Closed};
use crate::error::{Error, Result};
use crate::stats::KeyLogCounters;

/// How often the files are looked at: a key reaches the receiver well within its reorder
/// window (1 s by default), which holds the packets it decrypts.
const POLL: Duration = Duration::from_millis(50);
/// Bytes read from a file at once.
const READ_CHUNK: usize = 64 * 1024;
/// Files followed at once; a glob matching more leaves the rest, said once.
const MAX_FILES: usize = 256;

/// The `--keylog` patterns, checked: a bad glob is an error; one that matches nothing yet
/// is a warning (programs create the file when they first connect).
pub fn check_patterns(patterns: &[String]) -> Result<Vec<String>> {
    for pattern in patterns {
        let paths = glob::glob(pattern)
            .map_err(|e| Error::input(format!("--keylog {pattern}: not a valid glob: {e}")))?;
        if paths.flatten().next().is_none() {
            tracing::warn!("--keylog {pattern}: matches no file yet; followed once it exists");
        }
    }
    Ok(patterns.to_vec())
}

/// One file followed.
struct Followed {
    file: File,
    /// Device and inode: another pair at the same path is a new file.
    id: (u64, u64),
    offset: u64,
    /// The start of a line whose newline has not come yet.
    partial: Vec<u8>,
    /// Inside a line longer than [`MAX_KEY_LOG_LINE`]: skipped to its newline.
    overlong: bool,
}

pub struct Follower {
    patterns: Vec<String>,
    files: HashMap<PathBuf, Followed>,
    counters: Arc<KeyLogCounters>,
    buffer: Vec<u8>,
    said_too_many: bool,
    /// Files that could not be opened, said once each (a few: their number is bounded
    /// like the files followed).
    unreadable: HashSet<PathBuf>,
}

impl Follower {
    pub fn new(patterns: Vec<String>, counters: Arc<KeyLogCounters>) -> Self {
        Self {
            patterns,
            files: HashMap::new(),
            counters,
            buffer: vec![0; READ_CHUNK],
            said_too_many: false,
            unreadable: HashSet::new(),
        }
    }

    /// Follows the files until no capture runs any more (`captures` counts those still
    /// running), then sends what it holds. `whole_files`: files there at start are read
    /// from their start too (`--read`: the capture replayed is of the past).
    pub fn run(
        mut self,
        mut batcher: Batcher,
        captures: &AtomicUsize,
        whole_files: bool,
    ) -> Result<()> {
        self.scan(whole_files);
        let closed = |_: Closed| Error::runtime("the key log's batches have nowhere to go");
        loop {
            let last = captures.load(Relaxed) == 0;
            self.scan(true);
            self.read_all(&mut batcher).map_err(closed)?;
            batcher.send_now().map_err(closed)?;
            if last {
                return batcher.finish().map_err(closed);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Opens the files the patterns match that are not followed yet: `from_start` for
    /// files that appear while the sensor runs.
    fn scan(&mut self, from_start: bool) {
        let new: Vec<PathBuf> = self
            .patterns
            .iter()
            .filter_map(|pattern| glob::glob(pattern).ok())
            .flat_map(|paths| paths.flatten())
            .filter(|path| !self.files.contains_key(path))
            .collect();
        for path in new {
            if self.files.len() >= MAX_FILES {
                if !std::mem::replace(&mut self.said_too_many, true) {
                    tracing::warn!(
                        "--keylog: following {MAX_FILES} files already; {} and others are \
                         left",
                        path.display()
                    );
                }
                break;
            }
            self.follow(path, from_start);
        }
    }

    fn follow(&mut self, path: PathBuf, from_start: bool) {
        match open(&path, from_start) {
            Ok(Some(followed)) => {
                self.unreadable.remove(&path);
                self.files.insert(path, followed);
            }
            Ok(None) => {}
            // Gone between the listing and the open: seen again if it comes back.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                if self.unreadable.len() < MAX_FILES && self.unreadable.insert(path.clone()) {
                    tracing::warn!(
                        "--keylog {}: cannot read it ({e}); the sensor reads key logs as \
                         --user (default nobody) once it has given up its privileges",
                        path.display()
                    );
                }
            }
        }
    }

    /// Reads what every file gained; notices truncation, deletion and re-creation.
    fn read_all(&mut self, batcher: &mut Batcher) -> std::result::Result<(), Closed> {
        let paths: Vec<PathBuf> = self.files.keys().cloned().collect();
        for path in paths {
            let now_there = std::fs::metadata(&path).ok();
            let Some(followed) = self.files.get_mut(&path) else {
                continue;
            };
            // What the file we hold gained, even when the path is gone or is another file.
            let same = now_there
                .as_ref()
                .is_some_and(|m| file_id(m) == followed.id);
            if same
                && now_there
                    .as_ref()
                    .is_some_and(|m| m.len() < followed.offset)
            {
                tracing::info!(
                    "--keylog {}: truncated; reading it again from the top",
                    path.display()
                );
                followed.offset = 0;
                followed.partial.clear();
                followed.overlong = false;
            }
            read_new(followed, &mut self.buffer, &self.counters, batcher)?;
            if !same {
                // Deleted or replaced: a file there now is new, read from its start.
                self.files.remove(&path);
                if now_there.is_some() {
                    self.follow(path, true);
                }
            }
        }
        Ok(())
    }
}

/// Opens a file to follow; `Ok(None)` for what is not a regular file.
fn open(path: &std::path::Path, from_start: bool) -> io::Result<Option<Followed>> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    Ok(Some(Followed {
        file,
        id: file_id(&meta),
        offset: if from_start { 0 } else { meta.len() },
        partial: Vec::new(),
        overlong: false,
    }))
}

/// Reads from the file's offset to its end and batches each complete line.
fn read_new(
    followed: &mut Followed,
    buffer: &mut [u8],
    counters: &KeyLogCounters,
    batcher: &mut Batcher,
) -> std::result::Result<(), Closed> {
    if followed
        .file
        .seek(SeekFrom::Start(followed.offset))
        .is_err()
    {
        return Ok(());
    }
    loop {
        let n = match followed.file.read(buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(()),
        };
        followed.offset += n as u64;
        let now = unix_nanos();
        let mut rest = &buffer[..n];
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let piece = &rest[..end];
            rest = &rest[end + 1..];
            if std::mem::take(&mut followed.overlong) {
                counters.malformed.fetch_add(1, Relaxed);
                continue;
            }
            if followed.partial.is_empty() {
                send_line(piece, now, counters, batcher)?;
            } else {
                followed.partial.extend_from_slice(piece);
                let sent = send_line(&followed.partial, now, counters, batcher);
                followed.partial.clear();
                sent?;
            }
        }
        if !followed.overlong {
            followed.partial.extend_from_slice(rest);
            if followed.partial.len() > MAX_KEY_LOG_LINE {
                followed.partial.clear();
                followed.overlong = true;
            }
        }
    }
}

fn send_line(
    line: &[u8],
    now: u64,
    counters: &KeyLogCounters,
    batcher: &mut Batcher,
) -> std::result::Result<(), Closed> {
    match KeyLogLine::parse(line) {
        KeyLogLine::Secret { .. } => {
            batcher.push_tls_key_log(now, line.strip_suffix(b"\r").unwrap_or(line))
        }
        KeyLogLine::Nothing => Ok(()),
        KeyLogLine::Malformed => {
            counters.malformed.fetch_add(1, Relaxed);
            Ok(())
        }
    }
}

/// What tells a file from another created at the same path.
#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    let created = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
    (
        0,
        created.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
    )
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::atomic::AtomicU64;

    use tokio::sync::mpsc;

    use super::*;
    use crate::batcher::{Backpressure, Outgoing, SessionBatching};

    fn lines_sent(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(out) = rx.try_recv() {
            let mut buf = bytes::BytesMut::from(&out.batch.frame[..]);
            let Ok(Some(protocol::Message::Batch(batch))) = protocol::decode_frame(&mut buf) else {
                panic!("a batch");
            };
            lines.extend(
                batch
                    .packets()
                    .unwrap()
                    .map(|p| String::from_utf8(p.data.to_vec()).unwrap()),
            );
        }
        lines
    }

    #[test]
    fn lines_split_across_reads_long_lines_truncation_and_re_creation() {
        let dir = std::env::temp_dir().join(format!("capstream-keylog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.log");
        let _ = std::fs::remove_file(&path);
        let (tx, mut rx) = mpsc::channel(64);
        let session = SessionBatching::new(
            Arc::new(AtomicU64::new(1)),
            1,
            tx,
            1 << 16,
            Duration::from_secs(3600),
        );
        let counters = Arc::new(KeyLogCounters::default());
        let mut batcher = Batcher::new(session, 0, Arc::clone(&counters.lines), Backpressure::Drop);
        let glob = format!("{}/*.log", dir.display());
        let mut follower = Follower::new(vec![glob], Arc::clone(&counters));
        let step = |follower: &mut Follower, batcher: &mut Batcher| {
            follower.scan(true);
            follower.read_all(batcher).unwrap();
            batcher.send_now().unwrap();
        };
        let a = format!("CLIENT_RANDOM {} {}", "aa".repeat(32), "01".repeat(48));
        let b = format!("CLIENT_RANDOM {} {}", "bb".repeat(32), "02".repeat(48));
        let mut file = File::create(&path).unwrap();
        write!(file, "{a}\n{}", &b[..20]).unwrap();
        step(&mut follower, &mut batcher);
        assert_eq!(lines_sent(&mut rx), [a.as_str()]);
        let overlong = "A".repeat(MAX_KEY_LOG_LINE * 3);
        write!(file, "{}\n{overlong}\nbad line\n", &b[20..]).unwrap();
        step(&mut follower, &mut batcher);
        assert_eq!(lines_sent(&mut rx), [b.as_str()]);
        assert_eq!(counters.malformed.load(Relaxed), 2);
        // Truncated: read again from the top.
        file.set_len(0).unwrap();
        step(&mut follower, &mut batcher);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(file, "{b}").unwrap();
        step(&mut follower, &mut batcher);
        assert_eq!(lines_sent(&mut rx), [b.as_str()]);
        // Deleted and created again: the new file from its start.
        std::fs::remove_file(&path).unwrap();
        step(&mut follower, &mut batcher);
        std::fs::write(&path, format!("{a}\n")).unwrap();
        step(&mut follower, &mut batcher);
        assert_eq!(lines_sent(&mut rx), [a.as_str()]);
        assert_eq!(counters.lines.matched.load(Relaxed), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
