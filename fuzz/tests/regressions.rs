//! Inputs that crashed `qed_image`, as named tests with annotated bytes (the way crosvm keeps
//! `test_huge_header`). The full crashing files also live in the seed corpus.

use qedstream_fuzz::fuzz_qed_image;

/// A 4K/ts2 image (header, L1 at 0x1000, L2 at 0x3000) with `n` L2 entries.
fn image_with_l2(entries: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; 0x5000];
    b[0..4].copy_from_slice(b"QED\0");
    b[4..8].copy_from_slice(&4096u32.to_le_bytes()); // cluster_size
    b[8..12].copy_from_slice(&2u32.to_le_bytes()); // table_size
    b[12..16].copy_from_slice(&1u32.to_le_bytes()); // header_size
    b[40..48].copy_from_slice(&0x1000u64.to_le_bytes()); // l1_table_offset
    b[48..56].copy_from_slice(&(1u64 << 20).to_le_bytes()); // image_size
    b[0x1000..0x1008].copy_from_slice(&0x3000u64.to_le_bytes()); // L1[0] -> L2 at 0x3000
    for (i, e) in entries.iter().enumerate() {
        b[0x3000 + 8 * i..0x3008 + 8 * i].copy_from_slice(&e.to_le_bytes());
    }
    b
}

/// `check` computed `last + cluster_size` for the fragmentation count with an L2 entry of
/// 0x1000_0000_0000_0000-ish and overflowed (crash-43b5e3a2…, now
/// `corpus/qed_image/regression-check-fragmented-overflow`).
#[test]
fn test_check_fragmentation_count_does_not_overflow() {
    fuzz_qed_image(&image_with_l2(&[u64::MAX, 0x4000]));
    fuzz_qed_image(&image_with_l2(&[
        0xffff_ffff_ffff_f000,
        0x123,
        u64::MAX - 1,
    ]));
}
