//! Malformed images: each is refused with a typed `qed::Error` (matched by variant and field),
//! never a panic; and reads through corrupt table entries fail with `Error::InvalidEntry`
//! instead of returning someone else's data. Named after what they prove, as crosvm names its
//! qcow bounds checks.

use qed::error::{HeaderField, TableKind};
use qed::layout::{Header, F_BACKING_FILE, MAGIC};
use qed::{CreateOptions, Error, Image, MemStorage, OpenOptions, Repair};

const CS: u64 = 65536;

/// A fresh 64K/ts4 image of 8 MiB with 64K of data at 0: header 0, L1 at 64K (4 clusters),
/// data at 320K, L2 at 384K (4 clusters); file length 640K.
fn image_bytes() -> Vec<u8> {
    let s = MemStorage::new();
    Image::create(&s, &CreateOptions::new(8 << 20)).unwrap();
    let image = Image::open(
        Box::new(MemStorage::from_bytes(s.to_bytes())),
        detached(false),
    )
    .unwrap();
    image.write_at(&[0x33; 65536], qed::GuestOffset(0)).unwrap();
    image
        .write_at(&[0x44; 65536], qed::GuestOffset(2 * CS))
        .unwrap();
    let bytes = {
        let st = image.storage();
        let mut v = vec![0u8; st.len().unwrap() as usize];
        st.read_at(&mut v, 0).unwrap();
        v
    };
    image.close().unwrap();
    // close() cleared NEED_CHECK in its own storage; the copy above was taken before. Clear it.
    let mut bytes = bytes;
    bytes[16] &= !0x02;
    assert_eq!(bytes.len() as u64, 11 * CS);
    assert_eq!(
        u64::from_le_bytes(bytes[0x10000..0x10008].try_into().unwrap()),
        0x60000
    );
    bytes
}

fn detached(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        ..OpenOptions::default()
    }
}

fn open(bytes: Vec<u8>) -> qed::Result<Image> {
    Image::open(Box::new(MemStorage::from_bytes(bytes)), detached(true))
}

fn open_rw(bytes: Vec<u8>) -> qed::Result<Image> {
    Image::open(Box::new(MemStorage::from_bytes(bytes)), detached(false))
}

fn with_header(f: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut bytes = image_bytes();
    let mut h = Header::decode(&bytes[..64]).unwrap();
    f(&mut h);
    bytes[..64].copy_from_slice(&h.encode());
    bytes
}

fn poke(bytes: &mut [u8], at: u64, value: u64) {
    bytes[at as usize..at as usize + 8].copy_from_slice(&value.to_le_bytes());
}

#[track_caller]
fn assert_header_error(bytes: Vec<u8>, field: HeaderField) {
    match open(bytes.clone()) {
        Err(Error::InvalidHeader { field: f, .. }) if f == field => {}
        other => panic!("expected InvalidHeader {{ {field:?} }}, got {other:?}"),
    }
    // Read-write opens refuse it the same way, before writing anything.
    match open_rw(bytes) {
        Err(Error::InvalidHeader { field: f, .. }) if f == field => {}
        other => panic!("read-write: expected InvalidHeader {{ {field:?} }}, got {other:?}"),
    }
}

#[test]
fn test_zero_length_file_is_truncated() {
    assert!(matches!(
        open(Vec::new()),
        Err(Error::Truncated { found: 0, .. })
    ));
}

#[test]
fn test_truncated_header_is_truncated() {
    let bytes = image_bytes()[..40].to_vec();
    assert!(matches!(
        open(bytes),
        Err(Error::Truncated {
            needed: 64,
            found: 40,
            ..
        })
    ));
}

#[test]
fn test_short_file_with_wrong_magic_is_not_qed() {
    assert!(matches!(
        open(b"QFI\xfb and some".to_vec()),
        Err(Error::NotQed)
    ));
}

#[test]
fn test_wrong_magic_is_not_qed() {
    let bytes = with_header(|h| h.magic = 0x00444552);
    assert!(matches!(open(bytes), Err(Error::NotQed)));
}

#[test]
fn test_header_only_file_has_no_l1() {
    let bytes = image_bytes()[..4096].to_vec();
    assert_header_error(bytes, HeaderField::L1TableOffset);
}

#[test]
fn test_bad_cluster_sizes_are_refused() {
    for cs in [0, 512, 2048, 65537, 3 << 16, 1 << 27, u32::MAX] {
        assert_header_error(
            with_header(|h| h.cluster_size = cs),
            HeaderField::ClusterSize,
        );
    }
}

#[test]
fn test_bad_and_huge_table_sizes_are_refused() {
    for ts in [0, 3, 5, 32, 1 << 20, u32::MAX] {
        assert_header_error(with_header(|h| h.table_size = ts), HeaderField::TableSize);
    }
}

#[test]
fn test_huge_header_size_is_refused() {
    for hs in [0, 65536, u32::MAX] {
        assert_header_error(with_header(|h| h.header_size = hs), HeaderField::HeaderSize);
    }
}

