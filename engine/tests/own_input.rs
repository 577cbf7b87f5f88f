//! Commands never destroy their own input, and read-only inspection never opens what it does
//! not need: an output that is an input (or a file of an input's backing chain) is refused
//! by device and inode, whatever the name (symlink, hard link, `..`); every option is
//! validated before a file is created or truncated; `info` reads the top image alone; `read`
//! and `map` refuse a FIFO or device backing at once instead of blocking on it.

use qedstream_tests::tools::command_in;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use qedstream_tests::tempdir;
use qedstream_tests::tools::{ok, qemu_io, run_with_deadline as run};

fn ours(dir: &Path, args: &[&str]) -> Command {
    command_in(env!("CARGO_BIN_EXE_qedstream"), dir, args)
}

/// Runs ours and asserts a one-line refusal; returns stderr.
fn refused(d: &Path, args: &[&str]) -> String {
    qedstream_tests::tools::refused(&mut ours(d, args))
}

fn succeeds(d: &Path, args: &[&str]) -> String {
    let out = run(&mut ours(d, args));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A raw base with data, a QED middle and a QED top, all with data.
fn chain(d: &Path) {
    ok(d, "qemu-img", &["create", "-f", "raw", "base.raw", "4M"]);
    qemu_io(d, "raw", "base.raw", &["write -P 0x11 0 1M"]);
    ok(
        d,
        "qemu-img",
        &[
            "create", "-f", "qed", "-b", "base.raw", "-F", "raw", "mid.qed",
        ],
    );
    qemu_io(d, "qed", "mid.qed", &["write -P 0x22 1M 64k"]);
    ok(
        d,
        "qemu-img",
        &[
            "create", "-f", "qed", "-b", "mid.qed", "-F", "qed", "top.qed",
        ],
    );
    qemu_io(d, "qed", "top.qed", &["write -P 0x33 2M 64k"]);
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink(d.join("top.qed"), d.join("top-link.qed")).unwrap();
    std::os::unix::fs::symlink(d.join("base.raw"), d.join("base-link.raw")).unwrap();
    std::fs::hard_link(d.join("mid.qed"), d.join("mid-hard.qed")).unwrap();
}

fn snapshot(d: &Path) -> Vec<(String, Vec<u8>)> {
    ["base.raw", "mid.qed", "top.qed"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(d.join(n)).unwrap()))
        .collect()
}

#[test]
fn convert_and_create_refuse_an_output_that_is_an_input() {
    let dir = tempdir();
    let d = dir.path();
    chain(d);
    let before = snapshot(d);
    for args in [
        // The source itself, by every kind of name.
        &["convert", "-O", "qed", "top.qed", "top.qed"][..],
        &["convert", "-O", "raw", "top.qed", "top.qed"],
        &["convert", "-O", "qed", "top.qed", "top-link.qed"],
        &["convert", "-O", "qed", "top.qed", "sub/../top.qed"],
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            "base.raw",
            "base-link.raw",
        ],
        // A file of the source's backing chain.
        &["convert", "-O", "raw", "top.qed", "base.raw"],
        &["convert", "-O", "raw", "top.qed", "base-link.raw"],
        &["convert", "-O", "qed", "top.qed", "mid.qed"],
        &["convert", "-O", "qed", "top.qed", "mid-hard.qed"],
        // An image named as its own backing, or over a file of the backing's chain.
        &["create", "-b", "base.raw", "-F", "raw", "base.raw"],
        &["create", "-b", "base-link.raw", "-F", "raw", "base.raw"],
        &["create", "-b", "top.qed", "-F", "qed", "top-link.qed"],
        &["create", "-b", "top.qed", "-F", "qed", "mid-hard.qed"],
        &["create", "-b", "top.qed", "-F", "qed", "base.raw"],
    ] {
        let err = refused(d, args);
        assert!(
            err.contains("same file"),
            "{args:?}: refused for another reason: {err}"
        );
    }
    assert!(snapshot(d) == before, "a refused command changed an input");
    // `write` from the image's own file.
    let err = refused(d, &["write", "top.qed", "0", "top-link.qed"]);
    assert!(err.contains("input is the image"), "{err}");
    assert!(snapshot(d) == before);
    // A fresh output still works, and QEMU agrees with it.
    succeeds(d, &["convert", "-O", "qed", "top.qed", "copy.qed"]);
    ok(d, "qemu-img", &["compare", "top.qed", "copy.qed"]);
}

