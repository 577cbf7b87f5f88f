//! A queue's requests are completed one by one as they end, not a batch at a time, and chains
//! the driver adds while others run are started without waiting for those: a fast READ
//! completes while a slow one taken with it is still running. The device holds the READs at
//! 0 and 4096 until the test lets each go.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{serve, FrontShape, Reads};
use copy_on_read::device::check_range;
use copy_on_read::{Error, IoBufs, IoFuture};
use qedstream_tests::vhost_front::{BlkRequest, VhostFront};
use tokio::sync::Semaphore;
use vhost_user_blk::BlkOptions;

const SIZE: u64 = 1 << 20;

/// Reads as its offset's low byte; the READs at 0 and 4096 wait for their gate.
#[derive(Debug)]
struct GatedDisk {
    first: Arc<Semaphore>,
    second: Arc<Semaphore>,
}

impl Reads for GatedDisk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn describe(&self) -> String {
        "gated".into()
    }
    fn readv(&self, offset: u64, mut bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            check_range(offset, bufs.len() as u64, SIZE)?;
            let gate = match offset {
                0 => Some(&self.first),
                4096 => Some(&self.second),
                _ => None,
            };
            if let Some(gate) = gate {
                let permit = gate.acquire().await.map_err(|_| Error::Closed)?;
                permit.forget();
            }
            bufs.copy_in(0, &vec![offset as u8; bufs.len()]);
            Ok(bufs)
        })
    }
}

/// Lets every held READ go when dropped, so that a failing test ends instead of leaving the
/// queue's worker blocked while the runtime shuts down.
struct LetGo(Arc<GatedDisk>);

impl Drop for LetGo {
    fn drop(&mut self) {
        self.0.first.add_permits(1);
        self.0.second.add_permits(1);
    }
}

/// Waits for the completion of slot `slot` on queue 0; fails the test after 20 s.
fn completed(front: &mut VhostFront, slot: u16, seen: &mut Vec<u16>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(&slot) {
        assert!(
            Instant::now() < deadline,
            "slot {slot} never completed (completed: {seen:?})"
        );
        for done in front.reap(0).unwrap() {
            assert_eq!(done.status, 0, "{done:?}");
            seen.push(done.slot);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_fast_read_completes_while_a_slow_one_taken_with_it_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(GatedDisk {
        first: Arc::new(Semaphore::new(0)),
        second: Arc::new(Semaphore::new(0)),
    });
    let runtime = qedstream_tests::runtime::two_workers();
    let _let_go = LetGo(disk.clone());
    let shape = FrontShape {
        queues: 1,
        depth: 4,
        max_len: 4096,
    };
    let (server, mut front) = serve(dir.path(), &disk, &runtime, &BlkOptions::default(), shape);
    let read = |offset| BlkRequest::Read { offset, len: 4096 };

    // Slot 0 holds the worker; slots 1 (held) and 2 (free) queue up behind it.
    front.submit(0, 0, read(0)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    front.submit(0, 1, read(4096)).unwrap();
    front.submit(0, 2, read(8192)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut seen = Vec::new();
    assert!(
        front.reap(0).unwrap().is_empty(),
        "nothing may complete yet"
    );

    // Slot 0 ends: slots 1 and 2 start together; 2 must complete while 1 is still held.
    disk.first.add_permits(1);
    completed(&mut front, 0, &mut seen);
    completed(&mut front, 2, &mut seen);
    assert!(!seen.contains(&1), "slot 1 completed before it was let go");
    disk.second.add_permits(1);
    completed(&mut front, 1, &mut seen);
    for (slot, offset) in [(0u16, 0u64), (1, 4096), (2, 8192)] {
        let data = front.slot_data(0, slot, 4096).unwrap();
        assert!(data.iter().all(|&b| b == offset as u8), "slot {slot}");
    }
    drop(front);
    server.shutdown();
}
