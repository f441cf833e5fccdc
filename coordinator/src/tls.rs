//! The coordinator's certificate: the configured one, or a self-signed one made on first run and
//! kept in the data dir; clients pin its SHA-256 fingerprint.

use std::path::{Path, PathBuf};

use gleaner::Digest;

/// Certificate and key paths, and the certificate's fingerprint.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: Digest,
}

/// Loads the PEM certificate at `cert` and returns the SHA-256 of its (first) DER certificate.
pub fn fingerprint(cert: &Path) -> anyhow::Result<Digest> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{}: no certificate in the file", cert.display()))?
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    Ok(Digest::of(der.as_ref()))
}

/// The configured certificate, or the self-signed one in `data_dir` (made now if missing).
pub fn ensure(
    data_dir: &Path,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    names: &[String],
) -> anyhow::Result<Tls> {
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => {
            let c = data_dir.join("cert.pem");
            let k = data_dir.join("key.pem");
            if !c.exists() || !k.exists() {
                let made = rcgen::generate_simple_self_signed(names.to_vec())?;
                std::fs::write(&c, made.cert.pem())?;
                {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&k)?;
                    f.write_all(made.signing_key.serialize_pem().as_bytes())?;
                }
            }
            (c, k)
        }
        _ => anyhow::bail!("give both a certificate and a key, or neither for a self-signed one"),
    };
    Ok(Tls {
        fingerprint: fingerprint(&cert)?,
        cert,
        key,
    })
}
