//! `qedstream convert -O qed` against `qemu-img convert -O qed` as the oracle: over holes,
//! data extents that hold zeros, a cluster whose first bytes are zero, a partial last
//! cluster, and a QED overlay whose zero cluster hides its raw backing's data, our output
//! reads the same as the source and as QEMU's output (`qemu-img compare`), `qemu-img check`
//! finds it clean, and it stores data in exactly the guest ranges QEMU's output does (zero
//! clusters are never stored). Through the library, the data goes past the page cache
//! (`O_DIRECT`) and the stats say so.

use std::path::Path;

use engine::convert::{convert, Target};
use engine::source::Source;
use qedstream_tests::tempdir;
use qedstream_tests::tools::{command_in, ok, qemu_io, raw_fixture, run};
use serde_json::Value;

/// 12 MiB + 4.5 KiB (a partial last cluster), as a sparse raw file.
const RAW_SIZE: u64 = (12 << 20) + 4608;

/// A raw source: data, holes, an extent of written zeros, a cluster whose first 64 bytes are
/// zero and the rest data, and data in the partial last cluster.
fn raw_source(dir: &Path) {
    let size = RAW_SIZE.to_string();
    ok(dir, "qemu-img", &["create", "-f", "raw", "src.raw", &size]);
    qemu_io(
        dir,
        "raw",
        "src.raw",
        &[
            "write -P 0x11 0 1M",
            "write -P 0 1M 128k",
            "write -P 0x55 3145792 100",
            "write -P 0x22 5M 3M",
            "write -P 0x66 12M 4608",
        ],
    );
}

/// The guest ranges an image stores as data (merged, whatever the file offsets).
fn data_ranges(dir: &Path, image: &str) -> Vec<(u64, u64)> {
    let map: Vec<Value> =
        serde_json::from_str(&ok(dir, "qemu-img", &["map", "--output=json", image])).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map.iter().filter(|e| e["data"] == true) {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 += len,
            _ => out.push((start, start + len)),
        }
    }
    out
}

/// Converts `src` (`format`) with both tools and checks ours against QEMU's.
fn check_against_qemu(dir: &Path, src: &str, format: &str, options: &[&str]) {
    let mut theirs = vec!["convert", "-f", format, "-O", "qed"];
    theirs.extend(options);
    theirs.extend([src, "theirs.qed"]);
    ok(dir, "qemu-img", &theirs);
    let mut ours = vec!["convert", "-f", format, "-O", "qed"];
    ours.extend(options);
    ours.extend([src, "ours.qed"]);
    let out = command_in(env!("CARGO_BIN_EXE_qedstream"), dir, &ours)
        .output()
        .expect("running qedstream");
    assert!(
        out.status.success(),
        "qedstream convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let what = format!("{src} {options:?}");
    for (a, fa, b, fb) in [
        (src, format, "ours.qed", "qed"),
        ("theirs.qed", "qed", "ours.qed", "qed"),
    ] {
        let cmp = run(dir, "qemu-img", &["compare", "-f", fa, "-F", fb, a, b]);
        assert_eq!(
            cmp.status.code(),
            Some(0),
            "{what}: qemu-img compare {a} {b}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
    let check = run(dir, "qemu-img", &["check", "ours.qed"]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{what}: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert_eq!(
        data_ranges(dir, "ours.qed"),
        data_ranges(dir, "theirs.qed"),
        "{what}: data stored in other guest ranges than QEMU's"
    );
    for f in ["ours.qed", "theirs.qed"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
}

#[test]
fn raw_source_converts_as_qemu_img_does() {
    let dir = tempdir();
    let d = dir.path();
    raw_source(d);
    check_against_qemu(d, "src.raw", "raw", &[]);
    check_against_qemu(d, "src.raw", "raw", &["-o", "cluster_size=4096"]);
}

#[test]
fn qed_overlay_over_raw_backing_converts_as_qemu_img_does() {
    let dir = tempdir();
    let d = dir.path();
    raw_fixture(d);
    check_against_qemu(d, "top.qed", "qed", &[]);
}

#[test]
fn library_convert_writes_data_past_the_page_cache() {
    let dir = tempdir();
    let d = dir.path();
    raw_source(d);
    let source = Source::open(&d.join("src.raw"), Some("raw")).unwrap();
    let target = Target::Qed {
        cluster_size: 65536,
        table_size: 4,
    };
    let stats = convert(&source, &d.join("out.qed"), &target).unwrap();
    // Clusters 0..16 (1 MiB of 0x11), the cluster at 3M, 48 clusters at 5M..8M, and the
    // partial last cluster; the 128 KiB of written zeros are not stored.
    let expected = (16 + 1 + 48) * 65536 + 4608;
    assert_eq!(stats.data_bytes, expected);
    // Every whole data cluster went direct; the partial last one (4608 bytes of the disk in a
    // cluster of the file) is written through the page cache.
    // (A table may go direct too, when its buffer happens to be page-aligned.)
    assert!(
        stats.direct_bytes >= expected - 4608,
        "{} bytes went direct: O_DIRECT was not used (is the temporary directory on a file system without it?)",
        stats.direct_bytes
    );
    let cmp = run(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qed", "src.raw", "out.qed"],
    );
    assert_eq!(cmp.status.code(), Some(0));
    assert_eq!(
        run(d, "qemu-img", &["check", "out.qed"]).status.code(),
        Some(0)
    );
}