#[test]
fn create_validates_everything_before_touching_the_file() {
    let dir = tempdir();
    let d = dir.path();
    chain(d);
    let before = snapshot(d);
    for args in [
        &[
            "create",
            "-o",
            "cluster_size=64K,table_size=16",
            "top.qed",
            "8E",
        ][..],
        &["create", "-o", "cluster_size=3K", "top.qed", "1M"],
        &["create", "-o", "table_size=1", "top.qed", "1M"],
        &["create", "-o", "nonsense=1", "top.qed", "1M"],
        &["create", "top.qed"],
        &["create", "-b", "missing.raw", "top.qed"],
        &["create", "-b", "base.raw", "-F", "vmdk", "top.qed"],
        &["create", "-f", "raw", "top.qed", "1M"],
    ] {
        refused(d, args);
    }
    assert!(snapshot(d) == before, "a refused create changed the file");
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path for the duration of the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

#[test]
fn inspection_opens_only_what_it_must_and_never_blocks() {
    let dir = tempdir();
    let d = dir.path();
    mkfifo(&d.join("pipe"));
    // Overlays whose backings are a FIFO, a character device, a missing file and an NBD
    // server that accepts but never answers (a listener nobody serves).
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let nbd = format!("nbd://127.0.0.1:{}/x", silent.local_addr().unwrap().port());
    for (image, backing) in [
        ("fifo.qed", "pipe"),
        ("dev.qed", "/dev/zero"),
        ("gone.qed", "missing.raw"),
        ("net.qed", nbd.as_str()),
    ] {
        ok(
            d,
            "qemu-img",
            &[
                "create", "-f", "qed", "-u", "-b", backing, "-F", "raw", image, "1M",
            ],
        );
        // info names the backing without opening it; check needs none.
        let info = succeeds(d, &["info", "--output=json", image]);
        assert!(info.contains("backing-filename"), "{image}: {info}");
        succeeds(d, &["info", image]);
        succeeds(d, &["check", image]);
        succeeds(d, &["check", "-r", "all", image]);
    }
    assert!(
        silent.accept().is_err(),
        "info or check connected to the NBD backing"
    );
    // Reading through a FIFO or a device is refused at once, never blocked on.
    for image in ["fifo.qed", "dev.qed"] {
        for args in [
            &["read", image, "0", "4k"][..],
            &["map", image],
            &["info", "--backing-chain", image],
            &["convert", image, "out.raw"],
            &["stream", image],
        ] {
            let err = refused(d, args);
            assert!(
                err.contains("FIFO") || err.contains("device"),
                "{args:?}: {err}"
            );
        }
    }
    // The same for a FIFO or a device named as the image itself.
    for args in [
        &["read", "pipe", "0", "1"][..],
        &["map", "pipe"],
        &["info", "pipe"],
        &["check", "pipe"],
        &["convert", "pipe", "o.raw"],
        &["read", "/dev/zero", "0", "1"],
        &["info", "/dev/zero"],
    ] {
        refused(d, args);
    }
}

#[test]
fn a_chain_that_loops_is_refused_on_every_path() {
    let dir = tempdir();
    let d = dir.path();
    // a.qed -> b.qed -> (a hard link to a.qed): the same file under another name.
    ok(d, "qemu-img", &["create", "-f", "qed", "a.qed", "1M"]);
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qed",
            "-u",
            "-b",
            "a-again.qed",
            "-F",
            "qed",
            "b.qed",
            "1M",
        ],
    );
    std::fs::hard_link(d.join("a.qed"), d.join("a-again.qed")).unwrap();
    ok(
        d,
        "qemu-img",
        &["rebase", "-u", "-b", "b.qed", "-F", "qed", "a.qed"],
    );
    for args in [
        &["info", "--backing-chain", "a.qed"][..],
        &["map", "a.qed"],
        &["read", "a.qed", "0", "1"],
        &["convert", "a.qed", "out.raw"],
        &["stream", "a.qed"],
        &["write", "a.qed", "0", "/dev/null"],
        &["create", "-b", "a.qed", "c.qed"],
    ] {
        let err = refused(d, args);
        assert!(err.contains("loops"), "{args:?}: {err}");
    }
    // Plain info names the backing without following it.
    succeeds(d, &["info", "a.qed"]);
}
