//! `qedstream stream` graded by QEMU: after a stream the image equals `qemu-img convert` of the
//! original chain, `qemu-img check` is clean, `qemu-img info` shows no backing, and the result
//! equals what qemu-storage-daemon's block-stream makes of the same image. Also: step mode,
//! JSON progress, SIGINT, SIGKILL and resume, and NBD backings (qemu-nbd, nbdkit) that die.
//!
//! Every test that needs a QEMU tool or nbdkit fails loudly when it is missing.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::tempdir;
use qedstream_tests::tools::{create_overlay, ok, qemu_check as check_code, run};
use serde_json::Value;

fn qedstream() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qedstream"))
}

fn ours(dir: &Path, args: &[&str]) -> Output {
    qedstream()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run qedstream")
}

fn ours_ok(dir: &Path, args: &[&str]) -> String {
    let out = ours(dir, args);
    assert!(
        out.status.success(),
        "qedstream {args:?} failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn info(dir: &Path, image: &str) -> Value {
    serde_json::from_str(&ok(
        dir,
        "qemu-img",
        &["info", "-U", "--output=json", image],
    ))
    .unwrap()
}

fn compare(dir: &Path, a: &str, fa: &str, b: &str, fb: &str) {
    let out = run(dir, "qemu-img", &["compare", "-f", fa, "-F", fb, a, b]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare {a} {b}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stream's end state, as QEMU sees it: content equal to `expect` (raw), check clean, no
/// backing in info, and the header as block-stream leaves it (features 0, name 64/0).
fn assert_streamed(dir: &Path, image: &str, expect: &str) {
    compare(dir, image, "qed", expect, "raw");
    assert_eq!(check_code(dir, image), 0, "qemu-img check {image}");
    let i = info(dir, image);
    assert!(
        i.get("backing-filename").is_none(),
        "still has a backing: {i}"
    );
    let head = std::fs::read(dir.join(image)).unwrap();
    assert_eq!(&head[16..24], &[0u8; 8], "features");
    assert_eq!(
        &head[56..64],
        &[64, 0, 0, 0, 0, 0, 0, 0],
        "backing name offset/size"
    );
}

/// Recipe A (see [`qedstream_tests::tools::raw_fixture`]) and expect.raw = qemu-img convert
/// of the chain.
fn raw_fixture(dir: &Path) {
    qedstream_tests::tools::raw_fixture(dir);
    convert_expect(dir);
}

/// expect.raw = qemu-img convert of top.qed's chain.
fn convert_expect(dir: &Path) {
    ok(
        dir,
        "qemu-img",
        &["convert", "-f", "qed", "-O", "raw", "top.qed", "expect.raw"],
    );
}

/// A chain three deep: base.raw <- b1.qed <- b2.qed <- top.qed, and expect.raw.
fn chain_fixture(dir: &Path) {
    qedstream_tests::tools::chain_fixture(
        dir,
        &["write -P 0x01 0 2M", "write -P 0x06 5M 1M"],
        &["write -P 0x02 1M 1M", "write -z 5M 128k"],
    );
    convert_expect(dir);
}

#[test]
fn stream_over_a_raw_backing_equals_qemu_convert() {
    let d = tempdir();
    let dir = d.path();
    raw_fixture(dir);
    let out = ours_ok(dir, &["stream", "top.qed"]);
    assert!(out.contains("backing link dropped"), "{out}");
    assert_streamed(dir, "top.qed", "expect.raw");
    // Holes of the backing and the range past its end were not stored as data.
    let map: Value =
        serde_json::from_str(&ok(dir, "qemu-img", &["map", "--output=json", "top.qed"])).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        data <= 4 << 20,
        "{data} bytes of data for 3.1 MiB of backing data + 68 KiB local"
    );
}

#[test]
fn stream_over_a_qed_chain_three_deep_equals_qemu_convert() {
    let d = tempdir();
    let dir = d.path();
    chain_fixture(dir);
    ours_ok(dir, &["stream", "top.qed"]);
    assert_streamed(dir, "top.qed", "expect.raw");
}

#[test]
fn step_mode_reaches_the_same_result_and_a_full_stream_then_just_unlinks() {
    let d = tempdir();
    let dir = d.path();
    raw_fixture(dir);
    let mut offset = "0".to_string();
    let mut steps = 0;
    loop {
        let out = ours_ok(
            dir,
            &[
                "stream", "--step", "--offset", &offset, "--length", "512K", "top.qed",
            ],
        );
        let line = out.trim();
        steps += 1;
        assert!(steps < 100, "step mode does not converge");
        if line == "done" {
            break;
        }
        let next: u64 = line
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line:?}"));
        assert!(next > offset.parse::<u64>().unwrap(), "no progress: {next}");
        offset = next.to_string();
    }
    assert!(
        steps >= 4,
        "only {steps} steps for 3 MiB of data in 512K units"
    );
    // Steps never unlink; the content is already complete.
    assert!(info(dir, "top.qed").get("backing-filename").is_some());
    compare(dir, "top.qed", "qed", "expect.raw", "raw");
    let out = ours_ok(dir, &["stream", "--output=json", "top.qed"]);
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "completed");
    assert_eq!(
        last["copied"], 0,
        "the full stream after the last step copied data: {last}"
    );
    assert_streamed(dir, "top.qed", "expect.raw");
    // A step on a complete image says done at once.
    assert_eq!(
        ours_ok(dir, &["stream", "--step", "top.qed"]).trim(),
        "done"
    );
}

