//! Who a sensor is and whether it may send: the name in its verified client certificate
//! (`--client-ca`), and the shared token its Hello must carry (`--token-file`). Refused
//! peers are logged with their address, at most a line per address every 10 s.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use program::names::clean;
use protocol::{AuthToken, Hello};
use receiver::token::ExpectedToken;
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// What the receiver asks of sensors, and the log of those refused.
#[derive(Default)]
pub struct Auth {
    /// `--token-file`: every Hello must carry this token.
    token: Option<ExpectedToken>,
    /// `--client-ca`: the handshake verified a client certificate, which names the sensor.
    pub client_certificates: bool,
    pub refusals: RefusalLog,
}

/// What a sensor that failed the token check is told: what to do about it.
pub const TOKEN_REFUSAL: &str =
    "wrong or missing token: pass --token-file with the receiver's token";

impl Auth {
    pub fn new(token: Option<AuthToken>, client_certificates: bool) -> Self {
        let token = token.as_ref().map(ExpectedToken::new);
        Self {
            token,
            client_certificates,
            refusals: RefusalLog::default(),
        }
    }

    /// Checks the Hello's token. `Err` says, for the log, what was wrong; no token is ever
    /// shown.
    pub fn check_token(&self, hello: &Hello) -> Result<(), &'static str> {
        self.check(hello.token.as_ref())
    }

    /// Checks a token given (a sensor's Hello's, a viewer's).
    pub fn check(&self, given: Option<&AuthToken>) -> Result<(), &'static str> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let Some(given) = given else {
            return Err("no token");
        };
        if expected.matches(given.as_bytes()) {
            Ok(())
        } else {
            Err("wrong token")
        }
    }
}

/// Why a token is guessable, if it looks so: under 128 bits by a rough estimate (its
/// length times log2 of its distinct characters), or characters of one kind only (all
/// digits, all lowercase). The length alone is checked where it is read.
pub fn weak_token(token: &AuthToken) -> Option<&'static str> {
    let bytes = token.as_bytes();
    let mut seen = [false; 256];
    for &b in bytes {
        seen[usize::from(b)] = true;
    }
    let distinct = seen.iter().filter(|s| **s).count();
    if (bytes.len() as f64) * (distinct as f64).log2() < 128.0 {
        return Some("under 128 bits of entropy by estimate");
    }
    let one_class = |f: fn(&u8) -> bool| bytes.iter().all(f);
    if one_class(u8::is_ascii_digit)
        || one_class(u8::is_ascii_lowercase)
        || one_class(u8::is_ascii_uppercase)
    {
        return Some("characters of one kind only");
    }
    None
}

/// Longest name taken from a certificate, as for a sensor id.
const MAX_NAME: usize = 128;

/// The name a connection's verified client certificate gives its sensor (see
/// [`name_in_certificate`]); `None` without one.
pub fn certificate_name(conn: &quinn::Connection) -> Option<String> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    chain.first().map(|cert| name_in_certificate(cert))
}

/// A certificate's first DNS name, else its common name, else `sha256:` and the first 16
/// hex digits of its fingerprint. Control characters are dropped and the name is cut at 128
/// bytes, as a sensor id would be.
pub fn name_in_certificate(der: &[u8]) -> String {
    let parsed = x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c);
    let dns = || {
        let san = parsed.as_ref()?.subject_alternative_name().ok().flatten()?;
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::DNSName(name) => Some(name.to_string()),
            _ => None,
        })
    };
    let common_name = || {
        parsed
            .as_ref()?
            .subject()
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok().map(str::to_string))
    };
    let name = dns()
        .or_else(common_name)
        .map(|n| clean(&n))
        .filter(|n| !n.is_empty());
    match name {
        Some(mut name) => {
            let mut end = name.len().min(MAX_NAME);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            name.truncate(end);
            name
        }
        None => {
            let digest = ring::digest::digest(&ring::digest::SHA256, der);
            let hex: String = digest.as_ref()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("sha256:{hex}")
        }
    }
}

