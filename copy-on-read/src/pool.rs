//! A pool of reusable copy buffers under a byte budget: what the stream job fetches from the
//! backing goes into buffers of this pool, and each buffer comes back to it once its data is
//! stored, so a stream allocates (and the kernel faults in) at most the budget's worth of
//! buffer memory however long it runs, and never holds more than the budget at once, whatever
//! its request size and number of requests in flight say.
//!
//! The budget is counted in chunks of [`BufferPool::chunk_bytes`] (each buffer is one chunk,
//! the last of a request possibly shorter). [`BufferPool::take`] waits (FIFO) until a request's
//! chunks are free, all at once, so requests never hold part of what they need while waiting
//! for the rest; a request larger than the whole budget is refused with
//! [`Error::OverBudget`], never waited for.
//!
//! A pool made with [`BufferPool::page_aligned`] hands out buffers at page-aligned addresses
//! ([`PoolBuf::Aligned`]): a chunk is a whole number of clusters from a cluster boundary, so an
//! image or raw file opened with O_DIRECT (`--cache none`) reads into it and writes from it
//! straight, with no copy through a bounce buffer. Over NBD the buffers stay `Vec`s, which
//! the NBD client reads into as they are.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use qed::storage::AlignedBuf;

use crate::error::{Error, Result};

/// The address alignment of a page-aligned pool's buffers: what O_DIRECT asks of memory on
/// the file systems and devices seen (`statx` reports 4 to 4096 bytes).
pub const PAGE_ALIGN: usize = 4096;

/// One copy buffer of a pool: a `Vec`, or page-aligned memory (see the module
/// documentation). Either reads as its bytes.
#[derive(Debug)]
pub enum PoolBuf {
    /// Heap memory at whatever address the allocator gave.
    Vec(Vec<u8>),
    /// Memory at a [`PAGE_ALIGN`]-aligned address.
    Aligned(AlignedBuf),
}

impl PoolBuf {
    /// The bytes the buffer can hold.
    fn capacity(&self) -> usize {
        match self {
            PoolBuf::Vec(v) => v.capacity(),
            PoolBuf::Aligned(a) => a.capacity(),
        }
    }

    /// Keeps the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        match self {
            PoolBuf::Vec(v) => v.truncate(len),
            PoolBuf::Aligned(a) => a.truncate(len),
        }
    }

    /// Sets the length to `len` (an aligned buffer stops at its capacity, the pool's chunk
    /// size); bytes that come into use read as zeros.
    pub fn resize_zeroed(&mut self, len: usize) {
        match self {
            PoolBuf::Vec(v) => v.resize(len, 0),
            PoolBuf::Aligned(a) => a.resize_zeroed(len),
        }
    }
}

impl Default for PoolBuf {
    fn default() -> PoolBuf {
        PoolBuf::Vec(Vec::new())
    }
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            PoolBuf::Vec(v) => v,
            PoolBuf::Aligned(a) => a,
        }
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            PoolBuf::Vec(v) => v,
            PoolBuf::Aligned(a) => a,
        }
    }
}

/// Page-aligned buffers given back after use and handed out again, at most `max_bytes` of
/// them held: for copies whose buffers come and go one request at a time (a server's READs,
/// `convert`'s chunks), so that a request neither allocates nor zeroes its buffer. A taken
/// buffer holds old bytes (zeros if never written): its user fills what it reads.
#[derive(Debug)]
pub struct RecycledBufs {
    held: Mutex<Vec<AlignedBuf>>,
    max_bytes: usize,
}

impl RecycledBufs {
    /// None held yet; at most `max_bytes` of buffers held at once.
    pub fn new(max_bytes: usize) -> RecycledBufs {
        RecycledBufs {
            held: Mutex::new(Vec::new()),
            max_bytes,
        }
    }

