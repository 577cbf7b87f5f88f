//! The guest I/O semantics of the copy-on-read device that `qedstream serve` (and any VMM)
//! relies on, each on its own:
//!
//! - a guest read of a missing cluster is served and copied in;
//! - a guest write is never overwritten by older backing data, also racing a populate of the
//!   same cluster;
//! - a guest read that misses goes ahead of the stream's own reads, under a busy stream;
//! - a copy-in that cannot be written (the disk is full) still serves the read, is counted in
//!   `CorStats`, and leaves the image clean for `qemu-img check`;
//! - while an NBD backing is reconnecting, guest requests wait for the reconnect window and
//!   then fail, or succeed once the server is back; they never return wrong data.

use qedstream_tests::hooked::{Hooked, StorageHooks};
use qedstream_tests::runtime::two_workers;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use copy_on_read::{
    BlockDevice, Capabilities, CorDevice, CorOptions, Error, Gate, IoBufs, IoFuture, LinkState,
    Status, StatusExtent, WriteFlags,
};
use parking_lot::Mutex;
use qed::{GuestOffset, Image, Mapping, OpenOptions};
use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::tools::{create_overlay, qemu_check};

const CS: u64 = 65536;

/// The base's byte at `offset` (never zero).
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8 + 1
}

fn pattern_bytes(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(pattern).collect()
}

/// `base.raw` (the pattern, `size` bytes) and `top.qed` over it in `dir`.
fn raw_chain(dir: &Path, size: u64) {
    std::fs::write(dir.join("base.raw"), pattern_bytes(0, size)).unwrap();
    create_overlay(dir, "base.raw", "raw", "top.qed", None);
}

fn mapping(dev: &CorDevice, at: u64) -> Mapping {
    dev.image().mapping_at(GuestOffset(at), 1).unwrap().0
}

