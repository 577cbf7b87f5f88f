//! The synchronous device over a backing: what `qed::Chain` used to test, now through the one
//! copy-on-read policy (`CorDevice`, driven by `SyncDevice`). Partial clusters at a write's
//! edges are merged with the backing; the middle is written by the image; a request's new
//! clusters stay contiguous; zero writes keep the backing around them.

use qed::{BackingFormat, CreateOptions, GuestOffset, Image, Mapping, MemStorage, OpenOptions};
use qedstream_tests::{disk_over, raw_backing, Disk};

const CS: u64 = 65536;

/// The backing's byte at `offset` (never zero).
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8 + 1
}

/// An in-memory image of `size` over a raw backing holding the pattern.
fn disk_over_pattern(size: u64) -> Disk {
    let storage = MemStorage::new();
    let mut options = CreateOptions::new(size);
    options.backing = Some(("pattern.raw".into(), BackingFormat::Raw));
    Image::create(&storage, &options).unwrap();
    let image = Image::open(Box::new(storage), OpenOptions::default()).unwrap();
    let base: Vec<u8> = (0..size).map(pattern).collect();
    disk_over(image, Some(raw_backing(&base)))
}

#[test]
fn partial_edges_are_merged_with_the_backing_and_the_request_stays_contiguous() {
    let disk = disk_over_pattern(16 << 20);
    // The L2 table exists already (a new one would land between the clusters).
    disk.write_at(&vec![1u8; CS as usize], 8 * CS).unwrap();
    // Clusters 1 (from byte 100), 2, 3 whole, 4 (to byte 200).
    let (offset, len) = (CS + 100, 3 * CS - 100 + 200);
    disk.write_at(&vec![0xeeu8; len as usize], offset).unwrap();
    let mut buf = vec![0u8; 5 * CS as usize];
    disk.read_at(&mut buf, 0).unwrap();
    for (i, &b) in buf.iter().enumerate() {
        let i = i as u64;
        let want = if (offset..offset + len).contains(&i) {
            0xee
        } else {
            pattern(i)
        };
        assert_eq!(b, want, "byte {i:#x}");
    }
    let extents = disk.image().map(GuestOffset(0), 5 * CS).unwrap();
    let kinds: Vec<bool> = extents
        .iter()
        .map(|e| matches!(e.mapping, Mapping::Data(_)))
        .collect();
    assert_eq!(kinds, vec![false, true], "clusters 1..=4 are data");
    assert_eq!(extents[1].length, 4 * CS, "one contiguous run");
    assert_eq!(
        disk.image().check(qed::Repair::None).unwrap().exit_code(),
        0
    );
    disk.close().unwrap();
}

#[test]
fn a_partial_zero_write_keeps_the_backing_around_it() {
    let disk = disk_over_pattern(4 << 20);
    disk.write_zeroes(CS + 10, 20).unwrap();
    let mut buf = vec![0u8; 40];
    disk.read_at(&mut buf, CS).unwrap();
    assert_eq!(buf[9], pattern(CS + 9));
    assert!(buf[10..30].iter().all(|&b| b == 0));
    assert_eq!(buf[30], pattern(CS + 30));
    // Zeroing whole clusters needs nothing from the backing: zero clusters.
    disk.write_zeroes(2 * CS, CS).unwrap();
    assert_eq!(
        disk.image().mapping_at(GuestOffset(2 * CS), 1).unwrap().0,
        Mapping::Zero
    );
    disk.close().unwrap();
}
