//! The command's error: the engine's, or what only a command line can get wrong (an argument,
//! stdout, a helper process, the demo's folder). Every one ends the command with one line on
//! stderr and exit 1.

use std::path::PathBuf;

/// Everything the `qedstream` command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] engine::Error),
    /// An argument is out of its range, or arguments contradict each other; nothing was done.
    #[error("{reason}")]
    InvalidArgument {
        /// The argument (`--rate`, `-o`, `SIZE`).
        arg: &'static str,
        /// What is wrong, in a sentence that names the argument.
        reason: String,
    },
    /// A range reaches past the end of the virtual disk; nothing was read or written.
    #[error("range {offset}+{length} is outside the virtual disk ({size} bytes){}", if *.written_nothing { "; nothing was written" } else { "" })]
    OutOfRange {
        /// Where the range starts.
        offset: u64,
        /// Its length.
        length: u64,
        /// The virtual disk's size.
        size: u64,
        /// Whether the command is a write (and says that nothing was written).
        written_nothing: bool,
    },
    /// A piped input is longer than the space left in the virtual disk; nothing was written.
    #[error("the input from {input} is longer than the {space} bytes left in the virtual disk; nothing was written")]
    InputTooLong {
        /// The input (`stdin` or a path).
        input: String,
        /// The bytes left from the offset to the disk's end.
        space: u64,
    },
    /// The input of a write is the image being written.
    #[error("{}: the input is the image being written; nothing was written", .0.display())]
    InputIsImage(PathBuf),
    /// A stream stopped because its backing went away or its NBD server failed a read; says
    /// how to finish.
    #[error("{0}; the image is intact and still linked to its backing: run the stream again when the backing is back")]
    StreamInterrupted(#[source] engine::Error),
    /// A stream stopped because the image's file system is full (ENOSPC); says how to finish.
    #[error("{0}; the disk holding the image is full: the image is intact and still linked to its backing: free space and run the stream again to resume")]
    DiskFull(#[source] engine::Error),
    /// A stream under `--on-error ignore` skipped ranges it could not copy; the image is
    /// valid and keeps its backing link.
    #[error("{image}: {} range(s) could not be copied and were skipped ({}{}); the backing link is kept: run the stream again to copy them", .ranges.len(), RangeList(.ranges), if *.nospace { "; the disk holding the image is full" } else { "" })]
    RangesSkipped {
        /// The image.
        image: String,
        /// The skipped ranges, `(offset, length)`.
        ranges: Vec<(u64, u64)>,
        /// Whether a skipped range failed for lack of space.
        nospace: bool,
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
    /// The NBD export could not be served (a listener would not bind, a flush at shutdown
    /// failed).
    #[error("NBD export: {0}")]
    Nbd(#[from] nbd_server::Error),
    /// The NBD export's TLS credentials (`serve --tls-creds`) could not be loaded; nothing
    /// listens yet.
    #[error("NBD export: --tls-creds: {0}")]
    ExportTls(#[source] nbd_tls::Error),
    /// The vhost-user-blk socket.
    #[error(transparent)]
    VhostUser(#[from] vhost_user_blk::Error),
    /// A QMP server refused a command, or did not speak QMP.
    #[error("{socket}: {desc}")]
    Qmp {
        /// The control socket.
        socket: String,
        /// The server's error description, or what was wrong with its answer.
        desc: String,
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
}

impl Error {
    /// Whether this is stdout's reader going away (EPIPE): the command ends quietly, as when
    /// SIGPIPE kills a C tool in `qedstream map IMG | head`, but not with success.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Stdout(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// An invalid `arg`, for `reason`.
    pub fn invalid(arg: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            arg,
            reason: reason.into(),
        }
    }

    /// The engine's I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let f = engine::Error::io(what);
        move |source| Error::Engine(f(source))
    }

    /// The engine's open/read error on `path`.
    pub fn open(path: &std::path::Path, source: std::io::Error) -> Error {
        Error::Engine(engine::Error::open(path, source))
    }

    /// The engine's QED error on `path`.
    pub fn image(path: &std::path::Path, source: qed::Error) -> Error {
        Error::Engine(engine::Error::image(path, source))
    }

    /// The engine's device error.
    pub fn device(source: copy_on_read::Error) -> Error {
        Error::Engine(engine::Error::device(source))
    }
}

impl From<engine::size::SizeError> for Error {
    fn from(e: engine::size::SizeError) -> Error {
        Error::Engine(e.into())
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

/// `offset+length` of the first few ranges, and how many more.
struct RangeList<'a>(&'a [(u64, u64)]);

impl std::fmt::Display for RangeList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 4;
        for (i, (offset, length)) in self.0.iter().take(SHOWN).enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{offset}+{length}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, " and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// Result with the command's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
