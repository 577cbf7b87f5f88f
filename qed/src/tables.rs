//! The L1 and L2 tables of an open image: loading, a bounded L2 cache, crash-safe updates, the
//! allocation cursor at the end of the file, and the read API the consistency check walks.
//!
//! This module knows where metadata lives and keeps it consistent; it never reads or writes
//! guest data. Updates follow QEMU's order: the changed 512-byte sectors of an existing L2
//! table, or a new table written whole and flushed before the L1 sector that points at it.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{Error, Result, TableKind};
use crate::layout::{self, Geometry, ENTRY_UNALLOCATED, ENTRY_ZERO, SECTOR};
use crate::storage::Storage;
use crate::types::{GuestCluster, GuestOffset, HostOffset, L1Index};

/// A decoded L2 table (raw entries), shared with the cache and the lookups holding it. An
/// update stores its new entries in place (under the table's lock, after they are written to
/// the file), so a lookup sees each entry old or new, and no update copies the whole table.
#[derive(Clone, Debug)]
pub(crate) struct L2Table(Arc<[AtomicU64]>);

impl L2Table {
    fn new(entries: Vec<u64>) -> L2Table {
        L2Table(entries.into_iter().map(AtomicU64::new).collect())
    }

    /// The raw entry in slot `i`. Panics past the end, as indexing does.
    pub(crate) fn entry(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Acquire)
    }

    /// The number of entries.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The raw entries of slots `range`.
    fn entries(&self, range: std::ops::Range<usize>) -> Vec<u64> {
        self.0[range]
            .iter()
            .map(|e| e.load(Ordering::Acquire))
            .collect()
    }

    /// Sets slot `i` (callers hold the table's update lock).
    fn set(&self, i: usize, raw: u64) {
        self.0[i].store(raw, Ordering::Release);
    }
}

/// The new value of an L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum NewEntry {
    /// The cluster reads as zeros.
    Zero,
    /// The cluster's data is at this (cluster-aligned) file offset.
    Data(HostOffset),
}

impl NewEntry {
    fn to_raw(self) -> u64 {
        match self {
            NewEntry::Zero => ENTRY_ZERO,
            NewEntry::Data(host) => host.0,
        }
    }
}

/// One L2 entry change: which guest cluster, and what it maps to from now on.
pub(crate) type L2Update = (GuestCluster, NewEntry);

/// Cache fills compare a per-shard epoch, so that a table read from disk while an update of
/// the same table ran is not cached over the update.
const EPOCH_SHARDS: usize = 64;

/// A bounded cache of L2 tables, keyed by file offset, least recently used out first.
#[derive(Debug)]
struct L2Cache {
    capacity: usize,
    inner: Mutex<L2CacheInner>,
}

#[derive(Debug, Default)]
struct L2CacheInner {
    tables: HashMap<HostOffset, (L2Table, u64), BuildHasherDefault<OffsetHasher>>,
    tick: u64,
}

/// A cheap hash for cluster-aligned file offsets (the keys of the L2 cache): one multiply
/// instead of SipHash on every lookup. Collisions cannot hurt: the cache holds a few dozen
/// tables, so even a hostile image that chose colliding offsets costs a short probe.
#[derive(Debug, Default)]
struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        // Offsets are multiples of the cluster size: fold the low zero bits away first.
        self.0 = (v ^ (v >> 16)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl L2CacheInner {
    fn insert(&mut self, capacity: usize, offset: HostOffset, table: L2Table) {
        self.tick += 1;
        if !self.tables.contains_key(&offset) && self.tables.len() >= capacity {
            let victim = self
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k);
            if let Some(victim) = victim {
                self.tables.remove(&victim);
            }
        }
        self.tables.insert(offset, (table, self.tick));
    }
}

impl L2Cache {
    fn new(capacity: usize) -> L2Cache {
        L2Cache {
            capacity,
            inner: Mutex::new(L2CacheInner::default()),
        }
    }

    fn get(&self, offset: HostOffset) -> Option<L2Table> {
        let mut inner = self.inner.lock();
        inner.tick += 1;
        let tick = inner.tick;
        inner.tables.get_mut(&offset).map(|(t, used)| {
            *used = tick;
            t.clone()
        })
    }

