//! Lines of an NSS key log, the format of the file SSLKEYLOGFILE names (curl, Firefox,
//! Chrome, OpenSSL, Go, rustls): `LABEL <client_random or id, hex> <secret, hex>`, one
//! secret per line; `#` starts a comment.

/// Longest line a sensor sends: the longest real one (an RSA pre-master secret of a 4096-bit
/// key) is under 1,100 bytes.
pub const MAX_KEY_LOG_LINE: usize = 2048;

/// What a key log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLogLine {
    /// A secret: its label, and the 32-byte client random it belongs to where the second
    /// field is one (every label but `RSA`, which names a session by its encrypted
    /// pre-master secret).
    Secret {
        /// The client random of the handshake it opens.
        client_random: Option<[u8; 32]>,
    },
    /// Blank, or a `#` comment: nothing to send.
    Nothing,
    /// Not of the format.
    Malformed,
}

impl KeyLogLine {
    /// Reads one line (without its newline; a trailing `\r` is allowed).
    pub fn parse(line: &[u8]) -> Self {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) || line.first() == Some(&b'#') {
            return Self::Nothing;
        }
        if line.len() > MAX_KEY_LOG_LINE {
            return Self::Malformed;
        }
        let mut fields = line.split(|&b| b == b' ');
        let (Some(label), Some(id), Some(secret), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Self::Malformed;
        };
        let label_ok = !label.is_empty()
            && label.len() <= 64
            && label
                .iter()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_');
        let hex = |f: &[u8]| {
            !f.is_empty() && f.len().is_multiple_of(2) && f.iter().all(u8::is_ascii_hexdigit)
        };
        if !label_ok || !hex(id) || !hex(secret) {
            return Self::Malformed;
        }
        let client_random = (id.len() == 64).then(|| {
            let mut random = [0u8; 32];
            for (byte, pair) in random.iter_mut().zip(id.chunks_exact(2)) {
                *byte = (nibble(pair[0]) << 4) | nibble(pair[1]);
            }
            random
        });
        Self::Secret { client_random }
    }
}

fn nibble(hex_digit: u8) -> u8 {
    match hex_digit {
        b'0'..=b'9' => hex_digit - b'0',
        b'a'..=b'f' => hex_digit - b'a' + 10,
        _ => hex_digit - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_the_format_and_others() {
        let random = "00".repeat(31) + "ff";
        let line = format!("CLIENT_TRAFFIC_SECRET_0 {random} {}", "ab".repeat(48));
        let mut expected = [0u8; 32];
        expected[31] = 0xff;
        assert_eq!(
            KeyLogLine::parse(line.as_bytes()),
            KeyLogLine::Secret {
                client_random: Some(expected)
            }
        );
        assert_eq!(
            KeyLogLine::parse(format!("{line}\r").as_bytes()),
            KeyLogLine::parse(line.as_bytes())
        );
        assert_eq!(
            KeyLogLine::parse(b"RSA 0011223344556677 abcd"),
            KeyLogLine::Secret {
                client_random: None
            }
        );
        for nothing in [&b""[..], b"   ", b"# a comment"] {
            assert_eq!(KeyLogLine::parse(nothing), KeyLogLine::Nothing);
        }
        for bad in [
            &b"CLIENT_RANDOM"[..],
            b"CLIENT_RANDOM abc def",
            b"client_random 00 11",
            b"CLIENT_RANDOM 00 11 22",
            b"CLIENT_RANDOM 0g 11",
            b"CLIENT_RANDOM  00 11",
        ] {
            assert_eq!(KeyLogLine::parse(bad), KeyLogLine::Malformed, "{bad:?}");
        }
        let long = format!("CLIENT_RANDOM {random} {}", "a".repeat(MAX_KEY_LOG_LINE));
        assert_eq!(KeyLogLine::parse(long.as_bytes()), KeyLogLine::Malformed);
    }
}
