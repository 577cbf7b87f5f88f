//! Allocating writes, zero writes and copy-on-read population: the clusters that change state
//! are claimed (see `claims`), new clusters are reserved as one contiguous run at the end of
//! the file, written whole, and only then linked into the L2 tables (one update per table per
//! request).

use super::claims::Claim;
use super::{out_of_range, Image, Mapping, PopulateOutcome};
use crate::error::{Error, Result};
use crate::tables::{L2Update, NewEntry};
use crate::types::{GuestCluster, GuestOffset, HostOffset};

/// Splits sorted guest clusters into runs of consecutive clusters: `(first index, end index)`
/// into `clusters`.
fn consecutive_runs(clusters: &[GuestCluster]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= clusters.len() {
            return None;
        }
        let start = i;
        i += 1;
        while i < clusters.len() && clusters[i].0 == clusters[i - 1].0 + 1 {
            i += 1;
        }
        Some((start, i))
    })
}

/// The L2 updates that link `clusters` to the contiguous run at `host_base`.
fn data_updates(clusters: &[GuestCluster], host_base: HostOffset, cs: u64) -> Vec<L2Update> {
    clusters
        .iter()
        .enumerate()
        .map(|(k, &c)| (c, NewEntry::Data(host_base + k as u64 * cs)))
        .collect()
}

impl Image {
    /// Writes `data` at `offset` of the virtual disk.
    pub fn write_at(&self, data: &[u8], offset: GuestOffset) -> Result<()> {
        let offset = offset.0;
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        // Fast path: everything already allocated, write in place with no lock.
        if self.write_in_place_if_allocated(data, offset)? {
            return Ok(());
        }
        let claim = self.claim_unlinked(offset, data.len() as u64)?;
        self.write_claimed(data, offset, &claim)
    }