#[test]
fn test_header_size_covering_the_l1_table_is_refused() {
    // The L1 table at 64K would lie inside two header clusters.
    assert_header_error(
        with_header(|h| h.header_size = 2),
        HeaderField::L1TableOffset,
    );
}

#[test]
fn test_bad_image_sizes_are_refused() {
    for size in [1, 511, (8 << 20) + 100, (64u64 << 40) + 512, u64::MAX] {
        assert_header_error(with_header(|h| h.image_size = size), HeaderField::ImageSize);
    }
}

#[test]
fn test_l1_outside_the_file_is_refused() {
    for l1 in [11 * CS, 8 * CS, 100 * CS, !(CS - 1), u64::MAX] {
        assert_header_error(
            with_header(|h| h.l1_table_offset = l1),
            HeaderField::L1TableOffset,
        );
    }
}

#[test]
fn test_l1_over_the_header_or_unaligned_is_refused() {
    for l1 in [0, 64, CS + 8, CS / 2] {
        assert_header_error(
            with_header(|h| h.l1_table_offset = l1),
            HeaderField::L1TableOffset,
        );
    }
}

#[test]
fn test_backing_name_past_the_header_is_refused() {
    for (off, size) in [(64, 65536), (65530, 7), (u32::MAX, 1), (u32::MAX, u32::MAX)] {
        let bytes = with_header(|h| {
            h.features |= F_BACKING_FILE;
            h.backing_filename_offset = off;
            h.backing_filename_size = size;
        });
        assert_header_error(bytes, HeaderField::BackingFilename);
    }
}

#[test]
fn test_backing_name_of_4096_bytes_is_refused() {
    // With a 1M-cluster header the name fits the header but is longer than QEMU reads.
    let s = MemStorage::new();
    let mut o = CreateOptions::new(8 << 20);
    o.cluster_size = 1 << 20;
    Image::create(&s, &o).unwrap();
    let mut bytes = s.to_bytes();
    let mut h = Header::decode(&bytes[..64]).unwrap();
    h.features |= F_BACKING_FILE;
    h.backing_filename_offset = 64;
    h.backing_filename_size = 4096;
    bytes[..64].copy_from_slice(&h.encode());
    bytes[64..64 + 4096].fill(b'a');
    assert_header_error(bytes, HeaderField::BackingFilename);
}

#[test]
fn test_backing_name_not_utf8_is_refused() {
    let mut bytes = with_header(|h| {
        h.features |= F_BACKING_FILE;
        h.backing_filename_offset = 64;
        h.backing_filename_size = 4;
    });
    bytes[64..68].copy_from_slice(&[0xff, 0xfe, 0x00, 0x80]);
    assert!(matches!(open(bytes), Err(Error::BackingNameNotUtf8)));
}

#[test]
fn test_unknown_features_are_refused_even_read_only() {
    for bits in [0x08, 0x10, 1 << 63] {
        let bytes = with_header(|h| h.features |= bits);
        assert!(matches!(open(bytes.clone()), Err(Error::UnsupportedFeatures(b)) if b == bits));
        assert!(matches!(open_rw(bytes), Err(Error::UnsupportedFeatures(b)) if b == bits));
    }
}

#[test]
fn test_unknown_compat_features_open_normally() {
    let image = open(with_header(|h| h.compat_features = 0x8000)).unwrap();
    let mut buf = [0u8; 16];
    image.read_at(&mut buf, qed::GuestOffset(0)).unwrap();
    assert_eq!(buf, [0x33; 16]);
}

#[track_caller]
fn assert_invalid_entry(image: &Image, guest: u64, table: TableKind, entry: u64) {
    let mut buf = vec![0xeeu8; 4096];
    match image.read_at(&mut buf, qed::GuestOffset(guest)) {
        Err(Error::InvalidEntry {
            table: t, entry: e, ..
        }) => {
            assert_eq!((t, e), (table, entry));
        }
        other => panic!("read at {guest:#x}: expected InvalidEntry, got {other:?}"),
    }
    assert!(matches!(
        image.map(qed::GuestOffset(0), image.size()),
        Err(Error::InvalidEntry { .. })
    ));
}

#[test]
fn test_l2_entry_past_eof_reads_as_invalid_entry() {
    let mut bytes = image_bytes();
    poke(&mut bytes, 0x60000 + 16, 11 * CS); // L2[2] = the file's end
    let image = open(bytes).unwrap();
    assert_invalid_entry(&image, 2 * CS + 100, TableKind::L2, 11 * CS);
}

#[test]
fn test_l2_entry_unaligned_reads_as_invalid_entry() {
    let mut bytes = image_bytes();
    for bad in [2, 0x50800, 0x50000 + 1, u64::MAX] {
        poke(&mut bytes, 0x60000 + 16, bad);
        let image = open(bytes.clone()).unwrap();
        assert_invalid_entry(&image, 2 * CS, TableKind::L2, bad);
    }
}

