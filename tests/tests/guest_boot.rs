//! A real Linux guest boots under `qemu-system-x86_64` (TCG) from an exported disk and hashes
//! its whole disk; the host hashes the image the export serves (flattened by `qemu-img
//! convert`). The two must agree, whoever serves the disk: `qemu-nbd` (raw, QED over a raw
//! base, read-only with `readonly=on`) and `qemu-storage-daemon`'s NBD and vhost-user-blk
//! exports, the anchors for the later `qedstream serve` tests. A guest's write must land in
//! the image, where `qemu-img` reads it back and finds the image clean; a write to a read-only
//! disk must fail in the guest and change nothing. And what `serve` will do, QEMU does here:
//! a guest reading through a copy-on-read filter over an NBD backing fills the overlay.
//!
//! Each boot takes seconds (see the `elapsed` lines with `--nocapture`). The kit is built (or
//! found cached) by `guest/build-kit.sh`; a missing `qemu-system-x86_64` fails these tests.

use std::path::Path;

use qedstream_tests::guest::{
    host_sha256, GuestAction, GuestDisk, GuestError, GuestKit, GuestReport,
};
use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::{assert_same_bytes, path_str, tempdir, tools, XorShift};

const MIB: u64 = 1 << 20;

/// The socket the server a guest boots from listens on, in the test's directory.
const SOCK_NAME: &str = "server.sock";

/// sha256 of a file in `dir`, as the host computes it.
fn sha256_of(dir: &Path, file: &str) -> String {
    host_sha256(&dir.join(file))
}

