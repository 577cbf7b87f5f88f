//! The errors of loading TLS credentials.

use std::path::PathBuf;

/// Why TLS credentials could not be loaded or a TLS configuration built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The credentials directory does not exist or is not a directory.
    #[error("TLS credentials directory {path}: {reason}")]
    Directory {
        /// The directory given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A file the configuration needs is missing from the directory.
    #[error(
        "{path}: missing; a TLS credentials directory (QEMU's tls-creds-x509 layout) needs {role} \
         in this file"
    )]
    Missing {
        /// The file that was looked for.
        path: PathBuf,
        /// What the file holds, for the message ("the CA certificate", ...).
        role: &'static str,
    },
    /// A file exists but holds no usable PEM object of the expected kind.
    #[error("{path}: not a usable PEM file of {role}: {reason}")]
    Pem {
        /// The file read.
        path: PathBuf,
        /// What it should hold.
        role: &'static str,
        /// What was wrong (unreadable, no object of that kind, malformed base64, ...).
        reason: String,
    },
    /// Only one half of a certificate/key pair is present.
    #[error("{present} exists but {absent} does not: a certificate needs its private key")]
    HalfPair {
        /// The file found.
        present: PathBuf,
        /// Its missing partner.
        absent: PathBuf,
    },
    /// The directory holds TLS-PSK credentials (`keys.psk`), which rustls does not implement.
    #[error(
        "{path}: TLS-PSK credentials are not supported (rustls has no PSK cipher suites for TLS \
         1.2 or external PSKs for TLS 1.3); use X.509 credentials: a directory with ca-cert.pem \
         and the server's or client's cert and key, as QEMU's tls-creds-x509 has"
    )]
    PskUnsupported {
        /// The PSK file found.
        path: PathBuf,
    },
    /// The TLS server name (host or `tls-hostname`) is not a DNS name or IP address.
    #[error("TLS server name {name:?} is neither a DNS name nor an IP address")]
    ServerName {
        /// The name given.
        name: String,
    },
    /// rustls refused the certificates or keys (for example a key that does not match its
    /// certificate, or an algorithm it does not support).
    #[error("TLS configuration from {dir}: {source}")]
    Config {
        /// The credentials directory.
        dir: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The CA certificates (or CRLs) could not be made into a client-certificate verifier.
    #[error("TLS client verification from {dir}: {reason}")]
    Verifier {
        /// The credentials directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
