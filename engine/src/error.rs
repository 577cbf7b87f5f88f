//! The engine's error type: a stable [`ErrorKind`] to match on, the context (which file, which
//! format, which offset), and the source.
//!
//! Match on [`Error::kind`] to decide what to do; the variants carry the context and may grow
//! (the enum is `#[non_exhaustive]`), the kinds are the stable part.

use std::fmt;
use std::path::{Path, PathBuf};

/// What kind of failure an [`Error`] is: what a caller decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system refused or failed a file operation (open, read, write).
    Io,
    /// The QED layer refused or failed: a damaged or locked image, an unsupported feature.
    Image,
    /// The caller asked for something the operation does not take: an unknown or mismatched
    /// format, a size that does not parse. Nothing was changed.
    InvalidInput,
    /// A backing chain the image names is refused (too deep, or probing forbidden). Nothing
    /// was opened past the refusal.
    Refused,
    /// The backing's transport failed (an NBD server that did not come back within the
    /// reconnect window): [`copy_on_read::Error::is_retryable`]. The image is intact; the same
    /// operation may succeed once the backing is reachable again.
    BackingUnavailable,
    /// A block device failed otherwise (local I/O of the image, a request the server refused).
    Device,
    /// The job was cancelled; the image is valid and still linked to its backing.
    Cancelled,
    /// The stream could not make the image local (the backing keeps reporting ranges the
    /// image cannot store).
    Incomplete,
    /// A worker task panicked or was aborted: a bug, not a condition of the input.
    Internal,
}

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The QED layer refused or failed.
    #[error("{path}: {source}")]
    Image {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: qed::Error,
    },
    /// Plain I/O on an output.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A format that is unknown, or not one this operation reads.
    #[error("{}format {format:?} is not supported ({supported})", PathPrefix(.path))]
    UnsupportedFormat {
        /// The file it was asked for, if any.
        path: Option<PathBuf>,
        /// The format asked for or found.
        format: String,
        /// What is supported instead.
        supported: &'static str,
    },
    /// A file was asked for as one format and is another.
    #[error("{}: image not in {expected} format", .path.display())]
    FormatMismatch {
        /// The file.
        path: PathBuf,
        /// The format asked for.
        expected: &'static str,
        /// The format found.
        found: &'static str,
    },
    /// A backing chain was refused before the refused layer was opened.
    #[error("{}: {refusal}", .image.display())]
    Refused {
        /// The image whose backing is refused.
        image: PathBuf,
        /// Why.
        refusal: copy_on_read::GateRefusal,
    },
    /// A block device (the copy-on-read image or its backing) failed.
    #[error("{0}")]
    Device(#[source] copy_on_read::Error),
    /// The backing's transport failed (an NBD server that did not come back within the
    /// reconnect window); see [`copy_on_read::Error::is_retryable`]. The image is intact and
    /// still linked to its backing.
    #[error("the backing is unavailable: {0}")]
    BackingUnavailable(#[source] copy_on_read::Error),
    /// A stream was cancelled; the image is valid and still linked to its backing.
    #[error("stream cancelled at offset {offset} of {total} bytes; the image is valid and still linked to its backing: run the stream again to resume")]
    Cancelled {
        /// Everything below this offset was done.
        offset: u64,
        /// The virtual size.
        total: u64,
    },
    /// A worker task of a copy panicked or was aborted.
    #[error("a {what} task failed: {source}")]
    Task {
        /// Which job it belonged to.
        what: &'static str,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The stream copied everything it was shown three times and the image still lacks data
    /// (the backing keeps reporting ranges the image cannot store).
    #[error("the image still lacks data after {passes} passes over it")]
    Incomplete {
        /// How many passes ran.
        passes: u32,
    },
    /// A size did not parse.
    #[error(transparent)]
    Size(#[from] crate::size::SizeError),
}

/// `PATH: ` when there is a path, nothing otherwise.
struct PathPrefix<'a>(&'a Option<PathBuf>);

impl fmt::Display for PathPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => write!(f, "{}: ", p.display()),
            None => Ok(()),
        }
    }
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Open { .. } | Error::Io { .. } => ErrorKind::Io,
            Error::Image { .. } => ErrorKind::Image,
            Error::UnsupportedFormat { .. } | Error::FormatMismatch { .. } | Error::Size(_) => {
                ErrorKind::InvalidInput
            }
            Error::Refused { .. } => ErrorKind::Refused,
            Error::Device(_) => ErrorKind::Device,
            Error::BackingUnavailable(_) => ErrorKind::BackingUnavailable,
            Error::Cancelled { .. } => ErrorKind::Cancelled,
            Error::Incomplete { .. } => ErrorKind::Incomplete,
            Error::Task { .. } => ErrorKind::Internal,
        }
    }

    /// An open/read error on `path`.
    pub fn open(path: &Path, source: std::io::Error) -> Error {
        Error::Open {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A QED error on `path`.
    pub fn image(path: &Path, source: qed::Error) -> Error {
        Error::Image {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A device error; [`Error::BackingUnavailable`] when the backing's transport failed
    /// ([`copy_on_read::Error::is_retryable`]).
    pub fn device(source: copy_on_read::Error) -> Error {
        if source.is_retryable() {
            Error::BackingUnavailable(source)
        } else {
            Error::Device(source)
        }
    }

    /// Whether the failure (or an error under it) is the image's file system running out of
    /// space (ENOSPC): the image is intact, and the same operation may succeed once space is
    /// freed.
    pub fn is_nospace(&self) -> bool {
        is_nospace(self)
    }

    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// A failed worker task of `what` (convert, stream).
    pub fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Error {
        move |source| Error::Task { what, source }
    }
}

/// Result with the engine's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether `error`, or an error in its chain of sources, is ENOSPC: whatever the crate that
/// wrapped it (`qed`, `copy_on_read`, this one).
pub fn is_nospace(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::ENOSPC) {
                return true;
            }
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_messages() {
        let e = Error::UnsupportedFormat {
            path: Some("a.img".into()),
            format: "vmdk".into(),
            supported: "qed or raw",
        };
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            e.to_string(),
            "a.img: format \"vmdk\" is not supported (qed or raw)"
        );
        let e = Error::UnsupportedFormat {
            path: None,
            format: "vmdk".into(),
            supported: "qed or raw",
        };
        assert_eq!(
            e.to_string(),
            "format \"vmdk\" is not supported (qed or raw)"
        );
        let e = Error::Refused {
            image: "top.qed".into(),
            refusal: copy_on_read::GateRefusal::TooDeep(3),
        };
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert_eq!(e.to_string(), "top.qed: backing chain deeper than 3 layers");
        let e = Error::device(copy_on_read::Error::ReadOnly);
        assert_eq!(e.kind(), ErrorKind::Device);
    }
}
