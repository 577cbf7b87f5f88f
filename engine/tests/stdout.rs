//! Every command that prints survives a stdout it cannot write to: a full device (`/dev/full`,
//! ENOSPC) or a pipe whose reader is gone (EPIPE). It never panics (exit 101) and never claims
//! success (exit 0); on ENOSPC it says so in exactly one line on stderr. A stream that cannot
//! report stops with the image valid and its data intact.

use qedstream_tests::tools::command_in;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};

use qedstream_tests::tempdir;

/// Held while a process is started. Between fork and exec a child holds a copy of every fd of
/// ours, so a "closed" pipe would have a reader in a child another test thread is starting;
/// spawning returns only after exec, which closes those copies (they are close-on-exec).
static SPAWN: Mutex<()> = Mutex::new(());

fn spawn_lock() -> MutexGuard<'static, ()> {
    SPAWN.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn_locked(cmd: &mut Command) -> Child {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"))
}

/// Runs `cmd` to the end, capturing what it did not get told to send elsewhere.
fn run(cmd: &mut Command) -> Output {
    let child = {
        let _spawning = spawn_lock();
        spawn_locked(cmd.stdin(Stdio::null()))
    };
    child.wait_with_output().expect("waiting for a child")
}

/// Runs `cmd` and asserts success; returns stdout.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ours(dir: &Path, args: &[&str]) -> Command {
    command_in(env!("CARGO_BIN_EXE_qedstream"), dir, args)
}

/// Where stdout goes.
#[derive(Clone, Copy, Debug)]
enum Sink {
    /// `/dev/full`: every write fails with ENOSPC.
    Full,
    /// A pipe whose read end is already closed: every write fails with EPIPE.
    ClosedPipe,
}

/// The write end of a pipe nobody reads any more: `true`'s stdin, after `true` has exited
/// (it never reads it, and std closes the parent's copy of the read end at spawn). Call with
/// the spawn lock held.
fn closed_pipe() -> Stdio {
    let mut reader = spawn_locked(Command::new("true").stdin(Stdio::piped()));
    let write_end = reader.stdin.take().expect("piped stdin");
    let status = reader.wait().expect("waiting for `true`");
    assert!(status.success(), "`true` failed: {status}");
    Stdio::from(write_end)
}

fn run_into(mut cmd: Command, sink: Sink) -> Output {
    let child = {
        let _spawning = spawn_lock();
        let stdout = match sink {
            Sink::Full => Stdio::from(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .expect("opening /dev/full"),
            ),
            Sink::ClosedPipe => closed_pipe(),
        };
        spawn_locked(
            cmd.stdin(Stdio::null())
                .stdout(stdout)
                .stderr(Stdio::piped()),
        )
    };
    child.wait_with_output().expect("waiting for a child")
}

/// Asserts how a command ended when its stdout failed.
fn assert_failed_cleanly(what: &str, sink: Sink, out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked"),
        "{what} > {sink:?}: panicked: {err}"
    );
    match out.status.code() {
        Some(0) => panic!("{what} > {sink:?}: exit 0 although stdout failed; stderr: {err}"),
        Some(101) => panic!("{what} > {sink:?}: exit 101; stderr: {err}"),
        Some(_) => {}
        None => panic!("{what} > {sink:?}: killed by a signal: {}", out.status),
    }
    match sink {
        Sink::Full => {
            assert_eq!(
                err.lines().count(),
                1,
                "{what} > /dev/full: not one line on stderr: {err:?}"
            );
            assert_eq!(
                err.trim_end(),
                "qedstream: writing to stdout: No space left on device",
                "{what} > /dev/full"
            );
        }
        Sink::ClosedPipe => {
            // A reader that went away (`| head`) ends the command quietly, but not with 0.
            assert_eq!(err, "", "{what} | closed pipe: stderr is not empty");
        }
    }
}

const BASE: u64 = 8 << 20;

fn base_bytes() -> Vec<u8> {
    (0..BASE)
        .map(|i| {
            // Data in every other 512 KiB, holes between: many extents.
            if (i >> 19) % 2 == 0 {
                (i / 4096 % 251) as u8 + 1
            } else {
                0
            }
        })
        .collect()
}

/// `base.raw` (data and holes) and a fresh QED overlay `name` on it with a few local clusters.
fn overlay(d: &Path, name: &str) {
    if !d.join("base.raw").exists() {
        std::fs::write(d.join("base.raw"), base_bytes()).unwrap();
    }
    ok(&mut ours(
        d,
        &["create", "-b", "base.raw", "-F", "raw", name],
    ));
    std::fs::write(d.join("data"), vec![0x5a; 200 << 10]).unwrap();
    ok(&mut ours(d, &["write", name, "3M", "data"]));
}

#[test]
fn inspecting_commands_fail_cleanly_on_a_full_or_closed_stdout() {
    let dir = tempdir();
    let d = dir.path();
    overlay(d, "top.qed");
    let cases: &[&[&str]] = &[
        &["info", "top.qed"],
        &["info", "--output=json", "top.qed"],
        &["check", "top.qed"],
        &["check", "--output=json", "top.qed"],
        &["map", "top.qed"],
        &["map", "--output=json", "top.qed"],
        &["read", "top.qed", "0", "8M"],
        &["read", "top.qed", "1M", "1"],
        &["--help"],
        &["--version"],
        &["map", "--help"],
    ];
    for args in cases {
        for sink in [Sink::Full, Sink::ClosedPipe] {
            let out = run_into(ours(d, args), sink);
            assert_failed_cleanly(&args.join(" "), sink, &out);
        }
    }
    // Nothing was harmed: the image checks clean and reads as before.
    ok(&mut ours(d, &["check", "top.qed"]));
}

#[test]
fn stream_fails_cleanly_on_a_full_or_closed_stdout_and_keeps_the_data() {
    let dir = tempdir();
    let d = dir.path();
    let mut expected = base_bytes();
    expected[3 << 20..(3 << 20) + (200 << 10)].fill(0x5a);
    let cases: &[&[&str]] = &[
        &["stream", "--step"],
        &["stream", "--step", "--offset", "1M", "--length", "2M"],
        &["stream", "--output=json"],
        &["stream", "--output=json", "--rate", "4M"],
        &["stream"],
    ];
    for (i, args) in cases.iter().enumerate() {
        for sink in [Sink::Full, Sink::ClosedPipe] {
            let name = format!("s{i}-{sink:?}.qed");
            overlay(d, &name);
            let mut all = args.to_vec();
            all.push(&name);
            let out = run_into(ours(d, &all), sink);
            assert_failed_cleanly(&all.join(" "), sink, &out);
            // The image is consistent and holds the same virtual disk, linked or not.
            ok(&mut ours(d, &["check", &name]));
            let mut read = ours(d, &["read", &name, "0", "8M"]);
            let data = run(read.stdout(Stdio::piped()));
            assert!(data.status.success(), "read {name} after {args:?}");
            assert!(
                data.stdout == expected,
                "{name}: the disk changed after {args:?} > {sink:?}"
            );
        }
    }
}

#[test]
fn demo_fails_cleanly_on_a_full_or_closed_stdout() {
    let dir = tempdir();
    for sink in [Sink::Full, Sink::ClosedPipe] {
        let demo_dir = dir.path().join(format!("demo-{sink:?}"));
        let out = run_into(
            ours(
                dir.path(),
                &["demo", "--size", "4M", "--dir", demo_dir.to_str().unwrap()],
            ),
            sink,
        );
        assert_failed_cleanly("demo", sink, &out);
    }
}
