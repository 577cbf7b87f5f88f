//! The copy-on-read device: a QED image stacked on its backing chain.
//!
//! Reads of clusters the image lacks fetch them from the backing into a buffer of the
//! device's own (never the caller's, which the guest may change under us), return the data,
//! and store whole clusters into the image with [`qed::Image::populate`]; all-zero clusters
//! become zero clusters, never stored data. Copy-on-read can be switched off
//! ([`CorDevice::set_copy_on_read`]): misses are then read through without being stored.
//!
//! Guest writes, copy-on-read fills and the stream job ([`CorDevice::populate_range`]) take
//! the same guest-cluster-range lock ([`RangeLock`], the only range lock on the path: `qed`
//! has none) and look the mapping up again under it, so
//! a guest write is never overwritten by older backing data and a read never sees a
//! half-written cluster. The lock guard moves into the blocking task that does the image I/O,
//! so a dropped (cancelled) request keeps its clusters locked until its I/O has really ended.
//!
//! The `qed` crate never opens or reads the backing: the chain below the image is opened
//! through the [`Gate`] and read here. A guest write that covers only part of an unallocated
//! cluster therefore fetches the rest of the cluster from the backing (asynchronously, under
//! the lock), merges, and stores whole clusters with `populate_as_data` (as QEMU does, with
//! the backing's bytes of the last cluster past the end of the virtual disk too).
//!
//! Guest misses go ahead of background work: while any guest request waits for the backing,
//! [`CorDevice::populate_range`] does not start new copies.
//!
//! A guest read returns as soon as it has its bytes: its copy-in is stored afterwards on the
//! blocking pool, under its range lock (up to a budget of bytes in flight, beyond which a read
//! waits for its store); [`CorDevice::settle_copy_ins`] and `close` wait for those stores. A
//! read of clusters another request holds locked (the stream storing them) does not wait: it
//! reads the backing and copies nothing in.
//!
//! All `qed` calls run on tokio's blocking pool (`spawn_blocking`); backing reads are async.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::{Notify, Semaphore};

use qed::storage::AlignedBuf;
use qed::{GuestCluster, GuestOffset, Image, Mapping, OpenOptions};

use crate::copy_in::{CopyIn, CopyIns};
pub use crate::device::PopulateStats;
use crate::device::{
    check_range, push_extent, read_padded, BlockDevice, BlockingRead, Capabilities, Closed,
    Geometry, IoBufs, IoFuture, LocalExtent, MappedRead, Populate, Reconnect, Status, StatusExtent,
    WriteFlags,
};
use crate::error::{blocking, Error, Result};
use crate::gate::Gate;
use crate::image::{
    merge_runs, on_image, qed_status, read_local, read_local_bufs, read_local_into,
};
use crate::lock::{RangeGuard, RangeLock};
use crate::pool::{Chunks, PoolBuf, PAGE_ALIGN};

/// Options for [`CorDevice::open`].
#[derive(Clone, Debug)]
pub struct CorOptions {
    /// The gate the backing chain is opened through; its [`Gate::io`] (cache mode and I/O
    /// backend) also applies to the image itself.
    pub gate: Gate,
    /// Store what reads fetch from the backing (default true).
    pub copy_on_read: bool,
    /// Open the image read-only (no copy-on-read, no writes).
    pub read_only: bool,
}

impl Default for CorOptions {
    fn default() -> CorOptions {
        CorOptions {
            gate: Gate::default(),
            copy_on_read: true,
            read_only: false,
        }
    }
}

/// Counters of a [`CorDevice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CorStats {
    /// Bytes that guest reads fetched from the backing and stored.
    pub cor_bytes: u64,
    /// Guest reads that missed (needed the backing).
    pub misses: u64,
    /// Copy-ins that could not be stored (a full disk, an I/O error): the read was served
    /// from the backing all the same, and the clusters stay unallocated.
    pub cor_failures: u64,
}

/// A QED image over its backing chain, with copy-on-read. See the module documentation.
#[derive(Debug)]
pub struct CorDevice {
    image: Arc<Image>,
    name: String,
    path: Option<PathBuf>,
    backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    locks: RangeLock,
    copy_on_read: AtomicBool,
    urgent: Arc<AtomicUsize>,
    urgent_done: Arc<Notify>,
    misses: AtomicU64,
    copy_ins: Arc<CopyIns>,
    /// Bytes of copy-ins that may be stored after their read has returned.
    copy_in_budget: Arc<Semaphore>,
    closed: Closed,
}

/// The most bytes fetched by guest reads that wait, stored after their reads returned, to be
/// written into the image; beyond it a read stores its copy-in before it returns.
const COPY_IN_BUDGET: usize = 64 << 20;

/// Counts a guest request waiting on the backing while it lives.
struct Urgent {
    count: Arc<AtomicUsize>,
    done: Arc<Notify>,
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
        }
    }
}

/// Reads from the backing (zeros past its end), or zeros when the link is gone.
async fn fetch(backing: Option<&Arc<dyn BlockDevice>>, at: u64, len: usize) -> Result<Vec<u8>> {
    match backing {
        Some(b) => read_padded(&**b, at, len).await,
        None => Ok(vec![0u8; len]),
    }
}

