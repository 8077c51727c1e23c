//! Files the receiver makes hold other people's traffic or its secrets: created for its
//! user alone whatever the umask, never over an existing file, never through a symlink.

use std::fs::{File, OpenOptions};
use std::io;
#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Owner read and write only.
#[cfg(unix)]
const MODE: u32 = 0o600;

/// Creates `path`, which must not exist, readable and writable by its owner only.
pub fn create(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(MODE).custom_flags(libc::O_NOFOLLOW);
    let file = options.open(path)?;
    // The mode given to open is cut by the umask; this is not.
    #[cfg(unix)]
    file.set_permissions(std::fs::Permissions::from_mode(MODE))?;
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
