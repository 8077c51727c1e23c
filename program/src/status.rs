//! The live status line: one line on stderr, redrawn in place about once a second, when
//! stderr is a terminal. Log lines go through [`Stderr`], which clears the status line
//! before each of them and draws it again after, so that the two never share a line.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// Erases the current terminal line and returns to its start.
const CLEAR: &str = "\r\x1b[2K";

/// The line on screen; `None` while no status is shown. Held while writing to stderr, so
/// that a log line and a redraw never interleave.
static LINE: Mutex<Option<String>> = Mutex::new(None);

/// Starts showing a status line if stderr is a terminal and `wanted`; says whether it does.
pub fn enable(wanted: bool) -> bool {
    let on = wanted && std::io::stderr().is_terminal();
    if on {
        *lock() = Some(String::new());
    }
    on
}

/// Replaces the status line, cut to the terminal's width (a wrapped line could not be
/// erased); does nothing unless [`enable`]d.
pub fn show(text: &str) {
    let mut line = lock();
    if let Some(current) = line.as_mut() {
        current.clear();
        current.extend(text.chars().take(width().saturating_sub(1)));
        let _ = write!(std::io::stderr().lock(), "{CLEAR}{current}");
    }
}

/// Columns of the terminal on stderr; 80 when it does not say.
#[cfg(unix)]
fn width() -> usize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ only writes a `winsize` through the pointer, which points to one.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

#[cfg(not(unix))]
fn width() -> usize {
    80
}

/// Erases the status line for good (before the exit summary).
pub fn clear() {
    if lock().take().is_some() {
        let _ = write!(std::io::stderr().lock(), "{CLEAR}");
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<String>> {
    // A panic while drawing leaves only a half-drawn line behind: keep going.
    LINE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// stderr for the log: each write (one whole log line) clears the status line first and
/// draws it again after.
#[derive(Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = lock();
        let mut err = std::io::stderr().lock();
        match line.as_deref() {
            Some(status) => {
                err.write_all(CLEAR.as_bytes())?;
                err.write_all(buf)?;
                err.write_all(status.as_bytes())?;
            }
            None => err.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// A rate between two readings of a counter taken `secs` apart.
pub fn per_second(before: u64, now: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        now.saturating_sub(before) as f64 / secs
    } else {
        0.0
    }
}

/// `1234567` as `1.23 M`, for a line that must stay short.
pub fn short(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2} G", n / 1e9),
        n if n >= 1e6 => format!("{:.2} M", n / 1e6),
        n if n >= 1e4 => format!("{:.1} k", n / 1e3),
        n => format!("{n:.0} "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_short_numbers() {
        assert_eq!(per_second(100, 350, 0.5), 500.0);
        assert_eq!(per_second(350, 100, 1.0), 0.0);
        assert_eq!(per_second(1, 2, 0.0), 0.0);
        assert_eq!(short(12.0), "12 ");
        assert_eq!(short(12_345.0), "12.3 k");
        assert_eq!(short(7_907_000.0), "7.91 M");
        assert_eq!(short(2.5e9), "2.50 G");
    }
}
