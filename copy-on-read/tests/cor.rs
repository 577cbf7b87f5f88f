//! The copy-on-read device against QEMU as the oracle: what it reads equals `qemu-img
//! convert` of the chain, what it stores passes `qemu-img check`, reads of missing clusters
//! store whole clusters (zero clusters for zeros), and guest writes into unallocated clusters
//! keep the backing data around them.

use qedstream_tests::runtime::two_workers;
use std::path::Path;
use std::sync::Arc;

use copy_on_read::{BlockDevice, CorDevice, CorOptions, Error, Gate, GateRefusal, Status};
use qed::Mapping;
use qedstream_tests::tools::{
    chain_fixture, create_overlay, flatten, ok, qemu_check, qemu_io, raw_fixture,
};

/// Recipe A with `cmds` applied by QEMU to a copy of `top.qed`: the flattened content the
/// same writes through our device must give.
fn oracle_after(dir: &Path, cmds: &[&str]) -> Vec<u8> {
    raw_fixture(dir);
    std::fs::copy(dir.join("top.qed"), dir.join("oracle.qed")).unwrap();
    qemu_io(dir, "qed", "oracle.qed", cmds);
    flatten(dir, "oracle.qed", "qed")
}

/// Opens `top.qed` in `dir` with copy-on-read off: only writes may allocate.
async fn open_without_cor(dir: &Path) -> CorDevice {
    let options = CorOptions {
        copy_on_read: false,
        ..CorOptions::default()
    };
    CorDevice::open(&dir.join("top.qed"), options)
        .await
        .unwrap()
}

#[test]
fn reads_equal_qemu_convert_and_store_whole_clusters() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    raw_fixture(dir);
    let expect = flatten(dir, "top.qed", "qed");
    two_workers().block_on(async {
        let dev = CorDevice::open(&dir.join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        // A 4 KiB read in the middle of an unallocated cluster copies the whole cluster.
        let got = dev.read_at(70_000, vec![0u8; 4096]).await.unwrap();
        assert_eq!(got, expect[70_000..74_096]);
        dev.settle_copy_ins().await;
        let map = dev.local_map(65536, 65536).await.unwrap();
        assert!(matches!(map[0].mapping, Mapping::Data(_)), "{map:?}");
        // A read of a backing hole becomes a zero cluster, never data.
        let got = dev.read_at(1 << 20, vec![1u8; 65536]).await.unwrap();
        assert!(got.iter().all(|&b| b == 0));
        dev.settle_copy_ins().await;
        let map = dev.local_map(1 << 20, 65536).await.unwrap();
        assert_eq!(map[0].mapping, Mapping::Zero, "{map:?}");
        // Past the backing's end (8M..12M) reads zeros.
        let got = dev.read_at(9 << 20, vec![1u8; 4096]).await.unwrap();
        assert!(got.iter().all(|&b| b == 0));
        // The whole disk, in odd-sized pieces.
        let mut pos = 0u64;
        let mut step = 12_345u64;
        while pos < expect.len() as u64 {
            let n = step.min(expect.len() as u64 - pos);
            let got = dev.read_at(pos, vec![0u8; n as usize]).await.unwrap();
            assert!(
                got == expect[pos as usize..(pos + n) as usize],
                "differs at {pos}"
            );
            pos += n;
            step = step * 7 % 300_001 + 512;
        }
        assert!(dev.stats().cor_bytes > 0);
        dev.close().await.unwrap();
    });
    assert_eq!(qemu_check(dir, "top.qed"), 0);
    // Still linked, same content as before.
    assert_eq!(flatten(dir, "top.qed", "qed"), expect);
}

#[test]
fn partial_writes_into_unallocated_clusters_keep_the_backing_around_them() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // QEMU does the same writes on a copy.
    let expect = oracle_after(
        dir,
        &[
            "write -P 0x5a 70000 100",
            "write -P 0x5b 2200000 200000",
            "write -P 0x5c 12582400 512",
            "write -P 0x5d 3200000 70000",
        ],
    );
    two_workers().block_on(async {
        // Writes only: nothing else may allocate.
        let dev = open_without_cor(dir).await;
        dev.write_at(70_000, vec![0x5a; 100]).await.unwrap();
        dev.write_at(2_200_000, vec![0x5b; 200_000]).await.unwrap();
        dev.write_at(12_582_400, vec![0x5c; 512]).await.unwrap();
        dev.write_at(3_200_000, vec![0x5d; 70_000]).await.unwrap();
        let all = dev.read_at(0, vec![0u8; expect.len()]).await.unwrap();
        assert!(all == expect, "content differs from QEMU's");
        dev.close().await.unwrap();
    });
    assert_eq!(qemu_check(dir, "top.qed"), 0);
    assert_eq!(flatten(dir, "top.qed", "qed"), expect);
}

