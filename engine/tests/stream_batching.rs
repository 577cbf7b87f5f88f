//! The stream's batched commit and its memory bound, on a QED image in memory whose storage
//! counts flushes, over a raw backing:
//!
//! - units fetched while a batch is being stored are stored together, with one flush for the
//!   whole batch before its L2 updates (not one per unit): the flushes of a whole stream are
//!   its batches plus a fixed few (the new L2 table, the backing drop), and far fewer than its
//!   units;
//! - whatever `in_flight` and `request_bytes` say, the job's copy buffers stay within
//!   `buffer_budget`: never more allocated, never more handed out at once, and they are
//!   recycled (a stream of 12 times the budget allocates the budget at most);
//! - batches are stored side by side: a batch is written and flushed while an earlier
//!   batch's flush is still running (the disk writes one back while the next is copied);
//! - over a local backing the copy buffers are page-aligned: every cluster the stream stores
//!   reaches the image's storage from a page-aligned address, which an O_DIRECT file
//!   (`--cache none`) writes with no bounce copy;
//! - the image then reads as the backing.
//!
//! The storage's flush takes a few milliseconds (as a real `fdatasync` does), so that units
//! queue up behind a batch being stored; nothing here asserts on time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use copy_on_read::CorDevice;
use engine::stream::{StreamJob, StreamOptions};
use qed::{Image, OpenOptions};
use qedstream_tests::flushes::{counted_overlay, overlay_memory};
use qedstream_tests::hooked::{Hooked, StorageHooks};
use qedstream_tests::io_addresses::recorded_overlay;
use qedstream_tests::{disk_over, raw_backing, Disk, XorShift};

/// Flushes running now, and the most seen at once.
#[derive(Debug, Default)]
struct FlushOverlap {
    counts: Mutex<(u32, u32)>,
    changed: Condvar,
}

/// Hooks whose flushes record how many run at once. A flush waits (up to 2 s) until another
/// one has run beside it, so that a second batch has every chance to start while the first is
/// being flushed; stores taken in turns never overlap, and then each flush only waits out the
/// 2 s.
#[derive(Debug)]
struct Overlapping(Arc<FlushOverlap>);

impl StorageHooks for Overlapping {
    fn flush(&self) -> std::io::Result<()> {
        let o = &self.0;
        let mut c = o.counts.lock().unwrap();
        c.0 += 1;
        c.1 = c.1.max(c.0);
        o.changed.notify_all();
        let (mut c, _) = o
            .changed
            .wait_timeout_while(c, Duration::from_secs(2), |c| c.1 < 2)
            .unwrap();
        c.0 -= 1;
        Ok(())
    }
}

/// An empty overlay (64 KiB clusters) of `backing` whose storage records flushes that overlap.
fn overlapping_overlay(backing: &[u8], overlap: &Arc<FlushOverlap>) -> Disk {
    let storage = Hooked {
        inner: overlay_memory(backing.len() as u64),
        hooks: Overlapping(Arc::clone(overlap)),
    };
    let image = Image::open(Box::new(storage), OpenOptions::default()).unwrap();
    disk_over(image, Some(raw_backing(backing)))
}

/// An empty overlay (64 KiB clusters) of `backing` on a flush-counting storage, and its
/// flush counter.
fn overlay(backing: &[u8], flush_delay: Duration) -> (Disk, Arc<AtomicU64>) {
    let (image, flushes) = counted_overlay(backing.len() as u64, flush_delay);
    (disk_over(image, Some(raw_backing(backing))), flushes)
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    XorShift::new(seed).fill(&mut b);
    b
}

/// Streams `disk` with `options` to its end and checks that it reads as `backing`.
fn stream(disk: &Disk, options: StreamOptions, backing: &[u8]) -> engine::stream::StreamOutcome {
    let dev: Arc<CorDevice> = Arc::clone(disk.device());
    let outcome = disk
        .block_on(async { StreamJob::start(dev, options).wait().await })
        .unwrap();
    assert!(outcome.unlinked, "the stream kept its backing");
    let mut got = vec![0u8; backing.len()];
    disk.read_at(&mut got, 0).unwrap();
    qedstream_tests::assert_same_bytes(&got, backing, "the streamed image");
    outcome
}

#[test]
fn a_batch_of_units_shares_one_flush() {
    let backing = random_bytes(16 << 20, 1);
    let (disk, flushes) = overlay(&backing, Duration::from_millis(30));
    let units = (16u64 << 20) / (256 << 10);
    // Each 256 KiB unit takes one of the pool's 1 MiB buffers (over a local backing): a budget
    // of 64 of them lets every unit be in flight at once.
    let options = StreamOptions {
        request_bytes: 256 << 10,
        in_flight: 64,
        buffer_budget: 64 << 20,
        ..StreamOptions::default()
    };
    let outcome = stream(&disk, options, &backing);
    let flushes = flushes.load(Ordering::Acquire);
    println!(
        "{units} units, {} batches, {flushes} flushes",
        outcome.batches
    );
    // One flush per batch, one for the new L2 table, and those of the backing drop.
    assert!(
        flushes <= outcome.batches + 4,
        "{flushes} flushes for {} batches",
        outcome.batches
    );
    assert!(
        outcome.batches * 4 <= units,
        "{} batches for {units} units: units were not batched",
        outcome.batches
    );
}

#[test]
fn buffers_stay_within_the_budget_whatever_in_flight_says() {
    let backing = random_bytes(24 << 20, 2);
    let (disk, _) = overlay(&backing, Duration::from_millis(1));
    let budget = 2 << 20;
    let options = StreamOptions {
        request_bytes: 1 << 30,
        in_flight: 10_000,
        buffer_budget: budget,
        ..StreamOptions::default()
    };
    let outcome = stream(&disk, options, &backing);
    let b = outcome.buffers;
    println!("{b:?}, {} batches", outcome.batches);
    assert_eq!(b.budget, budget);
    assert!(
        b.peak <= budget,
        "{} bytes of buffers out at once: {b:?}",
        b.peak
    );
    assert!(
        b.allocated <= budget,
        "{} bytes allocated: {b:?}",
        b.allocated
    );
    assert!(b.peak > 0, "no buffer was used: {b:?}");
}

#[test]
fn a_batch_is_stored_while_an_earlier_one_flushes() {
    let backing = random_bytes(16 << 20, 3);
    let overlap = Arc::new(FlushOverlap::default());
    let disk = overlapping_overlay(&backing, &overlap);
    let options = StreamOptions {
        request_bytes: 1 << 20,
        in_flight: 16,
        ..StreamOptions::default()
    };
    let outcome = stream(&disk, options, &backing);
    let most = overlap.counts.lock().unwrap().1;
    println!(
        "{} batches, at most {most} flushes at once",
        outcome.batches
    );
    assert!(
        most >= 2,
        "batches were stored one at a time: at most {most} flush at once in {} batches",
        outcome.batches
    );
}

#[test]
fn over_a_local_backing_clusters_are_stored_from_page_aligned_buffers() {
    let backing = random_bytes(8 << 20, 4);
    let (image, seen) = recorded_overlay(backing.len() as u64);
    let disk = disk_over(image, Some(raw_backing(&backing)));
    // The L2 table (metadata, written from a buffer of its own) comes first, with a guest
    // write of the last cluster as the backing holds it; only the stream's writes count.
    let last = backing.len() - (64 << 10);
    disk.write_at(&backing[last..], last as u64).unwrap();
    seen.reset();
    stream(&disk, StreamOptions::default(), &backing);
    seen.writes
        .assert_all_aligned("cluster writes of the stream", 1);
}
