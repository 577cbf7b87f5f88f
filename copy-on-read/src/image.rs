//! A QED image as a block device, reading what it lacks from its backing device. This is how a
//! QED layer *below* the top of a chain is read (read-only, no copy-on-read); the top of a
//! chain is a [`crate::CorDevice`].
//!
//! The `qed` crate is synchronous: mapping lookups, local reads and writes run on tokio's
//! blocking pool (`spawn_blocking`). The image is opened with `BackingPolicy::Detached`, and
//! reads of unallocated ranges go to the backing device asynchronously, so an NBD backing
//! never blocks a thread.

use std::sync::Arc;

use qed::{Image, Mapping};

use crate::device::{
    check_range, push_extent, read_padded, status_padded, BlockDevice, Capabilities, IoFuture,
    Status, StatusExtent,
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

/// A QED image (backing detached) over an optional backing device.
#[derive(Debug)]
pub struct QedImage {
    image: Arc<Image>,
    name: String,
    backing: Option<Arc<dyn BlockDevice>>,
}

/// The local part of a read: the buffer with allocated and zero ranges filled, and the
/// unallocated ranges (guest offsets) still to fill from the backing.
pub(crate) type LocalRead = (Vec<u8>, Vec<(u64, u64)>);

/// Reads what `image` holds of `[offset, offset + buf.len())` (blocking).
pub(crate) fn read_local(
    image: &Image,
    name: &str,
    mut buf: Vec<u8>,
    offset: u64,
) -> Result<LocalRead> {
    let mut missing = Vec::new();
    let extents = image
        .map(offset, buf.len() as u64)
        .map_err(Error::qed(name))?;
    for e in extents {
        let s = (e.offset - offset) as usize;
        let chunk = &mut buf[s..s + e.length as usize];
        match e.mapping {
            Mapping::Data(host) => image
                .storage()
                .read_at(chunk, host.0)
                .map_err(Error::io("reading image data", host.0))?,
            Mapping::Zero => chunk.fill(0),
            Mapping::Unallocated => missing.push((e.offset, e.length)),
        }
    }
    Ok((buf, missing))
}

impl QedImage {
    /// Wraps an image opened with `BackingPolicy::Detached` and the device its header names
    /// (or `None` when it has no backing).
    pub fn new(image: Image, name: String, backing: Option<Arc<dyn BlockDevice>>) -> QedImage {
        QedImage {
            image: Arc::new(image),
            name,
            backing,
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
    let extents = blocking(move || img.map(offset, length).map_err(Error::qed(&n))).await?;
    let mut out = Vec::new();
    for e in extents {
        match e.mapping {
            Mapping::Data(_) => push_extent(
                &mut out,
                StatusExtent {
                    offset: e.offset,
                    length: e.length,
                    status: Status::Data,
                },
            ),
            Mapping::Zero => push_extent(
                &mut out,
                StatusExtent {
                    offset: e.offset,
                    length: e.length,
                    status: Status::Zero,
                },
            ),
            Mapping::Unallocated => match backing {
                None => push_extent(
                    &mut out,
                    StatusExtent {
                        offset: e.offset,
                        length: e.length,
                        status: Status::Zero,
                    },
                ),
                Some(b) => {
                    let mut pos = e.offset;
                    let end = e.offset + e.length;
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

    fn read_at(&self, offset: u64, buf: Vec<u8>) -> IoFuture<'_, Vec<u8>> {
        Box::pin(async move {
            check_range(offset, buf.len() as u64, self.size())?;
            let image = Arc::clone(&self.image);
            let name = self.name.clone();
            let (mut buf, missing) =
                blocking(move || read_local(&image, &name, buf, offset)).await?;
            for (at, len) in missing {
                let s = (at - offset) as usize;
                let chunk = &mut buf[s..s + len as usize];
                match &self.backing {
                    Some(b) => chunk.copy_from_slice(&read_padded(&**b, at, len as usize).await?),
                    None => chunk.fill(0),
                }
            }
            Ok(buf)
        })
    }

    fn write_at(&self, offset: u64, data: Vec<u8>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.backing.is_some() {
                return Err(Error::Unsupported(
                    "writes to a QED layer with a backing go through a CorDevice",
                ));
            }
            on_image(&self.image, &self.name, move |i| i.write_at(&data, offset)).await
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.backing.is_some() {
                return Err(Error::Unsupported(
                    "writes to a QED layer with a backing go through a CorDevice",
                ));
            }
            on_image(&self.image, &self.name, move |i| {
                i.write_zeroes(offset, length)
            })
            .await
        })
    }

    fn discard(&self, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { on_image(&self.image, &self.name, |i| i.flush()).await })
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        Box::pin(qed_status(
            &self.image,
            &self.name,
            self.backing.as_ref(),
            offset,
            length,
        ))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            writable: !self.image.is_read_only() && self.backing.is_none(),
            block_status: true,
            reconnect: false,
        }
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
            if let Some(b) = &self.backing {
                b.close().await?;
            }
            self.flush().await
        })
    }
}
