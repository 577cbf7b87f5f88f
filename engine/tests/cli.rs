//! The `qedstream` command against `qemu-img` and `qemu-io` as the oracle: the same map, the
//! same info keys, the same check verdicts, identical fresh images, and data that round-trips.

use qedstream_tests::tools::command_in;
use std::path::Path;
use std::process::Command;

use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::tempdir;
use qedstream_tests::tools::{
    create_overlay, ok_command as ok, qemu_io, raw_overlay_fixture, run_command as run,
};
use serde_json::Value;

fn qemu_img(dir: &Path, args: &[&str]) -> Command {
    command_in("qemu-img", dir, args)
}

fn ours(dir: &Path, args: &[&str]) -> Command {
    command_in(env!("CARGO_BIN_EXE_qedstream"), dir, args)
}

/// A raw base with data and holes, a QED image over it with data, partial writes and a zero
/// cluster, and a QED chain three deep.
fn fixture(dir: &Path) {
    raw_overlay_fixture(
        dir,
        "4M",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 2M 1M",
            "write -P 0x33 3M 100k",
        ],
        "8M",
    );
    ok(&mut qemu_img(dir, &["create", "-f", "qed", "b1.qed", "8M"]));
    qemu_io(
        dir,
        "qed",
        "b1.qed",
        &[
            "write -P 1 0 64k",
            "write -z 128k 64k",
            "write -P 5 1M 200k",
        ],
    );
    create_overlay(dir, "b1.qed", "qed", "b2.qed", Some("6M"));
    qemu_io(
        dir,
        "qed",
        "b2.qed",
        &["write -P 2 64k 64k", "write -z 1M 64k"],
    );
    create_overlay(dir, "b2.qed", "qed", "t.qed", Some("12M"));
    qemu_io(
        dir,
        "qed",
        "t.qed",
        &["write -P 3 256k 64k", "write -P 4 7M 10k"],
    );
}

#[test]
fn map_is_identical_to_qemu_img_map() {
    let dir = tempdir();
    let d = dir.path();
    fixture(d);
    for image in ["top.qed", "t.qed", "b2.qed", "b1.qed"] {
        let theirs = ok(&mut qemu_img(d, &["map", "--output=json", image]));
        let mine = ok(&mut ours(d, &["map", "--output=json", image]));
        assert_eq!(mine, theirs, "map of {image}");
    }
}

#[test]
fn info_agrees_with_qemu_img_info() {
    let dir = tempdir();
    let d = dir.path();
    fixture(d);
    for image in ["top.qed", "t.qed"] {
        let theirs: Value =
            serde_json::from_str(&ok(&mut qemu_img(d, &["info", "--output=json", image]))).unwrap();
        let mine: Value =
            serde_json::from_str(&ok(&mut ours(d, &["info", "--output=json", image]))).unwrap();
        for key in [
            "filename",
            "format",
            "virtual-size",
            "actual-size",
            "cluster-size",
            "dirty-flag",
            "backing-filename",
            "backing-filename-format",
        ] {
            assert_eq!(mine.get(key), theirs.get(key), "{image}: key {key}");
        }
    }
    // Plain info shows the top image alone; --backing-chain lists every layer, top first,
    // with the keys qemu-img gives each.
    let theirs: Value = serde_json::from_str(&ok(&mut qemu_img(
        d,
        &["info", "--backing-chain", "--output=json", "t.qed"],
    )))
    .unwrap();
    let mine: Value = serde_json::from_str(&ok(&mut ours(
        d,
        &["info", "--backing-chain", "--output=json", "t.qed"],
    )))
    .unwrap();
    let (theirs, mine) = (theirs.as_array().unwrap(), mine.as_array().unwrap());
    assert_eq!(mine.len(), 3);
    assert_eq!(mine.len(), theirs.len());
    for (m, t) in mine.iter().zip(theirs) {
        for key in [
            "filename",
            "format",
            "virtual-size",
            "backing-filename",
            "full-backing-filename",
        ] {
            assert_eq!(m.get(key), t.get(key), "layer {}: key {key}", t["filename"]);
        }
    }
    let top: Value =
        serde_json::from_str(&ok(&mut ours(d, &["info", "--output=json", "t.qed"]))).unwrap();
    assert!(top.get("backing-image").is_none());
    assert_eq!(top["full-backing-filename"], "b2.qed");
}

