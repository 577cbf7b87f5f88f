//! A raw file as a block device. I/O runs on tokio's blocking pool (`spawn_blocking`) through
//! the file's [`qed::Storage`] (pread/pwrite or io_uring, page cache or O_DIRECT, as the
//! [`qed::IoConfig`] says); block status comes from `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::{
    check_range, BlockDevice, BlockingRead, Capabilities, Closed, IoBufs, IoFuture, Status,
    StatusExtent, WriteFlags,
};
use crate::error::{blocking, Error, Result};

/// A raw file. As a backing its size is the file length rounded up to 512 bytes (as QEMU's
/// block layer sees it); the bytes past the end of the file read as zeros.
#[derive(Debug)]
pub struct RawFile {
    file: Arc<File>,
    data: Arc<dyn qed::Storage>,
    path: PathBuf,
    size: u64,
    writable: bool,
    closed: Closed,
}

impl RawFile {
    /// Opens `path` (blocking; call from `spawn_blocking` or at start-up) with QEMU's image
    /// locks: [`qed::Access::ReadWrite`] when `writable`, else [`qed::Access::ReadOnly`].
    pub fn open(path: &Path, writable: bool) -> Result<RawFile> {
        let access = if writable {
            qed::Access::ReadWrite
        } else {
            qed::Access::ReadOnly
        };
        RawFile::open_with(path, access)
    }

    /// Opens `path` for `access` (with its image locks).
    pub fn open_with(path: &Path, access: qed::Access) -> Result<RawFile> {
        let file =
            qed::file::open(path, access).map_err(Error::qed(&path.display().to_string()))?;
        RawFile::from_file(file, path.to_path_buf(), access.writes())
    }

    /// Wraps an open file, with the default [`qed::IoConfig`].
    pub fn from_file(file: File, path: PathBuf, writable: bool) -> Result<RawFile> {
        RawFile::from_file_with(file, path, writable, qed::IoConfig::default())
    }

    /// Wraps an open file; its data is read and written as `io` says (the descriptor is
    /// duplicated: O_DIRECT, when asked for, is set on the file as a whole).
    pub fn from_file_with(
        file: File,
        path: PathBuf,
        writable: bool,
        io: qed::IoConfig,
    ) -> Result<RawFile> {
        let dup = file.try_clone().map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        let data: Arc<dyn qed::Storage> = Arc::from(crate::gate::storage_for(io, dup, &path)?);
        let len = file
            .metadata()
            .map_err(Error::io("sizing raw file", 0))?
            .len();
        Ok(RawFile {
            file: Arc::new(file),
            data,
            path,
            size: len.div_ceil(512) * 512,
            writable,
            closed: Closed::default(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// `lseek(fd, pos, whence)`, or `None` when the call fails.
fn seek(file: &File, pos: u64, whence: libc::c_int) -> std::result::Result<u64, i32> {
    let off = libc::off_t::try_from(pos).map_err(|_| libc::EINVAL)?;
    // SAFETY: lseek only repositions the file offset of a descriptor `file` owns for the
    // duration of the call; no memory is shared with the kernel, and all other I/O on the file
    // is positioned (pread/pwrite), so the moved offset affects nothing.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as u64)
    }
}

/// SEEK_DATA/SEEK_HOLE extents of `[offset, end)`; without support, all data.
fn raw_status(file: &File, offset: u64, end: u64) -> Vec<StatusExtent> {
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(libc::ENXIO) => u64::MAX, // only a hole from here to EOF
            Err(_) => {
                crate::device::push_extent(
                    &mut out,
                    StatusExtent {
                        offset: pos,
                        length: end - pos,
                        status: Status::Data,
                    },
                );
                break;
            }
        };
        if data > pos {
            let hole_end = data.min(end);
            crate::device::push_extent(
                &mut out,
                StatusExtent {
                    offset: pos,
                    length: hole_end - pos,
                    status: Status::Zero,
                },
            );
            pos = hole_end;
            continue;
        }
        let hole = seek(file, pos, libc::SEEK_HOLE).unwrap_or(end).max(pos + 1);
        let data_end = hole.min(end);
        crate::device::push_extent(
            &mut out,
            StatusExtent {
                offset: pos,
                length: data_end - pos,
                status: Status::Data,
            },
        );
        pos = data_end;
    }
    out
}

impl BlockDevice for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn readv(&self, offset: u64, mut bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        let data = Arc::clone(&self.data);
        Box::pin(async move {
            self.closed.check()?;
            check_range(offset, bufs.len() as u64, self.size)?;
            // Straight into the caller's segments.
            blocking(move || {
                for (at, seg) in bufs.segments_mut() {
                    data.read_at(seg, offset + at as u64)
                        .map_err(Error::io("reading raw file", offset + at as u64))?;
                }
                Ok(bufs)
            })
            .await
        })
    }

    fn read_blocking(&self, offset: u64, mut bufs: IoBufs) -> Result<BlockingRead> {
        self.closed.check()?;
        check_range(offset, bufs.len() as u64, self.size)?;
        for (at, seg) in bufs.segments_mut() {
            self.data
                .read_at(seg, offset + at as u64)
                .map_err(Error::io("reading raw file", offset + at as u64))?;
        }
        Ok(Ok(bufs))
    }

    fn writev(&self, offset: u64, bufs: IoBufs, flags: WriteFlags) -> IoFuture<'_, IoBufs> {
        let data = Arc::clone(&self.data);
        Box::pin(async move {
            self.closed.check()?;
            if !self.writable {
                return Err(Error::ReadOnly);
            }
            check_range(offset, bufs.len() as u64, self.size)?;
            blocking(move || {
                for (at, seg) in bufs.segments() {
                    data.write_at(seg, offset + at as u64)
                        .map_err(Error::io("writing raw file", offset + at as u64))?;
                }
                if flags.fua {
                    data.flush()
                        .map_err(Error::io("flushing raw file", offset))?;
                }
                Ok(bufs)
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let mut done = 0;
            while done < length {
                let n = (length - done).min(4 << 20);
                self.write_at(offset + done, vec![0u8; n as usize]).await?;
                done += n;
            }
            Ok(())
        })
    }

    fn discard(&self, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(Error::Unsupported("discard on a raw file")) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        let data = Arc::clone(&self.data);
        let writable = self.writable;
        Box::pin(async move {
            self.closed.check()?;
            if !writable {
                return Ok(());
            }
            blocking(move || data.flush().map_err(Error::io("flushing raw file", 0))).await
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        let file = Arc::clone(&self.file);
        let size = self.size;
        Box::pin(async move {
            self.closed.check()?;
            if offset >= size || length == 0 {
                return Err(Error::OutOfRange {
                    offset,
                    length,
                    size,
                });
            }
            let end = offset + length.min(size - offset);
            blocking(move || Ok(raw_status(&file, offset, end))).await
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            writable: self.writable,
            block_status: true,
            fua: self.writable,
            ..Capabilities::default()
        }
    }

    fn describe(&self) -> String {
        format!("raw {}", self.path.display())
    }

    fn files(&self) -> Vec<qed::FileId> {
        qed::FileId::of(&self.file).into_iter().collect()
    }

    /// Flushes (when writable) and refuses every later request; the file and its image locks
    /// are released when the last reference to the device is dropped.
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let flushed = self.flush().await;
            self.closed.close();
            match flushed {
                Err(Error::Closed) => Ok(()),
                other => other,
            }
        })
    }
}
