//! What both programs' `main` needs around the command line: one-line usage errors,
//! logging to stderr, the stop signals, and the shared token file.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use crate::{AuthToken, MAX_TOKEN_LEN};

/// Shortest shared token either program accepts: a guessable one would be no check at all.
pub const MIN_TOKEN_LEN: usize = 16;

/// Help and version go to stdout as clap renders them; a usage error becomes one line,
/// `PROGRAM: error: ...`, with exit code 2.
pub fn usage_error(program: &str, e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    // A command that does nothing without a subcommand (`receiver certs`): its help.
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(2);
    }
    let rendered = e.render().to_string();
    // clap's message spans several lines (what, then the arguments involved, then usage):
    // keep everything before the usage, joined.
    let what: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let what = what.join(" ");
    let what = what.strip_prefix("error: ").unwrap_or(&what);
    eprintln!("{program}: error: {what} (see '{program} --help')");
    ExitCode::from(2)
}

/// Logs to stderr at info level unless RUST_LOG says otherwise; colour only on a terminal.
/// Log lines clear the live status line (see [`crate::status`]) rather than run into it.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // object_store logs every retried request; the receiver's uploader says once why.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,object_store=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::status::Stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// SIGINT and SIGTERM on Unix; Ctrl-C elsewhere. The handlers are installed on creation, so
/// a signal that comes before the first wait is not lost.
pub struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    #[cfg(not(unix))]
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {})
    }

    #[cfg(unix)]
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    #[cfg(not(unix))]
    pub async fn next(&mut self) {
        if tokio::signal::ctrl_c().await.is_err() {
            // No console: never signalled.
            std::future::pending::<()>().await;
        }
    }
}

/// Reads a shared token file (`--token-file`): its content without surrounding whitespace,
/// [`MIN_TOKEN_LEN`] to [`MAX_TOKEN_LEN`] bytes. The second value is a warning to log when
/// others than the file's owner may read it. Errors never show the file's content.
pub fn read_token_file(path: &Path) -> Result<(AuthToken, Option<String>), String> {
    let shown = path.display();
    let raw = std::fs::read(path).map_err(|e| format!("cannot read token file {shown}: {e}"))?;
    let secret = raw.trim_ascii();
    if secret.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "token file {shown} holds {} byte(s), fewer than the {MIN_TOKEN_LEN} a token needs \
             (make one with: head -c 32 /dev/urandom | base64 > {shown})",
            secret.len()
        ));
    }
    let token = AuthToken::new(secret.to_vec()).ok_or_else(|| {
        format!(
            "token file {shown} holds {} bytes, more than the limit of {MAX_TOKEN_LEN}",
            secret.len()
        )
    })?;
    Ok((token, readable_by_others(path)))
}

#[cfg(unix)]
fn readable_by_others(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "token file {} may be read by others than its owner (mode {mode:03o}): \
             chmod 600 it",
            path.display()
        )
    })
}

#[cfg(not(unix))]
fn readable_by_others(_path: &Path) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_trimmed_and_bounded() {
        let dir = std::env::temp_dir().join(format!("common-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        let read = |content: &[u8]| {
            std::fs::write(&file, content).unwrap();
            read_token_file(&file)
        };
        let (token, _) = read(b"  0123456789abcdef0123\n").unwrap();
        assert_eq!(token.as_bytes(), b"0123456789abcdef0123");
        for bad in [
            &b""[..],
            b" \n",
            b"short-token\n",
            &[b'x'; MAX_TOKEN_LEN + 1],
        ] {
            let e = read(bad).unwrap_err();
            assert!(
                e.contains("token file") && !e.contains("short-token"),
                "{e}"
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            read(b"0123456789abcdef").unwrap();
            let mode = |m| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m));
            mode(0o644).unwrap();
            assert!(read_token_file(&file)
                .unwrap()
                .1
                .unwrap()
                .contains("chmod 600"));
            mode(0o600).unwrap();
            assert_eq!(read_token_file(&file).unwrap().1, None);
        }
        assert!(read_token_file(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
