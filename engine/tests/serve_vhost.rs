//! `qedstream serve --vhost-user-blk` proven with a real VM (issue 12): a small Linux guest
//! boots under `qemu-system-x86_64` (TCG) with its disk attached as `vhost-user-blk-pci` (guest
//! memory from a shared memfd backend), served by `qedstream serve` while the stream copies the
//! backing in under a rate limit. The host grades with its own sha256 and `qemu-img`.
//!
//! Scenarios: the guest's whole-disk checksum equals the base's while the stream runs (the
//! front end then disconnects and a second guest, on the same socket, is served again); a
//! guest write during the stream is in the final standalone image; two queues; the NBD export
//! of the same `serve` alongside; `--read-only` refuses the guest's write and leaves the
//! file untouched.

use std::path::{Path, PathBuf};

use qedstream_tests::guest::{
    host_sha256, GuestAction, GuestDisk, GuestError, GuestKit, GuestReport,
};
use qedstream_tests::served::Served;
use qedstream_tests::vm_serve;
use qedstream_tests::{assert_same_bytes, tempdir, tools};

const MIB: u64 = 1 << 20;

/// Every guest disk here.
const DISK: u64 = 32 * MIB;

/// Slow enough that 32 MiB of backing take ~32 s to stream: still running while a guest
/// boots.
const SLOW: &str = "1M";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_qedstream"))
}

/// `qedstream serve --output=json --vhost-user-blk dir/vhost.sock --control ctl.sock ARGS...
/// IMAGE` in `dir`, waited for until it says ready; returns it and the vhost-user socket.
fn serve(dir: &Path, args: &[&str], image: &str) -> (Served, PathBuf) {
    let sock = dir.join("vhost.sock");
    let sock_arg = sock.display().to_string();
    let mut all = vec!["--vhost-user-blk", &sock_arg, "--control", "ctl.sock"];
    all.extend_from_slice(args);
    all.push(image);
    let served = Served::start(bin(), dir, &all);
    assert!(sock.exists(), "serve said ready without {}", sock.display());
    (served, sock)
}

fn boot(socket: &Path, queues: u16, action: GuestAction, what: &str) -> GuestReport {
    let disk = GuestDisk::VhostUserBlk {
        socket: socket.to_path_buf(),
        queues,
    };
    vm_serve::boot(disk, DISK, action, what)
}

/// The guest hashes the overlay over vhost-user-blk while the stream runs and sees the base;
/// it powers off (the front end disconnects) and a second guest on the same socket is served
/// again. The stream then completes and the image alone equals the base.
#[test]
fn the_guest_sees_the_base_over_vhost_user_blk_while_the_stream_runs() {
    let dir = tempdir();
    let d = dir.path();
    let base = vm_serve::random_base(d, DISK, 0x7B_0001);
    let expected = host_sha256(&d.join("base.raw"));
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    let (mut served, sock) = serve(d, &["--stream", "--rate", SLOW], "top.qed");

    let before = vm_serve::assert_streaming(bin(), d, DISK);
    let report = boot(&sock, 1, GuestAction::Hash, "hash while streaming");
    assert_eq!(report.sha256, expected, "{}", report.console);
    eprintln!("stream before the boot: {before}");
    let again = boot(&sock, 1, GuestAction::Hash, "a second front end");
    assert_eq!(again.sha256, expected, "{}", again.console);

    vm_serve::finish_stream(bin(), &mut served, d, DISK);
    assert_eq!(served.terminate(), 0);
    let stats = served.wait_for("vhost-user-blk");
    assert_eq!(
        stats["front-ends"], 2,
        "two guests, one after the other: {stats}"
    );
    vm_serve::assert_standalone(d, "top.qed", &base, "after the stream");
}

