//! The credentials directory: QEMU's `tls-creds-x509` layout, read into rustls types.
//!
//! | file | holds | needed by |
//! |---|---|---|
//! | `ca-cert.pem` | the CA certificate(s) peers are verified against | clients; servers that verify peers |
//! | `ca-crl.pem` | revoked certificates (optional) | whoever verifies |
//! | `server-cert.pem`, `server-key.pem` | the server's chain and key | servers |
//! | `client-cert.pem`, `client-key.pem` | the client's chain and key (optional) | clients a server verifies |
//!
//! Keys may be PKCS#1 (`BEGIN RSA PRIVATE KEY`, what `certtool` writes), PKCS#8 or SEC1.
//! `dh-params.pem` is ignored (rustls chooses its own key exchange). A directory holding
//! `keys.psk` and no `ca-cert.pem` is QEMU's `tls-creds-psk` layout and is refused with
//! [`Error::PskUnsupported`].

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// The CA certificate file.
pub const CA_CERT: &str = "ca-cert.pem";
/// The optional certificate revocation list.
pub const CA_CRL: &str = "ca-crl.pem";
/// The server's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The client's certificate chain.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client's private key.
pub const CLIENT_KEY: &str = "client-key.pem";
/// QEMU's `tls-creds-psk` key file, which we refuse.
pub const PSK_KEYS: &str = "keys.psk";

/// A credentials directory, checked to exist and not to be a PSK directory.
#[derive(Debug, Clone)]
pub(crate) struct CredsDir {
    dir: PathBuf,
}

impl CredsDir {
    /// Checks that `dir` is a directory and not TLS-PSK credentials.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let meta = std::fs::metadata(dir).map_err(|e| Error::Directory {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        if !meta.is_dir() {
            return Err(Error::Directory {
                path: dir.to_path_buf(),
                reason: "not a directory".into(),
            });
        }
        let psk = dir.join(PSK_KEYS);
        if psk.exists() && !dir.join(CA_CERT).exists() {
            return Err(Error::PskUnsupported { path: psk });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether the directory holds `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.file(name).exists()
    }

    /// The CA certificates from `ca-cert.pem`, as trust roots.
    pub(crate) fn roots(&self) -> Result<RootCertStore> {
        let path = self.file(CA_CERT);
        let role = "the CA certificate";
        let certs = certificates(&path, role)?;
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| Error::Pem {
                path: path.clone(),
                role,
                reason: e.to_string(),
            })?;
        }
        Ok(roots)
    }

    /// The revocation lists of `ca-crl.pem`, or none when the file is absent.
    pub(crate) fn crls(&self) -> Result<Vec<CertificateRevocationListDer<'static>>> {
        let path = self.file(CA_CRL);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let role = "certificate revocation lists";
        let crls = CertificateRevocationListDer::pem_file_iter(&path)
            .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| pem_error(&path, role, e))?;
        if crls.is_empty() {
            return Err(empty(&path, role));
        }
        Ok(crls)
    }

    /// A certificate chain and its key, both required.
    pub(crate) fn identity(
        &self,
        cert_name: &str,
        key_name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let cert_path = self.file(cert_name);
        let key_path = self.file(key_name);
        let certs = certificates(&cert_path, "a certificate")?;
        let key = private_key(&key_path)?;
        Ok((certs, key))
    }

    /// A certificate chain and its key if both are present, `None` if neither is, and an error
    /// if only one is.
    pub(crate) fn optional_identity(
        &self,
        cert_name: &str,
        key_name: &str,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>> {
        match (self.has(cert_name), self.has(key_name)) {
            (false, false) => Ok(None),
            (true, true) => self.identity(cert_name, key_name).map(Some),
            (cert, _) => {
                let (present, absent) = if cert {
                    (cert_name, key_name)
                } else {
                    (key_name, cert_name)
                };
                Err(Error::HalfPair {
                    present: self.file(present),
                    absent: self.file(absent),
                })
            }
        }
    }
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path, role: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    if !path.exists() {
        return Err(Error::Missing {
            path: path.to_path_buf(),
            role,
        });
    }
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| pem_error(path, role, e))?;
    if certs.is_empty() {
        return Err(empty(path, role));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#1, PKCS#8 or SEC1).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let role = "a private key";
    if !path.exists() {
        return Err(Error::Missing {
            path: path.to_path_buf(),
            role,
        });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, role, e))
}

fn pem_error(path: &Path, role: &'static str, e: rustls_pki_types::pem::Error) -> Error {
    let reason = match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM object of that kind".to_string(),
        other => other.to_string(),
    };
    Error::Pem {
        path: path.to_path_buf(),
        role,
        reason,
    }
}

fn empty(path: &Path, role: &'static str) -> Error {
    Error::Pem {
        path: path.to_path_buf(),
        role,
        reason: "no PEM object of that kind".into(),
    }
}
