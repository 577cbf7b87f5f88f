//! `BlockDevice::read_blocking`, the vhost-user-blk workers' fast path: the copy-on-read
//! device reads a range its image holds alone (data and zero clusters) on the calling thread,
//! into every segment of the caller's buffers; gives the buffers back where the backing shows
//! through (nothing copied in, so `readv` still does the copy-on-read); reads unallocated
//! clusters of an image without a backing as zeros; and refuses after close. A raw file always
//! answers. Graded by QEMU's own reading of the same chain.

use copy_on_read::{BlockDevice, CorDevice, CorOptions, IoBufs, RawFile};
use qed::{GuestOffset, Mapping};
use qedstream_tests::runtime::two_workers;
use qedstream_tests::tools::{flatten, ok, qemu_io, raw_fixture};

/// Three segments of 0xee covering `len` bytes (so a byte left unfilled shows).
fn segments(len: usize) -> IoBufs {
    let a = len / 3;
    IoBufs::from_vecs(vec![vec![0xee; a], vec![0xee; a], vec![0xee; len - 2 * a]])
}

#[test]
fn local_ranges_are_read_on_the_calling_thread_and_backed_ones_come_back() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    raw_fixture(dir);
    let expect = flatten(dir, "top.qed", "qed");
    let rt = two_workers();
    let dev = rt
        .block_on(CorDevice::open(&dir.join("top.qed"), CorOptions::default()))
        .unwrap();
    // Local data (512k) and a zero cluster (2M): read here, every byte filled.
    for offset in [512u64 << 10, 2 << 20] {
        let bufs = dev
            .read_blocking(offset, segments(65536))
            .unwrap()
            .expect("a local range is answered");
        assert!(
            bufs.into_vec() == expect[offset as usize..][..65536],
            "bytes at {offset}"
        );
    }
    // Local data, then clusters only the backing has: given back, and nothing copied in.
    let back = dev.read_blocking(512 << 10, segments(256 << 10)).unwrap();
    assert!(back.is_err(), "a range the backing fills is not answered");
    let at = GuestOffset(576 << 10);
    assert_eq!(
        dev.image().mapping_at(at, 1).unwrap().0,
        Mapping::Unallocated
    );
    // readv then does the copy-on-read, and the fast path answers the range afterwards.
    let via_readv = rt
        .block_on(dev.readv(512 << 10, segments(256 << 10)))
        .unwrap();
    let want = &expect[512 << 10..][..256 << 10];
    assert!(via_readv.into_vec() == want);
    // The copy-in is stored in the background: wait for it (a hang guard that fails).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while dev.image().mapping_at(at, 1).unwrap().0 == Mapping::Unallocated {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy-in never landed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let now = dev
        .read_blocking(512 << 10, segments(256 << 10))
        .unwrap()
        .expect("copied in, so local");
    assert!(now.into_vec() == want);

    // Out of range, and closed: errors, not answers.
    assert!(dev.read_blocking(dev.size() - 10, segments(4096)).is_err());
    rt.block_on(dev.close()).unwrap();
    assert!(dev.read_blocking(0, segments(4096)).is_err());
}

#[test]
fn an_image_without_a_backing_and_a_raw_file_answer_every_range() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-f", "qed", "solo.qed", "4M"]);
    qemu_io(dir, "qed", "solo.qed", &["write -P 0x5a 1M 64k"]);
    ok(dir, "qemu-img", &["create", "-f", "raw", "disk.raw", "4M"]);
    qemu_io(dir, "raw", "disk.raw", &["write -P 0x6b 3M 64k"]);
    let expect = flatten(dir, "solo.qed", "qed");
    let rt = two_workers();
    let solo = rt
        .block_on(CorDevice::open(
            &dir.join("solo.qed"),
            CorOptions::default(),
        ))
        .unwrap();
    let bufs = solo
        .read_blocking(960 << 10, segments(192 << 10))
        .unwrap()
        .expect("no backing: every range is local");
    assert!(bufs.into_vec() == expect[960 << 10..][..192 << 10]);
    drop(solo);

    let raw = RawFile::open(&dir.join("disk.raw"), false).unwrap();
    let bufs = raw
        .read_blocking((3 << 20) - 100, segments(8192))
        .unwrap()
        .expect("a raw file always answers");
    let expect = std::fs::read(dir.join("disk.raw")).unwrap();
    assert!(bufs.into_vec() == expect[(3 << 20) - 100..][..8192]);
}
