//! What a TLS-only server tells its operator about the clients it turned away: [`Refused`],
//! one per connection that got no service because it did not speak TLS or failed the TLS
//! handshake, delivered by [`crate::Server::refusals`] (and logged with `tracing`).

use std::fmt;

use nbd_proto::*;

/// Why a client of a TLS-only server was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsRefusal {
    /// The client sent an option other than STARTTLS before TLS: it got
    /// `NBD_REP_ERR_TLS_REQD` (a plain-text client, or a downgrade attempt).
    #[error(
        "a plain-text client: it sent {} before STARTTLS and got NBD_REP_ERR_TLS_REQD (TLS is \
         required)",
        option_name(*.option)
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
        /// rustls's reason, or the socket's error.
        reason: String,
    },
}

/// One connection a TLS-only server turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
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
pub fn option_name(option: u32) -> String {
    let name = match option {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        other => return format!("option {other}"),
    };
    format!("NBD_OPT_{name}")
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
        assert_eq!(option_name(99), "option 99");
    }
}
