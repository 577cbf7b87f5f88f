//! An in-memory image whose storage records where in memory its data reads and writes
//! come from: for tests that the copy paths and the NBD server hand the image page-aligned
//! buffers, which an O_DIRECT file (`--cache none`) uses with no bounce copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qed::{Image, OpenOptions};

use crate::flushes::overlay_memory;
use crate::hooked::{Hooked, StorageHooks};

/// The address alignment the copy paths promise (one page).
pub const PAGE: usize = 4096;

/// Counts of one direction's transfers of at least one cluster (64 KiB): all of them, and
/// those at a page-aligned address.
#[derive(Debug, Default)]
pub struct Counts {
    all: AtomicU64,
    aligned: AtomicU64,
}

impl Counts {
    fn record(&self, buf: &[u8]) {
        if buf.len() >= 64 << 10 {
            self.all.fetch_add(1, Ordering::AcqRel);
            if buf.as_ptr() as usize % PAGE == 0 {
                self.aligned.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// (transfers, page-aligned transfers) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.all.load(Ordering::Acquire),
            self.aligned.load(Ordering::Acquire),
        )
    }

    /// Asserts that at least `least` transfers were counted and every one was page-aligned;
    /// `what` names them in the messages ("cluster writes of the stream").
    #[track_caller]
    pub fn assert_all_aligned(&self, what: &str, least: u64) {
        let (all, aligned) = self.get();
        println!("{all} {what}, {aligned} at page-aligned addresses");
        assert!(all >= least, "only {all} {what}, expected at least {least}");
        assert_eq!(
            aligned,
            all,
            "{} of {all} {what} used unaligned memory",
            all - aligned
        );
    }

    fn reset(&self) {
        self.all.store(0, Ordering::Release);
        self.aligned.store(0, Ordering::Release);
    }
}

/// Where an image's cluster-sized reads and writes came from.
#[derive(Debug, Default)]
pub struct IoAddresses {
    /// Reads of at least a cluster.
    pub reads: Counts,
    /// Writes of at least a cluster.
    pub writes: Counts,
}

impl IoAddresses {
    /// Starts counting again.
    pub fn reset(&self) {
        self.reads.reset();
        self.writes.reset();
    }
}

/// Hooks that record their reads' and writes' addresses in an [`IoAddresses`].
#[derive(Debug)]
struct Recording(Arc<IoAddresses>);

impl StorageHooks for Recording {
    fn read(&self, buf: &[u8], _offset: u64) -> std::io::Result<()> {
        self.0.reads.record(buf);
        Ok(())
    }
    fn write(&self, buf: &[u8], _offset: u64) -> std::io::Result<()> {
        self.0.writes.record(buf);
        Ok(())
    }
}

/// A new empty overlay of `size` bytes (64 KiB clusters, over `base.raw`) whose storage
/// records its reads' and writes' addresses, opened; and the record.
pub fn recorded_overlay(size: u64) -> (Image, Arc<IoAddresses>) {
    let seen = Arc::new(IoAddresses::default());
    let storage = Hooked {
        inner: overlay_memory(size),
        hooks: Recording(Arc::clone(&seen)),
    };
    let image = Image::open(Box::new(storage), OpenOptions::default()).expect("opening it");
    (image, seen)
}
