//! Named checks of the semantics the reference pins down (qed-format.md §2–§7), each graded by
//! QEMU where QEMU gets it right, and by the spec where it does not.

use std::path::Path;
use std::sync::Arc;

use copy_on_read::{BlockDevice, QedImage, SyncDevice};
use qed::{
    BackingFormat, CreateOptions, Error, GuestOffset, Image, Mapping, MemStorage, OpenOptions,
};
use qedstream_tests::{
    assert_check_agrees, assert_same_bytes, disk_over, open_detached, open_ro, open_rw, path_str,
    peek_u64, qemu, raw_backing, raw_file, read_all, tempdir, Disk,
};

/// An in-memory QED image (read-only, no backing of its own) as a backing device.
fn mem_qed_backing(bytes: Vec<u8>) -> Arc<dyn BlockDevice> {
    let options = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let image = Image::open(Box::new(MemStorage::from_bytes(bytes)), options).unwrap();
    Arc::new(QedImage::new(image, "base".into(), None))
}

/// An in-memory image over `backing`, read and written through the copy-on-read device (the
/// image itself never reads its backing).
fn mem_image(options: &CreateOptions, backing: Option<Arc<dyn BlockDevice>>) -> Disk {
    let storage = MemStorage::new();
    Image::create(&storage, options).unwrap();
    disk_over(
        Image::open(Box::new(storage), OpenOptions::default()).unwrap(),
        backing,
    )
}

fn with_backing(size: u64, format: BackingFormat) -> CreateOptions {
    let mut o = CreateOptions::new(size);
    o.backing = Some(("base".into(), format));
    o
}

/// Regression (found by `interop::*_qed_*` scenarios): a QED backing smaller than the image
/// made every read or COW fill past the backing's end fail with `OutOfRange` instead of
/// reading zeros.
#[test]
fn qed_backing_shorter_than_image_reads_zeros_past_its_end() {
    let base = MemStorage::new();
    Image::create(&base, &CreateOptions::new(1 << 20)).unwrap();
    let b = Image::open(Box::new(base), OpenOptions::default()).unwrap();
    b.write_at(&[0x11; 1 << 20], GuestOffset(0)).unwrap();
    let base_bytes = {
        let bytes = b.storage().len().unwrap();
        let mut v = vec![0u8; bytes as usize];
        b.storage().read_at(&mut v, 0).unwrap();
        v
    };
    b.close().unwrap();
    let top = mem_image(
        &with_backing(4 << 20, BackingFormat::Probe),
        Some(mem_qed_backing(base_bytes)),
    );
    let mut buf = vec![0xffu8; 2 << 20];
    top.read_at(&mut buf, 0).unwrap();
    assert!(buf[..1 << 20].iter().all(|&x| x == 0x11));
    assert!(
        buf[1 << 20..].iter().all(|&x| x == 0),
        "zeros past the backing's end"
    );
    // A COW write that straddles the backing's end fills from both sides correctly.
    top.write_at(&[0x22; 100], (1 << 20) - 50).unwrap();
    top.read_at(&mut buf, 0).unwrap();
    assert!(buf[..(1 << 20) - 50].iter().all(|&x| x == 0x11));
    assert!(buf[(1 << 20) - 50..(1 << 20) + 50]
        .iter()
        .all(|&x| x == 0x22));
    assert!(buf[(1 << 20) + 50..].iter().all(|&x| x == 0));
    top.close().unwrap();
}

#[test]
fn partial_write_into_zero_cluster_fills_zeros_even_with_backing() {
    // The spec's behaviour; QEMU 10 fills from the backing here (a QEMU bug), so this is
    // graded by QEMU reading our result, not by QEMU doing the same writes.
    let dir = tempdir();
    std::fs::write(dir.path().join("base.raw"), vec![0x11u8; 1 << 20]).unwrap();
    let path = dir.path().join("z.qed");
    let mut o = CreateOptions::new(4 << 20);
    o.backing = Some(("base.raw".into(), BackingFormat::Raw));
    Image::create_path(&path, &o).unwrap();
    let image = open_rw(&path);
    image.write_zeroes(0, 65536).unwrap();
    assert_eq!(
        image
            .image()
            .mapping_at(qed::GuestOffset(0), 65536)
            .unwrap()
            .0,
        Mapping::Zero
    );
    image.write_at(&[0xcd; 4096], 8192).unwrap();
    assert!(matches!(
        image
            .image()
            .mapping_at(qed::GuestOffset(0), 65536)
            .unwrap()
            .0,
        Mapping::Data(_)
    ));
    image.close().unwrap();
    let flat = qemu::convert_to_raw(&path);
    assert!(
        flat[..8192].iter().all(|&b| b == 0),
        "front gap of a zero cluster is zeros"
    );
    assert!(flat[8192..12288].iter().all(|&b| b == 0xcd));
    assert!(
        flat[12288..65536].iter().all(|&b| b == 0),
        "back gap of a zero cluster is zeros"
    );
    assert!(flat[65536..1 << 20].iter().all(|&b| b == 0x11));
    qemu::assert_check_clean(&path);
}

