//! Creating images and opening them: header validation as QEMU does it, autoclear bits,
//! loading the tables, NEED_CHECK repair. The backing is recorded (name and format), never
//! opened.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use parking_lot::Mutex;

use super::claims::Claims;
use super::{CreateOptions, HeaderState, Image, OpenOptions};
use crate::backing::BackingFormat;
use crate::check::Repair;
use crate::error::{Error, Result};
use crate::file::{Access, FileId};
use crate::layout::{
    self, Geometry, Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK,
    HEADER_SIZE_BYTES, MAGIC, SECTOR,
};
use crate::storage::Storage;
use crate::tables::Tables;
use crate::types::HostOffset;

impl Image {
    /// Writes a new, empty image to `storage` (which should be empty), exactly as
    /// `qemu-img create -f qed` does for the same arguments.
    pub fn create(storage: &dyn Storage, options: &CreateOptions) -> Result<()> {
        let (head, file_len) = plan_create(options)?;
        write_new(storage, &head, file_len)
    }

    /// Creates the file at `path` (replacing what it held) and writes a new image.
    pub fn create_path(path: &Path, options: &CreateOptions) -> Result<()> {
        Image::create_file(path, options, &[]).map(drop)
    }

    /// Creates the image at `path` as [`Image::create_path`] does, and returns its file, held
    /// with the read-write image locks ([`Access::ReadWrite`]) so that nobody can take it
    /// before the caller opens it ([`Image::open`]). Every option is validated before the file
    /// is touched; a file another process holds is refused untouched (image locks); a path
    /// that names one of `inputs` (through symlinks or hard links) is refused untouched.
    pub fn create_file(path: &Path, options: &CreateOptions, inputs: &[FileId]) -> Result<File> {
        let (head, file_len) = plan_create(options)?;
        let file = crate::file::create(path, inputs)?;
        write_new(&file, &head, file_len)?;
        crate::file::lock(&file, Access::ReadWrite)?;
        Ok(file)
    }

    /// As [`Image::create_file`], writing the new image through the storage `io` asks for
    /// (O_DIRECT for [`crate::CacheMode::None`]) and flushing it.
    pub fn create_file_with(
        path: &Path,
        options: &CreateOptions,
        inputs: &[FileId],
        io: crate::IoConfig,
    ) -> Result<File> {
        let (head, file_len) = plan_create(options)?;
        let file = crate::file::create(path, inputs)?;
        let dup = file
            .try_clone()
            .map_err(Error::io("opening the new image", 0))?;
        let storage = io
            .storage(dup)
            .map_err(Error::io("opening the new image", 0))?;
        write_new(&*storage, &head, file_len)?;
        storage
            .flush()
            .map_err(Error::io("flushing the new image", 0))?;
        crate::file::lock(&file, Access::ReadWrite)?;
        Ok(file)
    }

    /// Opens the file at `path`, with QEMU's image locks: [`Access::ReadWrite`], or
    /// [`Access::ReadOnly`] when `options.read_only` ([`Access::SharedRead`] with
    /// `options.force_share`).
    pub fn open_path(path: &Path, mut options: OpenOptions) -> Result<Image> {
        let access = match (options.read_only, options.force_share) {
            (false, _) => Access::ReadWrite,
            (true, false) => Access::ReadOnly,
            (true, true) => Access::SharedRead,
        };
        let file = crate::file::open(path, access)?;
        options.path = Some(path.to_path_buf());
        Image::open(Box::new(file), options)
    }

    /// Opens an image on `storage`: validates the header as QEMU does, clears unknown
    /// autoclear bits (read-write only), loads the L1 table, repairs the image if it is marked
    /// NEED_CHECK (read-write only), and opens the backing as `options.backing` says.
    pub fn open(storage: Box<dyn Storage>, options: OpenOptions) -> Result<Image> {
        let storage: Arc<dyn Storage> = Arc::from(storage);
        let file_len = storage.len().map_err(Error::io("sizing image", 0))?;
        let mut header = read_header(&*storage, file_len)?;
        let geometry = header.validate(file_len)?;
        let backing_name = read_backing_name(&*storage, &header)?;
        if !options.read_only && header.autoclear_features != 0 {
            header.autoclear_features = 0;
            storage
                .write_at(&header.encode(), 0)
                .and_then(|()| storage.flush())
                .map_err(Error::io("clearing autoclear features", 0))?;
        }
        let tables = Tables::load(
            Arc::clone(&storage),
            geometry,
            HostOffset(header.l1_table_offset),
            file_len,
            options.l2_cache_tables,
        )?;
        let need_check = header.features & F_NEED_CHECK != 0;
        let mut image = Image {
            storage,
            tables,
            read_only: options.read_only,
            path: options.path.clone(),
            image_size: AtomicU64::new(header.image_size),
            state: Mutex::new(HeaderState::new(header, backing_name)),
            claims: Claims::default(),
            closed: false,
        };
        if need_check && !options.read_only && options.repair_on_open {
            image.repair_on_open()?;
        }
        image.closed = image.read_only;
        Ok(image)
    }