    /// Stores an updated table and bumps `epoch` in the same critical section, so a fill
    /// that read the old bytes sees the bump and drops them.
    fn replace(&self, offset: HostOffset, table: L2Table, epoch: &AtomicU64) {
        let mut inner = self.inner.lock();
        inner.insert(self.capacity, offset, table);
        epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Caches a table read from disk, unless an update ran since `seen` was taken.
    fn fill(&self, offset: HostOffset, table: L2Table, epoch: &AtomicU64, seen: u64) {
        let mut inner = self.inner.lock();
        if epoch.load(Ordering::Acquire) == seen && !inner.tables.contains_key(&offset) {
            inner.insert(self.capacity, offset, table);
        }
    }

    fn clear(&self) {
        self.inner.lock().tables.clear();
    }

    #[cfg(test)]
    fn cached(&self) -> Vec<HostOffset> {
        let mut v: Vec<_> = self.inner.lock().tables.keys().copied().collect();
        v.sort();
        v
    }
}

/// A lock per L2 table (by L1 index), plus "all tables" for the consistency check. Updates of
/// different tables run concurrently; the L1 table has its own short lock (the `RwLock`
/// around it), and the allocation cursor is an atomic.
#[derive(Debug, Default)]
struct TableLocks {
    state: Mutex<LockState>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct LockState {
    held: HashSet<L1Index>,
    all: bool,
}

/// A held table lock (or all of them); dropping it releases them.
pub(crate) struct TableGuard<'a> {
    locks: &'a TableLocks,
    /// `None` for "all tables".
    table: Option<L1Index>,
}

impl TableLocks {
    fn lock(&self, table: L1Index) -> TableGuard<'_> {
        let mut state = self.state.lock();
        while state.all || state.held.contains(&table) {
            self.released.wait(&mut state);
        }
        state.held.insert(table);
        TableGuard {
            locks: self,
            table: Some(table),
        }
    }

    /// Holds every table: new lockers wait, then this waits for the holders to finish.
    fn lock_all(&self) -> TableGuard<'_> {
        let mut state = self.state.lock();
        while state.all {
            self.released.wait(&mut state);
        }
        state.all = true;
        while !state.held.is_empty() {
            self.released.wait(&mut state);
        }
        TableGuard {
            locks: self,
            table: None,
        }
    }
}

impl Drop for TableGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.locks.state.lock();
        match self.table {
            Some(table) => {
                state.held.remove(&table);
            }
            None => state.all = false,
        }
        self.locks.released.notify_all();
    }
}

/// A failed [`Tables::update_tracked`].
#[derive(Debug)]
pub(crate) struct UpdateFailure {
    /// Why.
    pub(crate) error: Error,
    /// The index of the first update that no table on disk reflects, in part or whole: the
    /// updates from here on were never written, so the clusters only they name are free.
    pub(crate) unwritten_from: usize,
}

/// A failed update of one table: whether a write that points at something (an L2 sector,
/// an L1 sector) was attempted, so that the disk may hold part of it.
#[derive(Debug)]
struct TableFailure {
    error: Error,
    reference_written: bool,
}

impl TableFailure {
    /// Failed before anything on disk could point at the new clusters.
    fn before(error: Error) -> TableFailure {
        TableFailure {
            error,
            reference_written: false,
        }
    }

    /// Failed writing a reference: part of it may be on disk.
    fn after(error: Error) -> TableFailure {
        TableFailure {
            error,
            reference_written: true,
        }
    }
}

/// The tables of one open image.
#[derive(Debug)]
pub(crate) struct Tables {
    storage: Arc<dyn Storage>,
    geometry: Geometry,
    /// File offset of the L1 table (fixed for the life of the image).
    l1_offset: HostOffset,
    l1: RwLock<Vec<u64>>,
    cache: L2Cache,
    epochs: Box<[AtomicU64]>,
    locks: TableLocks,
    /// Where the next allocation goes: the file length rounded down to a cluster, then grown.
    file_end: AtomicU64,
    /// Held by every allocation and release, so that a release that shrinks the file never
    /// races an allocation past it. Holds the runs (`start..end`) whose writes failed and that
    /// could not be given back yet because a later allocation lies above them.
    abandoned: Mutex<Vec<(u64, u64)>>,
}

