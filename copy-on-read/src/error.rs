//! The one error type of the `copy-on-read` crate: a stable kind, the operation and offset, and
//! the source.

use std::path::PathBuf;

/// Why a backing could not be admitted: the one set of gate rules ([`qed::gate::Refusal`]).
pub use qed::gate::Refusal as GateRefusal;

/// Everything a block device can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Local I/O failed.
    #[error("I/O error while {op} at offset {offset:#x}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where (guest or file offset, as `op` says).
        offset: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The QED layer failed.
    #[error("{path}: {source}")]
    Qed {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: qed::Error,
    },
    /// The NBD backing failed. [`Error::is_retryable`] tells a lost connection apart.
    #[error("NBD backing {uri}: {source}")]
    Nbd {
        /// The URI as stored in the header.
        uri: String,
        /// Why.
        #[source]
        source: nbd_client::Error,
    },
    /// The gate refused to open a backing.
    #[error("backing {name:?} of {image}: {refusal}")]
    Gate {
        /// The name as stored in the header.
        name: String,
        /// The image that names it.
        image: String,
        /// Why.
        refusal: GateRefusal,
    },
    /// A file could not be opened.
    #[error("cannot open {path:?}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A request reaches past the end of the device.
    #[error("request [{offset:#x}, +{length:#x}) is outside the device of {size} bytes")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u64,
        /// Device size.
        size: u64,
    },
    /// A write to a read-only device.
    #[error("the device is read-only")]
    ReadOnly,
    /// The device cannot do this.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// The device was closed, or the backing link was dropped while a request needed it.
    #[error("the device is closed")]
    Closed,
    /// A blocking task panicked or was cancelled by the runtime.
    #[error("a blocking I/O task failed: {0}")]
    Task(String),
}

impl Error {
    /// True when retrying later may succeed: the NBD connection was lost or timed out.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Nbd { source, .. } => {
                source.is_retryable() || matches!(source, nbd_client::Error::ReconnectFailed { .. })
            }
            _ => false,
        }
    }

    /// True when the error comes from the backing's transport (the server went away), as
    /// opposed to the local image.
    pub fn is_backing_unavailable(&self) -> bool {
        matches!(self, Error::Nbd { .. })
    }

    pub(crate) fn io(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { op, offset, source }
    }

    pub(crate) fn qed(path: &str) -> impl FnOnce(qed::Error) -> Error + '_ {
        move |source| Error::Qed {
            path: path.to_string(),
            source,
        }
    }
}

/// Result with the crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs blocking work on tokio's blocking pool and flattens a join error into [`Error::Task`].
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(Error::Task(e.to_string())),
    }
}
