//! A full disk during copy-on-read and the stream, on a real file system that fills up (a
//! small tmpfs and a filler file; see `qedstream_tests::tmpfs`), end to end:
//!
//! - library: a [`StreamJob`] under `on-error` `stop` pauses with a `nospace` error event and
//!   I/O status `Nospace`; meanwhile a guest read of a missing cluster through the
//!   [`CorDevice`] returns the backing's bytes (its copy-in fails, is counted, links nothing),
//!   a guest write that needs a new cluster fails and leaves nothing, and the guest writes
//!   acknowledged before stay; once the filler is deleted a resume completes and drops the
//!   link. `report` fails with a nospace error and a later run completes; `ignore` lists the
//!   ranges and keeps the link. Every image is then clean for `qemu-img check` and equal to
//!   the base plus the acknowledged guest writes;
//! - process: `qedstream serve --stream --on-error stop --control SOCK` on a disk that fills up
//!   mid-stream emits `BLOCK_JOB_ERROR` (`action: stop`, `nospace: true`), `query-block-jobs`
//!   says paused with `io-status: nospace` (the shapes qemu-storage-daemon's block-stream gives
//!   on the same full tmpfs), and `qedstream job SOCK resume` lets it complete once space is
//!   freed; the offline `qedstream stream` exits with an ENOSPC message that says how to go
//!   on (`report`), refuses `stop` (nothing could resume it) and reports skipped ranges
//!   (`ignore`), and running it again after freeing space completes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use copy_on_read::{BlockDevice, CorDevice, CorOptions};
use engine::job::{IoStatus, JobEvent, JobEvents, OnError, Operation, Received};
use engine::stream::{JobState, StreamJob, StreamOptions};
use qed::{GuestOffset, Mapping};
use qedstream_tests::qmp::Qmp;
use qedstream_tests::served::{Served, DEADLINE};
use qedstream_tests::tempdir;
use qedstream_tests::tmpfs::Tmpfs;
use qedstream_tests::tools::{ok, qemu_check, run_with_deadline};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const CS: u64 = 65536;
/// The virtual disk: 8 MiB, every byte data in the base.
const SIZE: u64 = 8 * MIB;

/// A base on the ordinary temporary folder, a QED overlay over it on a 16 MiB tmpfs, and
/// `expected.raw`: the base plus every guest write acknowledged so far.
struct Fixture {
    dir: tempfile::TempDir,
    /// Holds the overlay (and the filler); unmounted on drop.
    disk: Tmpfs,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempdir();
        let d = &dir.path().to_path_buf();
        ok(d, "qemu-img", &["create", "-f", "raw", "base.raw", "8M"]);
        // A different byte in each 2 MiB quarter: a cluster copied to the wrong place shows.
        let writes = ["0x11 0 2M", "0x22 2M 2M", "0x33 4M 2M", "0x44 6M 2M"];
        for w in writes {
            ok(
                d,
                "qemu-io",
                &["-f", "raw", "-c", &format!("write -P {w}"), "base.raw"],
            );
        }
        std::fs::copy(d.join("base.raw"), d.join("expected.raw")).unwrap();
        let disk = Tmpfs::mount(16 * MIB);
        let base = d.join("base.raw");
        let f = Fixture { dir, disk };
        ok(
            d,
            "qemu-img",
            &[
                "create",
                "-f",
                "qed",
                "-b",
                path_str(&base),
                "-F",
                "raw",
                path_str(&f.image()),
            ],
        );
        f
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn image(&self) -> PathBuf {
        self.disk.path().join("top.qed")
    }

    /// Records an acknowledged guest write of `len` bytes of `byte` at `offset`.
    fn expect_write(&self, byte: u8, offset: u64, len: u64) {
        let cmd = format!("write -P {byte:#x} {offset} {len}");
        ok(
            self.dir(),
            "qemu-io",
            &["-f", "raw", "-c", &cmd, "expected.raw"],
        );
    }