    /// A buffer of `len` bytes at a [`PAGE_ALIGN`]-aligned address: a held one large enough,
    /// else a new one of whole pages; a `Vec` only when aligned memory cannot be had.
    pub fn take(&self, len: usize) -> PoolBuf {
        let found = {
            let mut held = self.held.lock();
            let at = held.iter().position(|b| b.capacity() >= len);
            at.map(|i| held.swap_remove(i))
        };
        let buf = match found {
            Some(b) => Ok(b),
            None => AlignedBuf::zeroed(len.next_multiple_of(PAGE_ALIGN), PAGE_ALIGN),
        };
        match buf {
            Ok(mut b) => {
                b.set_len(len);
                PoolBuf::Aligned(b)
            }
            Err(_) => PoolBuf::Vec(vec![0u8; len]),
        }
    }

    /// Keeps `buf` for reuse, unless that would hold more than `max_bytes` (or it is not an
    /// aligned one).
    pub fn give(&self, buf: PoolBuf) {
        let PoolBuf::Aligned(buf) = buf else {
            return;
        };
        if buf.capacity() == 0 {
            return;
        }
        let mut held = self.held.lock();
        let bytes: usize = held.iter().map(AlignedBuf::capacity).sum();
        if bytes.saturating_add(buf.capacity()) <= self.max_bytes {
            held.push(buf);
        }
    }

    /// How many buffers are held now.
    pub fn idle(&self) -> usize {
        self.held.lock().len()
    }

    /// Bytes of the buffers held now.
    pub fn held_bytes(&self) -> usize {
        self.held.lock().iter().map(AlignedBuf::capacity).sum()
    }
}

/// Reusable buffers under a byte budget; cheap to clone (clones share the buffers).
#[derive(Clone, Debug)]
pub struct BufferPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    chunk: usize,
    chunks: usize,
    /// Buffers are [`PoolBuf::Aligned`].
    aligned: bool,
    permits: Arc<Semaphore>,
    free: Mutex<Vec<PoolBuf>>,
    /// Bytes of buffers ever allocated (recycled ones are not counted again).
    allocated: AtomicU64,
    /// Bytes handed out now, and the most ever handed out at once.
    out: AtomicU64,
    peak: AtomicU64,
}

/// What a pool has done, for tests and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// The budget, bytes (a whole number of chunks).
    pub budget: u64,
    /// Bytes of buffers ever allocated: never more than the budget.
    pub allocated: u64,
    /// The most bytes of buffers handed out at once: never more than the budget.
    pub peak: u64,
}

