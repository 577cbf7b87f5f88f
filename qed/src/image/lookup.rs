//! What a guest range maps to, and reads: data from this image, zeros, or the backing.

use super::{out_of_range, Extent, Image, Mapping};
use crate::error::{Error, Result, TableKind};
use crate::layout::L2Entry;
use crate::types::GuestOffset;

impl Image {
    /// The mapping of the run starting at `guest` (at most `max_len` bytes, within one L2
    /// table): its kind and length. Data runs are contiguous in the file.
    pub(super) fn lookup_run(&self, guest: GuestOffset, max_len: u64) -> Result<(Mapping, u64)> {
        match self.lookup_run_once(guest, max_len) {
            // An image opened read-only only reads: a data entry past the end it knows is
            // either bad or written by another process since it looked (one that `-U` lets
            // it inspect). Look at the file's length again before calling it invalid.
            Err(Error::InvalidEntry {
                table: TableKind::L2,
                ..
            }) if self.is_read_only()
                && self
                    .tables
                    .refresh_file_end()
                    .map_err(Error::io("reading the file's length", 0))? =>
            {
                self.lookup_run_once(guest, max_len)
            }
            other => other,
        }
    }

    fn lookup_run_once(&self, guest: GuestOffset, max_len: u64) -> Result<(Mapping, u64)> {
        let g = self.geometry();
        let span_left = g.l2_span() - (guest.0 & (g.l2_span() - 1));
        let max_len = max_len.min(span_left);
        let Some(table) = self.tables.l2_for(guest)? else {
            return Ok((Mapping::Unallocated, max_len));
        };
        let file_end = self.tables.file_end();
        let cs = g.cluster_size();
        let first = g.l2_index(guest.0) as usize;
        let in_cluster = g.offset_in_cluster(guest.0);
        // `None`: an entry that points somewhere it must not.
        let classify = |raw: u64| -> Option<Mapping> {
            match L2Entry::from_raw(raw) {
                L2Entry::Unallocated => Some(Mapping::Unallocated),
                L2Entry::Zero => Some(Mapping::Zero),
                L2Entry::Data(_) => self.tables.data_offset(raw, file_end).map(Mapping::Data),
            }
        };
        let entry = table.entry(first);
        let kind = classify(entry).ok_or(Error::InvalidEntry {
            table: TableKind::L2,
            guest: guest.0,
            entry,
        })?;
        let mut len = (cs - in_cluster).min(max_len);
        let mut i = first + 1;
        while len < max_len && i < table.len() {
            let Some(next) = classify(table.entry(i)) else {
                break; // the bad entry fails the request that reaches it
            };
            let same = match (kind, next) {
                (Mapping::Data(a), Mapping::Data(b)) => b == a + (i - first) as u64 * cs,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            len = (len + cs).min(max_len);
            i += 1;
        }
        let mapping = match kind {
            Mapping::Data(off) => Mapping::Data(off + in_cluster),
            other => other,
        };
        Ok((mapping, len))
    }

    /// The mapping of `[offset, offset + length)`, as extents of one kind each (data extents
    /// are contiguous in the file). Clamped to the virtual size.
    pub fn map(&self, offset: GuestOffset, length: u64) -> Result<Vec<Extent>> {
        let offset = offset.0;
        let end = offset.saturating_add(length).min(self.size());
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (mapping, len) = self.lookup_run(GuestOffset(pos), end - pos)?;
            let joins = out
                .last()
                .is_some_and(|last| match (last.mapping, mapping) {
                    (Mapping::Data(lh), Mapping::Data(h)) => lh + last.length == h,
                    (a, b) => a == b,
                });
            match out.last_mut() {
                Some(last) if joins => last.length += len,
                _ => out.push(Extent {
                    offset: GuestOffset(pos),
                    length: len,
                    mapping,
                }),
            }
            pos += len;
        }
        Ok(out)
    }

    /// The mapping at `offset` and how far it extends (at most `max_len`, within the disk).
    pub fn mapping_at(&self, offset: GuestOffset, max_len: u64) -> Result<(Mapping, u64)> {
        let size = self.size();
        if offset.0 >= size {
            return Err(out_of_range(offset.0, max_len, size));
        }
        self.lookup_run(offset, max_len.min(size - offset.0))
    }

