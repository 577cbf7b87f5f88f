//! Real clients against our server: QEMU's `qemu-io`, `qemu-img`, and libnbd's `nbdinfo` and
//! `nbdcopy`, started as processes (one at a time, see `qedstream_tests::tools::spawn`)
//! against a server running in the test process, over a raw file and over the copy-on-read
//! device of a QED overlay on a raw base. QEMU (`qemu-img map`, `qemu-nbd -A`) is the oracle.

mod common;

use std::path::Path;
use std::process::Command;

use std::sync::Arc;

use common::*;
use copy_on_read::{BlockDevice, CorDevice, CorOptions, IoFuture, Populate};
use nbd_server::{AllocationDepth, DepthRun, Export, ListenAddr, Server, ServerConfig};
use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::tools::{self, ok, raw_fixture};
use serde_json::Value;

/// Per unit of `unit` bytes: whether `qemu-img map --output=json` of `target` says data.
fn data_units(dir: &Path, args: &[&str], size: u64, unit: u64) -> Vec<bool> {
    let mut a = vec!["map", "--output=json"];
    a.extend_from_slice(args);
    let out = ok(dir, "qemu-img", &a);
    let map: Vec<Value> = serde_json::from_str(&out).expect("qemu-img map json");
    let mut units = vec![None; (size / unit) as usize];
    for e in &map {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        assert!(data != zero || !data, "extent both data and zero: {e}");
        for u in start / unit..(start + length).div_ceil(unit) {
            let prev = units[u as usize].replace(data);
            // A unit split between extents is data if any part is.
            if prev == Some(true) {
                units[u as usize] = Some(true);
            }
        }
    }
    units
        .into_iter()
        .map(|u| u.expect("unit not covered"))
        .collect()
}

/// Per unit: whether our own map of the chain (`engine::chain::Chain::map`, what `qedstream
/// map` prints) says data.
fn our_data_units(dir: &Path, image: &str, size: u64, unit: u64) -> Vec<bool> {
    let gate = copy_on_read::Gate::default();
    let chain = engine::chain::Chain::open(&dir.join(image), None, &gate).expect("our chain");
    let mut units = vec![false; (size / unit) as usize];
    for e in chain.map().expect("our map") {
        if e.data {
            for u in e.start / unit..(e.start + e.length).div_ceil(unit) {
                units[u as usize] = true;
            }
        }
    }
    units
}

#[test]
fn qemu_io_reads_writes_zeroes_flushes_and_discards_a_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, "qemu-img", &["create", "-f", "raw", "disk.raw", "4M"]);
    tools::qemu_io(d, "raw", "disk.raw", &["write -P 0x11 0 1M"]);
    let served = serve_raw(d, "disk.raw", false);
    let uri = served.uri("");
    tools::qemu_io(
        d,
        "raw",
        &uri,
        &[
            "read -P 0x11 0 1M",
            "read -P 0 1M 3M",
            "write -P 0x5a 1M 64k",
            "write -f -P 0x6b 2M 4k",
            "write -z 512k 8k",
            "flush",
            "discard 3M 4k",
            "read -P 0x5a 1M 64k",
            "read -P 0x6b 2M 4k",
            "read -P 0 512k 8k",
            "read -P 0x11 520k 4k",
            "write -P 0x7c 4194303 1",
        ],
    );
    // FAST_ZERO on a raw file would write data: refused with ENOTSUP, nothing written.
    let out = tools::run(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -z -n 0 64k", &uri],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Operation not supported"),
        "fast zero accepted: {text}"
    );
    let stats = served.server.stats();
    assert!(
        stats.requests >= 10 && stats.bytes_written > 64 * 1024,
        "{stats:?}"
    );
    served.stop();
    let disk = std::fs::read(d.join("disk.raw")).unwrap();
    assert_eq!(disk.len(), 4 << 20);
    assert!(disk[..512 << 10].iter().all(|&b| b == 0x11));
    assert!(disk[512 << 10..520 << 10].iter().all(|&b| b == 0));
    assert!(disk[520 << 10..1 << 20].iter().all(|&b| b == 0x11));
    assert!(disk[1 << 20..(1 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(disk[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0x6b));
    assert_eq!(disk[(4 << 20) - 1], 0x7c);
}

#[test]
fn qemu_img_convert_compare_and_map_over_a_cor_device() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_fixture(d);
    let size = 12 << 20;
    let unit = 64 << 10;
    let flat = tools::flatten(d, "top.qed", "qed");
    let direct = data_units(d, &["top.qed"], size, unit);
    let ours = our_data_units(d, "top.qed", size, unit);
    assert_eq!(
        ours, direct,
        "our map and qemu-img map of the image disagree"
    );
    let served = serve_cor(d, "top.qed", ServerConfig::default());
    let uri = served.uri("");
    let over_nbd = data_units(d, &["-f", "raw", &uri], size, unit);
    assert_eq!(
        over_nbd, ours,
        "data per 64k cluster: NBD vs our map of the image"
    );
    ok(
        d,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &uri,
            "top.qed.flat.raw",
        ],
    );
    ok(
        d,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, "out.raw"],
    );
    assert!(
        std::fs::read(d.join("out.raw")).unwrap() == flat,
        "converted bytes differ"
    );
    served.stop();
}

