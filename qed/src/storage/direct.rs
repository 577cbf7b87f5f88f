//! O_DIRECT: the alignment rules, aligned bounce buffers, and read-modify-write of the edge
//! sectors of an unaligned write.
//!
//! With O_DIRECT the kernel moves data between the device and the caller's memory without the
//! page cache, and refuses (EINVAL) a transfer whose file offset, length or buffer address is
//! not aligned. The alignment comes from `statx(STATX_DIOALIGN)` when the file system reports
//! it, else 4096. [`DirectFile`] accepts any request:
//!
//! - aligned offset, length and address: straight through;
//! - aligned offset and length, unaligned address: through an aligned bounce buffer of at
//!   most 1 MiB, kept for reuse (up to 16 of them, process-wide) rather than made per request;
//! - an unaligned write: its partial first and last sectors are read, merged and written
//!   whole (read-modify-write); the aligned middle goes as above. Reads past the end of the
//!   file give zeros; a write that ends inside a sector past the end of the file leaves the
//!   file exactly as long as the write reached.
//!
//! **No lost writes.** A read-modify-write of sector S rewrites bytes of S it did not get
//! from its caller, so no other write of S may land between its read and its write. Sectors
//! map onto [`STRIPES`] reader-writer locks (sector number modulo [`STRIPES`]): a
//! read-modify-write holds its sector's stripe exclusively, every other write holds the
//! stripes of all its sectors shared, taken in ascending order (no deadlock). Reads take no
//! lock: a read-modify-write writes back the very bytes it read outside its caller's range,
//! so a concurrent read sees either version of the caller's bytes only. A write that extends
//! the file through a partial sector holds the size lock exclusively, so no other write or
//! truncation can move the end of the file under it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{AlignedBuf, FileIo, Storage};

/// The alignment assumed when the file system does not report its own.
pub const DEFAULT_ALIGN: usize = 4096;

/// Locks the sectors of a file map onto (see the module documentation).
pub const STRIPES: usize = 64;

/// The largest bounce buffer: longer unaligned requests go in pieces.
const BOUNCE_CHUNK: usize = 1 << 20;

/// The alignment O_DIRECT needs for one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alignment {
    /// File offsets and lengths: a power of two.
    pub offset: usize,
    /// Buffer addresses: a power of two.
    pub memory: usize,
}

impl Alignment {
    /// `statx(STATX_DIOALIGN)` of `file`, or [`DEFAULT_ALIGN`] for both when the file system
    /// does not say (or says something that is not a power of two).
    pub fn probe(file: &File) -> Alignment {
        let fallback = Alignment {
            offset: DEFAULT_ALIGN,
            memory: DEFAULT_ALIGN,
        };
        let Some((offset, memory)) = statx_dio_align(file) else {
            return fallback;
        };
        let ok = |a: u32| a.is_power_of_two() && a <= 1 << 16;
        if !ok(offset) || !ok(memory) {
            return fallback;
        }
        Alignment {
            offset: offset as usize,
            memory: memory as usize,
        }
    }

    fn down(self, at: u64) -> u64 {
        at & !(self.offset as u64 - 1)
    }

    fn up(self, at: u64) -> u64 {
        self.down(at + self.offset as u64 - 1)
    }

    fn is_aligned(self, at: u64) -> bool {
        at % self.offset as u64 == 0
    }

    fn buffer_fits(self, buf: &[u8]) -> bool {
        buf.as_ptr() as usize % self.memory == 0 && buf.len() % self.offset == 0
    }
}

fn statx_dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes only into `st`, which lives across the call; the empty path with
    // AT_EMPTY_PATH names the open descriptor itself.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some((st.stx_dio_offset_align, st.stx_dio_mem_align.max(1)))
}

