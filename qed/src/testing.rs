//! Test support (above every other module): a storage that records every write and flush,
//! to observe crash order; a patterned backing (which the tests read and merge themselves,
//! as the copy-on-read device does); images on them.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::storage::{MemStorage, Storage};
use crate::types::GuestOffset;

/// One operation seen by [`Recording`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Write { offset: u64, len: u64 },
    Flush,
    SetLen(u64),
}

/// A [`MemStorage`] that logs writes, flushes and resizes.
#[derive(Debug, Default)]
pub(crate) struct Recording {
    inner: MemStorage,
    log: Mutex<Vec<Op>>,
    /// Fail every write with EIO (logged all the same) while set.
    failing: std::sync::atomic::AtomicBool,
}

impl Recording {
    /// A recording storage holding a new image made by `create`.
    pub(crate) fn with_image(options: &crate::CreateOptions) -> Arc<Recording> {
        let r = Arc::new(Recording::default());
        crate::Image::create(&*r, options).unwrap();
        r.take();
        r
    }

    /// The operations since the last call.
    pub(crate) fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.log.lock())
    }

    /// Makes every write fail with EIO from now on (`true`), or succeed again.
    pub(crate) fn fail_writes(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::Release);
    }

    /// The bytes stored.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.inner.to_bytes()
    }
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.lock().push(Op::Write {
            offset,
            len: buf.len() as u64,
        });
        if self.failing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.log.lock().push(Op::Flush);
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.log.lock().push(Op::SetLen(len));
        self.inner.set_len(len)
    }
}

/// A backing whose byte at `offset` is `offset % 251` (never zero-filled by accident).
#[derive(Debug)]
pub(crate) struct Pattern;

impl Pattern {
    pub(crate) fn byte(offset: u64) -> u8 {
        (offset % 251) as u8 + 1
    }

    /// The backing's bytes at `offset`.
    pub(crate) fn fill(buf: &mut [u8], offset: u64) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = Pattern::byte(offset + i as u64);
        }
    }
}

/// An image on recording storage (64 KiB clusters, 4-cluster tables), read-write.
pub(crate) fn image(size: u64) -> (Arc<Recording>, crate::Image) {
    let storage = Recording::with_image(&crate::CreateOptions::new(size));
    let options = crate::OpenOptions::default();
    let image = crate::Image::open(Box::new(Arc::clone(&storage)), options).unwrap();
    storage.take();
    (storage, image)
}

/// Like [`image`], naming the `Pattern` backing as a raw backing (the image never reads it:
/// [`write_over_pattern`] and [`read_over_pattern`] stand in for the copy-on-read device).
pub(crate) fn image_over_pattern(size: u64) -> (Arc<Recording>, crate::Image) {
    let (storage, image) = image(size);
    image
        .set_backing(Some(("pattern", crate::BackingFormat::Raw)))
        .unwrap();
    storage.take();
    (storage, image)
}

/// Writes `data` at `offset` of an image over the `Pattern` backing (within one cluster): an
/// unallocated cluster is merged with the pattern and stored whole, as the copy-on-read
/// device's guest writes do; an allocated one is written in place.
pub(crate) fn write_over_pattern(image: &crate::Image, data: &[u8], offset: u64) {
    let g = image.geometry();
    let c = g.round_down_to_cluster(offset);
    let at = GuestOffset(c);
    if image.mapping_at(at, 1).unwrap().0 != crate::Mapping::Unallocated {
        image.write_at(data, GuestOffset(offset)).unwrap();
        return;
    }
    let mut cluster = vec![0u8; g.cluster_size() as usize];
    Pattern::fill(&mut cluster, c);
    let s = (offset - c) as usize;
    cluster[s..s + data.len()].copy_from_slice(data);
    image.populate_as_data(at, &cluster).unwrap();
}

/// Reads `buf.len()` bytes at `offset` of an image over the `Pattern` backing.
pub(crate) fn read_over_pattern(image: &crate::Image, buf: &mut [u8], offset: u64) {
    for (at, len) in image.read_allocated(buf, GuestOffset(offset)).unwrap() {
        let s = (at.0 - offset) as usize;
        Pattern::fill(&mut buf[s..s + len as usize], at.0);
    }
}

/// The writes in `ops` that touch `[start, end)`.
pub(crate) fn writes_in(ops: &[Op], start: u64, end: u64) -> Vec<Op> {
    ops.iter()
        .copied()
        .filter(
            |op| matches!(*op, Op::Write { offset, len } if offset < end && start < offset + len),
        )
        .collect()
}

/// A file system that fills up as tmpfs does: a write past `limit` bytes stores what fits,
/// then fails with ENOSPC; shrinking always works. The limit can be raised (space freed).
#[derive(Debug)]
pub(crate) struct Filling {
    inner: MemStorage,
    limit: std::sync::atomic::AtomicU64,
    /// A write that covers this offset fails with EIO, writing nothing (u64::MAX: none).
    broken: std::sync::atomic::AtomicU64,
}

impl Filling {
    /// A filling storage holding a new image made by `create`, with no limit yet.
    pub(crate) fn with_image(options: &crate::CreateOptions) -> Arc<Filling> {
        let f = Arc::new(Filling {
            inner: MemStorage::default(),
            limit: std::sync::atomic::AtomicU64::new(u64::MAX),
            broken: std::sync::atomic::AtomicU64::new(u64::MAX),
        });
        crate::Image::create(&*f, options).unwrap();
        f
    }

    /// Lets the file grow to `limit` bytes and no further.
    pub(crate) fn set_limit(&self, limit: u64) {
        self.limit
            .store(limit, std::sync::atomic::Ordering::Release);
    }

    /// Makes every write that covers `offset` fail with EIO (and write nothing).
    pub(crate) fn break_at(&self, offset: u64) {
        self.broken
            .store(offset, std::sync::atomic::Ordering::Release);
    }

    fn limit(&self) -> u64 {
        self.limit.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Storage for Filling {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let broken = self.broken.load(std::sync::atomic::Ordering::Acquire);
        if (offset..offset + buf.len() as u64).contains(&broken) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let fits = self.limit().saturating_sub(offset).min(buf.len() as u64) as usize;
        if fits > 0 {
            self.inner.write_at(&buf[..fits], offset)?;
        }
        if fits < buf.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.limit().max(self.inner.len()?) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.set_len(len)
    }
}
