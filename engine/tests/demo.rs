//! `qedstream demo` is safe to run as root next to hostile users: it never writes through a file
//! or symlink planted in its folder, its default folder is fresh and private, and no `qemu-nbd`
//! outlives it, however it dies.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qedstream_tests::tempdir;
use qedstream_tests::tools::run_command as run;

fn demo(tmpdir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qedstream"));
    c.arg("demo").args(args).env("TMPDIR", tmpdir);
    c
}

/// Panics unless qemu-nbd runs: the demo only serves over NBD when it is installed.
fn require_qemu_nbd() {
    let ok = Command::new("qemu-nbd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "these tests need qemu-nbd (Debian's qemu-utils) on PATH; they fail rather than skip"
    );
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const VICTIM: &[u8] = b"precious data that must survive\n";

/// A file outside the demo's folder that an attacker wants overwritten.
fn victim(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, VICTIM).unwrap();
    path
}

#[test]
fn demo_never_writes_through_a_planted_symlink_or_file() {
    let outside = tempdir();
    let scratch = tempdir();
    for planted in ["base.raw", "vm.qed"] {
        // A dangling symlink too: creating through it would create the target.
        for dangling in [false, true] {
            let attack = tempdir();
            let d = attack.path().join("demo");
            std::fs::create_dir(&d).unwrap();
            let target = if dangling {
                outside.path().join(format!("created-{planted}"))
            } else {
                victim(outside.path(), &format!("victim-{planted}"))
            };
            symlink(&target, d.join(planted)).unwrap();
            let out = run(&mut demo(
                scratch.path(),
                &["--size", "4M", "--dir", d.to_str().unwrap()],
            ));
            let err = stderr_of(&out);
            assert!(
                !out.status.success(),
                "demo succeeded with {planted} planted"
            );
            assert_eq!(err.lines().count(), 1, "{planted}: stderr: {err}");
            assert!(
                err.contains(planted) && err.contains("exists"),
                "{planted}: the error does not say what is in the way: {err}"
            );
            if dangling {
                assert!(
                    std::fs::symlink_metadata(&target).is_err(),
                    "{planted}: the demo created the symlink's target {}",
                    target.display()
                );
            } else {
                assert_eq!(
                    std::fs::read(&target).unwrap(),
                    VICTIM,
                    "{planted}: the victim was overwritten through the symlink"
                );
            }
            // Nothing was written through the planted name either way.
            assert!(std::fs::symlink_metadata(d.join(planted))
                .unwrap()
                .file_type()
                .is_symlink());
        }
    }
    // A plain file left in the folder (a previous run's) is refused, not truncated.
    let d = scratch.path().join("again");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("base.raw"), VICTIM).unwrap();
    let out = run(&mut demo(
        scratch.path(),
        &["--size", "4M", "--dir", d.to_str().unwrap()],
    ));
    assert!(!out.status.success());
    assert_eq!(std::fs::read(d.join("base.raw")).unwrap(), VICTIM);
    // The folder itself may not be a symlink (to a folder someone else controls).
    let elsewhere = tempdir();
    let link = scratch.path().join("link");
    symlink(elsewhere.path(), &link).unwrap();
    let out = run(&mut demo(
        scratch.path(),
        &["--size", "4M", "--dir", link.to_str().unwrap()],
    ));
    assert!(!out.status.success(), "demo ran in a symlinked --dir");
    assert_eq!(stderr_of(&out).lines().count(), 1, "{}", stderr_of(&out));
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}

#[test]
fn demo_dir_is_created_fresh_and_private_when_missing() {
    require_qemu_nbd();
    let scratch = tempdir();
    let d = scratch.path().join("new/demo");
    let out = run(&mut demo(
        scratch.path(),
        &["--size", "4M", "--dir", d.to_str().unwrap()],
    ));
    assert!(out.status.success(), "demo failed: {}", stderr_of(&out));
    let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode,
        0o700,
        "--dir {} was created with mode {mode:o}",
        d.display()
    );
    assert!(d.join("base.raw").is_file() && d.join("vm.qed").is_file());
    // The NBD socket was not in the --dir (whoever can write there could swap it).
    assert!(!d.join("nbd.sock").exists());
    // Running again in the same folder is refused: its files are there.
    let out = run(&mut demo(
        scratch.path(),
        &["--size", "4M", "--dir", d.to_str().unwrap()],
    ));
    assert!(
        !out.status.success(),
        "a second demo reused {}",
        d.display()
    );
    assert_eq!(stderr_of(&out).lines().count(), 1, "{}", stderr_of(&out));
}

/// The folder a demo reported it built its base in (`[1] built DIR/base.raw (...)`).
fn demo_dir_of(stdout: &[u8]) -> PathBuf {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("[1] built "))
        .unwrap_or_else(|| panic!("no `[1] built` line in {text}"));
    let path = line["[1] built ".len()..]
        .split(" (")
        .next()
        .unwrap()
        .to_string();
    Path::new(&path).parent().unwrap().to_path_buf()
}