/// At most one line per peer address in this window; also how often the accept loop calls
/// [`RefusalLog::summarize`].
pub const LOG_WINDOW: Duration = Duration::from_secs(10);
/// Addresses remembered at most: a flood from many addresses costs bounded memory, and
/// what it cannot remember it counts rather than logs.
const MAX_REMEMBERED: usize = 4096;

/// Logs refused connections (failed handshakes, missing or wrong tokens) with the peer
/// address, one line per address per [`LOG_WINDOW`] at most; [`RefusalLog::summarize`]
/// reports how many were left out. Touched only on refusals.
#[derive(Default)]
pub struct RefusalLog {
    inner: Mutex<Limiter>,
}

#[derive(Default)]
struct Limiter {
    last_logged: HashMap<IpAddr, Instant>,
    /// Refusals not logged since the last summary.
    left_out: u64,
}

impl Limiter {
    /// Whether a refusal of `ip` at `now` gets its own line.
    fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        let recent = |t: &Instant| now.saturating_duration_since(*t) < LOG_WINDOW;
        if self.last_logged.get(&ip).is_some_and(recent) {
            self.left_out += 1;
            return false;
        }
        if self.last_logged.len() >= MAX_REMEMBERED && !self.last_logged.contains_key(&ip) {
            self.last_logged.retain(|_, t| recent(&*t));
            if self.last_logged.len() >= MAX_REMEMBERED {
                self.left_out += 1;
                return false;
            }
        }
        self.last_logged.insert(ip, now);
        true
    }

    /// Refusals left out since the last call; forgets addresses whose window has passed.
    fn take_left_out(&mut self, now: Instant) -> u64 {
        self.last_logged
            .retain(|_, t| now.saturating_duration_since(*t) < LOG_WINDOW);
        std::mem::take(&mut self.left_out)
    }
}

impl RefusalLog {
    /// Logs `why` for `peer`, unless that address was logged within the window.
    /// `why` may hold the peer's own text (a close reason): control characters are escaped,
    /// so that it cannot forge a log line.
    pub fn refused(&self, peer: SocketAddr, why: impl Display) {
        let admitted = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(peer.ip(), Instant::now());
        if admitted {
            tracing::warn!("{peer}: refused: {}", escape_controls(&why.to_string()));
        }
    }

    /// A sensor failed authentication (no or a wrong token, no valid client certificate):
    /// logged as [`RefusalLog::refused`], and counted in
    /// `capstream_receiver_auth_failures_total`, which the log's rate limit does not hide.
    pub fn auth_failed(&self, peer: SocketAddr, why: impl Display) {
        metrics::counter!("capstream_receiver_auth_failures_total").increment(1);
        self.refused(peer, why);
    }

    /// Says how many refusals were not logged since the last call.
    pub fn summarize(&self) {
        let left_out = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_left_out(Instant::now());
        if left_out > 0 {
            tracing::warn!(
                "{left_out} more connection(s) refused (not logged: at most one line per \
                 address every {}s)",
                LOG_WINDOW.as_secs()
            );
        }
    }
}

