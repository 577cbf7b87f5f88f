//! `BlockDevice::read_mapped`: the copy-on-read device answers a range its image holds alone
//! (data and zero clusters, or anything without a backing) with the bytes and their status in
//! one step, filling every byte of the caller's buffer (the NBD server reuses buffers, so a
//! byte left alone would leak an earlier read), and gives the buffer back unread where the
//! backing shows through.

use copy_on_read::{BlockDevice, CorDevice, CorOptions, PoolBuf, Status, StatusExtent};
use qedstream_tests::runtime::two_workers;
use qedstream_tests::tools::{flatten, ok, qemu_io, raw_fixture};

fn extent(offset: u64, length: u64, status: Status) -> StatusExtent {
    StatusExtent {
        offset,
        length,
        status,
    }
}

#[test]
fn local_ranges_come_with_their_status_and_backed_ones_come_back_unread() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    raw_fixture(dir);
    let expect = flatten(dir, "top.qed", "qed");
    two_workers().block_on(async {
        let dev = CorDevice::open(&dir.join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        // Local data (512k, 64k) and a zero cluster (2M, 64k): answered, every byte filled.
        for (offset, want) in [(512u64 << 10, Status::Data), (2 << 20, Status::Zero)] {
            let (data, status) = dev
                .read_mapped(offset, PoolBuf::Vec(vec![0xeeu8; 65536]))
                .await
                .unwrap()
                .expect("a local range is answered");
            assert!(
                data[..] == expect[offset as usize..][..65536],
                "bytes at {offset}"
            );
            assert_eq!(
                status,
                vec![extent(offset, 65536, want)],
                "status at {offset}"
            );
        }
        // Local data then clusters the backing fills: the buffer comes back unread.
        let back = dev
            .read_mapped(512 << 10, PoolBuf::Vec(vec![0xeeu8; 256 << 10]))
            .await
            .unwrap()
            .expect_err("the backing shows through");
        assert_eq!(back.len(), 256 << 10);
        assert!(
            back.iter().all(|&b| b == 0xee),
            "a refused read wrote the buffer"
        );
        assert_eq!(
            dev.stats().cor_bytes,
            0,
            "a refused read copied something in"
        );
        BlockDevice::close(&dev).await.unwrap();
    });
}

#[test]
fn without_a_backing_unallocated_clusters_read_as_zero_holes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "plain.qed", "1M"],
    );
    qemu_io(
        dir,
        "qed",
        "plain.qed",
        &[
            "write -P 0x55 0 64k",
            "write -z 128k 64k",
            "write -P 0x66 320k 64k",
        ],
    );
    two_workers().block_on(async {
        let dev = CorDevice::open(&dir.join("plain.qed"), CorOptions::default())
            .await
            .unwrap();
        let (data, status) = dev
            .read_mapped(0, PoolBuf::Vec(vec![0xeeu8; 384 << 10]))
            .await
            .unwrap()
            .expect("an image without a backing answers every range");
        assert!(data[..64 << 10].iter().all(|&b| b == 0x55));
        assert!(
            data[64 << 10..320 << 10].iter().all(|&b| b == 0),
            "holes not zeroed"
        );
        assert!(data[320 << 10..].iter().all(|&b| b == 0x66));
        let want = vec![
            extent(0, 64 << 10, Status::Data),
            extent(64 << 10, 256 << 10, Status::Zero),
            extent(320 << 10, 64 << 10, Status::Data),
        ];
        assert_eq!(status, want);
        BlockDevice::close(&dev).await.unwrap();
    });
}
