//! `receiver certs`: a private CA, and certificates it signs for the receiver and for each
//! sensor, so that mutual TLS takes one command per machine.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::cli::{Certs, InitArgs, SensorArgs};
use crate::tls::{hostname, receiver_names, write_private};
use crate::BadInput;

/// How long the CA is valid: it outlives the certificates it signs.
const CA_DAYS: u32 = 3650;

pub fn run(command: &Certs) -> Result<()> {
    match command {
        Certs::Init(args) => init(args),
        Certs::Sensor(args) => sensor(args),
    }
}

/// Creates the CA unless there is one, then (re)issues the receiver's certificate.
fn init(args: &InitArgs) -> Result<()> {
    let dir = &args.dir;
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
        .map_err(BadInput)?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let created = match (ca_crt.exists(), ca_key.exists()) {
        (false, false) => {
            create_ca(&ca_crt, &ca_key)?;
            true
        }
        (true, true) => false,
        _ => {
            return Err(BadInput(anyhow!(
                "{} holds only one of ca.crt and ca.key: restore the other, or remove both \
                 to start a new CA (which invalidates every certificate the old one signed)",
                dir.display()
            ))
            .into())
        }
    };
    let ca = load_ca(dir)?;
    let names = receiver_names(&args.name);
    let params = leaf_params(
        names.clone(),
        "Capstream receiver",
        args.days,
        ExtendedKeyUsagePurpose::ServerAuth,
    )
    .map_err(|e| BadInput(anyhow!("cannot use those names (check --name): {e}")))?;
    let (crt, key) = (dir.join("receiver.crt"), dir.join("receiver.key"));
    issue(&params, &ca, &crt, &key)?;

    if created {
        println!(
            "Created a private CA in {}: ca.crt (give it to the receiver and the sensors) and \
             ca.key (it signs certificates: keep it here, readable only by you).",
            dir.display()
        );
    } else {
        println!("Kept the CA in {}.", dir.display());
    }
    println!(
        "Issued the receiver certificate {} (key {}) for {}, valid until {}.",
        crt.display(),
        key.display(),
        names.join(", "),
        params.not_after.date()
    );
    println!();
    println!("Start the receiver with:");
    println!(
        "  receiver --cert {} --key {} --client-ca {} --out capture.pcapng",
        crt.display(),
        key.display(),
        ca_crt.display()
    );
    println!("Then issue a certificate for each sensor:");
    println!("  receiver certs sensor NAME --dir {}", dir.display());
    Ok(())
}

fn sensor(args: &SensorArgs) -> Result<()> {
    let (dir, name) = (&args.dir, &args.name);
    // NAME names files in --dir: nothing that reaches outside it, or hides.
    if *name != receiver::sink::files::naming::sanitize(name) {
        return Err(BadInput(anyhow!(
            "sensor name {name:?}: use letters, digits, '_', '-' and single dots, not \
             starting with '.' or '-', at most 64 bytes (it names {name}.crt in --dir)"
        ))
        .into());
    }
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    if !args.force && (crt.exists() || key.exists()) {
        return Err(BadInput(anyhow!(
            "{} already exists: pass --force to replace it (the old certificate stays valid \
             until it expires)",
            crt.display()
        ))
        .into());
    }
    let ca = load_ca(dir)?;
    let params = leaf_params(
        vec![name.clone()],
        name,
        args.days,
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    issue(&params, &ca, &crt, &key)?;

    let receiver = hostname().unwrap_or_else(|_| "RECEIVER-HOST".into());
    println!(
        "Issued {} (key {}) for sensor {name}, valid until {}.",
        crt.display(),
        key.display(),
        params.not_after.date()
    );
    println!();
    println!("Copy {name}.crt, {name}.key and ca.crt to the sensor and start it with:");
    println!(
        "  sensor -i eth0 --receiver {receiver}:4433 --ca ca.crt --cert {name}.crt --key {name}.key"
    );
    println!(
        "The receiver, started with --client-ca {}, names this sensor {name} in its output.",
        dir.join("ca.crt").display()
    );
    Ok(())
}

fn create_ca(crt: &Path, key_path: &Path) -> Result<()> {
    let mut params = CertificateParams::default();
    // A random part tells apart two CAs made on one host.
    let tag: [u8; 4] = rand::random();
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Capstream CA {tag}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Capstream");
    // It signs end-entity certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_DAYS);
    let key = KeyPair::generate().context("cannot generate the CA's key")?;
    let cert = params
        .self_signed(&key)
        .context("cannot create the CA certificate")?;
    write_private(key_path, key.serialize_pem().as_bytes())?;
    fs::write(crt, cert.pem()).with_context(|| format!("cannot write {}", crt.display()))
}

/// The CA of `dir`: `ca.key` must be the key of `ca.crt`.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let read = |path: &PathBuf| {
        fs::read_to_string(path).map_err(|e| {
            BadInput(anyhow!(
                "cannot read {}: {e} (create the CA first: receiver certs init --dir {})",
                path.display(),
                dir.display()
            ))
        })
    };
    let (crt_pem, key_pem) = (read(&crt)?, read(&key)?);
    let der = CertificateDer::from_pem_slice(crt_pem.as_bytes())
        .map_err(|e| BadInput(anyhow!("{} holds no PEM certificate: {e}", crt.display())))?;
    let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| {
        BadInput(anyhow!(
            "{} is not a usable private key: {e}",
            key.display()
        ))
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| BadInput(anyhow!("{} is not a certificate: {e}", crt.display())))?;
    if !parsed.is_ca() {
        return Err(BadInput(anyhow!("{} is not a CA certificate", crt.display())).into());
    }
    if parsed.public_key().subject_public_key.data.as_ref() != key_pair.der_bytes() {
        return Err(BadInput(anyhow!(
            "{} is not the key of {}",
            key.display(),
            crt.display()
        ))
        .into());
    }
    Issuer::from_ca_cert_der(&der, key_pair)
        .map_err(|e| BadInput(anyhow!("cannot sign with {}: {e}", crt.display())).into())
}

