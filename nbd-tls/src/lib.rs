//! `nbd-tls`: the TLS half of NBD over TLS, on rustls (pure Rust, ring for the cryptography).
//!
//! NBD upgrades a plain connection with `NBD_OPT_STARTTLS` during option haggling; after the
//! server's acknowledgement both sides run a TLS handshake on the same socket and haggle on
//! inside it. The protocol side of that lives in `nbd-client` and `nbd-server`; this crate holds
//! what they share: the credentials, read from a directory laid out as QEMU's
//! `tls-creds-x509` object (`dir=`), nbdkit's `--tls-certificates` and libnbd's
//! `tls-certificates=` expect ([`creds`] has the table), and the handshake over any tokio
//! stream.
//!
//! - [`ClientTls`]: verifies the server's chain against `ca-cert.pem` (and `ca-crl.pem`), and its
//!   name where there is one (the TCP host or `tls-hostname`; over a unix socket with no
//!   `tls-hostname` there is none, as in QEMU), and presents `client-cert.pem` when present.
//! - [`ServerTls`]: presents `server-cert.pem`, and by default requires a client certificate
//!   signed by the CA (QEMU's `verify-peer=on`).
//! - [`Error`]: what is missing or wrong in a directory, named by file. TLS-PSK directories
//!   (`keys.psk`) are refused with [`Error::PskUnsupported`]: rustls has no PSK.
//!
//! Keys may be PKCS#1 (what `certtool` writes), PKCS#8 or SEC1; certificates RSA, ECDSA or
//! Ed25519. TLS 1.2 and 1.3 are offered, as QEMU's GnuTLS `NORMAL` priority does.
//!
//! ```no_run
//! # async fn demo(sock: tokio::net::TcpStream) -> Result<(), Box<dyn std::error::Error>> {
//! let tls = nbd_tls::ClientTls::from_dir("/etc/pki/qemu".as_ref(), Some("images.example"))?;
//! // ... NBD_OPT_STARTTLS sent and acknowledged on `sock` ...
//! let _stream = tls.connect(sock).await?;
//! # Ok(()) }
//! ```

mod client;
pub mod creds;
mod error;
mod server;

use std::sync::Arc;

pub use client::ClientTls;
pub use error::{Error, Result};
pub use server::ServerTls;

/// The crypto provider every configuration is built on (explicit, so no process-wide default is
/// installed or needed).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests;
