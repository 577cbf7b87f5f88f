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
    /// The command's output could not be written to stdout (a full disk, a closed pipe).
    #[error("writing to stdout: {}", os_message(.0))]
    Stdout(std::io::Error),
    /// A helper process (`qemu-nbd`) failed to start or serve.
    #[error("{name} {what}")]
    Helper {
        /// The helper.
        name: String,
        /// What went wrong.
        what: String,
    },
    /// A file the command creates is already there (a file or a symlink someone planted);
    /// nothing was written through it.
    #[error("{0}: already exists; refusing to write through it (use a new folder)")]
    Exists(PathBuf),
    /// A folder the command was told to write into is not safe to use.
    #[error("{path}: {why}")]
    UnsafeDir {
        /// The folder.
        path: PathBuf,
        /// Why it is refused.
        why: &'static str,
    },
    /// The command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// A block device (the copy-on-read image or its backing) failed.
    #[error("{0}")]
    Device(#[source] copy_on_read::Error),
    /// The backing went away (an NBD server that did not come back within the reconnect
    /// window). The image is intact and still linked to its backing.
    #[error("the backing is unavailable: {0}")]
    BackingUnavailable(#[source] copy_on_read::Error),
    /// A stream stopped because its backing went away; says how to finish.
    #[error("{0}; the image is intact and still linked to its backing: run the stream again when the backing is back")]
    StreamInterrupted(#[source] Box<Error>),
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

    /// A device error, told apart when the backing is gone.
    pub fn device(source: copy_on_read::Error) -> Error {
        if source.is_backing_unavailable() {
            Error::BackingUnavailable(source)
        } else {
            Error::Device(source)
        }
    }

    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

impl Error {
    /// Whether this is stdout's reader going away (EPIPE): the command ends quietly, as when
    /// SIGPIPE kills a C tool in `qedstream map IMG | head`, but not with success.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Stdout(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// An OS error's text without Rust's ` (os error N)` suffix: `No space left on device`.
fn os_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(code) => match text.strip_suffix(&format!(" (os error {code})")) {
            Some(bare) => bare.to_string(),
            None => text,
        },
        None => text,
    }
}

impl Error {
    /// A failed worker task of `what` (convert, stream).
    pub fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Error {
        move |source| Error::Task { what, source }
    }
}

/// Result with the engine's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
