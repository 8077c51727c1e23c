//! A file that only ever holds whole flushes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;

use super::naming::with_counter;

/// Numbered variants tried before giving up on a name.
const MAX_COUNTER: u32 = 10_000;

/// How a file comes into being on its first flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Replace a file of that name (one file per output, as before).
    Replace,
    /// Never replace one: take the name with a counter (`cap-1.pcap`, ...) instead.
    New,
}

/// Writes collect in memory; a flush appends them. When the append fails (disk full), the
/// file is cut back to the end of the last good flush and the bytes are kept for the next
/// try: a reader never finds a torn record, and nothing is lost while space is short. The
/// file itself is created on the first flush, so that making it, too, is retried rather than
/// failing a write.
pub struct Committed {
    path: PathBuf,
    create: Create,
    counter: u32,
    file: Option<File>,
    pending: Vec<u8>,
    /// Length of the file's complete part.
    committed: u64,
}

impl Committed {
    /// `create` says how the file is made; with [`Create::New`], counters are tried from
    /// `counter` on (0: the name as it is).
    pub fn new(path: PathBuf, create: Create, counter: u32) -> Self {
        Self {
            path,
            create,
            counter,
            file: None,
            pending: Vec::with_capacity(1 << 20),
            committed: 0,
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

    fn open(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            self.file = Some(match self.create {
                Create::Replace => File::create(&self.path)?,
                Create::New => self.create_new()?,
            });
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
            match OpenOptions::new().write(true).create_new(true).open(&path) {
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
