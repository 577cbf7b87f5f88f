//! The job model through the library alone: a [`StreamJob`] over a copy-on-read image whose
//! NBD backing (nbdkit with its error filter) fails reads on demand. The events a subscriber
//! receives, in order, and what the handle and the outcome say, for `stop` and `ignore`.

use std::path::Path;
use std::sync::Arc;

use copy_on_read::{BlockDevice, CorDevice, CorOptions};
use engine::job::{IoStatus, JobEvent, JobEvents, OnError, Received};
use engine::stream::{JobState, StreamJob, StreamOptions};
use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::tempdir;
use qedstream_tests::tools::ok;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A 16 MiB base with 2 MiB of data, nbdkit serving it with reads failing while `trigger`
/// exists, and `top.qed` over it.
fn failing_backing(dir: &Path) -> NbdServer {
    ok(dir, "qemu-img", &["create", "-f", "raw", "base.raw", "16M"]);
    ok(
        dir,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 4M 2M", "base.raw"],
    );
    let trigger = dir.join("fail-now");
    std::fs::write(&trigger, b"").unwrap();
    let sock = dir.join("nbd.sock");
    let server = NbdServer::start(
        "nbdkit",
        [
            "-f".to_string(),
            "-r".into(),
            "-e".into(),
            "exp".into(),
            "--filter=error".into(),
            "-U".into(),
            sock.display().to_string(),
            "file".into(),
            dir.join("base.raw").display().to_string(),
            "error-pread-rate=100%".into(),
            format!("error-pread-file={}", trigger.display()),
        ],
        &sock,
    );
    ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-f",
            "qed",
            "-b",
            &server.uri(),
            "-F",
            "raw",
            "top.qed",
        ],
    );
    server
}

async fn next_event(events: &mut JobEvents) -> JobEvent {
    let got = tokio::time::timeout(std::time::Duration::from_secs(60), events.recv())
        .await
        .expect("no job event within 60 s");
    match got {
        Received::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn options(on_error: OnError) -> StreamOptions {
    StreamOptions {
        on_error,
        in_flight: 1,
        retries: 0,
        ..StreamOptions::default()
    }
}

/// stop: Error(stop) then State(Paused), io-status failed; after the backing heals a resume
/// gives State(Running) and the job completes with the link dropped.
#[test]
fn stop_pauses_with_an_error_event_and_resume_retries() {
    let dir = tempdir();
    let d = dir.path();
    let _server = failing_backing(d);
    rt().block_on(async {
        let dev = Arc::new(
            CorDevice::open(&d.join("top.qed"), CorOptions::default())
                .await
                .unwrap(),
        );
        let (job, mut events) = StreamJob::start_watched(dev.clone(), options(OnError::Stop));
        let handle = job.handle();
        let JobEvent::Error(e) = next_event(&mut events).await else {
            panic!("the first event is not the error")
        };
        assert_eq!(e.action, OnError::Stop, "{e:?}");
        assert_eq!(
            next_event(&mut events).await,
            JobEvent::State(JobState::Paused)
        );
        let p = handle.progress();
        assert_eq!((p.state, p.io_status), (JobState::Paused, IoStatus::Failed));
        std::fs::remove_file(d.join("fail-now")).unwrap();
        handle.resume();
        assert_eq!(
            next_event(&mut events).await,
            JobEvent::State(JobState::Running)
        );
        assert_eq!(handle.progress().io_status, IoStatus::Ok);
        assert_eq!(
            next_event(&mut events).await,
            JobEvent::State(JobState::Completed)
        );
        let JobEvent::Completed {
            unlinked, ignored, ..
        } = next_event(&mut events).await
        else {
            panic!("no completion")
        };
        assert!(unlinked && ignored.is_empty());
        let outcome = job.wait().await.unwrap();
        assert!(outcome.unlinked && outcome.ignored.is_empty());
        dev.close().await.unwrap();
    });
    ok(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qed", "base.raw", "top.qed"],
    );
}

/// ignore: one Error(ignore) per failed range, no pause, and the outcome lists exactly those
/// ranges and keeps the link.
#[test]
fn ignore_reports_each_range_and_keeps_the_link() {
    let dir = tempdir();
    let d = dir.path();
    let _server = failing_backing(d);
    rt().block_on(async {
        let dev = Arc::new(
            CorDevice::open(&d.join("top.qed"), CorOptions::default())
                .await
                .unwrap(),
        );
        let (job, mut events) = StreamJob::start_watched(dev.clone(), options(OnError::Ignore));
        let mut reported = Vec::new();
        loop {
            match next_event(&mut events).await {
                JobEvent::Error(e) => {
                    assert_eq!(e.action, OnError::Ignore);
                    reported.push((e.offset, e.length));
                }
                JobEvent::State(JobState::Completed) => {}
                JobEvent::Completed {
                    unlinked, ignored, ..
                } => {
                    assert!(!unlinked);
                    assert_eq!(ignored, reported);
                    break;
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
        // The 2 MiB written, and whatever block qemu-img allocated at the start of the file.
        let covered: u64 = reported.iter().map(|r| r.1).sum();
        assert!((2 << 20..=3 << 20).contains(&covered), "{reported:?}");
        assert!(
            reported
                .iter()
                .any(|r| r.0 <= 4 << 20 && r.0 + r.1 >= 6 << 20 || r.0 >= 4 << 20),
            "{reported:?}"
        );
        let outcome = job.wait().await.unwrap();
        assert_eq!(outcome.ignored, reported);
        assert!(!outcome.unlinked);
        assert!(dev.backing().is_some());
        dev.close().await.unwrap();
    });
}
