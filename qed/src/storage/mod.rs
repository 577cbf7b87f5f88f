//! The small I/O trait under an image, and its implementations: a file, memory, and the file
//! backends an [`IoConfig`] chooses.
//!
//! Everything the `qed` crate reads or writes goes through [`Storage`]. Its methods take `&self`
//! so many threads can do positioned I/O at once; an implementation must make concurrent calls
//! on disjoint ranges safe.
//!
//! A file is read and written by one of two backends ([`Aio`], QEMU's `aio=` names):
//! `threads`, the calling thread's own `pread`/`pwrite`/`fdatasync` (`impl Storage for File`),
//! or `io_uring` ([`UringFile`]: one ring for the process, callers block on their own
//! completions, so every calling thread has a request in flight). Either runs through the page
//! cache ([`CacheMode::Writeback`]) or with O_DIRECT ([`CacheMode::None`], QEMU's
//! `cache=none`: flushes are still sent), where [`DirectFile`] takes care of alignment: a
//! buffer at an aligned address ([`AlignedBuf`], as the stream's copy buffers are) goes
//! straight to the kernel, any other through an aligned bounce buffer.
//! [`IoConfig::storage`] turns an open file into the storage the configuration asks for.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use parking_lot::RwLock;

mod aligned;
mod config;
pub mod direct;
pub mod uring;

pub use aligned::AlignedBuf;
pub use config::{Aio, Backend, CacheMode, IoConfig, StorageSetupError};
pub use direct::DirectFile;
pub use uring::UringFile;

/// One positioned transfer on a file, which may be short (one system call, or one ring
/// request): what the buffered and O_DIRECT storages are built on.
pub trait FileIo: Send + Sync + std::fmt::Debug {
    /// The open file (for its length, truncation, `lseek` and identity).
    fn file(&self) -> &File;
    /// Reads at most `buf.len()` bytes at `offset`; 0 at the end of the file.
    fn read_once(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes at most `buf.len()` bytes at `offset`.
    fn write_once(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
}

impl FileIo for File {
    fn file(&self) -> &File {
        self
    }

    fn read_once(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    fn write_once(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        FileExt::write_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// Fills `buf` from `offset`, resubmitting short reads; past the end of the file, zeros.
pub(crate) fn read_full<B: FileIo + ?Sized>(io: &B, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match io.read_once(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Writes all of `buf` at `offset`, resubmitting short writes.
pub(crate) fn write_full<B: FileIo + ?Sized>(io: &B, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match io.write_once(&buf[done..], offset + done as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `lseek(SEEK_DATA)`: where data begins at or after `offset`, `u64::MAX` for none, `None`
/// when the file system cannot say.
pub(crate) fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Ok(None);
    };
    // SAFETY: lseek only repositions the file offset of a descriptor that `file` owns for
    // the duration of the call; no memory is shared with the kernel. Positioned I/O
    // (pread/pwrite, ring requests with offsets) does not depend on the file offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => Ok(Some(u64::MAX)), // no data at or after `offset`
        _ => Ok(None),                           // SEEK_DATA unsupported: assume data
    }
}

/// Positioned, thread-safe byte storage (a file, a block device, memory).
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`. Bytes past the end of the storage read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Where the next data begins at or after `offset` (SEEK_DATA), if the storage knows;
    /// `None` means "not known, assume data".
    fn next_data(&self, _offset: u64) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// The file under the storage, when it is one (to tell whether two names are one file).
    fn file_id(&self) -> Option<crate::file::FileId> {
        None
    }
}

impl Storage for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_full(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn file_id(&self) -> Option<crate::file::FileId> {
        crate::file::FileId::of(self).ok()
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        seek_data(self, offset)
    }
}

/// Storage in memory: for tests, fuzzing and scratch images.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
    /// Refuse to grow past this many bytes (a simulated full disk).
    limit: Option<u64>,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            bytes: RwLock::new(bytes),
            limit: None,
        }
    }

    /// Storage that fails writes past `limit` bytes with ENOSPC.
    pub fn with_limit(bytes: Vec<u8>, limit: u64) -> MemStorage {
        MemStorage {
            bytes: RwLock::new(bytes),
            limit: Some(limit),
        }
    }

    /// A copy of the contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }

    fn check_limit(&self, end: u64) -> io::Result<usize> {
        if let Some(limit) = self.limit {
            if end > limit {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        usize::try_from(end).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    }
}

/// Fills `buf` from `bytes` at `offset` as [`Storage::read_at`] reads: bytes past the end
/// read as zeros. For storages that keep their bytes in memory.
pub fn read_from_bytes(bytes: &[u8], buf: &mut [u8], offset: u64) {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let n = (bytes.len() - start).min(buf.len());
    buf[..n].copy_from_slice(&bytes[start..start + n]);
    buf[n..].fill(0);
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_from_bytes(&self.bytes.read(), buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = self.check_limit(end)?;
        let mut bytes = self.bytes.write();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = self.check_limit(len)?;
        self.bytes.write().resize(len, 0);
        Ok(())
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        (**self).next_data(offset)
    }
    fn file_id(&self) -> Option<crate::file::FileId> {
        (**self).file_id()
    }
}