#[test]
fn aligned_zero_write_to_unallocated_cluster_stores_entry_one_and_no_data() {
    let dir = tempdir();
    let path = dir.path().join("z.qed");
    Image::create_path(&path, &CreateOptions::new(8 << 20)).unwrap();
    let image = open_rw(&path);
    image.write_zeroes(128 << 10, 192 << 10).unwrap();
    image.close().unwrap();
    // Header, L1 (4 clusters), one new L2 table (4 clusters): no data cluster.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 9 * 65536);
    let l2 = peek_u64(&path, 65536);
    assert_eq!(l2, 5 * 65536);
    for i in 0..8 {
        let want = if (2..5).contains(&i) { 1 } else { 0 };
        assert_eq!(peek_u64(&path, l2 + i * 8), want, "L2[{i}]");
    }
    let map = qemu::map_json(&path);
    assert!(map.iter().any(|e| e["start"] == 131072
        && e["length"] == 196608
        && e["zero"] == true
        && e["present"] == true));
    qemu::assert_check_clean(&path);
}

#[test]
fn unaligned_zero_write_over_unallocated_clusters_allocates_only_the_edges() {
    let image = mem_image(&CreateOptions::new(8 << 20), None);
    image.write_zeroes(1000, 200_000).unwrap();
    let map = image.image().map(qed::GuestOffset(0), 8 << 20).unwrap();
    assert!(matches!(map[0].mapping, Mapping::Data(_)), "{map:?}");
    assert_eq!(
        (map[1].offset, map[1].length, map[1].mapping),
        (qed::GuestOffset(65536), 131072, Mapping::Zero)
    );
    assert!(matches!(map[2].mapping, Mapping::Data(_)), "{map:?}");
    assert_eq!(
        image
            .image()
            .check(qed::Repair::None)
            .unwrap()
            .allocated_clusters,
        2
    );
    image.close().unwrap();
}