/// The buffers of one request: chunk `k` holds bytes `[k * chunk, (k + 1) * chunk)` of it.
/// Dropping them gives them back to their pool.
#[derive(Debug)]
pub struct Chunks {
    bufs: Vec<PoolBuf>,
    len: u64,
    pool: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl BufferPool {
    /// A pool of `budget` bytes (at least one chunk) in chunks of `chunk` bytes (at least 1),
    /// each a `Vec`.
    pub fn new(budget: u64, chunk: usize) -> BufferPool {
        BufferPool::with_buffers(budget, chunk, false)
    }

    /// As [`BufferPool::new`], each buffer at a [`PAGE_ALIGN`]-aligned address.
    pub fn page_aligned(budget: u64, chunk: usize) -> BufferPool {
        BufferPool::with_buffers(budget, chunk, true)
    }

    fn with_buffers(budget: u64, chunk: usize, aligned: bool) -> BufferPool {
        let chunk = chunk.max(1);
        let chunks = usize::try_from(budget / chunk as u64)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        BufferPool {
            inner: Arc::new(Inner {
                chunk,
                chunks,
                aligned,
                permits: Arc::new(Semaphore::new(chunks)),
                free: Mutex::new(Vec::new()),
                allocated: AtomicU64::new(0),
                out: AtomicU64::new(0),
                peak: AtomicU64::new(0),
            }),
        }
    }

    /// The size of one buffer.
    pub fn chunk_bytes(&self) -> usize {
        self.inner.chunk
    }

    /// True when the buffers are page-aligned.
    pub fn is_page_aligned(&self) -> bool {
        self.inner.aligned
    }

    /// The budget, bytes (a whole number of chunks).
    pub fn budget(&self) -> u64 {
        self.inner.chunks as u64 * self.inner.chunk as u64
    }

    /// Buffers for `len` bytes, waiting until the budget has room for them. Fails with
    /// [`Error::OverBudget`] when `len` exceeds the whole budget, and with [`Error::Io`] when
    /// the memory of a page-aligned buffer cannot be had.
    pub async fn take(&self, len: u64) -> Result<Chunks> {
        let chunk = self.inner.chunk as u64;
        let n = len.div_ceil(chunk);
        if n > self.inner.chunks as u64 {
            return Err(Error::OverBudget {
                length: len,
                budget: self.budget(),
            });
        }
        let permit = Arc::clone(&self.inner.permits)
            .acquire_many_owned(n as u32)
            .await
            .map_err(|_| Error::Closed)?;
        let mut bufs = Vec::with_capacity(n as usize);
        for k in 0..n {
            let want = (len - k * chunk).min(chunk) as usize;
            bufs.push(
                self.inner
                    .buffer(want)
                    .map_err(Error::io("allocating a copy buffer", len))?,
            );
        }
        self.inner.count_out(n * chunk);
        Ok(Chunks {
            bufs,
            len,
            pool: Arc::clone(&self.inner),
            _permit: permit,
        })
    }

    /// What the pool has done so far.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            budget: self.budget(),
            allocated: self.inner.allocated.load(Ordering::Acquire),
            peak: self.inner.peak.load(Ordering::Acquire),
        }
    }
}

impl Inner {
    /// A free buffer of `len` bytes: recycled when one is free (its bytes are what its last
    /// user left; every user fills them before reading them), else new and zeroed.
    fn buffer(&self, len: usize) -> std::io::Result<PoolBuf> {
        let mut b = match self.free.lock().pop() {
            Some(b) => b,
            None => {
                let b = if self.aligned {
                    PoolBuf::Aligned(AlignedBuf::zeroed(self.chunk, PAGE_ALIGN)?)
                } else {
                    PoolBuf::Vec(Vec::with_capacity(self.chunk))
                };
                self.allocated
                    .fetch_add(self.chunk as u64, Ordering::AcqRel);
                b
            }
        };
        b.truncate(len);
        b.resize_zeroed(len);
        Ok(b)
    }

    fn count_out(&self, bytes: u64) {
        let now = self.out.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.peak.fetch_max(now, Ordering::AcqRel);
    }
}

impl Chunks {
    /// The request's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a request of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk size.
    pub fn chunk_bytes(&self) -> usize {
        self.pool.chunk
    }

    /// The buffers, in order.
    pub fn bufs(&self) -> &[PoolBuf] {
        &self.bufs
    }

    /// Takes buffers `[from, to)` out (to be filled by a read that owns them); give them back
    /// with [`Chunks::put`]. A buffer not given back (its read failed or was dropped) is
    /// simply not recycled.
    pub fn take_bufs(&mut self, from: usize, to: usize) -> Vec<PoolBuf> {
        self.bufs[from..to].iter_mut().map(std::mem::take).collect()
    }

    /// Puts buffers taken with [`Chunks::take_bufs`] back from index `from` on.
    pub fn put(&mut self, from: usize, bufs: Vec<PoolBuf>) {
        for (slot, b) in self.bufs[from..].iter_mut().zip(bufs) {
            *slot = b;
        }
    }
}

