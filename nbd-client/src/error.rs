//! The crate's one error type, [`Error`], and the protocol violations it can carry.

use std::sync::Arc;
use std::time::Duration;

use crate::protocol::Command;
/// The protocol violations an [`Error::Protocol`] carries (defined with the wire format they
/// break).
pub use crate::protocol::Violation;

/// Everything that can go wrong talking to an NBD server.
///
/// The variants tell apart what a caller must treat differently: a failed transport may be
/// retried ([`Error::is_retryable`]), a protocol violation never, an error the server reported
/// ([`Error::Server`]) concerns one request only, and a local refusal ([`Error::Refused`]) means
/// nothing was sent.
///
/// # Retryable
///
/// This is the one meaning of "retryable" in the workspace (`copy_on_read::Error::is_retryable`
/// forwards it): **the request did not reach a definitive answer because the transport failed**
/// (no connection could be made, the handshake was cut, the connection was lost, a deadline
/// passed, or the reconnect window closed), not because of what was asked or what the server
/// answered. The same request may succeed once a connection works again: on this client after it
/// reconnects, or, after [`Error::ReconnectFailed`] (this client gave up), on a new one. The data
/// on the server is unchanged by a failed read, block status or cache; a failed write, zero or
/// trim may or may not have reached the server, and repeating it at the same offset is safe.
/// Never retryable: a protocol violation (the server is broken), an error the server reported
/// (it answered), a local refusal, a bad URI, an unsupported server or TLS, a changed export, a
/// closed client, and a request whose every send lost the connection
/// ([`Error::ResendsExhausted`]: a poison request is handled like an error the server reported
/// on it, so that no layer above loops on it).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection could be made (nothing listens there, refused, unreachable); nothing was
    /// ever connected (retryable: the server may be starting).
    #[error("cannot connect to NBD server at {address}: {source}")]
    CannotConnect {
        /// The socket path or host:port.
        address: String,
        /// Why.
        source: Arc<std::io::Error>,
    },
    /// The socket connected but the server hung up (or the socket failed) before the handshake
    /// completed (retryable).
    #[error("NBD handshake failed: {0}")]
    HandshakeFailed(Arc<std::io::Error>),
    /// The export is larger than any disk QEMU (or QED) can address: `BDRV_MAX_LENGTH`, 2^63
    /// minus 1 GiB.
    #[error("NBD export of {size} bytes is too large (the limit is {limit} bytes)")]
    ExportTooLarge {
        /// The size the server announced.
        size: u64,
        /// [`crate::MAX_EXPORT_SIZE`].
        limit: u64,
    },
    /// The server broke the protocol. The connection is dead and is not reconnected.
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(#[from] Violation),
    /// A socket error or EOF (retryable: reconnect may help).
    #[error("connection to the NBD server lost: {0}")]
    ConnectionLost(Arc<std::io::Error>),
    /// The server failed one request; the connection stays usable.
    #[error("NBD server failed {command} at offset {offset} length {length}: {errno} ({message})")]
    Server {
        /// The command that failed.
        command: Command,
        /// The request's offset.
        offset: u64,
        /// The request's length.
        length: u64,
        /// The error the server reported.
        errno: Errno,
        /// The server's message (may be empty).
        message: String,
        /// The offset an ERROR_OFFSET chunk named, if any.
        error_offset: Option<u64>,
    },
    /// The client refused the request before sending anything.
    #[error("request refused locally: {0}")]
    Refused(#[from] Refusal),
    /// A deadline passed (connect, handshake, or one request).
    #[error("NBD {what} timed out after {after:?}")]
    Timeout {
        /// What timed out: "connect", "handshake" or "request".
        what: &'static str,
        /// The configured limit.
        after: Duration,
    },
    /// The server requires TLS (it answered an option with `NBD_REP_ERR_TLS_REQD`) and the
    /// location did not ask for it.
    #[error(
        "the NBD server requires TLS ({message:?}): use an nbds:// or nbds+unix:// URI (or \
         \"tls-creds\" in a json: backing) and give the credentials with --tls-creds DIR"
    )]
    TlsRequired {
        /// The server's message.
        message: String,
    },
    /// The location asks for TLS but no credentials directory was given (neither the URI's
    /// `tls-certificates=` nor [`crate::ClientConfig::tls_creds`]).
    #[error(
        "TLS is required but no credentials were given: pass --tls-creds DIR (a \
         directory laid out as QEMU's tls-creds-x509: ca-cert.pem, and client-cert.pem and \
         client-key.pem if the server verifies clients){qemu_hint}"
    )]
    TlsCredsMissing {
        /// The location.
        uri: String,
        /// For a `json:` location: how QEMU would be given the same credentials.
        qemu_hint: String,
    },
    /// The TLS credentials could not be loaded (or are TLS-PSK, which rustls lacks).
    #[error("NBD over TLS: {0}")]
    TlsCreds(Arc<nbd_tls::Error>),
    /// TLS was required and the server refused or ignored `NBD_OPT_STARTTLS` (an error
    /// reply, an oldstyle server, a reply that is no ACK): the client never goes on in plain
    /// text.
    #[error(
        "TLS was required but the NBD server refused it ({reply}: {message:?}); not falling \
         back to plain text"
    )]
    TlsRefused {
        /// The server's answer ("ERR_UNSUP", "ERR_POLICY", "oldstyle negotiation", ...).
        reply: &'static str,
        /// The server's message, if any.
        message: String,
    },
    /// The TLS handshake failed or the server ended the TLS session during negotiation: an
    /// untrusted, expired or misnamed server certificate, or a server that wanted a client
    /// certificate we did not have or that it did not trust.
    #[error("TLS with the NBD server failed: {0}{hint}", hint = tls_hint(.0))]
    TlsHandshake(Arc<std::io::Error>),
    /// The URI could not be parsed.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    InvalidUri {
        /// The text given.
        uri: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The server does not speak what we require (oldstyle, non-fixed newstyle).
    #[error("unsupported NBD server: {0}")]
    UnsupportedServer(&'static str),
    /// The server refused a handshake option (e.g. the export does not exist).
    #[error("NBD server refused option {option} with {reply}{}", refusal_detail(.reply, .message))]
    OptionRefused {
        /// The option (e.g. "GO").
        option: &'static str,
        /// The error reply's name (e.g. "ERR_UNKNOWN").
        reply: &'static str,
        /// The server's message.
        message: String,
    },
    /// After a reconnect the export no longer matches what we negotiated first.
    #[error("NBD export changed across reconnect: {0}")]
    ExportChanged(String),
    /// The reconnect window closed without a working connection: for the client (it is then
    /// [`crate::ConnectionState::Offline`], reconnecting in the background, or `Failed` when
    /// that is disabled), or for one request, counted from its first failure (retryable: on
    /// this client once it has reconnected, or on a new one).
    #[error("NBD server unreachable: reconnect window of {window:?} closed; last error: {last}")]
    ReconnectFailed {
        /// The configured window.
        window: Duration,
        /// The last error seen while trying.
        last: Box<Error>,
    },
    /// The connection was lost every time this request was sent (its first send and
    /// [`crate::ClientConfig::max_resends`] more), although the client reconnected in between: a
    /// request the server dies on, or a server that keeps dying. Not retryable: sending it again
    /// would most likely do the same; the caller decides (a copy-on-read device reports EIO).
    #[error("NBD {command} at offset {offset} length {length} failed: the connection was lost each of the {sends} times it was sent; last: {last}")]
    ResendsExhausted {
        /// The command.
        command: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// How many times it was sent.
        sends: u32,
        /// The last lost connection.
        last: Arc<std::io::Error>,
    },
    /// The client was closed.
    #[error("NBD client is closed")]
    Closed,
}

