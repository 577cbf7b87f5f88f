//! `nbd-compare`: read a 2 GiB sparse export (about 60 % random data in 64 KiB–8 MiB extents, the
//! rest holes) from `qemu-nbd -r` over a unix socket, in one run with `nbdcopy` and
//! `qemu-img convert` reading the same server, into a null sink and into a raw file. Prints the
//! figures and ratios.
//!
//! ```text
//! cargo run --release -p qedstream-benches --bin nbd-compare -- [WORKDIR] [RUNS]
//! ```
//! WORKDIR (default /var/tmp/nbd-compare) keeps the generated image between runs. Our client uses
//! one connection, 256 KiB requests, 16 in flight, block status in 128 MiB windows (zero extents
//! are not read). Needs qemu-nbd, qemu-img and nbdcopy.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_client::{Client, ClientConfig, Uri};
use qedstream_benches::XorShift;

const SIZE: u64 = 2 << 30;
const WINDOW: u64 = 128 << 20;
const PIECE: u64 = 256 << 10;
const DEPTH: usize = 16;

/// Generate the image (seeded); returns the number of data bytes.
fn generate(path: &Path) -> u64 {
    let mut rng = XorShift::new(42);
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(SIZE).expect("size image");
    let mut f = std::io::BufWriter::with_capacity(8 << 20, f);
    let mut at = 0u64;
    let mut data = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    while at < SIZE {
        let len = ((64 << 10) + rng.next_u64() % ((8 << 20) - (64 << 10))) & !0xffff;
        let len = len.max(64 << 10).min(SIZE - at);
        if rng.next_u64() % 100 < 60 {
            let b = &mut buf[..len as usize];
            rng.fill(b);
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(b).unwrap();
            data += len;
        }
        at += len;
    }
    f.flush().unwrap();
    f.get_ref().sync_all().unwrap();
    data
}

struct QemuNbd {
    child: Child,
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_qemu_nbd(image: &Path, sock: &Path) -> QemuNbd {
    let _ = std::fs::remove_file(sock);
    let pid = sock.with_extension("pid");
    let _ = std::fs::remove_file(&pid);
    let child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-e", "8", "-f", "raw", "-k"])
        .arg(sock)
        .arg(format!("--pid-file={}", pid.display()))
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd is required");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pid.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    QemuNbd { child }
}

fn sync() {
    let _ = Command::new("sync").status();
}

fn time_cmd(args: &[&str]) -> f64 {
    sync();
    let t = Instant::now();
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(st.success(), "{args:?} failed");
    t.elapsed().as_secs_f64()
}

type WriteJob = (u64, Vec<u8>, tokio::sync::oneshot::Sender<Vec<u8>>);

/// Sink for our reads: nothing, or a writer thread that owns the output file (buffered writes to
/// one file serialise on its inode lock anyway, so more writer threads only add switches).
#[derive(Clone)]
enum Sink {
    Null,
    File(std::sync::mpsc::SyncSender<WriteJob>),
}

fn file_sink(f: std::fs::File) -> (Sink, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<WriteJob>(DEPTH);
    let h = std::thread::spawn(move || {
        for (off, buf, back) in rx {
            f.write_all_at(&buf, off).expect("write output");
            let _ = back.send(buf);
        }
    });
    (Sink::File(tx), h)
}

/// Read the whole export, block-status driven; returns data bytes read.
async fn ours(uri: &Uri, sink: Sink, connections: usize) -> u64 {
    let cfg = ClientConfig {
        connections,
        max_request_bytes: PIECE as u32,
        max_in_flight: DEPTH,
        ..ClientConfig::default()
    };
    let client = Client::connect(uri, cfg).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel::<(u64, u64)>(256);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..DEPTH * connections {
        let (client, rx, sink) = (client.clone(), rx.clone(), sink.clone());
        workers.spawn(async move {
            let mut buf = vec![0u8; PIECE as usize];
            let mut total = 0u64;
            loop {
                let next = rx.lock().await.recv().await;
                let Some((off, len)) = next else { return total };
                buf.resize(len as usize, 0);
                buf = client.read_buf(off, buf).await.expect("read");
                total += len;
                if let Sink::File(tx) = &sink {
                    let (back_tx, back_rx) = tokio::sync::oneshot::channel();
                    let job = (off, std::mem::take(&mut buf), back_tx);
                    // The channel is bounded by DEPTH; a full queue briefly blocks this worker.
                    tokio::task::block_in_place(|| tx.send(job)).expect("writer thread alive");
                    buf = back_rx.await.expect("writer thread returns buffers");
                }
            }
        });
    }
    let size = client.size();
    let mut at = 0;
    while at < size {
        let extents = client
            .block_status(at, WINDOW.min(size - at))
            .await
            .expect("block status");
        for e in &extents {
            if e.zero {
                continue;
            }
            let mut o = e.offset;
            while o < e.offset + e.length {
                let l = PIECE.min(e.offset + e.length - o);
                tx.send((o, l)).await.unwrap();
                o += l;
            }
        }
        at = extents.last().map(|e| e.offset + e.length).unwrap();
    }
    drop(tx);
    let mut total = 0;
    while let Some(r) = workers.join_next().await {
        total += r.unwrap();
    }
    client.close().await;
    total
}

fn time_ours(
    rt: &tokio::runtime::Runtime,
    uri: &Uri,
    out: Option<&Path>,
    connections: usize,
) -> (f64, u64) {
    let (sink, writer) = match out {
        None => (Sink::Null, None),
        Some(p) => {
            let _ = std::fs::remove_file(p);
            let f = std::fs::File::create(p).unwrap();
            f.set_len(SIZE).unwrap();
            let (s, h) = file_sink(f);
            (s, Some(h))
        }
    };
    sync();
    let t = Instant::now();
    // No fsync at the end: neither nbdcopy nor qemu-img convert (cache=unsafe) sync by default.
    let n = rt.block_on(ours(uri, sink, connections));
    if let Some(h) = writer {
        h.join().unwrap();
    }
    (t.elapsed().as_secs_f64(), n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "/var/tmp/nbd-compare".into()));
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("src.raw");
    if std::fs::metadata(&image).ok().map(|m| m.len()) != Some(SIZE) {
        eprintln!("generating {} ...", image.display());
        let d = generate(&image);
        eprintln!("  {d} data bytes");
    }
    let sock = dir.join("src.sock");
    let _server = start_qemu_nbd(&image, &sock);
    let uri = Uri::unix(&sock, "");
    let uri_s = uri.to_qemu_string();
    let out = dir.join("out.raw");
    let out_s = out.display().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Data bytes per our block status (what "data MB/s" divides).
    let data_bytes = rt.block_on(async {
        let c = Client::connect(
            &uri,
            ClientConfig {
                connections: 1,
                ..ClientConfig::default()
            },
        )
        .await
        .unwrap();
        let mut at = 0;
        let mut data = 0;
        while at < c.size() {
            let e = c.block_status(at, WINDOW.min(c.size() - at)).await.unwrap();
            data += e.iter().filter(|e| !e.zero).map(|e| e.length).sum::<u64>();
            at = e.last().map(|e| e.offset + e.length).unwrap();
        }
        c.close().await;
        data
    });
    eprintln!(
        "image: {} bytes, {} data ({:.1} %)",
        SIZE,
        data_bytes,
        data_bytes as f64 * 100.0 / SIZE as f64
    );

