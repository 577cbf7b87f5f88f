//! The one error type of the `qed` crate.

use std::io;
use std::path::PathBuf;

/// The header field a validation error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderField {
    /// `cluster_size`
    ClusterSize,
    /// `table_size`
    TableSize,
    /// `header_size`
    HeaderSize,
    /// `image_size`
    ImageSize,
    /// `l1_table_offset`
    L1TableOffset,
    /// `backing_filename_offset` / `backing_filename_size`
    BackingFilename,
}

impl std::fmt::Display for HeaderField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeaderField::ClusterSize => "cluster size",
            HeaderField::TableSize => "table size",
            HeaderField::HeaderSize => "header size",
            HeaderField::ImageSize => "image size",
            HeaderField::L1TableOffset => "L1 table offset",
            HeaderField::BackingFilename => "backing file name",
        })
    }
}

/// Which kind of table an invalid entry was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    /// The L1 table (entries point at L2 tables).
    L1,
    /// An L2 table (entries point at data clusters).
    L2,
}

/// Everything that can go wrong with a QED image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error from the storage under the image.
    #[error("I/O error while {op} at file offset {offset:#x}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where in the file.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the QED magic.
    #[error("image not in QED format (bad magic)")]
    NotQed,
    /// The file is too short to hold what the header promises.
    #[error("image is truncated: the {what} needs {needed} bytes, the file has {found}")]
    Truncated {
        /// What could not be read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes found.
        found: u64,
    },
    /// The header has feature bits this implementation does not know.
    #[error("unsupported QED features: {0:#x}")]
    UnsupportedFeatures(u64),
    /// A header field breaks the format's rules.
    #[error("invalid QED {field} ({value:#x}): {reason}")]
    InvalidHeader {
        /// The field.
        field: HeaderField,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A table entry points somewhere it must not; the request that met it fails.
    #[error("invalid {table:?} entry {entry:#x} for guest offset {guest:#x} (corrupt image; run check -r all)")]
    InvalidEntry {
        /// L1 or L2.
        table: TableKind,
        /// The guest offset being looked up.
        guest: u64,
        /// The raw entry.
        entry: u64,
    },
    /// A request reaches past the end of the virtual disk.
    #[error("request [{offset:#x}, +{length:#x}) is outside the virtual disk of {size} bytes")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("the image is open read-only")]
    ReadOnly,
    /// Create or resize options that QED (or QEMU) cannot take.
    #[error("invalid options: {0}")]
    InvalidOptions(&'static str),
    /// Shrinking an image.
    #[error("shrinking images is not supported (QED cannot free clusters)")]
    Shrink,
    /// The backing file name does not fit in the header clusters.
    #[error("no space left in the file header for a backing file name of {0} bytes")]
    BackingNameTooLong(usize),
    /// Setting a backing name while unknown compat features are present (QEMU refuses too).
    #[error("cannot set a backing file name: the image has unknown compat features {0:#x}")]
    UnknownCompatFeatures(u64),
    /// The backing file name is not valid UTF-8.
    #[error("the backing file name is not valid UTF-8")]
    BackingNameNotUtf8,
    /// An error from the backing image.
    #[error("backing file {name:?}: {source}")]
    Backing {
        /// The name as stored in the header.
        name: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another process (or another open file of this one) holds the image in a way that
    /// conflicts with this use: QEMU's image locks (see [`crate::file`]).
    #[error(transparent)]
    Locked(#[from] LockConflict),
    /// The path names something that cannot hold an image (a FIFO, a socket, a directory,
    /// a character device).
    #[error("{0} cannot be an image (only regular files and block devices)")]
    NotAnImageFile(&'static str),
    /// The gate refused a backing file ([`crate::gate::Rules::admit_file`]).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The output of a command is one of its inputs, or a file in an input's backing chain.
    #[error("the output is the same file as an input or a file in its backing chain")]
    OutputIsInput,
    /// The image needs a consistency check that could not be completed.
    #[error("the image is marked as needing a check, and the check found {corruptions} unrepairable corruptions and {check_errors} errors")]
    CheckFailed {
        /// Corruptions the repair could not fix.
        corruptions: u64,
        /// Tables that could not be read or written.
        check_errors: u64,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, offset, source }
    }
}

/// One permission, by the name QEMU's error messages use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Perm {
    /// "consistent read"
    ConsistentRead,
    /// "write"
    Write,
    /// "write unchanged"
    WriteUnchanged,
    /// "resize"
    Resize,
}

impl Perm {
    pub(crate) fn from_bit(i: u32) -> Perm {
        match i {
            0 => Perm::ConsistentRead,
            1 => Perm::Write,
            2 => Perm::WriteUnchanged,
            _ => Perm::Resize,
        }
    }

    /// QEMU's name for the permission.
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }
}

/// Another process (or another open file in this one) holds a lock that conflicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("image is locked by another process (failed to get {}\"{}\" lock); is it in use? (-U inspects an image in use)", if *.shared { "shared " } else { "" }, .perm.name())]
pub struct LockConflict {
    /// The permission that could not be had.
    pub perm: Perm,
    /// False: somebody refuses to share a permission we use. True: somebody uses a
    /// permission we refuse to share.
    pub shared: bool,
}

/// Why a backing was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The chain is deeper than allowed.
    #[error("backing chain deeper than {0} layers")]
    TooDeep(u32),
    /// The chain names a file that is already part of it.
    #[error("backing chain loops back to {0:?}")]
    Loop(PathBuf),
    /// The header records no format and probing is forbidden.
    #[error("the backing format is not recorded and probing is forbidden")]
    ProbeForbidden,
    /// The opened file lies outside the confinement directory.
    #[error("backing path {0:?} is outside the allowed directory")]
    OutsideConfinement(PathBuf),
    /// The name is a protocol the gate does not open (or NBD names are forbidden).
    #[error("backing protocol of {0:?} is not allowed or not supported")]
    Protocol(String),
    /// The probed format is not one we read.
    #[error("backing has format {0}, which is not supported")]
    UnsupportedFormat(&'static str),
}

/// Result with the crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
