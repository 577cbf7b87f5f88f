//! The per-cluster-range lock that guest writes, copy-on-read fills and the stream job share.
//!
//! A holder owns a half-open range of cluster indices; overlapping requests wait until it is
//! released, disjoint ones run in parallel. The guard is owned (`'static`), so it can be moved
//! into a blocking task: the range stays locked until the blocking I/O really ends, even when
//! the future that started it was dropped.

use std::sync::Arc;

use parking_lot::Mutex;
use qed::GuestCluster;
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    held: Mutex<Vec<(GuestCluster, GuestCluster)>>,
    released: Notify,
}

/// An async lock on ranges of guest clusters (their indices, [`GuestCluster`]).
#[derive(Debug, Clone, Default)]
pub struct RangeLock {
    inner: Arc<Inner>,
}

/// Holds `[start, end)` until dropped.
#[derive(Debug)]
#[must_use = "the range is unlocked when the guard is dropped"]
pub struct RangeGuard {
    inner: Arc<Inner>,
    range: (GuestCluster, GuestCluster),
}

impl RangeLock {
    /// A lock with nothing held.
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Waits until no held range overlaps `[start, end)`, then holds it. Cancel-safe: a
    /// dropped future holds nothing.
    pub async fn lock(&self, start: GuestCluster, end: GuestCluster) -> RangeGuard {
        let end = end.max(start.next());
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

    /// Waits until nothing is held, then holds every cluster.
    pub async fn lock_all(&self) -> RangeGuard {
        self.lock(GuestCluster(0), GuestCluster(u64::MAX)).await
    }

    /// Holds `[start, end)` if nothing overlapping is held.
    pub fn try_lock(&self, start: GuestCluster, end: GuestCluster) -> Option<RangeGuard> {
        let end = end.max(start.next());
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
    pub fn range(&self) -> (GuestCluster, GuestCluster) {
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

    fn c(i: u64) -> GuestCluster {
        GuestCluster(i)
    }

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let lock = RangeLock::new();
        let a = lock.lock(c(0), c(4)).await;
        assert!(lock.try_lock(c(3), c(5)).is_none());
        let b = lock.lock(c(4), c(8)).await;
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move { l2.lock(c(2), c(6)).await.range() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(b);
        assert_eq!(waiter.await.unwrap(), (c(2), c(6)));
        assert_eq!(lock.held(), 0);
    }

    #[tokio::test]
    async fn a_dropped_waiter_holds_nothing() {
        let lock = RangeLock::new();
        let a = lock.lock(c(0), c(1)).await;
        let fut = lock.lock(c(0), c(1));
        assert!(tokio::time::timeout(Duration::from_millis(10), fut)
            .await
            .is_err());
        drop(a);
        assert_eq!(lock.held(), 0);
        let _b = lock.lock(c(0), c(1)).await;
    }
}
