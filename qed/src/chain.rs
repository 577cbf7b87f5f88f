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
    /// [`Image::populate_as_data`] (QEMU's order: the whole new cluster, a flush, then the L2
    /// table); the image writes the rest (in place, or new clusters the write covers whole).
    /// Head, middle and tail are stored in guest order, so that a request's new clusters
    /// stay contiguous in the file.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        if data.is_empty() || end > self.image.size() || !self.image.header().has_backing_file() {
            return self.image.write_at(data, offset);
        }
        self.write_around_edges(Some(data), offset, end)
    }

    /// Writes zeros over `[offset, offset + length)` as [`Image::write_zeroes`] does; the
    /// unallocated clusters at the edges that the range covers only in part are filled from
    /// the backing first.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        let end = offset.saturating_add(length);
        if length == 0 || end > self.image.size() || !self.image.header().has_backing_file() {
            return self.image.write_zeroes(offset, length);
        }
        self.write_around_edges(None, offset, end)
    }

    /// Writes `[offset, end)` (of `data`, or zeros): the head cluster, the middle, the tail
    /// cluster, each edge merged with the backing when it needs to be.
    fn write_around_edges(&self, data: Option<&[u8]>, offset: u64, end: u64) -> Result<()> {
        let g = self.image.geometry();
        let cs = g.cluster_size();
        let head = g.round_down_to_cluster(offset);
        let tail = g.round_down_to_cluster(end - 1);
        let lo = if self.store_edge(data, offset, end, head)? {
            (head + cs).min(end)
        } else {
            offset
        };
        let tail_edge = tail > head && self.needs_merge(data, offset, end, tail)?;
        let hi = if tail_edge { tail } else { end };
        if lo < hi {
            self.write_plain(data, offset, lo, hi)?;
        }
        if tail_edge && !self.store_edge(data, offset, end, tail)? {
            self.write_plain(data, offset, tail, end)?;
        }
        Ok(())
    }

    /// Hands `[lo, hi)` of the request at `offset` to the image.
    fn write_plain(&self, data: Option<&[u8]>, offset: u64, lo: u64, hi: u64) -> Result<()> {
        match data {
            Some(d) => {
                let s = (lo - offset) as usize;
                self.image.write_at(&d[s..s + (hi - lo) as usize], lo)
            }
            None => self.image.write_zeroes(lo, hi - lo),
        }
    }

    /// True when cluster `c` is unallocated and `[offset, end)` covers it only in part. A
    /// write that stops at the disk's end inside its last cluster still merges that cluster
    /// (QEMU keeps the backing's bytes past the end); zeroing to the disk's end makes it a
    /// zero cluster instead, as the image does.
    fn needs_merge(&self, data: Option<&[u8]>, offset: u64, end: u64, c: u64) -> Result<bool> {
        let cs = self.image.geometry().cluster_size();
        let cluster_end = match data {
            Some(_) => c + cs,
            None => (c + cs).min(self.image.size()),
        };
        if offset <= c && end >= cluster_end {
            return Ok(false);
        }
        Ok(self.image.mapping_at(GuestOffset(c), 1)?.0 == Mapping::Unallocated)
    }

    /// Stores edge cluster `c` merged with the backing if it needs it, and returns whether it
    /// wrote the request's part of `c` (a cluster that a concurrent request linked first gets
    /// that part written in place).
    fn store_edge(&self, data: Option<&[u8]>, offset: u64, end: u64, c: u64) -> Result<bool> {
        if !self.needs_merge(data, offset, end, c)? {
            return Ok(false);
        }
        let cs = self.image.geometry().cluster_size();
        let at = GuestOffset(c);
        // The whole cluster, past the disk's end too, as QEMU copies it.
        let mut cluster = vec![0u8; cs as usize];
        self.read_backing(&mut cluster, at)?;
        let (s, e) = (offset.max(c), end.min(c + cs));
        if let Some(d) = data {
            cluster[(s - c) as usize..(e - c) as usize]
                .copy_from_slice(&d[(s - offset) as usize..(e - offset) as usize]);
        } else {
            cluster[(s - c) as usize..(e - c) as usize].fill(0);
        }
        let stored = self.image.populate_as_data(at, &cluster)?;
        if stored.skipped > 0 {
            // Linked by someone else meanwhile: it is allocated now, write in place.
            self.write_plain(data, offset, s, e)?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{image_over_pattern, Pattern};

    const CS: u64 = 65536;

    #[test]
    fn partial_edges_are_merged_with_the_backing_and_the_middle_is_left_to_the_image() {
        let (_s, chain) = image_over_pattern(16 << 20);
        // The L2 table exists already (a new one would land between head and middle).
        chain.write_at(&vec![1u8; CS as usize], 8 * CS).unwrap();
        // Clusters 1 (from byte 100), 2, 3 whole, 4 (to byte 200).
        let (offset, len) = (CS + 100, 3 * CS - 100 + 200);
        chain.write_at(&vec![0xeeu8; len as usize], offset).unwrap();
        let mut buf = vec![0u8; 5 * CS as usize];
        chain.read_at(&mut buf, 0).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            let i = i as u64;
            let want = if (offset..offset + len).contains(&i) {
                0xee
            } else {
                Pattern::byte(i)
            };
            assert_eq!(b, want, "byte {i:#x}");
        }
        let kinds: Vec<bool> = chain
            .map(GuestOffset(0), 5 * CS)
            .unwrap()
            .iter()
            .map(|e| matches!(e.mapping, Mapping::Data(_)))
            .collect();
        assert_eq!(
            kinds,
            vec![false, true],
            "clusters 1..=4 are data, contiguous"
        );
        assert_eq!(chain.check(crate::Repair::None).unwrap().exit_code(), 0);
    }

    #[test]
    fn a_partial_zero_write_keeps_the_backing_around_it() {
        let (_s, chain) = image_over_pattern(4 << 20);
        chain.write_zeroes(CS + 10, 20).unwrap();
        let mut buf = vec![0u8; 40];
        chain.read_at(&mut buf, CS).unwrap();
        assert_eq!(buf[9], Pattern::byte(CS + 9));
        assert!(buf[10..30].iter().all(|&b| b == 0));
        assert_eq!(buf[30], Pattern::byte(CS + 30));
        // Zeroing whole clusters needs nothing from the backing: zero clusters.
        chain.write_zeroes(2 * CS, CS).unwrap();
        assert_eq!(
            chain.mapping_at(GuestOffset(2 * CS), 1).unwrap().0,
            Mapping::Zero
        );
    }
}
