//! Concurrent writers sharing clusters (each owns every fourth 512-byte sector), a concurrent
//! copy-on-read populator that must never overwrite what a writer put there, and concurrent
//! readers: the final image holds exactly each owner's last write (or the backing's bytes),
//! and QEMU finds it clean.

use std::sync::Arc;

use qed::{BackingFormat, CreateOptions, Image};
use qedstream_tests::{assert_same_bytes, open_rw, qemu, tempdir, XorShift};

const SIZE: u64 = 4 << 20;
const SECTOR: u64 = 512;
const WRITERS: u64 = 4;

fn base() -> Vec<u8> {
    let mut b = vec![0u8; 3 << 20]; // shorter than the disk
    XorShift::new(3).fill(&mut b);
    b[1 << 20..(1 << 20) + (256 << 10)].fill(0); // zeros for the populator to skip
    b
}

fn run(cluster_size: u32) {
    let dir = tempdir();
    let base = base();
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let path = dir.path().join("c.qed");
    let mut o = CreateOptions::new(SIZE);
    o.cluster_size = cluster_size;
    o.backing = Some(("base.raw".into(), BackingFormat::Raw));
    Image::create_path(&path, &o).unwrap();
    let image = Arc::new(open_rw(&path));
    let mut view = base.clone();
    view.resize(SIZE as usize, 0);
    let view = Arc::new(view);
    let sectors = SIZE / SECTOR;

    let mut handles = Vec::new();
    for t in 0..WRITERS {
        let image = Arc::clone(&image);
        handles.push(std::thread::spawn(move || {
            let mut rng = XorShift::new(100 + t);
            let mut mine = std::collections::HashMap::new();
            for i in 0..300u64 {
                // A run of up to 4 owned sectors, written one by one (they are not contiguous).
                let first = rng.below(sectors / WRITERS) * WRITERS + t;
                let n = 1 + rng.below(4);
                for k in 0..n {
                    let s = first + k * WRITERS;
                    if s >= sectors {
                        break;
                    }
                    let byte = ((t * 61 + i) % 250 + 1) as u8;
                    image
                        .write_at(&[byte; SECTOR as usize], s * SECTOR)
                        .unwrap();
                    mine.insert(s, byte);
                }
            }
            mine
        }));
    }
    // The populator: copy-on-read of the whole disk, twice, cluster by cluster.
    let populator = {
        let image = Arc::clone(&image);
        let view = Arc::clone(&view);
        std::thread::spawn(move || {
            let cs = u64::from(cluster_size);
            for zero_clusters in [false, true] {
                let mut pos = 0;
                while pos < SIZE {
                    let len = (4 * cs).min(SIZE - pos);
                    image
                        .image()
                        .populate(
                            qed::GuestOffset(pos),
                            &view[pos as usize..(pos + len) as usize],
                            zero_clusters,
                        )
                        .unwrap();
                    pos += len;
                }
            }
        })
    };
    // A reader: every sector reads as the backing or as a value its owner writes.
    let reader = {
        let image = Arc::clone(&image);
        let view = Arc::clone(&view);
        std::thread::spawn(move || {
            let mut rng = XorShift::new(77);
            let mut buf = vec![0u8; SECTOR as usize];
            for _ in 0..2000 {
                let s = rng.below(sectors);
                image.read_at(&mut buf, s * SECTOR).unwrap();
                let backing = &view[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
                let uniform = buf.iter().all(|&b| b == buf[0]) && buf[0] != 0;
                assert!(buf == backing || uniform, "sector {s} is torn or foreign");
            }
        })
    };
    let mut expected = (*view).clone();
    for h in handles {
        for (s, byte) in h.join().unwrap() {
            expected[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize].fill(byte);
        }
    }
    populator.join().unwrap();
    reader.join().unwrap();
    let image = Arc::try_unwrap(image).unwrap();
    let mut got = vec![0u8; SIZE as usize];
    image.read_at(&mut got, 0).unwrap();
    assert_same_bytes(&got, &expected, "after concurrent writes");
    let report = image.image().check(qed::Repair::None).unwrap();
    assert_eq!(report.exit_code(), 0, "{report:?}");
    image.close().unwrap();
    qemu::assert_check_clean(&path);
    assert_same_bytes(&qemu::convert_to_raw(&path), &expected, "qemu-img convert");
}

#[test]
fn concurrent_writers_populator_and_reader_4k() {
    run(4096);
}

#[test]
fn concurrent_writers_populator_and_reader_64k() {
    run(65536);
}
