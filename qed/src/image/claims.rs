//! Claims on guest clusters whose L2 entries are about to leave the unallocated (or zero)
//! state: what keeps allocation atomic per cluster now that `qed` holds no range lock.
//!
//! The invariant: **an L2 entry changes from unallocated or zero to anything else only in a
//! request that holds the claim on its cluster**, taken before the request looks the mapping
//! up for the last time and released after its L2 update. Data entries are never relinked by
//! the write paths (an allocated cluster is written in place). Hence, with no lock across the
//! data I/O of a request:
//! - each guest cluster is allocated at most once (no lost write, no leaked cluster), because
//!   two allocating requests for one cluster cannot both hold its claim;
//! - what a claim holder saw under its claim (unallocated, zero) stays true until it links;
//! - reads, writes into allocated clusters and the parts of a request that are allocated never
//!   touch a claim.
//!
//! A write that needs a claimed cluster waits for its release and then finds it allocated
//! (QEMU's qcow2 does the same with its in-flight allocations); a populate skips claimed
//! clusters, since whoever holds them supplies their contents. A caller that serializes
//! overlapping requests itself (the copy-on-read device and its range lock) never meets a
//! claimed cluster, so `qed` never makes it wait. The consistency check freezes claims and
//! waits for the held ones, so that it never sees a cluster allocated but not yet linked.

use std::collections::HashSet;

use parking_lot::{Condvar, Mutex};

use crate::types::GuestCluster;

#[derive(Debug, Default)]
struct State {
    held: HashSet<GuestCluster>,
    /// Set while the check runs: no new claims.
    frozen: bool,
}

/// The claimed clusters of an image.
#[derive(Debug, Default)]
pub(super) struct Claims {
    state: Mutex<State>,
    released: Condvar,
}

/// Held claims; dropping the guard releases them.
pub(super) struct Claim<'a> {
    claims: &'a Claims,
    clusters: Vec<GuestCluster>,
}

/// Held while the check runs; dropping it lets claims be taken again.
pub(super) struct Frozen<'a> {
    claims: &'a Claims,
}

impl Claims {
    /// Waits until none of `clusters` is claimed (and claims are not frozen), then claims
    /// them all.
    pub(super) fn claim_all(&self, clusters: Vec<GuestCluster>) -> Claim<'_> {
        let mut state = self.state.lock();
        while state.frozen || clusters.iter().any(|c| state.held.contains(c)) {
            self.released.wait(&mut state);
        }
        state.held.extend(clusters.iter().copied());
        Claim {
            claims: self,
            clusters,
        }
    }

    /// Claims those of `clusters` that nobody holds (waiting only while claims are frozen);
    /// the others are left to their holders.
    pub(super) fn claim_free(&self, clusters: &[GuestCluster]) -> Claim<'_> {
        let mut state = self.state.lock();
        while state.frozen {
            self.released.wait(&mut state);
        }
        let free: Vec<GuestCluster> = clusters
            .iter()
            .copied()
            .filter(|c| !state.held.contains(c))
            .collect();
        state.held.extend(free.iter().copied());
        Claim {
            claims: self,
            clusters: free,
        }
    }

    /// Stops new claims and waits until no claim is held.
    pub(super) fn freeze(&self) -> Frozen<'_> {
        let mut state = self.state.lock();
        while state.frozen {
            self.released.wait(&mut state);
        }
        state.frozen = true;
        while !state.held.is_empty() {
            self.released.wait(&mut state);
        }
        Frozen { claims: self }
    }
}

impl Claim<'_> {
    /// True when this claim holds `cluster`.
    pub(super) fn holds(&self, cluster: GuestCluster) -> bool {
        self.clusters.contains(&cluster)
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.clusters.is_empty() {
            return;
        }
        let mut state = self.claims.state.lock();
        for c in &self.clusters {
            state.held.remove(c);
        }
        self.claims.released.notify_all();
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.claims.state.lock().frozen = false;
        self.claims.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn cs(v: &[u64]) -> Vec<GuestCluster> {
        v.iter().copied().map(GuestCluster).collect()
    }

    #[test]
    fn a_claimed_cluster_makes_claim_all_wait_and_claim_free_skip() {
        let claims = Claims::default();
        let a = claims.claim_all(cs(&[1, 2]));
        let b = claims.claim_all(cs(&[3])); // disjoint: no wait
        let free = claims.claim_free(&cs(&[0, 1, 3, 4]));
        assert!(free.holds(GuestCluster(0)) && free.holds(GuestCluster(4)));
        assert!(!free.holds(GuestCluster(1)) && !free.holds(GuestCluster(3)));
        drop(free);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _c = claims.claim_all(cs(&[2, 3]));
                tx.send(()).unwrap();
            });
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
            drop(a);
            // Still blocked by `b`, which holds cluster 3.
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
            drop(b);
            rx.recv().unwrap();
        });
    }

    #[test]
    fn freeze_waits_for_held_claims_and_holds_off_new_ones() {
        let claims = Claims::default();
        let a = claims.claim_all(cs(&[7]));
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let frozen = claims.freeze();
                tx.send("frozen").unwrap();
                std::thread::sleep(Duration::from_millis(100));
                drop(frozen);
            });
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
            drop(a);
            assert_eq!(rx.recv().unwrap(), "frozen");
            // A new claim waits for the check to end, then succeeds.
            let c = claims.claim_free(&cs(&[7]));
            assert!(c.holds(GuestCluster(7)));
        });
    }
}
