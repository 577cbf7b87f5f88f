//! The crate's error type.

/// What went wrong in the vhost-user-blk backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be bound or listened on.
    #[error("vhost-user-blk socket {path}: {source}")]
    Socket {
        /// The socket's path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The vhost-user daemon failed (creating it, or a connection's protocol).
    #[error("vhost-user-blk daemon: {0:?}")]
    Daemon(vhost_user_backend::Error),
    /// A thread or event file descriptor could not be created.
    #[error("vhost-user-blk: {what}: {source}")]
    Resource {
        /// What was being created.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The number of queues is out of range.
    #[error("--num-queues {0}: must be between 1 and {max}", max = crate::MAX_QUEUES)]
    QueueCount(usize),
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;
