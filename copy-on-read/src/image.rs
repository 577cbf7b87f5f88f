//! A QED image as a block device, reading what it lacks from its backing device. This is how a
//! QED layer *below* the top of a chain is read (read-only, no copy-on-read); the top of a
//! chain is a [`crate::CorDevice`].
//!
//! The `qed` crate is synchronous: mapping lookups, local reads and writes run on tokio's
//! blocking pool (`spawn_blocking`). The image never opens or reads its backing: reads of
//! unallocated ranges go to the backing device asynchronously, so an NBD backing never blocks
//! a thread.

use std::sync::Arc;

use qed::{GuestOffset, Image, Mapping};

use crate::device::{
    check_range, fill_missing, push_extent, status_padded, BlockDevice, Capabilities, Closed,
    Geometry, IoBufs, IoFuture, Reconnect, Status, StatusExtent, WriteFlags,
};
use crate::error::{blocking, Error, Result};

/// Runs one call on a QED image on tokio's blocking pool (the `qed` crate is synchronous),
/// naming the image in its error.
pub(crate) async fn on_image<T, F>(image: &Arc<Image>, name: &str, f: F) -> Result<T>
where
    F: FnOnce(&Image) -> qed::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let image = Arc::clone(image);
    let name = name.to_string();
    blocking(move || f(&image).map_err(Error::qed(&name))).await
}

/// A QED image over an optional backing device (the one its header names, opened by the
/// gate).
#[derive(Debug)]
pub struct QedImage {
    image: Arc<Image>,
    name: String,
    backing: Option<Arc<dyn BlockDevice>>,
    closed: Closed,
}

/// Reads what `image` holds of `[offset, offset + buf.len())` into `buf` (blocking) and
/// returns the unallocated ranges (guest offsets) still to fill from the backing.
pub(crate) fn read_local_into(
    image: &Image,
    name: &str,
    buf: &mut [u8],
    offset: u64,
) -> Result<Vec<(u64, u64)>> {
    let holes = image
        .read_allocated(buf, GuestOffset(offset))
        .map_err(Error::qed(name))?;
    Ok(holes.into_iter().map(|(at, len)| (at.0, len)).collect())
}

/// [`read_local_into`] over every segment of `bufs` (the request at `offset`), blocking: local
/// data lands in the caller's memory with no copy of ours. Returns the buffers and the
/// unallocated ranges (guest offsets) still to fill from the backing.
pub(crate) fn read_local_bufs(
    image: &Image,
    name: &str,
    mut bufs: IoBufs,
    offset: u64,
) -> Result<(IoBufs, Vec<(u64, u64)>)> {
    let mut holes: Vec<(u64, u64)> = Vec::new();
    for (at, seg) in bufs.segments_mut() {
        holes.extend(read_local_into(image, name, seg, offset + at as u64)?);
    }
    Ok((bufs, merge_runs(holes.into_iter())))
}

/// Ascending `(offset, length)` runs with adjacent ones merged: the one form in which the read
/// paths give missing ranges, so that two lists of them compare equal when they cover the
/// same bytes.
pub(crate) fn merge_runs(runs: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (at, l) in runs {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == at => last.1 += l,
            _ => out.push((at, l)),
        }
    }
    out
}

/// The local part of a read: the buffer with allocated and zero ranges filled, and the
/// unallocated ranges (guest offsets) still to fill from the backing.
pub(crate) type LocalRead = (Vec<u8>, Vec<(u64, u64)>);

/// Reads what `image` holds of `[offset, offset + buf.len())` (blocking): the buffer, and the
/// unallocated ranges still to fill from the backing.
pub(crate) fn read_local(
    image: &Image,
    name: &str,
    mut buf: Vec<u8>,
    offset: u64,
) -> Result<LocalRead> {
    let missing = read_local_into(image, name, &mut buf, offset)?;
    Ok((buf, missing))
}

impl QedImage {
    /// Wraps an image and the device its header names (opened through the gate)
    /// (or `None` when it has no backing).
    pub fn new(image: Image, name: String, backing: Option<Arc<dyn BlockDevice>>) -> QedImage {
        QedImage {
            image: Arc::new(image),
            name,
            backing,
            closed: Closed::default(),
        }
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The backing device, if any.
    pub fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.backing.as_ref()
    }
}