impl Tables {
    /// Reads the L1 table at `l1_offset` of a file `file_len` bytes long.
    pub(crate) fn load(
        storage: Arc<dyn Storage>,
        geometry: Geometry,
        l1_offset: HostOffset,
        file_len: u64,
        cache_tables: usize,
    ) -> Result<Tables> {
        let mut l1_bytes = vec![0u8; geometry.table_bytes() as usize];
        storage
            .read_at(&mut l1_bytes, l1_offset.0)
            .map_err(Error::io("reading L1 table", l1_offset.0))?;
        let budget = ((256u64 << 20) / geometry.table_bytes()).max(1) as usize;
        Ok(Tables {
            l1: RwLock::new(layout::decode_table(&l1_bytes)),
            storage,
            geometry,
            l1_offset,
            cache: L2Cache::new(cache_tables.clamp(1, budget)),
            epochs: (0..EPOCH_SHARDS).map(|_| AtomicU64::new(0)).collect(),
            locks: TableLocks::default(),
            file_end: AtomicU64::new(geometry.round_down_to_cluster(file_len)),
            abandoned: Mutex::new(Vec::new()),
        })
    }

    /// The image geometry.
    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The L1 table's file offset.
    pub(crate) fn l1_offset(&self) -> HostOffset {
        self.l1_offset
    }

    /// The file length the allocator works with (a whole number of clusters).
    pub(crate) fn file_end(&self) -> HostOffset {
        HostOffset(self.file_end.load(Ordering::Acquire))
    }

    /// A read-only image's view of the file's end, moved up to the file's length now: another
    /// process with the image open read-write (`-U` inspection) may have grown the file since
    /// it was opened. True when the end moved.
    pub(crate) fn refresh_file_end(&self) -> io::Result<bool> {
        let now = self.geometry.round_down_to_cluster(self.storage.len()?);
        Ok(self.file_end.fetch_max(now, Ordering::AcqRel) < now)
    }

    /// Reserves `clusters` contiguous clusters: the start of a run given back below a later
    /// allocation when one is long enough (so a full disk's failures do not stay leaks once
    /// space is freed), otherwise at the end of the file.
    pub(crate) fn allocate(&self, clusters: u64) -> HostOffset {
        let bytes = clusters * self.geometry.cluster_size();
        let mut abandoned = self.abandoned.lock();
        if let Some(i) = abandoned.iter().position(|r| r.1 - r.0 >= bytes) {
            let start = abandoned[i].0;
            abandoned[i].0 += bytes;
            if abandoned[i].0 == abandoned[i].1 {
                abandoned.swap_remove(i);
            }
            return HostOffset(start);
        }
        HostOffset(self.file_end.fetch_add(bytes, Ordering::AcqRel))
    }

    /// Gives back `clusters` clusters from `start` (part of an allocation whose writes failed,
    /// never linked by any table): when they are the last allocation in the file (with any
    /// earlier failed runs just below them), the file is truncated to their start and the next
    /// allocation reuses the space, so a full disk leaves no leaked clusters behind. A run
    /// below a later allocation is kept aside and used again by the next allocation it can
    /// hold (until then it is a leak, as QEMU's are for good).
    pub(crate) fn release(&self, start: HostOffset, clusters: u64) -> io::Result<()> {
        if clusters == 0 {
            return Ok(());
        }
        let mut abandoned = self.abandoned.lock();
        abandoned.push((start.0, start.0 + clusters * self.geometry.cluster_size()));
        let top = self.file_end.load(Ordering::Acquire);
        let mut end = top;
        while let Some(run) = abandoned.iter().find(|r| r.1 == end) {
            end = run.0;
        }
        if end == top {
            return Ok(());
        }
        // Shrinking a file needs no space, but may still fail (an I/O error): then the runs
        // stay abandoned and the cursor where it is.
        self.storage.set_len(end)?;
        self.file_end.store(end, Ordering::Release);
        abandoned.retain(|r| r.1 <= end);
        Ok(())
    }