impl Error {
    /// Whether the request failed because the transport failed, so that the same request may
    /// succeed once a connection works again (see [Retryable](Error#retryable)):
    /// [`Error::CannotConnect`], [`Error::HandshakeFailed`], [`Error::ConnectionLost`],
    /// [`Error::Timeout`] and [`Error::ReconnectFailed`].
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::ConnectionLost(_)
                | Error::Timeout { .. }
                | Error::CannotConnect { .. }
                | Error::HandshakeFailed(_)
                | Error::ReconnectFailed { .. }
        )
    }

    /// Whether this is a protocol violation by the server.
    pub fn is_protocol_violation(&self) -> bool {
        matches!(self, Error::Protocol(_))
    }

    /// The errno the server reported, if this is a server error.
    pub fn server_errno(&self) -> Option<Errno> {
        match self {
            Error::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub(crate) fn io(e: std::io::Error) -> Error {
        Error::ConnectionLost(Arc::new(e))
    }

    pub(crate) fn eof() -> Error {
        Error::io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "server closed the connection",
        ))
    }
}

/// What a TLS failure most likely means, in words an operator acts on: which certificate
/// check failed (rustls's own reason follows it), or, for a session the server ended, that it
/// may want a client certificate.
fn tls_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    use tokio_rustls::rustls::{CertificateError, Error as Tls};
    let reason = e.get_ref().and_then(|r| r.downcast_ref::<Tls>());
    match reason {
        Some(Tls::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                " (the server's certificate is not signed by the CA in ca-cert.pem)"
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => {
                " (the server's certificate is outside its validity period)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                " (the server's certificate does not name the host; tls-hostname=NAME checks \
                 another name)"
            }
            CertificateError::Revoked => " (the server's certificate is revoked by ca-crl.pem)",
            _ => "",
        },
        Some(Tls::AlertReceived(_)) => {
            " (the server refused the session: it may require a client certificate, \
             client-cert.pem and client-key.pem signed by a CA it trusts)"
        }
        None if matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe) => {
            " (the server ended the session: it may require a client certificate, \
             client-cert.pem and client-key.pem signed by a CA it trusts)"
        }
        _ => "",
    }
}