#[test]
fn nbdcopy_copies_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_fixture(d);
    let flat = tools::flatten(d, "top.qed", "qed");
    let served = serve_cor(d, "top.qed", ServerConfig::default());
    let out = d.join("copy.raw");
    ok(d, "nbdcopy", &[&served.uri(""), s(&out)]);
    served.stop();
    assert!(std::fs::read(&out).unwrap() == flat, "nbdcopy bytes differ");
    // The copy went through copy-on-read: the overlay now matches its flattened self.
    ok(
        d,
        "qemu-img",
        &[
            "compare",
            "-f",
            "qed",
            "-F",
            "raw",
            "top.qed",
            "top.qed.flat.raw",
        ],
    );
}

/// `nbdinfo --map[=CONTEXT]` as (offset, length, value) triples.
fn nbdinfo_map(dir: &Path, context: &str, uri: &str) -> Vec<(u64, u64, u64)> {
    let arg = format!("--map={context}");
    let out = ok(dir, "nbdinfo", &[&arg, "--json", uri]);
    let v: Vec<Value> = serde_json::from_str(&out).expect("nbdinfo json");
    v.iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_maps_match_qemu_nbd_serving_the_same_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_fixture(d);
    let qsock = d.join("qemu.sock");
    let (qemu_base, qemu_depth) = {
        let top = d.join("top.qed");
        let args = [
            "-r",
            "-A",
            "-f",
            "qed",
            "--persistent",
            "-k",
            s(&qsock),
            s(&top),
        ];
        let q = NbdServer::start("qemu-nbd", args, &qsock);
        let uri = format!("nbd+unix:///?socket={}", q.sock().display());
        (
            nbdinfo_map(d, "base:allocation", &uri),
            nbdinfo_map(d, "qemu:allocation-depth", &uri),
        )
    };
    let served = serve_cor(d, "top.qed", ServerConfig::default());
    let uri = served.uri("");
    assert_eq!(
        nbdinfo_map(d, "base:allocation", &uri),
        qemu_base,
        "base:allocation"
    );
    assert_eq!(
        nbdinfo_map(d, "qemu:allocation-depth", &uri),
        qemu_depth,
        "qemu:allocation-depth"
    );
    let list = ok(d, "nbdinfo", &["--list", &uri]);
    assert!(list.contains("export=\"\""), "{list}");
    assert!(
        list.contains("base:allocation") && list.contains("qemu:allocation-depth"),
        "{list}"
    );
    for (can, expect) in [
        ("connect", true),
        ("read", true),
        ("write", true),
        ("flush", true),
        ("fua", true),
        ("zero", true),
        ("fast-zero", true),
        ("cache", true),
        ("df", true),
        ("multi-conn", true),
        ("structured-reply", true),
        ("trim", false),
    ] {
        let code = tools::run(d, "nbdinfo", &["--can", can, &uri])
            .status
            .code();
        assert_eq!(
            code,
            Some(if expect { 0 } else { 2 }),
            "nbdinfo --can {can}"
        );
    }
    served.stop();
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, "qemu-img", &["create", "-f", "raw", "disk.raw", "1M"]);
    tools::qemu_io(d, "raw", "disk.raw", &["write -P 0x33 0 1M"]);
    let served = serve_raw(d, "disk.raw", true);
    let uri = served.uri("");
    let code = tools::run(d, "nbdinfo", &["--is", "read-only", &uri])
        .status
        .code();
    assert_eq!(code, Some(0), "not read-only");
    let out = tools::run_command(Command::new("qemu-io").current_dir(d).args([
        "-f",
        "raw",
        "-c",
        "write -P 0 0 4k",
        &uri,
    ]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            || text.contains("ermission")
            || text.contains("read-only")
            || text.contains("read only"),
        "write accepted: {text}"
    );
    served.stop();
    assert!(std::fs::read(d.join("disk.raw"))
        .unwrap()
        .iter()
        .all(|&b| b == 0x33));
}

