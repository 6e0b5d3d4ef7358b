//! The certificate chain and private key of `wss://` listeners: loaded, and checked to
//! belong together, the same way at start, by `--check-config` and at every reload.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What is wrong with a TLS pair, by the file to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsError {
    /// The certificate file: unreadable, no certificate in it, or one rustls cannot parse.
    Cert(String),
    /// The key file: unreadable, or no usable private key in it.
    Key(String),
    /// Both read, but the key is not the certificate's.
    Mismatch(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Cert(s) | TlsError::Key(s) | TlsError::Mismatch(s) => f.write_str(s),
        }
    }
}

/// Load a PEM certificate chain and private key into a rustls server configuration.
/// `with_single_cert` (rustls 0.23) compares the key's public half with the end-entity
/// certificate's and refuses a mismatch, and parses that certificate on the way.
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    load_pair(cert, key).map_err(|e| e.to_string())
}

/// [`load_tls`], telling which file is to blame.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let bad_cert = |e: &dyn std::fmt::Display| {
        TlsError::Cert(format!("TLS certificate {}: {e}", cert.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad_cert(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad_cert(&e))?;
    if certs.is_empty() {
        return Err(bad_cert(&"no PEM certificate found"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Key(format!("TLS key {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Cert(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch(format!(
                "the private key in {} does not match the certificate in {} ({e})",
                key.display(),
                cert.display()
            )),
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                bad_cert(&e)
            }
            e => TlsError::Key(format!("TLS key {}: {e}", key.display())),
        })?;
    Ok(Arc::new(config))
}
