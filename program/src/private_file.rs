//! Files only their owner reads (captures hold other people's traffic; keys and tokens are
//! secrets): created 0600 whatever the umask, never over an existing file, never through a
//! symlink; and files written whole or not at all, so that a reader (or an operator's
//! automation) finds the old file or the new one, never half of one. Both programs write
//! their `--summary-json` this way, the receiver its keys, and it creates its outputs and
//! journal with [`create`].
//!
//! The bytes go to a new file beside the target (created exclusively, mode 0600, never
//! through a symlink), which then replaces the target by rename: a symlink planted at the
//! target is replaced, not followed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Writes `data` to `path`, mode 0600, by a temporary file renamed over it.
pub fn write(path: &Path, data: &[u8]) -> io::Result<()> {
    Pending::create(path)?.commit(data)
}

/// Owner read and write only.
#[cfg(unix)]
const MODE: u32 = 0o600;

/// Creates `path` for its owner alone (0600 whatever the umask): never over an existing
/// file, never through a symlink.
pub fn create(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(MODE).custom_flags(libc::O_NOFOLLOW);
    let file = options.open(path)?;
    // The mode given to open is cut by the umask; this is not.
    #[cfg(unix)]
    file.set_permissions(fs::Permissions::from_mode(MODE))?;
    Ok(file)
}

/// Opens an existing file to read and continue, never through a symlink.
pub fn open_existing(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    #[cfg(unix)]
    options.custom_flags(libc::O_NOFOLLOW);
    options.open(path)
}

/// A file to be put at `path` later, its temporary file created now: a program that
/// writes it at exit finds out at start that it cannot, and holds its descriptor from
/// then on (the sensor's seccomp filter refuses writes to the descriptor numbers its
/// capture sockets had, which a file opened at exit could be given). Dropped without
/// [`Pending::commit`], it leaves nothing behind.
pub struct Pending {
    file: File,
    temp: PathBuf,
    path: PathBuf,
}

impl Pending {
    pub fn create(path: &Path) -> io::Result<Self> {
        let temp = temp_beside(path);
        Ok(Self {
            file: create(&temp)?,
            temp,
            path: path.to_path_buf(),
        })
    }

    /// Writes `data` and puts the file in place, replacing what was there.
    pub fn commit(mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.file.sync_all()?;
        fs::rename(&self.temp, &self.path)?;
        // In place: nothing left to remove on drop.
        self.temp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// A name beside `path` that no other writer in this or another process uses.
fn temp_beside(path: &Path) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy());
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_private_and_through_no_symlink() {
        let dir = std::env::temp_dir().join(format!("private-file-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("summary.json");
        drop(Pending::create(&path).unwrap());
        let names = || -> Vec<_> {
            fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        };
        assert!(
            names().is_empty(),
            "an uncommitted file leaves nothing behind"
        );
        write(&path, b"one").unwrap();
        write(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A symlink at the target is replaced, and what it points to left alone.
        let elsewhere = dir.join("elsewhere");
        fs::write(&elsewhere, b"keep").unwrap();
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        write(&path, b"three").unwrap();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"keep");
        assert_eq!(fs::read(&path).unwrap(), b"three");
        // Only the files themselves are left: no temporary beside them.
        assert_eq!(names().len(), 2, "{:?}", names());
        assert!(write(&dir.join("missing/summary.json"), b"x").is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
