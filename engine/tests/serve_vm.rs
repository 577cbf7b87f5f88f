//! `qedstream serve` proven with a real VM (issue 9): a small Linux guest boots under
//! `qemu-system-x86_64` (TCG) from the disk `serve` exports over NBD and hashes its whole
//! disk, while the stream copies the backing in under a rate limit. The host grades every
//! result with its own sha256 of the base and with `qemu-img` (check, info, convert).
//!
//! Scenarios: the guest's checksum equals the chain's while the stream runs, and the image
//! ends standalone and equal to the base; a guest write during the stream is in the final
//! image; SIGTERM mid-stream leaves the image clean and a restarted stream completes; a
//! post-copy migration from a source `serve --read-only` (and from `qemu-nbd -r`) survives
//! the source being killed once the stream is done; a read-only export leaves the file
//! untouched. And the ordinary NBD clients (qemu-io, qemu-img map, nbdinfo, nbdcopy) through
//! the `serve` binary.
//!
//! Each boot takes ~6 s under TCG; the disks are 32 MiB.

use std::path::Path;
use std::process::Command;

use qedstream_tests::guest::{host_sha256, GuestAction, GuestDisk, GuestReport};
use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::served::Served;
use qedstream_tests::vm_serve;
use qedstream_tests::{assert_same_bytes, path_str, tempdir, tools};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Every guest disk here.
const DISK: u64 = 32 * MIB;

/// Slow enough that 32 MiB of backing take ~32 s to stream: the stream is still running
/// while the guest boots (~6 s).
const SLOW: &str = "1M";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_qedstream"))
}

/// `qedstream serve --output=json ARGS... IMAGE` in `dir`, exported on `dir/nbd.sock`,
/// controlled on `dir/ctl.sock`.
fn serve(dir: &Path, args: &[&str], image: &str) -> Served {
    let nbd = format!("unix:{}", dir.join("nbd.sock").display());
    let mut all = vec!["--nbd", &nbd, "--control", "ctl.sock"];
    all.extend_from_slice(args);
    all.push(image);
    Served::start(bin(), dir, &all)
}

fn boot(uri: &str, read_only: bool, action: GuestAction, what: &str) -> GuestReport {
    let disk = GuestDisk::Nbd {
        uri: uri.to_string(),
        read_only,
    };
    vm_serve::boot(disk, DISK, action, what)
}

/// The guest hashes the served overlay while the stream runs: it sees the base. The job then
/// completes, the link is dropped, and the image alone equals the base.
#[test]
fn the_guest_sees_the_base_while_the_stream_runs_and_the_image_ends_standalone() {
    let dir = tempdir();
    let d = dir.path();
    let base = vm_serve::random_base(d, DISK, 0x5E_0001);
    let expected = host_sha256(&d.join("base.raw"));
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    let mut served = serve(d, &["--stream", "--rate", SLOW], "top.qed");
    let uri = served.uri();

    let before = vm_serve::assert_streaming(bin(), d, DISK);
    let report = boot(&uri, false, GuestAction::Hash, "hash while streaming");
    assert_eq!(report.sha256, expected, "{}", report.console);
    eprintln!("stream before the boot: {before}");

    vm_serve::finish_stream(bin(), &mut served, d, DISK);
    assert_eq!(
        vm_serve::backing_of(d, "top.qed"),
        None,
        "unlinked while serving"
    );
    assert_eq!(served.terminate(), 0);
    vm_serve::assert_standalone(d, "top.qed", &base, "after the stream");
}

