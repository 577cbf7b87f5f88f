//! qcow2 bases in the backing chain, graded by QEMU: for qcow2 images made by `qemu-img`
//! (zlib-compressed v3, v2, qcow2 over raw with zero clusters, an external data file) under
//! QED overlays made by `qedstream create -F qcow2`, our `convert` gives `qemu-img convert`'s
//! bytes, our `map` is qemu-img's line for line, `info --backing-chain` names the qcow2 layer,
//! `create -F qcow2` and `rebase -u -F qcow2` write the bytes qemu-img writes, a stream from
//! a compressed base ends standalone and `qemu-img compare`-equal, `serve` of an overlay on
//! qcow2 is read by qemu-img over NBD; encrypted, zstd and L1-too-small images are refused
//! naming the cause; a mutated header claiming 4 TiB is converted without walking its holes;
//! the gate's depth bound, loop check and "never probe a recorded raw" hold below qcow2.

use std::path::Path;
use std::process::Command;

use qedstream_tests::served::Served;
use qedstream_tests::tempdir;
use qedstream_tests::tools::{command_in, ok, qemu_io, refused, run_with_deadline};
use serde_json::Value;

fn ours(dir: &Path, args: &[&str]) -> Command {
    command_in(env!("CARGO_BIN_EXE_qedstream"), dir, args)
}

/// Runs one of our commands with a hang guard and asserts success; returns stdout.
#[track_caller]
fn ours_ok(dir: &Path, args: &[&str]) -> String {
    let out = run_with_deadline(&mut ours(dir, args));
    assert!(
        out.status.success(),
        "qedstream {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs one of our commands with a hang guard and asserts it fails; returns stderr.
#[track_caller]
fn ours_refused(dir: &Path, args: &[&str]) -> String {
    let out = run_with_deadline(&mut ours(dir, args));
    assert!(!out.status.success(), "qedstream {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The qcow2 bases, each with a QED overlay `NAME.qed` made by `qedstream create -F qcow2`
/// and written by qemu-io at 2M.
const BASES: [&str; 4] = ["comp.qcow2", "v2.qcow2", "over.qcow2", "ext.qcow2"];

/// `base.raw` (8 MiB: data, a zero run, a hole) and the qcow2 images of [`BASES`].
fn fixture(dir: &Path) {
    ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "8M"],
    );
    qemu_io(
        dir,
        "raw",
        "base.raw",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x00 1M 64k",
            "write -P 0x22 3M 512k",
            "write -P 0x23 7M 4k",
        ],
    );
    let convert = |extra: &[&str], out: &str| {
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend(extra);
        args.extend(["base.raw", out]);
        ok(dir, "qemu-img", &args);
    };
    convert(&["-c"], "comp.qcow2");
    convert(&["-o", "compat=0.10"], "v2.qcow2");
    ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "over.qcow2",
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "over.qcow2",
        &[
            "write -P 0x44 64k 64k",
            "write -z 512k 128k",
            "write -P 0x55 5M 100k",
        ],
    );
    ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=ext.data",
            "ext.qcow2",
            "8M",
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "ext.qcow2",
        &["write -P 0x66 0 256k", "write -P 0x67 6M 64k"],
    );
    for base in BASES {
        let top = format!("{base}.qed");
        ours_ok(dir, &["create", "-b", base, "-F", "qcow2", &top]);
        qemu_io(dir, "qed", &top, &["write -P 0x77 2M 64k"]);
    }
}

/// `qemu-img convert -O raw` of `image`, and ours, as bytes.
fn converted(dir: &Path, image: &str, format: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let (theirs, mine) = (format!("{image}.qemu.raw"), format!("{image}.ours.raw"));
    ok(dir, "qemu-img", &["convert", "-O", "raw", image, &theirs]);
    let mut args = vec!["convert"];
    if let Some(f) = format {
        args.extend(["-f", f]);
    }
    args.extend([image, mine.as_str()]);
    ours_ok(dir, &args);
    let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
    (read(&theirs), read(&mine))
}

