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
        panic!("{what}: first differing byte at {i:#x}: ours {:#04x}, qemu {:#04x}", a[i], b[i]);
    }
}

#[test]
fn create_matches_qemu_img_create_without_backing() {
    for (cs, ts) in [(65536, 4), (4096, 2), (4096, 16), (65536, 16), (1 << 20, 2), (4 << 20, 2)] {
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
