//! The async block-device trait every layer implements, and the small capability traits where
//! layers differ.
//!
//! Requests read into and write from caller-provided memory ([`IoBufs`]: vectored, owned by the
//! request until it completes, so that dropping a request future at any `.await` is safe and a
//! VMM's guest memory is used without a copy for data already local). [`BlockDevice::read_at`]
//! and [`BlockDevice::write_at`] are the one-`Vec` conveniences on top.
//!
//! The trait says only what is true: a capability a device lacks is `false` in
//! [`Capabilities`] and its method fails with [`Error::Unsupported`] (never a fake answer);
//! [`BlockDevice::reconnect`] reaches through every layer down to an NBD backing; after
//! [`BlockDevice::close`] every request fails with [`Error::Closed`]. No runtime type appears in
//! the trait: futures are `std` futures, and the link state is watched through
//! [`Reconnect::changed`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use crate::buf::{IoBuf, IoBufs};
use crate::error::{Error, Result};
use crate::pool::PoolBuf;

/// The future a [`BlockDevice`] method returns.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// What a range of a device reads as, as far as the device knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Data that may be non-zero.
    Data,
    /// Reads as zeros (a hole, a zero cluster, past a backing's end).
    Zero,
}

/// A run of a device with one [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatusExtent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// What it reads as.
    pub status: Status,
}

/// What a device can do beyond reading. A `false` here means the matching method fails with
/// [`Error::Unsupported`] (or [`Error::ReadOnly`] for writes); nothing is faked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Writes are accepted.
    pub writable: bool,
    /// [`BlockDevice::block_status`] reports real holes and zeros.
    pub block_status: bool,
    /// [`BlockDevice::discard`] frees space.
    pub discard: bool,
    /// Writes with [`WriteFlags::fua`] are durable when they complete.
    pub fua: bool,
    /// The device sits on a network connection that can drop and come back
    /// ([`BlockDevice::reconnect`] returns `Some`).
    pub reconnect: bool,
}

/// Options of one write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteFlags {
    /// Force unit access: the write is durable when it completes (as if followed by a flush
    /// of what it wrote).
    pub fua: bool,
}

impl WriteFlags {
    /// A write that is durable when it completes.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// How a device likes its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Geometry {
    /// Requests at offsets and lengths that are multiples of this are served without a
    /// read-modify-write (1: any byte).
    pub request_alignment: u32,
    /// The unit the device allocates in (a QED cluster), if it has one.
    pub cluster_size: Option<u64>,
}

impl Geometry {
    /// Byte-addressable, no allocation unit.
    pub const BYTES: Geometry = Geometry {
        request_alignment: 1,
        cluster_size: None,
    };

    /// A device allocating in clusters of `cluster_size` bytes.
    pub fn clustered(request_alignment: u32, cluster_size: u64) -> Geometry {
        Geometry {
            request_alignment,
            cluster_size: Some(cluster_size),
        }
    }
}