/// As [`fetch`], for bytes that go on to be stored into the image: into memory at a
/// page-aligned address when the backing is local, so that an O_DIRECT backing is read into
/// it and an O_DIRECT image written from it with no bounce copy; a `Vec` over NBD (anywhere
/// below: the backing has a reconnect capability), which the NBD client reads into as it is.
async fn fetch_to_store(
    backing: Option<&Arc<dyn BlockDevice>>,
    at: u64,
    len: usize,
) -> Result<PoolBuf> {
    let buf = match backing {
        Some(b) if b.reconnect().is_none() => PoolBuf::Aligned(
            AlignedBuf::zeroed(len, PAGE_ALIGN)
                .map_err(Error::io("allocating a copy-in buffer", at))?,
        ),
        _ => PoolBuf::Vec(vec![0u8; len]),
    };
    let mut read = read_bufs_padded(backing, at, vec![buf]).await?;
    Ok(read.pop().unwrap_or_default())
}

/// The unallocated runs of `[offset, offset + length)` in `image` (blocking), merged.
fn unallocated_runs(
    image: &Image,
    name: &str,
    offset: u64,
    length: u64,
) -> Result<Vec<(u64, u64)>> {
    let extents = image
        .map(GuestOffset(offset), length)
        .map_err(Error::qed(name))?;
    let runs = extents
        .iter()
        .filter(|e| e.mapping == Mapping::Unallocated)
        .map(|e| (e.offset.0, e.length));
    Ok(merge_runs(runs))
}

/// `runs` (ascending) cut to `[offset, offset + length)`, adjacent ones merged.
fn clip_merged(runs: &[(u64, u64)], offset: u64, length: u64) -> Vec<(u64, u64)> {
    let end = offset + length;
    merge_runs(runs.iter().filter_map(|&(at, l)| {
        let (s, e) = (at.max(offset), (at + l).min(end));
        (s < e).then_some((s, e - s))
    }))
}

/// Closes a backing, giving up after two seconds (a dead NBD server must not hold up the
/// close of the image, whose own state is already flushed).
async fn close_backing(b: &dyn BlockDevice) {
    if b.reconnect()
        .is_some_and(|r| r.state() != crate::device::LinkState::Connected)
    {
        // Never wait on a dead peer: dropping the device closes its sockets.
        tracing::warn!(backing = %b.describe(), "backing is not connected; not closing it cleanly");
        return;
    }
    match tokio::time::timeout(std::time::Duration::from_secs(2), b.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(backing = %b.describe(), error = %e, "closing the backing failed")
        }
        Err(_) => tracing::warn!(backing = %b.describe(), "closing the backing timed out"),
    }
}

/// One piece of a guest write, planned under the lock.
enum WritePiece {
    /// Into allocated or zero clusters: an ordinary write. `guest` is `(at, s, e)`: the
    /// request's bytes `[s, e)` go to guest offset `at`.
    Direct { guest: (u64, usize, usize) },
    /// Into unallocated clusters: whole clusters from `at` (backing gaps merged in around
    /// the guest's part, `guest`).
    Fill {
        at: u64,
        merged: Vec<u8>,
        guest: (u64, usize, usize),
    },
}

/// True when extent `e` starts and ends on cluster boundaries (a write of it needs nothing
/// from the backing).
fn whole_clusters(e: &qed::Extent, cs: u64) -> bool {
    e.offset.0 % cs == 0 && e.end().0 % cs == 0
}

/// Stores a planned guest write (blocking, under the range lock). A fill whose clusters were
/// linked meanwhile by someone who does not take our lock (a populate straight on the
/// image) skips them; the guest's part is then written in place, so a guest write is never
/// lost and never overwritten by backing data.
fn store_write(image: &Image, bufs: &IoBufs, pieces: Vec<WritePiece>) -> qed::Result<()> {
    for piece in pieces {
        let (at, s, e) = match piece {
            WritePiece::Direct { guest } => guest,
            WritePiece::Fill { at, merged, guest } => {
                if fill_cluster(image, at, &merged)? {
                    continue;
                }
                guest
            }
        };
        // The request's bytes [s, e), straight from the caller's segments.
        for (seg_at, seg) in bufs.segments() {
            let (lo, hi) = (s.max(seg_at), e.min(seg_at + seg.len()));
            if lo < hi {
                let guest = GuestOffset(at + (lo - s) as u64);
                image.write_at(&seg[lo - seg_at..hi - seg_at], guest)?;
            }
        }
    }
    Ok(())
}

