//! A receiver certificate's SHA-256 fingerprint, as `--fingerprint` takes it and the
//! receiver prints it.

use std::fmt;

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// Accepts 64 hex digits in any case, with optional colons between byte pairs and an
/// optional `sha256:` prefix, the forms openssl and the receiver print.
pub fn parse_fingerprint(s: &str) -> Result<Fingerprint, String> {
    let trimmed = s.trim();
    let body = match trimmed.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("sha256:") => &trimmed[7..],
        _ => trimmed,
    };
    let digits: Vec<u8> = body.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return Err(format!(
            "a SHA-256 fingerprint has 64 hex digits, got {} (copy it from the receiver's \
             'certificate ... SHA-256 fingerprint' line)",
            digits.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let hi = hex_value(pair[0]);
        let lo = hex_value(pair[1]);
        match (hi, lo) {
            (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
            _ => return Err("a fingerprint may only contain hex digits and colons".into()),
        }
    }
    Ok(Fingerprint(out))
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}