#[test]
fn tcp_listener_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, "qemu-img", &["create", "-f", "raw", "disk.raw", "1M"]);
    tools::qemu_io(d, "raw", "disk.raw", &["write -P 0x21 0 1M"]);
    let served = serve_raw(d, "disk.raw", false);
    let addr: nbd_server::ListenAddr = "tcp:127.0.0.1:0".parse().unwrap();
    let listener = served
        .runtime
        .block_on(served.server.bind(&addr))
        .expect("bind tcp");
    let nbd_server::ListenAddr::Tcp(bound) = listener.addr() else {
        panic!("not tcp: {:?}", listener.addr());
    };
    assert_ne!(bound.port(), 0, "the bound port is not reported");
    let uri = listener.addr().uri("");
    assert_eq!(ok(d, "nbdinfo", &["--size", &uri]).trim(), "1048576");
    tools::qemu_io(d, "raw", &uri, &["read -P 0x21 0 1M", "write -P 0x22 0 4k"]);
    served.stop();
    tools::qemu_io(d, "raw", "disk.raw", &["read -P 0x22 0 4k"]);
}

/// An exact allocation depth, per 64 KiB unit, from each QED layer's own map (layers[0] the
/// top); under the last QED layer a raw base, allocated everywhere as QEMU counts it.
#[derive(Debug)]
struct ChainDepth {
    unit: u64,
    depths: Vec<u32>,
}

impl ChainDepth {
    fn of(dir: &Path, layers: &[&str]) -> ChainDepth {
        let unit = 64 * 1024;
        let images: Vec<qed::Image> = layers
            .iter()
            .map(|l| qedstream_tests::open_ro_image(&dir.join(l)))
            .collect();
        let size = images[0].size();
        let mut depths = vec![layers.len() as u32 + 1; (size / unit) as usize];
        for (i, image) in images.iter().enumerate().rev() {
            for e in image.map(qed::GuestOffset(0), image.size()).unwrap() {
                if e.mapping == qed::Mapping::Unallocated {
                    continue;
                }
                for u in e.offset.0 / unit..(e.offset.0 + e.length).div_ceil(unit) {
                    if let Some(d) = depths.get_mut(u as usize) {
                        *d = i as u32 + 1;
                    }
                }
            }
        }
        ChainDepth { unit, depths }
    }
}

impl AllocationDepth for ChainDepth {
    fn allocation_depth(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<DepthRun>> {
        Box::pin(async move {
            let mut runs = Vec::new();
            let (mut pos, end) = (offset, offset + length);
            while pos < end {
                let u = pos / self.unit;
                let to = ((u + 1) * self.unit).min(end);
                let depth = self.depths[u as usize];
                runs.push(DepthRun {
                    length: to - pos,
                    depth,
                });
                pos = to;
            }
            Ok(runs)
        })
    }
}

#[test]
fn an_exact_allocation_depth_matches_qemu_nbd_on_a_three_deep_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, "qemu-img", &["create", "-f", "raw", "base.raw", "6M"]);
    tools::qemu_io(d, "raw", "base.raw", &["write -P 1 0 1M"]);
    tools::create_overlay(d, "base.raw", "raw", "mid.qed", Some("8M"));
    tools::qemu_io(
        d,
        "qed",
        "mid.qed",
        &["write -P 2 2M 1M", "write -z 5M 64k"],
    );
    tools::create_overlay(d, "mid.qed", "qed", "top.qed", Some("8M"));
    tools::qemu_io(d, "qed", "top.qed", &["write -P 3 4M 64k"]);
    let qsock = d.join("qemu.sock");
    let qemu_depth = {
        let top = d.join("top.qed");
        let args = [
            "-r",
            "-A",
            "-f",
            "qed",
            "--persistent",
            "-k",
            s(&qsock),
            s(&top),
        ];
        let q = NbdServer::start("qemu-nbd", args, &qsock);
        let uri = format!("nbd+unix:///?socket={}", q.sock().display());
        nbdinfo_map(d, "qemu:allocation-depth", &uri)
    };
    assert!(qemu_depth.iter().any(|e| e.2 == 3), "{qemu_depth:?}");
    let exact = Arc::new(ChainDepth::of(d, &["top.qed", "mid.qed"]));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dev = Arc::new(
        rt.block_on(CorDevice::open(&d.join("top.qed"), CorOptions::default()))
            .unwrap(),
    );
    let layers: Arc<dyn Populate> = dev.clone();
    let sock = d.join("nbd.sock");
    let export = Export::new("", dev.clone())
        .with_allocation_depth(exact)
        .with_layers(layers);
    let server = Server::new(vec![export], ServerConfig::default());
    rt.block_on(server.bind(&ListenAddr::Unix(sock.clone())))
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    assert_eq!(nbdinfo_map(d, "qemu:allocation-depth", &uri), qemu_depth);
    rt.block_on(async {
        server.shutdown().await.unwrap();
        dev.close().await.unwrap();
    });
}