/// Stores one merged cluster at `at` as data (all-zero too, as QEMU leaves a guest write that
/// covers part of an unallocated cluster): true when stored, false when someone else linked
/// the cluster first (the guest's part is then written in place). A cluster another request
/// has claimed but not linked yet (a whole-cluster write, a populate that may yet leave it
/// unallocated) is tried again once that request is done with it: writing in place into a
/// cluster that is still unallocated would lose the backing's bytes around the guest's.
fn fill_cluster(image: &Image, at: u64, merged: &[u8]) -> qed::Result<bool> {
    let mut tries = 0u32;
    loop {
        if image.populate_as_data(GuestOffset(at), merged)?.skipped == 0 {
            return Ok(true);
        }
        if image.mapping_at(GuestOffset(at), 1)?.0 != Mapping::Unallocated {
            return Ok(false);
        }
        // Claims are held for one request's I/O: wait a little, then look again.
        tries += 1;
        if tries < 16 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
}

/// A unit fetched from the backing for [`CorDevice::store_fetched`]: its clusters locked, the
/// bytes the image lacked in buffers of a [`BufferPool`](crate::BufferPool). Dropping it unlocks the clusters and
/// gives the buffers back, storing nothing.
#[derive(Debug)]
pub struct Fetched {
    /// The unit's first byte (cluster aligned once fetched).
    offset: u64,
    /// Guest ranges the image lacked under the lock (ascending, cluster aligned).
    pieces: Vec<(u64, u64)>,
    /// Bytes that were already local.
    local: u64,
    /// Chunk `k` holds the backing's bytes from `offset + k * chunk`.
    chunks: Option<Chunks>,
    guard: Option<RangeGuard>,
}

impl Fetched {
    /// A unit with nothing to store (`length` bytes local, or nothing to copy from).
    fn local_only(offset: u64, length: u64) -> Fetched {
        Fetched {
            offset,
            pieces: Vec::new(),
            local: length,
            chunks: None,
            guard: None,
        }
    }

    /// The unit's first byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes fetched to be stored.
    pub fn fetched_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.1).sum()
    }

    /// Runs `[k0, k1)` of the chunk indices the pieces touch, for a chunk size of `chunk`.
    fn windows(&self, chunk: u64) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &(a, l) in &self.pieces {
            let k0 = ((a - self.offset) / chunk) as usize;
            let k1 = ((a + l - self.offset).div_ceil(chunk)) as usize;
            match runs.last_mut() {
                Some(last) if last.1 >= k0 => last.1 = last.1.max(k1),
                _ => runs.push((k0, k1)),
            }
        }
        runs
    }

    /// The pieces as guest offsets and the bytes to store there, split at chunk boundaries
    /// (which are cluster boundaries).
    fn slices(&self) -> Vec<(GuestOffset, &[u8])> {
        let Some(chunks) = &self.chunks else {
            return Vec::new();
        };
        let chunk = chunks.chunk_bytes() as u64;
        let mut out = Vec::new();
        for &(a, l) in &self.pieces {
            let mut pos = a;
            while pos < a + l {
                let k = ((pos - self.offset) / chunk) as usize;
                let base = self.offset + k as u64 * chunk;
                let end = (a + l).min(base + chunk);
                let buf = &chunks.bufs()[k];
                out.push((
                    GuestOffset(pos),
                    &buf[(pos - base) as usize..(end - base) as usize],
                ));
                pos = end;
            }
        }
        out
    }
}

/// Reads `bufs` (consecutive, from `at`) from the backing, zeros past its end (and all zeros
/// when the link is gone), into the buffers themselves.
async fn read_bufs_padded(
    backing: Option<&Arc<dyn BlockDevice>>,
    at: u64,
    mut bufs: Vec<PoolBuf>,
) -> Result<Vec<PoolBuf>> {
    let size = backing.map_or(0, |b| b.size());
    let lens: Vec<usize> = bufs.iter().map(|b| b.len()).collect();
    let mut pos = at;
    let mut inside = 0;
    for b in bufs.iter_mut() {
        let n = size.saturating_sub(pos).min(b.len() as u64) as usize;
        pos += b.len() as u64;
        if n == 0 {
            b.fill(0);
            continue;
        }
        b.truncate(n);
        inside += 1;
    }
    if let (Some(backing), true) = (backing, inside > 0) {
        let rest = bufs.split_off(inside);
        let read = backing.readv(at, IoBufs::from_pool_bufs(bufs)).await?;
        bufs = read.into_pool_bufs();
        bufs.extend(rest);
    }
    for (b, &len) in bufs.iter_mut().zip(&lens) {
        b.resize_zeroed(len);
    }
    Ok(bufs)
}

impl CorDevice {
    /// Opens the QED image at `path` (read-write unless `options.read_only`) and its backing
    /// chain through `options.gate`.
    pub async fn open(path: &Path, options: CorOptions) -> Result<CorDevice> {
        let access = match (options.read_only, options.gate.force_share) {
            (false, _) => qed::Access::ReadWrite,
            (true, false) => qed::Access::ReadOnly,
            (true, true) => qed::Access::SharedRead,
        };
        let p = path.to_path_buf();
        let file = blocking(move || {
            qed::file::open(&p, access).map_err(Error::qed(&p.display().to_string()))
        })
        .await?;
        CorDevice::open_file(file, path, options).await
    }

    /// As [`CorDevice::open`], on a file the caller has already opened (and locked, with
    /// [`qed::file::open`]) from `path`: the descriptor it probed is the one used.
    pub async fn open_file(
        file: std::fs::File,
        path: &Path,
        options: CorOptions,
    ) -> Result<CorDevice> {
        let p = path.to_path_buf();
        let read_only = options.read_only;
        let force_share = options.gate.force_share;
        let storage = options.gate.storage(file, path)?;
        let image = blocking(move || {
            let o = OpenOptions {
                read_only,
                force_share,
                path: Some(p.clone()),
                ..OpenOptions::default()
            };
            Image::open(storage, o).map_err(Error::qed(&p.display().to_string()))
        })
        .await?;
        let backing = options.gate.open_below(&image, path, 0).await?;
        let mut dev = CorDevice::new(image, path.display().to_string(), backing);
        dev.path = Some(path.to_path_buf());
        dev.set_copy_on_read(options.copy_on_read && !read_only);
        Ok(dev)
    }