impl Drop for Chunks {
    fn drop(&mut self) {
        let chunk = self.pool.chunk;
        let aligned = self.pool.aligned;
        let mut free = self.pool.free.lock();
        for b in self.bufs.drain(..) {
            // Only the pool's own kind of buffer, whole, is kept (a buffer a read replaced
            // is not).
            if b.capacity() == chunk && matches!(b, PoolBuf::Aligned(_)) == aligned {
                free.push(b);
            }
        }
        drop(free);
        self.pool.out.fetch_sub(
            self.len.div_ceil(chunk as u64) * chunk as u64,
            Ordering::AcqRel,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_are_recycled_and_the_budget_holds() {
        let pool = BufferPool::new(4 << 20, 1 << 20);
        for _ in 0..100 {
            let a = pool.take(3 << 20).await.unwrap();
            assert_eq!(a.bufs().len(), 3);
            assert_eq!(a.bufs()[2].len(), 1 << 20);
            drop(a);
        }
        let s = pool.stats();
        assert_eq!(s.allocated, 3 << 20, "buffers were not recycled: {s:?}");
        assert_eq!(s.peak, 3 << 20);
        let a = pool.take(2 << 20).await.unwrap();
        let b = pool.take((1 << 20) + 5).await.unwrap();
        assert_eq!(b.bufs()[1].len(), 5);
        let waiting = pool.take(1);
        tokio::pin!(waiting);
        assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        drop(a);
        let c = waiting.await.unwrap();
        assert_eq!(c.len(), 1);
        assert!(pool.stats().peak <= pool.budget());
        drop((b, c));
    }

    #[tokio::test]
    async fn a_page_aligned_pool_recycles_aligned_buffers() {
        let pool = BufferPool::page_aligned(2 << 20, 1 << 20);
        assert!(pool.is_page_aligned());
        for round in 0..10 {
            let mut a = pool.take((1 << 20) + 100).await.unwrap();
            let lens: Vec<usize> = a.bufs().iter().map(|b| b.len()).collect();
            assert_eq!(lens, [1 << 20, 100]);
            for b in a.bufs() {
                assert!(matches!(b, PoolBuf::Aligned(_)), "round {round}: {b:?}");
                assert_eq!(b.as_ptr() as usize % PAGE_ALIGN, 0, "round {round}");
            }
            // Taken out, shortened and grown back, as a read at the backing's end does.
            let mut bufs = a.take_bufs(0, 2);
            bufs[1].truncate(10);
            bufs[1].resize_zeroed(100);
            assert!(bufs[1][10..].iter().all(|&x| x == 0));
            a.put(0, bufs);
        }
        assert_eq!(pool.stats().allocated, 2 << 20, "buffers were not recycled");
        assert!(!BufferPool::new(1 << 20, 1 << 20).is_page_aligned());
    }

    #[test]
    fn recycled_buffers_are_aligned_reused_and_bounded() {
        let bufs = RecycledBufs::new(32 << 20);
        let a = bufs.take(4096);
        assert_eq!(a.len(), 4096);
        let at = a.as_ptr();
        assert_eq!(at as usize % PAGE_ALIGN, 0);
        bufs.give(a);
        // A shorter request reuses the same allocation, cut to its length.
        let b = bufs.take(100);
        assert_eq!((b.len(), b.as_ptr()), (100, at));
        bufs.give(b);
        // A longer one takes a new one: the length is always the one asked.
        let c = bufs.take(8192 + 1);
        assert_eq!(c.len(), 8193);
        assert_eq!(c.as_ptr() as usize % PAGE_ALIGN, 0);
        // Never more than the bound held, and only aligned buffers.
        for _ in 0..3 {
            bufs.give(bufs.take(16 << 20));
        }
        bufs.give(PoolBuf::Vec(vec![0u8; 4096]));
        assert!(
            bufs.held_bytes() <= 32 << 20,
            "{} bytes held",
            bufs.held_bytes()
        );
    }

    #[tokio::test]
    async fn a_request_over_the_whole_budget_is_refused() {
        let pool = BufferPool::new(1 << 20, 256 << 10);
        match pool.take((1 << 20) + 1).await {
            Err(Error::OverBudget { length, budget }) => {
                assert_eq!((length, budget), ((1 << 20) + 1, 1 << 20));
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    /// Polls `f` once: `Some` when it is ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