#[test]
fn write_zeroes_and_copy_on_read_off() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let expect = oracle_after(dir, &["write -z 60000 200000", "write -z 6M 64k"]);
    two_workers().block_on(async {
        let dev = open_without_cor(dir).await;
        let before = dev.local_map(0, dev.size()).await.unwrap();
        let _ = dev.read_at(1 << 20, vec![0u8; 1 << 20]).await.unwrap();
        assert_eq!(
            dev.local_map(0, dev.size()).await.unwrap(),
            before,
            "read stored data with copy-on-read off"
        );
        dev.write_zeroes(60_000, 200_000).await.unwrap();
        dev.write_zeroes(6 << 20, 65536).await.unwrap();
        let map = dev.local_map(6 << 20, 65536).await.unwrap();
        assert_eq!(map[0].mapping, Mapping::Zero);
        let all = dev.read_at(0, vec![0u8; expect.len()]).await.unwrap();
        assert!(all == expect, "content differs from QEMU's");
        // Block status: the zero cluster and the backing's hole read as zeros.
        let st = dev.block_status(6 << 20, 65536).await.unwrap();
        assert_eq!(st[0].status, Status::Zero);
        let st = dev.block_status(1 << 20, 65536).await.unwrap();
        assert_eq!(st[0].status, Status::Zero);
        let st = dev.block_status(2 << 20 | 65536, 65536).await.unwrap();
        assert_eq!(st[0].status, Status::Data);
        dev.close().await.unwrap();
    });
    assert_eq!(qemu_check(dir, "top.qed"), 0);
}

#[test]
fn a_three_deep_chain_reads_like_qemu() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    chain_fixture(
        dir,
        &["write -P 0x01 0 6M"],
        &["write -P 0x02 1M 1M", "write -z 3M 128k"],
    );
    let expect = flatten(dir, "top.qed", "qed");
    two_workers().block_on(async {
        let dev = CorDevice::open(&dir.join("top.qed"), CorOptions::default())
            .await
            .unwrap();
        assert!(dev.backing().unwrap().describe().contains("b2.qed"));
        let all = dev.read_at(0, vec![0u8; expect.len()]).await.unwrap();
        assert!(all == expect);
        // The zero cluster in the middle layer shows as zero.
        let st = copy_on_read::status_padded(&*dev.backing().unwrap(), 3 << 20, 65536)
            .await
            .unwrap();
        assert_eq!(st[0].status, Status::Zero);
        dev.close().await.unwrap();
    });
    assert_eq!(qemu_check(dir, "top.qed"), 0);
    assert_eq!(flatten(dir, "top.qed", "qed"), expect);
}

#[test]
fn the_gate_refuses_loops_probing_escapes_and_depth() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-f", "qed", "a.qed", "1M"]);
    create_overlay(dir, "a.qed", "qed", "b.qed", Some("1M"));
    ok(
        dir,
        "qemu-img",
        &[
            "rebase", "-u", "-f", "qed", "-b", "b.qed", "-F", "qed", "a.qed",
        ],
    );
    ok(
        dir,
        "qemu-img",
        &[
            "create", "-u", "-f", "qed", "-b", "b.qed", "-F", "qed", "top.qed", "1M",
        ],
    );
    let rt = two_workers();
    let open = |name: &str, gate: Gate| {
        let p = dir.join(name);
        rt.block_on(async move {
            CorDevice::open(
                &p,
                CorOptions {
                    gate,
                    ..CorOptions::default()
                },
            )
            .await
        })
    };
    let refusal = |r: Result<CorDevice, Error>| match r {
        Err(Error::Gate { refusal, .. }) => refusal,
        Err(e) => panic!("expected a gate refusal, got {e}"),
        Ok(_) => panic!("expected a gate refusal, the open succeeded"),
    };
    assert!(matches!(
        refusal(open("top.qed", Gate::default())),
        GateRefusal::Loop(_)
    ));
    let no_probe = Gate {
        allow_probe: false,
        ..Gate::default()
    };
    assert_eq!(
        refusal(open("top.qed", no_probe)),
        GateRefusal::ProbeForbidden
    );
    let shallow = Gate {
        max_depth: 1,
        ..Gate::default()
    };
    assert!(matches!(
        refusal(open("top.qed", shallow)),
        GateRefusal::TooDeep(1) | GateRefusal::Loop(_)
    ));
    // A name escaping the confinement directory.
    let inner = dir.join("inner");
    std::fs::create_dir(&inner).unwrap();
    ok(
        dir,
        "qemu-img",
        &["create", "-f", "raw", "outside.raw", "1M"],
    );
    ok(
        &inner,
        "qemu-img",
        &[
            "create",
            "-f",
            "qed",
            "-b",
            "../outside.raw",
            "-F",
            "raw",
            "esc.qed",
            "1M",
        ],
    );
    let confined = Gate {
        confine_to: Some(inner.clone()),
        ..Gate::default()
    };
    assert!(matches!(
        refusal(open("inner/esc.qed", confined)),
        GateRefusal::OutsideConfinement(_)
    ));
    // NBD names can be forbidden.
    ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-u",
            "-f",
            "qed",
            "-b",
            "nbd+unix:///x?socket=/nonexistent.sock",
            "-F",
            "raw",
            "n.qed",
            "1M",
        ],
    );
    let no_nbd = Gate {
        allow_nbd: false,
        ..Gate::default()
    };
    assert!(matches!(
        refusal(open("n.qed", no_nbd)),
        GateRefusal::Protocol(_)
    ));
    // A probed raw backing with a QED header inside is opened as QED (as QEMU does) only when
    // probing is allowed; with the no-probe bit it stays raw.
    let raw_dev = rt.block_on(async {
        let dev = CorDevice::open(&inner.join("esc.qed"), CorOptions::default())
            .await
            .unwrap();
        let s = dev.backing().unwrap().describe();
        dev.close().await.unwrap();
        s
    });
    assert!(raw_dev.starts_with("raw "), "{raw_dev}");
    let _ = Arc::new(());
}
