//! Writes of a new output past the page cache: what `convert` stores its data through.
//!
//! A conversion writes each byte of its output once and never reads it back. Through the page
//! cache that costs a copy into the cache per byte and, at the final flush, the whole output
//! written back at once, after the copy is over. [`DirectStorage`] sends whole aligned blocks
//! (the data clusters `convert` reads into [`PooledBuf`]s) straight to the disk with `O_DIRECT`
//! from the caller's memory, while the copy goes on, and everything else (headers, tables,
//! partial clusters) through the ordinary, buffered descriptor. Both descriptors are open file
//! descriptions of the same file (the direct one is reopened through `/proc/self/fd`, never by
//! name), so the one `fdatasync` of [`Storage::flush`] makes both durable.
//!
//! Where the file system refuses `O_DIRECT` (tmpfs on older kernels, FUSE, ...) the storage
//! falls back to buffered writes, at the open or at the first write that fails with `EINVAL`,
//! and says so in a log line.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use copy_on_read::{IoBuf, PoolBuf, RecycledBufs};
use qed::Storage;

/// The alignment of direct I/O: offsets, lengths and memory (a page: at least every logical
/// block size and DMA alignment Linux block devices ask for).
pub const DIRECT_ALIGN: usize = 4096;

/// A file written through two descriptors: whole aligned blocks with `O_DIRECT`, the rest
/// (and every read, flush and size change) through the buffered one.
#[derive(Debug)]
pub struct DirectStorage {
    buffered: File,
    direct: Option<File>,
    /// False once a direct write was refused: every write is buffered from then on.
    direct_ok: AtomicBool,
    /// Bytes written past the page cache so far.
    direct_bytes: Arc<AtomicU64>,
}

impl DirectStorage {
    /// Wraps `file`, opening a second, `O_DIRECT` description of the same file. When that is
    /// refused, every write goes through `file`.
    pub fn new(file: File) -> DirectStorage {
        let direct = match reopen_direct(&file) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::info!(error = %e, "O_DIRECT refused: the output is written through the page cache");
                None
            }
        };
        let direct_ok = AtomicBool::new(direct.is_some());
        DirectStorage {
            buffered: file,
            direct,
            direct_ok,
            direct_bytes: Arc::default(),
        }
    }

    /// A live count of the bytes written past the page cache (it stays readable once the
    /// storage has moved into an image).
    pub fn direct_bytes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.direct_bytes)
    }

    /// True while whole aligned blocks go past the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }

    /// The direct descriptor, when `buf` at `offset` may be written through it.
    fn direct_for(&self, buf: &[u8], offset: u64) -> Option<&File> {
        let aligned = (buf.as_ptr() as usize) % DIRECT_ALIGN == 0
            && buf.len() % DIRECT_ALIGN == 0
            && offset % DIRECT_ALIGN as u64 == 0
            && !buf.is_empty();
        self.direct.as_ref().filter(|_| aligned && self.is_direct())
    }
}

/// A second open file description of `file`'s own inode with `O_DIRECT`, reached through the
/// descriptor (`/proc/self/fd/N`), so it is the file we hold whatever its name now is.
fn reopen_direct(file: &File) -> io::Result<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)?;
    if qed::FileId::of(&direct)? != qed::FileId::of(file)? {
        return Err(io::Error::other("the reopened descriptor is another file"));
    }
    Ok(direct)
}

