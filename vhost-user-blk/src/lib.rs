//! # vhost-user-blk: the copy-on-read disk as a vhost-user-blk device
//!
//! A virtio-blk device model over any [`copy_on_read::BlockDevice`] and a vhost-user back end
//! for it on the rust-vmm crates (`vhost`, `vhost-user-backend`, `virtio-queue`, `vm-memory`,
//! `virtio-bindings`), so that QEMU (`vhost-user-blk-pci`), cloud-hypervisor and crosvm attach
//! the disk with its virtqueues in shared guest memory.
//!
//! - [`config`]: feature bits and the configuration space (capacity, `blk_size`, `seg_max`,
//!   `num_queues`, discard and write-zeroes limits);
//! - [`request`]: [`request::parse`], a pure function from guest memory and one descriptor
//!   chain to a [`request::Request`] or a [`request::Rejection`] (IOERR / UNSUPP, with or
//!   without a status byte to write); never panics on any chain;
//! - [`execute`]: runs a request on the device with guest memory as its buffers;
//! - [`backend`]: [`BlkBackend`] (one worker thread per queue, EVENT_IDX) and
//!   [`VhostUserBlkServer`], which serves one front end after another on a unix socket;
//! - [`fuzzing`]: the descriptor-chain fuzz target's logic and an in-memory disk.
//!
//! ```no_run
//! # fn demo(device: std::sync::Arc<dyn copy_on_read::BlockDevice>) -> vhost_user_blk::Result<()> {
//! use vhost_user_blk::{BlkBackend, BlkOptions, VhostUserBlkServer};
//! let rt = tokio::runtime::Runtime::new().expect("runtime");
//! let backend = BlkBackend::new(device, rt.handle().clone(), &BlkOptions::default())?;
//! let server = VhostUserBlkServer::start("/run/disk.sock".as_ref(), backend)?;
//! // ... QEMU: -chardev socket,path=/run/disk.sock,id=c -device vhost-user-blk-pci,chardev=c
//! server.shutdown();
//! # Ok(()) }
//! ```

pub mod backend;
pub mod config;
pub mod error;
pub mod execute;
pub mod fuzzing;
pub mod request;

pub use backend::{BlkBackend, BlkOptions, QueueStats, VhostUserBlkServer};
pub use error::{Error, Result};

/// The most request queues a device may have (one worker thread each).
pub const MAX_QUEUES: usize = 64;
