//! A full disk (ENOSPC) in the middle of allocating writes: every write that succeeded reads
//! back, the failed ones leave at most leaked clusters (never a corruption), and the image
//! reopens and repairs to clean, before and after a simulated crash.

mod common;

use std::sync::Arc;

use qed::{CreateOptions, Image, MemStorage, OpenOptions, Repair, Storage};

use common::Rng;

/// Writes until the disk is full, keeping a model of acknowledged bytes and marking the bytes
/// a failed write may have touched as unknown.
fn fill_until_full(seed: u64, limit: u64) {
    const SIZE: u64 = 64 << 20;
    let mut options = CreateOptions::new(SIZE);
    options.cluster_size = 4096;
    options.table_size = 4;
    let empty = MemStorage::new();
    Image::create(&empty, &options).unwrap();
    let storage = Arc::new(MemStorage::with_limit(empty.to_bytes(), limit));
    let image = Image::open(Box::new(storage.clone()), OpenOptions::default()).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut known = vec![true; SIZE as usize];
    let mut rng = Rng(seed);
    let mut failures = 0;
    for i in 0..4000u32 {
        let off = rng.next() % (SIZE - 70_000);
        let len = 1 + rng.next() % 70_000;
        let byte = (i % 250) as u8 + 1;
        let data = vec![byte; len as usize];
        let range = off as usize..(off + len) as usize;
        match image.write_at(&data, qed::GuestOffset(off)) {
            Ok(()) => {
                model[range.clone()].copy_from_slice(&data);
                known[range].fill(true);
            }
            Err(e) => {
                assert!(
                    matches!(&e, qed::Error::Io { source, .. } if source.raw_os_error() == Some(libc_enospc())),
                    "unexpected error: {e}"
                );
                known[range].fill(false);
                failures += 1;
                if failures > 20 {
                    break;
                }
            }
        }
    }
    assert!(failures > 0, "the disk never filled (limit {limit})");
    let verify = |image: &Image, when: &str| {
        let mut got = vec![0u8; SIZE as usize];
        image.read_at(&mut got, qed::GuestOffset(0)).unwrap();
        for (i, ((g, m), k)) in got.iter().zip(&model).zip(&known).enumerate() {
            if *k && g != m {
                panic!("{when}: byte {i} is {g:#x}, the acknowledged write says {m:#x}");
            }
        }
    };
    verify(&image, "after ENOSPC");
    let report = image.check(Repair::None).unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    assert_eq!(report.check_errors, 0, "{report:?}");

    // A crash now (no close): the reopen repairs it, and the data is still there.
    drop(image);
    let crashed = Arc::new(MemStorage::from_bytes(storage.to_bytes()));
    let image = Image::open(Box::new(crashed.clone()), OpenOptions::default()).unwrap();
    verify(&image, "after crash and reopen");
    let report = image.check(Repair::All).unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    let after = image.check(Repair::None).unwrap();
    assert_eq!(after.exit_code(), 0, "{after:?}");
    image.close().unwrap();
    assert!(storage.len().unwrap() <= limit);
    let storage_after_repair = crashed.to_bytes();
    // QEMU agrees the repaired image is clean.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.qed");
    std::fs::write(&path, storage_after_repair).unwrap();
    let out = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(&path)
        .output()
        .expect("qemu-img is required (apt-get install qemu-utils)");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn libc_enospc() -> i32 {
    28
}

#[test]
fn enospc_mid_allocation_loses_no_acknowledged_write() {
    for (seed, limit) in [(1, 2 << 20), (2, 3 << 20), (3, 5 << 20), (4, 8 << 20)] {
        fill_until_full(seed, limit);
    }
}
