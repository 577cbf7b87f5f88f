//! `qedstream serve` and `qedstream job` end to end: the binary, driven over its QMP control
//! socket by the `job` command, by raw QMP, and by QEMU's own Python QMP client (`qemu.qmp`),
//! against real NBD servers (qemu-nbd, nbdkit with its error filter). Every image is graded by
//! `qemu-img` (check, compare, info).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::qmp::Qmp;
use qedstream_tests::served::Served;
use qedstream_tests::tempdir;
use qedstream_tests::tools::{ok, run_command as run};
use serde_json::{json, Value};

fn qedstream() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qedstream"))
}

/// `qedstream serve --output=json ARGS...` in `dir`, its ready line read.
fn start_served(dir: &Path, args: &[&str]) -> Served {
    Served::start(Path::new(env!("CARGO_BIN_EXE_qedstream")), dir, args)
}

/// `qedstream job SOCKET ARGS...`.
fn job(dir: &Path, sock: &str, args: &[&str]) -> Output {
    run(qedstream().current_dir(dir).arg("job").arg(sock).args(args))
}

/// `qedstream job` that must succeed; its stdout.
fn job_ok(dir: &Path, sock: &str, args: &[&str]) -> String {
    let out = job(dir, sock, args);
    assert!(
        out.status.success(),
        "job {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn job_info(dir: &Path, sock: &str) -> Value {
    serde_json::from_str(&job_ok(dir, sock, &["info", "--output=json"])).expect("info is JSON")
}

/// A 32 MiB raw base (data in the first 4 MiB and at 20 MiB, holes elsewhere) and a QED
/// overlay `top.qed` on `backing`.
fn base(dir: &Path, size: &str) {
    ok(dir, "qemu-img", &["create", "-f", "raw", "base.raw", size]);
    ok(
        dir,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "write -P 0x11 20M 3M",
            "base.raw",
        ],
    );
}

fn overlay(dir: &Path, backing: &str) {
    ok(
        dir,
        "qemu-img",
        &["create", "-f", "qed", "-b", backing, "-F", "raw", "top.qed"],
    );
}

