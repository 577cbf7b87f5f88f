//! A central image store, end to end through the `qedstream` binary and real servers: a raw
//! base (data, holes, data at an unaligned offset) served over HTTP with byte ranges by a
//! Python server on 127.0.0.1, exported over NBD by `nbdkit curl` with its `cache` and
//! `retry-request` filters (the README's recipe), and four QED overlays on that export
//! streaming from it at once (four `qedstream stream` processes). Each ends standalone, equal
//! to the base (`qemu-img compare`) and clean (`qemu-img check`).
//!
//! Then the failure case: nbdkit is killed (SIGKILL) mid-stream and started again on the same
//! socket after a pause; every stream completes, with the same checks. "Mid-stream" is proven,
//! not hoped for: the store sends at most 4 MiB/s; when nbdkit is killed the store had sent
//! fewer bytes than the base holds (and nbdkit's cache holds only what the store sent), so no
//! stream could have read the whole base; each stream's last progress line is short of its end;
//! and each is still running after the outage (one that had everything would have finished
//! without the store).
//!
//! Last, the web server itself goes down: nbdkit's `retry-request` gives up and fails reads
//! with EIO, each stream stops at once with one line saying that the image is intact and how
//! to finish, and a rerun with the store back completes; a store that is down when an overlay
//! is created is named as clearly.
//!
//! Every wait has a deadline whose passing fails the test. A missing `python3`, nbdkit, or
//! nbdkit's curl plugin or filters fail the test with a message naming them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qedstream_tests::image_store::{curl_export, export_uri, HttpStore};
use qedstream_tests::tools::{command_in, ok, ok_command, qemu_check, refused, run, wait_within};
use qedstream_tests::{tempdir, XorShift};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The base's size: 40 MiB, of which about 27 MiB are data.
const BASE_SIZE: u64 = 40 * MIB;
/// Overlays streaming at once.
const STREAMS: usize = 4;
/// The slow store's rate: the whole base takes 10 s to send once.
const SLOW_RATE: u64 = 4 * MIB;
/// How long nbdkit stays dead (within the streams' default 30 s `--reconnect-delay`).
const OUTAGE: Duration = Duration::from_secs(3);
/// A hang guard: a stream still running after this fails the test.
const STREAM_DEADLINE: Duration = Duration::from_secs(180);

fn qedstream(dir: &Path, args: &[&str]) -> Command {
    command_in(env!("CARGO_BIN_EXE_qedstream"), dir, args)
}

/// Writes the base: 40 MiB, sparse where there is no data. Data (seeded random bytes) in
/// every MiB but those with `m % 5 == 3` and 10..14, plus 100,000 bytes at 12 MiB + 5,000
/// (inside the long hole, at no cluster boundary).
fn write_base(path: &Path) {
    let file = std::fs::File::create(path).expect("creating the base");
    file.set_len(BASE_SIZE).expect("sizing the base");
    let mut rng = XorShift::new(13);
    let mut chunk = vec![0u8; MIB as usize];
    use std::os::unix::fs::FileExt;
    for m in (0..BASE_SIZE / MIB).filter(|m| m % 5 != 3 && !(10..14).contains(m)) {
        rng.fill(&mut chunk);
        file.write_all_at(&chunk, m * MIB)
            .expect("writing the base");
    }
    rng.fill(&mut chunk[..100_000]);
    file.write_all_at(&chunk[..100_000], 12 * MIB + 5_000)
        .expect("writing the base");
}

/// The store's directory (`store/base.raw`) and the base's path.
fn make_store(dir: &Path) -> (PathBuf, PathBuf) {
    let store = dir.join("store");
    std::fs::create_dir(&store).expect("creating the store's directory");
    let base = store.join("base.raw");
    write_base(&base);
    (store, base)
}

/// `qedstream create -b URI -F raw vmN.qed` for N in 1..=`count`; their names.
fn create_overlays(dir: &Path, uri: &str, count: usize) -> Vec<String> {
    (1..=count)
        .map(|n| {
            let image = format!("vm{n}.qed");
            ok_command(&mut qedstream(
                dir,
                &["create", "-b", uri, "-F", "raw", &image],
            ));
            image
        })
        .collect()
}

/// A running `qedstream stream --output=json IMAGE`: its JSON lines collected by a thread,
/// stderr in a file; killed on drop if still running.
struct RunningStream {
    image: String,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<JoinHandle<()>>,
    stderr: PathBuf,
}

