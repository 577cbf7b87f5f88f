//! Header changes while an image is open: the NEED_CHECK bit around allocations, flush and
//! close, resize, and the backing link.

use std::sync::atomic::Ordering;

use super::Image;
use crate::backing::BackingFormat;
use crate::error::{Error, Result};
use crate::layout::{
    self, Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK, HEADER_SIZE_BYTES,
    SECTOR,
};

/// Header state that changes while the image is open.
#[derive(Debug)]
pub(super) struct HeaderState {
    pub(super) header: Header,
    pub(super) backing_name: Option<String>,
    /// Allocations in flight (NEED_CHECK may not be cleared while any is).
    allocating: u32,
    /// Bumped by each allocation, so a flush knows whether one slipped in.
    generation: u64,
}

impl HeaderState {
    pub(super) fn new(header: Header, backing_name: Option<String>) -> HeaderState {
        HeaderState {
            header,
            backing_name,
            allocating: 0,
            generation: 0,
        }
    }
}

/// Counts an allocation in flight for the NEED_CHECK logic.
pub(super) struct AllocationGuard<'a> {
    image: &'a Image,
}

impl Drop for AllocationGuard<'_> {
    fn drop(&mut self) {
        self.image.state.lock().allocating -= 1;
    }
}

impl Image {
    /// Marks an allocation in flight; sets NEED_CHECK first when there is no backing file.
    pub(super) fn begin_allocation(&self) -> Result<AllocationGuard<'_>> {
        let mut state = self.state.lock();
        if !state.header.has_backing_file() && state.header.features & F_NEED_CHECK == 0 {
            state.header.features |= F_NEED_CHECK;
            let bytes = state.header.encode();
            // Unlike QEMU, flush the bit before any metadata can change: after a power loss
            // with the header write lost, an L2 entry could otherwise point past the end of
            // the file in an image that does not say it needs a check.
            if let Err(e) = self
                .storage
                .write_at(&bytes, 0)
                .and_then(|()| self.storage.flush())
            {
                state.header.features &= !F_NEED_CHECK;
                return Err(Error::io("setting need-check", 0)(e));
            }
        }
        state.allocating += 1;
        state.generation += 1;
        Ok(AllocationGuard { image: self })
    }

    /// With a backing file, new data must be durable before an L2 entry points at it (a
    /// lost data write would otherwise expose stale bytes instead of the backing's).
    pub(super) fn flush_before_metadata(&self) -> Result<()> {
        if self.state.lock().header.has_backing_file() {
            self.storage
                .flush()
                .map_err(Error::io("flushing data before metadata", 0))?;
        }
        Ok(())
    }

    /// True while the header says NEED_CHECK.
    pub(super) fn is_dirty(&self) -> bool {
        self.state.lock().header.features & F_NEED_CHECK != 0
    }

    fn write_header(&self, header: &Header) -> Result<()> {
        self.storage
            .write_at(&header.encode(), 0)
            .map_err(Error::io("writing header", 0))
    }

    /// Makes every completed write durable. When no allocation is in flight, also clears the
    /// NEED_CHECK bit (data and tables are consistent on disk after the flush).
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let generation = self.state.lock().generation;
        self.storage.flush().map_err(Error::io("flushing", 0))?;
        let mut state = self.state.lock();
        if state.header.features & F_NEED_CHECK != 0
            && state.allocating == 0
            && state.generation == generation
        {
            state.header.features &= !F_NEED_CHECK;
            self.write_header(&state.header)?;
            self.storage.flush().map_err(Error::io("flushing", 0))?;
        }
        Ok(())
    }

    /// Clears NEED_CHECK after a successful repair.
    pub(super) fn mark_clean(&self) -> Result<()> {
        self.storage.flush().map_err(Error::io("flushing", 0))?;
        let mut state = self.state.lock();
        if state.header.features & F_NEED_CHECK != 0 {
            state.header.features &= !F_NEED_CHECK;
            self.write_header(&state.header)?;
            self.storage.flush().map_err(Error::io("flushing", 0))?;
        }
        Ok(())
    }

    /// Flushes and closes the image, leaving it clean.
    pub fn close(mut self) -> Result<()> {
        let r = self.flush();
        self.closed = true;
        r
    }

    /// Grows the virtual disk to `new_size` bytes (a multiple of 512); shrinking is refused.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size % SECTOR != 0 {
            return Err(Error::InvalidOptions(
                "the new size must be a multiple of 512",
            ));
        }
        if new_size > layout::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidOptions(
                "the new size exceeds QEMU's maximum disk size (2^63 - 2^30 bytes)",
            ));
        }
        if new_size > self.geometry().max_image_size() {
            return Err(Error::InvalidOptions(
                "the new size exceeds the maximum for this cluster_size/table_size",
            ));
        }
        let mut state = self.state.lock();
        if new_size < state.header.image_size {
            return Err(Error::Shrink);
        }
        let mut header = state.header.clone();
        header.image_size = new_size;
        self.write_header(&header)?;
        state.header = header;
        self.image_size.store(new_size, Ordering::Release);
        self.storage.flush().map_err(Error::io("flushing", 0))
    }

    /// Records a new backing name and format in the header (or none), without copying data,
    /// as `qemu-img rebase -u` does: header and name are written in one write at offset 0,
    /// then flushed. Removing the link clears both backing bits and sets the name to
    /// offset 64, size 0 (as QEMU's block-stream leaves it).
    ///
    /// A power loss keeps each 512-byte sector whole, but not two sectors together: a header
    /// and name that would span sectors (a name over 448 bytes) are written in two steps
    /// instead, the name first where the current header does not look, flushed, then the
    /// 64-byte header that points at it, flushed. The image then names either the old or the
    /// new backing after a crash, never a mix of the two names (one write of both, as QEMU
    /// makes it, could leave the new header with part of the old name). Only when the header
    /// clusters have no such room is the one write kept.
    pub fn set_backing(&self, backing: Option<(&str, BackingFormat)>) -> Result<()> {
        self.check_writable()?;
        let mut state = self.state.lock();
        let (mut header, bytes) = self.backing_header(&state.header, backing)?;
        let name_len = bytes.len() - HEADER_SIZE_BYTES;
        let spare = (bytes.len() as u64 > SECTOR)
            .then(|| self.spare_name_offset(&state.header, name_len as u64))
            .flatten();
        if let Some(at) = spare {
            self.storage
                .write_at(&bytes[HEADER_SIZE_BYTES..], at)
                .and_then(|()| self.storage.flush())
                .map_err(Error::io("writing backing file name", at))?;
            header.backing_filename_offset = at as u32;
            self.storage
                .write_at(&header.encode(), 0)
                .and_then(|()| self.storage.flush())
                .map_err(Error::io("writing header", 0))?;
        } else {
            // A crash between here and the flush leaves either the old or the new header:
            // both describe the same visible data only when the caller made it so (stream,
            // rebase -u).
            self.storage
                .write_at(&bytes, 0)
                .and_then(|()| self.storage.flush())
                .map_err(Error::io("writing header", 0))?;
        }
        state.header = header;
        state.backing_name = backing.map(|(n, _)| n.to_string());
        Ok(())
    }

    /// Where in the header clusters a backing name of `len` bytes can be written without
    /// touching the first sector or the name `current` points at: at 64 when that range
    /// misses the current name (the name then starts in the first sector, which only the
    /// header write that follows changes again), else just past the current name. `None`
    /// when neither fits.
    fn spare_name_offset(&self, current: &Header, len: u64) -> Option<u64> {
        let limit = self.geometry().header_bytes();
        let (used_start, used_end) = if current.has_backing_file() {
            let start = u64::from(current.backing_filename_offset);
            (start, start + u64::from(current.backing_filename_size))
        } else {
            (0, 0)
        };
        let misses = |at: u64| at + len <= used_start || at >= used_end;
        [
            HEADER_SIZE_BYTES as u64,
            used_end.max(HEADER_SIZE_BYTES as u64),
        ]
        .into_iter()
        .find(|&at| at + len <= limit && misses(at))
    }

    /// The header (and the bytes to write at offset 0) that records `backing`.
    fn backing_header(
        &self,
        current: &Header,
        backing: Option<(&str, BackingFormat)>,
    ) -> Result<(Header, Vec<u8>)> {
        let mut header = current.clone();
        header.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        header.backing_filename_offset = HEADER_SIZE_BYTES as u32;
        header.backing_filename_size = 0;
        let Some((name, format)) = backing else {
            let bytes = header.encode().to_vec();
            return Ok((header, bytes));
        };
        if header.compat_features != 0 {
            return Err(Error::UnknownCompatFeatures(header.compat_features));
        }
        if HEADER_SIZE_BYTES as u64 + name.len() as u64 > self.geometry().header_bytes()
            || name.len() >= layout::MAX_BACKING_NAME as usize
        {
            return Err(Error::BackingNameTooLong(name.len()));
        }
        header.features |= F_BACKING_FILE;
        if format == BackingFormat::Raw {
            header.features |= F_BACKING_FORMAT_NO_PROBE;
        }
        header.backing_filename_size = name.len() as u32;
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(name.as_bytes());
        Ok((header, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{image, image_over_pattern, write_over_pattern, Op};

    #[test]
    fn need_check_is_durable_before_the_first_allocation_and_cleared_by_flush() {
        let (s, image) = image(16 << 20);
        image.write_at(&[1u8; 10], crate::GuestOffset(0)).unwrap();
        let ops = s.take();
        // The header write and its flush come before anything else.
        assert_eq!(ops[0], Op::Write { offset: 0, len: 64 });
        assert_eq!(ops[1], Op::Flush);
        assert!(image.is_dirty());
        let on_disk = Header::decode(&s.bytes()[..64]).unwrap();
        assert_ne!(on_disk.features & F_NEED_CHECK, 0);
        // A second allocation does not write the header again.
        image
            .write_at(&[1u8; 10], crate::GuestOffset(1 << 20))
            .unwrap();
        assert!(!s.take().contains(&Op::Write { offset: 0, len: 64 }));
        image.flush().unwrap();
        assert!(!image.is_dirty());
        let on_disk = Header::decode(&s.bytes()[..64]).unwrap();
        assert_eq!(on_disk.features & F_NEED_CHECK, 0);
    }

    #[test]
    fn with_a_backing_file_need_check_is_never_set() {
        let (s, image) = image_over_pattern(16 << 20);
        write_over_pattern(&image, &[1u8; 10], 0);
        assert!(!image.is_dirty());
        assert!(!s.take().contains(&Op::Write { offset: 0, len: 64 }));
    }

    #[test]
    fn an_allocation_in_flight_keeps_need_check() {
        let (_s, image) = image(16 << 20);
        let guard = image.begin_allocation().unwrap();
        image.flush().unwrap();
        assert!(image.is_dirty());
        drop(guard);
        image.flush().unwrap();
        assert!(!image.is_dirty());
    }

    #[test]
    fn a_long_backing_name_is_written_before_the_header_that_points_at_it() {
        let (s, image) = image(16 << 20);
        let first = "a".repeat(600);
        let second = "b".repeat(600);
        for (name, old_at) in [(&first, None), (&second, Some(64u64))] {
            image.set_backing(Some((name, BackingFormat::Raw))).unwrap();
            let ops = s.take();
            let h = Header::decode(&s.bytes()[..64]).unwrap();
            let at = u64::from(h.backing_filename_offset);
            // The name where the header in force does not look, flushed; then the 64-byte
            // header (one sector) that points at it, flushed.
            assert_eq!(
                ops,
                vec![
                    Op::Write {
                        offset: at,
                        len: 600
                    },
                    Op::Flush,
                    Op::Write { offset: 0, len: 64 },
                    Op::Flush
                ]
            );
            if let Some(old) = old_at {
                assert!(
                    at >= old + 600,
                    "the new name overlaps the old one at {old}: {at}"
                );
            }
            let stored = &s.bytes()[at as usize..at as usize + 600];
            assert_eq!(stored, name.as_bytes());
        }
        // A name that fits the first sector with the header: one write, as QEMU makes it.
        image
            .set_backing(Some(("short.raw", BackingFormat::Raw)))
            .unwrap();
        assert_eq!(s.take(), vec![Op::Write { offset: 0, len: 73 }, Op::Flush]);
        let reopened = crate::Image::open(
            Box::new(crate::MemStorage::from_bytes(s.bytes())),
            crate::OpenOptions::default(),
        )
        .unwrap();
        assert_eq!(reopened.backing_name().as_deref(), Some("short.raw"));
    }

    #[test]
    fn resize_grows_only_and_set_backing_round_trips() {
        let (s, image) = image(16 << 20);
        assert!(matches!(image.resize(8 << 20), Err(Error::Shrink)));
        assert!(image.resize((32 << 20) + 1).is_err());
        image.resize(32 << 20).unwrap();
        assert_eq!(
            Header::decode(&s.bytes()[..64]).unwrap().image_size,
            32 << 20
        );
        image
            .set_backing(Some(("b.raw", BackingFormat::Raw)))
            .unwrap();
        assert_eq!(image.backing_format(), Some(BackingFormat::Raw));
        assert_eq!(&s.bytes()[64..69], b"b.raw");
        image.set_backing(None).unwrap();
        let h = Header::decode(&s.bytes()[..64]).unwrap();
        assert_eq!(
            (
                h.features,
                h.backing_filename_offset,
                h.backing_filename_size
            ),
            (0, 64, 0)
        );
    }
}
