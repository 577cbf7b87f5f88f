//! # copy-on-read: block devices and the copy-on-read device
//!
//! One async block-device trait, [`BlockDevice`] (read, write, write zeroes, discard, flush,
//! size, allocation status), and its implementations:
//!
//! - [`RawFile`]: a raw file (block status from `SEEK_DATA`/`SEEK_HOLE`);
//! - [`QedImage`]: a QED image read through its own backing device (the lower layers of a
//!   chain);
//! - [`Qcow2Image`]: a qcow2 image (read-only, on the `imago` crate) read through its own
//!   backing device; compressed clusters are inflated, block status comes from its tables;
//! - [`NbdExport`]: an NBD export through `nbd-client` (block status from `base:allocation`;
//!   the [`Reconnect`] capability reports the connection state and repoints the export at
//!   another server of the same size, [`Reconnect::repoint`]);
//! - [`CorDevice`]: the product: a QED image stacked on its backing chain, with copy-on-read,
//!   guest writes that are never overwritten by older backing data, and the
//!   [`CorDevice::populate_range`] primitive; the stream job (in `engine`) uses its two halves,
//!   [`Populate::fetch_range`] (into a [`BufferPool`] of recycled buffers under a byte
//!   budget, page-aligned over a local backing so that O_DIRECT needs no bounce copy) and
//!   [`Populate::store_fetched`] (many units under one flush, with
//!   [`qed::Image::populate_batch`]). What guest reads fetch is stored after they return, in
//!   batches that share one flush too (the copy-in queue, `copy_in.rs`).
//!
//! The division of labour with `qed`: the format answers "where" ([`qed::Image::map`], over
//! [`qed::GuestOffset`]s) and keeps its metadata consistent; this crate moves the bytes and
//! owns the policy. Backing reads, the read-modify-write of partial clusters and the one lock
//! on guest cluster ranges ([`RangeLock`], over [`qed::GuestCluster`]s) live here; `qed` holds
//! no range lock of its own (only per-cluster claims that a serialized caller never waits on).
//!
//! Backing chains are opened as QEMU reads the header, through one [`Gate`] that can forbid
//! probing, confine file names to a directory, refuse NBD names and bound the chain depth
//! (a chain that loops is an error).
//!
//! Threads: the `qed` crate is synchronous, so every image call runs on tokio's blocking pool
//! (`spawn_blocking`), as do raw-file reads and writes; NBD I/O is async. Nothing blocks the
//! runtime's worker threads. Requests take the caller's memory as [`IoBufs`] (vectored segments
//! of any [`IoBuf`], guest memory included) and hand it back: the request owns it until its I/O
//! has ended, so dropping a request future at any `.await` is safe, and data already in the
//! image is read and written in place. What a device cannot do is absent from its
//! [`Capabilities`] and fails with [`Error::Unsupported`]; the link state of an NBD backing
//! anywhere below is [`BlockDevice::reconnect`]; every request after [`BlockDevice::close`]
//! fails with [`Error::Closed`]. The stream job needs only the [`Populate`] capability.
//!
//! ```no_run
//! # async fn demo() -> Result<(), copy_on_read::Error> {
//! use copy_on_read::{BlockDevice, CorDevice, CorOptions};
//!
//! let dev = CorDevice::open("vm.qed".as_ref(), CorOptions::default()).await?;
//! // A read of clusters the image lacks fetches them from the backing and stores them.
//! let data = dev.read_at(0, vec![0u8; 4096]).await?;
//! dev.write_at(512, vec![0xab; 512]).await?;
//! dev.close().await?;
//! # let _ = data; Ok(()) }
//! ```
//!
//! Synchronous callers (tests, benches, tools) drive the same devices through
//! [`SyncDevice`], a device and a small runtime of its own: the copy-on-read policy exists
//! once, here, async.
//!
//! Close devices with [`BlockDevice::close`]: there is no async drop.

pub mod buf;
mod copy_in;
pub mod cor;
pub mod device;
pub mod error;
pub mod gate;
pub mod image;
pub mod lock;
pub mod nbd;
pub mod pool;
pub mod qcow2;
pub mod raw;
pub mod sync;

pub use buf::{IoBuf, IoBufs};
pub use cor::{CorDevice, CorOptions, CorStats, Fetched, PopulateStats};
pub use device::{
    read_into, read_padded, status_padded, BlockDevice, BlockingRead, Capabilities, Geometry,
    IoFuture, LinkState, LocalExtent, MappedRead, Populate, Reconnect, Status, StatusExtent,
    WriteFlags,
};
pub use error::{Error, GateRefusal, Result};
pub use gate::Gate;
pub use image::QedImage;
pub use lock::{RangeGuard, RangeLock};
pub use nbd::NbdExport;
pub use pool::{BufferPool, Chunks, PoolBuf, PoolStats, RecycledBufs, PAGE_ALIGN};
pub use qcow2::{Qcow2, Qcow2Image};
/// The page-aligned memory a [`PoolBuf::Aligned`] holds.
pub use qed::storage::AlignedBuf;
pub use raw::RawFile;
pub use sync::SyncDevice;
