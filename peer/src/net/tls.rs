//! TLS for `wss://` relays (rustls with the `ring` provider): either the operating system's
//! root certificates, or only the certificates of a CA file the operator hands out (a private
//! CA for a clinic's own relay).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_tungstenite::Connector;

use super::NetError;

/// How to trust a `wss://` relay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// Trust exactly the CA certificates in this PEM file instead of the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl TlsOptions {
    pub fn with_ca_file(ca_file: impl Into<PathBuf>) -> Self {
        TlsOptions {
            ca_file: Some(ca_file.into()),
        }
    }
}

fn tls_error(message: impl Into<String>) -> NetError {
    NetError::Tls(message.into())
}

/// The connector for `url`: plain for `ws://`, rustls for `wss://`.
pub(crate) fn connector(url: &str, opts: &TlsOptions) -> Result<Connector, NetError> {
    if !url.starts_with("wss://") {
        if let Some(ca) = &opts.ca_file {
            return Err(tls_error(format!(
                "a CA file ({}) was given but the relay address {url} is not wss://",
                ca.display()
            )));
        }
        return Ok(Connector::Plain);
    }
    let mut roots = RootCertStore::empty();
    match &opts.ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| tls_error(format!("cannot read the CA file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(tls_error(format!("{} holds no certificate", path.display())));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| tls_error(format!("bad CA certificate in {}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(tls_error(
                    "no system root certificates found; pass the relay's CA with --ca-file",
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(Arc::new(config)))
}
