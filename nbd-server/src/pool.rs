//! Read buffers kept for reuse, so that a READ neither allocates nor zeroes its buffer.
//!
//! The buffers sit at page-aligned addresses ([`AlignedBuf`]): an image or raw file opened
//! with O_DIRECT (`serve --cache none`) reads into them as they are, where a `Vec` would
//! cost a copy through a bounce buffer (and, with more reads in flight than bounce buffers
//! kept, a fresh zeroed megabyte per read).

use std::sync::Mutex;

use copy_on_read::{AlignedBuf, PoolBuf, PAGE_ALIGN};

/// The most bytes of read buffers one export keeps for reuse.
const POOL_BYTES: usize = 32 << 20;

/// Read buffers the writers of an export's connections gave back, reused by later READs of
/// the export, so that a READ neither allocates nor zeroes its buffer; at most [`POOL_BYTES`]
/// held. A taken buffer holds old bytes: a READ sends only what the device filled in (every
/// byte of a data range; a hole is sent as a hole chunk, never as the buffer's bytes).
#[derive(Debug, Default)]
pub(crate) struct BufferPool(Mutex<Vec<AlignedBuf>>);

impl BufferPool {
    fn held(&self) -> std::sync::MutexGuard<'_, Vec<AlignedBuf>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A page-aligned buffer of `len` bytes (contents unspecified); a `Vec` only when
    /// aligned memory cannot be had.
    pub(crate) fn take(&self, len: usize) -> PoolBuf {
        let found = {
            let mut held = self.held();
            let at = held.iter().position(|b| b.capacity() >= len);
            at.map(|i| held.swap_remove(i))
        };
        let made = || AlignedBuf::zeroed(len.next_multiple_of(PAGE_ALIGN), PAGE_ALIGN);
        match found.map(Ok).unwrap_or_else(made) {
            Ok(mut b) => {
                b.set_len(len);
                PoolBuf::Aligned(b)
            }
            Err(_) => PoolBuf::Vec(vec![0u8; len]),
        }
    }

    /// Keeps `buf` for reuse, unless the pool is full (or it is not one of ours).
    pub(crate) fn give(&self, buf: PoolBuf) {
        let PoolBuf::Aligned(buf) = buf else {
            return;
        };
        if buf.capacity() == 0 {
            return;
        }
        let mut held = self.held();
        let bytes: usize = held.iter().map(AlignedBuf::capacity).sum();
        if bytes + buf.capacity() <= POOL_BYTES {
            held.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_reused_and_the_pool_is_bounded() {
        let pool = BufferPool::default();
        let a = pool.take(4096);
        assert_eq!(a.len(), 4096);
        let at = a.as_ptr();
        assert_eq!(at as usize % PAGE_ALIGN, 0);
        pool.give(a);
        // A shorter request reuses the same allocation, cut to its length.
        let b = pool.take(100);
        assert_eq!((b.len(), b.as_ptr()), (100, at));
        pool.give(b);
        // A longer one takes a new one: the length is always the one asked.
        let c = pool.take(8192 + 1);
        assert_eq!(c.len(), 8193);
        assert_eq!(c.as_ptr() as usize % PAGE_ALIGN, 0);
        // Never more than POOL_BYTES held.
        for _ in 0..3 {
            pool.give(pool.take(POOL_BYTES / 2));
        }
        pool.give(PoolBuf::Vec(vec![0u8; 4096]));
        let held: usize = pool.held().iter().map(AlignedBuf::capacity).sum();
        assert!(held <= POOL_BYTES, "{held} bytes held");
    }
}
