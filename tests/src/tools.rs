//! Running external tools (QEMU, nbdkit) from tests. A missing tool **fails the test with a
//! clear message** ("is it installed?"): tests never skip silently.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

/// Held while a child process is being started.
static SPAWNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Starts `cmd`, one child at a time in this test process.
///
/// Image locks are open-file-description locks, and a child started by `fork` holds every
/// descriptor of the test process, locks included, until it `exec`s (close-on-exec). A test
/// thread that closes an image and at once runs `qemu-img` on it would otherwise meet a lock
/// still held for an instant by a child another thread is starting, and QEMU does not retry.
/// `Command::spawn` returns only after the child's `exec`, so starting children one at a
/// time closes that window; the children still run in parallel.
pub fn spawn(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let _one_at_a_time = SPAWNING.lock().unwrap_or_else(|p| p.into_inner());
    cmd.spawn()
}

/// Makes the child get SIGKILL when the thread that starts it ends (`PR_SET_PDEATHSIG`): a
/// QEMU or a server whose test was killed must not run on. Start the child on the thread
/// that outlives it (the test's own: the thread that boots a guest waits for it, so this
/// never cuts a boot short).
pub fn die_with_this_thread(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    fn ask_for_sigkill_on_parent_death() -> std::io::Result<()> {
        // SAFETY: prctl(2) with PR_SET_PDEATHSIG takes a signal number and no pointers.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it makes one system call and neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(ask_for_sigkill_on_parent_death);
    }
}

/// `cmd.output()`, with the child started through [`spawn`].
pub fn output(cmd: &mut Command) -> std::io::Result<Output> {
    use std::process::Stdio;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd)?.wait_with_output()
}

/// Runs `cmd` and returns its output; a missing tool fails the test loudly.
pub fn run_command(cmd: &mut Command) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    output(cmd).unwrap_or_else(|e| {
        panic!("cannot run {program} (is it installed? .ci/run installs it): {e}")
    })
}

/// Runs `cmd` with no input; one that has not ended after 60 s is a hang and fails the test
/// (it is killed first). A missing tool fails the test loudly.
pub fn run_with_deadline(cmd: &mut Command) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let limit = std::time::Duration::from_secs(60);
    match output_within(cmd, limit) {
        Ok(Some(out)) => out,
        Ok(None) => panic!("{cmd:?} hung (still running after 60 s)"),
        Err(e) => panic!("cannot run {program} (is it installed?): {e}"),
    }
}

/// Runs `cmd` with no input and its output collected, started through [`spawn`]; a child
/// still running after `limit` is killed and `Ok(None)` returned. The output is read only
/// once the child has ended: for children that write little (send a console to a file).
pub fn output_within(
    cmd: &mut Command,
    limit: std::time::Duration,
) -> std::io::Result<Option<Output>> {
    use std::process::Stdio;
    let mut child = spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    if wait_within(&mut child, limit)?.is_none() {
        return Ok(None);
    }
    child.wait_with_output().map(Some)
}

/// Waits for `child` to end, at most `limit`: its status, or `Ok(None)` after killing it
/// (SIGKILL) when it was still running. A caller treats `None` as a hang, a failure.
pub fn wait_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` and asserts success; returns stdout.
pub fn ok_command(cmd: &mut Command) -> String {
    let out = run_command(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `program args...`, to be run in `dir`. The engine's tests build their `qedstream`
/// commands with it (`command_in(env!("CARGO_BIN_EXE_qedstream"), dir, args)`: the binary's
/// path is known only where the test is compiled).
pub fn command_in(program: impl AsRef<OsStr>, dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.current_dir(dir).args(args);
    c
}

/// Runs `cmd` and asserts a refusal as the command line reports one: a non-zero exit and
/// exactly one line on stderr. Returns stderr.
#[track_caller]
pub fn refused(cmd: &mut Command) -> String {
    let out = run_command(cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "{cmd:?}: {err}");
    err
}

/// Runs `program` with `args` in `dir`; a missing tool fails the test loudly.
pub fn run(dir: &Path, program: &str, args: &[&str]) -> Output {
    run_command(&mut command_in(program, dir, args))
}

/// Runs `program` with `args` in `dir` and asserts success; returns stdout.
pub fn ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = run(dir, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -f FORMAT -c CMD... IMAGE` in `dir`, asserting success.
pub fn qemu_io(dir: &Path, format: &str, image: &str, cmds: &[&str]) {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    ok(dir, "qemu-io", &args);
}

