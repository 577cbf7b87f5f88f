//! (c) Our `Image::check` agrees with `qemu-img check --output=json` on damaged images
//! (qed-format.md §8 recipe D), repair leaves an image QEMU finds clean (or, for what cannot
//! be repaired, as broken as QEMU says), and reads through a corrupt entry fail with
//! `Error::InvalidEntry` instead of returning anyone's data.

use std::path::{Path, PathBuf};

use qed::{Error, Image, OpenOptions, Repair};
use qedstream_tests::{
    assert_check_agrees, features_on_disk, open_detached, path_str, peek_u64, poke_u64, qemu,
    tempdir,
};

/// Recipe D's image: 64M, default geometry, `write -P 0x33 0 64k` (data at 0x50000, L2 at
/// 0x60000), plus a second cluster at 128K so an L2 entry can be damaged while another stays.
fn recipe_d(dir: &Path) -> PathBuf {
    let path = dir.join("x.qed");
    qemu::img(&["create", "-f", "qed", path_str(&path), "64M"]);
    qemu::io_commands(
        "qed",
        &path,
        &[
            "write -P 0x33 0 64k".into(),
            "write -P 0x44 128k 64k".into(),
        ],
    );
    assert_eq!(
        peek_u64(&path, 0x10000),
        0x60000,
        "L1[0] where recipe D says"
    );
    assert_eq!(
        peek_u64(&path, 0x60000),
        0x50000,
        "L2[0] where recipe D says"
    );
    assert_eq!(
        peek_u64(&path, 0x60010),
        0xa0000,
        "L2[2]: the second write's cluster"
    );
    path
}

fn open_rw_detached(path: &Path) -> qed::Result<Image> {
    Image::open_path(
        path,
        OpenOptions {
            ..OpenOptions::default()
        },
    )
}

/// Reading the guest cluster behind L2[2] (128K) must fail with an L2 `InvalidEntry`.
fn assert_read_fails_with_invalid_l2(path: &Path, entry: u64) {
    let image = open_detached(path).unwrap();
    let mut buf = vec![0u8; 4096];
    match image.read_at(&mut buf, qed::GuestOffset(128 << 10)) {
        Err(Error::InvalidEntry {
            table, entry: e, ..
        }) => {
            assert_eq!(table, qed::error::TableKind::L2);
            assert_eq!(e, entry);
        }
        other => panic!("read through a corrupt L2 entry gave {other:?}, not InvalidEntry"),
    }
    // The neighbouring good cluster still reads.
    image.read_at(&mut buf, qed::GuestOffset(0)).unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
}

fn repair_with_ours(path: &Path) -> qed::CheckReport {
    let image = open_rw_detached(path).unwrap();
    let report = image.check(Repair::All).unwrap();
    image.close().unwrap();
    report
}

/// Appends `by` zero bytes to the file at `path`; returns its length before.
fn extend_file(path: &Path, by: u64) -> u64 {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len + by)
        .unwrap();
    len
}

#[test]
fn clean_recipe_d_image_counters_agree() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    let r = assert_check_agrees(&path);
    assert_eq!((r.allocated_clusters, r.exit_code()), (2, 0));
}

#[test]
fn l2_entry_past_eof_is_one_corruption_and_repair_zeroes_it() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    poke_u64(&path, 0x60010, 0x1000000);
    let r = assert_check_agrees(&path);
    assert_eq!((r.corruptions, r.exit_code()), (1, 2));
    assert_read_fails_with_invalid_l2(&path, 0x1000000);
    let fixed = repair_with_ours(&path);
    assert_eq!(
        (fixed.corruptions_fixed, fixed.exit_code()),
        (1, 0),
        "{fixed:?}"
    );
    assert_eq!(
        peek_u64(&path, 0x60010),
        0,
        "the bad entry is zeroed on disk"
    );
    // The orphaned data cluster at 0xa0000 is now a leak, which our repair reclaims... only
    // if it is at the end of the file. The L2 table is after it here, so it stays a leak.
    let r = assert_check_agrees(&path);
    assert_eq!(r.corruptions, 0);
    qemu::img(&["check", "-f", "qed", "-r", "all", path_str(&path)]);
    assert_eq!(
        qemu::convert_to_raw(&path)[128 << 10],
        0,
        "the cluster reads as zeros now"
    );
}

#[test]
fn duplicate_l2_entry_is_a_corruption_that_repair_leaves() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    poke_u64(&path, 0x60010, 0x50000);
    let r = assert_check_agrees(&path);
    assert_eq!(r.exit_code(), 2);
    let after = repair_with_ours(&path);
    assert_eq!(
        after.exit_code(),
        2,
        "duplicates cannot be repaired: {after:?}"
    );
    let r = assert_check_agrees(&path);
    assert_eq!(r.exit_code(), 2);
}

#[test]
fn unaligned_l2_entry_is_a_corruption_reads_fail_and_repair_zeroes_it() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    poke_u64(&path, 0x60010, 0x50800);
    let r = assert_check_agrees(&path);
    assert_eq!((r.corruptions, r.exit_code()), (1, 2));
    assert_read_fails_with_invalid_l2(&path, 0x50800);
    // A write through the corrupt entry fails too, and writes nothing.
    let image = open_rw_detached(&path).unwrap();
    assert!(matches!(
        image.write_at(&[1u8; 512], qed::GuestOffset(128 << 10)),
        Err(Error::InvalidEntry { .. })
    ));
    image.close().unwrap();
    let fixed = repair_with_ours(&path);
    assert_eq!(fixed.corruptions, 0, "{fixed:?}");
    let r = assert_check_agrees(&path);
    assert_eq!(r.corruptions, 0);
}

