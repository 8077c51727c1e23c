//! Shared secrets the receiver requires (the sensors' token, the viewer token): made on first
//! need as files of the state directory, and checked in constant time.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use protocol::AuthToken;

/// Creates the token file `path` if there is none: 32 random bytes as 64 lowercase hex digits
/// and a newline, mode 0600, never over an existing file nor through a symlink. Returns
/// whether it was just created (an existing file is kept as it is).
pub fn load_or_create(path: &Path) -> anyhow::Result<bool> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    }
    let mut file = match program::private_file::create(path) {
        Ok(file) => file,
        Err(_) if path.exists() => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let written = file
        .write_all(format!("{hex}\n").as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        // A partial token would lock everyone out: the next start makes a whole one.
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(true)
}

/// A token, kept as its HMAC under a key of this process: a token a peer gives is checked by
/// comparing its HMAC with this one, in constant time (`ring::hmac::verify`), which tells
/// nothing of the token's bytes or length through timing.
pub struct ExpectedToken {
    key: ring::hmac::Key,
    tag: ring::hmac::Tag,
}

impl ExpectedToken {
    pub fn new(token: &AuthToken) -> Self {
        let secret: [u8; 32] = rand::random();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let tag = ring::hmac::sign(&key, token.as_bytes());
        Self { key, tag }
    }

    /// Whether `given` is the token.
    pub fn matches(&self, given: &[u8]) -> bool {
        ring::hmac::verify(&self.key, given, self.tag.as_ref()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_made_once_private_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("receiver-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("token");
        assert!(load_or_create(&path).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65, "{text:?}");
        assert!(text[..64]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(text.ends_with('\n'));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!load_or_create(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // A symlink planted where the token goes is not followed.
        let other = std::env::temp_dir().join(format!("receiver-token-{}-b", std::process::id()));
        let _ = std::fs::remove_dir_all(&other);
        std::fs::create_dir_all(&other).unwrap();
        let victim = other.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, other.join("token")).unwrap();
        assert!(matches!(load_or_create(&other.join("token")), Ok(false)));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn tokens_match_only_themselves() {
        let token = AuthToken::new(b"0123456789abcdef".to_vec()).unwrap();
        let expected = ExpectedToken::new(&token);
        assert!(expected.matches(b"0123456789abcdef"));
        for wrong in [
            &b"0123456789abcdeF"[..],
            b"0123456789abcdef0",
            b"0123456789abcde",
            b"",
        ] {
            assert!(!expected.matches(wrong), "{wrong:?}");
        }
    }
}
