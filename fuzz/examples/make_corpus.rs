//! Writes the seed images made by our own `qed` crate into `corpus/qed_image/` (the QEMU-made
//! and damaged seeds come from `make-corpus.sh`). Run: `cargo run -p qedstream-fuzz --example
//! make_corpus`. Images are small: 4K clusters, tables of 2 clusters.

use std::path::Path;

use qed::{BackingFormat, CreateOptions, Image, MemStorage, OpenOptions};

fn options(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        cluster_size: 4096,
        table_size: 2,
        backing: None,
    }
}

fn write_seed(
    dir: &Path,
    name: &str,
    create: &CreateOptions,
    ops: impl FnOnce(&Image),
    close: bool,
) {
    let storage = std::sync::Arc::new(MemStorage::new());
    Image::create(&*storage, create).unwrap();
    let image = Image::open(
        Box::new(storage.clone()),
        OpenOptions {
            ..OpenOptions::default()
        },
    )
    .unwrap();
    ops(&image);
    if close {
        image.close().unwrap();
    } else {
        drop(image); // leaves NEED_CHECK set
    }
    std::fs::write(dir.join(name), storage.to_bytes()).unwrap();
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/qed_image");
    std::fs::create_dir_all(&dir).unwrap();
    write_seed(&dir, "ours-empty-1m", &options(1 << 20), |_| {}, true);
    write_seed(
        &dir,
        "ours-writes-1m",
        &options(1 << 20),
        |i| {
            i.write_at(&[0x11; 5000], qed::GuestOffset(3000)).unwrap();
            i.write_zeroes(qed::GuestOffset(16384), 8192).unwrap();
            i.write_at(&[0x22; 100], qed::GuestOffset((1 << 20) - 100))
                .unwrap();
        },
        true,
    );
    write_seed(
        &dir,
        "ours-need-check-1m",
        &options(1 << 20),
        |i| i.write_at(&[0x33; 4096], qed::GuestOffset(8192)).unwrap(),
        false,
    );
    write_seed(
        &dir,
        "ours-two-l2-tables-5m",
        &options(5 << 20),
        |i| {
            i.write_at(&[0x44; 10], qed::GuestOffset(100)).unwrap();
            i.write_at(&[0x55; 10], qed::GuestOffset((4 << 20) + 100))
                .unwrap();
        },
        true,
    );
    let mut backed = options(1 << 20);
    backed.backing = Some(("base.raw".into(), BackingFormat::Raw));
    write_seed(
        &dir,
        "ours-raw-backing-name-1m",
        &backed,
        |i| i.write_zeroes(qed::GuestOffset(0), 4096).unwrap(),
        true,
    );
    let mut probed = options(512 << 10);
    probed.backing = Some(("nbd+unix:///exp?socket=/tmp/s".into(), BackingFormat::Probe));
    write_seed(&dir, "ours-protocol-backing-512k", &probed, |_| {}, true);
}