    /// QEMU's answer to NEED_CHECK at a read-write open: repair everything, fail if the
    /// check itself fails.
    fn repair_on_open(&self) -> Result<()> {
        let report = self.check(Repair::All)?;
        if report.check_errors > 0 {
            return Err(Error::CheckFailed {
                corruptions: report.corruptions,
                check_errors: report.check_errors,
            });
        }
        Ok(())
    }
}

/// Reads and decodes the header; a file too short for one is "not QED" when its magic says
/// so, and truncated otherwise.
fn read_header(storage: &dyn Storage, file_len: u64) -> Result<Header> {
    let mut head = [0u8; HEADER_SIZE_BYTES];
    if file_len < HEADER_SIZE_BYTES as u64 {
        storage
            .read_at(&mut head[..file_len as usize], 0)
            .map_err(Error::io("reading header", 0))?;
        if file_len >= 4 && head[0..4] != MAGIC.to_le_bytes() {
            return Err(Error::NotQed);
        }
        return Err(Error::Truncated {
            what: "header",
            needed: HEADER_SIZE_BYTES as u64,
            found: file_len,
        });
    }
    storage
        .read_at(&mut head, 0)
        .map_err(Error::io("reading header", 0))?;
    Header::decode(&head)
}

fn read_backing_name(storage: &dyn Storage, header: &Header) -> Result<Option<String>> {
    if !header.has_backing_file() {
        return Ok(None);
    }
    let mut name = vec![0u8; header.backing_filename_size as usize];
    let at = u64::from(header.backing_filename_offset);
    storage
        .read_at(&mut name, at)
        .map_err(Error::io("reading backing file name", at))?;
    String::from_utf8(name)
        .map(Some)
        .map_err(|_| Error::BackingNameNotUtf8)
}

