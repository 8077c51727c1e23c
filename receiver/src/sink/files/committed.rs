//! A file that only ever holds whole flushes.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;

use super::journal::Extent;
use super::naming::with_counter;

/// Numbered variants tried before giving up on a name.
const MAX_COUNTER: u32 = 10_000;

/// Writes collect in memory; a flush appends them. When the append fails (disk full), the
/// file is cut back to the end of the last good flush and the bytes are kept for the next
/// try: a reader never finds a torn record, and nothing is lost while space is short. A new
/// file is created on the first flush (or when the journal asks for its name), so that
/// making it, too, is retried rather than failing a write; it never replaces a file.
pub struct Committed {
    path: PathBuf,
    counter: u32,
    file: Option<File>,
    pending: Vec<u8>,
    /// Length of the file's complete part.
    committed: u64,
}

impl Committed {
    /// A new file: `path`, or with a counter from `counter` on (0: the name as it is) where
    /// a file of that name exists.
    pub fn new(path: PathBuf, counter: u32) -> Self {
        Self {
            path,
            counter,
            file: None,
            pending: Vec::with_capacity(1 << 20),
            committed: 0,
        }
    }

    /// A file an earlier run left, continued at its end (`len`).
    pub fn continuing(path: PathBuf, file: File, len: u64) -> Self {
        Self {
            path,
            counter: 0,
            file: Some(file),
            pending: Vec::with_capacity(1 << 20),
            committed: len,
        }
    }

    /// Bytes written so far, flushed or not.
    pub fn len(&self) -> u64 {
        self.committed + self.pending.len() as u64
    }

    /// Closes the file, complete once a flush succeeded; returns its name, final once it
    /// exists (a counter may have been added).
    pub fn close(self) -> PathBuf {
        self.path
    }

    /// What the next flush appends, once the file exists (so that its name is final):
    /// for the journal, written before.
    pub fn extent(&mut self) -> io::Result<Option<Extent>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        self.open()?;
        Ok(Some(Extent {
            path: self.path.clone(),
            before: self.committed,
            after: self.len(),
        }))
    }

    fn open(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            self.file = Some(self.create_new()?);
        }
        Ok(())
    }

    fn create_new(&mut self) -> io::Result<File> {
        let base = self.path.clone();
        for n in self.counter..=self.counter + MAX_COUNTER {
            let path = if n == 0 {
                base.clone()
            } else {
                with_counter(&base, n)
            };
            match program::private_file::create(&path) {
                Ok(file) => {
                    self.path = path;
                    return Ok(file);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} and {MAX_COUNTER} numbered variants of it exist already",
                base.display()
            ),
        ))
    }
}

impl Write for Committed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    /// Creates the file if need be (even with nothing to write), then appends.
    fn flush(&mut self) -> io::Result<()> {
        self.open()?;
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = file.write_all(&self.pending) {
            // Cut the torn tail, so that the file ends on a record boundary again.
            file.set_len(self.committed)?;
            file.seek(SeekFrom::Start(self.committed))?;
            return Err(e);
        }
        self.committed += self.pending.len() as u64;
        self.pending.clear();
        if self.pending.capacity() > 64 << 20 {
            // A burst grew it past a few writer rounds' worth; give the memory back. Not
            // sooner: growing it again each round costs a page fault per 4 KiB.
            self.pending.shrink_to(8 << 20);
        }
        Ok(())
    }
}