/// A guest writes over vhost-user-blk while the stream runs; the standalone image holds the
/// write and the base everywhere else.
#[test]
fn a_guest_write_over_vhost_user_blk_is_in_the_standalone_image() {
    let dir = tempdir();
    let d = dir.path();
    let mut expected = vm_serve::random_base(d, DISK, 0x7B_0002);
    // Unaligned, across cluster boundaries, over base data not yet streamed.
    let (offset, len, byte) = (5 * MIB + 37, 200_000, 0xab);
    expected[offset as usize..(offset + len) as usize].fill(byte);
    let expected_sha = vm_serve::sha256_of_bytes(d, &expected);
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    let (mut served, sock) = serve(d, &["--stream", "--rate", SLOW], "top.qed");

    vm_serve::assert_streaming(bin(), d, DISK);
    let action = GuestAction::Write { offset, len, byte };
    let report = boot(&sock, 1, action, "write while streaming");
    assert_eq!(report.sha256, expected_sha, "{}", report.console);

    vm_serve::finish_stream(bin(), &mut served, d, DISK);
    assert_eq!(served.terminate(), 0);
    vm_serve::assert_standalone(
        d,
        "top.qed",
        &expected,
        "the guest's write after the stream",
    );
}

/// Two request queues (one worker each) and the NBD export of the same serve: the guest
/// hashes the disk over vhost-user-blk, and `qemu-img` reads the same bytes over NBD. Both
/// queues carried requests (the counts `serve` prints when it stops).
#[test]
fn two_queues_and_nbd_alongside() {
    let dir = tempdir();
    let d = dir.path();
    let base = vm_serve::random_base(d, DISK, 0x7B_0003);
    let expected = host_sha256(&d.join("base.raw"));
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    let nbd = format!("unix:{}", d.join("nbd.sock").display());
    let (mut served, sock) = serve(d, &["--num-queues", "2", "--nbd", &nbd], "top.qed");

    let report = boot(&sock, 2, GuestAction::Hash, "two queues");
    assert_eq!(report.sha256, expected, "{}", report.console);
    tools::ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &served.uri(),
            "nbd.raw",
        ],
    );
    let over_nbd = std::fs::read(d.join("nbd.raw")).unwrap();
    assert_same_bytes(&over_nbd, &base, "the NBD export beside vhost-user-blk");
    assert_eq!(served.terminate(), 0);
    // Both queues carried the guest's requests (its driver spreads them over the CPUs' queues).
    let stats = served.wait_for("vhost-user-blk");
    let queues = stats["queues"].as_array().expect("queues");
    assert_eq!(queues.len(), 2, "{stats}");
    for (i, q) in queues.iter().enumerate() {
        let requests = q["requests"].as_u64().unwrap_or(0);
        assert!(requests > 0, "queue {i} served no request: {stats}");
    }
}

/// `--read-only`: the device says RO, the guest's write fails in the guest, and the file is
/// byte-for-byte what it was.
#[test]
fn read_only_refuses_the_guest_write_and_leaves_the_file() {
    let dir = tempdir();
    let d = dir.path();
    vm_serve::random_base(d, DISK, 0x7B_0004);
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    let before = std::fs::read(d.join("top.qed")).unwrap();
    let (mut served, sock) = serve(d, &["--read-only"], "top.qed");

    let disk = GuestDisk::VhostUserBlk {
        socket: sock,
        queues: 1,
    };
    let action = GuestAction::Write {
        offset: MIB,
        len: 4096,
        byte: 0x11,
    };
    match GuestKit::get().try_boot(disk, action) {
        Err(GuestError::NoReport { problem, .. }) => assert!(
            problem.contains("the guest failed: writing 4096 bytes"),
            "{problem}"
        ),
        Err(other) => panic!("the guest did not run as expected: {other}"),
        Ok(report) => panic!("a write to a read-only disk succeeded\n{}", report.console),
    }
    assert_eq!(served.terminate(), 0);
    assert_eq!(
        std::fs::read(d.join("top.qed")).unwrap(),
        before,
        "the file changed"
    );
}