    /// Stacks an image on `backing` (the device its header names, opened through the
    /// [`Gate`]; `None` when it names none).
    pub fn new(image: Image, name: String, backing: Option<Arc<dyn BlockDevice>>) -> CorDevice {
        let cor = !image.is_read_only();
        let image = Arc::new(image);
        CorDevice {
            path: image.path().map(Path::to_path_buf),
            copy_ins: Arc::new(CopyIns::new(Arc::clone(&image), name.clone())),
            image,
            name,
            backing: RwLock::new(backing),
            locks: RangeLock::new(),
            copy_on_read: AtomicBool::new(cor),
            urgent: Arc::new(AtomicUsize::new(0)),
            urgent_done: Arc::new(Notify::new()),
            misses: AtomicU64::new(0),
            copy_in_budget: Arc::new(Semaphore::new(COPY_IN_BUDGET)),
            closed: Closed::default(),
        }
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The image's name (its path as opened).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image's path, when opened from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The backing device, if the image is still linked to one.
    pub fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing.read().clone()
    }

    /// The image's cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.image.geometry().cluster_size()
    }

    /// Turns copy-on-read on or off (reads still work either way).
    pub fn set_copy_on_read(&self, on: bool) {
        self.copy_on_read
            .store(on && !self.image.is_read_only(), Ordering::Release);
    }

    /// Whether copy-on-read is on.
    pub fn copy_on_read(&self) -> bool {
        self.copy_on_read.load(Ordering::Acquire)
    }

    /// Counters.
    pub fn stats(&self) -> CorStats {
        CorStats {
            cor_bytes: self.copy_ins.stored_bytes(),
            misses: self.misses.load(Ordering::Relaxed),
            cor_failures: self.copy_ins.failures(),
        }
    }

    /// The lock shared by guest writes, copy-on-read and the stream job (cluster indices).
    pub fn range_lock(&self) -> &RangeLock {
        &self.locks
    }

    fn urgent(&self) -> Urgent {
        self.urgent.fetch_add(1, Ordering::AcqRel);
        Urgent {
            count: Arc::clone(&self.urgent),
            done: Arc::clone(&self.urgent_done),
        }
    }

    /// Waits until no guest request is waiting on the backing.
    pub async fn wait_for_guest(&self) {
        loop {
            let notified = self.urgent_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.urgent.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Cluster range `[c0, c1)` covering guest bytes `[start, end)`.
    fn clusters(&self, start: u64, end: u64) -> (GuestCluster, GuestCluster) {
        let cs = self.cluster_size();
        (
            GuestCluster(start / cs),
            GuestCluster(end.div_ceil(cs).max(start / cs + 1)),
        )
    }

    /// `[start, end)` widened to cluster boundaries, the end clamped to the disk.
    fn widen(&self, start: u64, end: u64) -> (u64, u64) {
        let cs = self.cluster_size();
        (
            start / cs * cs,
            end.div_ceil(cs).saturating_mul(cs).min(self.size()),
        )
    }

    async fn lock(&self, start: u64, end: u64) -> RangeGuard {
        let (c0, c1) = self.clusters(start, end);
        self.locks.lock(c0, c1).await
    }

    /// The image's own mapping of `[offset, offset + length)` (no backing lookups).
    pub async fn local_map(&self, offset: u64, length: u64) -> Result<Vec<qed::Extent>> {
        on_image(&self.image, &self.name, move |i| {
            i.map(GuestOffset(offset), length)
        })
        .await
    }

    /// Copies the unallocated clusters of `[offset, offset + length)` (widened to whole
    /// clusters) from the backing into the image, under the range lock, after any guest
    /// request waiting on the backing. Clusters a guest wrote meanwhile are left alone.
    pub async fn populate_range(&self, offset: u64, length: u64) -> Result<PopulateStats> {
        self.closed.check()?;
        check_range(offset, length, self.size())?;
        if length == 0 {
            return Ok(PopulateStats::default());
        }
        if self.image.is_read_only() {
            return Err(Error::ReadOnly);
        }
        self.wait_for_guest().await;
        let Some(backing) = self.backing() else {
            return Ok(PopulateStats {
                local: length,
                ..PopulateStats::default()
            });
        };
        drop(backing);
        let (lo, hi) = self.widen(offset, offset + length);
        let guard = self.lock(lo, hi).await;
        // The link may have been dropped while we waited.
        let backing = self.backing();
        let extents = self.local_map(lo, hi - lo).await?;
        let mut stats = PopulateStats::default();
        let mut fills = Vec::new();
        for e in extents {
            if e.mapping == Mapping::Unallocated {
                let data = fetch_to_store(backing.as_ref(), e.offset.0, e.length as usize).await?;
                fills.push((e.offset, data));
            } else {
                stats.local += e.length;
            }
        }
        if fills.is_empty() {
            return Ok(stats);
        }
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        let outcome = blocking(move || {
            let _guard = guard;
            let mut total = qed::PopulateOutcome::default();
            for (at, data) in fills {
                let o = image.populate(at, &data, true).map_err(Error::qed(&name))?;
                total.written += o.written;
                total.zeroed += o.zeroed;
                total.skipped += o.skipped;
            }
            Ok(total)
        })
        .await?;
        stats.copied += outcome.written;
        stats.zeroed += outcome.zeroed;
        stats.local += outcome.skipped;
        Ok(stats)
    }

    /// [`Populate::fetch_range`]: locks the unit, finds what the image lacks, and reads the
    /// windows of `chunks` that hold it from the backing (whole chunks, zeros past the
    /// backing's end).
    pub async fn fetch_range(&self, offset: u64, length: u64, chunks: Chunks) -> Result<Fetched> {
        self.closed.check()?;
        check_range(offset, length, self.size())?;
        if self.image.is_read_only() {
            return Err(Error::ReadOnly);
        }
        let mut unit = Fetched::local_only(offset, length);
        if length == 0 {
            return Ok(unit);
        }
        self.wait_for_guest().await;
        if self.backing().is_none() {
            return Ok(unit);
        }
        let (lo, hi) = self.widen(offset, offset + length);
        if chunks.len() != hi - lo {
            return Err(Error::BuffersMismatch {
                need: hi - lo,
                have: chunks.len(),
            });
        }
        let mut chunks = chunks;
        let guard = self.lock(lo, hi).await;
        // The link may have been dropped while we waited.
        let backing = self.backing();
        unit.offset = lo;
        unit.local = 0;
        for e in self.local_map(lo, hi - lo).await? {
            if e.mapping == Mapping::Unallocated {
                unit.pieces.push((e.offset.0, e.length));
            } else {
                unit.local += e.length;
            }
        }
        if unit.pieces.is_empty() {
            return Ok(unit);
        }
        let chunk = chunks.chunk_bytes() as u64;
        for (k0, k1) in unit.windows(chunk) {
            let bufs = chunks.take_bufs(k0, k1);
            let at = lo + k0 as u64 * chunk;
            let bufs = read_bufs_padded(backing.as_ref(), at, bufs).await?;
            chunks.put(k0, bufs);
        }
        unit.chunks = Some(chunks);
        unit.guard = Some(guard);
        Ok(unit)
    }

    /// [`Populate::store_fetched`]: one blocking hop stores every unit's pieces with
    /// [`Image::populate_batch`] (one flush before all their L2 updates); the units (their
    /// locks and buffers) are dropped there, once the I/O has ended.
    pub async fn store_fetched(&self, mut units: Vec<Fetched>) -> Result<PopulateStats> {
        let mut stats = PopulateStats {
            local: units.iter().map(|u| u.local).sum(),
            ..PopulateStats::default()
        };
        if units.iter().all(|u| u.pieces.is_empty()) {
            return Ok(stats);
        }
        self.closed.check()?;
        units.sort_by_key(|u| u.offset);
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        let outcome = blocking(move || {
            let pieces: Vec<(GuestOffset, &[u8])> =
                units.iter().flat_map(Fetched::slices).collect();
            let o = image
                .populate_batch(&pieces, true)
                .map_err(Error::qed(&name));
            drop(pieces);
            drop(units);
            o
        })
        .await?;
        stats.copied += outcome.written;
        stats.zeroed += outcome.zeroed;
        stats.local += outcome.skipped;
        Ok(stats)
    }

    /// Drops the backing link once everything the backing holds is local: flush, then rewrite
    /// the header with no backing (flags cleared, name offset 64, size 0, as QEMU's
    /// block-stream leaves it; the write is flushed), then closes the backing device. The
    /// caller must have made sure that every unallocated range reads as zeros in the backing.
    pub async fn drop_backing_link(&self) -> Result<()> {
        let guard = self.locks.lock_all().await;
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        blocking(move || {
            let _guard = guard;
            image.flush().map_err(Error::qed(&name))?;
            image.set_backing(None).map_err(Error::qed(&name))?;
            image.flush().map_err(Error::qed(&name))
        })
        .await?;
        let old = self.backing.write().take();
        if let Some(b) = old {
            close_backing(&*b).await;
        }
        Ok(())
    }

    /// A guest write: from the caller's segments straight into the image where the clusters
    /// are local (or there is no backing); through a merged buffer of ours where a partial
    /// cluster must be filled from the backing. With FUA, the image is flushed before the
    /// write completes.
    async fn guest_writev(&self, offset: u64, bufs: IoBufs, flags: WriteFlags) -> Result<IoBufs> {
        self.closed.check()?;
        if self.image.is_read_only() {
            return Err(Error::ReadOnly);
        }
        check_range(offset, bufs.len() as u64, self.size())?;
        if bufs.is_empty() {
            return Ok(bufs);
        }
        // Fast path: nothing to merge with the backing (no backing; or every cluster the
        // write touches is allocated, a zero cluster, or unallocated and covered whole, with
        // one segment so that each write covers it whole too): write in place from the
        // caller's memory. No range lock: a populate never overwrites a linked cluster, and a
        // cluster it links first is then written in place.
        let no_backing = self.backing().is_none();
        let cs = self.cluster_size();
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        let (done, bufs) = blocking(move || {
            let local = no_backing || {
                let extents = image
                    .map(GuestOffset(offset), bufs.len() as u64)
                    .map_err(Error::qed(&name))?;
                let one_segment = bufs.segments().nth(1).is_none();
                extents.iter().all(|e| match e.mapping {
                    Mapping::Data(_) => true,
                    Mapping::Zero | Mapping::Unallocated => {
                        one_segment && (e.mapping == Mapping::Zero || whole_clusters(e, cs))
                    }
                })
            };
            if local {
                for (at, seg) in bufs.segments() {
                    image
                        .write_at(seg, GuestOffset(offset + at as u64))
                        .map_err(Error::qed(&name))?;
                }
                if flags.fua {
                    image.flush().map_err(Error::qed(&name))?;
                }
            }
            Ok((local, bufs))
        })
        .await?;
        if done {
            return Ok(bufs);
        }
        let bufs = self.guest_write_filling(offset, bufs).await?;
        if flags.fua {
            on_image(&self.image, &self.name, |i| i.flush()).await?;
        }
        Ok(bufs)
    }

    async fn guest_write(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.guest_writev(offset, IoBufs::from(data), WriteFlags::default())
            .await
            .map(drop)
    }

    /// A write that touches unallocated clusters, under the range lock: partial clusters are
    /// filled from the backing and stored whole.
    async fn guest_write_filling(&self, offset: u64, bufs: IoBufs) -> Result<IoBufs> {
        let _urgent = self.urgent();
        let end = offset + bufs.len() as u64;
        let guard = self.lock(offset, end).await;
        let pieces = self.plan_write(offset, &bufs).await?;
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        blocking(move || {
            let _guard = guard;
            store_write(&image, &bufs, pieces).map_err(Error::qed(&name))?;
            Ok(bufs)
        })
        .await
    }

    /// Under the range lock: splits the write of `bufs` at `offset` into writes in place and
    /// whole-cluster fills, with the backing's bytes fetched around the guest's.
    async fn plan_write(&self, offset: u64, bufs: &IoBufs) -> Result<Vec<WritePiece>> {
        let backing = self.backing();
        let extents = self.local_map(offset, bufs.len() as u64).await?;
        let mut pieces = Vec::new();
        for e in extents {
            let (e_start, e_end) = (e.offset.0, e.end().0);
            let s = (e_start - offset) as usize;
            if e.mapping != Mapping::Unallocated {
                pieces.push(WritePiece::Direct {
                    guest: (e_start, s, s + e.length as usize),
                });
                continue;
            }
            // Whole clusters are written as they are; a cluster covered in part is merged
            // with the backing's bytes around the guest's (past the disk's end too, as QEMU
            // stores them).
            let cs = self.cluster_size();
            let mut pos = e_start;
            while pos < e_end {
                let (c0, c1) = (pos / cs * cs, pos / cs * cs + cs);
                let at = (pos - offset) as usize;
                if pos == c0 && e_end >= c1 {
                    let whole_end = e_end / cs * cs;
                    let guest = (pos, at, (whole_end - offset) as usize);
                    pieces.push(WritePiece::Direct { guest });
                    pos = whole_end;
                    continue;
                }
                let part_end = e_end.min(c1);
                let guest = (pos, at, (part_end - offset) as usize);
                let mut merged = fetch(backing.as_ref(), c0, (pos - c0) as usize).await?;
                let head = merged.len();
                merged.resize(head + guest.2 - guest.1, 0);
                bufs.copy_out(guest.1, &mut merged[head..]);
                merged.extend(fetch(backing.as_ref(), part_end, (c1 - part_end) as usize).await?);
                pieces.push(WritePiece::Fill {
                    at: c0,
                    merged,
                    guest,
                });
                pos = part_end;
            }
        }
        Ok(pieces)
    }

    /// Refuses a read of `length` bytes at `offset` when the device is closed or the range
    /// runs past its end: the first check of every guest read.
    fn check_read(&self, offset: u64, length: u64) -> Result<()> {
        self.closed.check()?;
        check_range(offset, length, self.size())
    }

    /// A guest read: local data straight into the caller's segments; what the image lacks is
    /// fetched into a buffer of ours, stored (copy-on-read) and copied out.
    async fn guest_readv(&self, offset: u64, bufs: IoBufs) -> Result<IoBufs> {
        let len = bufs.len() as u64;
        self.check_read(offset, len)?;
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        let (mut bufs, missing) =
            blocking(move || read_local_bufs(&image, &name, bufs, offset)).await?;
        if missing.is_empty() {
            return Ok(bufs);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let Some(backing) = self.backing() else {
            for (at, l) in missing {
                bufs.zero((at - offset) as usize, l as usize);
            }
            return Ok(bufs);
        };
        if !self.copy_on_read() {
            return self
                .fill_from_backing(&*backing, offset, bufs, missing)
                .await;
        }
        let _urgent = self.urgent();
        let (lo, hi) = self.widen(offset, offset + len);
        let (c0, c1) = self.clusters(lo, hi);
        let Some(guard) = self.locks.try_lock(c0, c1) else {
            // Another request (the stream, a write, another read's copy-in) is storing some
            // of these clusters: serve this read from the backing without waiting for it or
            // copying in (the holder stores them), as with copy-on-read off. A cluster the
            // image lacked when we looked reads as the (unchanging) backing there.
            return self
                .fill_from_backing(&*backing, offset, bufs, missing)
                .await;
        };
        drop(backing);
        let backing = self.backing();
        // Re-check under the lock: a write or another fill may have landed.
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        let now_missing = blocking(move || unallocated_runs(&image, &name, lo, hi - lo)).await?;
        if clip_merged(&now_missing, offset, len) == missing {
            // Nothing landed since the first look (the case of every first touch): the local
            // bytes are in `bufs` already, so fetch the missing clusters whole, copy the
            // request's part of them, and store them.
            let mut fills = Vec::with_capacity(now_missing.len());
            for (at, l) in now_missing {
                let data = fetch_to_store(backing.as_ref(), at, l as usize).await?;
                let (s, e) = (at.max(offset), (at + l).min(offset + len));
                if s < e {
                    bufs.copy_in(
                        (s - offset) as usize,
                        &data[(s - at) as usize..(e - at) as usize],
                    );
                }
                fills.push((at, data));
            }
            self.store_copy_in(fills, guard).await;
            return Ok(bufs);
        }
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        let (mut wide, wmissing) =
            blocking(move || read_local(&image, &name, vec![0u8; (hi - lo) as usize], lo)).await?;
        let mut fills = Vec::new();
        for (at, l) in wmissing {
            let data = fetch_to_store(backing.as_ref(), at, l as usize).await?;
            let s = (at - lo) as usize;
            wide[s..s + l as usize].copy_from_slice(&data);
            fills.push((at, data));
        }
        self.store_copy_in(fills, guard).await;
        let s = (offset - lo) as usize;
        bufs.copy_in(0, &wide[s..s + len as usize]);
        Ok(bufs)
    }

    /// [`BlockDevice::read_mapped`]: one blocking hop maps the range and, when the image
    /// answers it alone (no unallocated cluster over a backing), reads it in the same hop.
    async fn guest_read_mapped(&self, offset: u64, buf: PoolBuf) -> Result<MappedRead> {
        self.check_read(offset, buf.len() as u64)?;
        // Without a backing (none, or its link dropped) unallocated clusters read as zeros.
        let has_backing = self.backing().is_some();
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        blocking(move || {
            let mut buf = buf;
            let extents = image
                .map(GuestOffset(offset), buf.len() as u64)
                .map_err(Error::qed(&name))?;
            if has_backing && extents.iter().any(|e| e.mapping == Mapping::Unallocated) {
                return Ok(Err(buf));
            }
            for (at, l) in read_local_into(&image, &name, &mut buf, offset)? {
                let s = (at - offset) as usize;
                buf[s..s + l as usize].fill(0);
            }
            let mut status = Vec::with_capacity(extents.len());
            for e in extents {
                let kind = match e.mapping {
                    Mapping::Data(_) => Status::Data,
                    Mapping::Zero | Mapping::Unallocated => Status::Zero,
                };
                let extent = StatusExtent {
                    offset: e.offset.0,
                    length: e.length,
                    status: kind,
                };
                push_extent(&mut status, extent);
            }
            Ok(Ok((buf, status)))
        })
        .await
    }

    /// Fills the `missing` ranges of a read at `offset` from `backing`, copying nothing in.
    async fn fill_from_backing(
        &self,
        backing: &dyn BlockDevice,
        offset: u64,
        mut bufs: IoBufs,
        missing: Vec<(u64, u64)>,
    ) -> Result<IoBufs> {
        for (at, l) in missing {
            let data = match read_padded(backing, at, l as usize).await {
                Ok(d) => d,
                // The link was dropped under us (the stream finished): what the image
                // lacks now reads as zeros, which is what the backing held there.
                Err(_) if self.backing().is_none() => vec![0u8; l as usize],
                Err(e) => return Err(e),
            };
            bufs.copy_in((at - offset) as usize, &data);
        }
        Ok(bufs)
    }

    /// Stores what a guest read fetched (whole clusters, under its range lock, held until
    /// stored), after the read returns: it joins the device's copy-in queue, stored in
    /// batches with one flush each on the blocking pool while the data goes to the guest
    /// (within [`COPY_IN_BUDGET`]; beyond it the read stores its copy-in alone before it
    /// returns). See [`crate::copy_in`]. A failure to store (a full disk) does not fail the
    /// read, which already holds the right bytes: it is counted ([`CorStats::cor_failures`])
    /// and logged, and the clusters stay unallocated (the image's crash-safe order links
    /// nothing whose data was not written). [`CorDevice::settle_copy_ins`] waits for the
    /// stores of reads that returned; `close` does too.
    async fn store_copy_in(&self, fills: Vec<(u64, PoolBuf)>, guard: RangeGuard) {
        let bytes: usize = fills.iter().map(|(_, d)| d.len()).sum();
        let budget = u32::try_from(bytes).ok().and_then(|n| {
            Arc::clone(&self.copy_in_budget)
                .try_acquire_many_owned(n)
                .ok()
        });
        let background = budget.is_some();
        let copy_in = CopyIn {
            fills,
            guard,
            budget,
        };
        if background {
            self.copy_ins.queue(copy_in);
        } else {
            let copy_ins = Arc::clone(&self.copy_ins);
            let _ = blocking(move || {
                copy_ins.store_now(copy_in);
                Ok(())
            })
            .await;
        }
    }

    /// Waits until the copy-ins of guest reads that already returned are stored (or failed).
    pub async fn settle_copy_ins(&self) {
        drop(self.locks.lock_all().await);
    }

    async fn guest_write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.closed.check()?;
        if self.image.is_read_only() {
            return Err(Error::ReadOnly);
        }
        let size = self.size();
        check_range(offset, length, size)?;
        if length == 0 {
            return Ok(());
        }
        let cs = self.cluster_size();
        let end = offset + length;
        let a = offset.div_ceil(cs) * cs;
        let b = if end == size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        if a >= b {
            return self.guest_write(offset, vec![0u8; length as usize]).await;
        }
        if offset < a {
            self.guest_write(offset, vec![0u8; (a - offset) as usize])
                .await?;
        }
        let b_vis = b.min(size);
        let mut pos = a;
        while pos < b_vis {
            let step = (b_vis - pos).min(256 << 20);
            let guard = self.lock(pos, pos + step).await;
            let image = Arc::clone(&self.image);
            let name = self.name.clone();
            blocking(move || {
                let _guard = guard;
                image
                    .write_zeroes(GuestOffset(pos), step)
                    .map_err(Error::qed(&name))
            })
            .await?;
            pos += step;
        }
        if b < end {
            self.guest_write(b, vec![0u8; (end - b) as usize]).await?;
        }
        Ok(())
    }
}

impl Populate for CorDevice {
    fn name(&self) -> &str {
        CorDevice::name(self)
    }

    fn cluster_size(&self) -> u64 {
        CorDevice::cluster_size(self)
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        CorDevice::backing(self)
    }

    fn local_map(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<LocalExtent>> {
        Box::pin(async move {
            self.closed.check()?;
            let extents = CorDevice::local_map(self, offset, length).await?;
            Ok(extents
                .into_iter()
                .map(|e| LocalExtent {
                    offset: e.offset.0,
                    length: e.length,
                    local: e.mapping != Mapping::Unallocated,
                })
                .collect())
        })
    }

    fn populate_range(&self, offset: u64, length: u64) -> IoFuture<'_, PopulateStats> {
        Box::pin(CorDevice::populate_range(self, offset, length))
    }

    fn fetch_range(&self, offset: u64, length: u64, chunks: Chunks) -> IoFuture<'_, Fetched> {
        Box::pin(CorDevice::fetch_range(self, offset, length, chunks))
    }

    fn store_fetched(&self, units: Vec<Fetched>) -> IoFuture<'_, PopulateStats> {
        Box::pin(CorDevice::store_fetched(self, units))
    }

    fn drop_backing_link(&self) -> IoFuture<'_, ()> {
        Box::pin(CorDevice::drop_backing_link(self))
    }
}