#[test]
fn read_matches_qemu_img_convert() {
    let dir = tempdir();
    let d = dir.path();
    fixture(d);
    for image in ["top.qed", "t.qed"] {
        ok(&mut qemu_img(
            d,
            &["convert", "-O", "raw", image, "expect.raw"],
        ));
        let expect = std::fs::read(d.join("expect.raw")).unwrap();
        let size = expect.len().to_string();
        let out = run(&mut ours(d, &["read", image, "0", &size]));
        assert!(out.status.success());
        assert!(
            out.stdout == expect,
            "read of {image} differs from qemu-img convert"
        );
        // An unaligned window.
        let out = run(&mut ours(d, &["read", image, "1000", "70000"]));
        assert!(out.stdout[..] == expect[1000..71000]);
    }
}

#[test]
fn create_is_byte_identical_to_qemu_img_create() {
    let dir = tempdir();
    let d = dir.path();
    ok(&mut qemu_img(d, &["create", "-f", "raw", "base.raw", "3M"]));
    let cases: &[&[&str]] = &[
        &["8M"],
        &["-o", "cluster_size=4096,table_size=2", "1G"],
        &["-o", "cluster_size=1M,table_size=16", "100M"],
        &["-o", "cluster_size=4M,table_size=2", "1000000"],
        &["-b", "base.raw", "-F", "raw"],
        &[
            "-b",
            "base.raw",
            "-F",
            "raw",
            "-o",
            "cluster_size=4096",
            "5M",
        ],
    ];
    for (i, args) in cases.iter().enumerate() {
        let a = format!("ours{i}.qed");
        let b = format!("theirs{i}.qed");
        let (opts, size): (Vec<&str>, Vec<&str>) = {
            let mut v: Vec<&str> = args.to_vec();
            let size = if v
                .last()
                .is_some_and(|s| s.chars().next().unwrap().is_ascii_digit())
            {
                vec![v.pop().unwrap()]
            } else {
                vec![]
            };
            (v, size)
        };
        let mut mine = vec!["create"];
        mine.extend(&opts);
        mine.push(&a);
        mine.extend(&size);
        ok(&mut ours(d, &mine));
        let mut theirs = vec!["create", "-f", "qed"];
        theirs.extend(&opts);
        theirs.push(&b);
        theirs.extend(&size);
        ok(&mut qemu_img(d, &theirs));
        let x = std::fs::read(d.join(&a)).unwrap();
        let y = std::fs::read(d.join(&b)).unwrap();
        assert!(x == y, "create {args:?} differs from qemu-img's");
    }
}

#[test]
fn create_refuses_what_qemu_cannot_open() {
    let dir = tempdir();
    let d = dir.path();
    for opts in [
        "table_size=1",
        "cluster_size=4M,table_size=4",
        "cluster_size=2M,table_size=16",
        "cluster_size=3000",
    ] {
        let out = run(&mut ours(d, &["create", "-o", opts, "x.qed", "1M"]));
        assert!(!out.status.success(), "{opts} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line of error: {err}");
        assert!(err.starts_with("qedstream: "), "{err}");
    }
    let long = "x".repeat(4040);
    let out = run(&mut ours(
        d,
        &[
            "create",
            "-o",
            "cluster_size=4096",
            "-b",
            &long,
            "-F",
            "raw",
            "x.qed",
            "1M",
        ],
    ));
    assert!(!out.status.success());
}