/// The exit code of `qemu-img check IMAGE` in `dir` (-1 when killed by a signal).
pub fn qemu_check(dir: &Path, image: &str) -> i32 {
    run(dir, "qemu-img", &["check", image])
        .status
        .code()
        .unwrap_or(-1)
}

/// The flattened contents of an image chain, as `qemu-img convert -O raw` makes them.
pub fn flatten(dir: &Path, image: &str, format: &str) -> Vec<u8> {
    let out = format!("{image}.flat.raw");
    ok(
        dir,
        "qemu-img",
        &["convert", "-f", format, "-O", "raw", image, &out],
    );
    std::fs::read(dir.join(&out)).unwrap()
}

/// Recipe A of qed-format.md, in `dir`: a raw base `base.raw` (8 MiB: data, holes, a partial
/// tail block) and a QED overlay `top.qed` (12 MiB) with its own data, a partial write and a
/// zero cluster.
pub fn raw_fixture(dir: &Path) {
    raw_overlay_fixture(
        dir,
        "8M",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 2M 1M",
            "write -P 0x33 3M 100k",
            "write -P 0x44 7M 1M",
        ],
        "12M",
    );
}

/// In `dir`: a raw base `base.raw` of `base_size` with `base_writes` (qemu-io commands), and
/// a QED overlay `top.qed` of `top_size` on it with recipe A's own writes: data at 512k, a
/// partial write at 100k and a zero cluster at 2M.
pub fn raw_overlay_fixture(dir: &Path, base_size: &str, base_writes: &[&str], top_size: &str) {
    ok(
        dir,
        "qemu-img",
        &["create", "-f", "raw", "base.raw", base_size],
    );
    qemu_io(dir, "raw", "base.raw", base_writes);
    create_overlay(dir, "base.raw", "raw", "top.qed", Some(top_size));
    qemu_io(
        dir,
        "qed",
        "top.qed",
        &[
            "write -P 0xaa 512k 64k",
            "write -P 0xcd 100k 4k",
            "write -z 2M 64k",
        ],
    );
}

/// `qemu-img create -f qed -b BACKING -F BACKING_FORMAT IMAGE [SIZE]` in `dir`.
pub fn create_overlay(
    dir: &Path,
    backing: &str,
    backing_format: &str,
    image: &str,
    size: Option<&str>,
) {
    let mut args = vec![
        "create",
        "-f",
        "qed",
        "-b",
        backing,
        "-F",
        backing_format,
        image,
    ];
    args.extend(size);
    ok(dir, "qemu-img", &args);
}

/// A QED chain three deep in `dir`: `base.raw` (6 MiB, `base_writes`) <- `b1.qed` (8 MiB,
/// `b1_writes`) <- `b2.qed` (8 MiB, data at 1.5M and 7M) <- `top.qed` (8 MiB, data at 100k).
pub fn chain_fixture(dir: &Path, base_writes: &[&str], b1_writes: &[&str]) {
    ok(dir, "qemu-img", &["create", "-f", "raw", "base.raw", "6M"]);
    qemu_io(dir, "raw", "base.raw", base_writes);
    create_overlay(dir, "base.raw", "raw", "b1.qed", Some("8M"));
    qemu_io(dir, "qed", "b1.qed", b1_writes);
    create_overlay(dir, "b1.qed", "qed", "b2.qed", Some("8M"));
    qemu_io(
        dir,
        "qed",
        "b2.qed",
        &["write -P 0x03 1536k 1M", "write -P 0x04 7M 4k"],
    );
    create_overlay(dir, "b2.qed", "qed", "top.qed", Some("8M"));
    qemu_io(dir, "qed", "top.qed", &["write -P 0x05 100k 10k"]);
}
