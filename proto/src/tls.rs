//! TLS for connections to the CA: the server's root certificate and, for mutual TLS, the
//! client's certificate and key, all as PEM files.
//!
//! Used by `quva-ca`'s admin commands and by `quva-bridge`. Without [`ClientTls`] a connection is
//! plain HTTP/2 (the default for a CA on loopback).
//!
//! # Usage
//! ```
//! let endpoint = quva_proto::tls::endpoint("http://127.0.0.1:7443", None).unwrap();
//! assert_eq!(endpoint.uri().port_u16(), Some(7443));
//! ```

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The PEM files of a TLS connection to the CA.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The root certificate(s) the CA's server certificate must chain to.
    pub ca_cert: PathBuf,
    /// The client certificate chain, for mutual TLS.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key, for mutual TLS.
    pub key: Option<PathBuf>,
    /// The name to expect in the server certificate, if not the URL's host.
    pub domain: Option<String>,
}

/// Why a connection to the CA could not be set up.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read.
    Read(PathBuf, std::io::Error),
    /// A client certificate without its key, or a key without its certificate.
    IncompleteIdentity,
    /// The URL or the TLS settings are not usable.
    Endpoint(tonic::transport::Error),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Read(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            TlsError::IncompleteIdentity => {
                f.write_str("a client certificate needs its key, and a key its certificate")
            }
            TlsError::Endpoint(e) => write!(f, "invalid CA endpoint: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read(path.to_owned(), e))
}

/// An endpoint for `url`, with TLS when `tls` is given (the URL should then be `https://`).
///
/// # Errors
/// [`TlsError`] for an unreadable file, half an identity or an unusable URL.
pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, TlsError> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(TlsError::Endpoint)?;
    let Some(tls) = tls else {
        return Ok(endpoint);
    };
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&tls.ca_cert)?));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let key = zeroize::Zeroizing::new(read(key)?);
            config = config.identity(Identity::from_pem(read(cert)?, &*key));
        }
        (None, None) => {}
        _ => return Err(TlsError::IncompleteIdentity),
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    endpoint.tls_config(config).map_err(TlsError::Endpoint)
}