#[test]
fn writes_pass_qemu_check_and_read_back_in_qemu() {
    let dir = tempdir();
    let d = dir.path();
    ok(&mut qemu_img(d, &["create", "-f", "raw", "base.raw", "3M"]));
    qemu_io(d, "raw", "base.raw", &["write -P 0x5a 0 3M"]);
    ok(&mut ours(
        d,
        &["create", "-b", "base.raw", "-F", "raw", "w.qed", "5M"],
    ));
    let payload: Vec<u8> = (0..150_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(d.join("payload"), &payload).unwrap();
    ok(&mut ours(d, &["write", "w.qed", "70001", "payload"]));
    ok(&mut ours(d, &["write", "--zero", "128K", "w.qed", "1M"]));
    ok(&mut ours(d, &["write", "--zero", "1000", "w.qed", "2M"]));
    ok(&mut ours(d, &["write", "w.qed", "4M", "payload"]));
    let out = run(&mut qemu_img(d, &["check", "w.qed"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The model: base, then the writes.
    let mut model = vec![0x5au8; 3 << 20];
    model.resize(5 << 20, 0);
    model[70001..70001 + payload.len()].copy_from_slice(&payload);
    model[1 << 20..(1 << 20) + (128 << 10)].fill(0);
    model[2 << 20..(2 << 20) + 1000].fill(0);
    model[4 << 20..(4 << 20) + payload.len()].copy_from_slice(&payload);
    ok(&mut qemu_img(
        d,
        &["convert", "-O", "raw", "w.qed", "got.raw"],
    ));
    assert!(std::fs::read(d.join("got.raw")).unwrap() == model);
}

fn check_json(d: &Path, tool: &str, image: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["check", "--output=json"];
    args.extend(extra);
    args.push(image);
    let out = if tool == "qemu-img" {
        run(&mut qemu_img(d, &args))
    } else {
        run(&mut ours(d, &args))
    };
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

fn poke(path: &Path, offset: u64, value: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_le_bytes(), offset).unwrap();
}

#[test]
fn check_agrees_with_qemu_img_on_damaged_images() {
    let dir = tempdir();
    let d = dir.path();
    // x.qed: data at 0x50000, L2 at 0x60000 (qed-format.md §8 D).
    let fresh = |name: &str| {
        ok(&mut qemu_img(d, &["create", "-f", "qed", name, "64M"]));
        qemu_io(
            d,
            "qed",
            name,
            &["write -P 0x33 0 64k", "write -P 0x44 64k 64k"],
        );
    };
    type Damage = fn(&Path);
    let cases: &[(&str, Damage)] = &[
        ("clean", |_| {}),
        ("past-eof", |p| poke(p, 0x70010, 0x100_0000)),
        ("duplicate", |p| poke(p, 0x70010, 0x50000)),
        ("unaligned", |p| poke(p, 0x70010, 0x50800)),
        ("into-header", |p| poke(p, 0x70010, 0)),
        ("l1-over-data", |p| poke(p, 0x10000 + 8, 0x50000)),
        ("leak", |p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len + 65536).unwrap();
        }),
    ];
    for (name, damage) in cases {
        let image = format!("{name}.qed");
        fresh(&image);
        damage(&d.join(&image));
        let (rc_q, q) = check_json(d, "qemu-img", &image, &[]);
        let (rc_o, o) = check_json(d, "ours", &image, &[]);
        assert_eq!(rc_o, rc_q, "{name}: exit code; qemu {q} ours {o}");
        for key in [
            "total-clusters",
            "allocated-clusters",
            "fragmented-clusters",
            "leaks",
            "corruptions",
            "check-errors",
        ] {
            assert_eq!(o.get(key), q.get(key), "{name}: {key}; qemu {q} ours {o}");
        }
        // Repair a copy with each tool; the verdicts after repair agree, except that we
        // reclaim leaks at the end of the file where QEMU cannot.
        std::fs::copy(d.join(&image), d.join("theirs-fixed.qed")).unwrap();
        std::fs::copy(d.join(&image), d.join("ours-fixed.qed")).unwrap();
        let (rc_q, _) = check_json(d, "qemu-img", "theirs-fixed.qed", &["-r", "all"]);
        let (rc_o, _) = check_json(d, "ours", "ours-fixed.qed", &["-r", "all"]);
        if *name == "leak" {
            assert_eq!((rc_q, rc_o), (3, 0), "{name}: we reclaim the trailing leak");
        } else {
            assert_eq!(rc_o, rc_q, "{name}: exit code after -r all");
        }
        // And QEMU agrees with what we left.
        let (rc_after, _) = check_json(d, "qemu-img", "ours-fixed.qed", &[]);
        assert_eq!(
            rc_after, rc_o,
            "{name}: qemu-img check of our repaired image"
        );
    }
}

#[test]
fn unknown_features_are_a_clear_error() {
    let dir = tempdir();
    let d = dir.path();
    ok(&mut qemu_img(d, &["create", "-f", "qed", "f.qed", "1M"]));
    poke(&d.join("f.qed"), 16, 8);
    let out = run(&mut ours(d, &["check", "f.qed"]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsupported QED features: 0x8"), "{err}");
    let out = run(&mut ours(d, &["info", "f.qed"]));
    assert!(!out.status.success());
}

#[test]
fn convert_to_raw_and_qed_matches_the_chain() {
    let dir = tempdir();
    let d = dir.path();
    fixture(d);
    ok(&mut qemu_img(
        d,
        &["convert", "-O", "raw", "t.qed", "expect.raw"],
    ));
    ok(&mut ours(d, &["convert", "-O", "raw", "t.qed", "out.raw"]));
    assert!(
        std::fs::read(d.join("out.raw")).unwrap() == std::fs::read(d.join("expect.raw")).unwrap()
    );
    ok(&mut ours(
        d,
        &[
            "convert",
            "-O",
            "qed",
            "-o",
            "cluster_size=4096",
            "t.qed",
            "out.qed",
        ],
    ));
    let out = run(&mut qemu_img(
        d,
        &["compare", "-f", "qed", "-F", "raw", "out.qed", "expect.raw"],
    ));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        run(&mut qemu_img(d, &["check", "out.qed"])).status.code(),
        Some(0)
    );
    // Zero data is never stored: the data written is what the chain really holds.
    let map: Vec<Value> =
        serde_json::from_str(&ok(&mut qemu_img(d, &["map", "--output=json", "out.qed"]))).unwrap();
    let data: u64 = map
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    let expect = std::fs::read(d.join("expect.raw")).unwrap();
    let nonzero_blocks = expect
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;
    assert_eq!(data, nonzero_blocks * 4096);
}

#[test]
fn resize_and_rebase_match_qemu() {
    let dir = tempdir();
    let d = dir.path();
    fixture(d);
    std::fs::copy(d.join("top.qed"), d.join("ours.qed")).unwrap();
    std::fs::copy(d.join("top.qed"), d.join("theirs.qed")).unwrap();
    ok(&mut ours(d, &["resize", "ours.qed", "+4M"]));
    ok(&mut qemu_img(
        d,
        &["resize", "-f", "qed", "theirs.qed", "+4M"],
    ));
    assert!(
        std::fs::read(d.join("ours.qed")).unwrap() == std::fs::read(d.join("theirs.qed")).unwrap()
    );
    let out = run(&mut ours(d, &["resize", "ours.qed", "1M"]));
    assert!(!out.status.success(), "shrinking must be refused");
    ok(&mut ours(d, &["rebase", "-u", "-b", "", "ours.qed"]));
    ok(&mut qemu_img(
        d,
        &["rebase", "-u", "-f", "qed", "-b", "", "theirs.qed"],
    ));
    assert!(
        std::fs::read(d.join("ours.qed")).unwrap() == std::fs::read(d.join("theirs.qed")).unwrap()
    );
}

#[test]
fn errors_are_one_line_and_non_zero() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::write(
        d.join("junk"),
        b"not an image at all, just bytes......................................",
    )
    .unwrap();
    let cases: &[&[&str]] = &[
        &["info", "missing.qed"],
        &["check", "junk"],
        &["read", "junk", "0", "1G"],
        &["write", "missing.qed", "0", "/dev/null"],
        &["create", "x.qed"],
        &["create", "x.qed", "12Q"],
        &["map", "missing.qed"],
    ];
    for args in cases {
        let out = run(&mut ours(d, args));
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

/// qemu-nbd serving `image` (raw, read-only) in `dir` as export `exp` on `sock`.
fn qemu_nbd(dir: &Path, image: &str, sock: &Path) -> NbdServer {
    let mut args = vec![
        "-r".into(),
        "-f".into(),
        "raw".into(),
        "-x".into(),
        "exp".into(),
        "--persistent".into(),
        "-k".into(),
        sock.as_os_str().to_owned(),
    ];
    args.push(dir.join(image).into_os_string());
    NbdServer::start("qemu-nbd", args, sock)
}

/// nbdkit with plugin arguments `args` on `sock`.
fn nbdkit(sock: &Path, args: &[&str]) -> NbdServer {
    let mut all = vec!["-f".into(), "-U".into(), sock.as_os_str().to_owned()];
    all.extend(args.iter().map(Into::into));
    NbdServer::start::<std::ffi::OsString>("nbdkit", all, sock)
}

#[test]
fn convert_and_info_take_an_nbd_uri_from_qemu_nbd() {
    let dir = tempdir();
    let d = dir.path();
    fixture(d);
    let sock = d.join("nbd.sock");
    let _server = qemu_nbd(d, "base.raw", &sock);
    let uri = format!("nbd+unix:///exp?socket={}", sock.display());
    ok(&mut ours(
        d,
        &["convert", "-f", "raw", "-O", "raw", &uri, "out.raw"],
    ));
    assert!(
        std::fs::read(d.join("out.raw")).unwrap() == std::fs::read(d.join("base.raw")).unwrap()
    );
    let info: Value =
        serde_json::from_str(&ok(&mut ours(d, &["info", "--output=json", &uri]))).unwrap();
    assert_eq!(info["virtual-size"], 4 << 20);
    assert_eq!(info["format"], "raw");
    // A QED overlay on the export: map, info and convert agree with QEMU.
    ok(&mut ours(
        d,
        &["create", "-b", &uri, "-F", "raw", "nb.qed", "8M"],
    ));
    qemu_io(
        d,
        "qed",
        "nb.qed",
        &["write -P 9 64k 64k", "write -z 1M 64k"],
    );
    let theirs = ok(&mut qemu_img(d, &["map", "--output=json", "nb.qed"]));
    let mine = ok(&mut ours(d, &["map", "--output=json", "nb.qed"]));
    assert_eq!(mine, theirs);
    let info: Value =
        serde_json::from_str(&ok(&mut ours(d, &["info", "--output=json", "nb.qed"]))).unwrap();
    assert_eq!(info["backing-filename"], uri.as_str());
    assert_eq!(info["backing-filename-format"], "raw");
    let chain: Value = serde_json::from_str(&ok(&mut ours(
        d,
        &["info", "--backing-chain", "--output=json", "nb.qed"],
    )))
    .unwrap();
    assert_eq!(chain[1]["virtual-size"], 4 << 20);
    // A partial write through ours keeps the export's bytes around it in the cluster.
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 200) as u8 + 1).collect();
    std::fs::write(d.join("payload"), &payload).unwrap();
    ok(&mut ours(d, &["write", "nb.qed", "300001", "payload"]));
    ok(&mut qemu_img(
        d,
        &["convert", "-O", "raw", "nb.qed", "nb.raw"],
    ));
    let mut model = std::fs::read(d.join("base.raw")).unwrap();
    model.resize(8 << 20, 0);
    model[64 << 10..128 << 10].fill(9);
    model[1 << 20..(1 << 20) + (64 << 10)].fill(0);
    model[300001..305001].copy_from_slice(&payload);
    assert!(std::fs::read(d.join("nb.raw")).unwrap() == model);
    assert_eq!(
        run(&mut qemu_img(d, &["check", "nb.qed"])).status.code(),
        Some(0)
    );
    ok(&mut ours(
        d,
        &["convert", "-O", "qed", "nb.qed", "flat.qed"],
    ));
    let out = run(&mut qemu_img(d, &["compare", "nb.qed", "flat.qed"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn convert_takes_an_nbd_uri_from_nbdkit() {
    let dir = tempdir();
    let d = dir.path();
    let sock = d.join("kit.sock");
    let _server = nbdkit(&sock, &["sparse-random", "48M", "seed=7", "percent=30"]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    ok(&mut qemu_img(
        d,
        &["convert", "-f", "raw", "-O", "raw", &uri, "expect.raw"],
    ));
    ok(&mut ours(
        d,
        &["convert", "-f", "raw", "-O", "raw", &uri, "out.raw"],
    ));
    assert!(
        std::fs::read(d.join("out.raw")).unwrap() == std::fs::read(d.join("expect.raw")).unwrap()
    );
    ok(&mut ours(d, &["convert", "-O", "qed", &uri, "out.qed"]));
    let out = run(&mut qemu_img(
        d,
        &["compare", "-f", "qed", "-F", "raw", "out.qed", "expect.raw"],
    ));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        run(&mut qemu_img(d, &["check", "out.qed"])).status.code(),
        Some(0)
    );
}

#[test]
fn nbds_without_credentials_is_a_clear_error() {
    let dir = tempdir();
    let out = run(&mut ours(
        dir.path(),
        &["convert", "-O", "raw", "nbds://127.0.0.1/x", "out.raw"],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS is required"), "{err}");
    assert!(err.contains("--tls-creds DIR"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// Stderr of a failed run, asserting it failed with one line.
fn fails(d: &Path, args: &[&str]) -> String {
    let out = run(&mut ours(d, args));
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    err
}

/// The virtual disk of `image` as qemu-img reads it.
fn qemu_raw(d: &Path, image: &str) -> Vec<u8> {
    let out = d.join(format!("{image}.check.raw"));
    ok(&mut qemu_img(
        d,
        &["convert", "-O", "raw", image, out.to_str().unwrap()],
    ));
    std::fs::read(out).unwrap()
}

#[test]
fn writes_past_the_end_write_nothing() {
    let dir = tempdir();
    let d = dir.path();
    ok(&mut ours(d, &["create", "img.qed", "10M"]));
    qemu_io(d, "qed", "img.qed", &["write -P 0x5a 5M 3M"]);
    let before = qemu_raw(d, "img.qed");
    std::fs::write(d.join("six"), vec![0xa5u8; 6 << 20]).unwrap();
    // A file input that crosses the end.
    let err = fails(d, &["write", "img.qed", "6M", "six"]);
    assert!(err.contains("outside") || err.contains("past"), "{err}");
    assert!(
        qemu_raw(d, "img.qed") == before,
        "a file write past the end changed the image"
    );
    // The same from a pipe, whose length is not known up front.
    let out = ours(d, &["write", "img.qed", "6M"])
        .stdin(std::fs::File::open(d.join("six")).unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let mut child = ours(d, &["write", "img.qed", "6M"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        // The writer may see a broken pipe once the command refuses: that is fine.
        let _ = stdin.write_all(&vec![0xa5u8; 6 << 20]);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "a piped write past the end succeeded"
    );
    assert!(
        qemu_raw(d, "img.qed") == before,
        "a piped write past the end changed the image"
    );
    // Zeros past the end.
    fails(d, &["write", "--zero", "6M", "img.qed", "6M"]);
    fails(d, &["write", "--zero", "1", "img.qed", "10M"]);
    assert!(
        qemu_raw(d, "img.qed") == before,
        "a zero write past the end changed the image"
    );
    // Offsets past the end, or that overflow.
    fails(d, &["write", "img.qed", "11M", "six"]);
    fails(
        d,
        &["write", "--zero", "1", "img.qed", "18446744073709551615"],
    );
    // A write that ends exactly at the end works, from a file and from a pipe.
    std::fs::write(d.join("four"), vec![0x11u8; 4 << 20]).unwrap();
    ok(&mut ours(d, &["write", "img.qed", "6M", "four"]));
    let out = ours(d, &["write", "img.qed", "2M"])
        .stdin(std::fs::File::open(d.join("four")).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&mut ours(d, &["write", "--zero", "1M", "img.qed", "9M"]));
    let mut model = before;
    model[6 << 20..10 << 20].fill(0x11);
    model[2 << 20..6 << 20].fill(0x11);
    model[9 << 20..10 << 20].fill(0);
    assert!(qemu_raw(d, "img.qed") == model);
}

#[test]
fn truncated_qed_images_are_reported_not_read_as_raw() {
    let dir = tempdir();
    let d = dir.path();
    ok(&mut ours(d, &["create", "full.qed", "1M"]));
    let full = std::fs::read(d.join("full.qed")).unwrap();
    for cut in [40usize, 4, 63] {
        std::fs::write(d.join("cut.qed"), &full[..cut]).unwrap();
        for args in [
            &["info", "cut.qed"][..],
            &["info", "--output=json", "cut.qed"],
            &["map", "cut.qed"],
            &["read", "cut.qed", "0", "4"],
            &["convert", "-O", "raw", "cut.qed", "out.raw"],
            &["create", "-b", "cut.qed", "over.qed"],
        ] {
            let err = fails(d, args);
            assert!(err.contains("truncated"), "{args:?} on {cut} bytes: {err}");
        }
    }
    // As a backing whose format is probed: the overlay's reads fail, never read zeros.
    ok(&mut qemu_img(
        d,
        &[
            "create", "-f", "qed", "-b", "full.qed", "-F", "qed", "top.qed",
        ],
    ));
    std::fs::write(d.join("full.qed"), &full[..40]).unwrap();
    for args in [
        &["read", "top.qed", "0", "4"][..],
        &["info", "--backing-chain", "top.qed"],
        &["map", "top.qed"],
        &["convert", "-O", "raw", "top.qed", "out.raw"],
        &["stream", "top.qed"],
    ] {
        let err = fails(d, args);
        assert!(err.contains("truncated"), "{args:?}: {err}");
    }
}

#[test]
fn connection_errors_say_what_failed() {
    let dir = tempdir();
    let d = dir.path();
    // No server on the socket: nothing was ever connected.
    let uri = format!("nbd+unix:///?socket={}", d.join("none.sock").display());
    let err = fails(d, &["info", &uri]);
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!err.contains("lost"), "{err}");
    // A server that hangs up during the handshake.
    let sock = d.join("rude.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    for args in [
        &["info", &uri][..],
        &["convert", "-O", "raw", &uri, "out.raw"],
    ] {
        let err = fails(d, args);
        assert!(err.contains("handshake failed"), "{err}");
        assert!(!err.contains("lost"), "{err}");
    }
}

#[test]
fn stream_of_a_standalone_image_says_there_was_nothing_to_stream() {
    let dir = tempdir();
    let d = dir.path();
    ok(&mut ours(d, &["create", "alone.qed", "4M"]));
    let out = ok(&mut ours(d, &["stream", "alone.qed"]));
    assert!(out.contains("no backing"), "{out}");
    assert!(!out.contains("dropped"), "{out}");
}

#[test]
fn stream_options_are_bounded() {
    let dir = tempdir();
    let d = dir.path();
    ok(&mut ours(d, &["create", "base.qed", "4M"]));
    qemu_io(d, "qed", "base.qed", &["write -P 7 0 4M"]);
    create_overlay(d, "base.qed", "qed", "top.qed", None);
    for n in ["0", "65", "100000"] {
        let err = fails(d, &["stream", "--in-flight", n, "top.qed"]);
        assert!(err.contains("in-flight"), "{err}");
    }
    let err = fails(d, &["stream", "--step", "--length", "0", "top.qed"]);
    assert!(err.contains("length"), "{err}");
    // Nothing was copied by the refused commands.
    let map = ok(&mut ours(d, &["map", "--output=json", "top.qed"]));
    assert!(!map.contains("\"depth\": 0"), "{map}");
    ok(&mut ours(d, &["stream", "--in-flight", "64", "top.qed"]));
}

#[test]
fn control_characters_in_backing_names_are_escaped() {
    let dir = tempdir();
    let d = dir.path();
    let evil = "ev\x1b[2Jil\x07\r.raw";
    std::fs::write(d.join(evil), vec![1u8; 1 << 20]).unwrap();
    ok(&mut qemu_img(
        d,
        &[
            "create", "-f", "qed", "-b", evil, "-F", "raw", "top.qed", "1M",
        ],
    ));
    let clean = |s: &str, what: &str| {
        assert!(
            !s.chars().any(|c| c.is_control() && c != '\n'),
            "{what} prints control characters raw: {s:?}"
        );
    };
    let out = ok(&mut ours(d, &["info", "top.qed"]));
    clean(&out, "info");
    assert!(
        out.contains("ev\\u{1b}[2Jil") || out.contains("ev\\x1b[2Jil"),
        "{out}"
    );
    qemu_io(d, "qed", "top.qed", &["write -P 3 0 64k"]);
    clean(&ok(&mut ours(d, &["map", "top.qed"])), "map");
    // Errors naming it: the backing is gone.
    std::fs::remove_file(d.join(evil)).unwrap();
    for args in [
        &["info", "--backing-chain", "top.qed"][..],
        &["map", "top.qed"],
        &["read", "top.qed", "0", "1"],
        &["stream", "top.qed"],
        &["convert", "-O", "raw", "top.qed", "o.raw"],
    ] {
        let err = fails(d, args);
        clean(&err, &format!("{args:?}"));
    }
}

/// Bytes per sector count QEMU can address: `BDRV_MAX_LENGTH`, INT64_MAX aligned down to 1 GiB.
const BDRV_MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

#[test]
fn nbd_exports_larger_than_qemu_allows_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    let sock = d.join("big.sock");
    let _server = nbdkit(&sock, &["null", "size=9223372036854775807"]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    // qemu-img refuses it too ("File too large").
    assert!(!run(&mut qemu_img(d, &["info", &uri])).status.success());
    for args in [
        &["info", &uri][..],
        &["map", &uri],
        &["read", &uri, "0", "512"],
        &["convert", "-O", "raw", &uri, "out.raw"],
        &["create", "-b", &uri, "-F", "raw", "over.qed", "1M"],
    ] {
        let err = fails(d, args);
        assert!(err.contains("too large"), "{args:?}: {err}");
    }
    drop(_server);
    // The largest size QEMU accepts opens.
    let sock = d.join("max.sock");
    let size = format!("size={BDRV_MAX_LENGTH}");
    let _server = nbdkit(&sock, &["null", &size]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let info: Value =
        serde_json::from_str(&ok(&mut ours(d, &["info", "--output=json", &uri]))).unwrap();
    assert_eq!(info["virtual-size"], BDRV_MAX_LENGTH);
}

#[test]
fn qed_headers_larger_than_qemu_allows_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    // 2 MiB clusters and 8-cluster tables: the geometry itself allows 2^63 bytes.
    ok(&mut ours(
        d,
        &[
            "create",
            "-o",
            "cluster_size=2M,table_size=8",
            "big.qed",
            "1G",
        ],
    ));
    poke(&d.join("big.qed"), 48, BDRV_MAX_LENGTH + (1 << 30));
    let err = fails(d, &["info", "big.qed"]);
    assert!(err.contains("image size"), "{err}");
    fails(d, &["read", "big.qed", "0", "1"]);
    poke(&d.join("big.qed"), 48, BDRV_MAX_LENGTH);
    ok(&mut ours(d, &["info", "big.qed"]));
    let err = fails(
        d,
        &[
            "create",
            "-o",
            "cluster_size=2M,table_size=8",
            "huge.qed",
            "9223372036854775296",
        ],
    );
    assert!(err.contains("size"), "{err}");
}

/// A raw base under `overlays` QED images (4 KiB clusters, so the chain stays small), named
/// `l0.qed` (top) .. and `base.raw`; layer `l{data_at}.qed` holds 64 KiB of 0x77 at 128 KiB.
fn deep_chain(d: &Path, overlays: usize, data_at: usize) {
    std::fs::write(d.join("base.raw"), vec![0x42u8; 1 << 20]).unwrap();
    for i in (0..overlays).rev() {
        let below = if i + 1 == overlays {
            ("base.raw".to_string(), qed::BackingFormat::Raw)
        } else {
            (format!("l{}.qed", i + 1), qed::BackingFormat::Probe)
        };
        let options = qed::CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            table_size: 2,
            backing: Some(below),
        };
        qed::Image::create_path(&d.join(format!("l{i}.qed")), &options).unwrap();
    }
    qemu_io(
        d,
        "qed",
        &format!("l{data_at}.qed"),
        &["write -P 0x77 128k 64k"],
    );
}

#[test]
fn deep_backing_chains_open_and_the_bound_is_an_option() {
    let dir = tempdir();
    let d = dir.path();
    // 1000 QED layers over a raw base: 1001 images, as deep as QEMU users meet.
    deep_chain(d, 1000, 600);
    let mut expect = vec![0x42u8; 1 << 20];
    expect[128 << 10..192 << 10].fill(0x77);
    let out = ok(&mut ours(
        d,
        &["info", "--backing-chain", "--output=json", "l0.qed"],
    ));
    let layers: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(layers.as_array().unwrap().len(), 1001);
    ok(&mut ours(d, &["info", "--backing-chain", "l0.qed"]));
    let theirs = ok(&mut qemu_img(d, &["map", "--output=json", "l0.qed"]));
    let mine = ok(&mut ours(d, &["map", "--output=json", "l0.qed"]));
    assert_eq!(mine, theirs);
    let out = run(&mut ours(d, &["read", "l0.qed", "0", "1M"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == expect, "read through 1001 layers");
    ok(&mut ours(d, &["convert", "-O", "raw", "l0.qed", "out.raw"]));
    assert!(std::fs::read(d.join("out.raw")).unwrap() == expect);
    ok(&mut ours(d, &["write", "--zero", "4k", "l0.qed", "0"]));
    expect[..4096].fill(0);
    ok(&mut ours(d, &["stream", "l0.qed"]));
    assert!(qemu_raw(d, "l0.qed") == expect);
    // The bound is an option of every command that opens a chain.
    deep_chain(d, 20, 5);
    for args in [
        &["info", "--backing-chain", "l0.qed"][..],
        &["map", "l0.qed"],
        &["read", "l0.qed", "0", "1"],
        &["convert", "-O", "raw", "l0.qed", "o.raw"],
        &["write", "--zero", "4k", "l0.qed", "0"],
        &["create", "-b", "l0.qed", "over.qed"],
        &["stream", "l0.qed"],
    ] {
        let mut args = args.to_vec();
        args.insert(1, "--max-chain-depth=10");
        let err = fails(d, &args);
        assert!(err.contains("deeper than 10"), "{args:?}: {err}");
        args[1] = "--max-chain-depth=30";
        ok(&mut ours(d, &args));
    }
}

/// Block-status requests an nbdkit `--filter=log` log file records.
fn block_status_requests(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Extents id=") && !l.contains("...Extents"))
        .count()
}

#[test]
fn huge_sparse_exports_are_walked_in_few_block_status_requests() {
    let dir = tempdir();
    let d = dir.path();
    let sock = d.join("sparse.sock");
    let log = d.join("nbdkit.log");
    let logfile = format!("logfile={}", log.display());
    // 1 TiB with three small pieces of data, at 0, 512 GiB and near the end.
    let _server = nbdkit(
        &sock,
        &[
            "--filter=log",
            "data",
            "data=1 @549755813888 2 @1099511562240 3",
            "size=1T",
            &logfile,
        ],
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    // 256 MiB or 1 GiB windows would need 1024 to 4096 requests; 4 GiB ones need 256.
    let map = ok(&mut ours(d, &["map", "--output=json", &uri]));
    assert_eq!(map.matches("\"data\": true").count(), 3, "{map}");
    let n = block_status_requests(&log);
    assert!(n <= 300, "map asked for block status {n} times");
    ok(&mut ours(
        d,
        &["create", "-b", &uri, "-F", "raw", "top.qed", "1T"],
    ));
    let before = block_status_requests(&log);
    ok(&mut ours(d, &["stream", "top.qed"]));
    let n = block_status_requests(&log) - before;
    assert!(n <= 600, "stream asked for block status {n} times");
    let out = run(&mut ours(d, &["read", "top.qed", "549755813888", "1"]));
    assert_eq!(out.stdout, [2]);
    let info: Value =
        serde_json::from_str(&ok(&mut ours(d, &["info", "--output=json", "top.qed"]))).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
}