#[test]
fn l2_entry_pointing_at_the_l1_table_is_a_duplicate() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    poke_u64(&path, 0x60010, 0x10000);
    let r = assert_check_agrees(&path);
    assert_eq!(r.exit_code(), 2);
}

#[test]
fn l1_entry_duplicating_another_l2_table_counts_table_size_corruptions() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    poke_u64(&path, 0x10008, 0x60000); // L1[1] = L1[0]
    let r = assert_check_agrees(&path);
    assert_eq!((r.corruptions, r.exit_code()), (4, 2));
}

#[test]
fn l1_entry_past_eof_is_a_corruption_and_repair_zeroes_it() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    poke_u64(&path, 0x10008, 0x7000000);
    let r = assert_check_agrees(&path);
    assert_eq!((r.corruptions, r.exit_code()), (1, 2));
    let fixed = repair_with_ours(&path);
    assert_eq!(fixed.exit_code(), 0, "{fixed:?}");
    assert_eq!(peek_u64(&path, 0x10008), 0);
    qemu::assert_check_clean(&path);
}

#[test]
fn trailing_cluster_of_junk_is_a_leak_and_our_repair_reclaims_it() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    let len = extend_file(&path, 65536);
    let r = assert_check_agrees(&path);
    assert_eq!((r.leaks, r.exit_code()), (1, 3));
    let fixed = repair_with_ours(&path);
    assert_eq!((fixed.leaks_fixed, fixed.exit_code()), (1, 0), "{fixed:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    qemu::assert_check_clean(&path);
}

#[test]
fn trailing_partial_cluster_is_not_a_leak() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    extend_file(&path, 1000);
    let r = assert_check_agrees(&path);
    assert_eq!(r.exit_code(), 0);
    // And the next allocation overwrites it, as QEMU's does.
    let image = open_rw_detached(&path).unwrap();
    image
        .write_at(&[7u8; 100], qed::GuestOffset(10 << 20))
        .unwrap();
    image.close().unwrap();
    qemu::assert_check_clean(&path);
    assert_check_agrees(&path);
}

#[test]
fn unknown_feature_bit_fails_open_like_qemu() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    poke_u64(&path, 16, 8);
    let (code, _) = qemu::check_json(&path);
    assert_eq!(code, 1, "qemu-img check cannot open it either");
    match open_detached(&path) {
        Err(Error::UnsupportedFeatures(0x8)) => {}
        other => panic!("expected UnsupportedFeatures(8), got {other:?}"),
    }
}

#[test]
fn unknown_autoclear_bit_is_cleared_by_a_read_write_open_only() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    poke_u64(&path, 32, 0x80);
    let ro = open_detached(&path).unwrap();
    drop(ro);
    assert_eq!(peek_u64(&path, 32), 0x80, "a read-only open never writes");
    let rw = open_rw_detached(&path).unwrap();
    assert_eq!(peek_u64(&path, 32), 0, "cleared at read-write open");
    rw.close().unwrap();
    assert_eq!(features_on_disk(&path), 0);
    qemu::assert_check_clean(&path);
}

#[test]
fn damaged_4k_image_counters_agree() {
    // The same damage on a 4K/ts2 image with scattered clusters (fragmentation counters).
    let dir = tempdir();
    let path = dir.path().join("s.qed");
    qemu::create_qed(&path, "8M", &["-o", "cluster_size=4096,table_size=2"]);
    let cmds: Vec<String> = (0..20u64)
        .map(|i| {
            format!(
                "write -P {} {} 5000",
                i + 1,
                ((i * 7919 * 37) % (8 << 20)) & !511
            )
        })
        .collect();
    qemu::io_commands("qed", &path, &cmds);
    let clean = assert_check_agrees(&path);
    assert!(clean.fragmented_clusters > 0);
    // Corrupt the first non-zero L2 entry of the first L2 table.
    let l2 = peek_u64(&path, 4096);
    let slot = (0..512)
        .map(|i| l2 + i * 8)
        .find(|&at| peek_u64(&path, at) > 1)
        .unwrap();
    poke_u64(&path, slot, 0x123);
    let r = assert_check_agrees(&path);
    assert_eq!(r.exit_code(), 2);
    let fixed = repair_with_ours(&path);
    assert_eq!(fixed.corruptions, 0);
    assert_check_agrees(&path);
}

/// Regression (found by fuzzing `qed_image`): an L2 entry near `u64::MAX` overflowed the
/// fragmentation count in our check (a panic with overflow checks on). QEMU counts in wrapping
/// u64 arithmetic; the counters must agree.
#[test]
fn l2_entries_near_u64_max_are_counted_like_qemu_without_overflow() {
    let dir = tempdir();
    let path = recipe_d(dir.path());
    poke_u64(&path, 0x60010, 0xffff_ffff_ffff_0000);
    poke_u64(&path, 0x60018, u64::MAX);
    poke_u64(&path, 0x60020, 0x123);
    let r = assert_check_agrees(&path);
    assert_eq!((r.corruptions, r.exit_code()), (3, 2), "{r:?}");
    let fixed = repair_with_ours(&path);
    assert_eq!(fixed.corruptions_fixed, 3, "{fixed:?}");
    assert_eq!(assert_check_agrees(&path).corruptions, 0);
}
