//! Inputs that crashed `qed_image`, as named tests with annotated bytes (the way crosvm keeps
//! `test_huge_header`). The full crashing files also live in the seed corpus.

use qed::CheckReport;
use qedstream_fuzz::fuzz_qed_image;

/// A 4K/ts2 image (header, L1 at 0x1000, L2 at 0x3000..0x5000) with `n` L2 entries.
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

/// The read-only check's report; the image must open and the check must finish.
fn checked(entries: &[u64]) -> CheckReport {
    fuzz_qed_image(&image_with_l2(entries))
        .check
        .unwrap_or_else(|| panic!("{entries:x?}: refused instead of checked"))
}

/// `check` computed `last + cluster_size` for the fragmentation count with an L2 entry of
/// 0x1000_0000_0000_0000-ish and overflowed (crash-43b5e3a2…, now
/// `corpus/qed_image/regression-check-fragmented-overflow`). The count is QEMU's, in wrapping
/// u64 arithmetic, and the bad entries are corruptions.
#[test]
fn test_check_fragmentation_count_does_not_overflow() {
    // u64::MAX: past the file's end. 0x4000: inside the L2 table itself. 0x4000 does not follow
    // u64::MAX (u64::MAX + 0x1000 wraps to 0xfff): one fragment.
    let r = checked(&[u64::MAX, 0x4000]);
    assert_eq!(r.total_clusters, 256, "{r:?}");
    assert_eq!(r.allocated_clusters, 2, "{r:?}");
    assert_eq!(r.fragmented_clusters, 1, "{r:?}");
    assert_eq!(r.corruptions, 2, "{r:?}");
    assert_eq!(r.exit_code(), 2, "{r:?}");
    // 0xffff_ffff_ffff_f000 + 0x1000 wraps to exactly 0; every entry is invalid (past the end,
    // unaligned, both) and none follows the one before.
    let r = checked(&[0xffff_ffff_ffff_f000, 0x123, u64::MAX - 1]);
    assert_eq!(r.allocated_clusters, 3, "{r:?}");
    assert_eq!(r.fragmented_clusters, 2, "{r:?}");
    assert_eq!(r.corruptions, 3, "{r:?}");
    assert_eq!(r.exit_code(), 2, "{r:?}");
}

/// `nbd_client_replay` (crash-0b2cef69…, 7155 runs into the campaign): a server that answers
/// the client's first option with NBD_REP_ERR_TLS_REQD. The client rightly ends the handshake
/// with `Error::TlsRequired` (then named `TlsUnsupported`), but the harness did not count that error among those a
/// transcript explains and reported it as a bug. The replay must end cleanly, unconnected.
#[test]
fn test_client_replay_server_requires_tls() {
    let mut server = Vec::new();
    server.extend(b"NBDMAGIC"); // INIT_PASSWD
    server.extend(b"IHAVEOPT"); // newstyle
    server.extend([0x00, 0x03]); // handshake flags: FIXED_NEWSTYLE | NO_ZEROES
    server.extend(0x0003_e889_0455_65a9u64.to_be_bytes()); // option reply magic
    server.extend(11u32.to_be_bytes()); // echoes NBD_OPT_EXTENDED_HEADERS, the client's first
    server.extend(0x8000_0005u32.to_be_bytes()); // NBD_REP_ERR_TLS_REQD
    server.extend(0u32.to_be_bytes()); // no message
    server.extend([0x00, 0x00, 0x00, 0x2e, 0xe5]); // the crash's trailing bytes, never read
    let seen = nbd_client::fuzzing::replay_server_bytes_blocking(&server)
        .unwrap_or_else(|f| panic!("{f}"));
    assert!(!seen.connected, "{seen:?}");
    assert_eq!(seen.succeeded, 0, "{seen:?}");
}

/// `qcow2_image` (crash-26659179…, 380,120 runs into its second campaign): a v3 header whose
/// feature name table extension is 49 bytes long. The qcow2 crate (imago 0.2.6) walks the
/// table in 48-byte entries and indexed past the 1-byte last one. Our header check now refuses
/// a table that is not whole entries before the crate sees it (the file is also
/// `corpus/qcow2_image/regression-ragged-feature-name-table`).
#[test]
fn test_qcow2_ragged_feature_name_table_is_refused() {
    let data = include_bytes!("../corpus/qcow2_image/regression-ragged-feature-name-table");
    let seen = qedstream_fuzz::qcow2::fuzz_qcow2_image(data);
    let refused = seen.refused.expect("the image must be refused, not opened");
    assert!(refused.contains("48-byte entries"), "{refused}");
}
