//! Shared by the vhost-user-blk tests that drive a scripted device: [`ReadOnly`], which makes
//! a read-only [`BlockDevice`] of a test's [`Reads`] (writes refused, no block status), and
//! [`serve`], a server of such a device with a front end connected to it.

use std::path::Path;
use std::sync::Arc;

use copy_on_read::{
    BlockDevice, BlockingRead, Capabilities, Error, IoBufs, IoFuture, StatusExtent, WriteFlags,
};
use qedstream_tests::vhost_front::VhostFront;
use vhost_user_blk::{BlkBackend, BlkOptions, VhostUserBlkServer};

/// What a scripted test device does: its size, its name and how it reads.
pub trait Reads: Send + Sync + std::fmt::Debug {
    /// The size in bytes.
    fn size(&self) -> u64;
    /// A short name.
    fn describe(&self) -> String;
    /// [`BlockDevice::readv`].
    fn readv(&self, offset: u64, bufs: IoBufs) -> IoFuture<'_, IoBufs>;
    /// [`BlockDevice::read_blocking`]; by default the buffers come back, as there.
    fn read_blocking(&self, offset: u64, bufs: IoBufs) -> copy_on_read::Result<BlockingRead> {
        let _ = offset;
        Ok(Err(bufs))
    }
}

/// A read-only device over `R`'s reads: writes, zeroes and discards fail with
/// [`Error::ReadOnly`], flush and close succeed, block status is unsupported, and it
/// advertises no capability.
#[derive(Debug)]
pub struct ReadOnly<R>(pub Arc<R>);

impl<R: Reads> BlockDevice for ReadOnly<R> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn readv(&self, offset: u64, bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        self.0.readv(offset, bufs)
    }
    fn read_blocking(&self, offset: u64, bufs: IoBufs) -> copy_on_read::Result<BlockingRead> {
        self.0.read_blocking(offset, bufs)
    }
    fn writev(&self, _offset: u64, _bufs: IoBufs, _flags: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async { Err(Error::ReadOnly) })
    }
    fn write_zeroes(&self, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(Error::ReadOnly) })
    }
    fn discard(&self, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(Error::ReadOnly) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, _offset: u64, _length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        Box::pin(async { Err(Error::Unsupported("block status")) })
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// How the front end connects: queues, requests in flight per queue, and the largest request.
#[derive(Debug, Clone, Copy)]
pub struct FrontShape {
    /// Queues it sets up.
    pub queues: u16,
    /// Requests it may have in flight on each.
    pub depth: u16,
    /// The largest data buffer of one request, in bytes.
    pub max_len: u32,
}

/// Starts a vhost-user-blk server of [`ReadOnly`] over `reads` on `dir/blk.sock`, its
/// requests run on `runtime`, with `options`; and connects a front end shaped as `front`.
pub fn serve<R: Reads + 'static>(
    dir: &Path,
    reads: &Arc<R>,
    runtime: &tokio::runtime::Runtime,
    options: &BlkOptions,
    front: FrontShape,
) -> (VhostUserBlkServer, VhostFront) {
    let socket = dir.join("blk.sock");
    let device = Arc::new(ReadOnly(Arc::clone(reads)));
    let backend = BlkBackend::new(device, runtime.handle().clone(), options).unwrap();
    let server = VhostUserBlkServer::start(&socket, backend).unwrap();
    let front = VhostFront::connect(&socket, front.queues, front.depth, front.max_len).unwrap();
    (server, front)
}