/// What [`Error::OptionRefused`] adds after the reply's name: the server's message when it
/// gave one, and for `ERR_UNKNOWN` (the export is not available) where to look, since
/// servers often send no message: nbdkit's curl plugin whose web server is down or whose
/// certificate does not verify answers `GO` with `ERR_UNKNOWN` and an empty message.
fn refusal_detail(reply: &str, message: &str) -> String {
    let mut detail = String::new();
    if !message.is_empty() {
        detail = format!(": {message:?}");
    }
    if reply == "ERR_UNKNOWN" {
        detail.push_str(
            " (the export is not available: no export of that name, or the server could not \
             open what it exports; the server's log says which)",
        );
    }
    detail
}

/// An NBD error value (defined with the wire format).
pub use crate::protocol::Errno;

/// Why a request was refused without being sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The server did not advertise the command (or flag).
    #[error("the server does not support {0}")]
    Unsupported(&'static str),
    /// The export is read-only.
    #[error("the export is read-only")]
    ReadOnly,
    /// The range does not lie inside the export.
    #[error("range {offset}+{length} is outside the export of {size} bytes")]
    OutOfBounds {
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// Offset or length is not a multiple of the server's minimum block size.
    #[error("range {offset}+{length} is not aligned to the minimum block size {alignment}")]
    Misaligned {
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u64,
        /// Required alignment.
        alignment: u32,
    },
    /// A zero-length request.
    #[error("zero-length request")]
    ZeroLength,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant on its side of [Retryable](Error#retryable): a failed transport, and
    /// nothing else.
    #[test]
    fn retryable_means_the_transport_failed() {
        let io = || Arc::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let lost = Error::ConnectionLost(io());
        let transport = [
            Error::CannotConnect {
                address: "x".into(),
                source: io(),
            },
            Error::HandshakeFailed(io()),
            lost.clone(),
            Error::Timeout {
                what: "request",
                after: Duration::from_secs(1),
            },
            Error::ReconnectFailed {
                window: Duration::from_secs(1),
                last: Box::new(lost),
            },
        ];
        for e in &transport {
            assert!(e.is_retryable(), "{e:?}");
        }
        let answered_or_refused = [
            Error::ExportTooLarge { size: 1, limit: 0 },
            Error::Protocol(Violation::TooFragmented),
            Error::Server {
                command: Command::Read,
                offset: 0,
                length: 1,
                errno: Errno::EIO,
                message: String::new(),
                error_offset: None,
            },
            Error::Refused(Refusal::ZeroLength),
            Error::TlsRequired {
                message: "x".into(),
            },
            Error::TlsRefused {
                reply: "ERR_UNSUP",
                message: String::new(),
            },
            Error::TlsHandshake(io()),
            Error::InvalidUri {
                uri: "x".into(),
                reason: "y".into(),
            },
            Error::UnsupportedServer("oldstyle"),
            Error::OptionRefused {
                option: "GO",
                reply: "ERR_UNKNOWN",
                message: String::new(),
            },
            Error::ExportChanged("size".into()),
            Error::ResendsExhausted {
                command: Command::Read,
                offset: 0,
                length: 1,
                sends: 4,
                last: io(),
            },
            Error::Closed,
        ];
        for e in &answered_or_refused {
            assert!(!e.is_retryable(), "{e:?}");
        }
    }
}
