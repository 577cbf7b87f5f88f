//! Image locks against the real QEMU tools: QEMU refuses an image `qedstream` holds, and
//! `qedstream` refuses one that QEMU (qemu-io, qemu-storage-daemon) or another `qedstream`
//! holds, with one line that says it is locked; `-U` inspects an image in use; a backing in use
//! takes readers but no writer or resizer. Each holder's locks are seen in `/proc/locks` before
//! the other side tries.

use qedstream_tests::tools::command_in;
use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qedstream_tests::tempdir;
use qedstream_tests::tools::{ok, qemu_io, run_with_deadline as run};

/// A process that holds an image; killed (SIGINT first, so ours close cleanly) on drop.
struct Holder {
    child: Child,
    what: String,
}

impl Holder {
    fn spawn(cmd: &mut Command, what: &str) -> Holder {
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what} (is it installed?): {e}"));
        Holder {
            child,
            what: what.to_string(),
        }
    }

    /// Waits until the file at `path` carries at least the lock bytes `bytes`; fails the test
    /// when the holder exits first or the locks never appear.
    fn wait_for_locks(&mut self, path: &Path, bytes: &[i64]) {
        let want: BTreeSet<i64> = bytes.iter().copied().collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if lock_bytes(path).is_superset(&want) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).unwrap();
                }
                panic!("{} exited ({status}) before locking: {err}", self.what);
            }
            assert!(
                Instant::now() < deadline,
                "{} never took locks {want:?} on {} (has {:?})",
                self.what,
                path.display(),
                lock_bytes(path)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the holder: SIGINT (a stream cancels cleanly), then SIGKILL if it lingers.
    fn stop(self) -> std::process::ExitStatus {
        // SAFETY: kill() sends a signal to the child we spawned and still own (not yet reaped).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        self.finish()
    }

    /// Closes the holder's input and waits for it to end (SIGKILL after 20 s).
    fn finish(mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bytes some process holds OFD locks on, for the file at `path` (from `/proc/locks`).
fn lock_bytes(path: &Path) -> BTreeSet<i64> {
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let mut out = BTreeSet::new();
    for line in locks.lines() {
        // "1: OFDLCK ADVISORY READ -1 fd:01:1234 100 100"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[1] != "OFDLCK" {
            continue;
        }
        let Some(i) = f[5].rsplit(':').next() else {
            continue;
        };
        if i.parse::<u64>().ok() != Some(ino) {
            continue;
        }
        let (Ok(start), Ok(end)) = (f[6].parse::<i64>(), f[7].parse::<i64>()) else {
            continue;
        };
        out.extend(start..=end);
    }
    out
}

fn ours(dir: &Path, args: &[&str]) -> Command {
    command_in(env!("CARGO_BIN_EXE_qedstream"), dir, args)
}

fn tool(dir: &Path, program: &str, args: &[&str]) -> Command {
    command_in(program, dir, args)
}

/// Asserts that `cmd` was refused because the image is locked: a non-zero exit and one line on
/// stderr that says so.
fn assert_refused_locked(cmd: &mut Command) {
    let out = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{cmd:?} should be refused (image locked) but succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains("locked"),
        "{cmd:?}: refused, but not for a lock: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{cmd:?}: not one line: {err}"
    );
}

/// Asserts that QEMU's tool `cmd` was refused for a lock ("Failed to get ... lock").
fn assert_qemu_refused(cmd: &mut Command) {
    let out = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{cmd:?} should be refused by QEMU's locks but succeeded"
    );
    assert!(
        err.contains("Failed to get") && err.contains("lock"),
        "{cmd:?}: refused, but not for a lock: {err}"
    );
}

fn assert_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const RW: &[i64] = &[100, 101, 103, 201, 203];
const READER: &[i64] = &[100, 201, 203];

/// A QED base with 8 MiB of data and a QED overlay on it (nothing local yet).
fn chain(d: &Path) {
    ok(d, "qemu-img", &["create", "-f", "qed", "base.qed", "16M"]);
    qemu_io(d, "qed", "base.qed", &["write -P 0x5a 0 8M"]);
    ok(
        d,
        "qemu-img",
        &[
            "create", "-f", "qed", "-b", "base.qed", "-F", "qed", "top.qed",
        ],
    );
}

/// A stream of `top.qed` slow enough to hold its locks for the whole test.
fn slow_stream(d: &Path) -> Holder {
    let mut h = Holder::spawn(
        &mut ours(d, &["stream", "--rate", "64K", "--output=json", "top.qed"]),
        "qedstream stream",
    );
    h.wait_for_locks(&d.join("top.qed"), RW);
    h.wait_for_locks(&d.join("base.qed"), READER);
    h
}

