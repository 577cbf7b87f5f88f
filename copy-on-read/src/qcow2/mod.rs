//! qcow2 images in a backing chain, read-only, on the `imago` crate.
//!
//! The format answers "where" ([`Qcow2::mapping_at`]); the device ([`Qcow2Image`]) moves the
//! bytes. `imago` (by Hanna Czenczek, a QEMU block maintainer) reads the L1/L2 tables and
//! inflates zlib-compressed clusters; we parse the header ourselves first ([`header`]) so the
//! gate decides before any table is read: encryption, zstd compression, an L1 table that
//! cannot map the virtual size, and an external data file (opened through the gate's rules,
//! like a backing file) are settled here. `imago` never opens a file: it is handed the
//! descriptors the gate opened and locked, and no backing (`set_backing(None)`), so an
//! unallocated cluster is "unallocated" ([`Qcow2Mapping::Unallocated`]) and the device reads
//! it from the backing device the gate stacked below, asynchronously.
//!
//! Threads: `imago` is built with its `sync` feature (plain blocking calls, no runtime of its
//! own); every call runs on tokio's blocking pool (`spawn_blocking`), as the `qed` crate's do.

pub mod header;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::{FormatAccess, ShallowMapping, StorageOpenOptions};

use crate::device::{
    check_range, fill_missing, push_extent, status_padded, BlockDevice, Capabilities, Closed,
    Geometry, IoBufs, IoFuture, Reconnect, Status, StatusExtent, WriteFlags,
};
use crate::error::{blocking, Error, Result};
pub use header::{Header, HeaderError};

/// The storage `imago` reads through: a descriptor the gate opened and locked.
type FileStorage = imago::file::File;

/// At most this many table lookups answer one block-status request (each covers up to one
/// L2 table's worth of clusters): a request over a huge sparse disk returns a prefix.
const STATUS_STEPS: usize = 1 << 14;

/// Why a qcow2 image cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2Error {
    /// The header is refused (see [`HeaderError`]).
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The header could not be read.
    #[error("reading the qcow2 header: {0}")]
    ReadHeader(#[source] std::io::Error),
    /// `imago` refused the image or failed to read its tables or data.
    #[error("{0}")]
    Tables(#[source] std::io::Error),
    /// The external data file could not be opened.
    #[error("external data file {name:?}: {source}")]
    DataFile {
        /// The name in the header.
        name: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// A table lookup made no progress (a damaged image).
    #[error("the qcow2 tables map nothing at offset {0:#x}")]
    NoProgress(u64),
}

/// What one range of a qcow2 image holds, by its own tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Qcow2Mapping {
    /// Data stored at `host_offset` of the image file (or of its external data file).
    Data {
        /// Offset in the file holding the data.
        host_offset: u64,
    },
    /// A compressed cluster (its bytes are inflated on read).
    Compressed,
    /// A zero cluster: reads as zeros, never from the backing.
    Zero,
    /// Not allocated here: the backing's bytes show through (zeros without one).
    Unallocated,
}

/// An open qcow2 image (read-only), its header and its files.
#[derive(Debug)]
pub struct Qcow2 {
    access: FormatAccess<FileStorage>,
    header: Header,
    path: PathBuf,
    /// A duplicate of the image's descriptor: its identity and size on disk.
    file: File,
    /// A duplicate of the external data file's descriptor, and its path.
    data_file: Option<(File, PathBuf)>,
}

/// Reads and parses the header of the qcow2 image in `file`.
pub fn read_header(file: &File) -> std::result::Result<Header, Qcow2Error> {
    let mut buf = vec![0u8; 1 << header::CLUSTER_BITS.end()];
    let mut n = 0;
    // The first cluster at most (2 MiB), stopping at the end of the file.
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(r) => n += r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Qcow2Error::ReadHeader(e)),
        }
    }
    Ok(Header::parse(&buf[..n])?)
}

