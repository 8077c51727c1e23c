//! The receiver's certificate (the user's own, or a self-signed one created on first start)
//! and, with `--client-ca`, the CAs whose client certificates it requires of sensors.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificate in use and where it came from, for the start-up log line.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub cert_path: PathBuf,
}

impl Identity {
    /// SHA-256 of the end-entity certificate, as 64 lowercase hex digits (what
    /// `sensor --fingerprint` takes).
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.chain[0]);
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificate {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// Loads `--cert`/`--key`.
pub fn load(cert: &Path, key: &Path) -> Result<Identity> {
    let chain = read_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read private key {}", key.display()))?;
    Ok(Identity {
        chain,
        key: key_der,
        cert_path: cert.to_path_buf(),
    })
}

/// Loads `receiver.crt`/`receiver.key` from `dir`, creating them (self-signed, for
/// localhost, the loopback addresses, this host's name and `extra_names`) if absent.
pub fn load_or_create(dir: &Path, extra_names: &[String]) -> Result<Identity> {
    let cert = dir.join("receiver.crt");
    let key = dir.join("receiver.key");
    if !cert.exists() || !key.exists() {
        create(dir, &cert, &key, extra_names)?;
        tracing::info!("created a self-signed certificate in {}", dir.display());
    }
    load(&cert, &key)
}

/// `--client-ca`: the CA certificates (PEM, one or more) that sensors' client certificates
/// must chain to.
pub fn client_roots(path: &Path) -> Result<rustls::RootCertStore> {
    roots_of(path, "--client-ca")
}

/// The CA certificates of `path`, given as `flag` (`--client-ca`, `--viewer-ca`).
pub fn roots_of(path: &Path, flag: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path).with_context(|| flag.to_string())? {
        roots.add(cert).with_context(|| {
            format!(
                "{flag} {}: a certificate is not usable as a CA",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// TLS to the Kafka brokers: verified against the CAs in `ca` (`--kafka-ca`), else the
/// system's; presenting `client` (`--kafka-cert`, `--kafka-key`) when given.
pub fn kafka_client_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>> {
    let roots = match ca {
        Some(path) => roots_of(path, "--kafka-ca")?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "--kafka-tls: no CA certificate found on this system ({} error(s)); give \
                     the brokers' CA with --kafka-ca FILE",
                    found.errors.len()
                );
            }
            roots
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS version available")?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let identity = load(cert, key).context("--kafka-cert")?;
            builder
                .with_client_auth_cert(identity.chain, identity.key)
                .context("--kafka-cert and --kafka-key do not match")?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The names a receiver certificate holds: localhost, the loopback addresses, this host's
/// name and `extra`.
pub fn receiver_names(extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = hostname() {
        names.push(host);
    }
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

fn create(dir: &Path, cert: &Path, key: &Path, extra_names: &[String]) -> Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    let generated = rcgen::generate_simple_self_signed(receiver_names(extra_names))
        .context("cannot generate a certificate (check --cert-name values)")?;
    write_private(key, generated.signing_key.serialize_pem().as_bytes())?;
    fs::write(cert, generated.cert.pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    Ok(())
}

/// The key behind QUIC stateless resets, kept in `dir/reset.key` so that a restarted
/// receiver can tell sensors at once that their old connection is gone (rather than after
/// their idle timeout), and they resume sooner.
pub fn reset_key(dir: &Path) -> Result<ring::hmac::Key> {
    let path = dir.join("reset.key");
    let secret = match fs::read(&path) {
        Ok(secret) if secret.len() == 32 => secret,
        _ => {
            let secret: [u8; 32] = rand::random();
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create state directory {}", dir.display()))?;
            write_private(&path, &secret)?;
            secret.to_vec()
        }
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret))
}

pub fn hostname() -> Result<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .context("no hostname")?;
    Ok(name.trim().to_string())
}

/// Writes a file only its owner can read (it holds a private key), whole or not at all
/// (see [`program::private_file`]).
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    program::private_file::write(path, data)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// TLS for the live stream's TCP clients (socat, stunnel): TLS 1.3 with the receiver's
/// certificate; clients prove themselves by the viewer token, not a certificate.
pub fn stream_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>> {
    tls_config(identity, None, ClientCert::Required, None).map(Arc::new)
}

/// The receive window of a connection until its sensor's Hello is accepted: room for the
/// largest Hello (256 KiB) and little else, so that a peer that has not proved anything
/// holds little of the receiver's memory.
const UNAUTHENTICATED_RECEIVE_WINDOW: u32 = 512 << 10;
/// The receive window the admitted sensors share (see `viewer::Sensors`): one alone gets
/// all of it, room for a few full batches in flight, for throughput on long links.
pub const AUTHENTICATED_RECEIVE_WINDOW: u32 = 32 << 20;

/// QUIC server settings: TLS 1.3 with our ALPN only, one stream per sensor, bounded
/// windows and idle time. With `client_roots`, a sensor without a client certificate that
/// chains to one of them fails the handshake.
pub fn server_config(
    identity: &Identity,
    client_roots: Option<rustls::RootCertStore>,
) -> Result<quinn::ServerConfig> {
    let tls = tls_config(
        identity,
        client_roots.map(|roots| (roots, "--client-ca")),
        ClientCert::Required,
        Some(protocol::ALPN),
    )?;
    // The stream may take 16 MiB once the connection's window is raised (after the Hello:
    // connection.rs).
    quic_config(tls, 16 << 20)
}

/// Whether a client certificate from the given roots is required or only accepted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientCert {
    Required,
    Optional,
}

/// TLS 1.3 with `alpn` only (if given) and this receiver's certificate; with `client_roots` (and the
/// flag that gave them), client certificates chaining to them are verified.
fn tls_config(
    identity: &Identity,
    client_roots: Option<(rustls::RootCertStore, &str)>,
    client_cert: ClientCert,
    alpn: Option<&[u8]>,
) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is unavailable")?;
    let builder = match client_roots {
        Some((roots, flag)) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = match client_cert {
                ClientCert::Required => verifier,
                ClientCert::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .with_context(|| format!("{flag} is unusable"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .context("the certificate and key do not match")?;
    tls.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    Ok(tls)
}

/// The viewer endpoint's settings (`--viewer-listen`): ALPN `capstream-viewer/1`, a client
/// certificate verified when it chains to `viewer_roots` (`--viewer-ca`) and optional (the
/// viewer token is the other proof), one stream per viewer, small windows: a viewer sends
/// little.
pub fn viewer_server_config(
    identity: &Identity,
    viewer_roots: Option<rustls::RootCertStore>,
) -> Result<quinn::ServerConfig> {
    let tls = tls_config(
        identity,
        viewer_roots.map(|roots| (roots, "--viewer-ca")),
        ClientCert::Optional,
        Some(protocol::VIEWER_ALPN),
    )?;
    quic_config(tls, UNAUTHENTICATED_RECEIVE_WINDOW)
}

/// The QUIC settings of both endpoints over `tls`: one stream per peer, which may take
/// `stream_window` bytes, a connection window of 512 KiB until the peer is admitted, 30 s
/// idle, no datagrams.
fn quic_config(tls: rustls::ServerConfig, stream_window: u32) -> Result<quinn::ServerConfig> {
    let quic = QuicServerConfig::try_from(tls).context("TLS settings unusable for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .max_idle_timeout(Some(
            Duration::from_secs(30)
                .try_into()
                .expect("30 s is a valid idle timeout"),
        ))
        .stream_receive_window(stream_window.into())
        .receive_window(UNAUTHENTICATED_RECEIVE_WINDOW.into())
        // Peers send no QUIC datagrams: none is buffered.
        .datagram_receive_buffer_size(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}