#[test]
fn json_progress_lines_and_keep_backing() {
    let d = tempdir();
    let dir = d.path();
    raw_fixture(dir);
    let out = ours_ok(
        dir,
        &[
            "stream",
            "--output=json",
            "--keep-backing",
            "--rate",
            "4M",
            "top.qed",
        ],
    );
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2, "{out}");
    for l in &lines {
        assert!(l["offset"].is_u64() && l["total"] == 12 << 20, "{l}");
    }
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "completed");
    assert_eq!(last["offset"], 12 << 20);
    assert_eq!(last["unlinked"], false);
    // The rate limit held: 3.1 MiB at 4 MiB/s takes most of a second.
    assert!(last["elapsed"].as_f64().unwrap() > 0.4, "{last}");
    compare(dir, "top.qed", "qed", "expect.raw", "raw");
    assert!(info(dir, "top.qed").get("backing-filename").is_some());
    assert_eq!(check_code(dir, "top.qed"), 0);
}

/// A base of `mib` MiB full of data, and an empty overlay `top.qed` on it.
fn big_fixture(dir: &Path, mib: u64) {
    let base = dir.join("base.raw");
    let mut f = std::fs::File::create(&base).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for m in 0..mib {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((m * 131 + i as u64 / 4096 * 7) % 251) as u8 + 1;
        }
        f.write_all(&buf).unwrap();
    }
    drop(f);
    create_overlay(dir, "base.raw", "raw", "top.qed", None);
}

fn spawn_ours(dir: &Path, args: &[&str]) -> Child {
    qedstream()
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qedstream")
}

/// Waits until the JSON progress of `child` reports `copied >= bytes`.
fn wait_copied(child: &mut Child, bytes: u64) {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["copied"].as_u64().unwrap_or(0) >= bytes {
            // Keep draining in the background so the child never blocks on stdout.
            std::thread::spawn(move || for _ in lines {});
            return;
        }
    }
    panic!("the stream did not copy {bytes} bytes in time");
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the PID of a child we spawned and have not yet waited for.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0);
}

/// Spawns `qedstream stream --output=json --rate 8M EXTRA... top.qed` in `dir` and waits until
/// it has copied `copied` bytes.
fn stream_under_way(dir: &Path, extra: &[&str], copied: u64) -> Child {
    let mut args = vec!["stream", "--output=json", "--rate", "8M"];
    args.extend_from_slice(extra);
    args.push("top.qed");
    let mut child = spawn_ours(dir, &args);
    wait_copied(&mut child, copied);
    child
}

