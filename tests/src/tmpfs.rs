//! A small tmpfs, for running a program out of disk space on purpose. Unmounted (and its
//! mount point removed) on drop, including after a failed assertion.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::run;

pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes (rounded up to pages) on a new directory under the
    /// temporary directory.
    pub fn mount(label: &str, size: u64) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "capstream-tmpfs-{label}-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)?;
        let dir = path.to_string_lossy().into_owned();
        let options = format!("size={size},mode=0755");
        if let Err(e) = run("mount", &["-t", "tmpfs", "-o", &options, "tmpfs", &dir]) {
            let _ = std::fs::remove_dir(&path);
            return Err(e.context("mount -t tmpfs (are you root?)"));
        }
        Ok(Self { path })
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Bytes an unprivileged writer could still add (statvfs f_bavail).
    pub fn available(&self) -> Result<u64> {
        available(&self.path)
    }

    /// Writes a ballast file that leaves about `free` bytes available, and returns its
    /// path; removing it gives the space back.
    pub fn fill_leaving(&self, free: u64) -> Result<PathBuf> {
        let ballast = self.join("ballast");
        let size = self.available()?.saturating_sub(free);
        let mut file = std::fs::File::create(&ballast)?;
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n])
                .with_context(|| format!("writing the ballast, {left} bytes to go"))?;
            left -= n as u64;
        }
        file.sync_all()?;
        Ok(ballast)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let dir = self.path.to_string_lossy().into_owned();
        // A process still using it (one that outlived its test) must not keep it mounted:
        // then detach it lazily.
        if run("umount", &[&dir]).is_err() {
            let _ = run("umount", &["-l", &dir]);
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Bytes available to an unprivileged writer on the file system holding `path`.
pub fn available(path: &Path) -> Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the struct we own; `c` is a valid C string.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "statvfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}
