//! Test support (above every other module): a storage that records every write and flush,
//! to observe crash order; a patterned backing; images on them.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::storage::{MemStorage, Storage};

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
pub(crate) struct Pattern(pub(crate) u64);

impl Pattern {
    pub(crate) fn byte(offset: u64) -> u8 {
        (offset % 251) as u8 + 1
    }
}

impl crate::layer::BackingRead for Pattern {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = Pattern::byte(offset + i as u64);
        }
        Ok(())
    }
    fn size(&self) -> u64 {
        self.0
    }
    fn describe(&self) -> crate::layer::BackingDescription {
        crate::layer::BackingDescription {
            filename: "pattern".into(),
            format: "raw".into(),
            virtual_size: self.0,
            backing: None,
            backing_filename: None,
            cluster_size: None,
        }
    }
}

/// An image on recording storage (64 KiB clusters, 4-cluster tables), read-write, with the
/// backing detached.
pub(crate) fn image(size: u64) -> (Arc<Recording>, crate::Image) {
    let storage = Recording::with_image(&crate::CreateOptions::new(size));
    let options = crate::OpenOptions {
        backing: crate::BackingPolicy::Detached,
        ..crate::OpenOptions::default()
    };
    let image = crate::Image::open(Box::new(Arc::clone(&storage)), options).unwrap();
    storage.take();
    (storage, image)
}

/// Like [`image`], with the `Pattern` backing linked as a raw backing.
pub(crate) fn image_over_pattern(size: u64) -> (Arc<Recording>, crate::Chain) {
    let (storage, image) = image(size);
    let backing = Arc::new(Pattern(size));
    image
        .set_backing(Some(("pattern", crate::BackingFormat::Raw)), Some(backing))
        .unwrap();
    storage.take();
    (storage, crate::Chain::new(image))
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
