//! [`Hooked`]: a storage that runs a test's hooks before it passes each read, write, flush
//! and resize on to the storage under it (memory, a file). The tests that count flushes,
//! record transfers, slow flushes down or fill the disk write only their hooks.

use std::fmt::Debug;
use std::io;

use qed::Storage;

/// What a [`Hooked`] storage runs before each call (but the length): an error is returned
/// instead of making the call. Each does nothing unless written.
pub trait StorageHooks: Send + Sync + Debug {
    /// Before `buf` is read into at `offset` (its bytes are not the read's yet).
    fn read(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    /// Before `buf` is written at `offset`.
    fn write(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    /// Before a flush.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    /// Before the storage is resized to `len` bytes.
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// `inner` with `hooks` run before its reads, writes, flushes and resizes.
#[derive(Debug, Clone)]
pub struct Hooked<S, H> {
    /// The storage under it.
    pub inner: S,
    /// What runs first.
    pub hooks: H,
}

impl<S: Storage, H: StorageHooks> Storage for Hooked<S, H> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.hooks.read(buf, offset)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.hooks.write(buf, offset)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.hooks.flush()?;
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.hooks.set_len(len)?;
        self.inner.set_len(len)
    }
}
