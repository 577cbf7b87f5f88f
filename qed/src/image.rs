//! An open QED image: mapping lookups, reads through the backing chain, crash-safe allocating
//! writes, zero writes, resize and backing-link changes.
//!
//! Concurrency: every method takes `&self`. Reads and writes into clusters that are already
//! allocated run concurrently with no lock. A write that must allocate (or turn clusters into
//! zero clusters) takes a lock on its guest cluster range, looks the mapping up again under it,
//! allocates all the clusters it needs as one contiguous run at the end of the file, writes the
//! data, and then updates each L2 table it touches once. Table updates are serialised by one
//! short metadata lock; data I/O never holds it.
//!
//! Crash safety follows QEMU: data clusters are written whole before anything points at them;
//! with a backing file the data is flushed before the L2 update; a new L2 table is written
//! whole and flushed before the L1 sector that points at it. Without a backing file, the
//! NEED_CHECK bit is set before the first allocation and cleared by a clean [`Image::flush`] or
//! [`Image::close`].

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::backing::{BackingDescription, BackingFormat, BackingOpener, BackingRead, FileGate};
use crate::error::{Error, Result, TableKind};
use crate::file::{Access, FileId};
use crate::layout::{
    self, Geometry, Header, L2Entry, ENTRY_UNALLOCATED, ENTRY_ZERO, F_BACKING_FILE,
    F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK, HEADER_SIZE_BYTES, MAGIC, SECTOR,
};
use crate::storage::Storage;
use crate::types::HostOffset;

/// How an image's backing is handled at open.
#[derive(Clone, Debug)]
pub enum BackingPolicy {
    /// Open the backing the header names through this opener (gate).
    Open(Arc<dyn BackingOpener>),
    /// Do not open it. Reads of unallocated clusters fail with [`Error::Backing`]; the caller
    /// (a copy-on-read device, `check`, `map`) reads the backing itself or does not need it.
    Detached,
}

/// Options for [`Image::open`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open without ever writing.
    pub read_only: bool,
    /// With `read_only`, inspect an image that another process may hold for writing
    /// (`-U`, QEMU's `force-share`): [`Image::open_path`] then takes only the "read" lock
    /// ([`Access::SharedRead`]). What is read may be inconsistent while a writer runs.
    pub force_share: bool,
    /// The image's path, to resolve a relative backing name.
    pub path: Option<PathBuf>,
    /// What to do with the backing file.
    pub backing: BackingPolicy,
    /// How many L2 tables to keep cached (at least 1).
    pub l2_cache_tables: usize,
    /// How deep below the top image this one is (set by backing openers).
    pub depth: u32,
    /// The files of the layers above this one (set by backing openers), so that a chain that
    /// names one of them again is refused as a loop.
    pub above: Vec<FileId>,
    /// Repair an image marked NEED_CHECK when opening it read-write (QEMU does; `check`
    /// turns it off to report what it finds).
    pub repair_on_open: bool,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions::with_opener(Arc::new(FileGate::default()))
    }
}

impl OpenOptions {
    /// Read-write, default cache, backing opened through `opener`.
    pub fn with_opener(opener: Arc<dyn BackingOpener>) -> OpenOptions {
        OpenOptions {
            read_only: false,
            force_share: false,
            path: None,
            backing: BackingPolicy::Open(opener),
            l2_cache_tables: 64,
            depth: 0,
            above: Vec::new(),
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
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What it maps to.
    pub mapping: Mapping,
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

/// A bounded cache of L2 tables, keyed by file offset. Entries are immutable snapshots; an
/// update replaces the entry.
#[derive(Debug)]
struct L2Cache {
    capacity: usize,
    inner: Mutex<L2CacheInner>,
}

#[derive(Debug, Default)]
struct L2CacheInner {
    tables: HashMap<u64, (Arc<Vec<u64>>, u64)>,
    tick: u64,
}

impl L2Cache {
    fn get(&self, offset: u64) -> Option<Arc<Vec<u64>>> {
        let mut inner = self.inner.lock();
        inner.tick += 1;
        let tick = inner.tick;
        inner.tables.get_mut(&offset).map(|(t, used)| {
            *used = tick;
            Arc::clone(t)
        })
    }

    fn insert(&self, offset: u64, table: Arc<Vec<u64>>) {
        let mut inner = self.inner.lock();
        Self::insert_locked(&mut inner, self.capacity, offset, table);
    }

    fn insert_locked(inner: &mut L2CacheInner, capacity: usize, offset: u64, t: Arc<Vec<u64>>) {
        inner.tick += 1;
        let tick = inner.tick;
        if !inner.tables.contains_key(&offset) && inner.tables.len() >= capacity {
            if let Some(&victim) = inner
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k)
            {
                inner.tables.remove(&victim);
            }
        }
        inner.tables.insert(offset, (t, tick));
    }

    fn clear(&self) {
        self.inner.lock().tables.clear();
    }
}

/// Locks on guest cluster ranges, held by allocating writes.
#[derive(Debug, Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock();
        while held.iter().any(|&(s, e)| s < end && start < e) {
            self.released.wait(&mut held);
        }
        held.push((start, end));
        RangeGuard {
            locks: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        self.locks.released.notify_all();
    }
}

/// Header state that changes while the image is open.
#[derive(Debug)]
struct HeaderState {
    header: Header,
    backing_name: Option<String>,
    /// Allocations in flight (NEED_CHECK may not be cleared while any is).
    allocating: u32,
    /// Bumped by each allocation, so a flush knows whether one slipped in.
    generation: u64,
}

/// An open QED image. Close it with [`Image::close`]; dropping it only warns if it is dirty.
#[must_use = "an image must be closed with Image::close to clear its dirty state"]
pub struct Image {
    storage: Box<dyn Storage>,
    geometry: Geometry,
    /// File offset of the L1 table (fixed for the life of the image).
    l1_offset: u64,
    read_only: bool,
    path: Option<PathBuf>,
    state: Mutex<HeaderState>,
    image_size: AtomicU64,
    l1: RwLock<Vec<u64>>,
    l2_cache: L2Cache,
    /// Bumped on every L2 update, so a cache fill that raced with one is dropped.
    table_epoch: AtomicU64,
    /// Where the next allocation goes: the file length rounded down to a cluster, then grown.
    file_end: AtomicU64,
    range_locks: RangeLocks,
    meta_lock: Mutex<()>,
    backing: RwLock<Option<Arc<dyn BackingRead>>>,
    closed: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("geometry", &self.geometry)
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
    // ------------------------------------------------------------------------------------
    // Create and open

