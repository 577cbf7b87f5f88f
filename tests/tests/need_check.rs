//! (f) The NEED_CHECK life cycle, on real files, graded by QEMU: set on disk by the first
//! allocation without a backing file and left there by a drop without close (a crash);
//! untouched by a read-only open; repaired and cleared by a read-write open; cleared by close;
//! never set with a backing file. Also QEMU's own crash (`qemu-io -c abort`) repaired by us,
//! and an image we wrote while QEMU reads it (force-share).

use qed::{CreateOptions, Image};
use qedstream_tests::{
    assert_check_agrees, features_on_disk, open_ro, open_rw, path_str, qemu, read_all, tempdir,
};

const NEED_CHECK: u64 = 0x02;

#[test]
fn drop_without_close_leaves_need_check_and_rw_open_clears_it() {
    let dir = tempdir();
    let path = dir.path().join("n.qed");
    Image::create_path(&path, &CreateOptions::new(64 << 20)).unwrap();
    assert_eq!(features_on_disk(&path), 0);
    let image = open_rw(&path);
    image.write_at(&[0x22; 65536], 0).unwrap();
    image.write_at(&[0x23; 1000], 5 << 20).unwrap();
    assert_eq!(
        features_on_disk(&path) & NEED_CHECK,
        NEED_CHECK,
        "set by the first allocation"
    );
    drop(image); // a crash, as far as the file is concerned
    assert_eq!(
        features_on_disk(&path) & NEED_CHECK,
        NEED_CHECK,
        "drop leaves it set"
    );

    // QEMU checks it fine (nothing is actually inconsistent) and reads it.
    qemu::assert_check_clean(&path);
    qemu::io_commands("qed", &path, &["read -P 0x22 0 64k".into()]);
    // `qemu-io` opened it read-write, so QEMU repaired and cleared the bit itself. Set it again
    // to see ours do the same.
    let image = open_rw(&path);
    image.write_at(&[0x24; 10], 9 << 20).unwrap();
    drop(image);
    assert_eq!(features_on_disk(&path) & NEED_CHECK, NEED_CHECK);

    let ro = open_ro(&path);
    let bytes = read_all(&ro);
    assert!(bytes[..65536].iter().all(|&b| b == 0x22));
    drop(ro);
    assert_eq!(
        features_on_disk(&path) & NEED_CHECK,
        NEED_CHECK,
        "read-only open never writes"
    );

    let rw = open_rw(&path);
    assert_eq!(
        features_on_disk(&path) & NEED_CHECK,
        0,
        "read-write open repairs and clears"
    );
    assert_eq!(read_all(&rw), bytes);
    rw.close().unwrap();
    qemu::assert_check_clean(&path);
    assert_check_agrees(&path);
    assert_eq!(qemu::convert_to_raw(&path), bytes);
}

#[test]
fn close_clears_need_check() {
    let dir = tempdir();
    let path = dir.path().join("c.qed");
    Image::create_path(&path, &CreateOptions::new(8 << 20)).unwrap();
    let image = open_rw(&path);
    image.write_zeroes(0, 1 << 20).unwrap();
    assert_eq!(
        features_on_disk(&path) & NEED_CHECK,
        NEED_CHECK,
        "zero clusters set it too"
    );
    image.close().unwrap();
    assert_eq!(features_on_disk(&path), 0);
    qemu::assert_check_clean(&path);
}

#[test]
fn writes_over_a_backing_file_never_set_need_check() {
    let dir = tempdir();
    std::fs::write(dir.path().join("base.raw"), vec![0x11u8; 1 << 20]).unwrap();
    let path = dir.path().join("b.qed");
    let mut o = CreateOptions::new(8 << 20);
    o.backing = Some(("base.raw".into(), qed::BackingFormat::Raw));
    Image::create_path(&path, &o).unwrap();
    let image = open_rw(&path);
    image.write_at(&[0x22; 3000], 70_000).unwrap();
    image.write_zeroes(2 << 20, 1 << 20).unwrap();
    assert_eq!(features_on_disk(&path), 0x05, "backing bits only");
    drop(image);
    assert_eq!(features_on_disk(&path), 0x05);
    qemu::assert_check_clean(&path);
}

#[test]
fn qemu_abort_leaves_need_check_and_our_rw_open_repairs_it() {
    let dir = tempdir();
    let path = dir.path().join("q.qed");
    qemu::img(&["create", "-f", "qed", path_str(&path), "64M"]);
    // `abort` kills qemu-io, so its exit status is not success; run it raw.
    let out = qedstream_tests::tools::output(std::process::Command::new("qemu-io").args([
        "-f",
        "qed",
        "-c",
        "write -P 0x22 0 64k",
        "-c",
        "abort",
        path_str(&path),
    ]))
    .expect("qemu-io is needed for this test (install QEMU's tools)");
    assert!(!out.status.success(), "abort should kill qemu-io");
    assert_eq!(
        features_on_disk(&path) & NEED_CHECK,
        NEED_CHECK,
        "QEMU left NEED_CHECK set"
    );
    let rw = open_rw(&path);
    assert_eq!(features_on_disk(&path) & NEED_CHECK, 0);
    let mut buf = vec![0u8; 65536];
    rw.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
    rw.close().unwrap();
    qemu::assert_check_clean(&path);
}

#[test]
fn qemu_reads_an_image_we_keep_open_and_write() {
    let dir = tempdir();
    let path = dir.path().join("live.qed");
    Image::create_path(&path, &CreateOptions::new(16 << 20)).unwrap();
    let image = open_rw(&path);
    image.write_at(&[0x5a; 200_000], 1_000_000).unwrap();
    image.flush().unwrap();
    // QEMU, sharing the file read-only while we hold it open, sees the flushed data.
    let out = qemu::img(&["check", "-U", "-f", "qed", "--output=json", path_str(&path)]);
    assert!(!out.contains("corruptions"), "{out}");
    let out = qedstream_tests::tools::output(std::process::Command::new("qemu-io").args([
        "-r",
        "-U",
        "-f",
        "qed",
        "-c",
        "read -P 0x5a 1000000 200000",
        "-c",
        "read -P 0 0 1000000",
        path_str(&path),
    ]))
    .expect("qemu-io is needed for this test (install QEMU's tools)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("failed"), "{text}");
    // More writes while it stays open, then QEMU looks again.
    image.write_zeroes(1 << 20, 64 << 10).unwrap();
    image.flush().unwrap();
    let flat = qemu::convert_to_raw(&path);
    assert!(flat[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0));
    assert!(flat[1_000_000..(1 << 20)].iter().all(|&b| b == 0x5a));
    image.close().unwrap();
    qemu::assert_check_clean(&path);
}
