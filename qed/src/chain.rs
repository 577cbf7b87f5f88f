//! A synchronous chain reader: an [`Image`] over its backing, with the backing reads done here,
//! outside the image, on top of the mapping API.
//!
//! The image answers "where" ([`Image::map`]) and stores whole clusters ([`Image::populate`]);
//! it never reads its backing. This layer moves the bytes for callers that want a plain
//! synchronous disk (`qed` tests, the interop tests, benches, tools): reads fill the
//! unallocated ranges from the backing, and a write that covers only part of an unallocated
//! cluster first copies that cluster up from the backing (a populate, which never overwrites
//! a cluster someone else linked) and then writes in place. The copy-on-read device in the
//! `copy-on-read` crate does the same asynchronously, under its range lock.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{Image, Mapping};
use crate::layer::BackingRead;
use crate::types::GuestOffset;

/// An image and the backing its unallocated clusters read from.
#[derive(Debug)]
pub struct Chain {
    image: Image,
    backing: Option<Arc<dyn BackingRead>>,
}

impl std::ops::Deref for Chain {
    type Target = Image;

    fn deref(&self) -> &Image {
        &self.image
    }
}

impl Chain {
    /// The image over the backing it opened (see [`BackingPolicy`](crate::BackingPolicy)).
    pub fn new(image: Image) -> Chain {
        let backing = image.backing();
        Chain { image, backing }
    }

    /// The image over `backing`, whatever it opened itself.
    pub fn with_backing(image: Image, backing: Option<Arc<dyn BackingRead>>) -> Chain {
        Chain { image, backing }
    }

    /// The image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The image, for closing it.
    pub fn into_image(self) -> Image {
        self.image
    }

    /// Closes the image.
    pub fn close(self) -> Result<()> {
        self.image.close()
    }

    /// Reads the backing's bytes at `guest`: zeros past its end, and everywhere when the
    /// image names no backing file.
    fn read_backing(&self, buf: &mut [u8], guest: GuestOffset) -> Result<()> {
        if !self.image.header().has_backing_file() {
            buf.fill(0);
            return Ok(());
        }
        match &self.backing {
            Some(b) => b.read_at(buf, guest.0),
            None => Err(Error::Backing {
                name: self.image.backing_name().unwrap_or_default(),
                source: "the backing is not opened (detached)".into(),
            }),
        }
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`: the image's data and zero
    /// clusters, the backing where the image has nothing.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let holes = self.image.read_allocated(buf, GuestOffset(offset))?;
        for (at, len) in holes {
            let s = (at - GuestOffset(offset)) as usize;
            self.read_backing(&mut buf[s..s + len as usize], at)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. An unallocated cluster that the write covers only in part
    /// is filled from the backing, merged with the write and stored whole by
    /// [`Image::populate`] (QEMU's order: the whole new cluster, a flush, then the L2 table);
    /// the image writes the rest (in place, or new clusters the write covers whole).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        if data.is_empty() || end > self.image.size() || !self.image.header().has_backing_file() {
            return self.image.write_at(data, offset);
        }
        let (lo, hi) = self.write_edges(Some(data), offset, end)?;
        if lo < hi {
            let s = (lo - offset) as usize;
            self.image.write_at(&data[s..(hi - offset) as usize], lo)?;
        }
        Ok(())
    }

    /// Writes zeros over `[offset, offset + length)` as [`Image::write_zeroes`] does; the
    /// unallocated clusters at the edges that the range covers only in part are filled from
    /// the backing first.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        let end = offset.saturating_add(length);
        if length == 0 || end > self.image.size() || !self.image.header().has_backing_file() {
            return self.image.write_zeroes(offset, length);
        }
        let (lo, hi) = self.write_edges(None, offset, end)?;
        if lo < hi {
            self.image.write_zeroes(lo, hi - lo)?;
        }
        Ok(())
    }

    /// Stores the edge clusters of a write `[offset, end)` (of `data`, or of zeros) that are
    /// unallocated and covered only in part, merged with the backing; returns what is left
    /// for the image to write. A cluster that a concurrent request linked first is written
    /// in place instead.
    fn write_edges(&self, data: Option<&[u8]>, offset: u64, end: u64) -> Result<(u64, u64)> {
        let g = self.image.geometry();
        let cs = g.cluster_size();
        let size = self.image.size();
        let head = g.round_down_to_cluster(offset);
        let tail = g.round_down_to_cluster(end - 1);
        // A write that stops at the disk's end inside its last cluster still copies that
        // cluster up (QEMU keeps the backing's bytes past the end); zeroing to the disk's end
        // makes it a zero cluster, as the image does.
        let cluster_end = |c: u64| match data {
            Some(_) => c + cs,
            None => (c + cs).min(size),
        };
        let partial = |c: u64| offset > c || end < cluster_end(c);
        let (mut lo, mut hi) = (offset, end);
        for c in [head, tail] {
            if (c == tail && c == head && lo >= hi) || !partial(c) {
                continue;
            }
            let at = GuestOffset(c);
            if self.image.mapping_at(at, 1)?.0 != Mapping::Unallocated {
                continue;
            }
            // The whole cluster, past the disk's end too, as QEMU copies it.
            let mut cluster = vec![0u8; cs as usize];
            self.read_backing(&mut cluster, at)?;
            let (s, e) = (offset.max(c), end.min(c + cs));
            let piece = |buf: &mut [u8]| match data {
                Some(d) => buf.copy_from_slice(&d[(s - offset) as usize..(e - offset) as usize]),
                None => buf.fill(0),
            };
            piece(&mut cluster[(s - c) as usize..(e - c) as usize]);
            let stored = self.image.populate_as_data(at, &cluster)?;
            if stored.skipped > 0 {
                // Linked by someone else meanwhile: it is allocated now, write in place.
                let mut bytes = vec![0u8; (e - s) as usize];
                piece(&mut bytes);
                self.image.write_at(&bytes, s)?;
            }
            if c == head {
                lo = e;
            }
            if c == tail {
                hi = hi.min(s).max(lo);
            }
        }
        Ok((lo, hi))
    }
}