#[test]
fn convert_gives_qemu_img_converts_bytes() {
    let dir = tempdir();
    fixture(dir.path());
    for base in BASES {
        let (theirs, mine) = converted(dir.path(), base, Some("qcow2"));
        assert!(
            theirs == mine,
            "convert -f qcow2 {base} differs from qemu-img's"
        );
        let top = format!("{base}.qed");
        let (theirs, mine) = converted(dir.path(), &top, None);
        assert!(theirs == mine, "convert {top} differs from qemu-img's");
    }
    // Something real was compared: the compressed base's data, the overlay's write.
    let (theirs, _) = converted(dir.path(), "comp.qcow2.qed", None);
    assert!(theirs[..1 << 20].iter().all(|&b| b == 0x11));
    assert!(theirs[2 << 20..(2 << 20) + 65536]
        .iter()
        .all(|&b| b == 0x77));
}

#[test]
fn map_is_qemu_imgs_for_qed_over_qcow2() {
    let dir = tempdir();
    fixture(dir.path());
    for image in BASES
        .iter()
        .map(|b| format!("{b}.qed"))
        .chain(["comp.qcow2".to_string(), "over.qcow2".to_string()])
    {
        let theirs = ok(dir.path(), "qemu-img", &["map", "--output=json", &image]);
        let mine = ours_ok(dir.path(), &["map", "--output=json", &image]);
        assert_eq!(mine, theirs, "map of {image}");
    }
    // The compressed clusters are reported as such.
    let mine = ours_ok(dir.path(), &["map", "--output=json", "comp.qcow2.qed"]);
    assert!(mine.contains("\"compressed\": true"), "{mine}");
}

#[test]
fn info_names_the_qcow2_layer_in_the_chain() {
    let dir = tempdir();
    fixture(dir.path());
    let info = |program: &str| -> Value {
        let args = ["info", "--backing-chain", "--output=json", "over.qcow2.qed"];
        let out = if program == "qemu-img" {
            ok(dir.path(), program, &args)
        } else {
            ours_ok(dir.path(), &args)
        };
        serde_json::from_str(&out).unwrap()
    };
    let (theirs, mine) = (info("qemu-img"), info("ours"));
    assert_eq!(mine.as_array().unwrap().len(), 3, "{mine:#}");
    for (layer, keys) in [
        (0, &["format", "virtual-size", "backing-filename"][..]),
        (
            1,
            &[
                "format",
                "virtual-size",
                "cluster-size",
                "backing-filename",
                "backing-filename-format",
            ][..],
        ),
        (2, &["format", "virtual-size"][..]),
    ] {
        for key in keys {
            assert_eq!(mine[layer][key], theirs[layer][key], "layer {layer} {key}");
        }
    }
    assert_eq!(mine[1]["format"], "qcow2");
    assert_eq!(
        mine[1]["format-specific"]["data"]["compat"],
        theirs[1]["format-specific"]["data"]["compat"]
    );
}

#[test]
fn create_and_rebase_onto_qcow2_write_qemu_imgs_bytes() {
    let dir = tempdir();
    fixture(dir.path());
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-b",
            "comp.qcow2",
            "-F",
            "qcow2",
            "q.qed",
        ],
    );
    ours_ok(d, &["create", "-b", "comp.qcow2", "-F", "qcow2", "o.qed"]);
    let read = |n: &str| std::fs::read(d.join(n)).unwrap();
    assert!(read("q.qed") == read("o.qed"), "create -F qcow2 differs");
    // -F qcow2 is checked: a raw file is not a qcow2 image.
    let e = ours_refused(d, &["create", "-b", "base.raw", "-F", "qcow2", "bad.qed"]);
    assert!(e.contains("qcow2"), "{e}");
    // rebase -u onto a qcow2 clears the raw flag, as qemu-img's does.
    for (tool, image) in [("qemu-img", "rq.qed"), ("ours", "ro.qed")] {
        ok(
            d,
            "qemu-img",
            &[
                "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", image,
            ],
        );
        let args = ["rebase", "-u", "-b", "comp.qcow2", "-F", "qcow2", image];
        if tool == "qemu-img" {
            ok(d, tool, &args);
        } else {
            ours_ok(d, &args);
        }
    }
    assert!(
        read("rq.qed") == read("ro.qed"),
        "rebase -u -F qcow2 differs"
    );
    let info = ok(d, "qemu-img", &["info", "--output=json", "ro.qed"]);
    assert!(!info.contains("backing-filename-format"), "{info}");
}