/// SIGINT to a running stream: it must exit, unsuccessfully, within 3 s. Returns its stderr.
fn cancel_promptly(child: Child) -> String {
    let t = Instant::now();
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "cancel took {:?}",
        t.elapsed()
    );
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sigint_cancels_cleanly_and_a_rerun_completes() {
    let d = tempdir();
    let dir = d.path();
    big_fixture(dir, 24);
    let err = cancel_promptly(stream_under_way(dir, &[], 2 << 20));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(check_code(dir, "top.qed"), 0);
    assert!(
        info(dir, "top.qed").get("backing-filename").is_some(),
        "cancel dropped the link"
    );
    compare(dir, "top.qed", "qed", "base.raw", "raw");
    ours_ok(dir, &["stream", "top.qed"]);
    assert_streamed(dir, "top.qed", "base.raw");
}

#[test]
fn sigkill_mid_stream_then_resume_gives_the_same_content() {
    let d = tempdir();
    let dir = d.path();
    big_fixture(dir, 24);
    let mut child = stream_under_way(dir, &[], 4 << 20);
    signal(&child, libc::SIGKILL);
    let _ = child.wait();
    // No corruption (leaks are allowed after a crash: QED never frees them).
    let code = check_code(dir, "top.qed");
    assert!(code == 0 || code == 3, "check after SIGKILL: {code}");
    compare(dir, "top.qed", "qed", "base.raw", "raw");
    let out = ours_ok(dir, &["stream", "--output=json", "top.qed"]);
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(
        last["local"].as_u64().unwrap() >= 4 << 20,
        "the rerun did not resume: {last}"
    );
    compare(dir, "top.qed", "qed", "base.raw", "raw");
    let code = check_code(dir, "top.qed");
    assert!(code == 0 || code == 3, "check after resume: {code}");
    assert!(info(dir, "top.qed").get("backing-filename").is_none());
}

// ---------------------------------------------------------------------------------------------
// qemu-storage-daemon's block-stream as the oracle (recipe F)

#[test]
fn stream_equals_qemu_storage_daemon_block_stream() {
    let d = tempdir();
    let dir = d.path();
    raw_fixture(dir);
    std::fs::copy(dir.join("top.qed"), dir.join("qsd.qed")).unwrap();
    qedstream_tests::qsd::block_stream(dir, "qsd.qed");
    assert_eq!(check_code(dir, "qsd.qed"), 0);
    ours_ok(dir, &["stream", "top.qed"]);
    assert_streamed(dir, "top.qed", "expect.raw");
    compare(dir, "top.qed", "qed", "qsd.qed", "qed");
    // Same header bytes as QEMU's result.
    let ours_head = std::fs::read(dir.join("top.qed")).unwrap();
    let theirs = std::fs::read(dir.join("qsd.qed")).unwrap();
    assert_eq!(ours_head[..64], theirs[..64]);
}