#[test]
fn zero_write_to_allocated_cluster_writes_zeros_in_place() {
    let image = mem_image(&CreateOptions::new(8 << 20), None);
    image.write_at(&[7u8; 65536], 65536).unwrap();
    let before = image
        .image()
        .mapping_at(qed::GuestOffset(65536), 65536)
        .unwrap();
    image.write_zeroes(65536, 65536).unwrap();
    assert_eq!(
        image
            .image()
            .mapping_at(qed::GuestOffset(65536), 65536)
            .unwrap(),
        before,
        "still the same data cluster"
    );
    let mut buf = vec![1u8; 65536];
    image.read_at(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    image.close().unwrap();
}

#[test]
fn zero_write_over_a_backing_hides_it_with_zero_clusters() {
    let image = mem_image(
        &with_backing(1 << 20, BackingFormat::Raw),
        Some(raw_backing(&[0x11; 1 << 20])),
    );
    image.write_zeroes(0, 1 << 20).unwrap();
    assert_eq!(
        image.image().map(qed::GuestOffset(0), 1 << 20).unwrap()[0].mapping,
        Mapping::Zero
    );
    assert!(read_all(&image).iter().all(|&b| b == 0));
    image.close().unwrap();
}

#[test]
fn raw_backing_length_is_rounded_up_to_512() {
    let raw = SyncDevice::new(raw_file(&[1; 70_000])).unwrap();
    assert_eq!(raw.size(), 70_144);
    // What a layer above reads of it (`read_padded`: zeros past its end).
    let buf = raw
        .block_on(copy_on_read::read_padded(&**raw.device(), 69_950, 200))
        .unwrap();
    assert!(buf[..50].iter().all(|&b| b == 1) && buf[50..].iter().all(|&b| b == 0));
}

#[test]
fn raw_backing_shorter_than_image_reads_zeros_past_its_end_like_qemu() {
    // The reference's 70000-byte example, written by both sides the same way.
    let dir = tempdir();
    std::fs::write(dir.path().join("base.raw"), vec![0x11u8; 70_000]).unwrap();
    let ours = dir.path().join("ours.qed");
    let theirs = dir.path().join("theirs.qed");
    let mut o = CreateOptions::new(1 << 20);
    o.backing = Some(("base.raw".into(), BackingFormat::Raw));
    Image::create_path(&ours, &o).unwrap();
    qemu::create_qed(&theirs, "1M", &["-b", "base.raw", "-F", "raw"]);
    let image = open_rw(&ours);
    let untouched = read_all(&image);
    assert!(untouched[..70_000].iter().all(|&b| b == 0x11));
    assert!(untouched[70_000..].iter().all(|&b| b == 0));
    // A COW of the cluster holding the backing's end, from each side.
    image.write_at(&[0xaa; 100], 66_000).unwrap();
    image.close().unwrap();
    qemu::io_commands("qed", &theirs, &["write -P 0xaa 66000 100".into()]);
    assert_same_bytes(
        &qemu::convert_to_raw(&ours),
        &qemu::convert_to_raw(&theirs),
        "COW at backing EOF",
    );
    assert_same_bytes(
        &read_all(&open_ro(&theirs)),
        &read_all(&open_ro(&ours)),
        "our reads",
    );
    qemu::assert_check_clean(&ours);
}

#[test]
fn write_to_last_cluster_of_an_unaligned_size_matches_qemu() {
    let dir = tempdir();
    std::fs::write(dir.path().join("base.raw"), vec![0x11u8; 3 << 20]).unwrap();
    let size = (1 << 20) + 512; // the last 64K cluster is mostly past the end
    for backing in [false, true] {
        let ours = dir.path().join(format!("ours{backing}.qed"));
        let theirs = dir.path().join(format!("theirs{backing}.qed"));
        let mut o = CreateOptions::new(size);
        let size_arg = size.to_string();
        let mut args = vec!["create", "-f", "qed"];
        if backing {
            o.backing = Some(("base.raw".into(), BackingFormat::Raw));
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        args.extend([path_str(&theirs), &size_arg]);
        qemu::img(&args);
        Image::create_path(&ours, &o).unwrap();
        let image = open_rw(&ours);
        image.write_at(&[0x42; 300], size - 300).unwrap();
        image.close().unwrap();
        qemu::io_commands(
            "qed",
            &theirs,
            &[format!("write -P 0x42 {} 300", size - 300)],
        );
        assert_same_bytes(
            &qemu::convert_to_raw(&ours),
            &qemu::convert_to_raw(&theirs),
            "tail write",
        );
        // The whole last cluster was allocated and filled (backing data past the disk's end).
        let g = 65536u64;
        let ours_img = open_detached(&ours).unwrap();
        let theirs_img = open_detached(&theirs).unwrap();
        let host = |i: &Image| match i.mapping_at(qed::GuestOffset(size - 1), 1).unwrap().0 {
            Mapping::Data(h) => h.0 / g * g,
            m => panic!("{m:?}"),
        };
        let mut a = vec![0u8; g as usize];
        let mut b = vec![0u8; g as usize];
        ours_img.storage().read_at(&mut a, host(&ours_img)).unwrap();
        theirs_img
            .storage()
            .read_at(&mut b, host(&theirs_img))
            .unwrap();
        assert_same_bytes(
            &a,
            &b,
            "the stored last cluster, including past the disk's end",
        );
        qemu::assert_check_clean(&ours);
        assert_check_agrees(&ours);
    }
}

#[test]
fn resize_grows_like_qemu_and_refuses_to_shrink() {
    let dir = tempdir();
    let ours = dir.path().join("ours.qed");
    let theirs = dir.path().join("theirs.qed");
    Image::create_path(&ours, &CreateOptions::new(1 << 20)).unwrap();
    qemu::img(&["create", "-f", "qed", path_str(&theirs), "1M"]);
    let image = open_rw(&ours);
    assert!(matches!(
        image.image().resize(512 << 10),
        Err(Error::Shrink)
    ));
    assert!(matches!(
        image.image().resize((2 << 20) + 1),
        Err(Error::InvalidOptions(_))
    ));
    image.image().resize(3 << 20).unwrap();
    image.write_at(&[1; 10], (3 << 20) - 10).unwrap();
    image.close().unwrap();
    qemu::img(&["resize", "-f", "qed", path_str(&theirs), "3M"]);
    qemu::io_commands(
        "qed",
        &theirs,
        &[format!("write -P 1 {} 10", (3 << 20) - 10)],
    );
    assert_eq!(
        std::fs::read(&ours).unwrap()[..64],
        std::fs::read(&theirs).unwrap()[..64]
    );
    assert_same_bytes(
        &qemu::convert_to_raw(&ours),
        &qemu::convert_to_raw(&theirs),
        "resized",
    );
    qemu::assert_check_clean(&ours);
}

#[test]
fn set_backing_writes_the_header_qemu_rebase_unsafe_writes() {
    let dir = tempdir();
    std::fs::write(dir.path().join("a-long-base-name.raw"), vec![1u8; 4096]).unwrap();
    std::fs::write(dir.path().join("b.raw"), vec![2u8; 4096]).unwrap();
    let ours = dir.path().join("ours.qed");
    let theirs = dir.path().join("theirs.qed");
    for p in [&ours, &theirs] {
        qemu::create_qed(p, "1M", &["-b", "a-long-base-name.raw", "-F", "raw"]);
    }
    let first_cluster = |p: &Path| std::fs::read(p).unwrap()[..65536].to_vec();
    // Switch to a shorter raw name: stale bytes of the old name stay, as in QEMU.
    let image = open_rw(&ours);
    image
        .image()
        .set_backing(Some(("b.raw", BackingFormat::Raw)))
        .unwrap();
    image.close().unwrap();
    qemu::img(&[
        "rebase",
        "-u",
        "-f",
        "qed",
        "-b",
        "b.raw",
        "-F",
        "raw",
        path_str(&theirs),
    ]);
    assert_same_bytes(
        &first_cluster(&ours),
        &first_cluster(&theirs),
        "rebase -u to b.raw",
    );
    // Remove the link.
    let image = open_rw(&ours);
    image.image().set_backing(None).unwrap();
    image.close().unwrap();
    qemu::img(&["rebase", "-u", "-f", "qed", "-b", "", path_str(&theirs)]);
    assert_same_bytes(
        &first_cluster(&ours),
        &first_cluster(&theirs),
        "rebase -u -b ''",
    );
    qemu::assert_check_clean(&ours);
}

#[test]
fn a_long_backing_name_written_apart_from_the_header_is_read_by_qemu() {
    // A name that does not fit the first sector with the header is written where the header
    // in force does not look, then the header points at it (crash safety): QEMU reads it
    // there, and reads the image through it.
    let dir = tempdir();
    let base: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let ours = dir.path().join("ours.qed");
    qemu::create_qed(&ours, "1M", &["-b", "base.raw", "-F", "raw"]);
    for name in [
        format!("{}base.raw", ".//".repeat(200)),
        format!("{}base.raw", "./".repeat(300)),
    ] {
        let image = open_rw(&ours);
        image
            .image()
            .set_backing(Some((&name, BackingFormat::Raw)))
            .unwrap();
        image.close().unwrap();
        let offset = peek_u64(&ours, 56) & 0xffff_ffff;
        assert_ne!(offset, 64, "the name was written apart from the header");
        let info = qemu::img(&["info", "--output=json", "-f", "qed", path_str(&ours)]);
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["backing-filename"], name.as_str(), "{info:#}");
        assert_same_bytes(&qemu::convert_to_raw(&ours), &base, "QEMU through the name");
        qemu::assert_check_clean(&ours);
    }
}

#[test]
fn populate_then_unlink_backing_keeps_content_like_qemu_stream() {
    // Our copy-on-read primitive, driven like block-stream: every cluster-aligned chunk of the
    // backing is offered to `populate`; guest data already there wins; afterwards the backing
    // link is removed and QEMU must see the same disk, clean.
    let dir = tempdir();
    let mut base = vec![0u8; 3 << 20];
    qedstream_tests::XorShift::new(11).fill(&mut base);
    base[1 << 20..(1 << 20) + (512 << 10)].fill(0);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let path = dir.path().join("s.qed");
    let mut o = CreateOptions::new(4 << 20);
    o.backing = Some(("base.raw".into(), BackingFormat::Raw));
    Image::create_path(&path, &o).unwrap();
    let image = open_rw(&path);
    image.write_at(&[0x77; 100_000], 30_000).unwrap();
    image.write_zeroes(2 << 20, 128 << 10).unwrap();
    let before = read_all(&image);
    let mut total = qed::PopulateOutcome::default();
    let mut pos = 0u64;
    while pos < image.size() {
        let n = (512u64 << 10).min(image.size() - pos);
        let backing = image.backing().unwrap();
        let chunk = image
            .block_on(copy_on_read::read_padded(&*backing, pos, n as usize))
            .unwrap();
        let out = image
            .image()
            .populate(qed::GuestOffset(pos), &chunk, true)
            .unwrap();
        total.written += out.written;
        total.zeroed += out.zeroed;
        total.skipped += out.skipped;
        pos += n;
    }
    assert_eq!(total.written + total.zeroed + total.skipped, 4 << 20);
    assert!(total.zeroed >= 512 << 10, "{total:?}");
    // Populating again changes nothing.
    let again = image
        .image()
        .populate(qed::GuestOffset(0), &before[..1 << 20], true)
        .unwrap();
    assert_eq!(again.skipped, 1 << 20);
    image.image().set_backing(None).unwrap();
    assert_same_bytes(&read_all(&image), &before, "after unlinking the backing");
    image.close().unwrap();
    let flat = qemu::convert_to_raw(&path);
    assert_same_bytes(&flat, &before, "QEMU's view after the stream");
    qemu::assert_check_clean(&path);
    assert_check_agrees(&path);
    assert_eq!(qedstream_tests::features_on_disk(&path), 0);
    // Misuse is refused.
    let image = open_rw(&path);
    assert!(matches!(
        image
            .image()
            .populate(qed::GuestOffset(100), &[0; 4096], true),
        Err(Error::InvalidOptions(_))
    ));
    assert!(matches!(
        image.image().populate(qed::GuestOffset(0), &[0; 100], true),
        Err(Error::InvalidOptions(_))
    ));
    image.close().unwrap();
}

#[test]
fn three_level_chain_reads_and_writes_like_qemu() {
    // top.qed (4K clusters) -> mid.qed (64K) -> base.raw (shorter than both), QEMU-written;
    // then the same writes on a copy of top by QEMU and by us.
    let dir = tempdir();
    let d = |n: &str| dir.path().join(n);
    let mut base = vec![0u8; 700_001];
    qedstream_tests::XorShift::new(5).fill(&mut base);
    std::fs::write(d("base.raw"), &base).unwrap();
    qemu::create_qed(&d("mid.qed"), "2M", &["-b", "base.raw", "-F", "raw"]);
    qemu::io_commands(
        "qed",
        &d("mid.qed"),
        &[
            "write -P 0x21 60000 90000".into(),
            "write -z 196608 131072".into(),
        ],
    );
    qemu::create_qed(
        &d("top.qed"),
        "3M",
        &[
            "-o",
            "cluster_size=4096,table_size=2",
            "-b",
            "mid.qed",
            "-F",
            "qed",
        ],
    );
    qemu::io_commands(
        "qed",
        &d("top.qed"),
        &["write -P 0x31 100000 5000".into(), "write -z 1M 8k".into()],
    );
    let expected = qemu::convert_to_raw(&d("top.qed"));
    assert_same_bytes(
        &read_all(&open_ro(&d("top.qed"))),
        &expected,
        "three-level read",
    );
    std::fs::copy(d("top.qed"), d("theirs.qed")).unwrap();
    let ours = open_rw(&d("top.qed"));
    ours.write_at(&[0x41; 20_000], 190_000).unwrap();
    ours.write_at(&[0x42; 3], 2_500_000).unwrap();
    ours.close().unwrap();
    qemu::io_commands(
        "qed",
        &d("theirs.qed"),
        &[
            "write -P 0x41 190000 20000".into(),
            "write -P 0x42 2500000 3".into(),
        ],
    );
    assert_same_bytes(
        &qemu::convert_to_raw(&d("top.qed")),
        &qemu::convert_to_raw(&d("theirs.qed")),
        "COW through the chain",
    );
    qemu::assert_check_clean(&d("top.qed"));
    assert_check_agrees(&d("top.qed"));
}
