//! What a TLS-only server tells its operator about the clients it turned away: [`Refused`],
//! one per connection that got no service because it did not speak TLS or failed the TLS
//! handshake, delivered by [`crate::Server::refusals`] (and logged with `tracing`).

use std::fmt;

use nbd_proto::*;

/// Why a client of a TLS-only server was turned away.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsRefusal {
    /// The client sent an option other than STARTTLS before TLS: it got
    /// `NBD_REP_ERR_TLS_REQD` (a plain-text client, or a downgrade attempt).
    #[error(
        "a plain-text client: it sent {} before STARTTLS and got NBD_REP_ERR_TLS_REQD (TLS is \
         required)",
        spelled_option(*.option)
    )]
    PlainOption {
        /// The first option it sent.
        option: u32,
    },
    /// The client sent `NBD_OPT_EXPORT_NAME` before TLS; that option cannot be refused, so
    /// the connection was closed.
    #[error(
        "a plain-text client: it sent NBD_OPT_EXPORT_NAME before STARTTLS, connection closed \
         (TLS is required)"
    )]
    PlainExportName,
    /// The TLS handshake after STARTTLS failed (no client certificate, one from another CA,
    /// an expired one, or no TLS at all); the connection was closed.
    #[error("TLS handshake failed: {reason}")]
    Handshake {
        /// Why.
        reason: HandshakeFailure,
    },
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// rustls refused the client or the exchange: no certificate
    /// (`NoCertificatesPresented`), one it cannot verify (`InvalidCertificate`: an unknown
    /// issuer, expired, revoked), an alert the client sent, or bytes that are not TLS.
    #[error("{0}")]
    Rejected(rustls::Error),
    /// The socket failed or the client went away during the handshake.
    #[error("{kind}")]
    Io {
        /// What kind of failure.
        kind: std::io::ErrorKind,
    },
}

impl HandshakeFailure {
    /// What a failed `accept` says: rustls's error when rustls refused, else the I/O error's
    /// kind.
    pub(crate) fn of(e: &std::io::Error) -> HandshakeFailure {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => HandshakeFailure::Rejected(tls.clone()),
            None => HandshakeFailure::Io { kind: e.kind() },
        }
    }
}

/// One connection a TLS-only server turned away.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// Who connected: `tcp:ADDR:PORT`, or `unix socket` with the peer's pid and uid.
    pub peer: String,
    /// Why it got no service.
    pub reason: TlsRefusal,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NBD client {} refused: {}", self.peer, self.reason)
    }
}

/// The spec's name of an option (`NBD_OPT_GO`), or its number.
fn spelled_option(option: u32) -> String {
    match option_name(option) {
        Some(name) => format!("NBD_OPT_{name}"),
        None => format!("option {option}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_option_and_the_peer() {
        let r = Refused {
            peer: "tcp:127.0.0.1:4000".into(),
            reason: TlsRefusal::PlainOption { option: OPT_GO },
        };
        let line = r.to_string();
        assert!(line.contains("tcp:127.0.0.1:4000"), "{line}");
        assert!(line.contains("NBD_OPT_GO before STARTTLS"), "{line}");
        assert_eq!(spelled_option(99), "option 99");
    }

    #[test]
    fn handshake_failures_keep_rustls_errors_and_io_kinds() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::NoCertificatesPresented,
        );
        assert_eq!(
            HandshakeFailure::of(&refused),
            HandshakeFailure::Rejected(rustls::Error::NoCertificatesPresented)
        );
        let gone = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let failure = HandshakeFailure::of(&gone);
        assert_eq!(
            failure,
            HandshakeFailure::Io {
                kind: std::io::ErrorKind::UnexpectedEof
            }
        );
        assert_eq!(failure.to_string(), "unexpected end of file");
    }
}