impl Qcow2 {
    /// Opens the qcow2 image in `file` (opened and locked by the gate) whose `header` was read
    /// by [`read_header`] and passed [`Header::check_readable`]; `data_file` is its external
    /// data file (opened and locked by the gate) when the header needs one. Blocking.
    pub fn open(
        file: File,
        path: &Path,
        header: Header,
        data_file: Option<(File, PathBuf)>,
    ) -> std::result::Result<Qcow2, Qcow2Error> {
        header.check_readable()?;
        if header.has_data_file() != data_file.is_some() {
            return Err(Qcow2Error::Header(HeaderError::DataFileUnnamed));
        }
        let dup = |f: &File| f.try_clone().map_err(Qcow2Error::Tables);
        let own = dup(&file)?;
        let storage = |f: File, p: &Path| {
            FileStorage::from_open_file(f, StorageOpenOptions::new().filename(p))
                .map_err(Qcow2Error::Tables)
        };
        let mut image = imago::qcow2::Qcow2::<FileStorage>::open_image(storage(file, path)?, false)
            .map_err(Qcow2Error::Tables)?;
        image.set_backing(None);
        let data_dup = match &data_file {
            Some((f, p)) => {
                image.set_data_file(Some(storage(dup(f)?, p)?));
                Some((dup(f)?, p.clone()))
            }
            None => {
                image.set_data_file(None);
                None
            }
        };
        Ok(Qcow2 {
            access: FormatAccess::new(image),
            header,
            path: path.to_path_buf(),
            file: own,
            data_file: data_dup,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image file (a duplicate of the descriptor the gate admitted).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The external data file and its path, if the image has one.
    pub fn data_file(&self) -> Option<(&File, &Path)> {
        self.data_file.as_ref().map(|(f, p)| (f, p.as_path()))
    }

    /// The file a [`Qcow2Mapping::Data`] host offset points into.
    pub fn data_storage(&self) -> &File {
        self.data_file().map(|(f, _)| f).unwrap_or(&self.file)
    }

    /// The files the image reads (the image, then its data file).
    pub fn file_ids(&self) -> Vec<qed::FileId> {
        let mut ids: Vec<qed::FileId> = qed::FileId::of(&self.file).into_iter().collect();
        if let Some((f, _)) = &self.data_file {
            ids.extend(qed::FileId::of(f));
        }
        ids
    }

    /// What `[offset, offset + max)` starts with, and for how many bytes (at least one, at
    /// most `max`, clamped to the disk). Blocking: may read an L2 table.
    pub fn mapping_at(
        &self,
        offset: u64,
        max: u64,
    ) -> std::result::Result<(Qcow2Mapping, u64), Qcow2Error> {
        let max = max.min(self.size().saturating_sub(offset));
        if max == 0 {
            return Err(Qcow2Error::NoProgress(offset));
        }
        let (mapping, length) = self
            .access
            .get_shallow_mapping(offset, max)
            .map_err(Qcow2Error::Tables)?;
        let mapping = match mapping {
            ShallowMapping::Raw { offset, .. } => Qcow2Mapping::Data {
                host_offset: offset,
            },
            ShallowMapping::Special { .. } => Qcow2Mapping::Compressed,
            ShallowMapping::Zero { explicit: true, .. } => Qcow2Mapping::Zero,
            // No backing was given to imago: "indirect" cannot occur, and implicit zeros are
            // the clusters this image does not have.
            _ => Qcow2Mapping::Unallocated,
        };
        if length == 0 {
            return Err(Qcow2Error::NoProgress(offset));
        }
        Ok((mapping, length.min(max)))
    }

    /// Reads what the image holds of `[offset, offset + buf.len())` into `buf` and returns
    /// the unallocated ranges (zeroed in `buf`) still to read from the backing. Blocking.
    pub fn read_local(
        &self,
        buf: &mut [u8],
        offset: u64,
    ) -> std::result::Result<Vec<(u64, u64)>, Qcow2Error> {
        let mut missing: Vec<(u64, u64)> = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (mapping, length) = self.mapping_at(at, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + length as usize];
            match mapping {
                Qcow2Mapping::Unallocated => {
                    chunk.fill(0);
                    match missing.last_mut() {
                        Some(last) if last.0 + last.1 == at => last.1 += length,
                        _ => missing.push((at, length)),
                    }
                }
                Qcow2Mapping::Zero => chunk.fill(0),
                Qcow2Mapping::Data { .. } | Qcow2Mapping::Compressed => self
                    .access
                    .read(&mut *chunk, at)
                    .map_err(Qcow2Error::Tables)?,
            }
            done += length as usize;
        }
        Ok(missing)
    }

    /// The image's own map of `[offset, offset + length)` as runs of data, zero and
    /// unallocated (`None`), covering a prefix: at most `STATUS_STEPS` table lookups.
    /// Blocking.
    pub fn status_local(
        &self,
        offset: u64,
        length: u64,
    ) -> std::result::Result<Vec<(u64, u64, Option<Status>)>, Qcow2Error> {
        let end = offset.saturating_add(length).min(self.size());
        let mut out: Vec<(u64, u64, Option<Status>)> = Vec::new();
        let mut pos = offset;
        let mut steps = 0;
        while pos < end && steps < STATUS_STEPS {
            steps += 1;
            let (mapping, n) = self.mapping_at(pos, end - pos)?;
            let status = match mapping {
                Qcow2Mapping::Data { .. } | Qcow2Mapping::Compressed => Some(Status::Data),
                Qcow2Mapping::Zero => Some(Status::Zero),
                Qcow2Mapping::Unallocated => None,
            };
            match out.last_mut() {
                Some(last) if last.2 == status && last.0 + last.1 == pos => last.1 += n,
                _ => out.push((pos, n, status)),
            }
            pos += n;
        }
        Ok(out)
    }
}

/// A qcow2 image over an optional backing device (the one its header names, opened by the
/// gate): read-only, as a layer below the top of a chain.
#[derive(Debug)]
pub struct Qcow2Image {
    image: Arc<Qcow2>,
    name: String,
    backing: Option<Arc<dyn BlockDevice>>,
    closed: Closed,
}

impl Qcow2Image {
    /// Wraps an image and the device its header names (or `None` when it has no backing).
    pub fn new(image: Qcow2, name: String, backing: Option<Arc<dyn BlockDevice>>) -> Qcow2Image {
        Qcow2Image {
            image: Arc::new(image),
            name,
            backing,
            closed: Closed::default(),
        }
    }

    /// The image.
    pub fn image(&self) -> &Arc<Qcow2> {
        &self.image
    }

    /// Runs `f` on the image on tokio's blocking pool.
    async fn on_image<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Qcow2) -> std::result::Result<T, Qcow2Error> + Send + 'static,
        T: Send + 'static,
    {
        let image = Arc::clone(&self.image);
        let name = self.name.clone();
        blocking(move || f(&image).map_err(|source| Error::Qcow2 { path: name, source })).await
    }

    /// The backing's status over `[pos, end)`, or zeros without a backing.
    async fn backing_status(&self, pos: u64, end: u64, out: &mut Vec<StatusExtent>) -> Result<()> {
        let Some(b) = &self.backing else {
            push_extent(
                out,
                StatusExtent {
                    offset: pos,
                    length: end - pos,
                    status: Status::Zero,
                },
            );
            return Ok(());
        };
        let mut pos = pos;
        while pos < end {
            for s in status_padded(&**b, pos, end - pos).await? {
                let s_end = (s.offset + s.length).min(end);
                if s_end <= pos {
                    continue;
                }
                push_extent(
                    out,
                    StatusExtent {
                        offset: pos,
                        length: s_end - pos,
                        status: s.status,
                    },
                );
                pos = s_end;
            }
        }
        Ok(())
    }
}

const READ_ONLY: &str = "qcow2 images are read-only here";

impl BlockDevice for Qcow2Image {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn geometry(&self) -> Geometry {
        Geometry::clustered(1, self.image.header().cluster_size())
    }

