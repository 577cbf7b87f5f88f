//! Copy-ins share their flushes: guest reads that miss at the same time are stored in batches,
//! one flush per batch before its L2 updates, not one flush per read. On a QED image in memory
//! whose storage counts flushes (each takes a few milliseconds, as an `fdatasync` does, so
//! that copy-ins queue up behind a batch being stored), over a raw backing:
//!
//! - 64 concurrent reads of 64 clusters the image lacks are served, and all 64 clusters are
//!   copied in, with at most a quarter as many flushes as reads;
//! - every cluster is then local, and the device reads as the backing;
//! - over a local backing, what a read copies in (and what `populate_range` stores) reaches
//!   the image's storage from page-aligned memory, which an O_DIRECT image (`--cache none`)
//!   writes with no bounce copy.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use copy_on_read::{BlockDevice, CorDevice};
use qed::Mapping;
use qedstream_tests::flushes::counted_overlay;
use qedstream_tests::io_addresses::recorded_overlay;
use qedstream_tests::runtime::two_workers;
use qedstream_tests::{raw_backing, XorShift};

const FLUSH_DELAY: Duration = Duration::from_millis(20);

#[test]
fn concurrent_misses_are_stored_in_batches_that_share_a_flush() {
    const CS: u64 = 64 << 10;
    const READS: u64 = 64;
    let mut backing = vec![0u8; (READS * CS) as usize];
    XorShift::new(11).fill(&mut backing);
    let (image, flushes) = counted_overlay(backing.len() as u64, FLUSH_DELAY);
    let dev = Arc::new(CorDevice::new(
        image,
        "memory".into(),
        Some(raw_backing(&backing)),
    ));
    let before = flushes.load(Ordering::Acquire);
    two_workers().block_on(async {
        let reads: Vec<_> = (0..READS)
            .map(|i| {
                let dev = Arc::clone(&dev);
                tokio::spawn(async move { dev.read_at(i * CS, vec![0u8; CS as usize]).await })
            })
            .collect();
        for (i, r) in reads.into_iter().enumerate() {
            let data = r.await.unwrap().unwrap();
            let at = i * CS as usize;
            assert!(
                data == backing[at..at + CS as usize],
                "read {i}: wrong bytes"
            );
        }
        dev.settle_copy_ins().await;
        let stats = dev.stats();
        let flushed = flushes.load(Ordering::Acquire) - before;
        println!("{stats:?}, {flushed} flushes for {READS} copy-ins");
        assert_eq!(stats.cor_bytes, READS * CS, "{stats:?}");
        assert_eq!(stats.cor_failures, 0, "{stats:?}");
        assert!(
            flushed * 4 <= READS,
            "{flushed} flushes for {READS} copy-ins: they were not batched"
        );
        let map = dev.local_map(0, backing.len() as u64).await.unwrap();
        assert!(
            map.iter().all(|e| e.mapping != Mapping::Unallocated),
            "a cluster was left to the backing: {map:?}"
        );
        let all = dev.read_at(0, vec![0u8; backing.len()]).await.unwrap();
        assert!(all == backing, "the copied-in image reads differently");
        dev.close().await.unwrap();
    });
}

#[test]
fn copy_ins_reach_the_image_from_page_aligned_memory() {
    const CS: u64 = 64 << 10;
    let mut backing = vec![0u8; (16 * CS) as usize];
    XorShift::new(12).fill(&mut backing);
    let (image, seen) = recorded_overlay(backing.len() as u64);
    let dev = CorDevice::new(image, "memory".into(), Some(raw_backing(&backing)));
    two_workers().block_on(async {
        // The L2 table first (metadata, from a buffer of its own): a guest write of the last
        // cluster as the backing holds it. Only the copy-ins' writes count.
        let last = backing.len() - CS as usize;
        dev.write_at(last as u64, backing[last..].to_vec())
            .await
            .unwrap();
        seen.reset();
        // Two reads of a cluster and a half each (copied in whole), then the stream's way.
        for at in [0, 4 * CS] {
            let data = dev
                .read_at(at, vec![0u8; (3 * CS / 2) as usize])
                .await
                .unwrap();
            assert!(
                data[..] == backing[at as usize..][..data.len()],
                "read at {at}"
            );
        }
        dev.settle_copy_ins().await;
        dev.populate_range(8 * CS, 4 * CS).await.unwrap();
        seen.writes
            .assert_all_aligned("cluster writes of the copy-ins", 3);
        let all = dev.read_at(0, vec![0u8; backing.len()]).await.unwrap();
        assert!(all == backing, "the image reads differently");
        dev.close().await.unwrap();
    });
}