/// `size` random bytes (seeded) in `dir/name`.
fn random_file(dir: &Path, name: &str, size: u64, seed: u64) {
    let mut bytes = vec![0u8; size as usize];
    XorShift::new(seed).fill(&mut bytes);
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// In `dir`: `base.raw` (24 MiB of random bytes) and `top.qed` (32 MiB) over it, with data of
/// its own, a zero cluster over base data and data past the end of the base.
fn overlay_fixture(dir: &Path, seed: u64) {
    random_file(dir, "base.raw", 24 * MIB, seed);
    tools::create_overlay(dir, "base.raw", "raw", "top.qed", Some("32M"));
    tools::qemu_io(
        dir,
        "qed",
        "top.qed",
        &[
            "write -P 0xaa 512k 64k",
            "write -P 0xcd 100k 4k",
            "write -z 2M 64k",
            "write -P 0x5e 30M 1M",
        ],
    );
}

/// `qemu-nbd` serving `image` (a name in `dir`) as export `exp` on `dir/SOCK_NAME`.
fn qemu_nbd(dir: &Path, format: &str, image: &str, read_only: bool) -> NbdServer {
    let sock = dir.join(SOCK_NAME);
    let mut args = vec!["-f", format, "-x", "exp", "--persistent"];
    if read_only {
        args.push("-r");
    }
    let image = dir.join(image);
    args.extend(["-k", path_str(&sock), path_str(&image)]);
    NbdServer::start("qemu-nbd", args, &sock)
}

fn nbd_disk(server: &NbdServer, read_only: bool) -> GuestDisk {
    GuestDisk::Nbd {
        uri: server.uri(),
        read_only,
    }
}

fn boot(disk: GuestDisk, action: GuestAction, what: &str) -> GuestReport {
    let report = GuestKit::get().boot(disk, action);
    eprintln!("{what}: guest elapsed {:?}", report.elapsed);
    report
}

#[test]
fn the_guest_hashes_a_raw_qemu_nbd_export_as_the_host_does() {
    let dir = tempdir();
    let dir = dir.path();
    random_file(dir, "disk.raw", 32 * MIB, 0x6E57_0001);
    let expected = sha256_of(dir, "disk.raw");
    let server = qemu_nbd(dir, "raw", "disk.raw", false);

    let report = boot(nbd_disk(&server, false), GuestAction::Hash, "raw");
    assert_eq!(report.size, 32 * MIB, "{}", report.console);
    assert_eq!(report.sha256, expected, "{}", report.console);
}

#[test]
fn the_guest_hashes_a_qed_overlay_as_qemu_img_flattens_it() {
    let dir = tempdir();
    let dir = dir.path();
    overlay_fixture(dir, 0x6E57_0002);
    tools::flatten(dir, "top.qed", "qed");
    let expected = sha256_of(dir, "top.qed.flat.raw");
    let server = qemu_nbd(dir, "qed", "top.qed", false);

    let report = boot(nbd_disk(&server, false), GuestAction::Hash, "qed overlay");
    assert_eq!(report.size, 32 * MIB, "{}", report.console);
    assert_eq!(report.sha256, expected, "{}", report.console);
}

/// Boots a guest that writes to `dir/top.qed` (an [`overlay_fixture`]) through the server
/// `serve` starts, stops the server with SIGTERM and checks that the write landed: the image
/// is clean for `qemu-img check`, `qemu-io` reads the pattern back, the flattened image equals
/// the one before with the write applied, and its hash is the one the guest computed.
fn assert_guest_write_lands(
    dir: &Path,
    serve: impl FnOnce(&Path) -> (NbdServer, GuestDisk),
    what: &str,
) {
    let mut expected = tools::flatten(dir, "top.qed", "qed");
    // Unaligned, across cluster boundaries, over base data the overlay has not copied yet.
    let (offset, len, byte) = (5 * MIB + 37, 200_000, 0xab);
    expected[offset as usize..(offset + len) as usize].fill(byte);
    let (mut server, disk) = serve(dir);

    let report = boot(disk, GuestAction::Write { offset, len, byte }, what);
    let status = server.terminate();
    assert!(status.success(), "{what}: the server exited with {status}");

    assert_eq!(
        tools::qemu_check(dir, "top.qed"),
        0,
        "{what}: qemu-img check after the guest's write"
    );
    let read_back = format!("read -P {byte:#x} {offset} {len}");
    tools::qemu_io(dir, "qed", "top.qed", &[&read_back]);
    let flat = tools::flatten(dir, "top.qed", "qed");
    assert_same_bytes(
        &flat,
        &expected,
        &format!("{what}: the image after the write"),
    );
    assert_eq!(
        report.sha256,
        sha256_of(dir, "top.qed.flat.raw"),
        "{what}: the guest's hash after its write\n{}",
        report.console
    );
}

#[test]
fn a_guest_write_lands_in_the_qed_image() {
    let dir = tempdir();
    overlay_fixture(dir.path(), 0x6E57_0003);
    let serve = |dir: &Path| {
        let server = qemu_nbd(dir, "qed", "top.qed", false);
        let disk = nbd_disk(&server, false);
        (server, disk)
    };
    assert_guest_write_lands(dir.path(), serve, "qemu-nbd write");
}

#[test]
fn a_read_only_qemu_nbd_export_boots_with_readonly_on() {
    let dir = tempdir();
    let dir = dir.path();
    overlay_fixture(dir, 0x6E57_0004);
    tools::flatten(dir, "top.qed", "qed");
    let expected = sha256_of(dir, "top.qed.flat.raw");
    let server = qemu_nbd(dir, "qed", "top.qed", true);

    let report = boot(nbd_disk(&server, true), GuestAction::Hash, "read-only");
    assert_eq!(report.sha256, expected, "{}", report.console);
}

#[test]
fn a_guest_write_to_a_read_only_disk_fails_and_changes_nothing() {
    let dir = tempdir();
    let dir = dir.path();
    overlay_fixture(dir, 0x6E57_0005);
    let before = tools::flatten(dir, "top.qed", "qed");
    let mut server = qemu_nbd(dir, "qed", "top.qed", true);

    let action = GuestAction::Write {
        offset: MIB,
        len: 4096,
        byte: 0x77,
    };
    match GuestKit::get().try_boot(nbd_disk(&server, true), action) {
        Err(GuestError::NoReport { problem, .. }) => assert!(
            problem.contains("the guest failed: writing 4096 bytes"),
            "{problem}"
        ),
        Err(other) => panic!("the guest did not run as expected: {other}"),
        Ok(report) => panic!("a write to a read-only disk succeeded\n{}", report.console),
    }
    assert!(server.terminate().success());
    let after = tools::flatten(dir, "top.qed", "qed");
    assert_same_bytes(
        &after,
        &before,
        "the read-only image after the guest's write",
    );
}

/// qemu-storage-daemon with `dir/top.qed` as node `top`, then the `extra` options, then
/// `export` (its `--export` option, `id=exp0` added), until SIGTERM or drop. It must listen
/// on `dir/SOCK_NAME` (the wait for it connects there once).
fn qemu_storage_daemon(dir: &Path, writable: bool, export: &str, extra: &[String]) -> NbdServer {
    let read_only = if writable { "off" } else { "on" };
    let image = dir.join("top.qed");
    let mut args = vec![
        "--blockdev".to_string(),
        format!(
            "driver=file,node-name=file0,filename={},read-only={read_only}",
            image.display()
        ),
        "--blockdev".into(),
        format!("driver=qed,node-name=top,file=file0,read-only={read_only}"),
    ];
    // In order: an NBD export needs the NBD server started first.
    args.extend_from_slice(extra);
    args.extend(["--export".into(), format!("{export},id=exp0")]);
    NbdServer::start("qemu-storage-daemon", args, &dir.join(SOCK_NAME))
}

/// qemu-storage-daemon's vhost-user-blk export of `dir/top.qed`, and the disk for it.
fn qsd_vhost_user_blk(dir: &Path, writable: bool) -> (NbdServer, GuestDisk) {
    let socket = dir.join(SOCK_NAME);
    let on_off = if writable { "on" } else { "off" };
    let export = format!(
        "type=vhost-user-blk,node-name=top,addr.type=unix,addr.path={},writable={on_off}",
        socket.display()
    );
    // NbdServer is the tests' "server on a unix socket, stopped on drop"; the protocol here
    // is vhost-user.
    let server = qemu_storage_daemon(dir, writable, &export, &[]);
    (server, GuestDisk::VhostUserBlk { socket, queues: 1 })
}

#[test]
fn the_guest_hashes_a_qemu_storage_daemon_nbd_export() {
    let dir = tempdir();
    let dir = dir.path();
    overlay_fixture(dir, 0x6E57_0006);
    tools::flatten(dir, "top.qed", "qed");
    let expected = sha256_of(dir, "top.qed.flat.raw");
    let sock = dir.join(SOCK_NAME);
    let nbd_server = [
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", sock.display()),
    ];
    let export = "type=nbd,node-name=top,name=exp,writable=off";
    let server = qemu_storage_daemon(dir, false, export, &nbd_server);

    let report = boot(nbd_disk(&server, true), GuestAction::Hash, "qsd nbd");
    assert_eq!(report.size, 32 * MIB, "{}", report.console);
    assert_eq!(report.sha256, expected, "{}", report.console);
}

#[test]
fn the_guest_hashes_a_qemu_storage_daemon_vhost_user_blk_export() {
    let dir = tempdir();
    let dir = dir.path();
    overlay_fixture(dir, 0x6E57_0007);
    tools::flatten(dir, "top.qed", "qed");
    let expected = sha256_of(dir, "top.qed.flat.raw");
    let (_server, disk) = qsd_vhost_user_blk(dir, false);

    let report = boot(disk, GuestAction::Hash, "qsd vhost-user-blk");
    assert_eq!(report.size, 32 * MIB, "{}", report.console);
    assert_eq!(report.sha256, expected, "{}", report.console);
}

#[test]
fn a_guest_write_through_vhost_user_blk_lands_in_the_qed_image() {
    let dir = tempdir();
    overlay_fixture(dir.path(), 0x6E57_0008);
    let serve = |dir: &Path| qsd_vhost_user_blk(dir, true);
    assert_guest_write_lands(dir.path(), serve, "qsd vhost-user-blk write");
}

/// What `qedstream serve` will do, done by QEMU: a guest reads the whole disk through a
/// copy-on-read filter over a QED overlay whose backing is an NBD export. The guest sees the
/// flattened chain, and afterwards the overlay alone holds it (a copy of it with the backing
/// removed flattens to the same bytes) and is clean for `qemu-img check`.
#[test]
fn a_guest_reading_through_qemu_copy_on_read_over_an_nbd_backing_fills_the_overlay() {
    let dir = tempdir();
    let dir = dir.path();
    random_file(dir, "base.raw", 24 * MIB, 0x6E57_0009);
    let base_sock = dir.join("base.sock");
    let base_file = dir.join("base.raw");
    let base_args = ["-r", "-f", "raw", "-x", "base", "--persistent", "-k"];
    let base_args = base_args.iter().map(|a| a.to_string());
    let base_args = base_args.chain([
        base_sock.display().to_string(),
        base_file.display().to_string(),
    ]);
    let _base = NbdServer::start("qemu-nbd", base_args, &base_sock);
    let backing = format!("nbd+unix:///base?socket={}", base_sock.display());
    tools::create_overlay(dir, &backing, "raw", "top.qed", Some("32M"));
    tools::qemu_io(
        dir,
        "qed",
        "top.qed",
        &[
            "write -P 0xaa 512k 64k",
            "write -z 2M 64k",
            "write -P 0x5e 30M 1M",
        ],
    );
    let expected = tools::flatten(dir, "top.qed", "qed");
    let expected_sha256 = sha256_of(dir, "top.qed.flat.raw");
    let sock = dir.join(SOCK_NAME);
    let extra = [
        "--blockdev".to_string(),
        "driver=copy-on-read,node-name=cor,file=top".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", sock.display()),
    ];
    let export = "type=nbd,node-name=cor,name=exp,writable=off";
    let mut server = qemu_storage_daemon(dir, true, export, &extra);

    let report = boot(
        nbd_disk(&server, true),
        GuestAction::Hash,
        "qsd copy-on-read",
    );
    assert_eq!(report.sha256, expected_sha256, "{}", report.console);
    assert!(server.terminate().success());

    assert_eq!(
        tools::qemu_check(dir, "top.qed"),
        0,
        "qemu-img check after copy-on-read"
    );
    std::fs::copy(dir.join("top.qed"), dir.join("detached.qed")).unwrap();
    tools::ok(
        dir,
        "qemu-img",
        &["rebase", "-u", "-f", "qed", "-b", "", "detached.qed"],
    );
    let alone = tools::flatten(dir, "detached.qed", "qed");
    assert_same_bytes(
        &alone,
        &expected,
        "the overlay without its backing, after the guest read it all",
    );
}
