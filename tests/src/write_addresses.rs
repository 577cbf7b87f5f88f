//! An in-memory image whose storage records where in memory its data writes come from: for
//! tests that the copy paths hand the image page-aligned buffers, which an O_DIRECT file
//! (`--cache none`) writes with no bounce copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qed::{Image, OpenOptions};

use crate::flushes::overlay_memory;
use crate::hooked::{Hooked, StorageHooks};

/// The address alignment the copy paths promise (one page).
pub const PAGE: usize = 4096;

/// Counts of the writes of at least one cluster (64 KiB): all of them, and those from a
/// page-aligned address.
#[derive(Debug, Default)]
pub struct WriteAddresses {
    writes: AtomicU64,
    aligned: AtomicU64,
}

impl WriteAddresses {
    /// (writes, page-aligned writes) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::Acquire),
            self.aligned.load(Ordering::Acquire),
        )
    }

    /// Starts counting again.
    pub fn reset(&self) {
        self.writes.store(0, Ordering::Release);
        self.aligned.store(0, Ordering::Release);
    }
}

/// Hooks that record their writes' addresses in a [`WriteAddresses`].
#[derive(Debug)]
struct Recording(Arc<WriteAddresses>);

impl StorageHooks for Recording {
    fn write(&self, buf: &[u8], _offset: u64) -> std::io::Result<()> {
        if buf.len() >= 64 << 10 {
            self.0.writes.fetch_add(1, Ordering::AcqRel);
            if buf.as_ptr() as usize % PAGE == 0 {
                self.0.aligned.fetch_add(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }
}

/// A new empty overlay of `size` bytes (64 KiB clusters, over `base.raw`) whose storage
/// records its writes' addresses, opened; and the record.
pub fn recorded_overlay(size: u64) -> (Image, Arc<WriteAddresses>) {
    let seen = Arc::new(WriteAddresses::default());
    let storage = Hooked {
        inner: overlay_memory(size),
        hooks: Recording(Arc::clone(&seen)),
    };
    let image = Image::open(Box::new(storage), OpenOptions::default()).expect("opening it");
    (image, seen)
}