/// One async block device: a raw file, a QED image, an NBD export, or the copy-on-read device.
///
/// All methods take `&self`; devices are shared between tasks behind an `Arc`.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// The size in bytes.
    fn size(&self) -> u64;

    /// Request alignment and allocation unit.
    fn geometry(&self) -> Geometry {
        Geometry::BYTES
    }

    /// Fills `bufs` with the bytes from `offset` and gives them back. Reads past the end are
    /// refused.
    fn readv(&self, offset: u64, bufs: IoBufs) -> IoFuture<'_, IoBufs>;

    /// Writes `bufs` at `offset` and gives them back.
    fn writev(&self, offset: u64, bufs: IoBufs, flags: WriteFlags) -> IoFuture<'_, IoBufs>;

    /// Makes `[offset, offset + length)` read as zeros.
    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()>;

    /// Frees `[offset, offset + length)`; afterwards it reads as anything the device chooses.
    /// Fails with [`Error::Unsupported`] where [`Capabilities::discard`] is false.
    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()>;

    /// Makes completed writes durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// What `[offset, offset + length)` reads as: extents covering a non-empty prefix of the
    /// range (clamped to the device). Fails with [`Error::Unsupported`] where
    /// [`Capabilities::block_status`] is false (see [`status_padded`] for a caller's fallback).
    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>>;

    /// What the device can do.
    fn capabilities(&self) -> Capabilities;

    /// The state of the connection under this device: its own (NBD), or that of the first
    /// layer below it that rides on one. `None` when nothing under it can drop.
    fn reconnect(&self) -> Option<Arc<dyn Reconnect>> {
        None
    }

    /// A short description: format and name (`raw /a/b.raw`, `nbd nbd+unix:///x?...`).
    fn describe(&self) -> String;

    /// The local files the device reads or writes, its own first and then those of its
    /// backing chain (none for an NBD export), so that a caller can refuse to overwrite one of
    /// them.
    fn files(&self) -> Vec<qed::FileId> {
        Vec::new()
    }

    /// Waits for requests in flight, flushes, and closes its backing (NBD connections say
    /// goodbye). Every request after it fails with [`Error::Closed`]. Files and their image
    /// locks are released when the last reference to the device is dropped.
    fn close(&self) -> IoFuture<'_, ()>;

    /// Reads `[offset, offset + buf.len())` and says what it reads as, in one step, when the
    /// device can answer both from its own storage alone (every byte in data or zero
    /// clusters, or nothing below it to ask). Gives the buffer back unread (`Ok(Err(buf))`)
    /// when it cannot, as the default does: the caller then asks
    /// [`BlockDevice::block_status`] and reads. The buffer is a [`PoolBuf`], so that a
    /// server's page-aligned buffers reach an O_DIRECT file as they are.
    fn read_mapped(&self, offset: u64, buf: PoolBuf) -> IoFuture<'_, MappedRead> {
        let _ = offset;
        Box::pin(async move { Ok(Err(buf)) })
    }

    /// Reads on the calling thread, blocking it, when the device can answer the whole range
    /// from its own storage (nothing below it to ask): gives the filled buffers
    /// (`Ok(Ok(bufs))`), or the buffers back (`Ok(Err(bufs))`) when it cannot, as the default
    /// does; the caller then uses [`BlockDevice::readv`]. Their contents are unspecified then.
    ///
    /// For callers on a thread of their own that may block (a virtqueue worker), never on a
    /// runtime worker: it saves `readv`'s hop to the blocking pool and back.
    fn read_blocking(&self, offset: u64, bufs: IoBufs) -> Result<BlockingRead> {
        let _ = offset;
        Ok(Err(bufs))
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` and gives it back.
    fn read_at(&self, offset: u64, buf: Vec<u8>) -> IoFuture<'_, Vec<u8>> {
        Box::pin(async move { Ok(self.readv(offset, IoBufs::from(buf)).await?.into_vec()) })
    }

    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: Vec<u8>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.writev(offset, IoBufs::from(data), WriteFlags::default())
                .await
                .map(drop)
        })
    }
}

/// What [`BlockDevice::read_blocking`] gives: the filled buffers, or the buffers back when
/// the device could not answer on the calling thread.
pub type BlockingRead = std::result::Result<IoBufs, IoBufs>;

/// What [`BlockDevice::read_mapped`] gives: the filled buffer and status extents covering the
/// whole range in order, or the buffer back unread.
pub type MappedRead = std::result::Result<(PoolBuf, Vec<StatusExtent>), PoolBuf>;

/// Reads `buf.len()` bytes of `device` at `offset` into `buf` itself (a page-aligned one
/// reaches an O_DIRECT file as it is) and gives it back.
pub async fn read_into(device: &dyn BlockDevice, offset: u64, buf: PoolBuf) -> Result<PoolBuf> {
    let read = device
        .readv(offset, IoBufs::from_pool_bufs(vec![buf]))
        .await?;
    Ok(read.into_pool_bufs().pop().unwrap_or_default())
}

/// A run of a layered device that is, or is not, stored locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalExtent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Stored in the local layer (data or zero clusters); `false`: the backing shows through.
    pub local: bool,
}

/// What one populate call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PopulateStats {
    /// Bytes stored as new data clusters.
    pub copied: u64,
    /// Bytes recorded as zero clusters (the backing had zeros there).
    pub zeroed: u64,
    /// Bytes that were already local (allocated or zero clusters) under the lock.
    pub local: u64,
}

/// The capability a stream job needs: a local layer over a backing it can be filled from,
/// safely while guest I/O runs (the copy-on-read device offers it).
pub trait Populate: BlockDevice {
    /// The name in messages and progress.
    fn name(&self) -> &str;
    /// The allocation unit of the local layer.
    fn cluster_size(&self) -> u64;
    /// The device missing ranges come from; `None` once the device stands alone.
    fn backing(&self) -> Option<Arc<dyn BlockDevice>>;
    /// Which runs of `[offset, offset + length)` are local.
    fn local_map(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<LocalExtent>>;
    /// Copies what the local layer lacks of `[offset, offset + length)` (whole clusters) from
    /// the backing, under the same range locks as guest I/O; guest writes are never undone.
    fn populate_range(&self, offset: u64, length: u64) -> IoFuture<'_, PopulateStats>;
    /// The first half of [`Populate::populate_range`], for callers that store many units at
    /// once: locks `[offset, offset + length)` (whole clusters), looks up what the local layer
    /// lacks and reads it from the backing into `chunks`, buffers the caller took from a
    /// [`crate::BufferPool`] for the unit's length before (so no range stays locked while the
    /// pool is full, and a caller that takes them in order never lets a later unit hold the
    /// buffers an earlier one waits for). `chunks` must hold exactly the unit widened to whole
    /// clusters (the unit itself when it is whole clusters, the last one ending at the disk's
    /// end), else [`crate::Error::BuffersMismatch`]. Nothing is stored until
    /// [`Populate::store_fetched`]; dropping the unit unlocks it and gives its buffers back.
    fn fetch_range(
        &self,
        offset: u64,
        length: u64,
        chunks: crate::pool::Chunks,
    ) -> IoFuture<'_, crate::cor::Fetched>;
    /// The second half: stores fetched units (disjoint, in any order) with one flush for them
    /// all before their L2 updates ([`qed::Image::populate_batch`]), then unlocks them and
    /// gives their buffers back. Clusters a guest wrote since are never in a unit (the lock
    /// kept guest writes out).
    fn store_fetched(&self, units: Vec<crate::cor::Fetched>) -> IoFuture<'_, PopulateStats>;
    /// Flushes, drops the backing link from the local layer's header, flushes again, and
    /// closes the backing.
    fn drop_backing_link(&self) -> IoFuture<'_, ()>;
}

/// The capability of a device that rides on a connection that can drop (NBD).
pub trait Reconnect: Send + Sync + fmt::Debug {
    /// The current state.
    fn state(&self) -> LinkState;
    /// Resolves with the new state once it is no longer `seen` (at once if it already is not).
    fn changed(&self, seen: LinkState) -> Pin<Box<dyn Future<Output = LinkState> + Send + '_>>;

    /// Where the connection goes (an NBD URI), for status reports.
    fn address(&self) -> String;

    /// Points the connection at another server `uri` serving the same data: connects, checks
    /// that the export has the same size (else [`Error::RepointSizeMismatch`], nothing
    /// changed), then swaps, so that requests waiting on the old server and every later
    /// request go to the new one. Only the live connection changes: an image header that names
    /// the old server is not rewritten (a caller that wants that rewrites it itself). Fails
    /// with [`Error::Unsupported`] where the connection cannot be repointed.
    fn repoint<'a>(&'a self, uri: &'a str) -> IoFuture<'a, ()> {
        let _ = uri;
        Box::pin(async { Err(Error::Unsupported("this connection cannot be repointed")) })
    }
}

/// The state of a device's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Serving requests.
    Connected,
    /// Lost; requests wait while the device reconnects.
    Reconnecting,
    /// Lost for longer than the reconnect window: requests fail at once while the device goes
    /// on reconnecting in the background; it becomes `Connected` again when the server is back.
    Offline,
    /// Gone for good; requests fail until the device is reopened (or repointed).
    Failed,
}

/// Marks a device closed: requests check it first and fail with [`Error::Closed`].
#[derive(Debug, Default)]
pub(crate) struct Closed(std::sync::atomic::AtomicBool);

impl Closed {
    /// Fails when the device is closed.
    pub(crate) fn check(&self) -> Result<()> {
        if self.0.load(std::sync::atomic::Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }
    /// Marks it closed; true the first time.
    pub(crate) fn close(&self) -> bool {
        !self.0.swap(true, std::sync::atomic::Ordering::AcqRel)
    }
}

/// Checks that `[offset, offset + length)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, length: u64, size: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            offset,
            length,
            size,
        }),
    }
}