    fn epoch(&self, table: L1Index) -> &AtomicU64 {
        &self.epochs[(table.0 % EPOCH_SHARDS as u64) as usize]
    }

    // ------------------------------------------------------------------------------------
    // Lookups

    /// True when `[offset, offset + len)` overlaps the L1 table.
    fn overlaps_l1(&self, offset: u64, len: u64) -> bool {
        let start = self.l1_offset.0;
        let end = start + self.geometry.table_bytes();
        offset < end && start < offset.saturating_add(len)
    }

    /// QEMU's table-offset test, plus: the table must not lie over the L1 table (its entries
    /// would be read as L2 entries, and an update would overwrite the L1 behind our back).
    fn is_usable_l2_offset(&self, offset: u64) -> bool {
        self.geometry
            .is_valid_table_offset(offset, self.file_end().0)
            && !self.overlaps_l1(offset, self.geometry.table_bytes())
    }

    /// The data offset a raw L2 entry names, if it is usable: QEMU's cluster-offset test,
    /// plus never the L1 table (reads would return metadata, writes would overwrite it).
    pub(crate) fn data_offset(&self, raw: u64, file_end: HostOffset) -> Option<HostOffset> {
        let usable = self.geometry.is_valid_cluster_offset(raw, file_end.0)
            && !self.overlaps_l1(raw, self.geometry.cluster_size());
        usable.then_some(HostOffset(raw))
    }

    /// The usable L2 table offset of an L1 entry, `None` when unallocated.
    fn table_offset(&self, table: L1Index, guest: GuestOffset) -> Result<Option<HostOffset>> {
        let entry = self.l1.read().get(table.0 as usize).copied().unwrap_or(0);
        if entry == ENTRY_UNALLOCATED {
            return Ok(None);
        }
        if !self.is_usable_l2_offset(entry) {
            return Err(Error::InvalidEntry {
                table: TableKind::L1,
                guest: guest.0,
                entry,
            });
        }
        Ok(Some(HostOffset(entry)))
    }

    fn load_l2(&self, table: L1Index, offset: HostOffset) -> Result<L2Table> {
        if let Some(t) = self.cache.get(offset) {
            return Ok(t);
        }
        let epoch = self.epoch(table);
        let seen = epoch.load(Ordering::Acquire);
        let entries = self
            .read_l2(offset)
            .map_err(Error::io("reading L2 table", offset.0))?;
        let entries = L2Table::new(entries);
        self.cache.fill(offset, entries.clone(), epoch, seen);
        Ok(entries)
    }

    /// The L2 table that maps `guest`, or `None` when its L1 entry is unallocated.
    pub(crate) fn l2_for(&self, guest: GuestOffset) -> Result<Option<L2Table>> {
        let table = guest.table(self.geometry);
        match self.table_offset(table, guest)? {
            Some(offset) => self.load_l2(table, offset).map(Some),
            None => Ok(None),
        }
    }

    // ------------------------------------------------------------------------------------
    // Updates

    /// Sets L2 entries, creating L2 tables as needed. `updates` must be sorted by cluster.
    /// Each table is written once: the changed sectors of an existing table, or a new table
    /// whole (then flushed) followed by its L1 sector.
    pub(crate) fn update(&self, updates: &[L2Update]) -> Result<()> {
        self.update_tracked(updates).map_err(|f| f.error)
    }

    /// [`Tables::update`], saying on failure which updates no table on disk can reflect: the
    /// caller may give back the clusters that only those would have linked.
    pub(crate) fn update_tracked(&self, updates: &[L2Update]) -> Result<(), UpdateFailure> {
        debug_assert!(updates.windows(2).all(|w| w[0].0 < w[1].0));
        let g = self.geometry;
        let mut done = 0;
        for group in updates.chunk_by(|a, b| a.0.table(g) == b.0.table(g)) {
            let table = group[0].0.table(g);
            let _lock = self.locks.lock(table);
            if let Err(f) = self.update_table(table, group) {
                let unwritten_from = if f.reference_written {
                    done + group.len()
                } else {
                    done
                };
                return Err(UpdateFailure {
                    error: f.error,
                    unwritten_from,
                });
            }
            done += group.len();
        }
        Ok(())
    }

