//! The block-device API tells the truth and takes the caller's memory: vectored reads land in
//! the caller's segments (the same allocations come back), FUA writes are durable, a missing
//! capability is refused rather than faked, the link state of an NBD backing reaches through
//! every layer, and every request after `close` fails with a typed error.

use qedstream_tests::runtime::two_workers;
use std::sync::Arc;

use copy_on_read::{
    status_padded, BlockDevice, CorDevice, CorOptions, Error, IoBufs, LinkState, NbdExport,
    Populate, RawFile, Status, WriteFlags,
};
use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::tools::{ok, qemu_check, qemu_io, raw_fixture};

#[test]
fn vectored_reads_fill_the_callers_segments() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    raw_fixture(dir);
    let expect = qedstream_tests::tools::flatten(dir, "top.qed", "qed");
    two_workers().block_on(async {
        let dev = CorDevice::open(&dir.join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        // Segments of odd sizes, across local data (512k), a partial write (100k), a zero
        // cluster (2M) and backing data the image lacks.
        for (offset, sizes) in [
            (512u64 << 10, vec![4096usize, 100, 60_000, 1]),
            (90 << 10, vec![20_000, 512, 30_000]),
            (2 << 20, vec![65_536, 65_536]),
            (3 << 20, vec![7, 70_000, 123_456]),
        ] {
            let mut bufs = IoBufs::new();
            let mut ptrs = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                let v = vec![0xeeu8; *n];
                ptrs.push(v.as_ptr() as usize);
                if i % 2 == 0 {
                    bufs.push_vec(v);
                } else {
                    bufs.push(v.into_boxed_slice());
                }
            }
            let total: usize = sizes.iter().sum();
            let bufs = dev.readv(offset, bufs).await.unwrap();
            let mut got = vec![0u8; total];
            bufs.copy_out(0, &mut got);
            assert!(
                got == expect[offset as usize..offset as usize + total],
                "readv at {offset}"
            );
            // The segments that come back are the caller's own allocations.
            let back: Vec<usize> = bufs
                .into_segments()
                .iter()
                .map(|s| s.as_bytes().as_ptr() as usize)
                .collect();
            assert_eq!(back, ptrs, "segments were replaced by copies");
        }
        dev.close().await.unwrap();
    });
    assert_eq!(qemu_check(dir, "top.qed"), 0);
}

#[test]
fn vectored_fua_writes_land_and_qemu_agrees() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    raw_fixture(dir);
    std::fs::copy(dir.join("top.qed"), dir.join("oracle.qed")).unwrap();
    qemu_io(
        dir,
        "qed",
        "oracle.qed",
        &["write -P 0x41 100000 3000", "write -P 0x42 103000 70000"],
    );
    two_workers().block_on(async {
        let dev = CorDevice::open(&dir.join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        let mut bufs = IoBufs::new();
        bufs.push_vec(vec![0x41; 3000]);
        bufs.push(vec![0x42u8; 70000].into_boxed_slice());
        dev.writev(100_000, bufs, WriteFlags::FUA).await.unwrap();
        dev.close().await.unwrap();
    });
    ok(
        dir,
        "qemu-img",
        &["compare", "-f", "qed", "-F", "qed", "oracle.qed", "top.qed"],
    );
    assert_eq!(qemu_check(dir, "top.qed"), 0);
}

#[test]
fn requests_after_close_fail_with_a_typed_error() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    raw_fixture(dir);
    two_workers().block_on(async {
        let cor = CorDevice::open(&dir.join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        let raw = RawFile::open(&dir.join("base.raw"), false).unwrap();
        let devices: Vec<Arc<dyn BlockDevice>> = vec![Arc::new(cor), Arc::new(raw)];
        for dev in devices {
            dev.read_at(0, vec![0u8; 512]).await.unwrap();
            dev.close().await.unwrap();
            assert!(
                matches!(dev.read_at(0, vec![0u8; 512]).await, Err(Error::Closed)),
                "{}: read after close",
                dev.describe()
            );
            assert!(matches!(dev.flush().await, Err(Error::Closed)));
            assert!(matches!(dev.block_status(0, 512).await, Err(Error::Closed)));
            if dev.capabilities().writable {
                assert!(matches!(
                    dev.write_at(0, vec![1u8; 512]).await,
                    Err(Error::Closed)
                ));
                assert!(matches!(dev.write_zeroes(0, 512).await, Err(Error::Closed)));
            }
            // A second close is harmless.
            dev.close().await.unwrap();
        }
    });
    assert_eq!(qemu_check(dir, "top.qed"), 0);
}

#[test]
fn missing_capabilities_are_refused_not_faked() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    raw_fixture(dir);
    let sock = dir.join("nx.sock");
    // nbdkit without structured replies (--no-sr): no block status to offer.
    let _server = NbdServer::start(
        "nbdkit",
        [
            "-f".into(),
            "-r".into(),
            "-U".into(),
            sock.clone().into_os_string(),
            "--no-sr".into(),
            "file".into(),
            format!("file={}", dir.join("base.raw").display()).into(),
        ],
        &sock,
    );
    two_workers().block_on(async {
        let cor = CorDevice::open(&dir.join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        assert!(!cor.capabilities().discard);
        assert!(matches!(
            cor.discard(0, 65536).await,
            Err(Error::Unsupported(_))
        ));
        cor.close().await.unwrap();

        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let nbd = NbdExport::connect(&uri, Default::default()).await.unwrap();
        let caps = nbd.capabilities();
        assert!(!caps.block_status, "{caps:?}");
        assert!(!caps.writable && !caps.discard, "{caps:?}");
        assert!(matches!(
            nbd.block_status(0, 4096).await,
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            nbd.discard(0, 4096).await,
            Err(Error::Unsupported(_))
        ));
        // A caller that wants an answer anyway says "data" itself.
        let s = status_padded(&nbd, 0, 4096).await.unwrap();
        assert_eq!(s[0].status, Status::Data);
        nbd.close().await.unwrap();
    });
}