#[test]
fn a_guest_read_of_a_missing_cluster_is_served_and_copied_in() {
    let dir = tempfile::tempdir().unwrap();
    raw_chain(dir.path(), 4 << 20);
    two_workers().block_on(async {
        let dev = CorDevice::open(&dir.path().join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        assert_eq!(mapping(&dev, 2 * CS), Mapping::Unallocated);
        let data = dev.read_at(2 * CS + 100, vec![0u8; 1000]).await.unwrap();
        assert_eq!(data, pattern_bytes(2 * CS + 100, 1000), "served");
        // The copy-in is stored after the read returns.
        dev.settle_copy_ins().await;
        assert!(
            matches!(mapping(&dev, 2 * CS), Mapping::Data(_)),
            "copied in"
        );
        let stats = dev.stats();
        assert_eq!((stats.misses, stats.cor_bytes), (1, CS), "{stats:?}");
        dev.close().await.unwrap();
    });
    // The image alone (its backing not opened) now holds the whole cluster.
    let image = Image::open_path(&dir.path().join("top.qed"), OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; CS as usize];
    image.read_at(&mut buf, GuestOffset(2 * CS)).unwrap();
    assert_eq!(buf, pattern_bytes(2 * CS, CS));
    image.close().unwrap();
    assert_eq!(qemu_check(dir.path(), "top.qed"), 0);
}

#[test]
fn a_guest_write_is_never_overwritten_by_a_racing_populate() {
    let dir = tempfile::tempdir().unwrap();
    raw_chain(dir.path(), 8 << 20);
    let clusters = 64u64;
    two_workers().block_on(async {
        let dev = Arc::new(
            CorDevice::open(&dir.path().join("top.qed"), CorOptions::default())
                .await
                .unwrap(),
        );
        // Each cluster: a populate of it and a small guest write into it, started together,
        // in both orders.
        let mut tasks = Vec::new();
        for c in 0..clusters {
            let (d1, d2) = (dev.clone(), dev.clone());
            let populate = async move { d1.populate_range(c * CS, CS).await.map(drop) };
            let write = async move { d2.write_at(c * CS + 1000 + c, vec![0xee; 300]).await };
            tasks.push(tokio::spawn(async move {
                if c % 2 == 0 {
                    let (p, w) = tokio::join!(populate, write);
                    p.and(w)
                } else {
                    let (w, p) = tokio::join!(write, populate);
                    p.and(w)
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for c in 0..clusters {
            let got = dev.read_at(c * CS, vec![0u8; CS as usize]).await.unwrap();
            let mut want = pattern_bytes(c * CS, CS);
            let at = (1000 + c) as usize;
            want[at..at + 300].fill(0xee);
            assert!(got == want, "cluster {c}: the guest write was lost or torn");
        }
        Arc::try_unwrap(dev).unwrap().close().await.unwrap();
    });
    assert_eq!(qemu_check(dir.path(), "top.qed"), 0);
}

/// What a [`SlowBacking`] saw: a read starting or ending at an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Start(u64),
    End(u64),
}

/// A backing whose reads wait until the test releases their offset, and which logs when each
/// starts and ends: the order of backing reads is then the test's to observe.
#[derive(Debug)]
struct SlowBacking {
    size: u64,
    log: Mutex<Vec<Event>>,
    released: Mutex<(HashSet<u64>, bool)>,
    wake: tokio::sync::Notify,
}

impl SlowBacking {
    fn new(size: u64) -> SlowBacking {
        SlowBacking {
            size,
            log: Mutex::new(Vec::new()),
            released: Mutex::new((HashSet::new(), false)),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn release(&self, offset: u64) {
        self.released.lock().0.insert(offset);
        self.wake.notify_waiters();
    }

    fn release_all(&self) {
        self.released.lock().1 = true;
        self.wake.notify_waiters();
    }

    fn position(&self, e: Event) -> Option<usize> {
        self.log.lock().iter().position(|&x| x == e)
    }

    async fn wait_until_released(&self, offset: u64) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let r = self.released.lock();
                if r.1 || r.0.contains(&offset) {
                    return;
                }
            }
            notified.await;
        }
    }
}

impl BlockDevice for SlowBacking {
    fn size(&self) -> u64 {
        self.size
    }

    fn readv(&self, offset: u64, mut bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            self.log.lock().push(Event::Start(offset));
            self.wait_until_released(offset).await;
            let data = pattern_bytes(offset, bufs.len() as u64);
            bufs.copy_in(0, &data);
            self.log.lock().push(Event::End(offset));
            Ok(bufs)
        })
    }

    fn writev(&self, _: u64, _: IoBufs, _: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async { Err(Error::ReadOnly) })
    }

    fn write_zeroes(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(Error::ReadOnly) })
    }

    fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(Error::Unsupported("discard")) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<StatusExtent>> {
        Box::pin(async move {
            Ok(vec![StatusExtent {
                offset,
                length,
                status: Status::Data,
            }])
        })
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.block_status = true;
        c
    }

    fn describe(&self) -> String {
        "slow".into()
    }

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// Waits (polling; no timing is asserted) until `check` holds.
async fn until(mut check: impl FnMut() -> bool) {
    while !check() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[test]
fn a_guest_miss_goes_ahead_of_a_busy_stream() {
    let size = 16 * CS;
    let storage = qed::MemStorage::new();
    let mut create = qed::CreateOptions::new(size);
    create.backing = Some(("slow".into(), qed::BackingFormat::Raw));
    Image::create(&storage, &create).unwrap();
    let image = Image::open(Box::new(storage), OpenOptions::default()).unwrap();
    let backing = Arc::new(SlowBacking::new(size));
    let dev = Arc::new(CorDevice::new(
        image,
        "mem".into(),
        Some(backing.clone() as Arc<dyn BlockDevice>),
    ));
    two_workers().block_on(async {
        // The stream: cluster after cluster, one at a time.
        let done = Arc::new(AtomicU64::new(0));
        let stream = tokio::spawn({
            let (dev, done) = (dev.clone(), done.clone());
            async move {
                for c in 0..8 {
                    dev.populate_range(c * CS, CS).await.unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        until(|| backing.position(Event::Start(0)).is_some()).await;
        // A guest read far from the stream misses while the stream's read is in flight.
        let guest = tokio::spawn({
            let dev = dev.clone();
            async move { dev.read_at(12 * CS + 5, vec![0u8; 4096]).await }
        });
        until(|| backing.position(Event::Start(12 * CS)).is_some()).await;
        // The stream's read ends; its next one must wait for the guest.
        backing.release(0);
        until(|| done.load(Ordering::SeqCst) == 1).await;
        // Give a stream that does not wait the chance to start its next read (a correct one
        // never does, however long this takes).
        for _ in 0..250 {
            if backing.position(Event::Start(CS)).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        backing.release(12 * CS);
        let data = guest.await.unwrap().unwrap();
        assert_eq!(data, pattern_bytes(12 * CS + 5, 4096));
        backing.release_all();
        stream.await.unwrap();
        let guest_end = backing.position(Event::End(12 * CS)).unwrap();
        let next_stream_read = backing.position(Event::Start(CS)).unwrap();
        assert!(
            guest_end < next_stream_read,
            "the stream read on while a guest miss waited: {:?}",
            backing.log.lock()
        );
    });
    let dev = Arc::try_unwrap(dev).unwrap();
    two_workers().block_on(dev.close()).unwrap();
}

/// Hooks of a file that cannot grow past `.0` bytes: writes and resizes beyond it fail with
/// ENOSPC, as on a full file system.
#[derive(Debug)]
struct FullDisk(u64);

impl StorageHooks for FullDisk {
    fn write(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.0 {
            return Err(std::io::Error::from_raw_os_error(libc_enospc()));
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > self.0 {
            return Err(std::io::Error::from_raw_os_error(libc_enospc()));
        }
        Ok(())
    }
}

/// ENOSPC on Linux.
fn libc_enospc() -> i32 {
    28
}

#[test]
fn a_copy_in_that_cannot_be_stored_still_serves_the_read() {
    let dir = tempfile::tempdir().unwrap();
    raw_chain(dir.path(), 4 << 20);
    let path = dir.path().join("top.qed");
    two_workers().block_on(async {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let limit = file.metadata().unwrap().len();
        let options = OpenOptions {
            path: Some(path.clone()),
            ..OpenOptions::default()
        };
        let full = Hooked {
            inner: file,
            hooks: FullDisk(limit),
        };
        let image = Image::open(Box::new(full), options).unwrap();
        let backing = Gate::default().open_below(&image, &path, 0).await.unwrap();
        let dev = CorDevice::new(image, path.display().to_string(), backing);
        let data = dev.read_at(3 * CS + 7, vec![0u8; 5000]).await.unwrap();
        assert_eq!(data, pattern_bytes(3 * CS + 7, 5000), "served anyway");
        dev.settle_copy_ins().await;
        assert_eq!(
            mapping(&dev, 3 * CS),
            Mapping::Unallocated,
            "nothing linked"
        );
        let stats = dev.stats();
        assert_eq!(
            (stats.misses, stats.cor_bytes, stats.cor_failures),
            (1, 0, 1),
            "{stats:?}"
        );
        // A second read of the same cluster is served from the backing again.
        let again = dev.read_at(3 * CS, vec![0u8; CS as usize]).await.unwrap();
        assert_eq!(again, pattern_bytes(3 * CS, CS));
        dev.settle_copy_ins().await;
        assert_eq!(dev.stats().cor_failures, 2);
        dev.close().await.unwrap();
    });
    assert_eq!(
        qemu_check(dir.path(), "top.qed"),
        0,
        "the image stays clean"
    );
}

/// `top.qed` over `base.raw` served by qemu-nbd on `sock`, and a device on it whose NBD
/// client gives up reconnecting after `window`.
async fn nbd_chain(dir: &Path, window: Duration) -> (NbdServer, CorDevice) {
    std::fs::write(dir.join("base.raw"), pattern_bytes(0, 4 << 20)).unwrap();
    let sock = dir.join("nbd.sock");
    let server = NbdServer::qemu_nbd(&dir.join("base.raw"), &sock);
    create_overlay(dir, &server.uri(), "raw", "top.qed", None);
    let mut gate = Gate::default();
    gate.nbd.reconnect_delay = window;
    gate.nbd.request_timeout = Some(Duration::from_secs(5));
    let options = CorOptions {
        gate,
        ..CorOptions::default()
    };
    let dev = CorDevice::open(&dir.join("top.qed"), options)
        .await
        .unwrap();
    (server, dev)
}

#[test]
fn guest_requests_fail_after_the_reconnect_window_and_work_again_once_the_server_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let _server = two_workers().block_on(async {
        let (mut server, dev) = nbd_chain(dir.path(), Duration::from_secs(2)).await;
        let link = dev.reconnect().expect("an NBD backing reports its link");
        // Served and copied in while connected.
        let first = dev.read_at(0, vec![0u8; 4096]).await.unwrap();
        assert_eq!(first, pattern_bytes(0, 4096));
        server.kill();
        // A miss and a partial write into a missing cluster both need the backing: they wait
        // for the reconnect window (the client's error says it tried that long), then fail.
        let waited = |r: &Result<(), Error>| {
            matches!(
                r,
                Err(Error::Nbd {
                    source: nbd_client::Error::ReconnectFailed { .. },
                    ..
                })
            )
        };
        let read = dev.read_at(5 * CS, vec![0u8; 4096]).await.map(drop);
        assert!(waited(&read), "a read during the outage: {read:?}");
        let write = dev.write_at(6 * CS + 10, vec![0xee; 10]).await;
        assert!(
            waited(&write),
            "a partial write during the outage: {write:?}"
        );
        // Past the window the link is offline: requests fail at once, nothing was linked, and
        // local data is still served.
        let mut state = link.state();
        while state != LinkState::Offline {
            assert_ne!(state, LinkState::Failed, "offline, not failed for good");
            state = link.changed(state).await;
        }
        let read = dev.read_at(5 * CS, vec![0u8; 4096]).await.map(drop);
        assert!(waited(&read), "a read while offline: {read:?}");
        assert_eq!(mapping(&dev, 5 * CS), Mapping::Unallocated);
        assert_eq!(mapping(&dev, 6 * CS), Mapping::Unallocated);
        let local = dev.read_at(0, vec![0u8; 4096]).await.unwrap();
        assert_eq!(local, first);
        // The server comes back long after the window: the device reconnects in the background
        // and serves (and copies in) the right data again, without being reopened.
        let server = tokio::task::spawn_blocking(move || {
            server.restart();
            server
        })
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            let mut state = link.state();
            while state != LinkState::Connected {
                state = link.changed(state).await;
            }
        })
        .await
        .expect("the link did not come back within 30 s of the server's restart");
        let back = dev.read_at(5 * CS, vec![0u8; 4096]).await.unwrap();
        assert_eq!(back, pattern_bytes(5 * CS, 4096));
        dev.settle_copy_ins().await;
        assert_ne!(mapping(&dev, 5 * CS), Mapping::Unallocated, "copied in");
        dev.close().await.unwrap();
        server
    });
    assert_eq!(qemu_check(dir.path(), "top.qed"), 0);
}

#[test]
fn guest_requests_wait_for_a_server_back_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    two_workers().block_on(async {
        let (mut server, dev) = nbd_chain(dir.path(), Duration::from_secs(30)).await;
        let dev = Arc::new(dev);
        let link = dev.reconnect().expect("an NBD backing reports its link");
        assert_eq!(dev.read_at(0, vec![0u8; 512]).await.unwrap().len(), 512);
        server.kill();
        let read = tokio::spawn({
            let dev = dev.clone();
            async move { dev.read_at(5 * CS + 3, vec![0u8; 4096]).await }
        });
        let write = tokio::spawn({
            let dev = dev.clone();
            async move { dev.write_at(6 * CS + 10, vec![0xee; 10]).await }
        });
        // The requests notice the loss and wait; the server comes back within the window.
        let state = link.changed(LinkState::Connected).await;
        assert_eq!(state, LinkState::Reconnecting);
        let server = tokio::task::spawn_blocking(move || {
            server.restart();
            server
        })
        .await
        .unwrap();
        let data = read.await.unwrap().unwrap();
        assert_eq!(data, pattern_bytes(5 * CS + 3, 4096), "the right data");
        write.await.unwrap().unwrap();
        let mut want = pattern_bytes(6 * CS, 100);
        want[10..20].fill(0xee);
        assert_eq!(dev.read_at(6 * CS, vec![0u8; 100]).await.unwrap(), want);
        Arc::try_unwrap(dev).unwrap().close().await.unwrap();
        drop(server);
    });
}