/// Sets O_DIRECT on an open file (`fcntl(F_SETFL)`): EINVAL when its file system refuses.
pub fn set_direct(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL reads the descriptor's status flags; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL changes only the descriptor's status flags; no memory is involved.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bounce buffers of [`BOUNCE_CHUNK`] bytes kept for the next request, at most
/// [`KEPT_BOUNCES`] of them: a fresh zeroed megabyte per request (an mmap, a page fault per
/// page, a munmap) cost an O_DIRECT stream more than the copy through it.
static BOUNCES: parking_lot::Mutex<Vec<AlignedBuf>> = parking_lot::Mutex::new(Vec::new());

/// How many bounce buffers [`BOUNCES`] keeps (16 MiB).
const KEPT_BOUNCES: usize = 16;

/// The first `len` bytes of a bounce buffer aligned to `align`, kept or made; it goes back to
/// [`BOUNCES`] when dropped. Its bytes are whatever the last user left: callers fill all
/// `len` of them (a read, zero-filled past the end of the file, or a copy) before using them.
struct Bounce {
    buf: Option<AlignedBuf>,
    len: usize,
}

impl Bounce {
    fn get(len: usize, align: usize) -> io::Result<Bounce> {
        debug_assert!(len <= BOUNCE_CHUNK);
        let kept = {
            let mut kept = BOUNCES.lock();
            let at = kept.iter().position(|b| b.align() >= align);
            at.map(|i| kept.swap_remove(i))
        };
        let buf = match kept {
            Some(buf) => buf,
            None => AlignedBuf::zeroed(BOUNCE_CHUNK, align.max(DEFAULT_ALIGN))?,
        };
        Ok(Bounce {
            buf: Some(buf),
            len,
        })
    }

    fn as_slice(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b.as_slice()[..self.len])
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        self.buf
            .as_mut()
            .map_or(&mut [], |b| &mut b.as_mut_slice()[..len])
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut kept = BOUNCES.lock();
            if kept.len() < KEPT_BOUNCES {
                kept.push(buf);
            }
        }
    }
}

/// A file opened with O_DIRECT, behind any [`FileIo`] backend (pread/pwrite or io_uring),
/// that accepts requests of any alignment. See the module documentation.
#[derive(Debug)]
pub struct DirectFile<B> {
    io: B,
    align: Alignment,
    stripes: Vec<RwLock<()>>,
    size_lock: RwLock<()>,
}

/// The stripe locks one write holds.
enum StripeGuard<'a> {
    Shared(#[allow(dead_code)] Vec<RwLockReadGuard<'a, ()>>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
}

impl<B: FileIo> DirectFile<B> {
    /// Wraps `io`, whose file already has O_DIRECT set, with the file's alignment.
    pub fn new(io: B) -> DirectFile<B> {
        let align = Alignment::probe(io.file());
        DirectFile::with_alignment(io, align)
    }

    /// Wraps `io` with a given alignment (tests use a coarser one than the file system's).
    pub fn with_alignment(io: B, align: Alignment) -> DirectFile<B> {
        DirectFile {
            io,
            align,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            size_lock: RwLock::new(()),
        }
    }

    /// The alignment in force.
    pub fn alignment(&self) -> Alignment {
        self.align
    }

    fn stripe_of(&self, at: u64) -> usize {
        ((at / self.align.offset as u64) % STRIPES as u64) as usize
    }

