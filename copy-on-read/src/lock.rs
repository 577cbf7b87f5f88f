//! The per-cluster-range lock that guest writes, copy-on-read fills and the stream job share.
//!
//! A holder owns a half-open range of cluster indices; overlapping requests wait until it is
//! released, disjoint ones run in parallel. The guard is owned (`'static`), so it can be moved
//! into a blocking task: the range stays locked until the blocking I/O really ends, even when
//! the future that started it was dropped.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

/// An async lock on ranges of cluster indices.
#[derive(Debug, Clone, Default)]
pub struct RangeLock {
    inner: Arc<Inner>,
}

/// Holds `[start, end)` until dropped.
#[derive(Debug)]
#[must_use = "the range is unlocked when the guard is dropped"]
pub struct RangeGuard {
    inner: Arc<Inner>,
    range: (u64, u64),
}

impl RangeLock {
    /// A lock with nothing held.
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Waits until no held range overlaps `[start, end)`, then holds it. Cancel-safe: a
    /// dropped future holds nothing.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard {
        let end = end.max(start + 1);
        loop {
            let notified = self.inner.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(g) = self.try_lock(start, end) {
                return g;
            }
            notified.await;
        }
    }

    /// Holds `[start, end)` if nothing overlapping is held.
    pub fn try_lock(&self, start: u64, end: u64) -> Option<RangeGuard> {
        let end = end.max(start + 1);
        let mut held = self.inner.held.lock();
        if held.iter().any(|&(s, e)| s < end && start < e) {
            return None;
        }
        held.push((start, end));
        Some(RangeGuard {
            inner: Arc::clone(&self.inner),
            range: (start, end),
        })
    }

    /// How many ranges are held (for tests and diagnostics).
    pub fn held(&self) -> usize {
        self.inner.held.lock().len()
    }
}

impl RangeGuard {
    /// The locked range of cluster indices.
    pub fn range(&self) -> (u64, u64) {
        self.range
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut held = self.inner.held.lock();
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.inner.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let lock = RangeLock::new();
        let a = lock.lock(0, 4).await;
        assert!(lock.try_lock(3, 5).is_none());
        let b = lock.lock(4, 8).await;
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move { l2.lock(2, 6).await.range() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(b);
        assert_eq!(waiter.await.unwrap(), (2, 6));
        assert_eq!(lock.held(), 0);
    }

    #[tokio::test]
    async fn a_dropped_waiter_holds_nothing() {
        let lock = RangeLock::new();
        let a = lock.lock(0, 1).await;
        let fut = lock.lock(0, 1);
        assert!(tokio::time::timeout(Duration::from_millis(10), fut)
            .await
            .is_err());
        drop(a);
        assert_eq!(lock.held(), 0);
        let _b = lock.lock(0, 1).await;
    }
}