#[test]
fn a_stream_from_a_compressed_base_ends_standalone_and_equal() {
    let dir = tempdir();
    fixture(dir.path());
    let d = dir.path();
    ours_ok(d, &["create", "-b", "comp.qcow2", "-F", "qcow2", "s.qed"]);
    let out = ours_ok(d, &["stream", "--output=json", "s.qed"]);
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "completed", "{out}");
    let info = ok(d, "qemu-img", &["info", "--output=json", "s.qed"]);
    assert!(!info.contains("backing-filename"), "still linked: {info}");
    ok(d, "qemu-img", &["check", "s.qed"]);
    ok(
        d,
        "qemu-img",
        &["compare", "-f", "qed", "-F", "qcow2", "s.qed", "comp.qcow2"],
    );
}

#[test]
fn serve_of_an_overlay_on_qcow2_is_read_by_qemu() {
    let dir = tempdir();
    fixture(dir.path());
    let d = dir.path();
    let sock = d.join("nbd.sock");
    let mut served = Served::start(
        env!("CARGO_BIN_EXE_qedstream").as_ref(),
        d,
        &["--nbd", sock.to_str().unwrap(), "over.qcow2.qed"],
    );
    let uri = served.uri();
    ok(
        d,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, "served.raw"],
    );
    qemu_io(
        d,
        "raw",
        &uri,
        &["read -P 0x44 64k 64k", "read -P 0 512k 128k"],
    );
    assert_eq!(served.terminate(), 0);
    ok(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "over.qcow2.qed", "ref.raw"],
    );
    let read = |n: &str| std::fs::read(d.join(n)).unwrap();
    assert!(read("served.raw") == read("ref.raw"), "served bytes differ");
}

#[test]
fn encrypted_and_zstd_images_are_refused_naming_the_cause() {
    let dir = tempdir();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=password",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "enc.qcow2",
            "4M",
        ],
    );
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-u",
            "-b",
            "enc.qcow2",
            "-F",
            "qcow2",
            "enc.qed",
            "4M",
        ],
    );
    for args in [
        &["read", "enc.qed", "0", "512"][..],
        &["convert", "enc.qed", "x.raw"][..],
        &["convert", "-f", "qcow2", "enc.qcow2", "y.raw"][..],
        &["stream", "enc.qed"][..],
    ] {
        let e = refused(&mut ours(d, args));
        assert!(e.contains("encrypted"), "{args:?}: {e}");
    }
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "z.qcow2",
            "4M",
        ],
    );
    ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-b", "z.qcow2", "-F", "qcow2", "z.qed",
        ],
    );
    for args in [
        &["convert", "z.qed", "z.raw"][..],
        &["stream", "z.qed"][..],
        &["map", "z.qed"][..],
    ] {
        let e = refused(&mut ours(d, args));
        assert!(e.contains("zstd"), "{args:?}: {e}");
    }
}

/// Big-endian `value` at `offset` of `path`.
fn poke_be(path: &Path, offset: u64, value: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(value, offset).unwrap();
}