#[test]
fn test_l2_entry_in_the_header_reads_as_invalid_entry() {
    // Two header clusters (L1 moved to 128K): an aligned entry of 64K points into the header.
    let mut bytes = image_bytes();
    let l1 = bytes[0x10000..0x50000].to_vec();
    bytes.extend(vec![0u8; 4 * CS as usize]);
    let new_l1 = 11 * CS;
    bytes[new_l1 as usize..(new_l1 + 4 * CS) as usize].copy_from_slice(&l1);
    let mut h = Header::decode(&bytes[..64]).unwrap();
    h.header_size = 2;
    h.l1_table_offset = new_l1;
    bytes[..64].copy_from_slice(&h.encode());
    // Sanity: this image opens and reads.
    let image = open(bytes.clone()).unwrap();
    let mut buf = [0u8; 8];
    image.read_at(&mut buf, qed::GuestOffset(0)).unwrap();
    assert_eq!(buf, [0x33; 8]);
    poke(&mut bytes, 0x60000 + 16, CS);
    let image = open(bytes).unwrap();
    assert_invalid_entry(&image, 2 * CS, TableKind::L2, CS);
}

#[test]
fn test_l1_entry_past_eof_reads_as_invalid_entry() {
    // A 4K/ts2 image so that the L1 has more than one useful entry inside the disk.
    let s = MemStorage::new();
    let mut o = CreateOptions::new(16 << 20);
    o.cluster_size = 4096;
    o.table_size = 2;
    Image::create(&s, &o).unwrap();
    let mut bytes = s.to_bytes();
    poke(&mut bytes, 4096 + 8, 1 << 30); // L1[1] covers guest 4M..8M
    let image = open(bytes.clone()).unwrap();
    assert_invalid_entry(&image, 5 << 20, TableKind::L1, 1 << 30);
    // Guest offsets under other L1 entries are fine.
    let mut buf = [1u8; 8];
    image.read_at(&mut buf, qed::GuestOffset(0)).unwrap();
    assert_eq!(buf, [0; 8]);
    // A write there fails too and changes nothing.
    let rw = open_rw(bytes).unwrap();
    assert!(matches!(
        rw.write_at(&[9; 8], qed::GuestOffset(5 << 20)),
        Err(Error::InvalidEntry { .. })
    ));
    assert!(matches!(
        rw.write_zeroes(qed::GuestOffset(4 << 20), 1 << 20),
        Err(Error::InvalidEntry { .. })
    ));
    let report = rw.check(Repair::All).unwrap();
    assert_eq!((report.corruptions_fixed, report.exit_code()), (1, 0));
    rw.write_at(&[9; 8], qed::GuestOffset(5 << 20)).unwrap();
    rw.close().unwrap();
}

#[test]
fn test_tables_over_each_other_are_found_by_check() {
    // L1[1] = L1[0]: two L1 entries share an L2 table; L2[3] = the L1 table's first cluster.
    let mut bytes = image_bytes();
    poke(&mut bytes, 0x10008, 0x60000);
    poke(&mut bytes, 0x60000 + 24, CS);
    let image = open(bytes).unwrap();
    let report = image.check(Repair::None).unwrap();
    assert_eq!(report.exit_code(), 2);
    assert_eq!(report.corruptions, 4 + 1, "{report:?}");
}

#[test]
fn test_l2_table_over_the_l1_table_is_refused_on_the_read_path() {
    // An L1 entry pointing at the L1 table itself would make L1 entries read as data offsets.
    let mut bytes = image_bytes();
    poke(&mut bytes, 0x10000, CS);
    let image = open(bytes).unwrap();
    assert_invalid_entry(&image, 0, TableKind::L1, CS);
}

#[test]
fn test_data_entry_over_the_l1_table_is_refused_on_the_read_path() {
    // A write through it would overwrite the L1 table behind the image's back.
    let mut bytes = image_bytes();
    poke(&mut bytes, 0x60000 + 16, 2 * CS);
    let image = open_rw(bytes).unwrap();
    assert_invalid_entry(&image, 2 * CS, TableKind::L2, 2 * CS);
    assert!(matches!(
        image.write_at(&[1; 10], qed::GuestOffset(2 * CS)),
        Err(Error::InvalidEntry { .. })
    ));
    drop(image);
}

#[test]
fn test_every_single_byte_header_corruption_is_an_error_or_opens() {
    // Each header byte set to a few interesting values: open never panics, and whatever opens
    // can be read, mapped and checked.
    let base = image_bytes();
    for at in 0..64 {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut bytes = base.clone();
            bytes[at] = v;
            if let Ok(image) = open(bytes) {
                let mut buf = vec![0u8; 4096];
                let _ = image.read_at(&mut buf, qed::GuestOffset(0));
                let _ = image.map(qed::GuestOffset(0), image.size().min(1 << 30));
                let _ = image.check(Repair::None);
            }
        }
    }
}

#[test]
fn test_magic_constant_is_qed() {
    assert_eq!(&MAGIC.to_le_bytes(), b"QED\0");
}