impl Storage for DirectStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Storage::read_at(&self.buffered, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = self.direct_for(buf, offset) {
            match direct.write_all_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(error = %e, "O_DIRECT write refused: writing through the page cache from now on");
                    self.direct_ok.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
                Ok(()) => {
                    self.direct_bytes
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
        Storage::write_at(&self.buffered, buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        // One inode: fdatasync on either description covers the writes of both.
        Storage::flush(&self.buffered)
    }

    fn len(&self) -> io::Result<u64> {
        Storage::len(&self.buffered)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        Storage::set_len(&self.buffered, len)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Storage::next_data(&self.buffered, offset)
    }

    fn file_id(&self) -> Option<qed::FileId> {
        Storage::file_id(&self.buffered)
    }
}

/// Idle buffers, shared by the buffers that return to it (every one is kept: a copy holds at
/// most its requests in flight).
#[derive(Clone)]
pub struct BufPool(Arc<RecycledBufs>);

impl Default for BufPool {
    fn default() -> BufPool {
        BufPool(Arc::new(RecycledBufs::new(usize::MAX)))
    }
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool")
            .field("idle", &self.idle())
            .finish()
    }
}

impl BufPool {
    /// How many buffers are idle in the pool.
    pub fn idle(&self) -> usize {
        self.0.idle()
    }
}

/// A buffer of [`DIRECT_ALIGN`]-aligned memory that goes back to its pool when dropped, so a
/// copy recycles a bounded set of buffers (a fresh allocation costs a page fault per 4 KiB).
pub struct PooledBuf {
    /// Always there until the buffer is dropped.
    buf: Option<PoolBuf>,
    pool: BufPool,
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuf")
            .field("len", &self.as_bytes().len())
            .finish()
    }
}

impl PooledBuf {
    /// A buffer of `len` bytes from `pool` (its contents are whatever was there last: a
    /// recycled buffer is zeroed once, when made, not at every reuse).
    pub fn take(pool: &BufPool, len: usize) -> PooledBuf {
        PooledBuf {
            buf: Some(pool.0.take(len)),
            pool: pool.clone(),
        }
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.0.give(buf);
        }
    }
}

impl IoBuf for PooledBuf {
    fn as_bytes(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or_default()
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_aligned_and_recycled() {
        let pool = BufPool::default();
        let mut a = PooledBuf::take(&pool, 3 * DIRECT_ALIGN + 5);
        assert_eq!(a.as_bytes().len(), 3 * DIRECT_ALIGN + 5);
        assert_eq!(a.as_bytes().as_ptr() as usize % DIRECT_ALIGN, 0);
        a.as_bytes_mut().fill(7);
        let ptr = a.as_bytes().as_ptr();
        drop(a);
        assert_eq!(pool.idle(), 1);
        let b = PooledBuf::take(&pool, DIRECT_ALIGN);
        assert_eq!(b.as_bytes().as_ptr(), ptr, "the same pages, recycled");
        assert_eq!(b.as_bytes()[0], 7, "not zeroed again when reused smaller");
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn aligned_blocks_go_direct_and_the_rest_buffered_into_one_file() {
        // A block written direct, a head written buffered, a short (unaligned length) write
        // over the direct block buffered: one file with every byte where it was written.
        let dir = qedstream_tests::tempdir();
        let path = dir.path().join("out");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let storage = DirectStorage::new(file);
        let direct = storage.direct_bytes();
        let pool = BufPool::default();
        let mut block = PooledBuf::take(&pool, 2 * DIRECT_ALIGN);
        block.as_bytes_mut().fill(0xab);
        storage.write_at(block.as_bytes(), 8192).unwrap();
        storage.write_at(b"head", 1).unwrap();
        storage
            .write_at(&block.as_bytes()[..DIRECT_ALIGN - 512], 3 * 4096)
            .unwrap();
        storage.flush().unwrap();
        assert!(
            storage.is_direct(),
            "O_DIRECT refused here: run the test on a file system that has it"
        );
        assert_eq!(
            direct.load(Ordering::Relaxed),
            2 * DIRECT_ALIGN as u64,
            "only the aligned block went direct"
        );
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 8192 + 2 * DIRECT_ALIGN);
        assert!(bytes[5..8192].iter().all(|&b| b == 0));
        assert_eq!(&bytes[1..5], b"head");
        assert!(bytes[8192..12288 - 512].iter().all(|&b| b == 0xab));
        assert!(
            bytes[12288 - 512..12288].iter().all(|&b| b == 0xab),
            "written by the first write"
        );
        assert!(bytes[12288..].iter().all(|&b| b == 0xab));
    }
}