#[test]
fn default_demo_dir_is_fresh_unpredictable_and_private() {
    require_qemu_nbd();
    let scratch = tempdir();
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let child = demo(scratch.path(), &["--size", "4M"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "demo failed: {}", stderr_of(&out));
        let d = demo_dir_of(&out.stdout);
        assert_eq!(d.parent(), Some(scratch.path()), "not under TMPDIR");
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("qedstream-demo-"), "{name}");
        assert_ne!(
            name,
            format!("qedstream-demo-{pid}"),
            "the folder is named after the pid: predictable"
        );
        let meta = std::fs::symlink_metadata(&d).unwrap();
        assert!(meta.is_dir());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o700,
            "{} is not private",
            d.display()
        );
        dirs.push(d);
    }
    assert_ne!(dirs[0], dirs[1], "two runs used the same folder");
}

/// Pids of live qemu-nbd processes whose command line mentions `needle`.
fn qemu_nbds_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // Empty for zombies (and gone for processes that just ended).
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("qemu-nbd"))
            && args.iter().any(|a| a.contains(needle))
        {
            pids.push(pid);
        }
    }
    pids
}

fn send(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -s {signal} {pid} failed");
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a demo whose files go under `scratch` and waits until its qemu-nbd serves.
fn demo_with_server(scratch: &Path) -> (Child, u32) {
    let mut child = demo(scratch, &["--size", "256M"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let needle = scratch.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(&server) = qemu_nbds_mentioning(needle).first() {
            return (child, server);
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the demo ended ({status}) before its qemu-nbd was seen");
        }
        assert!(Instant::now() < deadline, "no qemu-nbd within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Asserts no qemu-nbd of this demo is left (waiting a little for the kernel to deliver);
/// kills any orphan found so a failing test leaves nothing behind.
fn assert_no_orphan(scratch: &Path, what: &str) {
    let needle = scratch.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = qemu_nbds_mentioning(needle);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for pid in &left {
                send("KILL", *pid);
            }
            panic!("{what}: qemu-nbd {left:?} outlived the demo");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn no_qemu_nbd_outlives_a_demo_stopped_by_a_signal() {
    require_qemu_nbd();
    for signal in ["TERM", "HUP", "INT"] {
        let scratch = tempdir();
        let (mut child, _server) = demo_with_server(scratch.path());
        // Hold the demo still so the signal lands while the server runs, whatever the speed.
        send("STOP", child.id());
        send(signal, child.id());
        send("CONT", child.id());
        let status = wait_timeout(&mut child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the demo did not end on SIG{signal}"));
        let out = child.wait_with_output().unwrap();
        let err = stderr_of(&out);
        assert_no_orphan(scratch.path(), &format!("SIG{signal}"));
        assert!(
            status.code().is_some_and(|c| c != 0),
            "SIG{signal}: the demo did not exit with an error code: {status}"
        );
        assert_eq!(
            err.lines().count(),
            1,
            "SIG{signal}: not one line on stderr: {err:?}"
        );
        assert!(
            err.contains(&format!("SIG{signal}")) && err.contains("qemu-nbd stopped"),
            "SIG{signal}: {err}"
        );
    }
}

#[test]
fn no_qemu_nbd_outlives_a_killed_demo() {
    require_qemu_nbd();
    let scratch = tempdir();
    let (mut child, _server) = demo_with_server(scratch.path());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_no_orphan(scratch.path(), "SIGKILL");
}

/// `demo --vm`: a guest boots on the overlay `qedstream serve` streams, and its checksum of
/// its disk is the base's; the overlay ends standalone, clean and equal to the base.
#[test]
fn demo_vm_boots_a_guest_on_the_streaming_overlay() {
    require_qemu_nbd();
    let kit = qedstream_tests::guest::GuestKit::get();
    let scratch = tempdir();
    let d = scratch.path().join("demo");
    let out = run(demo(
        scratch.path(),
        &["--vm", "--size", "32M", "--dir", d.to_str().unwrap()],
    )
    .env("QEDSTREAM_GUEST_KIT", kit.dir()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo --vm failed: {}\n{stdout}",
        stderr_of(&out)
    );
    let base = qedstream_tests::guest::host_sha256(&d.join("base.raw"));
    assert!(stdout.contains(&format!("guest sha256 {base}")), "{stdout}");
    assert!(
        stdout.contains(&format!("base  sha256 {base} (equal)")),
        "{stdout}"
    );
    assert!(
        stdout.contains("guest running; stream"),
        "no progress shown: {stdout}"
    );
    assert!(stdout.contains("backing link dropped: true"), "{stdout}");
    let info = qedstream_tests::tools::ok(&d, "qemu-img", &["info", "--output=json", "vm.qed"]);
    assert!(!info.contains("backing-filename"), "{info}");
    assert_eq!(qedstream_tests::tools::qemu_check(&d, "vm.qed"), 0);
    qedstream_tests::tools::ok(
        &d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qed", "base.raw", "vm.qed"],
    );
}

/// Without `qemu-system-x86_64` on PATH, `demo --vm` says so in one line and exits non-zero
/// before creating anything.
#[test]
fn demo_vm_without_qemu_system_says_what_is_missing() {
    let scratch = tempdir();
    let empty = tempdir();
    let d = scratch.path().join("demo");
    let out = run(demo(
        scratch.path(),
        &["--vm", "--size", "4M", "--dir", d.to_str().unwrap()],
    )
    .env("PATH", empty.path()));
    let err = stderr_of(&out);
    assert!(
        !out.status.success(),
        "demo --vm succeeded without qemu-system"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("qemu-system-x86_64") && err.contains("not installed"),
        "{err}"
    );
    assert!(!d.exists(), "the demo created {} anyway", d.display());
}
