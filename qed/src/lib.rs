//! # qed: QEMU Enhanced Disk images, byte-compatible with QEMU
//!
//! A pure-Rust implementation of the QED image format that QEMU cannot tell apart from its own:
//! images it writes pass `qemu-img check`, and every QED image QEMU writes reads back here.
//!
//! The crate is layered so that the format is one pure module and I/O goes through one small
//! trait. Each module depends only on those listed before it (no module cycles):
//!
//! - [`error`], [`types`] (offset newtypes: [`GuestOffset`], [`HostOffset`],
//!   [`GuestCluster`], [`HostCluster`], [`L1Index`]) and [`layout`]: the on-disk header,
//!   feature bits, geometry rules and table entries (pure).
//! - [`backing`]: what a header records about its backing ([`BackingFormat`]) and the
//!   helpers for backing names and probes (pure). `qed` never opens a backing.
//! - [`file`](mod@file): opening image files as QEMU does: regular files and block devices only, with
//!   QEMU's image locks ([`Access`]), and file identity ([`FileId`]).
//! - [`gate`]: the rules every backing file is admitted by, in one place ([`gate::Rules`]):
//!   opened once, confinement checked on the opened descriptor, loops by file identity,
//!   depth bound, probe policy.
//! - [`storage`]: the [`Storage`] trait (positioned, thread-safe I/O) with a file and an
//!   in-memory implementation, and the file backends an [`IoConfig`] picks (QEMU's names):
//!   `aio=threads` (the calling thread's pread/pwrite) or `aio=io_uring`
//!   ([`storage::UringFile`]: one ring for the process and a reaper thread, callers blocking on
//!   their own completions, so each calling thread has a request in flight; files are not
//!   registered: see the module), through the page cache (`cache=writeback`) or with
//!   O_DIRECT (`cache=none`, [`storage::DirectFile`]: aligned bounce buffers, read-modify-write of partial sectors
//!   under striped sector locks). The default is threads, the faster in every runner case on
//!   the quiet machine; `Aio::Auto` takes io_uring when `io_uring_setup` works in the process
//!   (not under a seccomp filter or an old kernel), else threads.
//! - `tables` (internal): the L1/L2 tables of an open image: the L2 cache, crash-safe
//!   updates under a lock per L2 table, the allocation cursor, and the walk API the check
//!   uses. It answers "where" and keeps metadata consistent; it never touches guest data.
//! - [`check`]: the consistency check and repair, with `qemu-img check`'s counters and exit
//!   codes ([`CheckReport`]). It walks the tables through their API only.
//! - [`image`]: an open [`Image`]: mapping lookups ([`Image::map`], [`Image::mapping_at`],
//!   over [`GuestOffset`]s), reads of what the image holds ([`Image::read_allocated`]
//!   reports the unallocated ranges), crash-safe allocating writes, zero writes, population
//!   with whole clusters ([`Image::populate`]), resize and backing-link changes. The image
//!   never opens or reads its backing (it records the name and format its header holds): a
//!   plain read of an unallocated range, or a write covering part of an unallocated cluster,
//!   needs the backing's bytes and fails with [`Error::Backing`] when the image names a
//!   backing file (zeros without one). It uses `tables` and `check` (the NEED_CHECK repair
//!   at open), never the other way round. It holds no lock on guest ranges: an allocating request claims only the
//!   clusters whose L2 entries it will change, and an entry leaves the unallocated or zero
//!   state only under its claim (so each cluster is allocated once, with no lock across data
//!   I/O); the one range lock belongs to the caller that owns the I/O policy (the
//!   `copy-on-read` device).
//!
//! Reading a backed image is the caller's business: the `copy-on-read` crate opens the
//! backing through its gate (the admission rules of [`gate`]), reads what [`Image::map`] and
//! [`Image::read_allocated`] report as unallocated from it, and copies clusters in with
//! [`Image::populate`]. Its `SyncDevice` drives that from synchronous code.
//!
//! Writes follow QEMU's crash-safe order (data appended at the end of the file and filled
//! whole, a flush when there is a backing file, the L2 table, then the L1 sector); unlike QEMU,
//! many clusters are allocated as one contiguous run, each L2 table is updated once per
//! request, and writes to allocated clusters run concurrently with allocation. An allocating
//! request that fails (a full disk: ENOSPC after the file system stored part of it) gives back
//! the clusters no table on disk can name, truncating the file when they are its last ones,
//! so a full disk leaves no leaked clusters behind (QEMU's QED leaves them); a failed run
//! below a later allocation that succeeded is used again by the next allocation it holds.
//!
//! An image over a backing answers where, and leaves the backing's part to the caller:
//!
//! ```
//! use qed::{BackingFormat, CreateOptions, GuestOffset, Image, MemStorage, OpenOptions};
//!
//! let storage = MemStorage::new();
//! let mut create = CreateOptions::new(1 << 20);
//! create.backing = Some(("base.raw".into(), BackingFormat::Raw));
//! Image::create(&storage, &create).unwrap();
//! let image = Image::open(Box::new(storage), OpenOptions::default()).unwrap();
//! assert_eq!(image.backing_name().as_deref(), Some("base.raw")); // recorded, never opened
//! let mut buf = [0u8; 4];
//! assert!(image.read_at(&mut buf, GuestOffset(0)).is_err()); // the image never reads it
//! let holes = image.read_allocated(&mut buf, GuestOffset(0)).unwrap();
//! assert_eq!(holes, vec![(GuestOffset(0), 4)]); // the caller fills these from the backing
//! image.close().unwrap();
//! ```
//!
//! ```
//! use qed::{CreateOptions, GuestOffset, Image, MemStorage, OpenOptions};
//!
//! let storage = MemStorage::new();
//! Image::create(&storage, &CreateOptions::new(16 << 20)).unwrap();
//! let image = Image::open(Box::new(storage), OpenOptions::default()).unwrap();
//! image.write_at(b"hello", GuestOffset(65_000)).unwrap();
//! let mut buf = [0u8; 5];
//! image.read_at(&mut buf, GuestOffset(65_000)).unwrap();
//! assert_eq!(&buf, b"hello");
//! assert_eq!(image.check(qed::Repair::None).unwrap().exit_code(), 0);
//! image.close().unwrap();
//! ```
//!
//! Close images with [`Image::close`]: there is no async drop, and dropping an image that has
//! allocated clusters without a backing file leaves it marked NEED_CHECK (it is repaired at
//! the next read-write open, as QEMU does).

pub mod backing;
pub mod check;
pub mod error;
pub mod file;
pub mod gate;
pub mod image;
pub mod layout;
pub mod names;
pub mod storage;
mod tables;
#[cfg(test)]
mod testing;
pub mod types;

pub use backing::BackingFormat;
pub use check::{CheckReport, Repair};
pub use error::{Error, Result};
pub use file::{Access, FileId, LockConflict};
pub use image::{CreateOptions, Extent, Image, Mapping, OpenOptions, PopulateOutcome};
pub use layout::{Geometry, Header};
pub use storage::{Aio, Backend, CacheMode, IoConfig, MemStorage, Storage};
pub use types::{GuestCluster, GuestOffset, HostCluster, HostOffset, L1Index};