    /// Reads what this image holds of `[offset, offset + buf.len())` into `buf` (data and
    /// zero clusters) and returns the unallocated ranges, left untouched for the caller to
    /// fill (from the backing: the `copy-on-read` crate does).
    pub fn read_allocated(
        &self,
        buf: &mut [u8],
        offset: GuestOffset,
    ) -> Result<Vec<(GuestOffset, u64)>> {
        self.check_range(offset.0, buf.len() as u64)?;
        let mut holes: Vec<(GuestOffset, u64)> = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (mapping, len) = self.lookup_run(pos, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + len as usize];
            match mapping {
                Mapping::Data(host) => self
                    .storage
                    .read_at(chunk, host.0)
                    .map_err(Error::io("reading data", host.0))?,
                Mapping::Zero => chunk.fill(0),
                Mapping::Unallocated => match holes.last_mut() {
                    Some((at, l)) if *at + *l == pos => *l += len,
                    _ => holes.push((pos, len)),
                },
            }
            done += len as usize;
        }
        Ok(holes)
    }

    /// The error for an unallocated range this image cannot answer alone: its contents are
    /// the backing's, which the image never reads.
    pub(super) fn needs_backing(&self, guest: GuestOffset) -> Error {
        Error::Backing {
            name: self.backing_name().unwrap_or_default(),
            source: format!(
                "{guest} is unallocated: its contents are the backing's, which the image \
                 does not read (read it through the copy-on-read crate's devices)"
            )
            .into(),
        }
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`. Unallocated ranges read as
    /// zeros when the image names no backing file; with one, they fail with
    /// [`Error::Backing`] (the image never reads its backing: use [`Image::read_allocated`]
    /// or the `copy-on-read` crate's devices).
    pub fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        let holes = self.read_allocated(buf, offset)?;
        if let Some(&(at, _)) = holes.first() {
            if self.state.lock().header.has_backing_file() {
                return Err(self.needs_backing(at));
            }
        }
        for (at, len) in holes {
            let s = (at - offset) as usize;
            buf[s..s + len as usize].fill(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        image, image_over_pattern, read_over_pattern, write_over_pattern, Pattern,
    };

    const CS: u64 = 65536;

    #[test]
    fn fresh_clusters_are_unallocated_to_the_end_of_the_table() {
        let (_s, image) = image(8 << 30);
        let span = image.geometry().l2_span();
        assert!(span < 8 << 30);
        // One run per L2 table at most, even when nothing is allocated.
        assert_eq!(
            image.mapping_at(GuestOffset(100), 8 << 30).unwrap(),
            (Mapping::Unallocated, span - 100)
        );
        assert!(image.mapping_at(GuestOffset(8 << 30), 1).is_err());
        assert_eq!(image.map(GuestOffset(0), 8 << 30).unwrap().len(), 1);
    }

    #[test]
    fn allocated_and_zero_clusters_map_as_such() {
        let (_s, image) = image(16 << 20);
        image
            .write_at(&vec![7u8; 3 * CS as usize], crate::GuestOffset(CS))
            .unwrap();
        image
            .write_zeroes(crate::GuestOffset(8 * CS), 2 * CS)
            .unwrap();
        let Mapping::Data(host) = image.mapping_at(GuestOffset(CS + 5), 1 << 20).unwrap().0 else {
            panic!("expected data");
        };
        assert_eq!(
            image.mapping_at(GuestOffset(CS + 5), 1 << 20).unwrap().1,
            3 * CS - 5
        );
        let map = image.map(GuestOffset(0), 16 << 20).unwrap();
        let kinds: Vec<_> = map
            .iter()
            .map(|e| (e.offset.0, e.length, e.mapping))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, CS, Mapping::Unallocated),
                (CS, 3 * CS, Mapping::Data(crate::HostOffset(host.0 - 5))),
                (4 * CS, 4 * CS, Mapping::Unallocated),
                (8 * CS, 2 * CS, Mapping::Zero),
                (10 * CS, (16 << 20) - 10 * CS, Mapping::Unallocated),
            ]
        );
    }

    #[test]
    fn reads_fall_through_to_the_backing_only_where_unallocated() {
        let (_s, image) = image_over_pattern(4 << 20);
        write_over_pattern(&image, &[9u8; 10], CS);
        image.write_zeroes(GuestOffset(2 * CS), CS).unwrap();
        let mut buf = vec![0u8; 3 * CS as usize];
        read_over_pattern(&image, &mut buf, 0);
        assert_eq!(buf[5], Pattern::byte(5));
        assert_eq!(&buf[CS as usize..CS as usize + 10], &[9u8; 10]);
        // The rest of the allocated cluster was filled from the backing when allocated.
        assert_eq!(buf[CS as usize + 10], Pattern::byte(CS + 10));
        assert!(buf[2 * CS as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_image_never_reads_its_backing() {
        let (_s, image) = image_over_pattern(4 << 20);
        write_over_pattern(&image, &[9u8; 10], CS);
        let mut buf = vec![7u8; 2 * CS as usize];
        // Plain reads of unallocated clusters fail; the mapping-level read reports them.
        assert!(matches!(
            image.read_at(&mut buf, GuestOffset(0)),
            Err(Error::Backing { .. })
        ));
        let mut buf = vec![7u8; 2 * CS as usize];
        let holes = image.read_allocated(&mut buf, GuestOffset(0)).unwrap();
        assert_eq!(holes, vec![(GuestOffset(0), CS)]);
        assert_eq!(buf[0], 7, "a hole is left for the caller");
        assert_eq!(buf[CS as usize], 9);
        // A write that covers an unallocated cluster in part needs the backing's bytes.
        assert!(matches!(
            image.write_at(&[1u8; 10], GuestOffset(2 * CS + 5)),
            Err(Error::Backing { .. })
        ));
        assert_eq!(
            image.mapping_at(GuestOffset(2 * CS), 1).unwrap().0,
            Mapping::Unallocated
        );
        // Whole clusters need nothing from the backing.
        image
            .write_at(&vec![2u8; CS as usize], GuestOffset(3 * CS))
            .unwrap();
    }
}
