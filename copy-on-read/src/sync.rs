//! A block device driven from synchronous code: [`SyncDevice`].
//!
//! Tests, benches, the fuzz harness's helpers and tools read and write images from plain
//! threads. Rather than keep a second, synchronous copy of the copy-on-read policy (backing
//! reads, the read-modify-write of partial clusters, the range lock), they drive this crate's
//! async devices from a small tokio runtime of the device's own: one policy, one gate, and the
//! synchronous callers exercise exactly the code a hypervisor runs. Each call is one request,
//! `block_on` on the calling thread; the `qed` work still runs on the runtime's blocking pool,
//! so the cost is a thread hop per request (microseconds; noise next to the I/O).
//!
//! Any number of threads may call one `SyncDevice` at once (a current-thread runtime lets
//! concurrent `block_on` calls take turns driving its I/O). Do not call it from inside an
//! async task: it blocks.
//!
//! ```
//! use copy_on_read::{CorDevice, SyncDevice};
//! use qed::{CreateOptions, Image, MemStorage, OpenOptions};
//!
//! let storage = MemStorage::new();
//! Image::create(&storage, &CreateOptions::new(1 << 20)).unwrap();
//! let image = Image::open(Box::new(storage), OpenOptions::default()).unwrap();
//! let disk = SyncDevice::new(CorDevice::new(image, "mem".into(), None)).unwrap();
//! disk.write_at(b"hello", 1000).unwrap();
//! let mut buf = [0u8; 5];
//! disk.read_at(&mut buf, 1000).unwrap();
//! assert_eq!(&buf, b"hello");
//! disk.close().unwrap();
//! ```

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use qed::Image;

use crate::cor::{CorDevice, CorOptions};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::gate::Gate;

/// A block device and the runtime that drives it, for synchronous callers. It dereferences
/// to the device, so a `SyncDevice<CorDevice>` also answers [`CorDevice::image`] and the rest.
#[derive(Debug)]
pub struct SyncDevice<D: ?Sized = dyn BlockDevice> {
    // Declared first: the device (and the tasks of an NBD client) go before the runtime.
    device: Arc<D>,
    runtime: tokio::runtime::Runtime,
}

/// A runtime for one synchronous device: one thread's worth of scheduling (the caller's),
/// timers and sockets for NBD, and the blocking pool for `qed` and file I/O.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the I/O runtime", 0))
}

impl<D: BlockDevice> SyncDevice<D> {
    /// Drives `device` from a runtime of its own.
    pub fn new(device: D) -> Result<SyncDevice<D>> {
        Ok(SyncDevice {
            device: Arc::new(device),
            runtime: runtime()?,
        })
    }
}

impl SyncDevice<CorDevice> {
    /// Opens the QED image at `path` and its backing chain through `options.gate`
    /// ([`CorDevice::open`]).
    pub fn open(path: &Path, options: CorOptions) -> Result<SyncDevice<CorDevice>> {
        let runtime = runtime()?;
        let device = runtime.block_on(CorDevice::open(path, options))?;
        Ok(SyncDevice {
            device: Arc::new(device),
            runtime,
        })
    }

    /// Stacks an already opened `image` (named `path`, for resolving its backing name) on
    /// the chain its header names, opened through `gate` ([`Gate::open_below`]), with
    /// copy-on-read on or off.
    pub fn stack(
        image: Image,
        path: &Path,
        gate: &Gate,
        copy_on_read: bool,
    ) -> Result<SyncDevice<CorDevice>> {
        let runtime = runtime()?;
        let backing = runtime.block_on(gate.open_below(&image, path, 0))?;
        let device = CorDevice::new(image, path.display().to_string(), backing);
        device.set_copy_on_read(copy_on_read);
        Ok(SyncDevice {
            device: Arc::new(device),
            runtime,
        })
    }
}

impl<D: BlockDevice + ?Sized> SyncDevice<D> {
    /// Drives `device` (shared with others) from `runtime`.
    pub fn with_runtime(runtime: tokio::runtime::Runtime, device: Arc<D>) -> SyncDevice<D> {
        SyncDevice { device, runtime }
    }

    /// The device.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// The runtime its I/O runs on.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// Runs `future` to completion on the device's runtime (from synchronous code only).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.block_on(self.device.read_at(offset, vec![0u8; buf.len()]))?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.block_on(self.device.write_at(offset, data.to_vec()))
    }

    /// Writes zeros over `[offset, offset + length)`.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.block_on(self.device.write_zeroes(offset, length))
    }

    /// Makes what was written durable.
    pub fn flush(&self) -> Result<()> {
        self.block_on(self.device.flush())
    }

    /// Closes the device ([`BlockDevice::close`]) and then its runtime.
    pub fn close(self) -> Result<()> {
        let closed = self.runtime.block_on(self.device.close());
        drop(self.device);
        self.runtime
            .shutdown_timeout(std::time::Duration::from_secs(1));
        closed
    }
}

impl<D: ?Sized> std::ops::Deref for SyncDevice<D> {
    type Target = D;

    fn deref(&self) -> &D {
        &self.device
    }
}