    type Run<'a> = (&'a str, Box<dyn Fn() -> f64 + 'a>);
    let rm = |p: &Path| {
        let _ = std::fs::remove_file(p);
    };
    let cases: Vec<Run> = vec![
        (
            "ours C=1 -> null",
            Box::new(|| {
                let (t, n) = time_ours(&rt, &uri, None, 1);
                assert_eq!(n, data_bytes);
                t
            }),
        ),
        (
            "ours C=2 -> null",
            Box::new(|| time_ours(&rt, &uri, None, 2).0),
        ),
        (
            "nbdcopy -> null:",
            Box::new(|| time_cmd(&["nbdcopy", &uri_s, "null:"])),
        ),
        (
            "nbdcopy -C 1 -> null:",
            Box::new(|| time_cmd(&["nbdcopy", "-C", "1", &uri_s, "null:"])),
        ),
        (
            "ours C=1 -> raw file",
            Box::new(|| {
                let t = time_ours(&rt, &uri, Some(&out), 1).0;
                rm(&out);
                t
            }),
        ),
        (
            "nbdcopy -> raw file",
            Box::new(|| {
                rm(&out);
                let t = time_cmd(&["nbdcopy", &uri_s, &out_s]);
                rm(&out);
                t
            }),
        ),
        (
            "nbdcopy -C 1 -> raw file",
            Box::new(|| {
                rm(&out);
                let t = time_cmd(&["nbdcopy", "-C", "1", &uri_s, &out_s]);
                rm(&out);
                t
            }),
        ),
        (
            "qemu-img convert -> raw file",
            Box::new(|| {
                rm(&out);
                let t = time_cmd(&[
                    "qemu-img", "convert", "-f", "raw", "-O", "raw", &uri_s, &out_s,
                ]);
                rm(&out);
                t
            }),
        ),
    ];

    // Correctness once: our raw output equals the source.
    let _ = time_ours(&rt, &uri, Some(&out), 1);
    let same = Command::new("cmp")
        .arg("-s")
        .arg(&image)
        .arg(&out)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(same, "our raw output differs from the source");
    rm(&out);
    eprintln!("our raw output verified identical to the source (cmp)");

    let mut results = Vec::new();
    for (name, f) in &cases {
        let times: Vec<f64> = (0..runs).map(|_| f()).collect();
        let (lo, hi) = times
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), &t| (a.min(t), b.max(t)));
        let m = median(times);
        println!(
            "{name:<30} median {m:6.3} s ({lo:.3}-{hi:.3})  virt {:6.0} MB/s  data {:6.0} MB/s",
            SIZE as f64 / m / 1e6,
            data_bytes as f64 / m / 1e6
        );
        results.push((*name, m));
    }
    let get = |n: &str| results.iter().find(|r| r.0 == n).map(|r| r.1).unwrap();
    let ours_null = data_bytes as f64 / get("ours C=1 -> null") / 1e9;
    println!();
    println!(
        "ours C=1 -> null: {ours_null:.2} GB/s of data (target >= 1.2 GB/s): {:.2}x target",
        ours_null / 1.2
    );
    println!(
        "null:  nbdcopy / ours C=1 time ratio {:.2} (>1 means we are faster); nbdcopy -C 1 / ours {:.2}",
        get("nbdcopy -> null:") / get("ours C=1 -> null"),
        get("nbdcopy -C 1 -> null:") / get("ours C=1 -> null")
    );
    println!(
        "file:  nbdcopy / ours time ratio {:.2}; nbdcopy -C 1 / ours {:.2}; qemu-img / ours {:.2}",
        get("nbdcopy -> raw file") / get("ours C=1 -> raw file"),
        get("nbdcopy -C 1 -> raw file") / get("ours C=1 -> raw file"),
        get("qemu-img convert -> raw file") / get("ours C=1 -> raw file")
    );
}
