//! How the back end runs READs: a read the device can answer on the calling thread
//! (`BlockDevice::read_blocking`) is served that way (alone in its batch: on the queue's own
//! thread; many at once on two queues: on the blocking pool, still at once), and one it gives
//! back goes through `readv`. The device here answers the low half of the disk
//! only through `read_blocking` and the high half only through `readv` (the other way fails
//! with EIO), so a request routed the wrong way shows as an IOERR status or wrong bytes.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{serve, FrontShape, Reads};
use copy_on_read::device::check_range;
use copy_on_read::{BlockingRead, Error, IoBufs, IoFuture};
use qedstream_tests::vhost_front::{BlkRequest, VhostFront};
use vhost_user_blk::BlkOptions;

const SIZE: u64 = 4 << 20;
const HALF: u64 = SIZE / 2;
const SLOT: u32 = 64 * 1024;

fn byte_at(offset: u64) -> u8 {
    (offset % 253) as u8 ^ (offset >> 16) as u8
}

/// Answers `[0, HALF)` only through `read_blocking`, `[HALF, SIZE)` only through `readv`.
#[derive(Debug, Default)]
struct SplitDisk {
    blocking_reads: AtomicU64,
    /// Of those, the ones on the queue's own thread (vhost-user-backend's `vring_worker`).
    on_queue_thread: AtomicU64,
    async_reads: AtomicU64,
}

fn fill(offset: u64, bufs: &mut IoBufs) {
    let bytes: Vec<u8> = (offset..offset + bufs.len() as u64).map(byte_at).collect();
    bufs.copy_in(0, &bytes);
}

impl Reads for SplitDisk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn describe(&self) -> String {
        "split".into()
    }
    fn read_blocking(&self, offset: u64, mut bufs: IoBufs) -> copy_on_read::Result<BlockingRead> {
        check_range(offset, bufs.len() as u64, SIZE)?;
        if offset + bufs.len() as u64 > HALF {
            return Ok(Err(bufs));
        }
        fill(offset, &mut bufs);
        self.blocking_reads.fetch_add(1, Ordering::Relaxed);
        if std::thread::current().name() == Some("vring_worker") {
            self.on_queue_thread.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(bufs))
    }
    fn readv(&self, offset: u64, mut bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            check_range(offset, bufs.len() as u64, SIZE)?;
            if offset < HALF {
                return Err(Error::Unsupported(
                    "the low half reads only on the caller's thread",
                ));
            }
            fill(offset, &mut bufs);
            self.async_reads.fetch_add(1, Ordering::Relaxed);
            Ok(bufs)
        })
    }
}

/// Reads the whole disk with `depth` requests in flight on each of `queues` queues and checks
/// every status and byte.
fn read_all(front: &mut VhostFront, queues: u16, depth: u16) {
    let mut next = 0u64;
    let mut slots = vec![vec![None::<u64>; depth as usize]; queues as usize];
    let mut outstanding = 0usize;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        for q in 0..queues {
            for s in 0..depth {
                if slots[q as usize][s as usize].is_none() && next < SIZE {
                    let request = BlkRequest::Read {
                        offset: next,
                        len: SLOT,
                    };
                    front.submit(q, s, request).unwrap();
                    slots[q as usize][s as usize] = Some(next);
                    next += u64::from(SLOT);
                    outstanding += 1;
                }
            }
        }
        if outstanding == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reads never completed"
        );
        for q in 0..queues {
            for done in front.reap(q).unwrap() {
                let offset = slots[q as usize][done.slot as usize].take().unwrap();
                assert_eq!(done.status, 0, "read at {offset} on queue {q}");
                let data = front.slot_data(q, done.slot, SLOT).unwrap();
                let want: Vec<u8> = (offset..offset + u64::from(SLOT)).map(byte_at).collect();
                assert!(data == want, "bytes at {offset}");
                outstanding -= 1;
            }
        }
        std::thread::yield_now();
    }
}

#[test]
fn reads_the_device_answers_in_place_skip_readv_and_the_others_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(SplitDisk::default());
    let runtime = qedstream_tests::runtime::two_workers();
    let options = BlkOptions {
        num_queues: 2,
        ..BlkOptions::default()
    };
    let shape = FrontShape {
        queues: 2,
        depth: 8,
        max_len: SLOT,
    };
    let (server, mut front) = serve(dir.path(), &disk, &runtime, &options, shape);

    // One request at a time (each alone in its batch), then 8 at once on each of two queues.
    read_all(&mut front, 1, 1);
    let alone = disk.blocking_reads.load(Ordering::Relaxed);
    assert_eq!(
        alone,
        HALF / u64::from(SLOT),
        "each low read answered in place"
    );
    assert_eq!(
        disk.on_queue_thread.load(Ordering::Relaxed),
        alone,
        "a request alone is read on the queue's thread, with no hop"
    );
    read_all(&mut front, 2, 8);
    assert_eq!(disk.blocking_reads.load(Ordering::Relaxed), 2 * alone);
    assert_eq!(disk.async_reads.load(Ordering::Relaxed), 2 * alone);
    // A read across the middle is given back by read_blocking and fails in readv: IOERR,
    // reported, not wrong bytes.
    let across = BlkRequest::Read {
        offset: HALF - 4096,
        len: 8192,
    };
    front.submit(0, 0, across).unwrap();
    let done = front.wait(0).unwrap();
    assert_eq!(done.len(), 1);
    assert_ne!(done[0].status, 0, "a read neither way can answer fails");
    drop(front);
    server.shutdown();
}
