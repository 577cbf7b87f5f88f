//! The client side: verify the server against the CA (and its name where there is one), and
//! present a client certificate when the directory has one.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::creds::{CredsDir, CLIENT_CERT, CLIENT_KEY};
use crate::error::{Error, Result};
use crate::provider;

/// A client's TLS configuration for one server: the CA to trust, the name to check (if any) and
/// the client's own certificate (if the directory has one). Cheap to clone; reused for every
/// connection and reconnection to that server.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    hostname: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads the credentials in `dir` (QEMU's `tls-creds-x509` layout, client side).
    ///
    /// `hostname` is the name the server's certificate must carry: the host of a TCP address,
    /// or QEMU's `tls-hostname` where given. `None` (a unix socket without `tls-hostname`)
    /// verifies the certificate chain against the CA but checks no name, as QEMU does.
    pub fn from_dir(dir: &Path, hostname: Option<&str>) -> Result<Self> {
        let creds = CredsDir::open(dir)?;
        let roots = Arc::new(creds.roots()?);
        let crls = creds.crls()?;
        let provider = provider();
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .with_crls(crls)
            .build()
            .map_err(|e| Error::Verifier {
                dir: dir.to_path_buf(),
                reason: e.to_string(),
            })?;
        let verifier = Arc::new(CaVerifier {
            inner,
            check_name: hostname.is_some(),
        });
        let config_error = |source| Error::Config {
            dir: dir.to_path_buf(),
            source,
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match creds.optional_identity(CLIENT_CERT, CLIENT_KEY)? {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(config_error)?,
            None => builder.with_no_client_auth(),
        };
        // SNI only names a DNS host; without a name to check there is none to send.
        config.enable_sni = hostname.is_some();
        let server_name = server_name(hostname)?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
            hostname: hostname.map(str::to_owned),
        })
    }

    /// The server name checked, if any.
    pub fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref()
    }

    /// Runs the TLS handshake over `stream` (right after the server acknowledged
    /// `NBD_OPT_STARTTLS`). A failed verification is an `io::Error` of kind `InvalidData`
    /// whose message is rustls's reason ("invalid peer certificate: UnknownIssuer", ...).
    pub async fn connect<S>(&self, stream: S) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(self.server_name.clone(), stream)
            .await
    }
}

/// The name handed to rustls: the one to check, or a placeholder that [`CaVerifier`] does not
/// check (and that is not sent, SNI being off).
fn server_name(hostname: Option<&str>) -> Result<ServerName<'static>> {
    let name = hostname.unwrap_or("localhost");
    // An IPv6 host may arrive bracketed, as in a URI.
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| Error::ServerName {
        name: name.to_owned(),
    })
}

/// webpki's verifier (chain, validity, revocation, signatures), with the name check dropped when
/// there is no name to check. webpki verifies the chain before the name, so a name error means
/// the chain was good.
#[derive(Debug)]
struct CaVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
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