#[test]
fn stream_throughput_against_qemu_storage_daemon() {
    let d = tempdir();
    let dir = d.path();
    big_fixture(dir, 64);
    std::fs::copy(dir.join("top.qed"), dir.join("qsd.qed")).unwrap();
    let theirs = qedstream_tests::qsd::block_stream(dir, "qsd.qed");
    let t = Instant::now();
    ours_ok(dir, &["stream", "top.qed"]);
    let mine = t.elapsed();
    compare(dir, "top.qed", "qed", "qsd.qed", "qed");
    assert_eq!(check_code(dir, "top.qed"), 0);
    let mib = 64.0;
    eprintln!(
        "stream 64 MiB: qedstream {:.3} s ({:.0} MiB/s), qemu-storage-daemon block-stream {:.3} s ({:.0} MiB/s), ratio {:.2}",
        mine.as_secs_f64(),
        mib / mine.as_secs_f64(),
        theirs.as_secs_f64(),
        mib / theirs.as_secs_f64(),
        theirs.as_secs_f64() / mine.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// NBD backings

fn nbd_stream(kind: &str) {
    let d = tempdir();
    let dir = d.path();
    raw_fixture(dir);
    let server = NbdServer::serve_file(kind, &dir.join("base.raw"), &dir.join("nbd.sock"));
    ok(
        dir,
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qed",
            "-b",
            &server.uri(),
            "-F",
            "raw",
            "top.qed",
        ],
    );
    compare(dir, "top.qed", "qed", "expect.raw", "raw");
    ours_ok(dir, &["stream", "top.qed"]);
    drop(server);
    assert_streamed(dir, "top.qed", "expect.raw");
}

#[test]
fn stream_over_qemu_nbd_equals_qemu_convert() {
    nbd_stream("qemu-nbd");
}

#[test]
fn stream_over_nbdkit_equals_qemu_convert() {
    nbd_stream("nbdkit");
}

/// A 24 MiB base served by `kind`, top.qed rebased onto the export, and a stream of it (with
/// `extra` arguments) under way.
fn nbd_stream_under_way(dir: &Path, kind: &str, extra: &[&str]) -> (NbdServer, Child) {
    big_fixture(dir, 24);
    let server = NbdServer::serve_file(kind, &dir.join("base.raw"), &dir.join("nbd.sock"));
    ours_ok(
        dir,
        &["rebase", "-u", "-b", &server.uri(), "-F", "raw", "top.qed"],
    );
    let child = stream_under_way(dir, extra, 2 << 20);
    (server, child)
}

#[test]
fn nbd_server_killed_for_two_seconds_the_stream_completes() {
    let d = tempdir();
    let dir = d.path();
    let (mut server, child) = nbd_stream_under_way(dir, "qemu-nbd", &[]);
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    server.restart();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
    assert_streamed(dir, "top.qed", "base.raw");
}

#[test]
fn nbd_server_gone_for_good_fails_clearly_then_completes_when_back() {
    let d = tempdir();
    let dir = d.path();
    let (mut server, child) = nbd_stream_under_way(dir, "nbdkit", &["--reconnect-delay", "2"]);
    server.kill();
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?} to give up",
        t.elapsed()
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("backing is unavailable"), "{err}");
    server.restart();
    assert_eq!(check_code(dir, "top.qed"), 0);
    compare(dir, "top.qed", "qed", "base.raw", "raw");
    ours_ok(dir, &["stream", "top.qed"]);
    drop(server);
    assert_streamed(dir, "top.qed", "base.raw");
}

#[test]
fn cancel_is_prompt_when_the_nbd_backing_is_dead() {
    let d = tempdir();
    let dir = d.path();
    let (mut server, child) = nbd_stream_under_way(dir, "qemu-nbd", &[]);
    server.kill();
    std::thread::sleep(Duration::from_millis(500));
    assert!(cancel_promptly(child).contains("cancelled"));
    // Still linked to the (dead) server; point it at the same data locally to let QEMU check.
    assert!(info_unopened(dir, "top.qed").contains("nbd+unix"));
    ok(
        dir,
        "qemu-img",
        &[
            "rebase", "-u", "-f", "qed", "-b", "base.raw", "-F", "raw", "top.qed",
        ],
    );
    assert_eq!(check_code(dir, "top.qed"), 0);
    compare(dir, "top.qed", "qed", "base.raw", "raw");
}

/// The backing name in the header, read without opening the backing.
fn info_unopened(dir: &Path, image: &str) -> String {
    let head = std::fs::read(dir.join(image)).unwrap();
    let off = u32::from_le_bytes(head[56..60].try_into().unwrap()) as usize;
    let len = u32::from_le_bytes(head[60..64].try_into().unwrap()) as usize;
    String::from_utf8_lossy(&head[off..off + len]).into_owned()
}

#[test]
fn demo_builds_serves_streams_and_checks() {
    let d = tempdir();
    let dir = d.path().join("demo");
    let out = ours_ok(
        d.path(),
        &["demo", "--dir", dir.to_str().unwrap(), "--size", "8M"],
    );
    assert!(out.contains("serving it over NBD with qemu-nbd"), "{out}");
    assert!(
        out.contains("content equals the base, check clean, backing link dropped"),
        "{out}"
    );
    assert_eq!(check_code(&dir, "vm.qed"), 0);
    compare(&dir, "vm.qed", "qed", "base.raw", "raw");
}