    /// The guest clusters of `[offset, offset + len)` (`len > 0`) that are not data, as
    /// looked up now: those a request over the range may have to link.
    fn unlinked_clusters(&self, offset: u64, len: u64) -> Result<Vec<GuestCluster>> {
        let g = self.geometry();
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (mapping, n) = self.lookup_run(GuestOffset(pos), end - pos)?;
            if !matches!(mapping, Mapping::Data(_)) {
                let c0 = GuestOffset(pos).cluster(g).0;
                let c1 = GuestOffset(pos + n - 1).cluster(g).0;
                out.extend((c0..=c1).map(GuestCluster));
            }
            pos += n;
        }
        Ok(out)
    }

    /// Claims the clusters of `[offset, offset + len)` that are not data, waiting for other
    /// holders. Under the claim, the range's non-data clusters are a subset of the claimed
    /// ones (data never becomes anything else) and stay what they are until we link them.
    fn claim_unlinked(&self, offset: u64, len: u64) -> Result<Claim<'_>> {
        let clusters = self.unlinked_clusters(offset, len)?;
        Ok(self.claims.claim_all(clusters))
    }

    /// Writes in place when every byte maps to data. Returns false (having written nothing)
    /// when some part needs allocation.
    fn write_in_place_if_allocated(&self, data: &[u8], offset: u64) -> Result<bool> {
        let mut runs = Vec::new();
        let mut done = 0u64;
        while done < data.len() as u64 {
            let pos = GuestOffset(offset + done);
            let (mapping, len) = self.lookup_run(pos, data.len() as u64 - done)?;
            match mapping {
                Mapping::Data(host) => runs.push((done, len, host)),
                _ => return Ok(false),
            }
            done += len;
        }
        for (start, len, host) in runs {
            self.write_data(
                &data[start as usize..(start + len) as usize],
                host,
                "writing data",
            )?;
        }
        Ok(true)
    }

    fn write_data(&self, data: &[u8], host: HostOffset, what: &'static str) -> Result<()> {
        self.storage
            .write_at(data, host.0)
            .map_err(Error::io(what, host.0))
    }

    /// The body of an allocating write, under its claim: in-place runs are written now, the
    /// rest is allocated as one run, written, and linked.
    fn write_claimed(&self, data: &[u8], offset: u64, claim: &Claim<'_>) -> Result<()> {
        let g = self.geometry();
        let cs = g.cluster_size();
        let end = offset + data.len() as u64;
        let mut to_allocate: Vec<GuestCluster> = Vec::new();
        let mut prior: Vec<Mapping> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (mapping, len) = self.lookup_run(GuestOffset(pos), end - pos)?;
            match mapping {
                Mapping::Data(host) => {
                    let s = (pos - offset) as usize;
                    self.write_data(&data[s..s + len as usize], host, "writing data")?;
                }
                _ => {
                    let c0 = GuestOffset(pos).cluster(g).0;
                    let c1 = GuestOffset(pos + len - 1).cluster(g).0;
                    to_allocate.extend((c0..=c1).map(GuestCluster));
                    prior.extend((c0..=c1).map(|_| mapping));
                }
            }
            pos += len;
        }
        if to_allocate.is_empty() {
            return Ok(());
        }
        debug_assert!(to_allocate.iter().all(|&c| claim.holds(c)));
        self.refuse_backing_gaps(&to_allocate, &prior, offset, end)?;
        let _alloc = self.begin_allocation()?;
        let host_base = self.tables.allocate(to_allocate.len() as u64);
        let stored = consecutive_runs(&to_allocate)
            .into_iter()
            .try_for_each(|(i, j)| {
                let host = host_base + i as u64 * cs;
                self.write_new_run(&to_allocate[i..j], host, data, offset)
            })
            .and_then(|()| self.flush_before_metadata());
        let updates = data_updates(&to_allocate, host_base, cs);
        self.link_or_give_back(stored, &updates, &to_allocate, host_base)
    }

    /// Links the clusters of an allocation of `clusters` at `host_base` (in order, one
    /// cluster each; `stored` says whether their data is on disk) with `updates`. On failure
    /// (a full disk) the clusters no L2 entry on disk can name (all of them when the store
    /// failed) go back to the allocator, so they do not stay behind as leaks.
    fn link_or_give_back(
        &self,
        stored: Result<()>,
        updates: &[L2Update],
        clusters: &[GuestCluster],
        host_base: HostOffset,
    ) -> Result<()> {
        let (error, unwritten_from) = match stored {
            Err(e) => (e, 0),
            Ok(()) => match self.tables.update_tracked(updates) {
                Ok(()) => return Ok(()),
                Err(f) => (f.error, f.unwritten_from),
            },
        };
        // Updates are sorted by guest cluster and the run's hosts follow its guest order, so
        // the clusters left unwritten are a suffix of the run.
        let first_free = updates
            .get(unwritten_from)
            .map_or(clusters.len(), |&(c, _)| {
                clusters.partition_point(|&d| d < c)
            });
        let cs = self.geometry().cluster_size();
        let from = host_base + first_free as u64 * cs;
        let rest = (clusters.len() - first_free) as u64;
        if let Err(r) = self.tables.release(from, rest) {
            tracing::warn!(error = %r, "could not give back the clusters of a failed write");
        }
        Err(error)
    }

    /// With a backing file, a new cluster that the write `[offset, end)` covers only in part
    /// (within the disk) and that was unallocated would need the backing's bytes for the rest:
    /// the image never reads them, so that is an error (copy the cluster up first with
    /// [`Image::populate_as_data`], as the copy-on-read device does).
    fn refuse_backing_gaps(
        &self,
        clusters: &[GuestCluster],
        prior: &[Mapping],
        offset: u64,
        end: u64,
    ) -> Result<()> {
        if !self.state.lock().header.has_backing_file() {
            return Ok(());
        }
        let g = self.geometry();
        let size = self.size();
        for (&c, &m) in clusters.iter().zip(prior) {
            let (cs, ce) = (c.start(g).0, c.next().start(g).0.min(size));
            if m == Mapping::Unallocated && (offset > cs || end < ce) {
                return Err(self.needs_backing(c.start(g)));
            }
        }
        Ok(())
    }

    /// Writes the new clusters of one guest-contiguous run to `host`: payload from `data`
    /// where it covers, zeros in the gaps (see `write_partial_cluster`). At most three writes: head cluster, middle, tail cluster.
    fn write_new_run(
        &self,
        run: &[GuestCluster],
        host: HostOffset,
        data: &[u8],
        offset: u64,
    ) -> Result<()> {
        let g = self.geometry();
        let cs = g.cluster_size();
        let data_end = offset + data.len() as u64;
        let mut c = 0usize;
        while c < run.len() {
            let cg = run[c].start(g).0;
            let at = host + c as u64 * cs;
            if offset > cg || data_end < cg + cs {
                self.write_partial_cluster(GuestOffset(cg), at, data, offset)?;
                c += 1;
                continue;
            }
            // A run of fully covered clusters: write straight from the caller's buffer.
            let mut k = c;
            while k < run.len() && run[k].start(g).0 + cs <= data_end {
                k += 1;
            }
            let s = (cg - offset) as usize;
            let e = s + (k - c) * cs as usize;
            self.write_data(&data[s..e], at, "writing new clusters")?;
            c = k;
        }
        Ok(())
    }

    /// Writes one new cluster that `data` covers only in part, the rest zeros: the cluster
    /// was a zero cluster, or unallocated without a backing file, or (`refuse_backing_gaps`
    /// made sure) the rest lies past the disk's end.
    fn write_partial_cluster(
        &self,
        cluster: GuestOffset,
        host: HostOffset,
        data: &[u8],
        offset: u64,
    ) -> Result<()> {
        let cs = self.geometry().cluster_size();
        let cg = cluster.0;
        let mut buf = vec![0u8; cs as usize];
        let lo = offset.max(cg);
        let hi = (offset + data.len() as u64).min(cg + cs);
        buf[(lo - cg) as usize..(hi - cg) as usize]
            .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
        self.write_data(&buf, host, "writing new cluster")
    }

    /// Writes zeros over `[offset, offset + length)`. Whole clusters that are unallocated
    /// become zero clusters (no storage); zero clusters stay; allocated clusters get zeros
    /// written in place. Partial clusters at the edges are ordinary writes of zeros.
    pub fn write_zeroes(&self, offset: GuestOffset, length: u64) -> Result<()> {
        let offset = offset.0;
        self.check_writable()?;
        self.check_range(offset, length)?;
        let g = self.geometry();
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
        // Whole clusters, in batches bounded to one L2 table at a time.
        let b_vis = b.min(size);
        let mut pos = a;
        while pos < b_vis {
            let batch_end = ((pos / g.l2_span() + 1) * g.l2_span())
                .min(b_vis)
                .min(pos + (256 << 20));
            self.zero_whole_clusters(pos, batch_end)?;
            pos = batch_end;
        }
        if b < end {
            self.write_zero_bytes(b, end - b)?;
        }
        Ok(())
    }

    /// Zeroes whole clusters `[pos, end)` (within one L2 table), under the claim of those that
    /// are not data.
    fn zero_whole_clusters(&self, pos: u64, end: u64) -> Result<()> {
        let g = self.geometry();
        let claim = self.claim_unlinked(pos, end - pos)?;
        let mut updates: Vec<L2Update> = Vec::new();
        let mut p = pos;
        while p < end {
            let (mapping, len) = self.lookup_run(GuestOffset(p), end - p)?;
            match mapping {
                Mapping::Data(host) => self.write_zero_data(host, len)?,
                Mapping::Zero => {}
                Mapping::Unallocated => {
                    let k0 = GuestOffset(p).cluster(g).0;
                    let k1 = GuestOffset(p + len - 1).cluster(g).0;
                    updates.extend((k0..=k1).map(|k| (GuestCluster(k), NewEntry::Zero)));
                }
            }
            p += len;
        }
        if !updates.is_empty() {
            debug_assert!(updates.iter().all(|&(c, _)| claim.holds(c)));
            let _alloc = self.begin_allocation()?;
            self.tables.update(&updates)?;
        }
        Ok(())
    }

    fn write_zero_data(&self, host: HostOffset, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_data(&zeros[..n as usize], host + done, "writing zeros")?;
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
            self.write_at(&zeros[..n as usize], GuestOffset(offset + done))?;
            done += n;
        }
        Ok(())
    }

    /// Copy-on-read and streaming: stores `data` (whole clusters starting at the
    /// cluster-aligned `offset`; the last may stop at the disk's end or run to its cluster's
    /// end) into the clusters that
    /// are still unallocated and that no other request has claimed (re-checked under our
    /// claim), so a guest write that got there first is never overwritten. All-zero clusters become zero clusters when
    /// `zero_clusters` is set and are left unallocated otherwise; they are never stored as
    /// data.
    pub fn populate(
        &self,
        offset: GuestOffset,
        data: &[u8],
        zero_clusters: bool,
    ) -> Result<PopulateOutcome> {
        let zeros = if zero_clusters {
            Zeros::ZeroCluster
        } else {
            Zeros::Leave
        };
        self.populate_with(offset, data, zeros)
    }

    /// As [`Image::populate`], but every cluster is stored as data, all-zero ones too: what a
    /// guest write that covers part of an unallocated cluster leaves, in QEMU and here (the
    /// copy-on-read device merges it with the backing and stores it this way).
    pub fn populate_as_data(&self, offset: GuestOffset, data: &[u8]) -> Result<PopulateOutcome> {
        self.populate_with(offset, data, Zeros::Data)
    }

    /// Populates several pieces at once, each as [`Image::populate`] would (cluster-aligned
    /// guest offset, whole clusters, the last piece may end at the disk's end), with one
    /// allocation, **one flush** and one round of L2 updates for them all: every piece's data
    /// is written, then flushed, and only then linked (an existing table's sectors in place,
    /// a new table written whole and flushed before its L1 sector), the crash order of a single
    /// populate. Pieces must be in ascending order and must not overlap. The stream commits
    /// its batches this way, so that a batch of units shares one `fdatasync`.
    pub fn populate_batch(
        &self,
        pieces: &[(GuestOffset, &[u8])],
        zero_clusters: bool,
    ) -> Result<PopulateOutcome> {
        let zeros = if zero_clusters {
            Zeros::ZeroCluster
        } else {
            Zeros::Leave
        };
        self.populate_pieces(pieces, zeros)
    }

    fn populate_with(
        &self,
        offset: GuestOffset,
        data: &[u8],
        zeros: Zeros,
    ) -> Result<PopulateOutcome> {
        self.populate_pieces(&[(offset, data)], zeros)
    }

    /// Checks that a populate of `len` bytes at `offset` covers whole clusters of the disk.
    fn check_populate_piece(&self, offset: u64, len: u64) -> Result<()> {
        let g = self.geometry();
        let size = self.size();
        let end = offset.saturating_add(len);
        // The last cluster may also run on past the disk's end (QEMU keeps the backing's
        // bytes there).
        if !(end <= size || offset < size && end == g.round_up_to_cluster(size)) {
            return Err(out_of_range(offset, len, size));
        }
        if g.offset_in_cluster(offset) != 0 {
            return Err(Error::InvalidOptions(
                "populate needs a cluster-aligned offset",
            ));
        }
        if g.offset_in_cluster(end) != 0 && end != size {
            return Err(Error::InvalidOptions("populate needs whole clusters"));
        }
        Ok(())
    }

    /// Checks every piece, and that they ascend without overlapping.
    fn check_populate_pieces(&self, pieces: &[(GuestOffset, &[u8])]) -> Result<()> {
        let mut prev_end = 0u64;
        for (i, &(offset, data)) in pieces.iter().enumerate() {
            self.check_populate_piece(offset.0, data.len() as u64)?;
            if i > 0 && offset.0 < prev_end {
                return Err(Error::InvalidOptions(
                    "populate pieces must ascend without overlapping",
                ));
            }
            prev_end = offset.0 + data.len() as u64;
        }
        Ok(())
    }

    fn populate_pieces(
        &self,
        pieces: &[(GuestOffset, &[u8])],
        zeros: Zeros,
    ) -> Result<PopulateOutcome> {
        self.check_writable()?;
        self.check_populate_pieces(pieces)?;
        let pieces: Vec<(u64, &[u8])> = pieces
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .map(|&(o, d)| (o.0, d))
            .collect();
        if pieces.is_empty() {
            return Ok(PopulateOutcome::default());
        }
        let mut wanted = Vec::new();
        for &(offset, data) in &pieces {
            wanted.extend(self.unlinked_clusters(offset, data.len() as u64)?);
        }
        let claim = self.claims.claim_free(&wanted);
        let mut outcome = PopulateOutcome::default();
        let mut updates = Vec::new();
        let mut plans = Vec::with_capacity(pieces.len());
        for &(offset, data) in &pieces {
            let plan = self.plan_populate(offset, data, zeros, &claim)?;
            outcome.written += plan.outcome.written;
            outcome.zeroed += plan.outcome.zeroed;
            outcome.skipped += plan.outcome.skipped;
            updates.extend(plan.updates);
            plans.push(plan.data_clusters);
        }
        let clusters: Vec<GuestCluster> = plans.iter().flatten().copied().collect();
        if clusters.is_empty() && updates.is_empty() {
            return Ok(outcome);
        }
        let _alloc = self.begin_allocation()?;
        if clusters.is_empty() {
            self.tables.update(&updates)?;
            return Ok(outcome);
        }
        let cs = self.geometry().cluster_size();
        let host_base = self.tables.allocate(clusters.len() as u64);
        let stored = self
            .store_pieces(&pieces, &plans, host_base)
            .and_then(|()| self.flush_before_metadata());
        updates.extend(data_updates(&clusters, host_base, cs));
        updates.sort_unstable();
        self.link_or_give_back(stored, &updates, &clusters, host_base)?;
        Ok(outcome)
    }

    /// Writes the data clusters of every piece (`plans[i]` for `pieces[i]`) as one run at
    /// `host_base`, in order, without a flush.
    fn store_pieces(
        &self,
        pieces: &[(u64, &[u8])],
        plans: &[Vec<GuestCluster>],
        host_base: HostOffset,
    ) -> Result<()> {
        let cs = self.geometry().cluster_size();
        let mut host = host_base;
        for (&(offset, data), clusters) in pieces.iter().zip(plans) {
            if clusters.is_empty() {
                continue;
            }
            self.store_populated(clusters, host, offset, data)?;
            host = host + clusters.len() as u64 * cs;
        }
        Ok(())
    }

    /// Which clusters of a populate are still unallocated and ours, and what becomes of each.
    fn plan_populate(
        &self,
        offset: u64,
        data: &[u8],
        zeros: Zeros,
        claim: &Claim<'_>,
    ) -> Result<Populate> {
        let g = self.geometry();
        let cs = g.cluster_size();
        let end = offset + data.len() as u64;
        let mut plan = Populate::default();
        let mut pos = offset;
        while pos < end {
            let (mapping, len) = self.lookup_run(GuestOffset(pos), end - pos)?;
            if mapping != Mapping::Unallocated {
                plan.outcome.skipped += len;
                pos += len;
                continue;
            }
            for p in (pos..pos + len).step_by(cs as usize) {
                let n = cs.min(end - p);
                let chunk = &data[(p - offset) as usize..(p - offset + n) as usize];
                let c = GuestOffset(p).cluster(g);
                if !claim.holds(c) {
                    plan.outcome.skipped += n; // another request is linking it
                } else if zeros == Zeros::Data || chunk.iter().any(|&b| b != 0) {
                    plan.data_clusters.push(c);
                    plan.outcome.written += n;
                } else if zeros == Zeros::ZeroCluster {
                    plan.updates.push((c, NewEntry::Zero));
                    plan.outcome.zeroed += n;
                } else {
                    plan.outcome.skipped += n;
                }
            }
            pos += len;
        }
        Ok(plan)
    }

    /// Writes the data clusters of one populated piece as one run at `host_base`, the
    /// clusters allocated for them (the last cluster padded with zeros). The caller flushes.
    fn store_populated(
        &self,
        clusters: &[GuestCluster],
        host_base: HostOffset,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let g = self.geometry();
        let cs = g.cluster_size();
        for (i, j) in consecutive_runs(clusters) {
            let gs = clusters[i].start(g).0 - offset;
            let ge = (clusters[j - 1].next().start(g).0 - offset).min(data.len() as u64);
            let host = host_base + i as u64 * cs;
            let chunk = &data[gs as usize..ge as usize];
            self.write_data(chunk, host, "writing populated clusters")?;
            let tail = (j - i) as u64 * cs - chunk.len() as u64;
            if tail > 0 {
                let zeros = vec![0u8; tail as usize];
                let at = host + chunk.len() as u64;
                self.write_data(&zeros, at, "writing populated clusters")?;
            }
        }
        Ok(())
    }
}

