//! An in-memory image whose flushes are counted and slow: for tests of how many `fdatasync`
//! calls a piece of work shares. Each flush sleeps a few milliseconds, as a real `fdatasync`
//! does, so that work queues up behind one; nothing asserts on time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qed::{BackingFormat, CreateOptions, Image, MemStorage, OpenOptions, Storage};

/// A storage in memory that counts its flushes, each of which sleeps `delay`.
#[derive(Debug)]
pub struct CountedFlushes {
    mem: Arc<MemStorage>,
    flushes: Arc<AtomicU64>,
    delay: Duration,
}

impl Storage for CountedFlushes {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.flushes.fetch_add(1, Ordering::AcqRel);
        self.mem.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mem.set_len(len)
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
    let storage = CountedFlushes {
        mem: overlay_memory(size),
        flushes: Arc::clone(&flushes),
        delay,
    };
    let image = Image::open(Box::new(storage), OpenOptions::default()).expect("opening it");
    (image, flushes)
}
