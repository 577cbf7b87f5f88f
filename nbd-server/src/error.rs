//! The crate's error type, [`Error`]: what can go wrong binding, serving and shutting down.
//! What a client does wrong is not an error of the server: it gets the protocol's answer (an
//! option error, an error reply, or a closed connection) and is only logged.

use std::path::PathBuf;

/// Everything the server's public API can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listen address that is neither `unix:PATH` nor `tcp:HOST:PORT`.
    #[error("invalid listen address {text:?}: {reason}")]
    InvalidAddress {
        /// The text given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A unix socket path on which another server still accepts connections.
    #[error("{0:?} is in use: a server accepts connections on it")]
    SocketInUse(PathBuf),
    /// A path that exists and is not a socket (never removed).
    #[error("{0:?} exists and is not a socket")]
    NotASocket(PathBuf),
    /// [`crate::Server::bind`] after [`crate::Server::shutdown`].
    #[error("the server is shut down")]
    ShutDown,
    /// An export could not be flushed at shutdown.
    #[error("flushing export {name:?} at shutdown: {source}")]
    Flush {
        /// The export.
        name: String,
        /// Why.
        #[source]
        source: copy_on_read::Error,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Why a connection ended before its client said goodbye (logged, never returned).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Disconnect {
    /// The socket failed or the client went away.
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol in a way that loses the framing.
    #[error("client broke the protocol: {0}")]
    Violation(#[from] nbd_proto::ClientViolation),
    /// The client exceeded a bound (option count or size, request size).
    #[error("client exceeded a limit: {0}")]
    Limit(&'static str),
    /// The handshake took longer than the configured timeout.
    #[error("handshake timed out")]
    Timeout,
    /// The server shut down during the handshake.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The TLS handshake after STARTTLS failed (rustls's error inside, when rustls refused).
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}