fn digest(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn qemu_and_a_second_qedstream_are_refused_while_we_stream() {
    let dir = tempdir();
    let d = dir.path();
    chain(d);
    std::fs::write(d.join("data"), [7u8; 4096]).unwrap();
    let stream = slow_stream(d);

    // QEMU refuses the image we hold for writing...
    assert_qemu_refused(&mut tool(d, "qemu-io", &["-c", "write 0 4k", "top.qed"]));
    assert_qemu_refused(&mut tool(d, "qemu-img", &["resize", "top.qed", "+1M"]));
    assert_qemu_refused(&mut tool(d, "qemu-img", &["info", "top.qed"]));
    assert_qemu_refused(&mut tool(d, "qemu-img", &["check", "top.qed"]));
    assert_qemu_refused(&mut tool(
        d,
        "qemu-img",
        &["create", "-f", "qed", "top.qed", "1M"],
    ));
    // ... but inspects it with -U.
    assert_ok(&mut tool(d, "qemu-img", &["info", "-U", "top.qed"]));

    // A second qedstream is refused by every command that writes or reads consistently.
    let before = digest(&d.join("base.qed"));
    for args in [
        &["stream", "top.qed"][..],
        &["stream", "--step", "top.qed"],
        &["write", "top.qed", "0", "data"],
        &["write", "--zero", "4k", "top.qed", "0"],
        &["resize", "top.qed", "+1M"],
        &["rebase", "-u", "-b", "", "top.qed"],
        &["check", "-r", "all", "top.qed"],
        &["check", "top.qed"],
        &["info", "top.qed"],
        &["map", "top.qed"],
        &["read", "top.qed", "0", "4k"],
        &["convert", "top.qed", "out.raw"],
        &["create", "top.qed", "1M"],
        &["convert", "-O", "qed", "base.qed", "top.qed"],
    ] {
        assert_refused_locked(&mut ours(d, args));
    }
    // -U inspects the image in use.
    for args in [
        &["info", "-U", "top.qed"][..],
        &["info", "-U", "--backing-chain", "top.qed"],
        &["map", "-U", "top.qed"],
        &["check", "-U", "top.qed"],
        &["read", "-U", "top.qed", "0", "4k"],
        &["convert", "-U", "top.qed", "copy.raw"],
    ] {
        assert_ok(&mut ours(d, args));
    }

    // The backing in use takes readers, but no writer or resizer.
    assert_qemu_refused(&mut tool(d, "qemu-io", &["-c", "write 0 4k", "base.qed"]));
    assert_qemu_refused(&mut tool(d, "qemu-img", &["resize", "base.qed", "+1M"]));
    assert_ok(&mut tool(d, "qemu-img", &["info", "base.qed"]));
    assert_ok(&mut tool(
        d,
        "qemu-io",
        &["-r", "-c", "read 0 4k", "base.qed"],
    ));
    assert_refused_locked(&mut ours(d, &["write", "base.qed", "0", "data"]));
    assert_refused_locked(&mut ours(d, &["resize", "base.qed", "+1M"]));
    assert_ok(&mut ours(d, &["info", "base.qed"]));
    assert_ok(&mut ours(d, &["read", "base.qed", "0", "4k"]));
    assert_eq!(digest(&d.join("base.qed")), before, "the backing changed");

    let status = stream.stop();
    assert!(!status.success(), "a cancelled stream exits non-zero");
    // The image we held is intact, and free again.
    assert_ok(&mut tool(d, "qemu-img", &["check", "top.qed"]));
    assert_ok(&mut tool(
        d,
        "qemu-img",
        &["compare", "top.qed", "base.qed"],
    ));
}

#[test]
fn we_refuse_an_image_qemu_io_holds() {
    let dir = tempdir();
    let d = dir.path();
    chain(d);
    std::fs::write(d.join("data"), [7u8; 4096]).unwrap();
    let top = d.join("top.qed");
    let mut qemu = Holder::spawn(
        &mut tool(d, "qemu-io", &["-f", "qed", "top.qed"]),
        "qemu-io",
    );
    qemu.wait_for_locks(&top, RW);
    let before = digest(&top);
    for args in [
        &["stream", "top.qed"][..],
        &["stream", "--step", "top.qed"],
        &["write", "top.qed", "0", "data"],
        &["resize", "top.qed", "+1M"],
        &["rebase", "-u", "-b", "", "top.qed"],
        &["check", "-r", "leaks", "top.qed"],
        &["check", "top.qed"],
        &["info", "top.qed"],
        &["map", "top.qed"],
        &["read", "top.qed", "0", "4k"],
        &["create", "top.qed", "1M"],
        &["convert", "-O", "qed", "base.qed", "top.qed"],
        &["convert", "-O", "raw", "base.qed", "top.qed"],
    ] {
        assert_refused_locked(&mut ours(d, args));
    }
    assert_eq!(digest(&top), before, "a refused command changed the image");
    for args in [
        &["info", "-U", "top.qed"][..],
        &["map", "-U", "--output=json", "top.qed"],
        &["check", "-U", "top.qed"],
        &["read", "-U", "top.qed", "0", "4k"],
    ] {
        assert_ok(&mut ours(d, args));
    }
    // QEMU's holder still writes, and what it wrote is there afterwards.
    let mut stdin = qemu.child.stdin.take().unwrap();
    writeln!(stdin, "write -P 0x77 1M 64k").unwrap();
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    let status = qemu.finish();
    assert!(status.success(), "qemu-io failed: {status}");
    assert_ok(&mut tool(d, "qemu-img", &["check", "top.qed"]));
    assert_ok(&mut tool(
        d,
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0x77 1M 64k",
            "-c",
            "read -P 0x5a 0 1M",
            "top.qed",
        ],
    ));
}

