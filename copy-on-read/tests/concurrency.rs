//! Guest writes from many threads over a raw backing: disjoint byte ranges that share
//! clusters, so partial clusters are merged with the backing (read-modify-write under the
//! range lock) while neighbours write the same clusters. Every write must land, no cluster may
//! be allocated twice, and the image must check clean. (Moved from `qed`, which no longer
//! reads a backing; the same without a backing stays in `qed/tests/concurrency.rs`.)

use std::sync::Arc;

use qed::{BackingFormat, CreateOptions, Image, MemStorage, OpenOptions, Repair};
use qedstream_tests::{disk_over, raw_backing, XorShift};

fn run(seed: u64) {
    const SIZE: u64 = 8 << 20;
    const THREADS: usize = 8;
    let storage = Arc::new(MemStorage::new());
    let mut options = CreateOptions::new(SIZE);
    options.cluster_size = 4096;
    options.table_size = 2;
    options.backing = Some(("base.raw".into(), BackingFormat::Raw));
    let base: Vec<u8> = (0..SIZE / 2).map(|i| (i % 251) as u8 + 1).collect();
    let mut model = vec![0u8; SIZE as usize];
    model[..base.len()].copy_from_slice(&base);
    Image::create(&*storage, &options).unwrap();
    let open = || {
        let image = Image::open(Box::new(storage.clone()), OpenOptions::default()).unwrap();
        disk_over(image, Some(raw_backing(&base)))
    };
    let disk = Arc::new(open());

    // Interleaved stripes: thread t owns bytes where (offset / 1000) % T == t, so
    // neighbouring threads share almost every cluster.
    let stripe = 1000u64;
    let mut plans: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); THREADS];
    let mut rng = XorShift::new(seed);
    for _ in 0..4000 {
        let start = rng.below(SIZE / stripe) * stripe;
        let t = ((start / stripe) % THREADS as u64) as usize;
        let len = 1 + rng.below(stripe);
        let byte = rng.below(255) as u8 + 1;
        let data = vec![byte; len as usize];
        model[start as usize..(start + len) as usize].copy_from_slice(&data);
        plans[t].push((start, data));
    }
    std::thread::scope(|s| {
        for plan in &plans {
            let disk = disk.clone();
            s.spawn(move || {
                for (off, data) in plan {
                    disk.write_at(data, *off).unwrap();
                    let mut back = vec![0u8; data.len()];
                    disk.read_at(&mut back, *off).unwrap();
                    assert!(back == *data, "read-back after write at {off}");
                }
            });
        }
    });
    let mut all = vec![0u8; SIZE as usize];
    disk.read_at(&mut all, 0).unwrap();
    assert!(all == model, "final contents differ from the model");
    let report = disk.image().check(Repair::None).unwrap();
    assert_eq!(report.exit_code(), 0, "{report:?}");
    Arc::try_unwrap(disk).unwrap().close().unwrap();
    // Reopen: same contents.
    let disk = open();
    disk.read_at(&mut all, 0).unwrap();
    assert!(all == model, "contents differ after reopen");
    disk.close().unwrap();
}

#[test]
fn concurrent_writers_sharing_clusters_over_a_raw_backing() {
    for seed in 10..13 {
        run(seed);
    }
}