impl BlockDevice for CorDevice {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn geometry(&self) -> Geometry {
        Geometry::clustered(1, self.cluster_size())
    }

    fn readv(&self, offset: u64, bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(self.guest_readv(offset, bufs))
    }

    fn read_mapped(&self, offset: u64, buf: PoolBuf) -> IoFuture<'_, MappedRead> {
        Box::pin(self.guest_read_mapped(offset, buf))
    }

    fn read_blocking(&self, offset: u64, bufs: IoBufs) -> Result<BlockingRead> {
        self.check_read(offset, bufs.len() as u64)?;
        let (mut bufs, missing) = read_local_bufs(&self.image, &self.name, bufs, offset)?;
        if missing.is_empty() {
            return Ok(Ok(bufs));
        }
        if self.backing().is_some() {
            // The backing must be asked (and maybe copied in): that is `readv`'s work.
            return Ok(Err(bufs));
        }
        for (at, l) in missing {
            bufs.zero((at - offset) as usize, l as usize);
        }
        Ok(Ok(bufs))
    }

    fn writev(&self, offset: u64, bufs: IoBufs, flags: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(self.guest_writev(offset, bufs, flags))
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(self.guest_write_zeroes(offset, length))
    }

    fn discard(&self, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        // QED cannot free clusters (QEMU's QED driver ignores discard): say so.
        Box::pin(async { Err(Error::Unsupported("discard on a QED image")) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.closed.check()?;
            on_image(&self.image, &self.name, |i| i.flush()).await
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        Box::pin(async move {
            self.closed.check()?;
            let backing = self.backing();
            qed_status(&self.image, &self.name, backing.as_ref(), offset, length).await
        })
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.image.is_read_only();
        Capabilities {
            writable,
            block_status: true,
            fua: writable,
            reconnect: self.reconnect().is_some(),
            ..Capabilities::default()
        }
    }

    fn reconnect(&self) -> Option<Arc<dyn Reconnect>> {
        self.backing().and_then(|b| b.reconnect())
    }

    fn describe(&self) -> String {
        format!("qed+cor {}", self.name)
    }

    fn files(&self) -> Vec<qed::FileId> {
        let mut files: Vec<qed::FileId> = self.image.file_id().into_iter().collect();
        if let Some(b) = self.backing() {
            files.extend(b.files());
        }
        files
    }

    /// Waits for every request in flight (including the blocking I/O of cancelled ones),
    /// flushes the image (which clears NEED_CHECK) and closes the backing.
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if !self.closed.close() {
                return Ok(());
            }
            let guard = self.locks.lock_all().await;
            let image = Arc::clone(&self.image);
            let name = self.name.clone();
            blocking(move || {
                let _guard = guard;
                image.flush().map_err(Error::qed(&name))
            })
            .await?;
            let backing = self.backing();
            if let Some(b) = backing {
                close_backing(&*b).await;
            }
            Ok(())
        })
    }
}
