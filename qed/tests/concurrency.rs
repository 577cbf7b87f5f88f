//! Many threads writing disjoint byte ranges that share clusters: every write must land, no
//! cluster may be allocated twice, and the image must check clean. (The same over a backing,
//! where partial clusters are merged with it, is the copy-on-read device's business:
//! `copy-on-read/tests/concurrency.rs`.)

mod common;

use std::sync::Arc;

use qed::{CreateOptions, GuestOffset, Image, MemStorage, OpenOptions, Repair};

use common::Rng;

fn run(seed: u64) {
    const SIZE: u64 = 8 << 20;
    const THREADS: usize = 8;
    let storage = Arc::new(MemStorage::new());
    let mut options = CreateOptions::new(SIZE);
    options.cluster_size = 4096;
    options.table_size = 2;
    let mut model = vec![0u8; SIZE as usize];
    let open = OpenOptions::default();
    Image::create(&*storage, &options).unwrap();
    let image = Arc::new(Image::open(Box::new(storage.clone()), open.clone()).unwrap());

    // Slice the disk into interleaved stripes: thread t owns bytes where (offset / 1000) % T == t,
    // so neighbouring threads share almost every cluster.
    let stripe = 1000u64;
    let mut plans: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); THREADS];
    let mut rng = Rng(seed);
    for _ in 0..4000 {
        let start = (rng.next() % (SIZE / stripe)) * stripe;
        let t = ((start / stripe) % THREADS as u64) as usize;
        let len = 1 + rng.next() % stripe;
        let byte = (rng.next() % 255) as u8 + 1;
        let data = vec![byte; len as usize];
        model[start as usize..(start + len) as usize].copy_from_slice(&data);
        plans[t].push((start, data));
    }
    std::thread::scope(|s| {
        for plan in &plans {
            let image = image.clone();
            s.spawn(move || {
                for (off, data) in plan {
                    image.write_at(data, GuestOffset(*off)).unwrap();
                    let mut back = vec![0u8; data.len()];
                    image.read_at(&mut back, GuestOffset(*off)).unwrap();
                    assert!(back == *data, "read-back after write at {off}");
                }
            });
        }
    });
    let mut all = vec![0u8; SIZE as usize];
    image.read_at(&mut all, GuestOffset(0)).unwrap();
    assert!(all == model, "final contents differ from the model");
    let report = image.check(Repair::None).unwrap();
    assert_eq!(report.exit_code(), 0, "{report:?}");
    Arc::try_unwrap(image).unwrap().close().unwrap();
    // Reopen: same contents.
    let image = Image::open(Box::new(storage), open).unwrap();
    image.read_at(&mut all, GuestOffset(0)).unwrap();
    assert!(all == model, "contents differ after reopen");
    image.close().unwrap();
}

#[test]
fn concurrent_writers_sharing_clusters_without_backing() {
    for seed in 1..4 {
        run(seed);
    }
}