#[test]
fn a_header_claiming_a_huge_size_is_refused_or_skipped_not_walked() {
    let dir = tempdir();
    fixture(dir.path());
    let d = dir.path();
    // 4 TiB with the L1 table it needs (8192 entries of 512 MiB, 64 KiB of table): the old
    // table copied to the end of the file, zeros after it. QEMU opens it; so must we, and a
    // conversion must skip the holes by the tables.
    std::fs::copy(d.join("comp.qcow2"), d.join("huge.qcow2")).unwrap();
    let path = d.join("huge.qcow2");
    let bytes = std::fs::read(&path).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    let (l1_offset, l1_entries) = (be64(40) as usize, be32(36) as usize);
    let l1 = bytes[l1_offset..l1_offset + l1_entries * 8].to_vec();
    let new_l1 = (bytes.len() as u64).div_ceil(65536) * 65536;
    poke_be(&path, new_l1, &l1);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(new_l1 + 65536).unwrap();
    poke_be(&path, 24, &(4u64 << 40).to_be_bytes());
    poke_be(&path, 36, &8192u32.to_be_bytes());
    poke_be(&path, 40, &new_l1.to_be_bytes());
    let theirs = ok(d, "qemu-img", &["map", "--output=json", "huge.qcow2"]);
    assert_eq!(ours_ok(d, &["map", "--output=json", "huge.qcow2"]), theirs);
    ours_ok(d, &["convert", "-O", "qed", "huge.qcow2", "huge.qed"]);
    let head = ours_ok(d, &["read", "huge.qed", "0", "4096"]);
    assert!(head.bytes().all(|b| b == 0x11));
    let info: Value =
        serde_json::from_str(&ok(d, "qemu-img", &["info", "--output=json", "huge.qed"])).unwrap();
    assert_eq!(info["virtual-size"], 4u64 << 40);
    let map = ok(d, "qemu-img", &["map", "--output=json", "huge.qed"]);
    assert!(map.lines().count() < 10, "holes were stored: {map}");
    // The same size with the old, small L1 table is refused (QEMU: "L1 table is too small").
    std::fs::copy(d.join("comp.qcow2"), d.join("small-l1.qcow2")).unwrap();
    poke_be(&d.join("small-l1.qcow2"), 24, &(4u64 << 40).to_be_bytes());
    let e = refused(&mut ours(
        d,
        &["convert", "-f", "qcow2", "small-l1.qcow2", "s.raw"],
    ));
    assert!(e.contains("L1 table"), "{e}");
    assert!(!d.join("s.raw").exists() || std::fs::metadata(d.join("s.raw")).unwrap().len() == 0);
}

#[test]
fn the_gate_bounds_depth_refuses_loops_and_never_probes_a_recorded_raw() {
    let dir = tempdir();
    fixture(dir.path());
    let d = dir.path();
    // over.qcow2.qed -> over.qcow2 -> base.raw: three layers, two below the top.
    let e = refused(&mut ours(
        d,
        &["map", "--max-chain-depth", "1", "over.qcow2.qed"],
    ));
    assert!(e.contains("deeper than 1"), "{e}");
    ours_ok(d, &["map", "--max-chain-depth", "2", "over.qcow2.qed"]);
    // Two qcow2 images naming each other are a loop.
    for (image, backing) in [("a.qcow2", "b.qcow2"), ("b.qcow2", "a.qcow2")] {
        ok(
            d,
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", image, "4M",
            ],
        );
    }
    ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-b", "a.qcow2", "-F", "qcow2", "-u", "loop.qed", "4M",
        ],
    );
    let e = refused(&mut ours(d, &["read", "loop.qed", "0", "512"]));
    assert!(e.contains("loops"), "{e}");
    // A raw backing recorded as raw that starts with a qcow2 header is read as raw.
    std::fs::copy(d.join("comp.qcow2"), d.join("looks.raw")).unwrap();
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "looks.raw",
            "-F",
            "raw",
            "r.qcow2",
        ],
    );
    let (theirs, mine) = converted(d, "r.qcow2", None);
    assert!(theirs == mine, "a recorded raw backing was not read as raw");
    assert_eq!(&mine[..4], b"QFI\xfb");
}