/// The image is closed clean (qemu-img check, NEED_CHECK clear) and reads as the base.
fn assert_clean_and_equal(dir: &Path, base: &str) {
    let check = run(Command::new("qemu-img")
        .current_dir(dir)
        .args(["check", "top.qed"]));
    assert!(
        check.status.success(),
        "check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let features = qedstream_tests::features_on_disk(&dir.join("top.qed"));
    assert_eq!(
        features & 2,
        0,
        "NEED_CHECK still set: features {features:#x}"
    );
    ok(
        dir,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qed", base, "top.qed"],
    );
}

fn backing_of(dir: &Path) -> Option<String> {
    let info: Value = serde_json::from_str(&ok(
        dir,
        "qemu-img",
        &["info", "-U", "--output=json", "top.qed"],
    ))
    .expect("qemu-img info JSON");
    info["backing-filename"].as_str().map(str::to_string)
}

/// Waits until the job's `backing` answer starts with `state` ("offline ", "connected "),
/// for at most `within`.
fn backing_becomes(dir: &Path, state: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let now = job_ok(dir, "ctl.sock", &["backing"]);
        if now.starts_with(state) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "backing not {state:?} after {within:?}: {now}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The paused or slowed stream at full speed and resumed; it completes and drops the link,
/// SIGTERM ends `serve` with 0, and the image is clean and reads as `base.raw`.
fn finish_at_full_speed(dir: &Path, served: &mut Served) {
    job_ok(dir, "ctl.sock", &["speed", "0"]);
    job_ok(dir, "ctl.sock", &["resume"]);
    let done = served.wait_for("completed");
    assert_eq!(done["unlinked"], true, "{done}");
    served.signal(libc::SIGTERM);
    assert_eq!(served.wait(), 0);
    assert_clean_and_equal(dir, "base.raw");
}

/// The job CLI drives a stream over the control socket: info, pause, speed, resume; the
/// stream completes, the link is dropped on disk while the process keeps running, and
/// SIGTERM closes the image clean.
#[test]
fn job_cli_drives_a_served_stream_to_completion() {
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    overlay(d, "base.raw");
    let mut served = start_served(
        d,
        &[
            "--control",
            "ctl.sock",
            "--pid-file",
            "serve.pid",
            "--stream",
            "--rate",
            "1M",
            "top.qed",
        ],
    );
    assert_eq!(served.ready["control"], "ctl.sock");
    assert_eq!(served.ready["node-name"], "disk");
    let pid = std::fs::read_to_string(d.join("serve.pid")).expect("pid file written when ready");
    assert_eq!(pid.trim(), served.pid().to_string());

    let info = job_info(d, "ctl.sock");
    assert_eq!(info["len"], 32 << 20, "{info}");
    assert!(info["offset"].as_u64().is_some(), "{info}");
    assert_eq!(info["speed"], 1 << 20);
    job_ok(d, "ctl.sock", &["pause"]);
    let info = job_info(d, "ctl.sock");
    assert_eq!(
        (info["status"].as_str(), info["paused"].as_bool()),
        (Some("paused"), Some(true))
    );
    job_ok(d, "ctl.sock", &["speed", "0"]);
    assert_eq!(job_info(d, "ctl.sock")["speed"], 0);
    job_ok(d, "ctl.sock", &["resume"]);
    let done = served.wait_for("completed");
    assert_eq!(done["unlinked"], true, "{done}");
    assert_eq!(done["offset"], 32 << 20);

    // The link is gone on disk, and the same process still serves (and answers QMP).
    assert!(served.running());
    assert_eq!(backing_of(d), None);
    assert_eq!(job_ok(d, "ctl.sock", &["step"]).trim(), "done");
    let no_job = job(d, "ctl.sock", &["info"]);
    assert!(!no_job.status.success(), "info with no job must fail");

    served.signal(libc::SIGTERM);
    assert_eq!(served.wait(), 0);
    assert!(!d.join("serve.pid").exists(), "pid file left behind");
    assert!(!d.join("ctl.sock").exists(), "control socket left behind");
    assert_clean_and_equal(d, "base.raw");
}

/// Raw QMP: the greeting, negotiation first, errors with their class and id, bad and
/// oversized input, query-block naming the node, two clients both hearing the job's events,
/// and quit closing the image clean.
#[test]
fn raw_qmp_speaks_qemus_protocol() {
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    overlay(d, "base.raw");
    let mut served = start_served(d, &["--control", "ctl.sock", "--export", "vm", "top.qed"]);
    let sock = d.join("ctl.sock");
    let mut a = Qmp::connect(&sock);
    let mut b = Qmp::connect(&sock);
    assert_eq!(a.greeting["QMP"]["capabilities"], json!([]));
    assert!(a.greeting["QMP"]["version"]["qemu"]["major"].is_u64());
    let mut ev = Vec::new();

    let r = a.execute(json!({"execute": "query-block-jobs", "id": 1}), &mut ev);
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    assert_eq!(r["id"], 1);
    for q in [&mut a, &mut b] {
        let r = q.execute(json!({"execute": "qmp_capabilities"}), &mut ev);
        assert_eq!(r, json!({"return": {}}));
    }
    let r = a.execute(json!({"execute": "no-such-command", "id": "x"}), &mut ev);
    assert_eq!(
        (r["error"]["class"].as_str(), r["id"].as_str()),
        (Some("CommandNotFound"), Some("x"))
    );
    a.send_raw(b"{not json}\n");
    let r = a.reply(&mut ev);
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let r = a.execute(
        json!({"execute": "block-job-set-speed", "arguments": {"device": "nope", "speed": 1}}),
        &mut ev,
    );
    assert!(r["error"]["desc"].as_str().unwrap().contains("nope"), "{r}");

    let r = a.execute(json!({"execute": "query-named-block-nodes"}), &mut ev);
    assert_eq!(r["return"][0]["node-name"], "disk", "{r}");
    let r = a.execute(json!({"execute": "query-block"}), &mut ev);
    assert_eq!(r["return"][0]["device"], "vm");
    assert_eq!(r["return"][0]["inserted"]["node-name"], "disk");
    let r = a.execute(
        json!({"execute": "block-stream", "arguments": {"device": "missing"}}),
        &mut ev,
    );
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    // By export name, with a job id of our own.
    let r = a.execute(json!({"execute": "block-stream", "arguments": {"device": "vm", "job-id": "j1", "speed": 1048576}}), &mut ev);
    assert_eq!(r, json!({"return": {}}));
    let r = a.execute(
        json!({"execute": "block-job-set-speed", "arguments": {"device": "j1", "speed": -1}}),
        &mut ev,
    );
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let r = a.execute(
        json!({"execute": "block-job-set-speed", "arguments": {"device": "j1", "speed": 0}}),
        &mut ev,
    );
    assert_eq!(r, json!({"return": {}}));

    // Both clients hear the end.
    let mut a_events = ev.clone();
    let done = a.wait_event("BLOCK_JOB_COMPLETED", &mut a_events);
    let mut b_events = Vec::new();
    let done_b = b.wait_event("BLOCK_JOB_COMPLETED", &mut b_events);
    for d in [&done, &done_b] {
        assert_eq!(d["data"]["device"], "j1");
        assert_eq!(d["data"]["type"], "stream");
        assert_eq!(d["data"]["len"], d["data"]["offset"]);
        assert!(d["data"].get("error").is_none(), "{d}");
        assert!(d["timestamp"]["seconds"].is_u64() && d["timestamp"]["microseconds"].is_u64());
    }
    assert!(
        b_events
            .iter()
            .any(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == "running"),
        "{b_events:?}"
    );

    // Nesting past the parser's limit is an error, not a crash.
    b.send_raw(&[b'['; 1000]);
    b.send_raw(b"\n");
    let r = b.reply(&mut Vec::new());
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    // An object without an end: an error once it passes the bound, then the connection
    // is closed (EOF, not the read timeout).
    b.send_raw(br#"{"execute": ""#);
    let flood = vec![b'a'; 200 << 10];
    let _ = b.try_send_raw(&flood);
    let r = b.reply(&mut Vec::new());
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("too large"),
        "{r}"
    );
    let mut rest = Vec::new();
    // Closed with our flood unread, the socket may be reset rather than ended: both are a
    // disconnect; only the read timeout (still connected) is not.
    match b.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    let r = a.execute(json!({"execute": "quit", "id": 9}), &mut ev);
    assert_eq!(r, json!({"return": {}, "id": 9}));
    assert_eq!(served.wait(), 0);
    assert_clean_and_equal(d, "base.raw");
}

/// nbdkit serving `file` with read errors injected while `trigger` exists.
fn nbdkit_with_errors(file: &Path, sock: &Path, trigger: &Path) -> NbdServer {
    let mut args: Vec<std::ffi::OsString> = ["-f", "-r", "-e", "exp", "--filter=error", "-U"]
        .map(Into::into)
        .to_vec();
    args.push(sock.into());
    args.push("file".into());
    args.push(file.into());
    args.push("error-pread-rate=100%".into());
    args.push(format!("error-pread-file={}", trigger.display()).into());
    NbdServer::start("nbdkit", args, sock)
}

/// on-error stop: a failing backing pauses the job with io-status failed and an error event;
/// once the backing heals, resume retries the range and the stream completes.
#[test]
fn on_error_stop_pauses_and_resume_retries() {
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    let trigger = d.join("fail-now");
    std::fs::write(&trigger, b"").unwrap();
    let server = nbdkit_with_errors(&d.join("base.raw"), &d.join("nbd.sock"), &trigger);
    overlay(d, &server.uri());
    let mut served = start_served(
        d,
        &[
            "--control",
            "ctl.sock",
            "--stream",
            "--on-error",
            "stop",
            "top.qed",
        ],
    );
    let error = served.wait_for("error");
    assert_eq!(error["action"], "stop", "{error}");
    assert_eq!(error["operation"], "read");
    let info = job_info(d, "ctl.sock");
    assert_eq!(info["io-status"], "failed", "{info}");
    assert_eq!(info["status"], "paused");
    std::fs::remove_file(&trigger).unwrap();
    job_ok(d, "ctl.sock", &["resume"]);
    let done = served.wait_for("completed");
    assert_eq!(done["unlinked"], true, "{done}");
    served.signal(libc::SIGINT);
    assert_eq!(served.wait(), 0);
    drop(server);
    assert_clean_and_equal(d, "base.raw");
}

/// on-error ignore: every failing range is reported and skipped, the job completes with the
/// ranges listed, and the backing link stays (the skipped data still comes from it).
#[test]
fn on_error_ignore_skips_ranges_and_keeps_the_link() {
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    let trigger = d.join("fail-now");
    std::fs::write(&trigger, b"").unwrap();
    let server = nbdkit_with_errors(&d.join("base.raw"), &d.join("nbd.sock"), &trigger);
    overlay(d, &server.uri());
    let mut served = start_served(
        d,
        &[
            "--control",
            "ctl.sock",
            "--stream",
            "--on-error",
            "ignore",
            "top.qed",
        ],
    );
    let mut errors = 0;
    let done = loop {
        let v = served.next_line();
        match v["event"].as_str() {
            Some("error") => {
                assert_eq!(v["action"], "ignore", "{v}");
                errors += 1;
            }
            Some("completed") => break v,
            Some("failed") => panic!("the job failed under on-error ignore: {v}"),
            _ => {}
        }
    };
    let ignored = done["ignored"].as_array().expect("ignored ranges").clone();
    assert!(!ignored.is_empty(), "{done}");
    assert_eq!(ignored.len(), errors, "one error event per skipped range");
    assert_eq!(done["unlinked"], false, "{done}");
    let skipped: u64 = ignored.iter().map(|r| r[1].as_u64().unwrap()).sum();
    assert!(
        skipped >= 7 << 20,
        "the 7 MiB of data were skipped: {skipped}"
    );
    served.signal(libc::SIGTERM);
    assert_eq!(served.wait(), 0);
    assert_eq!(backing_of(d).as_deref(), Some(server.uri().as_str()));
    std::fs::remove_file(&trigger).unwrap();
    assert_clean_and_equal(d, "base.raw");
}

/// "What if qemu-nbd dies": the stream stops on the dead server; a repoint at an export of
/// another size is refused and changes nothing; a repoint at a second qemu-nbd serving a copy,
/// on the paused job, and a resume finish the stream from the new server.
#[test]
fn repoint_at_a_second_qemu_nbd_after_the_first_dies() {
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    std::fs::copy(d.join("base.raw"), d.join("copy.raw")).unwrap();
    ok(d, "qemu-img", &["create", "-f", "raw", "small.raw", "16M"]);
    let mut first = NbdServer::qemu_nbd(&d.join("base.raw"), &d.join("a.sock"));
    overlay(d, &first.uri());
    let mut served = start_served(
        d,
        &[
            "--control",
            "ctl.sock",
            "--stream",
            "--rate",
            "2M",
            "--on-error",
            "stop",
            "--reconnect-delay",
            "1",
            "top.qed",
        ],
    );
    let state = job_ok(d, "ctl.sock", &["backing"]);
    assert_eq!(state.trim(), format!("connected {}", first.uri()));
    first.kill();
    let error = served.wait_for("error");
    assert_eq!(error["action"], "stop", "{error}");

    let small = NbdServer::qemu_nbd(&d.join("small.raw"), &d.join("c.sock"));
    let refused = job(d, "ctl.sock", &["backing", &small.uri()]);
    assert!(
        !refused.status.success(),
        "a repoint at another size must fail"
    );
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(msg.contains("nothing was changed"), "{msg}");
    let state = job_ok(d, "ctl.sock", &["backing"]);
    assert!(state.ends_with(&format!(" {}\n", first.uri())), "{state}");

    let second = NbdServer::qemu_nbd(&d.join("copy.raw"), &d.join("b.sock"));
    job_ok(d, "ctl.sock", &["backing", &second.uri()]);
    assert_eq!(
        job_ok(d, "ctl.sock", &["backing"]).trim(),
        format!("connected {}", second.uri())
    );
    finish_at_full_speed(d, &mut served);
}

/// The source dies mid-stream and stays away past `--reconnect-delay`: the job stops
/// (`--on-error stop`), the backing is `offline`, a guest read of a missing cluster fails with
/// EIO at once (no hang). The same source comes back: the process reconnects in the
/// background (`connected` again, no restart, no repoint), and `resume` completes the stream.
#[test]
fn a_source_back_after_the_window_is_used_again_without_a_restart() {
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    let mut source = NbdServer::qemu_nbd(&d.join("base.raw"), &d.join("a.sock"));
    overlay(d, &source.uri());
    let mut served = start_served(
        d,
        &[
            "--nbd",
            "unix:disk.sock",
            "--control",
            "ctl.sock",
            "--stream",
            "--rate",
            "2M",
            "--on-error",
            "stop",
            "--reconnect-delay",
            "1",
            "top.qed",
        ],
    );
    source.kill();
    let error = served.wait_for("error");
    assert_eq!(error["action"], "stop", "{error}");
    backing_becomes(d, "offline ", Duration::from_secs(10));
    let guest = qedstream_tests::tools::run(
        d,
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read 30M 4k", &served.uri()],
    );
    let said = String::from_utf8_lossy(&guest.stdout).to_string()
        + &String::from_utf8_lossy(&guest.stderr);
    assert!(
        said.contains("Input/output error"),
        "a read of a missing cluster while offline: {said}"
    );

    source.restart();
    backing_becomes(d, "connected ", Duration::from_secs(20));
    finish_at_full_speed(d, &mut served);
}

/// `quit` over QMP while a stream runs: the job is cancelled, the image closed clean and
/// still linked; `--read-only` never writes the file.
#[test]
fn quit_mid_stream_and_read_only_leave_the_image_clean() {
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    overlay(d, "base.raw");
    let mut served = start_served(
        d,
        &[
            "--control",
            "ctl.sock",
            "--stream",
            "--rate",
            "512K",
            "top.qed",
        ],
    );
    let mut qmp = Qmp::connect(&d.join("ctl.sock"));
    let mut ev = Vec::new();
    qmp.execute(json!({"execute": "qmp_capabilities"}), &mut ev);
    let r = qmp.execute(json!({"execute": "quit"}), &mut ev);
    assert_eq!(r, json!({"return": {}}));
    let cancelled = served.wait_for("cancelled");
    assert!(
        cancelled["offset"].as_u64().unwrap() < 32 << 20,
        "{cancelled}"
    );
    assert_eq!(served.wait(), 0);
    assert_eq!(backing_of(d).as_deref(), Some("base.raw"));
    assert_clean_and_equal(d, "base.raw");

    let before = std::fs::read(d.join("top.qed")).unwrap();
    let mut ro = start_served(d, &["--control", "ro.sock", "--read-only", "top.qed"]);
    let r = job(d, "ro.sock", &["step"]);
    assert!(!r.status.success(), "a step on a read-only node must fail");
    ro.signal(libc::SIGTERM);
    assert_eq!(ro.wait(), 0);
    assert_eq!(
        std::fs::read(d.join("top.qed")).unwrap(),
        before,
        "--read-only wrote the file"
    );
}

/// Single-step over QMP, with the extremes of its arguments: a length past the disk is one
/// step over all of it, an offset past the end is `done`; the link stays (a step never drops
/// it) and the data equals the base.
#[test]
fn qmp_step_takes_extreme_arguments() {
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    overlay(d, "base.raw");
    let mut served = start_served(d, &["--control", "ctl.sock", "top.qed"]);
    let mut qmp = Qmp::connect(&d.join("ctl.sock"));
    let mut ev = Vec::new();
    qmp.execute(json!({"execute": "qmp_capabilities"}), &mut ev);
    let step = |qmp: &mut Qmp, offset: u64, length: u64| {
        let args = json!({"offset": offset, "length": length});
        qmp.execute(
            json!({"execute": "x-block-stream-step", "arguments": args}),
            &mut Vec::new(),
        )
    };
    let r = step(&mut qmp, 0, 1 << 20);
    assert_eq!(r["return"]["next"], 1 << 20, "{r}");
    let r = step(&mut qmp, u64::MAX, u64::MAX);
    assert_eq!(r["return"]["done"], true, "{r}");
    let r = step(&mut qmp, 0, u64::MAX);
    assert_eq!(r["return"]["done"], true, "{r}");
    assert_eq!(r["return"]["copied"], 6 << 20, "{r}");
    let r = step(&mut qmp, 0, 0);
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    qmp.execute(json!({"execute": "quit"}), &mut ev);
    assert_eq!(served.wait(), 0);
    assert_eq!(backing_of(d).as_deref(), Some("base.raw"));
    assert_clean_and_equal(d, "base.raw");
}

/// QEMU's own Python QMP client (`qemu.qmp`, CI: `pip install qemu.qmp`) drives the socket:
/// greeting, query-block-jobs, set-speed, pause, resume, cancel, and the events.
#[test]
fn qemu_qmp_python_client_drives_the_job() {
    let probe = run(Command::new("python3").args(["-c", "import qemu.qmp"]));
    assert!(
        probe.status.success(),
        "the Python package qemu.qmp is missing (pip install qemu.qmp): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    overlay(d, "base.raw");
    let mut served = start_served(d, &["--control", "ctl.sock", "top.qed"]);
    let script = r#"
import asyncio, json, sys
from qemu.qmp import QMPClient

async def main(path):
    qmp = QMPClient("qedstream-test")
    await qmp.connect(path)
    assert qmp.greeting.QMP.capabilities == [], qmp.greeting
    assert await qmp.execute("query-block-jobs") == []
    await qmp.execute("block-stream", {"device": "disk", "speed": 262144})
    jobs = await qmp.execute("query-block-jobs")
    assert jobs[0]["device"] == "disk" and jobs[0]["type"] == "stream", jobs
    await qmp.execute("block-job-set-speed", {"device": "disk", "speed": 131072})
    await qmp.execute("block-job-pause", {"device": "disk"})
    jobs = await qmp.execute("query-block-jobs")
    assert jobs[0]["paused"] and jobs[0]["status"] == "paused" and jobs[0]["speed"] == 131072, jobs
    await qmp.execute("block-job-resume", {"device": "disk"})
    await qmp.execute("block-job-pause", {"device": "disk"})
    await qmp.execute("block-job-cancel", {"device": "disk"})
    seen = []
    while True:
        ev = await asyncio.wait_for(qmp.events.get(), 60)
        seen.append(ev["event"] + ":" + str(ev["data"].get("status", "")))
        if ev["event"] == "BLOCK_JOB_CANCELLED":
            assert ev["data"]["device"] == "disk" and ev["data"]["len"] == 32 << 20, ev
            break
    for want in ["JOB_STATUS_CHANGE:running", "JOB_STATUS_CHANGE:paused", "JOB_STATUS_CHANGE:aborting"]:
        assert want in seen, (want, seen)
    await qmp.execute("quit")
    ev = await asyncio.wait_for(qmp.events.get(), 60)
    assert ev["event"] == "SHUTDOWN" and ev["data"]["reason"] == "host-qmp-quit", ev
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # the server is gone after quit, as QEMU is
    print(json.dumps(seen))

asyncio.run(main(sys.argv[1]))
"#;
    let out = run(Command::new("python3")
        .current_dir(d)
        .args(["-c", script, "ctl.sock"]));
    assert!(
        out.status.success(),
        "the qemu.qmp client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(served.wait(), 0);
    assert_eq!(backing_of(d).as_deref(), Some("base.raw"));
    assert_clean_and_equal(d, "base.raw");
}

/// Arguments are checked before anything is opened or bound: NBD addresses that do not parse,
/// an unknown on-error policy, and --stream with --read-only are one-line errors, exit 1, and
/// no socket or pid file appears.
#[test]
fn serve_refuses_bad_arguments_before_opening_anything() {
    let dir = tempdir();
    let d = dir.path();
    base(d, "32M");
    overlay(d, "base.raw");
    let common = ["serve", "--control", "ctl.sock", "--pid-file", "p"];
    for (args, says) in [
        (vec!["--nbd", "tcp:localhost"], "tcp:HOST:PORT"),
        (vec!["--nbd", "tcp:localhost:99999"], "not a port number"),
        (vec!["--nbd", "tcp::10809"], "host is missing"),
        (vec!["--nbd", "unix:"], "needs a socket path"),
        (vec!["--nbd", "vsock:3:10809"], "unix:PATH or tcp:HOST:PORT"),
        (
            vec!["--on-error", "enospc"],
            "not one of report, stop, ignore",
        ),
        (vec!["--stream", "--read-only"], "--read-only"),
        (vec!["--in-flight", "0"], "between 1 and 64"),
        (vec!["--request-size", "4K"], "between 64K and 64M"),
    ] {
        let out = run(qedstream()
            .current_dir(d)
            .args(common)
            .args(&args)
            .arg("top.qed"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            !d.join("ctl.sock").exists() && !d.join("p").exists(),
            "{args:?}"
        );
    }
}
