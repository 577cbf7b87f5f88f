//! Read buffers kept for reuse, so that a READ neither allocates nor zeroes its buffer.

use std::sync::Mutex;

/// The most bytes of read buffers one export keeps for reuse.
const POOL_BYTES: usize = 32 << 20;

/// Read buffers the writers of an export's connections gave back, reused by later READs of
/// the export, so that a READ neither allocates nor zeroes its buffer; at most [`POOL_BYTES`]
/// held. A taken buffer holds old bytes: a READ sends only what the device filled in (every
/// byte of a data range; a hole is sent as a hole chunk, never as the buffer's bytes).
#[derive(Debug, Default)]
pub(crate) struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    fn held(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A buffer of `len` bytes (contents unspecified).
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let found = {
            let mut held = self.held();
            let at = held.iter().position(|b| b.capacity() >= len);
            at.map(|i| held.swap_remove(i))
        };
        match found {
            Some(mut b) if b.len() >= len => {
                b.truncate(len);
                b
            }
            Some(mut b) => {
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    /// Keeps `buf` for reuse, unless the pool is full.
    pub(crate) fn give(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut held = self.held();
        let bytes: usize = held.iter().map(Vec::capacity).sum();
        if bytes + buf.capacity() <= POOL_BYTES {
            held.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_the_pool_is_bounded() {
        let pool = BufferPool::default();
        let a = pool.take(4096);
        assert_eq!(a.len(), 4096);
        let at = a.as_ptr();
        pool.give(a);
        // A shorter request reuses the same allocation, cut to its length.
        let b = pool.take(100);
        assert_eq!((b.len(), b.as_ptr()), (100, at));
        pool.give(b);
        // A longer one grows it (or takes a new one): the length is always the one asked.
        assert_eq!(pool.take(8192).len(), 8192);
        // Never more than POOL_BYTES held.
        for _ in 0..3 {
            pool.give(vec![0u8; POOL_BYTES / 2]);
        }
        let held: usize = pool.held().iter().map(Vec::capacity).sum();
        assert!(held <= POOL_BYTES, "{held} bytes held");
        assert_eq!(pool.held().len(), 2);
    }
}