    fn readv(&self, offset: u64, bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            self.closed.check()?;
            check_range(offset, bufs.len() as u64, self.size())?;
            let (mut bufs, missing) = self
                .on_image(move |image| {
                    let mut bufs = bufs;
                    let mut missing = Vec::new();
                    for (at, seg) in bufs.segments_mut() {
                        missing.extend(image.read_local(seg, offset + at as u64)?);
                    }
                    Ok((bufs, missing))
                })
                .await?;
            fill_missing(self.backing.as_ref(), offset, &mut bufs, missing).await?;
            Ok(bufs)
        })
    }

    fn writev(&self, _offset: u64, _bufs: IoBufs, _flags: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async { Err(Error::ReadOnly) })
    }

    fn write_zeroes(&self, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(Error::ReadOnly) })
    }

    fn discard(&self, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(Error::Unsupported(READ_ONLY)) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.closed.check() })
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        Box::pin(async move {
            self.closed.check()?;
            let size = self.size();
            if offset >= size || length == 0 {
                return Err(Error::OutOfRange {
                    offset,
                    length,
                    size,
                });
            }
            let runs = self
                .on_image(move |image| image.status_local(offset, length))
                .await?;
            let mut out = Vec::new();
            for (pos, n, status) in runs {
                match status {
                    Some(status) => push_extent(
                        &mut out,
                        StatusExtent {
                            offset: pos,
                            length: n,
                            status,
                        },
                    ),
                    None => self.backing_status(pos, pos + n, &mut out).await?,
                }
            }
            Ok(out)
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            block_status: true,
            reconnect: self.reconnect().is_some(),
            ..Capabilities::default()
        }
    }

    fn reconnect(&self) -> Option<Arc<dyn Reconnect>> {
        self.backing.as_ref().and_then(|b| b.reconnect())
    }

    fn describe(&self) -> String {
        format!("qcow2 {}", self.name)
    }

    fn files(&self) -> Vec<qed::FileId> {
        let mut files = self.image.file_ids();
        if let Some(b) = &self.backing {
            files.extend(b.files());
        }
        files
    }

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if !self.closed.close() {
                return Ok(());
            }
            match &self.backing {
                Some(b) => b.close().await,
                None => Ok(()),
            }
        })
    }
}
