//! Copy-ins: what guest reads fetched from the backing, stored into the image after the reads
//! have returned, in batches that share one flush.
//!
//! Stored one by one, every copy-on-read miss cost its own `fdatasync` (the data must be
//! durable before an L2 entry points at it): a guest reading a fresh overlay from end to end
//! (a boot, a backup, `nbdcopy` through `serve`) made one flush per request, 2,535 of them
//! for 1 GiB read in 256 KiB requests. Copy-ins now wait in a queue, and up to [`STORES`]
//! store loops on the blocking pool each take what is queued (up to [`BATCH_BYTES`]) and
//! store it with one [`Image::populate_batch`]: the data of every copy-in, one flush, then
//! their L2 updates, the crash order of a single populate.
//!
//! A copy-in keeps its range lock (and its share of the device's copy-in budget) until its
//! batch is stored: other requests keep off its clusters meanwhile (a read of them is served
//! from the backing), and waiting for every range lock still waits for every copy-in.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::OwnedSemaphorePermit;

use qed::{GuestOffset, Image};

use crate::lock::RangeGuard;
use crate::pool::PoolBuf;

/// Store loops at once: a batch is written while an earlier one is being flushed.
const STORES: usize = 2;

/// The most bytes of copy-ins one batch takes (a copy-in larger than this is a batch alone).
const BATCH_BYTES: usize = 8 << 20;

/// What one guest read fetched to store: whole clusters, under the read's range lock.
pub(crate) struct CopyIn {
    /// Cluster-aligned guest offsets and the bytes the backing holds there.
    pub fills: Vec<(u64, PoolBuf)>,
    /// The read's range lock, released once stored (held, never read).
    #[allow(dead_code)]
    pub guard: RangeGuard,
    /// The bytes' share of the copy-in budget, given back once stored (none when the read
    /// waits for its store; held, never read).
    #[allow(dead_code)]
    pub budget: Option<OwnedSemaphorePermit>,
}

impl CopyIn {
    fn bytes(&self) -> usize {
        self.fills.iter().map(|(_, d)| d.len()).sum()
    }
}

/// The copy-ins waiting, and how many store loops run.
#[derive(Default)]
struct Queue {
    pending: VecDeque<CopyIn>,
    stores: usize,
}

/// The copy-ins of one device, and their counters. See the module documentation.
pub(crate) struct CopyIns {
    image: Arc<Image>,
    name: String,
    queue: Mutex<Queue>,
    stored_bytes: AtomicU64,
    failures: AtomicU64,
}

impl std::fmt::Debug for CopyIns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyIns")
            .field("pending", &self.queue.lock().pending.len())
            .field("stored_bytes", &self.stored_bytes)
            .field("failures", &self.failures)
            .finish()
    }
}

impl CopyIns {
    /// No copy-in yet, for `image` (named `name` in messages).
    pub(crate) fn new(image: Arc<Image>, name: String) -> CopyIns {
        CopyIns {
            image,
            name,
            queue: Mutex::new(Queue::default()),
            stored_bytes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Bytes stored so far (data and zero clusters).
    pub(crate) fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// Copy-ins that could not be stored.
    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Queues `copy_in`, and starts a store loop on the blocking pool when fewer than
    /// [`STORES`] run (one that runs takes it in its next batch). Must be called inside a
    /// tokio runtime.
    pub(crate) fn queue(self: &Arc<Self>, copy_in: CopyIn) {
        let start = {
            let mut q = self.queue.lock();
            q.pending.push_back(copy_in);
            let start = q.stores < STORES;
            if start {
                q.stores += 1;
            }
            start
        };
        if start {
            let me = Arc::clone(self);
            drop(tokio::task::spawn_blocking(move || me.store_queued()));
        }
    }

    /// Stores `copy_in` alone, on the calling thread (a blocking one).
    pub(crate) fn store_now(&self, copy_in: CopyIn) {
        self.store(vec![copy_in]);
    }

    /// A store loop: batches from the queue until it is empty.
    fn store_queued(&self) {
        while let Some(batch) = self.next_batch() {
            self.store(batch);
        }
    }

    /// The copy-ins at the head of the queue, up to [`BATCH_BYTES`] (at least one); `None`
    /// when the queue is empty, and then this loop no longer counts as running.
    fn next_batch(&self) -> Option<Vec<CopyIn>> {
        let mut q = self.queue.lock();
        if q.pending.is_empty() {
            q.stores -= 1;
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(next) = q.pending.front() {
            let n = next.bytes();
            if !batch.is_empty() && bytes + n > BATCH_BYTES {
                break;
            }
            bytes += n;
            batch.extend(q.pending.pop_front());
        }
        Some(batch)
    }

    /// Stores a batch with one [`Image::populate_batch`], counts it, then drops it (its range
    /// locks and budget): a failure (a full disk) counts every copy-in of the batch, is logged,
    /// and links nothing whose data was not written.
    fn store(&self, batch: Vec<CopyIn>) {
        let mut pieces: Vec<(GuestOffset, &[u8])> = batch
            .iter()
            .flat_map(|c| c.fills.iter())
            .map(|(at, data)| (GuestOffset(*at), &data[..]))
            .collect();
        // Disjoint: each copy-in holds the range lock of its clusters.
        pieces.sort_unstable_by_key(|(at, _)| at.0);
        match self.image.populate_batch(&pieces, true) {
            Ok(o) => {
                self.stored_bytes
                    .fetch_add(o.written + o.zeroed, Ordering::Relaxed);
            }
            Err(e) => {
                self.failures
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::warn!(
                    image = %self.name,
                    error = %e,
                    copy_ins = batch.len(),
                    "copy-on-read could not store what guest reads fetched; the reads are served"
                );
            }
        }
        drop(pieces);
        drop(batch);
    }
}
