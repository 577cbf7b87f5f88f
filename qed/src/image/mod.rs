//! An open QED image: mapping lookups, reads of what the image holds, crash-safe allocating
//! writes, zero writes, population with whole clusters, resize and backing-link changes. The
//! image never opens or reads its backing: it records the backing's name and format
//! ([`Image::backing_name`], [`Image::backing_format`]); the `copy-on-read` crate opens the
//! backing through its gate and moves the bytes.
//!
//! The image is split by concern:
//! - `open`: creating images, opening them (header validation, autoclear bits, NEED_CHECK
//!   repair).
//! - `header`: header changes while open: the NEED_CHECK bit around allocations, flush,
//!   close, resize, the backing link.
//! - `lookup`: what a guest range maps to ([`Image::map`], [`Image::mapping_at`]) and reads
//!   of what the image holds ([`Image::read_allocated`]).
//! - `alloc`: allocating writes, zero writes and copy-on-read population.
//! - `claims`: the claims that make "allocate these clusters and link them" atomic per
//!   cluster, in place of a range lock.
//!
//! The L1/L2 tables themselves (cache, updates, allocation cursor) live in the crate's
//! `tables` module, which this one uses and which knows nothing of images.
//!
//! Concurrency: every method takes `&self`, and `qed` holds no lock on guest ranges (the one
//! range lock belongs to the caller that owns the I/O policy, the copy-on-read device). Reads
//! and writes into clusters that are already allocated run concurrently with no lock. A write
//! that must allocate (or turn clusters into zero clusters) claims only the clusters that
//! change state (see `claims` for the invariant), looks the mapping up again under the claim,
//! allocates all the clusters it needs as one contiguous run at the end of the file, writes the
//! data, and then updates each L2 table it touches once, under that table's lock; data I/O
//! never holds a table lock.
//!
//! Crash safety follows QEMU: data clusters are written whole before anything points at them;
//! with a backing file the data is flushed before the L2 update; a new L2 table is written
//! whole and flushed before the L1 sector that points at it. Without a backing file, the
//! NEED_CHECK bit is set before the first allocation and cleared by a clean [`Image::flush`] or
//! [`Image::close`].

mod alloc;
mod claims;
mod header;
mod lookup;
mod open;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backing::BackingFormat;
use crate::check::{self, CheckReport, Repair};
use crate::error::{Error, Result};
use crate::file::FileId;
use crate::layout::{self, Geometry, Header, F_BACKING_FORMAT_NO_PROBE};
use crate::storage::Storage;
use crate::tables::Tables;
use crate::types::{GuestOffset, HostOffset};

use claims::Claims;
use header::HeaderState;

/// Options for [`Image::open`]. The default opens read-write with a 64-table L2 cache and
/// repairs an image marked NEED_CHECK, as QEMU does. The backing is never opened here.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open without ever writing.
    pub read_only: bool,
    /// With `read_only`, inspect an image that another process may hold for writing
    /// (`-U`, QEMU's `force-share`): [`Image::open_path`] then takes only the "read" lock
    /// ([`Access::SharedRead`](crate::Access::SharedRead)). What is read may be inconsistent
    /// while a writer runs.
    pub force_share: bool,
    /// The image's path, to resolve a relative backing name.
    pub path: Option<PathBuf>,
    /// How many L2 tables to keep cached (at least 1).
    pub l2_cache_tables: usize,
    /// Repair an image marked NEED_CHECK when opening it read-write (QEMU does; `check`
    /// turns it off to report what it finds).
    pub repair_on_open: bool,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            read_only: false,
            force_share: false,
            path: None,
            l2_cache_tables: 64,
            repair_on_open: true,
        }
    }
}

/// Options for [`Image::create`].
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512).
    pub size: u64,
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters per table.
    pub table_size: u32,
    /// Backing name and format to record.
    pub backing: Option<(String, BackingFormat)>,
}

impl CreateOptions {
    /// QEMU's defaults (64 KiB clusters, 4-cluster tables), no backing.
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            cluster_size: layout::DEFAULT_CLUSTER_SIZE,
            table_size: layout::DEFAULT_TABLE_SIZE,
            backing: None,
        }
    }
}

/// What a range of the virtual disk maps to in this image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Data stored in this image at the given file offset (for the extent's first byte).
    Data(HostOffset),
    /// A zero cluster: reads as zeros, does not fall through.
    Zero,
    /// Not allocated here: the backing shows through (or zeros without one).
    Unallocated,
}

/// A run of the virtual disk with one kind of mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub offset: GuestOffset,
    /// Length in bytes.
    pub length: u64,
    /// What it maps to.
    pub mapping: Mapping,
}

impl Extent {
    /// The guest offset just past the extent.
    pub fn end(&self) -> GuestOffset {
        self.offset + self.length
    }
}

/// The outcome of [`Image::populate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PopulateOutcome {
    /// Bytes stored as new data clusters.
    pub written: u64,
    /// Bytes recorded as zero clusters.
    pub zeroed: u64,
    /// Bytes left alone (already allocated, or all-zero and left unallocated).
    pub skipped: u64,
}

/// An open QED image. Close it with [`Image::close`]; dropping it only warns if it is dirty.
#[must_use = "an image must be closed with Image::close to clear its dirty state"]
pub struct Image {
    storage: Arc<dyn Storage>,
    tables: Tables,
    read_only: bool,
    path: Option<PathBuf>,
    state: Mutex<HeaderState>,
    image_size: AtomicU64,
    claims: Claims,
    closed: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("geometry", &self.geometry())
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

fn out_of_range(offset: u64, length: u64, size: u64) -> Error {
    Error::OutOfRange {
        offset,
        length,
        size,
    }
}

impl Image {
    /// The virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.image_size.load(Ordering::Acquire)
    }

    /// The image geometry.
    pub fn geometry(&self) -> Geometry {
        self.tables.geometry()
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.state.lock().header.clone()
    }

    /// The backing name as stored in the header, if any.
    pub fn backing_name(&self) -> Option<String> {
        self.state.lock().backing_name.clone()
    }

    /// The recorded backing format, if there is a backing.
    pub fn backing_format(&self) -> Option<BackingFormat> {
        let state = self.state.lock();
        state.header.has_backing_file().then(|| {
            if state.header.features & F_BACKING_FORMAT_NO_PROBE != 0 {
                BackingFormat::Raw
            } else {
                BackingFormat::Probe
            }
        })
    }

    /// The path the image was opened from, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// True when opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The file under the image, when it is one.
    pub fn file_id(&self) -> Option<FileId> {
        self.storage.file_id()
    }

    /// The storage under the image.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// The file length the allocator works with (a whole number of clusters).
    pub fn file_end(&self) -> u64 {
        self.tables.file_end().0
    }

    /// Checks the image; with a repair mode other than [`Repair::None`], also repairs what it
    /// can and clears NEED_CHECK when nothing is left. Waits for the allocations in flight
    /// and holds off new ones and every table update for the duration, so it can run on an
    /// image in use (allocating writes wait).
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        let fix = repair != Repair::None;
        if fix && self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        let _claims = self.claims.freeze();
        let report = {
            let _tables = self.tables.lock_all();
            check::run(&self.tables, self.size(), repair)
        };
        if fix && report.corruptions == 0 && report.check_errors == 0 {
            self.mark_clean()?;
        }
        Ok(report)
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(out_of_range(offset, length, size)),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.closed && self.is_dirty() {
            tracing::warn!(
                path = ?self.path,
                "QED image dropped without close(): it stays marked NEED_CHECK and will be checked at the next read-write open"
            );
        }
    }
}