    /// Updates one table, under its lock.
    fn update_table(&self, table: L1Index, group: &[L2Update]) -> Result<(), TableFailure> {
        let g = self.geometry;
        let epoch = self.epoch(table);
        epoch.fetch_add(1, Ordering::AcqRel);
        let guest = group[0].0.start(g);
        let Some(offset) = self
            .table_offset(table, guest)
            .map_err(TableFailure::before)?
        else {
            let mut entries = vec![ENTRY_UNALLOCATED; g.table_entries() as usize];
            for &(c, e) in group {
                entries[c.slot(g)] = e.to_raw();
            }
            let offset = self.allocate(u64::from(g.table_size()));
            if let Err(e) = self.write_new_table(offset, &entries) {
                // Nothing points at the table: give its clusters back (a full disk).
                if let Err(r) = self.release(offset, u64::from(g.table_size())) {
                    tracing::warn!(error = %r, "could not give back a failed L2 table's clusters");
                }
                return Err(TableFailure::before(e));
            }
            // The L1 sector may be on disk in part: the table stays allocated (a leak at
            // worst) and so do the clusters it names.
            self.write_l1_entry(table, offset)
                .map_err(TableFailure::after)?;
            self.cache.replace(offset, L2Table::new(entries), epoch);
            return Ok(());
        };
        let entries = self.load_l2(table, offset).map_err(TableFailure::before)?;
        // Only the changed sectors are copied, changed and written; the entries in memory
        // change once they are in the file, as a new table would be swapped in then.
        let per_sector = (SECTOR / 8) as usize;
        let s0 = group[0].0.slot(g) / per_sector * per_sector;
        let s1 = (group[group.len() - 1].0.slot(g) / per_sector + 1) * per_sector;
        let mut sectors = entries.entries(s0..s1);
        for &(c, e) in group {
            sectors[c.slot(g) - s0] = e.to_raw();
        }
        let at = offset + s0 as u64 * 8;
        self.storage
            .write_at(&layout::encode_table(&sectors), at.0)
            .map_err(Error::io("writing L2 table", at.0))
            .map_err(TableFailure::after)?;
        for &(c, e) in group {
            entries.set(c.slot(g), e.to_raw());
        }
        self.cache.replace(offset, entries, epoch);
        Ok(())
    }

    /// Writes a new L2 table at `offset`, flushed (before any L1 entry may point at it).
    fn write_new_table(&self, offset: HostOffset, entries: &[u64]) -> Result<()> {
        self.storage
            .write_at(&layout::encode_table(entries), offset.0)
            .and_then(|()| self.storage.flush())
            .map_err(Error::io("writing new L2 table", offset.0))
    }

    /// Points an L1 entry at a new table and writes its 512-byte sector. The L1 lock is held
    /// across the write so that two tables in one sector are written in order. When the write
    /// fails the entry is unallocated again in memory too (the sector on disk is unchanged or
    /// rewritten whole by the next write of it).
    fn write_l1_entry(&self, table: L1Index, offset: HostOffset) -> Result<()> {
        let mut l1 = self.l1.write();
        let slot = table.0 as usize;
        l1[slot] = offset.0;
        let per_sector = (SECTOR / 8) as usize;
        let s0 = slot / per_sector * per_sector;
        let s1 = (s0 + per_sector).min(l1.len());
        let at = self.l1_offset + s0 as u64 * 8;
        let written = self
            .storage
            .write_at(&layout::encode_table(&l1[s0..s1]), at.0)
            .map_err(Error::io("writing L1 table", at.0));
        if written.is_err() {
            l1[slot] = ENTRY_UNALLOCATED;
        }
        written
    }

    // ------------------------------------------------------------------------------------
    // The walk API of the consistency check (callers hold `lock_all`)