impl RunningStream {
    fn start(dir: &Path, image: &str) -> RunningStream {
        let stderr = dir.join(format!("{image}.stderr"));
        let mut cmd = qedstream(dir, &["stream", "--output=json", image]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("a stderr file"));
        let mut child = qedstream_tests::tools::spawn(&mut cmd).expect("starting qedstream");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let line = line.expect("reading the stream's stdout");
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
                sink.lock().unwrap().push(v);
            }
        });
        RunningStream {
            image: image.to_string(),
            child: Some(child),
            lines,
            reader: Some(reader),
            stderr,
        }
    }

    /// The last line printed so far.
    fn last(&self) -> Option<Value> {
        self.lines.lock().unwrap().last().cloned()
    }

    /// True once a progress line counts bytes stored (copied, or read as zeros).
    fn has_stored(&self) -> bool {
        self.last().is_some_and(|v| {
            v["copied"].as_u64().unwrap_or(0) + v["skipped"].as_u64().unwrap_or(0) > 0
        })
    }

    /// True while the process runs.
    fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("not yet waited for");
        child.try_wait().expect("polling the stream").is_none()
    }

    /// Waits for the end (a stream still running after [`STREAM_DEADLINE`] fails the test):
    /// its status, every line, and stderr.
    fn finish(mut self) -> (ExitStatus, Vec<Value>, String) {
        let mut child = self.child.take().expect("not yet waited for");
        let status = wait_within(&mut child, STREAM_DEADLINE)
            .expect("waiting for the stream")
            .unwrap_or_else(|| {
                panic!(
                    "the stream of {} hung (still running after {STREAM_DEADLINE:?}); last line {:?}",
                    self.image,
                    self.last()
                )
            });
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the stream's stdout reader panicked");
        }
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        (status, lines, stderr)
    }

    /// Waits for the end and asserts a completed stream that dropped its backing link.
    fn assert_completes(self) -> Value {
        let image = self.image.clone();
        let (status, lines, stderr) = self.finish();
        let last = lines.last().cloned().unwrap_or(Value::Null);
        assert!(
            status.success(),
            "the stream of {image} failed ({status}): {stderr}\nlast line: {last}"
        );
        assert_eq!(last["event"], "completed", "{image}: {last}");
        assert_eq!(last["unlinked"], true, "{image}: {last}");
        last
    }
}

