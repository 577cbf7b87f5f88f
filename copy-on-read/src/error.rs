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
    /// A qcow2 layer cannot be read (refused at open, or its tables are damaged).
    #[error("{path}: {source}")]
    Qcow2 {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: crate::qcow2::Qcow2Error,
    },
    /// The NBD backing failed. [`Error::is_retryable`] tells a failed transport apart.
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
    /// A backing was to be repointed at an export of another size; nothing was changed.
    #[error("cannot repoint the backing at {uri}: its export has {found} bytes, the backing has {expected}; nothing was changed")]
    RepointSizeMismatch {
        /// The new URI.
        uri: String,
        /// The size of the backing now.
        expected: u64,
        /// The size of the new export.
        found: u64,
    },
    /// A copy request needs more buffer memory than the whole budget of its pool.
    #[error("a request of {length} bytes exceeds the buffer budget of {budget} bytes")]
    OverBudget {
        /// The request's length.
        length: u64,
        /// The pool's budget.
        budget: u64,
    },
    /// Buffers given to [`crate::Populate::fetch_range`] do not hold its unit, widened to
    /// whole clusters, exactly.
    #[error("a copy of {need} bytes was given buffers of {have} bytes")]
    BuffersMismatch {
        /// The unit's bytes, widened to whole clusters.
        need: u64,
        /// The buffers' bytes.
        have: u64,
    },
    /// The device was closed, or the backing link was dropped while a request needed it.
    #[error("the device is closed")]
    Closed,
    /// A blocking task panicked, or the runtime cancelled it (it is shutting down). Tell the
    /// two apart with [`tokio::task::JoinError::is_panic`].
    #[error("a blocking I/O task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl Error {
    /// Whether the same request may succeed later: exactly [`nbd_client::Error::is_retryable`]
    /// of the NBD backing's error (its transport failed, so no definitive answer came back; a
    /// failed read changed nothing). False for everything else: a local I/O error, a damaged
    /// image, a refusal, an error the server reported for the request, a protocol violation.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Nbd { source, .. } => source.is_retryable(),
            _ => false,
        }
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
        Err(e) => Err(Error::Task(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nbd(source: nbd_client::Error) -> Error {
        Error::Nbd {
            uri: "nbd://x".into(),
            source,
        }
    }

    /// Retryable here is exactly the NBD client's meaning, for the NBD backing only.
    #[test]
    fn retryable_forwards_the_nbd_meaning() {
        let lost = nbd_client::Error::ConnectionLost(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof,
        )));
        let gone = nbd_client::Error::ReconnectFailed {
            window: std::time::Duration::from_secs(1),
            last: Box::new(lost.clone()),
        };
        let server = nbd_client::Error::Server {
            command: nbd_client::Command::Read,
            offset: 0,
            length: 1,
            errno: nbd_client::Errno::EIO,
            message: String::new(),
            error_offset: None,
        };
        let violation = nbd_client::Error::Protocol(nbd_client::Violation::TooFragmented);
        for e in [lost, gone, server, violation, nbd_client::Error::Closed] {
            assert_eq!(nbd(e.clone()).is_retryable(), e.is_retryable(), "{e:?}");
        }
        let local = Error::Io {
            op: "reading",
            offset: 0,
            source: std::io::Error::from(std::io::ErrorKind::TimedOut),
        };
        assert!(!local.is_retryable());
        assert!(!Error::Closed.is_retryable());
    }

    #[tokio::test]
    async fn a_panicking_blocking_task_is_a_typed_error() {
        let e = blocking(|| -> Result<()> { panic!("boom") })
            .await
            .unwrap_err();
        match e {
            Error::Task(join) => assert!(join.is_panic()),
            other => panic!("not a task error: {other:?}"),
        }
    }
}