    /// Excludes every table update until the guard is dropped.
    pub(crate) fn lock_all(&self) -> TableGuard<'_> {
        self.locks.lock_all()
    }

    /// A snapshot of the L1 table's raw entries.
    pub(crate) fn l1_entries(&self) -> Vec<u64> {
        self.l1.read().clone()
    }

    /// Reads the L2 table at `offset` from the file, bypassing the cache.
    pub(crate) fn read_l2(&self, offset: HostOffset) -> io::Result<Vec<u64>> {
        let mut bytes = vec![0u8; self.geometry.table_bytes() as usize];
        self.storage.read_at(&mut bytes, offset.0)?;
        Ok(layout::decode_table(&bytes))
    }

    /// Writes a whole L2 table at `offset` (a repair). Call [`Tables::invalidate_cache`]
    /// afterwards.
    pub(crate) fn write_l2(&self, offset: HostOffset, entries: &[u64]) -> io::Result<()> {
        self.storage
            .write_at(&layout::encode_table(entries), offset.0)
    }

    /// Replaces the L1 table, on disk and in memory (a repair).
    pub(crate) fn replace_l1(&self, entries: Vec<u64>) -> Result<()> {
        let mut l1 = self.l1.write();
        let at = self.l1_offset.0;
        let written = self
            .storage
            .write_at(&layout::encode_table(&entries), at)
            .map_err(Error::io("writing L1 table", at));
        *l1 = entries;
        written
    }

    /// Drops every cached L2 table (after a repair wrote tables behind the cache).
    pub(crate) fn invalidate_cache(&self) {
        for epoch in self.epochs.iter() {
            epoch.fetch_add(1, Ordering::AcqRel);
        }
        self.cache.clear();
    }

    /// Truncates the file to `end` (a cluster boundary) and moves the allocation cursor
    /// there (reclaiming leaked clusters at the end of the file).
    pub(crate) fn truncate(&self, end: HostOffset) -> io::Result<()> {
        let mut abandoned = self.abandoned.lock();
        self.storage.set_len(end.0)?;
        self.file_end.store(end.0, Ordering::Release);
        abandoned.retain(|r| r.1 <= end.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{writes_in, Op, Recording};

    const CS: u64 = 65536;

    fn tables(cache: usize) -> (Arc<Recording>, Tables) {
        // The tables need only the L1 table (zeros) at CS, in a file of 5 clusters.
        let storage = Arc::new(Recording::default());
        storage.set_len(5 * CS).unwrap();
        storage.take();
        let g = Geometry::new(65536, 4, 1).unwrap();
        let len = storage.len().unwrap();
        let t = Tables::load(storage.clone(), g, HostOffset(CS), len, cache).unwrap();
        (storage, t)
    }

    #[test]
    fn failed_runs_are_given_back_from_the_end_of_the_file_only() {
        let (s, t) = tables(4);
        let a = t.allocate(2);
        let b = t.allocate(3);
        s.set_len(b.0 + 2 * CS).unwrap(); // b's writes stored part of it
        assert_eq!((a.0, b.0), (5 * CS, 7 * CS));
        // a lies below b: it cannot be given back yet.
        t.release(a, 2).unwrap();
        assert_eq!(t.file_end().0, 10 * CS);
        // b is the last run: both go, and the file shrinks to where a began.
        t.release(b, 3).unwrap();
        assert_eq!((t.file_end().0, s.len().unwrap()), (5 * CS, 5 * CS));
        assert_eq!(t.allocate(1).0, 5 * CS, "the space is used again");
        // A run below one that succeeded is a leak until the next allocations use it again.
        let c = t.allocate(1);
        t.release(HostOffset(5 * CS), 1).unwrap();
        assert_eq!(t.file_end().0, c.0 + CS);
        assert_eq!(t.allocate(2).0, c.0 + CS, "too short for two clusters");
        assert_eq!(t.allocate(1).0, 5 * CS, "one fits");
        assert_eq!(t.allocate(1).0, c.0 + 3 * CS);
    }

    fn data(c: u64, host: u64) -> L2Update {
        (GuestCluster(c), NewEntry::Data(HostOffset(host)))
    }

    #[test]
    fn a_new_table_is_written_whole_and_flushed_before_its_l1_sector() {
        let (s, t) = tables(4);
        let per_table = t.geometry().table_entries();
        let host = t.allocate(2).0;
        t.update(&[data(3, host), data(per_table + 1, host + CS)])
            .unwrap();
        let ops = s.take();
        let tb = t.geometry().table_bytes();
        let l1 = t.l1_entries();
        assert_eq!((l1[0], l1[1]), (host + 2 * CS, host + 2 * CS + tb));
        let expected = vec![
            Op::Write {
                offset: l1[0],
                len: tb,
            },
            Op::Flush,
            Op::Write {
                offset: CS,
                len: 512,
            },
            Op::Write {
                offset: l1[1],
                len: tb,
            },
            Op::Flush,
            Op::Write {
                offset: CS,
                len: 512,
            },
        ];
        assert_eq!(ops, expected);
        assert_eq!(t.read_l2(HostOffset(l1[0])).unwrap()[3], host);
        let table = t.l2_for(GuestOffset(per_table * CS)).unwrap().unwrap();
        assert_eq!(table.entry(1), host + CS);
    }

    #[test]
    fn an_existing_table_gets_only_its_changed_sectors() {
        let (s, t) = tables(4);
        t.update(&[(GuestCluster(0), NewEntry::Zero)]).unwrap();
        let table = t.l1_entries()[0];
        s.take();
        t.update(&[
            (GuestCluster(70), NewEntry::Zero),
            (GuestCluster(200), NewEntry::Zero),
        ])
        .unwrap();
        let ops = s.take();
        // Entries 70 and 200 span sectors 1..=3: one write of three sectors, no flush.
        assert_eq!(
            ops,
            vec![Op::Write {
                offset: table + 512,
                len: 1536
            }]
        );
        let cached = t.l2_for(GuestOffset(0)).unwrap().unwrap();
        assert_eq!(
            (cached.entry(0), cached.entry(70), cached.entry(200)),
            (ENTRY_ZERO, ENTRY_ZERO, ENTRY_ZERO)
        );
        assert_eq!(writes_in(&ops, CS, CS + 512), vec![]);
    }

    #[test]
    fn entries_change_in_memory_only_once_written_and_in_place() {
        let (s, t) = tables(4);
        t.update(&[(GuestCluster(0), NewEntry::Zero)]).unwrap();
        let held = t.l2_for(GuestOffset(0)).unwrap().unwrap();
        s.fail_writes(true);
        let failed = t.update(&[(GuestCluster(70), NewEntry::Zero)]);
        assert!(failed.is_err());
        let after = t.l2_for(GuestOffset(0)).unwrap().unwrap();
        assert_eq!(
            after.entry(70),
            ENTRY_UNALLOCATED,
            "a failed write changed memory"
        );
        assert_eq!(held.entry(70), ENTRY_UNALLOCATED);
        s.fail_writes(false);
        t.update(&[(GuestCluster(70), NewEntry::Zero)]).unwrap();
        // A lookup holding the table sees the entry once it is in the file.
        assert_eq!(held.entry(70), ENTRY_ZERO);
        let on_disk = t.read_l2(HostOffset(t.l1_entries()[0])).unwrap();
        assert_eq!(on_disk[70], ENTRY_ZERO);
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_table() {
        let (_s, t) = tables(2);
        let per_table = t.geometry().table_entries();
        for i in 0..3 {
            t.update(&[(GuestCluster(i * per_table), NewEntry::Zero)])
                .unwrap();
        }
        let l1 = t.l1_entries();
        // Tables 1 and 2 are cached (table 0 was evicted when table 2 came in).
        assert_eq!(t.cache.cached(), vec![HostOffset(l1[1]), HostOffset(l1[2])]);
        t.l2_for(GuestOffset(per_table * CS)).unwrap(); // touch table 1
        t.l2_for(GuestOffset(0)).unwrap(); // reload table 0: evicts table 2
        assert_eq!(t.cache.cached(), vec![HostOffset(l1[0]), HostOffset(l1[1])]);
    }

    #[test]
    fn a_fill_that_raced_with_an_update_is_dropped() {
        let cache = L2Cache::new(4);
        let epoch = AtomicU64::new(0);
        let seen = epoch.load(Ordering::Acquire);
        cache.replace(HostOffset(CS), L2Table::new(vec![1]), &epoch);
        cache.clear();
        cache.fill(HostOffset(CS), L2Table::new(vec![0]), &epoch, seen);
        assert!(cache.get(HostOffset(CS)).is_none());
        cache.fill(
            HostOffset(CS),
            L2Table::new(vec![2]),
            &epoch,
            epoch.load(Ordering::Acquire),
        );
        assert_eq!(cache.get(HostOffset(CS)).unwrap().entries(0..1), vec![2]);
    }

    #[test]
    fn l1_entries_over_the_l1_table_are_refused() {
        let (_s, t) = tables(4);
        t.replace_l1({
            let mut l1 = t.l1_entries();
            l1[0] = CS; // the L1 table itself
            l1
        })
        .unwrap();
        assert!(matches!(
            t.l2_for(GuestOffset(0)),
            Err(Error::InvalidEntry {
                table: TableKind::L1,
                ..
            })
        ));
        assert_eq!(t.data_offset(CS, t.file_end()), None);
        assert_eq!(t.data_offset(0x123, t.file_end()), None);
    }

    /// Storage that holds a write into `[slow, slow + len)` until a write into
    /// `[other, other + len)` has started (or fails it after a few seconds).
    #[derive(Debug)]
    struct Rendezvous {
        inner: crate::MemStorage,
        armed: std::sync::atomic::AtomicBool,
        slow: u64,
        other: u64,
        len: u64,
        tx: Mutex<std::sync::mpsc::Sender<()>>,
        rx: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Storage for Rendezvous {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            if self.armed.load(Ordering::Acquire) {
                if (self.other..self.other + self.len).contains(&offset) {
                    self.tx.lock().send(()).unwrap();
                } else if (self.slow..self.slow + self.len).contains(&offset) {
                    let waited = self
                        .rx
                        .lock()
                        .recv_timeout(std::time::Duration::from_secs(5));
                    waited.map_err(|_| io::Error::other("the other table's update never ran"))?;
                }
            }
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
    }

    #[test]
    fn updates_of_different_tables_run_concurrently() {
        let (s, t) = tables(4);
        let g = t.geometry();
        let per_table = g.table_entries();
        t.update(&[(GuestCluster(0), NewEntry::Zero)]).unwrap();
        t.update(&[(GuestCluster(per_table), NewEntry::Zero)])
            .unwrap();
        let l1 = t.l1_entries();
        let (tx, rx) = std::sync::mpsc::channel();
        let storage = Arc::new(Rendezvous {
            inner: crate::MemStorage::from_bytes(s.bytes()),
            armed: std::sync::atomic::AtomicBool::new(false),
            slow: l1[0],
            other: l1[1],
            len: g.table_bytes(),
            tx: Mutex::new(tx),
            rx: Mutex::new(rx),
        });
        let len = storage.len().unwrap();
        let t = Tables::load(storage.clone(), g, HostOffset(CS), len, 4).unwrap();
        storage.armed.store(true, Ordering::Release);
        // The update of table 0 waits inside its write for the update of table 1: with one
        // lock for all tables, table 1 could not start and table 0's write would fail.
        std::thread::scope(|scope| {
            let slow = scope.spawn(|| t.update(&[(GuestCluster(5), NewEntry::Zero)]));
            let other = scope.spawn(|| t.update(&[(GuestCluster(per_table + 5), NewEntry::Zero)]));
            other.join().unwrap().unwrap();
            slow.join().unwrap().unwrap();
        });
        assert_eq!(t.read_l2(HostOffset(l1[0])).unwrap()[5], ENTRY_ZERO);
        assert_eq!(t.read_l2(HostOffset(l1[1])).unwrap()[5], ENTRY_ZERO);
    }

    #[test]
    fn lock_all_waits_for_table_holders_and_holds_new_ones() {
        let locks = TableLocks::default();
        let one = locks.lock(L1Index(1));
        let _two = locks.lock(L1Index(2)); // another table: no wait
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _all = locks.lock_all();
                tx.send(()).unwrap();
            });
            let short = std::time::Duration::from_millis(100);
            assert!(rx.recv_timeout(short).is_err());
            drop(one);
            assert!(rx.recv_timeout(short).is_err());
            drop(_two);
            rx.recv().unwrap();
        });
        let _again = locks.lock(L1Index(1));
    }
}