    /// `qemu-img check` of the image is clean, and it reads as `expected.raw`.
    fn assert_clean_and_expected(&self) {
        assert_eq!(qemu_check(self.disk.path(), "top.qed"), 0, "qemu-img check");
        let expected = self.dir().join("expected.raw");
        let image = self.image();
        ok(
            self.dir(),
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qed",
                path_str(&expected),
                path_str(&image),
            ],
        );
    }

    /// The backing name in the image header, if any (`qemu-img info`).
    fn backing(&self) -> Option<String> {
        let image = self.image();
        let info = ok(
            self.dir(),
            "qemu-img",
            &["info", "--output=json", path_str(&image)],
        );
        let v: Value = serde_json::from_str(&info).unwrap();
        v["backing-filename"].as_str().map(str::to_string)
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn next_event(events: &mut JobEvents) -> JobEvent {
    match tokio::time::timeout(DEADLINE, events.recv()).await {
        Ok(Received::Event(e)) => e,
        Ok(other) => panic!("expected a job event, got {other:?}"),
        Err(_) => panic!("no job event within {DEADLINE:?}"),
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

fn mapping(dev: &CorDevice, at: u64) -> Mapping {
    dev.image().mapping_at(GuestOffset(at), 1).unwrap().0
}

/// stop: the job pauses on ENOSPC with a nospace error and I/O status; guest I/O goes on
/// correctly meanwhile; after the filler goes, a resume completes and drops the link.
#[test]
fn stop_pauses_on_a_full_disk_guest_reads_still_served_and_resume_completes() {
    let f = Fixture::new();
    rt().block_on(async {
        let dev = Arc::new(
            CorDevice::open(&f.image(), CorOptions::default())
                .await
                .unwrap(),
        );
        // Guest writes while there is room: a partial cluster (merged with the backing) and
        // a whole one. Both are acknowledged, so both must survive.
        dev.write_at(MIB + 512, vec![0xee; 4096]).await.unwrap();
        dev.write_at(6 * MIB, vec![0xdd; CS as usize])
            .await
            .unwrap();
        dev.flush().await.unwrap();
        f.expect_write(0xee, MIB + 512, 4096);
        f.expect_write(0xdd, 6 * MIB, CS);
        let filler = f.disk.fill_leaving(0);

        let (job, mut events) = StreamJob::start_watched(dev.clone(), options(OnError::Stop));
        let handle = job.handle();
        let JobEvent::Error(e) = next_event(&mut events).await else {
            panic!("the first event is not the error")
        };
        assert!(e.nospace, "{e:?}");
        assert_eq!(
            (e.action, e.operation),
            (OnError::Stop, Operation::Write),
            "{e:?}"
        );
        assert_eq!(
            next_event(&mut events).await,
            JobEvent::State(JobState::Paused)
        );
        let p = handle.progress();
        assert_eq!(
            (p.state, p.io_status),
            (JobState::Paused, IoStatus::Nospace)
        );
        assert!(handle.is_paused());

        // A guest read of a cluster nobody copied: the backing's bytes, nothing linked.
        let before = dev.stats().cor_failures;
        let got = dev.read_at(5 * MIB + 100, vec![0; 1000]).await.unwrap();
        assert_eq!(got, vec![0x33; 1000], "served from the backing");
        dev.settle_copy_ins().await;
        assert!(dev.stats().cor_failures > before, "{:?}", dev.stats());
        assert_eq!(
            mapping(&dev, 5 * MIB),
            Mapping::Unallocated,
            "nothing linked"
        );
        // The acknowledged writes read back.
        let got = dev.read_at(MIB, vec![0; 8192]).await.unwrap();
        assert_eq!(&got[..512], &[0x11; 512][..]);
        assert_eq!(&got[512..4608], &[0xee; 4096][..]);
        assert_eq!(&got[4608..], &[0x11; 8192 - 4608][..]);
        // A write that needs a new cluster fails (it is not acknowledged) and leaves nothing.
        let refused = dev.write_at(7 * MIB, vec![0xcc; 4096]).await.unwrap_err();
        assert!(engine::error::is_nospace(&refused), "{refused}");
        assert_eq!(mapping(&dev, 7 * MIB), Mapping::Unallocated);

        std::fs::remove_file(&filler).unwrap();
        handle.resume();
        assert_eq!(
            next_event(&mut events).await,
            JobEvent::State(JobState::Running)
        );
        assert_eq!(handle.progress().io_status, IoStatus::Ok);
        let outcome = tokio::time::timeout(DEADLINE, job.wait())
            .await
            .expect("the resumed stream hangs")
            .unwrap();
        assert!(
            outcome.unlinked && outcome.ignored.is_empty(),
            "{outcome:?}"
        );
        dev.close().await.unwrap();
    });
    assert_eq!(f.backing(), None, "the link is dropped");
    f.assert_clean_and_expected();
}

/// report: the job fails with a nospace error and leaves the image clean and linked; a new
/// job after the filler goes completes.
#[test]
fn report_fails_on_a_full_disk_and_a_later_run_completes() {
    let f = Fixture::new();
    // Room for part of a 4 MiB request: tmpfs stores what fits, then says ENOSPC.
    let filler = f.disk.fill_leaving(MIB);
    rt().block_on(async {
        let dev = Arc::new(
            CorDevice::open(&f.image(), CorOptions::default())
                .await
                .unwrap(),
        );
        let (job, mut events) = StreamJob::start_watched(dev.clone(), options(OnError::Report));
        let JobEvent::Error(e) = next_event(&mut events).await else {
            panic!("the first event is not the error")
        };
        assert!(e.nospace && e.action == OnError::Report, "{e:?}");
        let err = job.wait().await.unwrap_err();
        assert!(err.is_nospace(), "{err}");
        dev.close().await.unwrap();
    });
    assert_eq!(
        qemu_check(f.disk.path(), "top.qed"),
        0,
        "clean after the failure"
    );
    assert!(f.backing().is_some(), "the link stays");
    std::fs::remove_file(filler).unwrap();
    rt().block_on(async {
        let dev = Arc::new(
            CorDevice::open(&f.image(), CorOptions::default())
                .await
                .unwrap(),
        );
        let job = StreamJob::start(dev.clone(), options(OnError::Report));
        let outcome = job.wait().await.unwrap();
        assert!(outcome.unlinked, "{outcome:?}");
        dev.close().await.unwrap();
    });
    assert_eq!(f.backing(), None);
    f.assert_clean_and_expected();
}

/// ignore: every range fails for lack of space and is skipped; the job completes listing
/// them all, keeps the link, and the image reads as the base through it.
#[test]
fn ignore_on_a_full_disk_lists_the_ranges_and_keeps_the_link() {
    let f = Fixture::new();
    let _filler = f.disk.fill_leaving(MIB);
    let ignored = rt().block_on(async {
        let dev = Arc::new(
            CorDevice::open(&f.image(), CorOptions::default())
                .await
                .unwrap(),
        );
        let (job, mut events) = StreamJob::start_watched(dev.clone(), options(OnError::Ignore));
        let outcome = job.wait().await.unwrap();
        let mut reported = Vec::new();
        while let Some(Received::Event(e)) = events.try_recv() {
            if let JobEvent::Error(e) = e {
                assert!(e.nospace && e.action == OnError::Ignore, "{e:?}");
                reported.push((e.offset, e.length));
            }
        }
        assert!(!outcome.unlinked);
        assert_eq!(
            outcome.ignored, reported,
            "one error event per skipped range"
        );
        dev.close().await.unwrap();
        outcome.ignored
    });
    let mut covered = ignored.clone();
    covered.sort_unstable();
    let total: u64 = covered.iter().map(|r| r.1).sum();
    assert_eq!(
        (covered[0].0, total),
        (0, SIZE),
        "every range skipped: {ignored:?}"
    );
    assert!(f.backing().is_some(), "the link stays");
    f.assert_clean_and_expected();
}

// ---------------------------------------------------------------------------------------
// The command line

fn qedstream(dir: &Path, args: &[&str]) -> Output {
    run_with_deadline(
        Command::new(env!("CARGO_BIN_EXE_qedstream"))
            .current_dir(dir)
            .args(args),
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `qedstream stream` on a full disk: report exits 1 with an ENOSPC message saying how to go
/// on, the image clean and linked; stop is refused before anything is opened; ignore exits 1
/// naming the skipped ranges, its last JSON line listing them; after the filler goes, the
/// same command completes.
#[test]
fn offline_stream_on_a_full_disk_says_so_and_a_rerun_completes() {
    let f = Fixture::new();
    let filler = f.disk.fill_leaving(MIB);
    let image = f.image();
    let image = path_str(&image);

    let out = qedstream(f.dir(), &["stream", image]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let msg = stderr(&out);
    assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    for part in [
        "No space left on device",
        "the disk holding the image is full",
        "free space and run the stream again",
    ] {
        assert!(msg.contains(part), "{part:?} missing in: {msg}");
    }
    assert_eq!(
        qemu_check(f.disk.path(), "top.qed"),
        0,
        "clean after the failure"
    );
    assert!(f.backing().is_some());

    let out = qedstream(f.dir(), &["stream", "--on-error", "stop", image]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("no control socket"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("qedstream serve --stream --on-error stop"),
        "{}",
        stderr(&out)
    );

    let out = qedstream(
        f.dir(),
        &["stream", "--on-error", "ignore", "--output=json", image],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let msg = stderr(&out);
    assert!(
        msg.contains("could not be copied and were skipped") && msg.contains("full"),
        "{msg}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&last["event"], &last["unlinked"]),
        (&json!("completed"), &json!(false)),
        "{last}"
    );
    assert!(!last["ignored"].as_array().unwrap().is_empty(), "{last}");
    assert_eq!(qemu_check(f.disk.path(), "top.qed"), 0);
    assert!(f.backing().is_some());

    std::fs::remove_file(filler).unwrap();
    let out = qedstream(f.dir(), &["stream", image]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(f.backing(), None);
    f.assert_clean_and_expected();
}

/// A child killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads events until `JOB_STATUS_CHANGE` to `status`.
fn wait_status(qmp: &mut Qmp, status: &str, events: &mut Vec<Value>) {
    loop {
        let v = qmp.wait_event("JOB_STATUS_CHANGE", events);
        if v["data"]["status"] == status {
            return;
        }
    }
}

/// What a QMP server shows of a stream stopped on a full disk: the `BLOCK_JOB_ERROR` data
/// and the `query-block-jobs` entry once paused.
struct Stopped {
    error: Value,
    job: Value,
}

/// Waits, on `qmp`, for the job to stop on an error and pause; returns what it shows.
fn stopped(qmp: &mut Qmp) -> Stopped {
    let mut events = Vec::new();
    let error = qmp.wait_event("BLOCK_JOB_ERROR", &mut events)["data"].clone();
    wait_status(qmp, "paused", &mut events);
    let jobs = qmp.execute(json!({"execute": "query-block-jobs"}), &mut events);
    let job = jobs["return"][0].clone();
    Stopped { error, job }
}

/// qemu-storage-daemon's block-stream with on-error=stop on the fixture's full disk.
fn qemu_storage_daemon_on_a_full_disk(f: &Fixture) -> Stopped {
    let sock = f.dir().join("qsd.sock");
    let image = f.image();
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.args([
        "--blockdev",
        &format!("driver=file,node-name=f,filename={}", path_str(&image)),
        "--blockdev",
        "driver=qed,node-name=top,file=f",
        "--chardev",
        &format!("socket,id=m,path={},server=on,wait=on", path_str(&sock)),
        "--monitor",
        "chardev=m",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _daemon = Killed(
        qedstream_tests::tools::spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("cannot run qemu-storage-daemon (is it installed?): {e}")),
    );
    let mut qmp = connect_when_there(&sock);
    let r = qmp.execute(json!({"execute": "qmp_capabilities"}), &mut Vec::new());
    assert_eq!(r, json!({"return": {}}));
    let _filler = f.disk.fill_leaving(0);
    let r = qmp.execute(
        json!({"execute": "block-stream", "arguments": {"device": "top", "job-id": "disk", "on-error": "stop"}}),
        &mut Vec::new(),
    );
    assert_eq!(r, json!({"return": {}}), "block-stream");
    let s = stopped(&mut qmp);
    let _ = qmp.execute(json!({"execute": "quit"}), &mut Vec::new());
    s
}

/// Connects to a QMP socket that a starting server is about to create.
fn connect_when_there(sock: &Path) -> Qmp {
    let until = std::time::Instant::now() + DEADLINE;
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < until,
            "no socket {} within 60 s",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Qmp::connect(sock)
}

/// One `qemu-io` command on the NBD export at `uri`, as a guest's I/O; a failed pattern
/// check fails the test.
fn guest_io(dir: &Path, uri: &str, command: &str) {
    let out = ok(dir, "qemu-io", &["-f", "raw", "-c", command, uri]);
    assert!(!out.contains("verification failed"), "{command}: {out}");
}

/// The sorted member names of a JSON object.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

/// `qedstream serve --stream --on-error stop --control SOCK` on a disk that fills up while it
/// streams: BLOCK_JOB_ERROR with action stop and nospace, query-block-jobs paused with
/// io-status nospace (the members qemu-storage-daemon shows in the same case), and the CLI's
/// `job SOCK resume` completes the job once space is freed. The image ends clean and local.
#[test]
fn serve_stops_on_a_full_disk_and_the_cli_resumes_it() {
    let qsd = qemu_storage_daemon_on_a_full_disk(&Fixture::new());
    assert_eq!(qsd.error["action"], "stop", "{}", qsd.error);
    assert_eq!(qsd.job["io-status"], "nospace", "{}", qsd.job);
    assert_eq!(
        (&qsd.job["status"], &qsd.job["paused"]),
        (&json!("paused"), &json!(true))
    );

    let f = Fixture::new();
    let image = f.image();
    // Slow enough that the disk fills up while the stream runs.
    let args = [
        "--control",
        "ctl.sock",
        "--stream",
        "--rate",
        "256K",
        "--on-error",
        "stop",
        "--nbd",
        "unix:nbd.sock",
        path_str(&image),
    ];
    let mut served = Served::start(Path::new(env!("CARGO_BIN_EXE_qedstream")), f.dir(), &args);
    let uri = served.uri();
    let mut qmp = Qmp::negotiated(&f.dir().join("ctl.sock"));
    // A guest write over NBD while there is room: acknowledged, so it must stay.
    guest_io(f.dir(), &uri, &format!("write -P 0xee {MIB} {CS}"));
    f.expect_write(0xee, MIB, CS);
    let filler = f.disk.fill_leaving(0);
    let ours = stopped(&mut qmp);
    // While stopped on the full disk, a guest read over NBD that must copy a cluster in
    // still gets the backing's bytes, and the acknowledged write reads back.
    guest_io(f.dir(), &uri, &format!("read -P 0x33 {} {CS}", 5 * MIB));
    guest_io(f.dir(), &uri, &format!("read -P 0xee {MIB} {CS}"));
    assert_eq!(
        ours.error,
        json!({"device": "disk", "operation": "write", "action": "stop", "nospace": true})
    );
    let job = &ours.job;
    assert_eq!(
        (&job["io-status"], &job["status"]),
        (&json!("nospace"), &json!("paused")),
        "{job}"
    );
    assert_eq!(
        (&job["paused"], &job["busy"]),
        (&json!(true), &json!(false)),
        "{job}"
    );
    // QEMU's members, and ours: BLOCK_JOB_ERROR adds `nospace`; the job entry is the same.
    let mut qemu_error_keys = keys(&qsd.error);
    qemu_error_keys.push("nospace".into());
    qemu_error_keys.sort();
    assert_eq!(keys(&ours.error), qemu_error_keys);
    assert_eq!(keys(job), keys(&qsd.job));
    let line = served.wait_for("error");
    assert_eq!(
        (&line["nospace"], &line["action"]),
        (&json!(true), &json!("stop")),
        "{line}"
    );
    // The CLI shows the same state.
    let out = qedstream(f.dir(), &["job", "ctl.sock", "info", "--output=json"]);
    assert!(out.status.success(), "{out:?}");
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&info["io-status"], &info["paused"]),
        (&json!("nospace"), &json!(true)),
        "{info}"
    );

    std::fs::remove_file(filler).unwrap();
    for args in [["speed", "0"].as_slice(), &["resume"]] {
        let out = qedstream(f.dir(), &[&["job", "ctl.sock"], args].concat());
        assert!(out.status.success(), "job {args:?}: {out:?}");
    }
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", &mut Vec::new());
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], SIZE, "{done}");
    drop(qmp);
    served.signal(libc::SIGTERM);
    assert_eq!(served.wait(), 0);
    assert_eq!(f.backing(), None);
    f.assert_clean_and_expected();
}
