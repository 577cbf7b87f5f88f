//! The async block-device trait every layer implements, and the small capability traits where
//! layers differ.
//!
//! Buffers are owned: a read takes a `Vec<u8>` and gives it back filled, a write takes its data
//! by value. A request's buffer therefore outlives the request even when the future that asked
//! for it is dropped (cancellation is safe at every `.await`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

use crate::error::{Error, Result};

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

/// What a device can do beyond reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes are accepted.
    pub writable: bool,
    /// [`BlockDevice::block_status`] reports real holes and zeros (otherwise it says "data"
    /// everywhere).
    pub block_status: bool,
    /// The device sits on a network connection that can drop and come back
    /// ([`BlockDevice::reconnect`] returns `Some`).
    pub reconnect: bool,
}

/// One async block device: a raw file, a QED image, an NBD export, or the copy-on-read device.
///
/// All methods take `&self`; devices are shared between tasks behind an `Arc`.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// The size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset` and returns it. Reads past the end are refused.
    fn read_at(&self, offset: u64, buf: Vec<u8>) -> IoFuture<'_, Vec<u8>>;

    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: Vec<u8>) -> IoFuture<'_, ()>;

    /// Makes `[offset, offset + length)` read as zeros.
    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()>;

    /// Advises that `[offset, offset + length)` is no longer needed. Devices that cannot free
    /// space (QED) succeed and change nothing, as QEMU does; the contents are then unspecified
    /// only in the sense that they may stay as they were.
    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()>;

    /// Makes completed writes durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// What `[offset, offset + length)` reads as: extents covering a non-empty prefix of the
    /// range (clamped to the device). Devices without [`Capabilities::block_status`] say
    /// [`Status::Data`].
    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>>;

    /// What the device can do.
    fn capabilities(&self) -> Capabilities;

    /// The connection state, for devices that reconnect (NBD).
    fn reconnect(&self) -> Option<&dyn Reconnect> {
        None
    }

    /// The local files the device reads or writes, its own first and then those of its
    /// backing chain (none for an NBD export), so that a caller can refuse to overwrite one of
    /// them.
    fn files(&self) -> Vec<qed::FileId> {
        Vec::new()
    }

    /// A short description: format and name (`raw /a/b.raw`, `nbd nbd+unix:///x?...`).
    fn describe(&self) -> String;

    /// Releases what the device holds (sockets, files) after flushing. Requests after close
    /// fail.
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// The capability of a device that rides on a connection that can drop (NBD).
pub trait Reconnect: Send + Sync {
    /// The current state.
    fn state(&self) -> LinkState;
    /// A receiver that sees every state change.
    fn subscribe(&self) -> watch::Receiver<LinkState>;
}

/// The state of a device's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Serving requests.
    Connected,
    /// Lost; requests wait while the device reconnects.
    Reconnecting,
    /// Gone for good; requests fail until the device is reopened.
    Failed,
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
/// end is [`Status::Zero`]. Covers a non-empty prefix of the range.
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
    let mut out = device
        .block_status(offset, length.min(size - offset))
        .await?;
    if out.is_empty() {
        out.push(StatusExtent {
            offset,
            length: length.min(size - offset),
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
