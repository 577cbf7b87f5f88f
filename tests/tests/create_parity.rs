//! (e) A fresh image from `Image::create_path` is byte-identical to `qemu-img create -f qed`
//! with the same arguments: geometry, size rounding, header, backing name and features.

use qed::{BackingFormat, CreateOptions, Image};
use qedstream_tests::{path_str, qemu, tempdir};

fn assert_identical(cluster_size: u32, table_size: u32, size: u64, backing: Option<(&str, &str)>) {
    let dir = tempdir();
    std::fs::write(dir.path().join("base.raw"), vec![0x11u8; 70_000]).unwrap();
    qemu::img(&[
        "create",
        "-f",
        "qed",
        path_str(&dir.path().join("base.qed")),
        "1M",
    ]);
    let theirs = dir.path().join("qemu.qed");
    let ours = dir.path().join("ours.qed");
    let opts = format!("cluster_size={cluster_size},table_size={table_size}");
    let size_arg = size.to_string();
    let mut args = vec!["create", "-f", "qed", "-o", &opts];
    if let Some((name, fmt)) = backing {
        args.extend(["-b", name, "-F", fmt]);
    }
    args.extend([path_str(&theirs), &size_arg]);
    qemu::img(&args);
    let options = CreateOptions {
        size,
        cluster_size,
        table_size,
        backing: backing.map(|(name, fmt)| {
            let format = if fmt == "raw" {
                BackingFormat::Raw
            } else {
                BackingFormat::Probe
            };
            (name.to_string(), format)
        }),
    };
    Image::create_path(&ours, &options).unwrap();
    let a = std::fs::read(&ours).unwrap();
    let b = std::fs::read(&theirs).unwrap();
    let what = format!("create {opts} size {size} backing {backing:?}");
    assert_eq!(a.len(), b.len(), "{what}: file lengths differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first differing byte at {i:#x}: ours {:#04x}, qemu {:#04x}",
            a[i], b[i]
        );
    }
}

#[test]
fn create_matches_qemu_img_create_without_backing() {
    for (cs, ts) in [
        (65536, 4),
        (4096, 2),
        (4096, 16),
        (65536, 16),
        (1 << 20, 2),
        (4 << 20, 2),
    ] {
        assert_identical(cs, ts, 64 << 20, None);
    }
}

#[test]
fn create_rounds_the_size_up_to_512_like_qemu() {
    assert_identical(65536, 4, 1_000_000, None);
    assert_identical(4096, 4, 1, None);
    assert_identical(65536, 4, 0, None);
}

#[test]
fn create_matches_qemu_img_create_with_raw_backing() {
    for (cs, ts) in [(65536, 4), (4096, 2), (1 << 20, 4)] {
        assert_identical(cs, ts, 8 << 20, Some(("base.raw", "raw")));
    }
}

#[test]
fn create_matches_qemu_img_create_with_qed_backing() {
    assert_identical(65536, 4, 8 << 20, Some(("base.qed", "qed")));
    assert_identical(4096, 16, 8 << 20, Some(("base.qed", "qed")));
}

#[test]
fn create_refuses_images_qemu_could_not_open() {
    let dir = tempdir();
    let path = dir.path().join("x.qed");
    let opts = |cs: u32, ts: u32, size: u64| CreateOptions {
        size,
        cluster_size: cs,
        table_size: ts,
        backing: None,
    };
    // table_size 1 (QEMU's table offset test always fails), geometries whose maximum size
    // overflows in QEMU (4M/ts4, 8M clusters), a size over the maximum (4K/ts2: 4 GiB).
    for o in [
        opts(65536, 1, 1 << 20),
        opts(4 << 20, 4, 1 << 20),
        opts(8 << 20, 2, 1 << 20),
        opts(4096, 2, 5 << 30),
    ] {
        assert!(
            matches!(
                Image::create_path(&path, &o),
                Err(qed::Error::InvalidOptions(_))
            ),
            "{o:?} should be refused"
        );
    }
    // A backing name that does not fit in the header cluster (QEMU writes it and then cannot
    // open the image).
    let mut o = opts(4096, 2, 1 << 20);
    o.backing = Some(("n".repeat(4033), BackingFormat::Raw));
    assert!(matches!(
        Image::create_path(&path, &o),
        Err(qed::Error::BackingNameTooLong(4033))
    ));
    o.backing = Some(("n".repeat(4032), BackingFormat::Raw));
    Image::create_path(&path, &o).unwrap();
    // QEMU opens it (without the backing, which cannot exist under such a name).
    let spec = format!(
        r#"json:{{"driver":"qed","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#,
        path_str(&path)
    );
    let (code, out, err) = qemu::img_status(&["check", &spec]);
    assert_eq!(
        code, 0,
        "a 4032-byte name still fits and QEMU opens it: {out}{err}"
    );
}
