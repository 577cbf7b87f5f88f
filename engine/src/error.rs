//! The engine's error type: what failed, on which file, and why.

use std::path::{Path, PathBuf};

/// Everything the engine and the `qedstream` command can fail with.
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
    /// The command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// A size did not parse.
    #[error(transparent)]
    Size(#[from] crate::size::SizeError),
}

impl Error {
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

    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Result with the engine's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