/// A receiver's or a sensor's certificate: `names` as its subject alternative names (DNS
/// names or IP addresses), `common_name`, one use.
fn leaf_params(
    names: Vec<String>,
    common_name: &str,
    days: u32,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days);
    Ok(params)
}

/// Valid from an hour ago (clocks differ) for `days`, with a random serial number.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days.into());
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

/// Generates a key, has the CA sign its certificate, and writes both (the key readable by
/// its owner only).
fn issue(
    params: &CertificateParams,
    ca: &Issuer<'_, KeyPair>,
    crt: &Path,
    key_path: &Path,
) -> Result<()> {
    let key = KeyPair::generate().context("cannot generate a key")?;
    let cert = params
        .signed_by(&key, ca)
        .context("cannot sign the certificate")?;
    write_private(key_path, key.serialize_pem().as_bytes())?;
    fs::write(crt, cert.pem()).with_context(|| format!("cannot write {}", crt.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "capstream-certs-{label}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn init_then_sensor_makes_a_chain_that_verifies() {
        let dir = scratch("chain");
        let init_args = InitArgs {
            dir: dir.clone(),
            name: vec!["collector.example".into()],
            days: 30,
        };
        init(&init_args).unwrap();
        let ca_before = fs::read(dir.join("ca.crt")).unwrap();
        // Again: the CA is kept, the receiver certificate renewed.
        init(&init_args).unwrap();
        assert_eq!(fs::read(dir.join("ca.crt")).unwrap(), ca_before);
        let args = SensorArgs {
            name: "tap-1".into(),
            dir: dir.clone(),
            days: 7,
            force: false,
        };
        sensor(&args).unwrap();
        let again = sensor(&args).unwrap_err();
        assert!(
            again.is::<BadInput>() && again.to_string().contains("--force"),
            "{again}"
        );
        sensor(&SensorArgs {
            force: true,
            ..args
        })
        .unwrap();

        #[cfg(unix)]
        for key in ["ca.key", "receiver.key", "tap-1.key"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }

        // The receiver's TLS accepts the sensor's certificate, and the sensor is named by it.
        let roots = crate::tls::client_roots(&dir.join("ca.crt")).unwrap();
        let identity =
            crate::tls::load(&dir.join("receiver.crt"), &dir.join("receiver.key")).unwrap();
        crate::tls::server_config(&identity, Some(roots.clone())).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let chain = CertificateDer::pem_file_iter(dir.join("tap-1.crt"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        verifier
            .verify_client_cert(&chain[0], &[], rustls::pki_types::UnixTime::now())
            .unwrap();
        assert_eq!(crate::auth::name_in_certificate(&chain[0]), "tap-1");

        // A second CA does not vouch for the first one's sensors.
        let other = scratch("other");
        init(&InitArgs {
            dir: other.clone(),
            name: Vec::new(),
            days: 1,
        })
        .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let stranger = rustls::server::WebPkiClientVerifier::builder_with_provider(
            crate::tls::client_roots(&other.join("ca.crt"))
                .unwrap()
                .into(),
            provider,
        )
        .build()
        .unwrap();
        assert!(stranger
            .verify_client_cert(&chain[0], &[], rustls::pki_types::UnixTime::now())
            .is_err());
        // Nor does a CA whose key was swapped.
        fs::copy(other.join("ca.key"), dir.join("ca.key")).unwrap();
        let mismatch = sensor(&SensorArgs {
            name: "tap-2".into(),
            dir: dir.clone(),
            days: 1,
            force: false,
        })
        .unwrap_err();
        assert!(
            mismatch.to_string().contains("is not the key of"),
            "{mismatch}"
        );
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&other);
    }

    #[test]
    fn a_sensor_name_that_leaves_the_directory_is_refused() {
        let dir = scratch("badname");
        for name in ["../x", "a/b", "", ".hidden", "-rf", "a..b"] {
            let e = sensor(&SensorArgs {
                name: name.into(),
                dir: dir.join("pki"),
                days: 1,
                force: false,
            })
            .unwrap_err();
            assert!(
                e.is::<BadInput>() && e.to_string().contains("sensor name"),
                "{name}: {e}"
            );
        }
        assert!(!dir.join("x.crt").exists());
    }

    #[test]
    fn a_sensor_needs_a_ca() {
        let dir = scratch("noca");
        let e = sensor(&SensorArgs {
            name: "tap-1".into(),
            dir: dir.clone(),
            days: 1,
            force: false,
        })
        .unwrap_err();
        assert!(
            e.is::<BadInput>() && e.to_string().contains("receiver certs init"),
            "{e}"
        );
    }
}