    /// Writes a new, empty image to `storage` (which should be empty), exactly as
    /// `qemu-img create -f qed` does for the same arguments.
    pub fn create(storage: &dyn Storage, options: &CreateOptions) -> Result<()> {
        let (head, file_len) = Image::plan_create(options)?;
        Image::write_new(storage, &head, file_len)
    }

    /// Validates `options` and returns the first bytes of the new image (header and backing
    /// name) and its initial file length. Nothing is written.
    fn plan_create(options: &CreateOptions) -> Result<(Vec<u8>, u64)> {
        let geometry = Geometry::new(options.cluster_size, options.table_size, 1)?;
        if options.table_size == 1 {
            return Err(Error::InvalidOptions(
                "table_size 1 cannot be opened by QEMU (its table offset test always fails)",
            ));
        }
        let size = options
            .size
            .checked_next_multiple_of(SECTOR)
            .ok_or(Error::InvalidOptions("size too large"))?;
        if size > layout::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidOptions(
                "size exceeds QEMU's maximum disk size (2^63 - 2^30 bytes)",
            ));
        }
        if geometry.qemu_max_image_size() == 0 {
            return Err(Error::InvalidOptions(
                "this cluster_size/table_size overflows QEMU's maximum-size computation; use smaller clusters or tables",
            ));
        }
        if size > geometry.qemu_max_image_size() {
            return Err(Error::InvalidOptions(
                "size exceeds the maximum for this cluster_size/table_size",
            ));
        }
        let mut header = Header {
            magic: MAGIC,
            cluster_size: options.cluster_size,
            table_size: options.table_size,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: geometry.cluster_size(),
            image_size: size,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        };
        let mut head = header.encode().to_vec();
        if let Some((name, format)) = &options.backing {
            if HEADER_SIZE_BYTES + name.len() > geometry.cluster_size() as usize {
                return Err(Error::BackingNameTooLong(name.len()));
            }
            header.features = F_BACKING_FILE
                | if *format == BackingFormat::Raw {
                    F_BACKING_FORMAT_NO_PROBE
                } else {
                    0
                };
            header.backing_filename_offset = HEADER_SIZE_BYTES as u32;
            header.backing_filename_size = name.len() as u32;
            head = header.encode().to_vec();
            head.extend_from_slice(name.as_bytes());
        }
        let file_len = geometry.cluster_size() * (1 + u64::from(options.table_size));
        Ok((head, file_len))
    }

    fn write_new(storage: &dyn Storage, head: &[u8], file_len: u64) -> Result<()> {
        storage
            .set_len(0)
            .and_then(|()| storage.set_len(file_len))
            .map_err(Error::io("sizing new image", 0))?;
        storage
            .write_at(head, 0)
            .map_err(Error::io("writing header", 0))?;
        storage.flush().map_err(Error::io("flushing", 0))?;
        Ok(())
    }

    /// Creates the file at `path` (replacing what it held) and writes a new image.
    pub fn create_path(path: &Path, options: &CreateOptions) -> Result<()> {
        Image::create_file(path, options, &[]).map(drop)
    }

    /// Creates the image at `path` as [`Image::create_path`] does, and returns its file, held
    /// with the read-write image locks ([`Access::ReadWrite`]) so that nobody can take it
    /// before the caller opens it ([`Image::open`]). Every option is validated before the file
    /// is touched; a file another process holds is refused untouched (image locks); a path
    /// that names one of `inputs` (through symlinks or hard links) is refused untouched.
    pub fn create_file(path: &Path, options: &CreateOptions, inputs: &[FileId]) -> Result<File> {
        let (head, file_len) = Image::plan_create(options)?;
        let file = crate::file::create(path, inputs)?;
        Image::write_new(&file, &head, file_len)?;
        crate::file::lock(&file, Access::ReadWrite)?;
        Ok(file)
    }

    /// Opens the file at `path`, with QEMU's image locks: [`Access::ReadWrite`], or
    /// [`Access::ReadOnly`] when `options.read_only` ([`Access::SharedRead`] with
    /// `options.force_share`).
    pub fn open_path(path: &Path, mut options: OpenOptions) -> Result<Image> {
        let access = match (options.read_only, options.force_share) {
            (false, _) => Access::ReadWrite,
            (true, false) => Access::ReadOnly,
            (true, true) => Access::SharedRead,
        };
        let file = crate::file::open(path, access)?;
        options.path = Some(path.to_path_buf());
        Image::open(Box::new(file), options)
    }

    /// Opens an image on `storage`: validates the header as QEMU does, clears unknown
    /// autoclear bits (read-write only), loads the L1 table, repairs the image if it is marked
    /// NEED_CHECK (read-write only), and opens the backing as `options.backing` says.
    pub fn open(storage: Box<dyn Storage>, options: OpenOptions) -> Result<Image> {
        let file_len = storage.len().map_err(Error::io("sizing image", 0))?;
        let mut head = [0u8; HEADER_SIZE_BYTES];
        if file_len < HEADER_SIZE_BYTES as u64 {
            storage
                .read_at(&mut head[..file_len as usize], 0)
                .map_err(Error::io("reading header", 0))?;
            if file_len >= 4 && head[0..4] != MAGIC.to_le_bytes() {
                return Err(Error::NotQed);
            }
            return Err(Error::Truncated {
                what: "header",
                needed: HEADER_SIZE_BYTES as u64,
                found: file_len,
            });
        }
        storage
            .read_at(&mut head, 0)
            .map_err(Error::io("reading header", 0))?;
        let mut header = Header::decode(&head)?;
        let geometry = header.validate(file_len)?;

        let backing_name = if header.has_backing_file() {
            let mut name = vec![0u8; header.backing_filename_size as usize];
            let at = u64::from(header.backing_filename_offset);
            storage
                .read_at(&mut name, at)
                .map_err(Error::io("reading backing file name", at))?;
            Some(String::from_utf8(name).map_err(|_| Error::BackingNameNotUtf8)?)
        } else {
            None
        };

        if !options.read_only && header.autoclear_features != 0 {
            header.autoclear_features = 0;
            storage
                .write_at(&header.encode(), 0)
                .and_then(|()| storage.flush())
                .map_err(Error::io("clearing autoclear features", 0))?;
        }

        let mut l1_bytes = vec![0u8; geometry.table_bytes() as usize];
        storage
            .read_at(&mut l1_bytes, header.l1_table_offset)
            .map_err(Error::io("reading L1 table", header.l1_table_offset))?;
        let l1 = layout::decode_table(&l1_bytes);
        drop(l1_bytes);

        let cache_budget = (256u64 << 20) / geometry.table_bytes();
        let capacity = options
            .l2_cache_tables
            .clamp(1, cache_budget.max(1) as usize);
        let image_size = header.image_size;
        let need_check = header.features & F_NEED_CHECK != 0;
        let l1_offset = header.l1_table_offset;
        let mut image = Image {
            storage,
            geometry,
            l1_offset,
            read_only: options.read_only,
            path: options.path.clone(),
            state: Mutex::new(HeaderState {
                header,
                backing_name,
                allocating: 0,
                generation: 0,
            }),
            image_size: AtomicU64::new(image_size),
            l1: RwLock::new(l1),
            l2_cache: L2Cache {
                capacity,
                inner: Mutex::new(L2CacheInner::default()),
            },
            table_epoch: AtomicU64::new(0),
            file_end: AtomicU64::new(geometry.round_down_to_cluster(file_len)),
            range_locks: RangeLocks::default(),
            meta_lock: Mutex::new(()),
            backing: RwLock::new(None),
            closed: false,
        };

        if need_check && !options.read_only && options.repair_on_open {
            let report = image.check(crate::check::Repair::All)?;
            if report.check_errors > 0 {
                return Err(Error::CheckFailed {
                    corruptions: report.corruptions,
                    check_errors: report.check_errors,
                });
            }
        }

        if let BackingPolicy::Open(opener) = &options.backing {
            let state = image.state.lock();
            let backing = match &state.backing_name {
                Some(name) => {
                    let format = if state.header.features & F_BACKING_FORMAT_NO_PROBE != 0 {
                        BackingFormat::Raw
                    } else {
                        BackingFormat::Probe
                    };
                    {
                        let mut seen = options.above.clone();
                        seen.extend(image.storage.file_id());
                        Some(opener.open(
                            name,
                            format,
                            options.path.as_deref(),
                            options.depth + 1,
                            &seen,
                        )?)
                    }
                }
                None => None,
            };
            drop(state);
            *image.backing.get_mut() = backing;
        }
        image.closed = image.read_only;
        Ok(image)
    }

    // ------------------------------------------------------------------------------------
    // Accessors

    /// The virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.image_size.load(Ordering::Acquire)
    }

    /// The image geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
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

    /// The opened backing, if any.
    pub fn backing(&self) -> Option<Arc<dyn BackingRead>> {
        self.backing.read().clone()
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
        self.file_end.load(Ordering::Acquire)
    }

    /// Describes the backing chain.
    pub fn describe_backing(&self) -> Option<BackingDescription> {
        self.backing().map(|b| b.describe())
    }

    pub(crate) fn set_file_end(&self, end: u64) {
        self.file_end.store(end, Ordering::Release);
    }

    pub(crate) fn l1_snapshot(&self) -> Vec<u64> {
        self.l1.read().clone()
    }

    pub(crate) fn replace_l1(&self, l1: Vec<u64>) {
        *self.l1.write() = l1;
    }

    pub(crate) fn invalidate_cache(&self) {
        self.table_epoch.fetch_add(1, Ordering::AcqRel);
        self.l2_cache.clear();
    }

    pub(crate) fn lock_all(&self) -> (impl Drop + '_, parking_lot::MutexGuard<'_, ()>) {
        let range = self.range_locks.lock(0, u64::MAX);
        (range, self.meta_lock.lock())
    }

    // ------------------------------------------------------------------------------------
    // Lookups

    fn load_l2(&self, table_offset: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.get(table_offset) {
            return Ok(t);
        }
        let epoch = self.table_epoch.load(Ordering::Acquire);
        let mut bytes = vec![0u8; self.geometry.table_bytes() as usize];
        self.storage
            .read_at(&mut bytes, table_offset)
            .map_err(Error::io("reading L2 table", table_offset))?;
        let table = Arc::new(layout::decode_table(&bytes));
        let mut inner = self.l2_cache.inner.lock();
        if self.table_epoch.load(Ordering::Acquire) == epoch
            && !inner.tables.contains_key(&table_offset)
        {
            L2Cache::insert_locked(
                &mut inner,
                self.l2_cache.capacity,
                table_offset,
                table.clone(),
            );
        }
        Ok(table)
    }

    /// True when `offset` overlaps the L1 table.
    fn overlaps_l1(&self, offset: u64, len: u64) -> bool {
        let l1_end = self.l1_offset + self.geometry.table_bytes();
        offset < l1_end && self.l1_offset < offset.saturating_add(len)
    }

    /// QEMU's table-offset test, plus: the table must not lie over the L1 table (its entries
    /// would be read as L2 entries, and an update would overwrite the L1 behind our back).
    fn is_usable_l2_offset(&self, offset: u64) -> bool {
        self.geometry.is_valid_table_offset(offset, self.file_end())
            && !self.overlaps_l1(offset, self.geometry.table_bytes())
    }

    /// The L2 table for an L1 index, or `None` when the L1 entry is 0.
    fn l2_for(&self, guest: u64) -> Result<Option<Arc<Vec<u64>>>> {
        let l1_index = self.geometry.l1_index(guest) as usize;
        let entry = self.l1.read().get(l1_index).copied().unwrap_or(0);
        if entry == ENTRY_UNALLOCATED {
            return Ok(None);
        }
        if !self.is_usable_l2_offset(entry) {
            return Err(Error::InvalidEntry {
                table: TableKind::L1,
                guest,
                entry,
            });
        }
        self.load_l2(entry).map(Some)
    }

    /// The mapping of the run starting at `guest` (at most `max_len` bytes, within one L2
    /// table): its kind and length.
    fn lookup_run(&self, guest: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let g = &self.geometry;
        let span_left = g.l2_span() - (guest & (g.l2_span() - 1));
        let max_len = max_len.min(span_left);
        let Some(table) = self.l2_for(guest)? else {
            return Ok((Mapping::Unallocated, max_len));
        };
        let file_end = self.file_end();
        let cs = g.cluster_size();
        let first = g.l2_index(guest) as usize;
        let in_cluster = g.offset_in_cluster(guest);
        let classify = |raw: u64| -> Result<Mapping> {
            match L2Entry::from_raw(raw) {
                L2Entry::Unallocated => Ok(Mapping::Unallocated),
                L2Entry::Zero => Ok(Mapping::Zero),
                // QEMU's cluster-offset test, plus: never the L1 table (reads would return
                // metadata, writes would overwrite it).
                L2Entry::Data(off)
                    if g.is_valid_cluster_offset(off, file_end) && !self.overlaps_l1(off, cs) =>
                {
                    Ok(Mapping::Data(HostOffset(off)))
                }
                L2Entry::Data(_) => Err(Error::InvalidEntry {
                    table: TableKind::L2,
                    guest,
                    entry: raw,
                }),
            }
        };
        let kind = classify(table[first])?;
        let mut len = (cs - in_cluster).min(max_len);
        let mut i = first + 1;
        while len < max_len && i < table.len() {
            let next = match classify(table[i]) {
                Ok(m) => m,
                Err(_) => break, // the bad entry fails the request that reaches it
            };
            let same = match (kind, next) {
                (Mapping::Data(a), Mapping::Data(b)) => b == a + (i - first) as u64 * cs,
                (Mapping::Zero, Mapping::Zero) | (Mapping::Unallocated, Mapping::Unallocated) => {
                    true
                }
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + cs).min(max_len);
            i += 1;
        }
        let mapping = match kind {
            Mapping::Data(off) => Mapping::Data(off + in_cluster),
            other => other,
        };
        Ok((mapping, len))
    }

    /// The mapping of `[offset, offset + length)`, as extents of one kind each (data extents
    /// are contiguous in the file). Clamped to the virtual size.
    pub fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let size = self.size();
        let end = offset.saturating_add(length).min(size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (mapping, len) = self.lookup_run(pos, end - pos)?;
            match (out.last_mut(), mapping) {
                (Some(last), Mapping::Data(h)) if matches!(last.mapping, Mapping::Data(lh) if lh + last.length == h) => {
                    last.length += len
                }
                (Some(last), m) if last.mapping == m && !matches!(m, Mapping::Data(_)) => {
                    last.length += len
                }
                _ => out.push(Extent {
                    offset: pos,
                    length: len,
                    mapping,
                }),
            }
            pos += len;
        }
        Ok(out)
    }

    /// The mapping at `offset` and how far it extends (at most `max_len`, within the disk).
    pub fn mapping_at(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let size = self.size();
        if offset >= size {
            return Err(out_of_range(offset, max_len, size));
        }
        self.lookup_run(offset, max_len.min(size - offset))
    }

    // ------------------------------------------------------------------------------------
    // Reads

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(out_of_range(offset, length, size)),
        }
    }

    fn read_backing(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        if !self.state.lock().header.has_backing_file() {
            buf.fill(0);
            return Ok(());
        }
        match self.backing() {
            Some(b) => b.read_at(buf, guest),
            None => Err(Error::Backing {
                name: self.backing_name().unwrap_or_default(),
                source: "the backing is not opened (detached)".into(),
            }),
        }
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (mapping, len) = self.lookup_run(pos, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + len as usize];
            match mapping {
                Mapping::Data(host) => self
                    .storage
                    .read_at(chunk, host.0)
                    .map_err(Error::io("reading data", host.0))?,
                Mapping::Zero => chunk.fill(0),
                Mapping::Unallocated => self.read_backing(chunk, pos)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // Writes

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Writes `data` at `offset` of the virtual disk.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        // Fast path: everything already allocated, write in place with no lock.
        if self.write_in_place_if_allocated(data, offset)? {
            return Ok(());
        }
        let g = self.geometry;
        let first = offset >> g.cluster_bits();
        let last = (offset + data.len() as u64 - 1) >> g.cluster_bits();
        let _guard = self.range_locks.lock(first, last + 1);
        self.write_locked(data, offset)
    }

    /// Writes in place when every byte maps to data. Returns false (having written nothing)
    /// when some part needs allocation.
    fn write_in_place_if_allocated(&self, data: &[u8], offset: u64) -> Result<bool> {
        let mut runs = Vec::new();
        let mut done = 0u64;
        while done < data.len() as u64 {
            let (mapping, len) = self.lookup_run(offset + done, data.len() as u64 - done)?;
            match mapping {
                Mapping::Data(host) => runs.push((done, len, host)),
                _ => return Ok(false),
            }
            done += len;
        }
        for (start, len, host) in runs {
            self.storage
                .write_at(&data[start as usize..(start + len) as usize], host.0)
                .map_err(Error::io("writing data", host.0))?;
        }
        Ok(true)
    }

    /// The body of an allocating write, under the range lock.
    fn write_locked(&self, data: &[u8], offset: u64) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let end = offset + data.len() as u64;
        // Plan: in-place runs now, clusters to allocate collected.
        let mut to_allocate: Vec<(u64, Mapping)> = Vec::new(); // (guest cluster index, prior)
        let mut pos = offset;
        while pos < end {
            let (mapping, len) = self.lookup_run(pos, end - pos)?;
            match mapping {
                Mapping::Data(host) => {
                    let s = (pos - offset) as usize;
                    self.storage
                        .write_at(&data[s..s + len as usize], host.0)
                        .map_err(Error::io("writing data", host.0))?;
                }
                prior => {
                    let c0 = pos >> g.cluster_bits();
                    let c1 = (pos + len - 1) >> g.cluster_bits();
                    to_allocate.extend((c0..=c1).map(|c| (c, prior)));
                }
            }
            pos += len;
        }
        if to_allocate.is_empty() {
            return Ok(());
        }
        let _alloc = self.begin_allocation()?;
        let host_base = self.allocate_clusters(to_allocate.len() as u64);
        // Write the new clusters, one guest-contiguous group at a time (host is contiguous).
        let mut i = 0;
        while i < to_allocate.len() {
            let mut j = i + 1;
            while j < to_allocate.len() && to_allocate[j].0 == to_allocate[j - 1].0 + 1 {
                j += 1;
            }
            let group_guest = to_allocate[i].0 * cs;
            let group_host = host_base + i as u64 * cs;
            self.write_new_group(&to_allocate[i..j], group_guest, group_host, data, offset)?;
            i = j;
        }
        self.flush_before_metadata()?;
        let updates: Vec<(u64, u64)> = to_allocate
            .iter()
            .enumerate()
            .map(|(k, &(c, _))| (c, host_base + k as u64 * cs))
            .collect();
        self.update_l2_entries(&updates)
    }

    /// Writes the clusters of one guest-contiguous group: payload from `data` where it covers,
    /// gaps from the prior contents (zeros for a zero cluster, the backing for an unallocated
    /// one). At most three writes: head cluster, middle, tail cluster.
    fn write_new_group(
        &self,
        group: &[(u64, Mapping)],
        group_guest: u64,
        group_host: u64,
        data: &[u8],
        offset: u64,
    ) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let group_end = group_guest + group.len() as u64 * cs;
        let data_end = offset + data.len() as u64;
        let mut c = 0usize;
        while c < group.len() {
            let cg = group_guest + c as u64 * cs;
            let partial = offset > cg || data_end < cg + cs;
            if partial {
                let mut buf = vec![0u8; cs as usize];
                let lo = offset.max(cg);
                let hi = data_end.min(cg + cs);
                if group[c].1 == Mapping::Unallocated {
                    if lo > cg {
                        self.read_backing(&mut buf[..(lo - cg) as usize], cg)?;
                    }
                    if hi < cg + cs {
                        self.read_backing(&mut buf[(hi - cg) as usize..], hi)?;
                    }
                }
                buf[(lo - cg) as usize..(hi - cg) as usize]
                    .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
                let host = group_host + c as u64 * cs;
                self.storage
                    .write_at(&buf, host)
                    .map_err(Error::io("writing new cluster", host))?;
                c += 1;
            } else {
                // A run of fully covered clusters: write straight from the caller's buffer.
                let mut k = c;
                while k < group.len() {
                    let kg = group_guest + k as u64 * cs;
                    if kg < offset || kg + cs > data_end {
                        break;
                    }
                    k += 1;
                }
                let s = (cg - offset) as usize;
                let e = s + (k - c) * cs as usize;
                let host = group_host + c as u64 * cs;
                self.storage
                    .write_at(&data[s..e], host)
                    .map_err(Error::io("writing new clusters", host))?;
                c = k;
            }
        }
        debug_assert!(group_end >= group_guest);
        Ok(())
    }

    /// Writes zeros over `[offset, offset + length)`. Whole clusters that are unallocated
    /// become zero clusters (no storage); zero clusters stay; allocated clusters get zeros
    /// written in place. Partial clusters at the edges are ordinary writes of zeros.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, length)?;
        let g = self.geometry;
        let size = self.size();
        let end = offset + length;
        // Whole clusters: [a, b). A cluster that reaches the disk's end counts as whole.
        let a = g.round_up_to_cluster(offset);
        let b = if end == size {
            g.round_up_to_cluster(end)
        } else {
            g.round_down_to_cluster(end)
        };
        if a >= b {
            return self.write_zero_bytes(offset, length);
        }
        if offset < a {
            self.write_zero_bytes(offset, a - offset)?;
        }
        let b_vis = b.min(size);
        // Whole clusters, in batches bounded to one L2 table at a time.
        let mut pos = a;
        while pos < b_vis {
            let batch_end = ((pos / g.l2_span() + 1) * g.l2_span())
                .min(b_vis)
                .min(pos + (256 << 20));
            let c0 = pos >> g.cluster_bits();
            let c1 = (batch_end - 1) >> g.cluster_bits();
            let _guard = self.range_locks.lock(c0, c1 + 1);
            let mut updates = Vec::new();
            let mut p = pos;
            while p < batch_end {
                let (mapping, len) = self.lookup_run(p, batch_end - p)?;
                match mapping {
                    Mapping::Data(host) => self.write_zero_data(host.0, len)?,
                    Mapping::Zero => {}
                    Mapping::Unallocated => {
                        let k0 = p >> g.cluster_bits();
                        let k1 = (p + len - 1) >> g.cluster_bits();
                        updates.extend((k0..=k1).map(|k| (k, ENTRY_ZERO)));
                    }
                }
                p += len;
            }
            if !updates.is_empty() {
                let _alloc = self.begin_allocation()?;
                self.update_l2_entries(&updates)?;
            }
            pos = batch_end;
        }
        if b < end {
            self.write_zero_bytes(b, end - b)?;
        }
        Ok(())
    }

    fn write_zero_data(&self, host: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.storage
                .write_at(&zeros[..n as usize], host + done)
                .map_err(Error::io("writing zeros", host + done))?;
            done += n;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, length: u64) -> Result<()> {
        const CHUNK: u64 = 4 << 20;
        let zeros = vec![0u8; length.min(CHUNK) as usize];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(CHUNK);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Copy-on-read and streaming: stores `data` (whole clusters starting at the
    /// cluster-aligned `offset`; the last may stop at the disk's end) into the clusters that
    /// are still unallocated, re-checked under the range lock, so a guest write that got
    /// there first is never overwritten. All-zero clusters become zero clusters when
    /// `zero_clusters` is set and are left unallocated otherwise; they are never stored as
    /// data.
    pub fn populate(
        &self,
        offset: u64,
        data: &[u8],
        zero_clusters: bool,
    ) -> Result<PopulateOutcome> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        if g.offset_in_cluster(offset) != 0 {
            return Err(Error::InvalidOptions(
                "populate needs a cluster-aligned offset",
            ));
        }
        let end = offset + data.len() as u64;
        if g.offset_in_cluster(end) != 0 && end != self.size() {
            return Err(Error::InvalidOptions("populate needs whole clusters"));
        }
        let mut outcome = PopulateOutcome::default();
        if data.is_empty() {
            return Ok(outcome);
        }
        let c0 = offset >> g.cluster_bits();
        let c1 = (end - 1) >> g.cluster_bits();
        let _guard = self.range_locks.lock(c0, c1 + 1);
        // Which clusters are still unallocated?
        let mut data_clusters: Vec<u64> = Vec::new();
        let mut zero_updates: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (mapping, len) = self.lookup_run(pos, end - pos)?;
            if mapping == Mapping::Unallocated {
                let mut p = pos;
                while p < pos + len {
                    let n = cs.min(end - p);
                    let chunk = &data[(p - offset) as usize..(p - offset + n) as usize];
                    let c = p >> g.cluster_bits();
                    if chunk.iter().all(|&b| b == 0) {
                        if zero_clusters {
                            zero_updates.push((c, ENTRY_ZERO));
                            outcome.zeroed += n;
                        } else {
                            outcome.skipped += n;
                        }
                    } else {
                        data_clusters.push(c);
                        outcome.written += n;
                    }
                    p += n;
                }
            } else {
                outcome.skipped += len;
            }
            pos += len;
        }
        if data_clusters.is_empty() && zero_updates.is_empty() {
            return Ok(outcome);
        }
        let _alloc = self.begin_allocation()?;
        let mut updates = zero_updates;
        if !data_clusters.is_empty() {
            let host_base = self.allocate_clusters(data_clusters.len() as u64);
            let mut i = 0;
            while i < data_clusters.len() {
                let mut j = i + 1;
                while j < data_clusters.len() && data_clusters[j] == data_clusters[j - 1] + 1 {
                    j += 1;
                }
                let gs = data_clusters[i] * cs - offset;
                let ge = ((data_clusters[j - 1] + 1) * cs - offset).min(data.len() as u64);
                let host = host_base + i as u64 * cs;
                let chunk = &data[gs as usize..ge as usize];
                self.storage
                    .write_at(chunk, host)
                    .map_err(Error::io("writing populated clusters", host))?;
                let tail = (j - i) as u64 * cs - chunk.len() as u64;
                if tail > 0 {
                    let zeros = vec![0u8; tail as usize];
                    let at = host + chunk.len() as u64;
                    self.storage
                        .write_at(&zeros, at)
                        .map_err(Error::io("writing populated clusters", at))?;
                }
                i = j;
            }
            self.flush_before_metadata()?;
            updates.extend(
                data_clusters
                    .iter()
                    .enumerate()
                    .map(|(k, &c)| (c, host_base + k as u64 * cs)),
            );
        }
        updates.sort_unstable();
        self.update_l2_entries(&updates)?;
        Ok(outcome)
    }

    // ------------------------------------------------------------------------------------
    // Allocation and table updates

    /// Marks an allocation in flight; sets NEED_CHECK first when there is no backing file.
    fn begin_allocation(&self) -> Result<AllocationGuard<'_>> {
        let mut state = self.state.lock();
        if !state.header.has_backing_file() && state.header.features & F_NEED_CHECK == 0 {
            state.header.features |= F_NEED_CHECK;
            let bytes = state.header.encode();
            // Unlike QEMU, flush the bit before any metadata can change: after a power loss
            // with the header write lost, an L2 entry could otherwise point past the end of
            // the file in an image that does not say it needs a check.
            if let Err(e) = self
                .storage
                .write_at(&bytes, 0)
                .and_then(|()| self.storage.flush())
            {
                state.header.features &= !F_NEED_CHECK;
                return Err(Error::io("setting need-check", 0)(e));
            }
        }
        state.allocating += 1;
        state.generation += 1;
        Ok(AllocationGuard { image: self })
    }

    /// Reserves `n` contiguous clusters at the end of the file.
    fn allocate_clusters(&self, n: u64) -> u64 {
        self.file_end
            .fetch_add(n * self.geometry.cluster_size(), Ordering::AcqRel)
    }

    fn flush_before_metadata(&self) -> Result<()> {
        if self.state.lock().header.has_backing_file() {
            self.storage
                .flush()
                .map_err(Error::io("flushing data before metadata", 0))?;
        }
        Ok(())
    }

    /// Sets L2 entries `(guest cluster, raw value)`, sorted by cluster, creating L2 tables as
    /// needed. Each table is written once: the changed 512-byte sectors of an existing table,
    /// or a new table whole (then flushed) followed by its L1 sector.
    fn update_l2_entries(&self, updates: &[(u64, u64)]) -> Result<()> {
        let g = self.geometry;
        let per_table = g.table_entries();
        let _meta = self.meta_lock.lock();
        let mut i = 0;
        while i < updates.len() {
            let l1_index = updates[i].0 / per_table;
            let mut j = i + 1;
            while j < updates.len() && updates[j].0 / per_table == l1_index {
                j += 1;
            }
            let group = &updates[i..j];
            self.table_epoch.fetch_add(1, Ordering::AcqRel);
            let l1_entry = self.l1.read()[l1_index as usize];
            if l1_entry == ENTRY_UNALLOCATED {
                let mut table = vec![0u64; per_table as usize];
                for &(c, v) in group {
                    table[(c % per_table) as usize] = v;
                }
                let table_offset = self.allocate_clusters(u64::from(g.table_size()));
                self.storage
                    .write_at(&layout::encode_table(&table), table_offset)
                    .and_then(|()| self.storage.flush())
                    .map_err(Error::io("writing new L2 table", table_offset))?;
                self.write_l1_entry(l1_index, table_offset)?;
                self.l2_cache.insert(table_offset, Arc::new(table));
            } else {
                if !self.is_usable_l2_offset(l1_entry) {
                    return Err(Error::InvalidEntry {
                        table: TableKind::L1,
                        guest: group[0].0 * g.cluster_size(),
                        entry: l1_entry,
                    });
                }
                let mut table = self.load_l2(l1_entry)?;
                let t = Arc::make_mut(&mut table);
                let mut lo = usize::MAX;
                let mut hi = 0;
                for &(c, v) in group {
                    let idx = (c % per_table) as usize;
                    t[idx] = v;
                    lo = lo.min(idx);
                    hi = hi.max(idx);
                }
                let per_sector = (SECTOR / 8) as usize;
                let s0 = lo / per_sector * per_sector;
                let s1 = (hi / per_sector + 1) * per_sector;
                let at = l1_entry + s0 as u64 * 8;
                self.storage
                    .write_at(&layout::encode_table(&t[s0..s1]), at)
                    .map_err(Error::io("writing L2 table", at))?;
                self.l2_cache.insert(l1_entry, table);
            }
            i = j;
        }
        Ok(())
    }

    fn write_l1_entry(&self, l1_index: u64, table_offset: u64) -> Result<()> {
        let mut l1 = self.l1.write();
        l1[l1_index as usize] = table_offset;
        let per_sector = (SECTOR / 8) as usize;
        let s0 = l1_index as usize / per_sector * per_sector;
        let s1 = (s0 + per_sector).min(l1.len());
        let at = self.state.lock().header.l1_table_offset + s0 as u64 * 8;
        self.storage
            .write_at(&layout::encode_table(&l1[s0..s1]), at)
            .map_err(Error::io("writing L1 table", at))
    }

    /// Writes a whole L1 table (after a repair).
    pub(crate) fn write_l1_table(&self, l1: &[u64]) -> Result<()> {
        let at = self.state.lock().header.l1_table_offset;
        self.storage
            .write_at(&layout::encode_table(l1), at)
            .map_err(Error::io("writing L1 table", at))
    }

    // ------------------------------------------------------------------------------------
    // Header changes, flush, close

    fn write_header(&self, state: &HeaderState) -> Result<()> {
        self.storage
            .write_at(&state.header.encode(), 0)
            .map_err(Error::io("writing header", 0))
    }

    /// Makes every completed write durable. When no allocation is in flight, also clears the
    /// NEED_CHECK bit (data and tables are consistent on disk after the flush).
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let generation = self.state.lock().generation;
        self.storage.flush().map_err(Error::io("flushing", 0))?;
        let mut state = self.state.lock();
        if state.header.features & F_NEED_CHECK != 0
            && state.allocating == 0
            && state.generation == generation
        {
            state.header.features &= !F_NEED_CHECK;
            self.write_header(&state)?;
            self.storage.flush().map_err(Error::io("flushing", 0))?;
        }
        Ok(())
    }

    /// Clears NEED_CHECK after a successful repair.
    pub(crate) fn mark_clean(&self) -> Result<()> {
        self.storage.flush().map_err(Error::io("flushing", 0))?;
        let mut state = self.state.lock();
        if state.header.features & F_NEED_CHECK != 0 {
            state.header.features &= !F_NEED_CHECK;
            self.write_header(&state)?;
            self.storage.flush().map_err(Error::io("flushing", 0))?;
        }
        Ok(())
    }

    /// Flushes and closes the image, leaving it clean.
    pub fn close(mut self) -> Result<()> {
        let r = self.flush();
        self.closed = true;
        r
    }

    /// Grows the virtual disk to `new_size` bytes (a multiple of 512); shrinking is refused.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size % SECTOR != 0 {
            return Err(Error::InvalidOptions(
                "the new size must be a multiple of 512",
            ));
        }
        if new_size > layout::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidOptions(
                "the new size exceeds QEMU's maximum disk size (2^63 - 2^30 bytes)",
            ));
        }
        if new_size > self.geometry.max_image_size() {
            return Err(Error::InvalidOptions(
                "the new size exceeds the maximum for this cluster_size/table_size",
            ));
        }
        let mut state = self.state.lock();
        if new_size < state.header.image_size {
            return Err(Error::Shrink);
        }
        let old = state.header.image_size;
        state.header.image_size = new_size;
        if let Err(e) = self.write_header(&state) {
            state.header.image_size = old;
            return Err(e);
        }
        self.image_size.store(new_size, Ordering::Release);
        self.storage.flush().map_err(Error::io("flushing", 0))
    }

    /// Records a new backing name and format in the header (or none), without copying data,
    /// as `qemu-img rebase -u` does: header and name are written in one write at offset 0,
    /// then flushed. Removing the link clears both backing bits and sets the name to
    /// offset 64, size 0 (as QEMU's block-stream leaves it). The opened backing, if any, is
    /// replaced by `opened` (or dropped).
    pub fn set_backing(
        &self,
        backing: Option<(&str, BackingFormat)>,
        opened: Option<Arc<dyn BackingRead>>,
    ) -> Result<()> {
        self.check_writable()?;
        let mut state = self.state.lock();
        let mut header = state.header.clone();
        header.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        let mut bytes;
        match backing {
            Some((name, format)) => {
                if header.compat_features != 0 {
                    return Err(Error::UnknownCompatFeatures(header.compat_features));
                }
                if HEADER_SIZE_BYTES as u64 + name.len() as u64 > self.geometry.header_bytes()
                    || name.len() >= layout::MAX_BACKING_NAME as usize
                {
                    return Err(Error::BackingNameTooLong(name.len()));
                }
                header.features |= F_BACKING_FILE;
                if format == BackingFormat::Raw {
                    header.features |= F_BACKING_FORMAT_NO_PROBE;
                }
                header.backing_filename_offset = HEADER_SIZE_BYTES as u32;
                header.backing_filename_size = name.len() as u32;
                bytes = header.encode().to_vec();
                bytes.extend_from_slice(name.as_bytes());
            }
            None => {
                header.backing_filename_offset = HEADER_SIZE_BYTES as u32;
                header.backing_filename_size = 0;
                bytes = header.encode().to_vec();
            }
        }
        // A crash between here and the flush leaves either the old or the new header: both
        // describe the same visible data only when the caller made it so (stream, rebase -u).
        self.storage
            .write_at(&bytes, 0)
            .and_then(|()| self.storage.flush())
            .map_err(Error::io("writing header", 0))?;
        state.header = header;
        state.backing_name = backing.map(|(n, _)| n.to_string());
        *self.backing.write() = opened;
        Ok(())
    }
}

/// Counts an allocation in flight for the NEED_CHECK logic.
struct AllocationGuard<'a> {
    image: &'a Image,
}

impl Drop for AllocationGuard<'_> {
    fn drop(&mut self) {
        self.image.state.lock().allocating -= 1;
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.closed {
            let dirty = self.state.lock().header.features & F_NEED_CHECK != 0;
            if dirty {
                tracing::warn!(
                    path = ?self.path,
                    "QED image dropped without close(): it stays marked NEED_CHECK and will be checked at the next read-write open"
                );
            }
        }
    }
}
