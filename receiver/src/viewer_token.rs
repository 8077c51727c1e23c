//! The viewer token: what viewers (the viewer role, `--viewer-listen`) must give, apart
//! from the sensors' token, so that a sensor's credentials never open the viewer role.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use protocol::AuthToken;

/// The viewer token of `--viewer-token-file`, else `<state_dir>/viewer-token`, created on
/// first need as the sensors' token is (0600, 64 lowercase hex digits and a newline).
/// Returns it, its path and whether it was just created.
pub fn load(given: Option<&Path>, state_dir: &Path) -> Result<(AuthToken, PathBuf, bool)> {
    let (path, created) = match given {
        Some(path) => (path.to_path_buf(), false),
        None => crate::auth::load_or_create_token_file(state_dir, "viewer-token")?,
    };
    let (token, warning) = program::cli::read_token_file(&path).map_err(|e| anyhow!(e))?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    Ok((token, path, created))
}
