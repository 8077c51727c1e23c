//! TLS client configuration: TLS 1.3 only, ALPN `capstream/1`, and one of two ways to
//! trust the receiver: CA/certificate files (standard webpki verification, name checked),
//! or a pinned SHA-256 fingerprint of the receiver's certificate. And how the sensor proves
//! who it is, when the receiver asks: a client certificate, a shared token.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;

/// How the receiver is trusted.
#[derive(Debug, Clone)]
pub enum Trust {
    CaFiles(Vec<PathBuf>),
    Fingerprint(Fingerprint),
}

/// What the last verification of the receiver's certificate saw: its fingerprint and the
/// verifier's own error, kept so that a failed handshake is explained from the typed
/// `rustls::Error` (QUIC carries only an alert code and text).
#[derive(Debug, Default)]
pub struct Verified {
    pub fingerprint: Option<Fingerprint>,
    pub error: Option<rustls::Error>,
}

pub type LastVerification = Arc<Mutex<Verified>>;

pub struct ClientTls {
    pub config: rustls::ClientConfig,
    pub verification: LastVerification,
}

/// `client_cert`: the `--cert` and `--key` files to present, for a receiver that requires a
/// client certificate; `alpn`: the receiver's endpoint spoken to (sensors', viewers').
pub fn client_config(
    trust: &Trust,
    client_cert: Option<(&Path, &Path)>,
    alpn: &[u8],
) -> Result<ClientTls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::runtime(format!("TLS setup failed: {e}")))?;
    let inner: Arc<dyn ServerCertVerifier> = match trust {
        Trust::CaFiles(paths) => rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(load_roots(paths)?),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| Error::input(format!("bad CA file(s): {e}")))?,
        Trust::Fingerprint(fp) => Arc::new(PinnedCert {
            expected: *fp,
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let verification = LastVerification::default();
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recording {
            inner,
            last: Arc::clone(&verification),
        }));
    let mut config = match client_cert {
        Some((cert, key)) => {
            let chain = load_pem_certs(
                cert,
                "certificate file",
                "a NAME.crt that `receiver certs sensor NAME` made",
            )?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                Error::input(format!(
                    "cannot read private key {}: {e} (expected a PEM private key, e.g. the \
                     NAME.key that `receiver certs sensor NAME` made)",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => Error::input(format!(
                        "--key {} is not the key of --cert {}",
                        key.display(),
                        cert.display()
                    )),
                    e => Error::input(format!(
                        "cannot use --cert {} with --key {}: {e}",
                        cert.display(),
                        key.display()
                    )),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(ClientTls {
        config,
        verification,
    })
}

fn load_roots(paths: &[PathBuf]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for path in paths {
        for cert in load_pem_certs(path, "CA file", "the receiver's receiver.crt")? {
            roots.add(cert).map_err(|e| {
                Error::input(format!(
                    "bad CA file {}: a certificate is not usable as a trust anchor: {e}",
                    path.display()
                ))
            })?;
        }
    }
    Ok(roots)
}

/// The certificates of a PEM file; `what` and `example` say what it should be.
fn load_pem_certs(path: &Path, what: &str, example: &str) -> Result<Vec<CertificateDer<'static>>> {
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|e| Error::input(format!("cannot read {what} {shown}: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::input(format!("bad {what} {shown}: {e} (expected PEM)")))?;
    if certs.is_empty() {
        return Err(Error::input(format!(
            "bad {what} {shown}: no certificate in it (expected a PEM 'BEGIN CERTIFICATE' block, \
             e.g. {example})"
        )));
    }
    Ok(certs)
}

/// `--token-file`: the token the Hello carries, read as the receiver reads its own.
pub fn load_token(path: &Path) -> Result<protocol::AuthToken> {
    let (token, warning) = program::cli::read_token_file(path).map_err(Error::input)?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    Ok(token)
}

/// SHA-256 of a DER certificate, as the receiver prints it.
pub fn fingerprint_of(cert: &[u8]) -> Fingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Fingerprint(out)
}

/// Accepts exactly one end-entity certificate, named by its SHA-256 fingerprint. Names,
/// issuers and validity dates are not checked: the pin replaces them. The handshake
/// signature still is, so the peer must hold the certificate's private key.
#[derive(Debug)]
struct PinnedCert {
    expected: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint_of(end_entity) == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered; a TLS 1.2 handshake is refused outright.
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies with `inner` and records what it saw (see [`Verified`]).
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn ServerCertVerifier>,
    last: LastVerification,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Ok(mut last) = self.last.lock() {
            *last = Verified {
                fingerprint: Some(fingerprint_of(end_entity)),
                error: result.as_ref().err().cloned(),
            };
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_sha256_of_der() {
        // SHA-256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            fingerprint_of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn pinned_verifier_checks_the_fingerprint() {
        let cert = CertificateDer::from(b"not really a certificate".to_vec());
        let fp = fingerprint_of(cert.as_ref());
        let v = Recording {
            inner: Arc::new(PinnedCert {
                expected: fp,
                algorithms: rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms,
            }),
            last: LastVerification::default(),
        };
        let name = ServerName::try_from("localhost").unwrap();
        assert!(v
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .is_ok());
        let other = CertificateDer::from(b"another one".to_vec());
        assert!(v
            .verify_server_cert(&other, &[], &name, &[], UnixTime::now())
            .is_err());
        let last = v.last.lock().unwrap();
        assert_eq!(last.fingerprint, Some(fingerprint_of(other.as_ref())));
        assert_eq!(
            last.error,
            Some(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure
            ))
        );
        assert!(!v.supported_verify_schemes().is_empty());
    }

    #[test]
    fn config_is_tls13_with_alpn() {
        let fp = Fingerprint([0; 32]);
        let tls = client_config(&Trust::Fingerprint(fp), None, protocol::ALPN).unwrap();
        assert_eq!(tls.config.alpn_protocols, [protocol::ALPN.to_vec()]);
        assert!(tls
            .config
            .crypto_provider()
            .cipher_suites
            .iter()
            .any(|s| s.version() == &rustls::version::TLS13));
    }

    #[test]
    fn bad_ca_files_are_input_errors() {
        let dir = std::env::temp_dir().join(format!("sensor-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "hello\n").unwrap();
        for path in [empty.clone(), dir.join("missing.pem")] {
            match client_config(&Trust::CaFiles(vec![path]), None, protocol::ALPN) {
                Err(Error::Input(_)) => {}
                Err(other) => panic!("wrong error kind: {other}"),
                Ok(_) => panic!("accepted a bad CA file"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn client_certificates_are_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("sensor-cert-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let made = |name: &str| {
            let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
            (
                write(&format!("{name}.crt"), c.cert.pem()),
                write(&format!("{name}.key"), c.signing_key.serialize_pem()),
            )
        };
        let (cert, key) = made("tap-1");
        let (_, other_key) = made("tap-2");
        let trust = Trust::Fingerprint(Fingerprint([0; 32]));
        client_config(&trust, Some((&cert, &key)), protocol::ALPN).unwrap();
        let refused = |cert: &Path, key: &Path, needle: &str| match client_config(
            &trust,
            Some((cert, key)),
            protocol::ALPN,
        ) {
            Err(Error::Input(e)) => assert!(e.contains(needle), "{e}"),
            Err(other) => panic!("wrong error kind: {other}"),
            Ok(_) => panic!("accepted {} with {}", cert.display(), key.display()),
        };
        refused(&cert, &other_key, "is not the key of");
        refused(&dir.join("missing.crt"), &key, "missing.crt");
        refused(&cert, &dir.join("missing.key"), "missing.key");
        refused(&key, &key, "no certificate in it");
        refused(&cert, &cert, "private key");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