#[test]
fn the_link_state_of_an_nbd_backing_reaches_through_every_layer() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-f", "raw", "base.raw", "4M"]);
    let sock = dir.join("b.sock");
    let mut server = NbdServer::qemu_nbd(&dir.join("base.raw"), &sock);
    let uri = format!("nbd+unix:///exp?socket={}", sock.display());
    // top.qed -> mid.qed -> NBD: the NBD export is two layers down.
    ok(
        dir,
        "qemu-img",
        &[
            "create", "-f", "qed", "-b", &uri, "-F", "raw", "mid.qed", "4M",
        ],
    );
    ok(
        dir,
        "qemu-img",
        &[
            "create", "-f", "qed", "-b", "mid.qed", "-F", "qed", "top.qed",
        ],
    );
    ok(dir, "qemu-img", &["create", "-f", "qed", "local.qed", "4M"]);
    two_workers().block_on(async {
        let local = CorDevice::open(&dir.join("local.qed"), CorOptions::default())
            .await
            .unwrap();
        assert!(local.reconnect().is_none());
        assert!(!local.capabilities().reconnect);
        local.close().await.unwrap();

        let dev = CorDevice::open(&dir.join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        assert!(dev.capabilities().reconnect);
        let mid = Populate::backing(&dev).unwrap();
        assert!(
            mid.capabilities().reconnect,
            "the middle layer hides its link"
        );
        let link = dev.reconnect().expect("the link state is forwarded");
        assert_eq!(link.state(), LinkState::Connected);
        server.kill();
        // A request notices the loss; the state the embedder watches follows.
        let read = tokio::spawn({
            let dev = Arc::new(dev);
            let d2 = dev.clone();
            async move {
                let _ = d2.read_at(0, vec![0u8; 4096]).await;
                dev
            }
        });
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            link.changed(LinkState::Connected),
        )
        .await
        .expect("the link state never changed after the server died");
        assert_ne!(next, LinkState::Connected);
        server.restart();
        let dev = read.await.unwrap();
        dev.close().await.unwrap();
    });
}

/// "What if qemu-nbd dies": a copy-on-read read waiting on a dead server (the client is
/// reconnecting) completes once the backing is repointed at a second qemu-nbd serving a copy;
/// a repoint at an export of another size is refused and changes nothing; the header still
/// names the first server.
#[test]
fn a_read_waiting_on_a_dead_server_completes_from_the_repointed_one() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-f", "raw", "base.raw", "4M"]);
    qemu_io(dir, "raw", "base.raw", &["write -P 0x3c 1M 1M"]);
    std::fs::copy(dir.join("base.raw"), dir.join("copy.raw")).unwrap();
    ok(dir, "qemu-img", &["create", "-f", "raw", "small.raw", "2M"]);
    let mut first = NbdServer::qemu_nbd(&dir.join("base.raw"), &dir.join("a.sock"));
    ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-f",
            "qed",
            "-b",
            &first.uri(),
            "-F",
            "raw",
            "top.qed",
        ],
    );
    two_workers().block_on(async {
        let cor = Arc::new(
            CorDevice::open(&dir.join("top.qed"), CorOptions::default())
                .await
                .unwrap(),
        );
        let link = cor.reconnect().expect("an NBD backing");
        assert_eq!(link.address(), first.uri());
        first.kill();
        let reader = Arc::clone(&cor);
        let read = tokio::spawn(async move { reader.read_at(1 << 20, vec![0u8; 65536]).await });
        // The read is now waiting on the dead server (the client reconnects for 30 s).
        assert_ne!(link.changed(LinkState::Connected).await, LinkState::Connected);

        let small = NbdServer::qemu_nbd(&dir.join("small.raw"), &dir.join("c.sock"));
        let refused = link.repoint(&small.uri()).await;
        assert!(
            matches!(refused, Err(Error::RepointSizeMismatch { expected, found, .. }) if expected == 4 << 20 && found == 2 << 20),
            "{refused:?}"
        );
        assert_eq!(link.address(), first.uri(), "a refused repoint changed the link");

        let second = NbdServer::qemu_nbd(&dir.join("copy.raw"), &dir.join("b.sock"));
        link.repoint(&second.uri()).await.unwrap();
        let data = read.await.unwrap().unwrap();
        assert!(data.iter().all(|&b| b == 0x3c), "wrong data after the repoint");
        assert_eq!(link.state(), LinkState::Connected);
        assert_eq!(link.address(), second.uri());
        cor.close().await.unwrap();
    });
    let header = ok(dir, "qemu-img", &["info", "--output=json", "top.qed"]);
    assert!(
        header.contains("a.sock"),
        "the header was rewritten: {header}"
    );
    // The header's server is gone: check the image alone.
    let alone = format!(
        r#"json:{{"driver":"qed","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#,
        dir.join("top.qed").display()
    );
    ok(dir, "qemu-img", &["check", &alone]);
}
