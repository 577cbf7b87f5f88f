//! A guest read of clusters that another request is storing (the stream's populate, a
//! write, another read's copy-in: whoever holds their range lock) does not wait for it: it is
//! served from the backing and copies nothing in; once the lock is free, reads copy in again.

use std::time::Duration;

use copy_on_read::{BlockDevice, CorDevice, CorOptions};
use qed::GuestCluster;
use qedstream_tests::runtime::two_workers;
use qedstream_tests::tools::{flatten, raw_fixture};

#[test]
fn a_read_of_busy_clusters_is_served_from_the_backing_without_waiting() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    raw_fixture(dir);
    let expect = flatten(dir, "top.qed", "qed");
    two_workers().block_on(async {
        let dev = CorDevice::open(&dir.join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        let cs = dev.cluster_size();
        // Base data at 7M, which the overlay lacks: hold its clusters as a populate would.
        let at = 7u64 << 20;
        let c = GuestCluster(at / cs);
        let held = dev.range_lock().lock(c, GuestCluster(c.0 + 2)).await;
        // A read that waited for the lock would never end while we hold it: the deadline
        // turns that into a failure.
        let data = tokio::time::timeout(Duration::from_secs(60), dev.read_at(at, vec![0; 8192]))
            .await
            .expect("the read waited for the busy clusters")
            .unwrap();
        assert!(data == expect[at as usize..][..8192], "wrong bytes");
        assert_eq!(dev.stats().cor_bytes, 0, "copied in under another's lock");
        drop(held);
        let data = dev.read_at(at, vec![0; 8192]).await.unwrap();
        dev.settle_copy_ins().await;
        assert!(data == expect[at as usize..][..8192], "wrong bytes");
        assert!(dev.stats().cor_bytes > 0, "a free range is copied in");
        BlockDevice::close(&dev).await.unwrap();
    });
}
