//! An in-memory image whose storage records where in memory its data writes come from: for
//! tests that the copy paths hand the image page-aligned buffers, which an O_DIRECT file
//! (`--cache none`) writes with no bounce copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qed::{Image, MemStorage, OpenOptions, Storage};

use crate::flushes::overlay_memory;

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

/// A storage in memory that records its writes' addresses in a [`WriteAddresses`].
#[derive(Debug)]
struct Recording {
    mem: Arc<MemStorage>,
    seen: Arc<WriteAddresses>,
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if buf.len() >= 64 << 10 {
            self.seen.writes.fetch_add(1, Ordering::AcqRel);
            if buf.as_ptr() as usize % PAGE == 0 {
                self.seen.aligned.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.mem.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mem.set_len(len)
    }
}

/// A new empty overlay of `size` bytes (64 KiB clusters, over `base.raw`) whose storage
/// records its writes' addresses, opened; and the record.
pub fn recorded_overlay(size: u64) -> (Image, Arc<WriteAddresses>) {
    let seen = Arc::new(WriteAddresses::default());
    let storage = Recording {
        mem: overlay_memory(size),
        seen: Arc::clone(&seen),
    };
    let image = Image::open(Box::new(storage), OpenOptions::default()).expect("opening it");
    (image, seen)
}