/// Block status of a QED image over its backing: data and zero clusters answer, unallocated
/// ranges ask the backing (zeros without one, or past its end).
pub(crate) async fn qed_status(
    image: &Arc<Image>,
    name: &str,
    backing: Option<&Arc<dyn BlockDevice>>,
    offset: u64,
    length: u64,
) -> Result<Vec<StatusExtent>> {
    let size = image.size();
    if offset >= size || length == 0 {
        return Err(Error::OutOfRange {
            offset,
            length,
            size,
        });
    }
    // One answer covers up to 64 GiB: enough to skip a huge sparse backing in few requests.
    let length = length.min(size - offset).min(1 << 36);
    let img = Arc::clone(image);
    let n = name.to_string();
    let extents =
        blocking(move || img.map(GuestOffset(offset), length).map_err(Error::qed(&n))).await?;
    let mut out = Vec::new();
    for e in extents {
        match e.mapping {
            Mapping::Data(_) => push_extent(
                &mut out,
                StatusExtent {
                    offset: e.offset.0,
                    length: e.length,
                    status: Status::Data,
                },
            ),
            Mapping::Zero => push_extent(
                &mut out,
                StatusExtent {
                    offset: e.offset.0,
                    length: e.length,
                    status: Status::Zero,
                },
            ),
            Mapping::Unallocated => match backing {
                None => push_extent(
                    &mut out,
                    StatusExtent {
                        offset: e.offset.0,
                        length: e.length,
                        status: Status::Zero,
                    },
                ),
                Some(b) => {
                    let mut pos = e.offset.0;
                    let end = e.end().0;
                    while pos < end {
                        let sub = status_padded(&**b, pos, end - pos).await?;
                        for s in sub {
                            let s_end = (s.offset + s.length).min(end);
                            if s_end <= pos {
                                continue;
                            }
                            push_extent(
                                &mut out,
                                StatusExtent {
                                    offset: pos,
                                    length: s_end - pos,
                                    status: s.status,
                                },
                            );
                            pos = s_end;
                        }
                    }
                }
            },
        }
    }
    Ok(out)
}

impl BlockDevice for QedImage {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn geometry(&self) -> Geometry {
        Geometry::clustered(1, self.image.geometry().cluster_size())
    }

    fn readv(&self, offset: u64, bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            self.closed.check()?;
            check_range(offset, bufs.len() as u64, self.size())?;
            let image = Arc::clone(&self.image);
            let name = self.name.clone();
            let (mut bufs, missing) =
                blocking(move || read_local_bufs(&image, &name, bufs, offset)).await?;
            fill_missing(self.backing.as_ref(), offset, &mut bufs, missing).await?;
            Ok(bufs)
        })
    }

    fn writev(&self, offset: u64, bufs: IoBufs, flags: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            self.closed.check()?;
            if self.backing.is_some() {
                return Err(Error::Unsupported(
                    "writes to a QED layer with a backing go through a CorDevice",
                ));
            }
            on_image(&self.image, &self.name, move |i| {
                for (at, seg) in bufs.segments() {
                    i.write_at(seg, GuestOffset(offset + at as u64))?;
                }
                if flags.fua {
                    i.flush()?;
                }
                Ok(bufs)
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.closed.check()?;
            if self.backing.is_some() {
                return Err(Error::Unsupported(
                    "writes to a QED layer with a backing go through a CorDevice",
                ));
            }
            on_image(&self.image, &self.name, move |i| {
                i.write_zeroes(GuestOffset(offset), length)
            })
            .await
        })
    }

    fn discard(&self, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        // QED cannot free clusters (QEMU's QED driver ignores discard too): say so.
        Box::pin(async { Err(Error::Unsupported("discard on a QED image")) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.closed.check()?;
            on_image(&self.image, &self.name, |i| i.flush()).await
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        Box::pin(async move {
            self.closed.check()?;
            qed_status(
                &self.image,
                &self.name,
                self.backing.as_ref(),
                offset,
                length,
            )
            .await
        })
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.image.is_read_only() && self.backing.is_none();
        Capabilities {
            writable,
            block_status: true,
            fua: writable,
            reconnect: self.reconnect().is_some(),
            ..Capabilities::default()
        }
    }

    fn reconnect(&self) -> Option<Arc<dyn Reconnect>> {
        self.backing.as_ref().and_then(|b| b.reconnect())
    }

    fn describe(&self) -> String {
        format!("qed {}", self.name)
    }

    fn files(&self) -> Vec<qed::FileId> {
        let mut files: Vec<qed::FileId> = self.image.file_id().into_iter().collect();
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
            if let Some(b) = &self.backing {
                b.close().await?;
            }
            on_image(&self.image, &self.name, |i| i.flush()).await
        })
    }
}