#[test]
fn we_refuse_an_image_qemu_storage_daemon_exports() {
    let dir = tempdir();
    let d = dir.path();
    chain(d);
    let sock: PathBuf = d.join("qsd.sock");
    let mut qsd = Holder::spawn(
        &mut tool(
            d,
            "qemu-storage-daemon",
            &[
                "--blockdev",
                "driver=file,node-name=file,filename=top.qed",
                "--blockdev",
                "driver=qed,node-name=fmt,file=file",
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", sock.display()),
                "--export",
                "type=nbd,id=exp,node-name=fmt,name=top,writable=on",
            ],
        ),
        "qemu-storage-daemon",
    );
    qsd.wait_for_locks(&d.join("top.qed"), RW);
    assert_refused_locked(&mut ours(d, &["stream", "top.qed"]));
    assert_refused_locked(&mut ours(d, &["resize", "top.qed", "+1M"]));
    assert_refused_locked(&mut ours(d, &["info", "top.qed"]));
    assert_ok(&mut ours(d, &["info", "-U", "top.qed"]));
    // The daemon holds the backing as a reader: we may read it, not write it.
    qsd.wait_for_locks(&d.join("base.qed"), &[100]);
    assert_ok(&mut ours(d, &["read", "base.qed", "0", "4k"]));
    drop(qsd);
    assert_ok(&mut tool(d, "qemu-img", &["check", "top.qed"]));
}

#[test]
fn qemu_refuses_an_image_we_write() {
    let dir = tempdir();
    let d = dir.path();
    ok(d, "qemu-img", &["create", "-f", "qed", "w.qed", "8M"]);
    // `write` from a pipe holds the image until its input ends.
    let mut writer = Holder::spawn(&mut ours(d, &["write", "w.qed", "0"]), "qedstream write");
    writer.wait_for_locks(&d.join("w.qed"), RW);
    assert_qemu_refused(&mut tool(d, "qemu-io", &["-c", "write 0 4k", "w.qed"]));
    assert_qemu_refused(&mut tool(d, "qemu-img", &["info", "w.qed"]));
    assert_qemu_refused(&mut tool(
        d,
        "qemu-nbd",
        &[
            "--fork",
            "-k",
            &d.join("n.sock").display().to_string(),
            "w.qed",
        ],
    ));
    assert_ok(&mut tool(d, "qemu-img", &["info", "-U", "w.qed"]));
    let mut stdin = writer.child.stdin.take().unwrap();
    stdin.write_all(&[0x42; 8192]).unwrap();
    drop(stdin);
    let status = writer.finish();
    assert!(status.success(), "qedstream write failed: {status}");
    assert!(
        lock_bytes(&d.join("w.qed")).is_empty(),
        "locks outlive the command"
    );
    assert_ok(&mut tool(
        d,
        "qemu-io",
        &["-c", "read -P 0x42 0 8k", "w.qed"],
    ));
}

#[test]
fn readers_share_and_exclude_writers() {
    let dir = tempdir();
    let d = dir.path();
    chain(d);
    // qemu-io read-only holds top.qed as a reader (100, 201, 203).
    let mut reader = Holder::spawn(
        &mut tool(d, "qemu-io", &["-r", "-f", "qed", "top.qed"]),
        "qemu-io -r",
    );
    reader.wait_for_locks(&d.join("top.qed"), READER);
    assert_ok(&mut ours(d, &["info", "top.qed"]));
    assert_ok(&mut ours(d, &["read", "top.qed", "0", "4k"]));
    assert_ok(&mut ours(d, &["map", "top.qed"]));
    assert_refused_locked(&mut ours(d, &["stream", "top.qed"]));
    assert_refused_locked(&mut ours(d, &["resize", "top.qed", "+1M"]));
    assert_refused_locked(&mut ours(d, &["check", "-r", "all", "top.qed"]));
    drop(reader);
    // Free again: the stream runs, and QEMU agrees with the result.
    assert_ok(&mut ours(d, &["stream", "top.qed"]));
    assert_ok(&mut tool(d, "qemu-img", &["check", "top.qed"]));
}