/// `s` with every control character shown escaped (`\n`, `\u{1b}`): one log line stays one.
pub fn escape_controls(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped = c.is_control().then(|| c.escape_default());
            escaped
                .into_iter()
                .flatten()
                .chain((!c.is_control()).then_some(c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_is_not_weak() {
        let dir = std::env::temp_dir().join(format!("receiver-weak-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("token");
        receiver::token::load_or_create(&path).unwrap();
        let (token, _) = program::cli::read_token_file(&path).unwrap();
        assert_eq!(weak_token(&token), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn weak_tokens_are_named() {
        let token = |s: &str| AuthToken::new(s.as_bytes().to_vec()).unwrap();
        assert!(weak_token(&token("aaaaaaaaaaaaaaaa")).is_some());
        assert!(weak_token(&token("password12345678")).is_some());
        assert!(weak_token(&token("12345678901234567890")).is_some());
        assert!(weak_token(&token("abcdefghijklmnopqrstuvwxyz")).is_some());
        assert_eq!(weak_token(&token("jJ8w0lq3Vq9gH5vJr2yQm4c6Ue1tN7sK")), None);
    }

    #[test]
    fn peer_text_cannot_forge_log_lines() {
        assert_eq!(
            escape_controls("bye\n2026-12-05T00:00:00Z  INFO forged\u{1b}[31m"),
            "bye\\n2026-12-05T00:00:00Z  INFO forged\\u{1b}[31m"
        );
        assert_eq!(escape_controls("plain ü text"), "plain ü text");
    }

    #[test]
    fn one_line_per_address_per_window_and_bounded_memory() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(l.admit(a, t0));
        assert!(!l.admit(a, t0 + Duration::from_secs(1)));
        assert!(l.admit(b, t0 + Duration::from_secs(1)));
        assert!(!l.admit(a, t0 + Duration::from_secs(9)));
        assert!(l.admit(a, t0 + LOG_WINDOW));
        assert_eq!(l.take_left_out(t0 + LOG_WINDOW), 2);
        assert_eq!(l.take_left_out(t0 + LOG_WINDOW), 0);

        // A flood from many addresses: the map stays bounded, the excess is counted.
        let t1 = t0 + Duration::from_secs(100);
        let mut logged = 0;
        for i in 0..(MAX_REMEMBERED as u32 + 100) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            logged += usize::from(l.admit(ip, t1));
        }
        assert_eq!(logged, MAX_REMEMBERED);
        assert!(l.last_logged.len() <= MAX_REMEMBERED);
        assert_eq!(l.take_left_out(t1), 100);
        // Once the window has passed, the addresses are forgotten.
        assert_eq!(l.take_left_out(t1 + LOG_WINDOW), 0);
        assert!(l.last_logged.is_empty());
    }

    #[test]
    fn certificates_name_sensors() {
        use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
        let key = KeyPair::generate().unwrap();
        let name = |p: &CertificateParams| name_in_certificate(p.self_signed(&key).unwrap().der());
        let mut params =
            CertificateParams::new(vec!["192.0.2.7".into(), "tap-1.example".into()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "cn\u{1b}[31m");
        assert_eq!(name(&params), "tap-1.example", "the first DNS name");
        params.subject_alt_names.clear();
        assert_eq!(name(&params), "cn[31m", "else the common name, cleaned");
        params.distinguished_name = DistinguishedName::new();
        let anonymous = name(&params);
        assert!(
            anonymous.starts_with("sha256:") && anonymous.len() == 7 + 16,
            "{anonymous}"
        );
        assert!(name_in_certificate(b"not a certificate").starts_with("sha256:"));
    }

    #[test]
    fn tokens_are_checked() {
        let token = |s: &str| AuthToken::new(s.as_bytes().to_vec());
        let hello = |t: Option<AuthToken>| Hello {
            version: protocol::PROTOCOL_VERSION,
            session_id: 1,
            session_secret: [1; 16],
            sensor_id: "s".into(),
            hostname: "h".into(),
            os: "o".into(),
            interfaces: Vec::new(),
            token: t,
            available: Vec::new(),
            on_demand: false,
            tls_key_log: false,
        };
        let open = Auth::default();
        assert!(open.check_token(&hello(None)).is_ok());
        assert!(open.check_token(&hello(token("anything at all!"))).is_ok());
        let closed = Auth::new(token("0123456789abcdef"), false);
        assert!(closed
            .check_token(&hello(token("0123456789abcdef")))
            .is_ok());
        assert_eq!(closed.check_token(&hello(None)), Err("no token"));
        for wrong in ["0123456789abcdeF", "0123456789abcdef0", "0123456789abcde"] {
            assert_eq!(
                closed.check_token(&hello(token(wrong))),
                Err("wrong token"),
                "{wrong}"
            );
        }
    }
}