/// Fills the ranges a layer lacks in a read at `offset` (`missing`: guest offsets and
/// lengths) from the layer below: read from `backing`, or zeros when there is none.
pub(crate) async fn fill_missing(
    backing: Option<&Arc<dyn BlockDevice>>,
    offset: u64,
    bufs: &mut IoBufs,
    missing: Vec<(u64, u64)>,
) -> Result<()> {
    for (at, len) in missing {
        let s = (at - offset) as usize;
        match backing {
            Some(b) => bufs.copy_in(s, &read_padded(&**b, at, len as usize).await?),
            None => bufs.zero(s, len as usize),
        }
    }
    Ok(())
}

/// Reads `length` bytes at `offset` of `device`, where bytes at or past its end read as zeros
/// (how a backing smaller than its overlay behaves).
pub async fn read_padded(device: &dyn BlockDevice, offset: u64, length: usize) -> Result<Vec<u8>> {
    let size = device.size();
    let inside = if offset >= size {
        0
    } else {
        (size - offset).min(length as u64) as usize
    };
    if inside == 0 {
        return Ok(vec![0u8; length]);
    }
    let mut buf = device.read_at(offset, vec![0u8; inside]).await?;
    buf.resize(length, 0);
    Ok(buf)
}

/// Block status of `device` over `[offset, offset + length)`, where everything at or past its
/// end is [`Status::Zero`] and a device without [`Capabilities::block_status`] says
/// [`Status::Data`] (the caller's choice, made here explicitly). Covers a non-empty prefix of
/// the range.
pub async fn status_padded(
    device: &dyn BlockDevice,
    offset: u64,
    length: u64,
) -> Result<Vec<StatusExtent>> {
    let size = device.size();
    if offset >= size {
        return Ok(vec![StatusExtent {
            offset,
            length,
            status: Status::Zero,
        }]);
    }
    let length = length.min(size - offset);
    let mut out = match device.block_status(offset, length).await {
        Ok(out) => out,
        // A device that cannot tell: everything may be data.
        Err(Error::Unsupported(_)) => Vec::new(),
        Err(e) => return Err(e),
    };
    if out.is_empty() {
        out.push(StatusExtent {
            offset,
            length,
            status: Status::Data,
        });
    }
    Ok(out)
}

/// Merges adjacent extents of the same status.
pub(crate) fn push_extent(out: &mut Vec<StatusExtent>, e: StatusExtent) {
    if e.length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.status == e.status && last.offset + last.length == e.offset => {
            last.length += e.length
        }
        _ => out.push(e),
    }
}
