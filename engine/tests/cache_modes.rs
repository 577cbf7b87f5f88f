//! `--cache none` (O_DIRECT) and `--aio io_uring|threads` end to end, graded by QEMU: images
//! that `create`, `convert`, `stream` and `serve` (with a guest's unaligned writes through
//! qemu-io over NBD) write with O_DIRECT under each backend pass `qemu-img check` and read
//! back equal to what QEMU expects (`qemu-img compare`); and the run-time fallback: under a
//! seccomp filter that makes `io_uring_setup` fail with EPERM, `qedstream` still works and
//! names the `threads` backend, while `--aio io_uring` fails with a clear one-line error.

use std::path::Path;
use std::process::Command;

use qedstream_tests::served::Served;
use qedstream_tests::tempdir;
use qedstream_tests::tools::{
    command_in, ok, ok_command, qemu_check, qemu_io, raw_fixture, refused,
};

const BACKENDS: [&str; 2] = ["io_uring", "threads"];

fn ours(dir: &Path, args: &[&str]) -> Command {
    command_in(env!("CARGO_BIN_EXE_qedstream"), dir, args)
}

fn assert_clean_and_equal(dir: &Path, image: &str, expected: &str, what: &str) {
    assert_eq!(qemu_check(dir, image), 0, "{what}: qemu-img check {image}");
    ok(dir, "qemu-img", &["compare", image, expected]);
}

#[test]
fn create_and_convert_with_cache_none_pass_qemu_img_check() {
    for aio in BACKENDS {
        let d = tempdir();
        let dir = d.path();
        raw_fixture(dir);
        let io = ["--cache", "none", "--aio", aio];
        let mut args = vec!["convert", "-O", "qed"];
        args.extend(io);
        args.extend(["top.qed", "out.qed"]);
        ok_command(&mut ours(dir, &args));
        assert_clean_and_equal(dir, "out.qed", "top.qed", &format!("convert -O qed, {aio}"));
        let mut args = vec!["convert", "-O", "raw"];
        args.extend(io);
        args.extend(["top.qed", "out.raw"]);
        ok_command(&mut ours(dir, &args));
        ok(
            dir,
            "qemu-img",
            &["compare", "-f", "raw", "out.raw", "top.qed"],
        );
        let mut args = vec!["create", "-b", "out.raw", "-F", "raw"];
        args.extend(io);
        args.push("new.qed");
        ok_command(&mut ours(dir, &args));
        assert_clean_and_equal(dir, "new.qed", "top.qed", &format!("create, {aio}"));
    }
}

#[test]
fn stream_with_cache_none_passes_qemu_img_check() {
    for aio in BACKENDS {
        let d = tempdir();
        let dir = d.path();
        raw_fixture(dir);
        ok(
            dir,
            "qemu-img",
            &["convert", "-O", "raw", "top.qed", "expected.raw"],
        );
        ok_command(&mut ours(
            dir,
            &["stream", "--cache", "none", "--aio", aio, "top.qed"],
        ));
        let info = ok(dir, "qemu-img", &["info", "top.qed"]);
        assert!(
            !info.contains("backing file"),
            "{aio}: still linked: {info}"
        );
        assert_clean_and_equal(dir, "top.qed", "expected.raw", &format!("stream, {aio}"));
    }
}

#[test]
fn serve_with_cache_none_takes_unaligned_guest_writes() {
    let writes = [
        "write -P 0x71 100001 3000",
        "write -P 0x72 4095 2",
        "write -P 0x73 5M 1M",
        "write -P 0x74 11M 1",
        "write -z 7340033 70000",
    ];
    for aio in BACKENDS {
        let d = tempdir();
        let dir = d.path();
        raw_fixture(dir);
        ok(
            dir,
            "qemu-img",
            &["convert", "-O", "raw", "top.qed", "expected.raw"],
        );
        qemu_io(dir, "raw", "expected.raw", &writes);
        let sock = dir.join("nbd.sock");
        let program = Path::new(env!("CARGO_BIN_EXE_qedstream"));
        let mut served = Served::start(
            program,
            dir,
            &[
                "--cache",
                "none",
                "--aio",
                aio,
                "--nbd",
                sock.to_str().unwrap(),
                "top.qed",
            ],
        );
        let uri = served.uri();
        let mut args = vec!["-f", "raw"];
        for w in &writes {
            args.extend(["-c", w]);
        }
        args.push(&uri);
        ok(dir, "qemu-io", &args);
        assert_eq!(served.terminate(), 0, "{aio}: serve's exit");
        assert_clean_and_equal(dir, "top.qed", "expected.raw", &format!("serve, {aio}"));
    }
}

fn info_verbose(dir: &Path, extra: &[&str], deny: bool) -> std::process::Output {
    let mut args = vec!["info", "--verbose"];
    args.extend(extra);
    args.push("top.qed");
    let mut cmd = ours(dir, &args);
    if deny {
        qedstream_tests::seccomp::deny_io_uring(&mut cmd);
    }
    qedstream_tests::tools::run_command(&mut cmd)
}

#[test]
fn without_io_uring_the_threads_backend_is_chosen_and_works() {
    let d = tempdir();
    let dir = d.path();
    raw_fixture(dir);
    let default = info_verbose(dir, &[], false);
    let default = String::from_utf8_lossy(&default.stdout);
    assert!(
        default.contains("aio: threads"),
        "the default backend: {default}"
    );
    let free = info_verbose(dir, &["--aio", "auto"], false);
    let free = String::from_utf8_lossy(&free.stdout);
    assert!(free.contains("aio: io_uring"), "unfiltered auto: {free}");
    let denied = info_verbose(dir, &["--aio", "auto"], true);
    assert!(denied.status.success(), "info under the filter: {denied:?}");
    let text = String::from_utf8_lossy(&denied.stdout);
    assert!(text.contains("aio: threads"), "filtered auto: {text}");
    // The whole stream under the filter, with O_DIRECT as well.
    ok(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "top.qed", "expected.raw"],
    );
    let mut stream = ours(
        dir,
        &["stream", "--aio", "auto", "--cache", "none", "top.qed"],
    );
    qedstream_tests::seccomp::deny_io_uring(&mut stream);
    ok_command(&mut stream);
    assert_clean_and_equal(dir, "top.qed", "expected.raw", "stream under the filter");
}

#[test]
fn aio_io_uring_under_the_filter_fails_clearly() {
    let d = tempdir();
    let dir = d.path();
    raw_fixture(dir);
    let mut cmd = ours(dir, &["info", "--aio", "io_uring", "top.qed"]);
    qedstream_tests::seccomp::deny_io_uring(&mut cmd);
    let err = refused(&mut cmd);
    assert!(
        err.contains("io_uring is unavailable") && err.contains("--aio threads"),
        "the error: {err}"
    );
    // Without the filter the same command works.
    ok_command(&mut ours(dir, &["info", "--aio", "io_uring", "top.qed"]));
}