/// Validates `options` and returns the first bytes of the new image (header and backing
/// name) and its initial file length. Nothing is written.
fn plan_create(options: &CreateOptions) -> Result<(Vec<u8>, u64)> {
    let geometry = Geometry::new(options.cluster_size, options.table_size, 1)?;
    validate_create(options, &geometry)?;
    let size = options.size.next_multiple_of(SECTOR);
    let mut header = Header {
        magic: MAGIC,
        cluster_size: options.cluster_size,
        table_size: options.table_size,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: geometry.cluster_size(),
        image_size: size,
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    let mut head = header.encode().to_vec();
    if let Some((name, format)) = &options.backing {
        if HEADER_SIZE_BYTES + name.len() > geometry.cluster_size() as usize {
            return Err(Error::BackingNameTooLong(name.len()));
        }
        header.features = F_BACKING_FILE
            | if *format == BackingFormat::Raw {
                F_BACKING_FORMAT_NO_PROBE
            } else {
                0
            };
        header.backing_filename_offset = HEADER_SIZE_BYTES as u32;
        header.backing_filename_size = name.len() as u32;
        head = header.encode().to_vec();
        head.extend_from_slice(name.as_bytes());
    }
    let file_len = geometry.cluster_size() * (1 + u64::from(options.table_size));
    Ok((head, file_len))
}

/// The size and table rules QEMU applies when creating (and later opening) an image.
fn validate_create(options: &CreateOptions, geometry: &Geometry) -> Result<()> {
    if options.table_size == 1 {
        return Err(Error::InvalidOptions(
            "table_size 1 cannot be opened by QEMU (its table offset test always fails)",
        ));
    }
    let size = options
        .size
        .checked_next_multiple_of(SECTOR)
        .ok_or(Error::InvalidOptions("size too large"))?;
    if size > layout::MAX_VIRTUAL_SIZE {
        return Err(Error::InvalidOptions(
            "size exceeds QEMU's maximum disk size (2^63 - 2^30 bytes)",
        ));
    }
    if geometry.qemu_max_image_size() == 0 {
        return Err(Error::InvalidOptions(
            "this cluster_size/table_size overflows QEMU's maximum-size computation; use smaller clusters or tables",
        ));
    }
    if size > geometry.qemu_max_image_size() {
        return Err(Error::InvalidOptions(
            "size exceeds the maximum for this cluster_size/table_size",
        ));
    }
    Ok(())
}

fn write_new(storage: &dyn Storage, head: &[u8], file_len: u64) -> Result<()> {
    storage
        .set_len(0)
        .and_then(|()| storage.set_len(file_len))
        .map_err(Error::io("sizing new image", 0))?;
    storage
        .write_at(head, 0)
        .map_err(Error::io("writing header", 0))?;
    storage.flush().map_err(Error::io("flushing", 0))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;
    use crate::testing::image;

    #[test]
    fn create_writes_what_qemu_img_writes() {
        let storage = MemStorage::new();
        Image::create(&storage, &CreateOptions::new(10_000_000)).unwrap();
        let bytes = storage.to_bytes();
        assert_eq!(bytes.len(), 5 * 65536);
        let h = Header::decode(&bytes[..64]).unwrap();
        assert_eq!(h.image_size, 10_000_000u64.next_multiple_of(512));
        assert_eq!((h.l1_table_offset, h.table_size, h.features), (65536, 4, 0));
        let mut bad = CreateOptions::new(1 << 20);
        bad.table_size = 1;
        assert!(matches!(
            Image::create(&storage, &bad),
            Err(Error::InvalidOptions(_))
        ));
    }

    #[test]
    fn short_files_are_truncated_or_not_qed() {
        let storage = MemStorage::from_bytes(MAGIC.to_le_bytes().to_vec());
        let r = Image::open(Box::new(storage), OpenOptions::default());
        assert!(matches!(r, Err(Error::Truncated { .. })));
        let r = Image::open(
            Box::new(MemStorage::from_bytes(vec![1; 10])),
            OpenOptions::default(),
        );
        assert!(matches!(r, Err(Error::NotQed)));
    }

    #[test]
    fn need_check_is_repaired_at_a_read_write_open_only() {
        let (s, image) = image(16 << 20);
        image.write_at(&[1u8; 10], crate::GuestOffset(0)).unwrap();
        // A crash after allocating: NEED_CHECK stays set; add a leaked cluster at the end.
        let end = image.file_end();
        drop(image);
        let mut bytes = s.bytes();
        bytes.resize(end as usize + 65536, 0);
        let ro = Image::open(
            Box::new(MemStorage::from_bytes(bytes.clone())),
            OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(ro.check(Repair::None).unwrap().leaks, 1);
        let rw = Image::open(
            Box::new(MemStorage::from_bytes(bytes)),
            OpenOptions::default(),
        )
        .unwrap();
        assert_eq!(rw.file_end(), end);
        assert_eq!(rw.header().features & F_NEED_CHECK, 0);
        let mut b = [0u8; 10];
        rw.read_at(&mut b, crate::GuestOffset(0)).unwrap();
        assert_eq!(b, [1u8; 10]);
        rw.close().unwrap();
    }

    #[test]
    fn unknown_autoclear_bits_are_cleared_read_write() {
        let storage = MemStorage::new();
        Image::create(&storage, &CreateOptions::new(1 << 20)).unwrap();
        let mut h = Header::decode(&storage.to_bytes()[..64]).unwrap();
        h.autoclear_features = 0x80;
        storage.write_at(&h.encode(), 0).unwrap();
        let storage = std::sync::Arc::new(storage);
        let image = Image::open(
            Box::new(std::sync::Arc::clone(&storage)),
            OpenOptions::default(),
        )
        .unwrap();
        assert_eq!(image.header().autoclear_features, 0);
        let on_disk = Header::decode(&storage.to_bytes()[..64]).unwrap();
        assert_eq!(on_disk.autoclear_features, 0);
        image.close().unwrap();
    }
}
