//! The server side: present the server's certificate, and verify clients' certificates against
//! the CA unless told not to (QEMU's `verify-peer`, on by default for servers).

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::creds::{CredsDir, SERVER_CERT, SERVER_KEY};
use crate::error::{Error, Result};
use crate::provider;

/// A server's TLS configuration. Cheap to clone; shared by every connection.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    verify_peer: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the credentials in `dir` (QEMU's `tls-creds-x509` layout, server side).
    ///
    /// With `verify_peer` every client must present a certificate the CA (`ca-cert.pem`) signed
    /// and that no `ca-crl.pem` revokes; without it clients are not asked for one and
    /// `ca-cert.pem` may be absent.
    pub fn from_dir(dir: &Path, verify_peer: bool) -> Result<Self> {
        let creds = CredsDir::open(dir)?;
        let (certs, key) = creds.identity(SERVER_CERT, SERVER_KEY)?;
        let provider = provider();
        let config_error = |source| Error::Config {
            dir: dir.to_path_buf(),
            source,
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let builder = if verify_peer {
            let roots = Arc::new(creds.roots()?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .with_crls(creds.crls()?)
                .build()
                .map_err(|e| Error::Verifier {
                    dir: creds.path().to_path_buf(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).map_err(config_error)?;
        Ok(Self {
            config: Arc::new(config),
            verify_peer,
        })
    }

    /// Whether clients must present a certificate the CA signed.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    /// Runs the TLS handshake over `stream` (right after the server acknowledged
    /// `NBD_OPT_STARTTLS`). A client refused (no certificate, wrong CA, expired) is an
    /// `io::Error` of kind `InvalidData` whose message is rustls's reason.
    pub async fn accept<S>(&self, stream: S) -> std::io::Result<tokio_rustls::server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
            .accept(stream)
            .await
    }
}
