//! Our own `nbd-client` against our server: extended headers, reads across holes, writes,
//! zeroes, flush, block status, and CACHE populating the copy-on-read overlay.

mod common;

use common::*;
use nbd_client::{Client, ClientConfig, HeaderMode, ZeroFlags};
use nbd_server::ServerConfig;
use qedstream_tests::tools::{self, raw_fixture};

#[test]
fn nbd_client_over_extended_headers_and_cache_populates_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_fixture(d);
    let flat = tools::flatten(d, "top.qed", "qed");
    let served = serve_cor(d, "top.qed", ServerConfig::default());
    let uri = served.uri("");
    let layers = served.layers.clone().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::connect_str(&uri, ClientConfig::default())
            .await
            .expect("connect");
        assert_eq!(c.export().mode, HeaderMode::Extended);
        assert!(c.has_block_status() && c.can_cache() && c.can_multi_conn());
        assert_eq!(c.export().block_size.preferred, 64 * 1024, "cluster size");

        // 7M..8M: base data (0x44), not in the overlay. CACHE copies it in.
        let before = layers.local_map(7 << 20, 1 << 20).await.unwrap();
        assert!(before.iter().all(|e| !e.local), "{before:?}");
        c.cache(7 << 20, 1 << 20).await.expect("cache");
        let after = layers.local_map(7 << 20, 1 << 20).await.unwrap();
        assert!(
            after.iter().all(|e| e.local) && !after.is_empty(),
            "CACHE left clusters unpopulated: {after:?}"
        );

        // The whole disk reads as the flattened chain (holes included).
        let all = c.read(0, 12 << 20).await.expect("read");
        assert!(all == flat, "read differs from the flattened chain");
        let extents = c.block_status(0, 12 << 20).await.expect("block status");
        assert!(extents.iter().any(|e| e.zero) && extents.iter().any(|e| !e.zero));

        c.write(5 << 20, &[0xee; 70_000]).await.expect("write");
        c.write_fua(9 << 20, &[0xef; 4096])
            .await
            .expect("write fua");
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        c.write_zeroes(0, 64 * 1024, fast)
            .await
            .expect("fast zero, whole cluster");
        let slow = c.write_zeroes(100, 10, fast).await.unwrap_err();
        assert_eq!(
            slow.server_errno(),
            Some(nbd_client::Errno::ENOTSUP),
            "{slow}"
        );
        c.flush().await.expect("flush");
        assert_eq!(c.read(5 << 20, 70_000).await.unwrap(), vec![0xee; 70_000]);
        assert_eq!(c.read(0, 65536).await.unwrap(), vec![0; 65536]);
        c.close().await;
    });
    drop(layers);
    served.stop();
    // QEMU reads what we wrote.
    tools::qemu_io(
        d,
        "qed",
        "top.qed",
        &[
            "read -P 0xee 5M 70000",
            "read -P 0xef 9M 4k",
            "read -P 0 0 64k",
            "read -P 0x44 7M 1M",
        ],
    );
    assert_eq!(tools::qemu_check(d, "top.qed"), 0);
}

/// READs reach the image in page-aligned buffers, which an O_DIRECT file (`serve --cache
/// none`) reads into with no bounce copy: over an image in memory that records its reads'
/// addresses, read by our client (structured replies: the device's mapped read).
#[test]
fn reads_reach_the_image_in_page_aligned_buffers() {
    use copy_on_read::{BlockDevice, CorDevice, Populate};
    use qedstream_tests::io_addresses::recorded_overlay;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let (image, seen) = recorded_overlay(8 << 20);
    let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    // No backing device: the image answers every range itself (a hole reads as zeros).
    let dev = Arc::new(CorDevice::new(image, "memory".into(), None));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(dev.write_at(1 << 20, data.clone())).unwrap();
    let layers: Arc<dyn Populate> = dev.clone();
    let served = serve_device(
        rt,
        dir.path(),
        dev,
        Some(layers),
        true,
        ServerConfig::default(),
    );
    let uri = served.uri("");
    seen.reset();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = client_rt.block_on(async {
        let c = Client::connect_str(&uri, ClientConfig::default())
            .await
            .expect("connect");
        let got = c.read(0, 6 << 20).await.expect("read");
        c.close().await;
        got
    });
    assert!(got[..1 << 20].iter().all(|&b| b == 0), "the hole before");
    assert!(got[1 << 20..5 << 20] == data[..], "the data");
    seen.reads
        .assert_all_aligned("cluster reads of the READs", 1);
    served.stop();
}