    /// Shared locks on the stripes of every sector of the aligned range `[start, end)`.
    fn lock_shared(&self, start: u64, end: u64) -> StripeGuard<'_> {
        let sectors = (end - start) / self.align.offset as u64;
        let mut wanted = [false; STRIPES];
        if sectors >= STRIPES as u64 {
            wanted = [true; STRIPES];
        } else {
            for s in 0..sectors {
                wanted[self.stripe_of(start + s * self.align.offset as u64)] = true;
            }
        }
        let guards = (0..STRIPES)
            .filter(|&i| wanted[i])
            .map(|i| self.stripes[i].read())
            .collect();
        StripeGuard::Shared(guards)
    }

    /// Reads the aligned range at `offset` into the aligned `buf`; bytes past the end of the
    /// file read as zeros.
    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.io.read_once(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    if done % self.align.offset != 0 {
                        break; // a short read that ends mid-sector: the end of the file
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn write_aligned(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        super::write_full(&self.io, buf, offset)
    }

    /// Reads `[offset, offset + buf.len())` through bounce buffers of at most
    /// [`BOUNCE_CHUNK`] bytes.
    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let start = self.align.down(at);
            let stop = self.align.up(end).min(start + BOUNCE_CHUNK as u64);
            let mut bounce = Bounce::get((stop - start) as usize, self.align.memory)?;
            self.read_aligned(bounce.as_mut_slice(), start)?;
            let n = (stop.min(end) - at) as usize;
            let from = (at - start) as usize;
            let to = (at - offset) as usize;
            buf[to..to + n].copy_from_slice(&bounce.as_slice()[from..from + n]);
            at += n as u64;
        }
        Ok(())
    }

    /// Writes an aligned range whose buffer is not aligned in memory, in pieces.
    fn write_bounced(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (i, piece) in buf.chunks(BOUNCE_CHUNK).enumerate() {
            let mut bounce = Bounce::get(piece.len(), self.align.memory)?;
            bounce.as_mut_slice().copy_from_slice(piece);
            self.write_aligned(bounce.as_slice(), offset + (i * BOUNCE_CHUNK) as u64)?;
        }
        Ok(())
    }

    /// Writes an aligned range (`offset` and `buf.len()` aligned) under shared stripe locks.
    fn write_middle(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _size = self.size_lock.read();
        let _stripes = self.lock_shared(offset, offset + buf.len() as u64);
        if self.align.buffer_fits(buf) {
            self.write_aligned(buf, offset)
        } else {
            self.write_bounced(buf, offset)
        }
    }

    /// Writes `piece` into the one sector that holds it (read-modify-write), holding that
    /// sector's stripe exclusively.
    fn write_partial_sector(&self, piece: &[u8], offset: u64) -> io::Result<()> {
        let sector = self.align.down(offset);
        let sector_end = sector + self.align.offset as u64;
        let piece_end = offset + piece.len() as u64;
        {
            let _size = self.size_lock.read();
            let _stripe = StripeGuard::Exclusive(self.stripes[self.stripe_of(sector)].write());
            if self.io.file().metadata()?.len() >= sector_end {
                return self.merge_sector(piece, offset, sector);
            }
        }
        // The sector reaches past the end of the file: write it with every other write and
        // truncation held off, then cut the file back to where the write ended.
        let _size = self.size_lock.write();
        let old_len = self.io.file().metadata()?.len();
        self.merge_sector(piece, offset, sector)?;
        if old_len < sector_end {
            self.io.file().set_len(old_len.max(piece_end))?;
        }
        Ok(())
    }

    fn merge_sector(&self, piece: &[u8], offset: u64, sector: u64) -> io::Result<()> {
        let mut bounce =
            AlignedBuf::zeroed(self.align.offset, self.align.memory.max(DEFAULT_ALIGN))?;
        self.read_aligned(bounce.as_mut_slice(), sector)?;
        let from = (offset - sector) as usize;
        bounce.as_mut_slice()[from..from + piece.len()].copy_from_slice(piece);
        self.write_aligned(bounce.as_slice(), sector)
    }
}

impl<B: FileIo> Storage for DirectFile<B> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        offset
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::InvalidInput)?;
        if self.align.is_aligned(offset) && self.align.buffer_fits(buf) {
            self.read_aligned(buf, offset)
        } else {
            self.read_bounced(buf, offset)
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::InvalidInput)?;
        // [offset, mid_start): the partial first sector; [mid_start, mid_end): whole sectors;
        // [mid_end, end): the partial last sector. Any of them may be empty.
        let mid_start = self.align.up(offset).min(end);
        let mid_end = self.align.down(end).max(mid_start);
        let at = |pos: u64| (pos - offset) as usize;
        if mid_start > offset {
            self.write_partial_sector(&buf[..at(mid_start)], offset)?;
        }
        if mid_end > mid_start {
            self.write_middle(&buf[at(mid_start)..at(mid_end)], mid_start)?;
        }
        if end > mid_end {
            self.write_partial_sector(&buf[at(mid_end)..], mid_end)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.io.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.io.file().metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _size = self.size_lock.write();
        self.io.file().set_len(len)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        super::seek_data(self.io.file(), offset)
    }

    fn file_id(&self) -> Option<crate::file::FileId> {
        crate::file::FileId::of(self.io.file()).ok()
    }
}
