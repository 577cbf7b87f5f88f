//! An in-memory image whose flushes are counted and slow: for tests of how many `fdatasync`
//! calls a piece of work shares. Each flush sleeps a few milliseconds, as a real `fdatasync`
//! does, so that work queues up behind one; nothing asserts on time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qed::{BackingFormat, CreateOptions, Image, MemStorage, OpenOptions};

use crate::hooked::{Hooked, StorageHooks};

/// Hooks that count flushes, each of which first sleeps `delay`.
#[derive(Debug)]
pub struct CountedFlushes {
    flushes: Arc<AtomicU64>,
    delay: Duration,
}

impl StorageHooks for CountedFlushes {
    fn flush(&self) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.flushes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// The memory of a new empty QED overlay (64 KiB clusters) of `size` bytes over a raw
/// backing named `base.raw`.
pub fn overlay_memory(size: u64) -> Arc<MemStorage> {
    let mut create = CreateOptions::new(size);
    create.backing = Some(("base.raw".into(), BackingFormat::Raw));
    let mem = Arc::new(MemStorage::new());
    Image::create(&*mem, &create).expect("creating the overlay");
    mem
}

/// A new empty overlay of `size` bytes ([`overlay_memory`]) on a [`CountedFlushes`] storage
/// whose flushes take `delay`, opened; and its flush counter.
pub fn counted_overlay(size: u64, delay: Duration) -> (Image, Arc<AtomicU64>) {
    let flushes = Arc::new(AtomicU64::new(0));
    let storage = Hooked {
        inner: overlay_memory(size),
        hooks: CountedFlushes {
            flushes: Arc::clone(&flushes),
            delay,
        },
    };
    let image = Image::open(Box::new(storage), OpenOptions::default()).expect("opening it");
    (image, flushes)
}