/// What a populate does with an all-zero cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Zeros {
    /// Leave it unallocated.
    Leave,
    /// Make it a zero cluster.
    ZeroCluster,
    /// Store it as data.
    Data,
}

/// What a populate will do, decided under its claim.
#[derive(Debug, Default)]
struct Populate {
    data_clusters: Vec<GuestCluster>,
    updates: Vec<L2Update>,
    outcome: PopulateOutcome,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        image, image_over_pattern, write_over_pattern, writes_in, Filling, Op, Pattern,
    };
    use crate::{Error, Storage};
    use std::sync::Arc;

    const CS: u64 = 65536;

    fn host_of(image: &Image, guest: u64) -> u64 {
        match image.mapping_at(GuestOffset(guest), 1).unwrap().0 {
            Mapping::Data(h) => h.0,
            other => panic!("{guest:#x} maps to {other:?}"),
        }
    }

    /// An image over the pattern on a [`Filling`] storage, its file `room` bytes short of
    /// growing any more.
    fn full_image(room: u64) -> (Arc<Filling>, Image) {
        full_image_of(16 << 20, room)
    }

    /// [`full_image`] of `size` bytes.
    fn full_image_of(size: u64, room: u64) -> (Arc<Filling>, Image) {
        let storage = Filling::with_image(&crate::CreateOptions::new(size));
        let image = Image::open(Box::new(Arc::clone(&storage)), Default::default()).unwrap();
        image
            .set_backing(Some(("pattern", crate::BackingFormat::Raw)))
            .unwrap();
        storage.set_limit(storage.len().unwrap() + room);
        (storage, image)
    }

    fn pattern_at(offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len).map(Pattern::byte).collect()
    }

    fn leaks(image: &Image) -> u64 {
        let report = image.check(crate::Repair::None).unwrap();
        assert_eq!(
            (report.corruptions, report.check_errors),
            (0, 0),
            "{report:?}"
        );
        report.leaks
    }

    fn is_eio(e: &Error) -> bool {
        matches!(e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EIO))
    }

    fn is_enospc(e: &Error) -> bool {
        matches!(e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }

    #[test]
    fn a_populate_on_a_full_disk_gives_its_clusters_back() {
        // Room for 1.5 clusters: the 4-cluster data run is stored in part, then fails.
        let (s, image) = full_image(CS + CS / 2);
        let len = s.len().unwrap();
        let e = image
            .populate(GuestOffset(0), &pattern_at(0, 4 * CS), true)
            .unwrap_err();
        assert!(is_enospc(&e), "{e}");
        assert_eq!(s.len().unwrap(), len, "the partial run is truncated away");
        assert_eq!(
            image.mapping_at(GuestOffset(0), 1).unwrap().0,
            Mapping::Unallocated
        );
        assert_eq!(leaks(&image), 0);
        // Space freed: the same populate succeeds where the failed one would have gone.
        s.set_limit(u64::MAX);
        image
            .populate(GuestOffset(0), &pattern_at(0, 4 * CS), true)
            .unwrap();
        assert_eq!(host_of(&image, 0), len);
        assert_eq!(leaks(&image), 0);
    }

    #[test]
    fn a_new_l2_table_that_does_not_fit_is_given_back_with_the_data() {
        // The data (2 clusters) fits, its new L2 table (4 clusters) does not.
        let (s, image) = full_image(3 * CS);
        let len = s.len().unwrap();
        let e = image
            .populate(GuestOffset(0), &pattern_at(0, 2 * CS), true)
            .unwrap_err();
        assert!(is_enospc(&e), "{e}");
        assert_eq!(s.len().unwrap(), len);
        assert_eq!(image.tables.l1_entries()[0], 0, "no table linked in memory");
        assert_eq!(leaks(&image), 0);
        s.set_limit(u64::MAX);
        image
            .populate(GuestOffset(0), &pattern_at(0, 2 * CS), true)
            .unwrap();
        let mut buf = vec![0u8; 2 * CS as usize];
        image.read_at(&mut buf, GuestOffset(0)).unwrap();
        assert_eq!(buf, pattern_at(0, 2 * CS));
        assert_eq!(leaks(&image), 0);
    }

    #[test]
    fn clusters_a_failed_table_write_may_name_are_kept() {
        // Two L2 tables' worth of disk (2 GiB each with 4-cluster tables).
        let (s, image) = full_image_of(5 << 30, u64::MAX / 2);
        // An L2 table exists; cluster 5's entry is updated in place, and that write fails.
        image
            .populate(GuestOffset(0), &pattern_at(0, CS), true)
            .unwrap();
        let table = image.tables.l1_entries()[0];
        s.break_at(table + 5 * 8);
        let len = s.len().unwrap();
        let e = image
            .populate(GuestOffset(5 * CS), &pattern_at(5 * CS, CS), true)
            .unwrap_err();
        assert!(is_eio(&e), "{e}");
        // The sector may be on disk in part: its data cluster stays (a leak, never a
        // dangling entry).
        assert_eq!(s.len().unwrap(), len + CS);
        assert_eq!(leaks(&image), 1);
        // The same with a new table whose L1 sector write fails: table and data stay.
        let l1 = image.tables.l1_offset().0;
        s.break_at(l1 + 8);
        let len = s.len().unwrap();
        let second_table = image.geometry().l2_span();
        let e = image
            .populate(
                GuestOffset(second_table),
                &pattern_at(second_table, CS),
                true,
            )
            .unwrap_err();
        assert!(is_eio(&e), "{e}");
        let table_clusters = u64::from(image.geometry().table_size());
        assert_eq!(s.len().unwrap(), len + (1 + table_clusters) * CS);
        assert_eq!(image.tables.l1_entries()[1], 0, "unlinked in memory");
        assert_eq!(leaks(&image), 1 + 1 + table_clusters);
    }

    #[test]
    fn an_allocating_write_on_a_full_disk_gives_its_clusters_back() {
        let (s, image) = full_image(CS / 2);
        let len = s.len().unwrap();
        let e = image
            .write_at(&vec![7u8; 3 * CS as usize], GuestOffset(5 * CS))
            .unwrap_err();
        assert!(is_enospc(&e), "{e}");
        assert_eq!(s.len().unwrap(), len);
        assert_eq!(leaks(&image), 0);
    }

    #[test]
    fn one_request_allocates_one_contiguous_run() {
        let (_s, image) = image(16 << 20);
        image
            .write_at(&[1u8; 10], crate::GuestOffset(2 * CS))
            .unwrap(); // cluster 2 allocated first
                       // Clusters 0..=4, with 2 already allocated: 0, 1, 3, 4 are new and contiguous.
        image
            .write_at(&vec![5u8; 5 * CS as usize], crate::GuestOffset(0))
            .unwrap();
        let base = host_of(&image, 0);
        assert_eq!(host_of(&image, CS), base + CS);
        assert_eq!(host_of(&image, 3 * CS), base + 2 * CS);
        assert_eq!(host_of(&image, 4 * CS), base + 3 * CS);
        assert!(host_of(&image, 2 * CS) < base);
    }

    #[test]
    fn each_l2_table_is_written_once_per_request() {
        let (s, image) = image(16 << 20);
        image.write_at(&[1u8], crate::GuestOffset(0)).unwrap(); // creates the first L2 table
        let table = image.tables.l1_entries()[0];
        let table_end = table + image.geometry().table_bytes();
        s.take();
        // 16 clusters, entries 60..76: two sectors of the table, one write.
        image
            .write_at(&vec![2u8; 16 * CS as usize], crate::GuestOffset(60 * CS))
            .unwrap();
        let ops = s.take();
        assert_eq!(writes_in(&ops, table, table_end).len(), 1, "{ops:?}");
        assert_eq!(
            writes_in(&ops, table, table_end)[0],
            Op::Write {
                offset: table,
                len: 1024
            }
        );
    }

    #[test]
    fn partial_clusters_are_filled_from_the_backing_and_flushed_before_the_l2_update() {
        let (s, image) = image_over_pattern(16 << 20);
        write_over_pattern(&image, &[0xeeu8; 100], CS + 1000);
        let ops = s.take();
        let host = host_of(&image, CS);
        let mut buf = vec![0u8; CS as usize];
        image.storage().read_at(&mut buf, host).unwrap();
        assert_eq!(buf[999], Pattern::byte(CS + 999));
        assert_eq!(&buf[1000..1100], &[0xeeu8; 100]);
        assert_eq!(buf[1100], Pattern::byte(CS + 1100));
        // Order: the data cluster, a flush, then the new L2 table (flushed) and its L1 sector.
        let table = image.tables.l1_entries()[0];
        let at = |target: u64| {
            ops.iter()
                .position(|o| matches!(*o, Op::Write { offset, .. } if offset == target))
                .unwrap()
        };
        let (data, table_write, l1_write) = (at(host), at(table), at(image.tables.l1_offset().0));
        assert!(data < table_write && table_write < l1_write, "{ops:?}");
        assert!(ops[data..table_write].contains(&Op::Flush), "{ops:?}");
        assert!(ops[table_write..l1_write].contains(&Op::Flush), "{ops:?}");
    }

    #[test]
    fn write_zeroes_makes_zero_clusters_without_storage() {
        let (_s, image) = image(16 << 20);
        let end = image.file_end();
        image.write_zeroes(crate::GuestOffset(CS), 4 * CS).unwrap();
        assert_eq!(
            image.mapping_at(GuestOffset(CS), 4 * CS).unwrap(),
            (Mapping::Zero, 4 * CS)
        );
        // Only the new L2 table was allocated, no data cluster.
        assert_eq!(
            image.file_end(),
            end + u64::from(image.geometry().table_size()) * CS
        );
        // An allocated cluster is zeroed in place and stays data.
        image
            .write_at(&[3u8; 10], crate::GuestOffset(8 * CS))
            .unwrap();
        image.write_zeroes(crate::GuestOffset(8 * CS), CS).unwrap();
        let mut buf = [1u8; 10];
        image.read_at(&mut buf, crate::GuestOffset(8 * CS)).unwrap();
        assert_eq!(buf, [0u8; 10]);
        assert!(matches!(
            image.mapping_at(GuestOffset(8 * CS), 1).unwrap().0,
            Mapping::Data(_)
        ));
    }

    #[test]
    fn populate_never_overwrites_and_zero_clusters_stay_unstored() {
        let (_s, image) = image(16 << 20);
        image.write_at(&[8u8; 1], crate::GuestOffset(CS)).unwrap();
        let mut data = vec![4u8; 3 * CS as usize];
        data[2 * CS as usize..].fill(0);
        let out = image.populate(GuestOffset(0), &data, true).unwrap();
        assert_eq!(
            out,
            PopulateOutcome {
                written: CS,
                zeroed: CS,
                skipped: CS
            }
        );
        let mut b = [0u8; 2];
        image.read_at(&mut b, crate::GuestOffset(CS)).unwrap();
        assert_eq!(b, [8, 0]);
        assert_eq!(
            image.mapping_at(GuestOffset(2 * CS), 1).unwrap().0,
            Mapping::Zero
        );
        let again = image.populate(GuestOffset(0), &data, false).unwrap();
        assert_eq!(again.skipped, 3 * CS);
        assert!(image
            .populate(GuestOffset(1), &data[..CS as usize], true)
            .is_err());
    }

    #[test]
    fn populate_skips_clusters_that_another_request_is_linking() {
        let (_s, image) = image(16 << 20);
        // An allocating write in flight holds cluster 1 (claimed, not yet linked).
        let in_flight = image.claims.claim_all(vec![GuestCluster(1)]);
        let out = image
            .populate(GuestOffset(0), &vec![6u8; 3 * CS as usize], true)
            .unwrap();
        assert_eq!(out.written, 2 * CS);
        assert_eq!(out.skipped, CS);
        assert_eq!(
            image.mapping_at(GuestOffset(CS), 1).unwrap().0,
            Mapping::Unallocated
        );
        drop(in_flight);
        // The write then links its own data; the populate never overwrote it.
        image.write_at(&[9u8; 4], crate::GuestOffset(CS)).unwrap();
        let mut b = [0u8; 5];
        image.read_at(&mut b, crate::GuestOffset(CS)).unwrap();
        assert_eq!(b, [9, 9, 9, 9, 0]);
    }

    #[test]
    fn a_write_waits_for_the_claim_on_its_cluster_then_writes_in_place() {
        let (_s, image) = image(16 << 20);
        let before = image.file_end();
        let in_flight = image.claims.claim_all(vec![GuestCluster(2)]);
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                image
                    .write_at(&[5u8; 10], crate::GuestOffset(2 * CS + 100))
                    .unwrap()
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(
                !writer.is_finished(),
                "the write did not wait for the claim"
            );
            // The holder links the cluster, then releases its claim.
            let data = vec![1u8; CS as usize];
            image.write_claimed(&data, 2 * CS, &in_flight).unwrap();
            drop(in_flight);
            writer.join().unwrap();
        });
        let mut b = vec![0u8; CS as usize];
        image.read_at(&mut b, crate::GuestOffset(2 * CS)).unwrap();
        assert_eq!(&b[99..111], &[1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 1]);
        // One L2 table and one data cluster: the waiting write went in place.
        let table = u64::from(image.geometry().table_size()) * CS;
        assert_eq!(image.file_end(), before + table + CS);
        assert_eq!(image.check(crate::Repair::None).unwrap().exit_code(), 0);
    }
}
