//! The viewer token: what a person's tool proves to read packets from the receiver (a client
//! of the TLS live stream). It is not the sensors' token, which lets a host write packets:
//! each is refused where the other is asked for.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use protocol::AuthToken;

use crate::token::{self, ExpectedToken};

/// Its file in the state directory when `--viewer-token-file` is not given.
pub const FILE_NAME: &str = "viewer-token";

/// The viewer token in force.
pub struct ViewerToken {
    expected: ExpectedToken,
    /// Where it was read from, for the log and the commands the receiver prints.
    pub path: PathBuf,
    /// Whether this start created it (in the state directory).
    pub created: bool,
    /// Said once the start cannot be refused any more (e.g. a file others may read).
    pub warning: Option<String>,
}

impl ViewerToken {
    /// `--viewer-token-file` (`given`), else `<state_dir>/viewer-token`, created on first
    /// need as the sensors' token is (64 hex digits, mode 0600). The file's content without
    /// surrounding whitespace is the token, at least 16 bytes. `state_dir` is asked only
    /// when no file is given.
    pub fn load(
        given: Option<&Path>,
        state_dir: impl FnOnce() -> anyhow::Result<PathBuf>,
    ) -> anyhow::Result<Self> {
        let (path, created) = match given {
            Some(path) => (path.to_path_buf(), false),
            None => {
                let path = state_dir()?.join(FILE_NAME);
                let created = token::load_or_create(&path)?;
                (path, created)
            }
        };
        let (token, warning) = program::cli::read_token_file(&path).map_err(|e| anyhow!(e))?;
        Ok(Self {
            expected: ExpectedToken::new(&token),
            path,
            created,
            warning,
        })
    }

    /// Whether `given` (what a client sent, without surrounding whitespace) is the token.
    pub fn matches(&self, given: &[u8]) -> bool {
        self.expected.matches(given)
    }

    /// Whether `other` (the sensors' token) is this one: the two must differ, or every
    /// sensor could read what all the others capture.
    pub fn is(&self, other: &AuthToken) -> bool {
        self.matches(other.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_on_first_need_in_the_state_directory_then_kept() {
        let dir = std::env::temp_dir().join(format!("receiver-viewer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = ViewerToken::load(None, || Ok(dir.clone())).unwrap();
        assert!(first.created && first.warning.is_none());
        assert_eq!(first.path, dir.join("viewer-token"));
        let text = std::fs::read_to_string(&first.path).unwrap();
        assert!(first.matches(text.trim().as_bytes()));
        let again = ViewerToken::load(None, || Ok(dir.clone())).unwrap();
        assert!(!again.created && again.matches(text.trim().as_bytes()));
        assert!(!again.matches(b"0123456789abcdef0123"));

        // A file given is read, never created, and the state directory is not asked for.
        let given = dir.join("mine");
        let no_dir = || Err(anyhow!("not asked"));
        assert!(ViewerToken::load(Some(&given), no_dir).is_err(), "missing");
        std::fs::write(&given, "short\n").unwrap();
        let err = ViewerToken::load(Some(&given), no_dir).err().unwrap();
        assert!(err.to_string().contains("fewer than the 16"), "{err}");
        std::fs::write(&given, "  jJ8w0lq3Vq9gH5vJr2yQm4c6Ue1tN7sK\n").unwrap();
        let mine = ViewerToken::load(Some(&given), no_dir).unwrap();
        assert!(!mine.created && mine.matches(b"jJ8w0lq3Vq9gH5vJr2yQm4c6Ue1tN7sK"));
        let sensors = AuthToken::new(b"jJ8w0lq3Vq9gH5vJr2yQm4c6Ue1tN7sK".to_vec()).unwrap();
        assert!(mine.is(&sensors));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