impl Drop for RunningStream {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// With the NBD export gone: `image` names no backing (`qemu-img info`), equals `base`
/// (`qemu-img compare`), and `qemu-img check` finds nothing wrong.
fn assert_standalone_copy(dir: &Path, image: &str, base: &Path) {
    let info: Value =
        serde_json::from_str(&ok(dir, "qemu-img", &["info", "--output=json", image])).unwrap();
    assert!(
        info.get("backing-filename").is_none(),
        "{image} still has a backing: {info}"
    );
    let base = base.to_str().expect("a UTF-8 path");
    let out = run(
        dir,
        "qemu-img",
        &["compare", "-f", "qed", "-F", "raw", image, base],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare {image} {base}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(qemu_check(dir, image), 0, "qemu-img check {image}");
}

/// Polls until `done` holds for every stream; a wait past 60 s fails the test.
fn wait_until_all(streams: &[RunningStream], what: &str, done: impl Fn(&RunningStream) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !streams.iter().all(&done) {
        if Instant::now() > deadline {
            let last: Vec<_> = streams.iter().map(RunningStream::last).collect();
            panic!("not every stream {what} within 60 s; last lines: {last:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn four_overlays_stream_from_one_http_store_at_once() {
    let d = tempdir();
    let dir = d.path();
    let (store_dir, base) = make_store(dir);
    let store = HttpStore::start(&store_dir, None);
    let sock = dir.join("store.sock");
    let export = curl_export(&store.url("base.raw"), &sock);
    let images = create_overlays(dir, &export_uri(&sock), STREAMS);
    let streams: Vec<_> = images
        .iter()
        .map(|i| RunningStream::start(dir, i))
        .collect();
    let ends: Vec<Value> = streams
        .into_iter()
        .map(RunningStream::assert_completes)
        .collect();
    drop(export);
    for image in &images {
        assert_standalone_copy(dir, image, &base);
    }
    // nbdkit's cache served the four streams from one fetch of each block (and curl asks
    // for one byte past each range).
    let sent = store.bytes_sent();
    eprintln!(
        "four streams of a {} MiB base: the store sent {sent} bytes in {} GETs; copied per stream {:?}",
        BASE_SIZE / MIB,
        store.gets(),
        ends.iter().map(|e| e["copied"].clone()).collect::<Vec<_>>()
    );
    assert!(
        sent < 2 * BASE_SIZE,
        "the store sent {sent} bytes for four streams of {BASE_SIZE}: the cache was not shared"
    );
}

#[test]
fn nbdkit_killed_mid_stream_and_restarted_every_stream_completes() {
    let d = tempdir();
    let dir = d.path();
    let (store_dir, base) = make_store(dir);
    let store = HttpStore::start(&store_dir, Some(SLOW_RATE));
    let sock = dir.join("store.sock");
    let mut export = curl_export(&store.url("base.raw"), &sock);
    let images = create_overlays(dir, &export_uri(&sock), STREAMS);
    let mut streams: Vec<_> = images
        .iter()
        .map(|i| RunningStream::start(dir, i))
        .collect();
    wait_until_all(&streams, "stored data", RunningStream::has_stored);

    export.kill();
    let at_kill: Vec<Value> = streams.iter().map(|s| s.last().unwrap()).collect();
    for (image, line) in images.iter().zip(&at_kill) {
        assert_eq!(line["event"], "progress", "{image} at the kill: {line}");
        assert!(
            line["offset"].as_u64() < line["total"].as_u64(),
            "{image} was at its end at the kill: {line}"
        );
    }
    std::thread::sleep(OUTAGE);
    // Every byte a stream read came through the killed nbdkit from the store. Counted now,
    // with no nbdkit for the whole outage, the log holds every transfer to it (whole, or cut
    // short by the kill): fewer bytes than the base holds, so no stream could be complete.
    let sent_at_kill = store.bytes_sent();
    assert!(
        sent_at_kill < BASE_SIZE,
        "the store had sent {sent_at_kill} bytes (the whole base) when nbdkit was killed"
    );
    for s in &mut streams {
        assert!(
            s.is_running(),
            "the stream of {} ended while nbdkit was dead: {:?}",
            s.image,
            s.last()
        );
    }
    let gets_before_restart = store.gets();
    export.restart();

    let ends: Vec<Value> = streams
        .into_iter()
        .map(RunningStream::assert_completes)
        .collect();
    let gets_after_restart = store.gets() - gets_before_restart;
    assert!(
        gets_after_restart > 0,
        "the restarted nbdkit fetched nothing from the store"
    );
    drop(export);
    for image in &images {
        assert_standalone_copy(dir, image, &base);
    }
    eprintln!(
        "nbdkit killed with {sent_at_kill} of {BASE_SIZE} bytes sent by the store; progress at the kill (offset, copied+skipped): {:?}; {gets_after_restart} GETs after the restart; elapsed per stream {:?}",
        at_kill
            .iter()
            .map(|l| (l["offset"].clone(), l["copied"].as_u64().unwrap_or(0) + l["skipped"].as_u64().unwrap_or(0)))
            .collect::<Vec<_>>(),
        ends.iter().map(|e| e["elapsed"].clone()).collect::<Vec<_>>()
    );
}

/// nbdkit up, the store behind it gone: nbdkit answers the handshake's GO with `ERR_UNKNOWN`
/// and no message. `qedstream create` fails with one line that says the export is not
/// available and where to look (it used to end in `ERR_UNKNOWN: ""`).
#[test]
fn a_store_that_is_down_is_reported_clearly() {
    let d = tempdir();
    let dir = d.path();
    let (store_dir, _) = make_store(dir);
    let store = HttpStore::start(&store_dir, None);
    let url = store.url("base.raw");
    drop(store);
    let sock = dir.join("store.sock");
    let _export = curl_export(&url, &sock);
    let err = refused(&mut qedstream(
        dir,
        &["create", "-b", &export_uri(&sock), "-F", "raw", "vm.qed"],
    ));
    assert!(
        err.contains("ERR_UNKNOWN (the export is not available")
            && err.contains("the server's log says which"),
        "{err}"
    );
    assert!(!dir.join("vm.qed").exists(), "create left an image behind");
}

/// The web server behind nbdkit goes down mid-stream for longer than nbdkit's `retry-request`
/// rides out (2 retries, 2 s apart): nbdkit fails the reads with EIO, and each stream stops
/// with one line saying that the image is intact and linked and to run the stream again (it
/// used to end in a bare `EIO ()`). With the store back, a second `qedstream stream` of each
/// resumes from what is local and completes, with the same checks as above.
#[test]
fn a_store_down_past_nbdkit_retries_stops_each_stream_cleanly_and_a_rerun_completes() {
    let d = tempdir();
    let dir = d.path();
    let (store_dir, base) = make_store(dir);
    let mut store = HttpStore::start(&store_dir, Some(SLOW_RATE));
    let sock = dir.join("store.sock");
    let export = curl_export(&store.url("base.raw"), &sock);
    let images = create_overlays(dir, &export_uri(&sock), STREAMS);
    let streams: Vec<_> = images
        .iter()
        .map(|i| RunningStream::start(dir, i))
        .collect();
    wait_until_all(&streams, "stored data", RunningStream::has_stored);

    store.kill();
    let t = Instant::now();
    for s in streams {
        let image = s.image.clone();
        let (status, lines, stderr) = s.finish();
        eprintln!("{image} ended {:?} after the store went down", t.elapsed());
        assert!(!status.success(), "{image} completed without its store");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{image}: {stderr}");
        assert!(
            stderr.contains("EIO")
                && stderr.contains(
                    "the image is intact and still linked to its backing: run the stream again"
                ),
            "{image}: {stderr}"
        );
        let last = lines.last().cloned().unwrap_or(Value::Null);
        assert_eq!(last["event"], "failed", "{image}: {last}");
    }

    store.restart(None);
    let t = Instant::now();
    for image in &images {
        let out = ok_command(&mut qedstream(dir, &["stream", "--output=json", image]));
        let last: Value = serde_json::from_str(out.lines().last().unwrap_or("null")).unwrap();
        assert!(
            last["local"].as_u64().unwrap_or(0) > 0,
            "the rerun of {image} did not resume from what was local: {last}"
        );
    }
    eprintln!("the reruns took {:?}", t.elapsed());
    drop(export);
    for image in &images {
        assert_standalone_copy(dir, image, &base);
    }
}
