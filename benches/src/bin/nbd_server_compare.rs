//! `nbd-server-compare`: our NBD server against `qemu-nbd` and `qemu-storage-daemon --export
//! type=nbd`, each serving the same fully-local QED image (read-only) on a unix socket, one
//! after the other. Two workloads per server:
//!
//! - sequential reads of the whole export: `nbdcopy URI null:`;
//! - 4 KiB reads at queue depth 16: `qemu-img bench -f raw -c N -d 16 -s 4k URI`.
//!
//! Prints the median wall time of each and the ratios (ours / theirs; below 1 is faster).
//!
//! ```text
//! cargo run --release -p qedstream-benches --bin nbd-server-compare -- [--quick]
//! ```
//! `--quick` (64 MiB image, 1 run, 2048 requests) only proves the runner works; the full run
//! (1 GiB, 3 runs, 65536 requests) is for a quiet machine. Needs qemu-img, qemu-nbd,
//! qemu-storage-daemon and nbdcopy.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use copy_on_read::{CorDevice, CorOptions};
use nbd_server::{Export, ListenAddr, Server, ServerConfig};
use qedstream_benches::XorShift;
use qedstream_tests::tools;

/// A fully-local QED image of `size` bytes of seeded random data, made by qemu-img.
fn make_image(dir: &Path, size: u64) -> PathBuf {
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; size as usize];
    XorShift::new(7).fill(&mut data);
    std::fs::write(&raw, &data).expect("writing the source");
    let qed = dir.join("img.qed");
    tools::ok(
        dir,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qed", "src.raw", "img.qed"],
    );
    std::fs::remove_file(&raw).ok();
    qed
}

fn wait_for(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited early: {status}");
        }
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server under test: ours in this process, or a child process.
enum Served {
    Ours(tokio::runtime::Runtime, Arc<Server>, Arc<CorDevice>),
    Child(Child),
}

impl Served {
    fn stop(self) {
        match self {
            Served::Ours(rt, server, dev) => rt.block_on(async {
                server.shutdown().await.expect("shutdown");
                copy_on_read::BlockDevice::close(&*dev)
                    .await
                    .expect("close");
            }),
            Served::Child(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn start(kind: &str, image: &Path, sock: &Path) -> Served {
    let _ = std::fs::remove_file(sock);
    let img = image.to_str().unwrap();
    let path = sock.to_str().unwrap();
    let mut cmd = match kind {
        "ours" => return start_ours(image, sock),
        "qemu-nbd" => {
            let mut c = Command::new("qemu-nbd");
            c.args([
                "-r",
                "-f",
                "qed",
                "--persistent",
                "--shared=8",
                "-k",
                path,
                img,
            ]);
            c
        }
        _ => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!(
                    "driver=file,filename={img},node-name=f0,read-only=on"
                ))
                .arg("--blockdev")
                .arg("driver=qed,file=f0,node-name=d0,read-only=on")
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={path}"))
                .arg("--export")
                .arg("type=nbd,id=e0,node-name=d0,name=,writable=off");
            c
        }
    };
    let mut child = tools::spawn(cmd.stdout(Stdio::null()).stderr(Stdio::null()))
        .unwrap_or_else(|e| panic!("cannot run {kind} (is it installed?): {e}"));
    wait_for(sock, &mut child);
    Served::Child(child)
}

fn start_ours(image: &Path, sock: &Path) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let options = CorOptions {
        read_only: true,
        ..CorOptions::default()
    };
    let dev = Arc::new(rt.block_on(CorDevice::open(image, options)).expect("open"));
    let export = Export::new("", dev.clone())
        .with_layers(dev.clone())
        .read_only(true);
    let server = Server::new(vec![export], ServerConfig::default());
    rt.block_on(server.bind(&ListenAddr::Unix(sock.to_path_buf())))
        .expect("bind");
    Served::Ours(rt, server, dev)
}

/// Wall time of `program args`, which must succeed.
fn timed(dir: &Path, program: &str, args: &[&str]) -> Duration {
    let t = Instant::now();
    tools::ok(dir, program, args);
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (size, runs, count) = if quick {
        (64u64 << 20, 1, 2048)
    } else {
        (1u64 << 30, 3, 65536)
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let image = make_image(d, size);
    let sock = d.join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let count = count.to_string();
    let mut results = Vec::new();
    for kind in ["ours", "qemu-nbd", "qemu-storage-daemon"] {
        let served = start(kind, &image, &sock);
        let copy = median(
            (0..runs)
                .map(|_| timed(d, "nbdcopy", &[&uri, "null:"]))
                .collect(),
        );
        let bench = median(
            (0..runs)
                .map(|_| {
                    let args = [
                        "bench", "-f", "raw", "-c", &count, "-d", "16", "-s", "4k", &uri,
                    ];
                    timed(d, "qemu-img", &args)
                })
                .collect(),
        );
        served.stop();
        println!(
            "{kind:>20}: nbdcopy {:>8.3} s ({:>7.1} MiB/s)   qemu-img bench 4k qd16 x{count}: {:>8.3} s",
            copy.as_secs_f64(),
            size as f64 / (1 << 20) as f64 / copy.as_secs_f64(),
            bench.as_secs_f64()
        );
        results.push((kind, copy, bench));
    }
    let (_, our_copy, our_bench) = results[0];
    for &(kind, copy, bench) in &results[1..] {
        println!(
            "ours / {kind}: nbdcopy {:.2}x   bench {:.2}x   (time ratio; below 1 is faster)",
            our_copy.as_secs_f64() / copy.as_secs_f64(),
            our_bench.as_secs_f64() / bench.as_secs_f64()
        );
    }
}