/// A guest writes while the stream runs; after the stream the standalone image holds the
/// write and the base everywhere else.
#[test]
fn a_guest_write_during_the_stream_is_in_the_standalone_image() {
    let dir = tempdir();
    let d = dir.path();
    let mut expected = vm_serve::random_base(d, DISK, 0x5E_0002);
    // Unaligned, across cluster boundaries, over base data not yet streamed.
    let (offset, len, byte) = (5 * MIB + 37, 200_000, 0xab);
    expected[offset as usize..(offset + len) as usize].fill(byte);
    let expected_sha = vm_serve::sha256_of_bytes(d, &expected);
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    let mut served = serve(d, &["--stream", "--rate", SLOW], "top.qed");

    vm_serve::assert_streaming(bin(), d, DISK);
    let action = GuestAction::Write { offset, len, byte };
    let report = boot(&served.uri(), false, action, "write while streaming");
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

/// SIGTERM to serve mid-stream, after a guest wrote: the image is clean (NEED_CHECK clear),
/// still linked, and reads as the base with the write; `serve --stream` started again
/// completes to the same content, standalone.
#[test]
fn sigterm_mid_stream_leaves_a_clean_image_and_a_restarted_stream_completes() {
    let dir = tempdir();
    let d = dir.path();
    let mut expected = vm_serve::random_base(d, DISK, 0x5E_0003);
    let (offset, len, byte) = (17 * MIB + 4095, 70_000, 0x3c);
    expected[offset as usize..(offset + len) as usize].fill(byte);
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    let mut served = serve(d, &["--stream", "--rate", SLOW], "top.qed");
    // Paused, so that it is still mid-stream after the guest (whose reads copy in what they
    // touch) is done.
    vm_serve::assert_streaming(bin(), d, DISK);
    assert!(vm_serve::job(bin(), d, &["pause"]).status.success());

    let action = GuestAction::Write { offset, len, byte };
    let report = boot(&served.uri(), false, action, "write, then SIGTERM");
    assert_eq!(report.sha256, vm_serve::sha256_of_bytes(d, &expected));
    let info = vm_serve::job_info(bin(), d);
    assert_eq!(info["status"], "paused", "{info}");
    assert!(info["offset"].as_u64().unwrap() < DISK, "{info}");
    assert_eq!(served.terminate(), 0, "serve's exit after SIGTERM");
    assert_eq!(
        vm_serve::backing_of(d, "top.qed").as_deref(),
        Some("base.raw"),
        "a cancelled stream keeps the link"
    );
    vm_serve::assert_clean_with(d, "top.qed", &expected, "after SIGTERM mid-stream");

    let mut again = serve(d, &["--stream"], "top.qed");
    let done = again.wait_for("completed");
    assert_eq!(done["unlinked"], true, "{done}");
    assert_eq!(again.terminate(), 0);
    vm_serve::assert_standalone(d, "top.qed", &expected, "after the restarted stream");
}

/// Post-copy migration: the destination overlay's backing is the source's NBD export
/// (`source_uri`); a second `serve --stream` gives it to the guest, which reads everything.
/// Once the stream completes the source is killed (`kill_source`), and a guest booted again
/// still reads everything, with the same checksum.
fn post_copy_migration(d: &Path, base: &[u8], source_uri: &str, kill_source: impl FnOnce()) {
    let expected = host_sha256(&d.join("base.raw"));
    tools::create_overlay(d, source_uri, "raw", "dst.qed", Some("32M"));
    let mut dest = serve(d, &["--stream", "--rate", SLOW], "dst.qed");
    let uri = dest.uri();

    vm_serve::assert_streaming(bin(), d, DISK);
    let report = boot(
        &uri,
        false,
        GuestAction::Hash,
        "migration: on the destination",
    );
    assert_eq!(report.sha256, expected, "{}", report.console);
    vm_serve::finish_stream(bin(), &mut dest, d, DISK);

    kill_source();
    let report = boot(&uri, false, GuestAction::Hash, "migration: the source gone");
    assert_eq!(report.sha256, expected, "{}", report.console);
    assert_eq!(dest.terminate(), 0);
    vm_serve::assert_standalone(d, "dst.qed", base, "the migrated disk");
}

#[test]
fn post_copy_migration_from_a_read_only_qedstream_serve() {
    let dir = tempdir();
    let d = dir.path();
    let base = vm_serve::random_base(d, DISK, 0x5E_0004);
    let src_nbd = format!("unix:{}", d.join("src.sock").display());
    let source = Served::start(
        bin(),
        d,
        &[
            "--nbd",
            &src_nbd,
            "--export",
            "base",
            "--read-only",
            "base.raw",
        ],
    );
    assert_eq!(source.ready["read_only"], true);
    let source_uri = source.uri();
    post_copy_migration(d, &base, &source_uri, move || drop(source));
}

#[test]
fn post_copy_migration_from_qemu_nbd() {
    let dir = tempdir();
    let d = dir.path();
    let base = vm_serve::random_base(d, DISK, 0x5E_0005);
    let source = NbdServer::qemu_nbd(&d.join("base.raw"), &d.join("src.sock"));
    let source_uri = source.uri();
    post_copy_migration(d, &base, &source_uri, move || drop(source));
}

/// `serve --read-only`, the guest with `readonly=on`: the guest hashes the chain, and the
/// file's bytes and mtime are unchanged (no copy-on-read, no header update).
#[test]
fn a_read_only_served_disk_is_not_written() {
    let dir = tempdir();
    let d = dir.path();
    vm_serve::random_base(d, DISK, 0x5E_0006);
    tools::create_overlay(d, "base.raw", "raw", "top.qed", None);
    tools::qemu_io(
        d,
        "qed",
        "top.qed",
        &["write -P 0xaa 512k 64k", "write -z 3M 1M"],
    );
    tools::flatten(d, "top.qed", "qed");
    let expected = host_sha256(&d.join("top.qed.flat.raw"));
    let image = d.join("top.qed");
    let bytes = std::fs::read(&image).unwrap();
    let mtime = std::fs::metadata(&image).unwrap().modified().unwrap();

    let mut served = serve(d, &["--read-only"], "top.qed");
    assert_eq!(served.ready["read_only"], true);
    let report = boot(&served.uri(), true, GuestAction::Hash, "read-only");
    assert_eq!(report.sha256, expected, "{}", report.console);
    assert_eq!(served.terminate(), 0);

    assert!(
        std::fs::read(&image).unwrap() == bytes,
        "the image's bytes changed"
    );
    let after = std::fs::metadata(&image).unwrap().modified().unwrap();
    assert_eq!(after, mtime, "the image's mtime changed");
}

/// Per 64 KiB unit of a `[{start, length, data}, ...]` map (qemu-img's and qedstream's
/// `--output=json`): whether it says data.
fn data_units(map: &str, size: u64) -> Vec<bool> {
    const UNIT: u64 = 64 << 10;
    let map: Vec<Value> = serde_json::from_str(map).expect("a JSON map");
    let mut units = vec![None; (size / UNIT) as usize];
    for e in &map {
        let (start, length) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        for u in start / UNIT..(start + length).div_ceil(UNIT) {
            units[u as usize] = Some(e["data"].as_bool().unwrap());
        }
    }
    units
        .into_iter()
        .map(|u| u.expect("unit not covered"))
        .collect()
}

/// `nbdinfo --map=CONTEXT --json URI` as (offset, length, type) triples.
fn nbdinfo_map(dir: &Path, context: &str, uri: &str) -> Vec<(u64, u64, u64)> {
    let arg = format!("--map={context}");
    let out = tools::ok(dir, "nbdinfo", &[&arg, "--json", uri]);
    let v: Vec<Value> = serde_json::from_str(&out).expect("nbdinfo json");
    let field = |e: &Value, k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
    v.iter()
        .map(|e| (field(e, "offset"), field(e, "length"), field(e, "type")))
        .collect()
}

/// The ordinary NBD clients through the `serve` binary: `qemu-img map` of the export equals
/// `qedstream map` of the image, `nbdinfo --map` (`base:allocation`,
/// `qemu:allocation-depth`) equals qemu-nbd's of the same chain, `nbdcopy` copies the chain,
/// and `qemu-io` writes, zeroes, flushes and reads back; the image ends clean with them.
#[test]
fn nbd_clients_through_the_serve_binary() {
    let dir = tempdir();
    let d = dir.path();
    tools::raw_fixture(d);
    std::fs::copy(d.join("top.qed"), d.join("ref.qed")).unwrap();
    let mut expected = tools::flatten(d, "top.qed", "qed");
    let size = expected.len() as u64;
    let mut served = serve(d, &[], "top.qed");
    let uri = served.uri();

    let theirs = tools::ok(d, "qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let ours = tools::run_command(Command::new(bin()).current_dir(d).args([
        "map",
        "-U",
        "--output=json",
        "top.qed",
    ]));
    assert!(ours.status.success(), "qedstream map: {ours:?}");
    let ours = String::from_utf8_lossy(&ours.stdout);
    assert_eq!(data_units(&theirs, size), data_units(&ours, size), "map");

    let ref_sock = d.join("ref.sock");
    let args = ["-r", "-A", "-f", "qed", "-x", "exp", "--persistent", "-k"];
    let args = args.iter().map(|a| a.to_string());
    let ref_image = d.join("ref.qed");
    let args = args.chain([path_str(&ref_sock).into(), path_str(&ref_image).into()]);
    let reference = NbdServer::start("qemu-nbd", args, &ref_sock);
    for context in ["base:allocation", "qemu:allocation-depth"] {
        assert_eq!(
            nbdinfo_map(d, context, &uri),
            nbdinfo_map(d, context, &reference.uri()),
            "nbdinfo --map={context}: serve vs qemu-nbd"
        );
    }
    drop(reference);

    tools::ok(d, "nbdcopy", &[&uri, "copy.raw"]);
    assert_same_bytes(
        &std::fs::read(d.join("copy.raw")).unwrap(),
        &expected,
        "nbdcopy",
    );

    let io = |cmds: &[&str]| {
        let mut args = vec!["-f", "raw"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(&uri);
        tools::ok(d, "qemu-io", &args)
    };
    io(&["write -P 0x6b 1000k 300k", "write -z 7M 512k", "flush"]);
    let out = io(&["read -P 0x6b 1000k 300k", "read -P 0 7M 512k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    expected[1000 << 10..1300 << 10].fill(0x6b);
    expected[7 << 20..(7 << 20) + (512 << 10)].fill(0);
    assert_eq!(served.terminate(), 0);
    vm_serve::assert_clean_with(d, "top.qed", &expected, "after qemu-io through serve");
}

/// `qemu:allocation-depth` through `serve` on a chain four layers deep (raw <- QED <- QED <-
/// the served QED) equals `qemu-nbd -A`'s of the same chain, depths 1 to 4 (the raw base
/// counting as allocated everywhere, as QEMU counts it); a range a read copies in through
/// the export is depth 1 at once.
#[test]
fn allocation_depth_of_a_deep_chain_matches_qemu_nbd() {
    let dir = tempdir();
    let d = dir.path();
    tools::chain_fixture(
        d,
        &["write -P 1 0 1M", "write -P 1 5M 1M"],
        &["write -P 2 2M 1M", "write -z 3M 64k"],
    );
    std::fs::copy(d.join("top.qed"), d.join("ref.qed")).unwrap();
    let ref_sock = d.join("ref.sock");
    let ref_image = d.join("ref.qed");
    let args = ["-r", "-A", "-f", "qed", "-x", "exp", "--persistent", "-k"];
    let args = args.iter().map(|a| a.to_string());
    let args = args.chain([path_str(&ref_sock).into(), path_str(&ref_image).into()]);
    let reference = NbdServer::start("qemu-nbd", args, &ref_sock);
    let theirs = nbdinfo_map(d, "qemu:allocation-depth", &reference.uri());
    for depth in 1..=4 {
        assert!(
            theirs.iter().any(|e| e.2 == depth),
            "no depth {depth}: {theirs:?}"
        );
    }
    let mut served = serve(d, &[], "top.qed");
    let uri = served.uri();
    assert_eq!(nbdinfo_map(d, "qemu:allocation-depth", &uri), theirs);

    // A read copies 1 MiB at 5M (the raw base's, depth 4) into the served image: depth 1.
    tools::ok(d, "qemu-io", &["-f", "raw", "-c", "read 5M 1M", &uri]);
    let after = nbdinfo_map(d, "qemu:allocation-depth", &uri);
    assert!(after.contains(&(5 << 20, 1 << 20, 1)), "{after:?}");
    assert_eq!(served.terminate(), 0);
}
