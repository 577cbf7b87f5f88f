//! A stream whose error policy fails the job (`report`) says so at once, whatever its other
//! requests in flight are doing: those are aborted, as a cancel aborts them, instead of being
//! waited for. Behind nbdkit's curl plugin with its web server down, each read in flight took
//! nbdkit's retries, then the NBD client's request timeout and reconnect window to end, and a
//! failed stream reported a minute late (`image_store.rs` measured 61 s). Here the backing
//! fails the first request at once and never answers the others; the job must still end, with
//! the first request's error, under a 60 s hang guard that fails the test.

use std::sync::Arc;
use std::time::Duration;

use copy_on_read::{BlockDevice, Capabilities, CorDevice, IoBufs, IoFuture, WriteFlags};
use engine::stream::{JobState, StreamJob, StreamOptions};
use qed::{BackingFormat, CreateOptions, Image, MemStorage, OpenOptions};
use qedstream_tests::runtime::two_workers;

const MIB: u64 = 1 << 20;
/// The backing's size: sixteen of the stream's 4 MiB requests.
const SIZE: u64 = 64 * MIB;
/// Reads below this offset (the stream's first request) fail at once.
const FAILING: u64 = 4 * MIB;

/// A read-only backing that fails every read below [`FAILING`] at once and never answers
/// any other.
#[derive(Debug)]
struct FailFirstHangRest;

impl BlockDevice for FailFirstHangRest {
    fn size(&self) -> u64 {
        SIZE
    }
    fn readv(&self, offset: u64, _bufs: IoBufs) -> IoFuture<'_, IoBufs> {
        Box::pin(async move {
            if offset < FAILING {
                return Err(copy_on_read::Error::Io {
                    op: "reading the backing",
                    offset,
                    source: std::io::Error::other("injected failure"),
                });
            }
            std::future::pending().await
        })
    }
    fn writev(&self, _: u64, _: IoBufs, _: WriteFlags) -> IoFuture<'_, IoBufs> {
        Box::pin(async { Err(copy_on_read::Error::ReadOnly) })
    }
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(copy_on_read::Error::ReadOnly) })
    }
    fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(copy_on_read::Error::Unsupported("discard")) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, _: u64, _: u64) -> IoFuture<'_, Vec<copy_on_read::StatusExtent>> {
        Box::pin(async { Err(copy_on_read::Error::Unsupported("block status")) })
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn describe(&self) -> String {
        "fail-first-hang-rest".into()
    }
}

/// An empty in-memory QED overlay (64 KiB clusters) over [`FailFirstHangRest`].
fn overlay() -> Arc<CorDevice> {
    let storage = MemStorage::new();
    let options = CreateOptions {
        backing: Some(("mem".into(), BackingFormat::Raw)),
        ..CreateOptions::new(SIZE)
    };
    Image::create(&storage, &options).expect("creating the overlay");
    let image = Image::open(Box::new(storage), OpenOptions::default()).expect("opening it");
    Arc::new(CorDevice::new(
        image,
        "top.qed".into(),
        Some(Arc::new(FailFirstHangRest)),
    ))
}

#[test]
fn a_failed_request_ends_the_job_without_waiting_for_the_others_in_flight() {
    let rt = two_workers();
    let dev = overlay();
    let options = StreamOptions::default();
    assert!(
        options.in_flight > 1 && options.request_bytes == FAILING,
        "the scenario needs several 4 MiB requests in flight: {options:?}"
    );
    let result = rt.block_on(async {
        let job = StreamJob::start(Arc::clone(&dev), options);
        let handle = job.handle();
        let ended = tokio::time::timeout(Duration::from_secs(60), job.wait()).await;
        (ended, handle.progress())
    });
    let (ended, progress) = result;
    let outcome = ended.unwrap_or_else(|_| {
        panic!("the job hung on its requests in flight after one failed: {progress:?}")
    });
    let err = outcome.expect_err("the stream succeeded over a failing backing");
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(progress.state, JobState::Failed, "{progress:?}");
}
