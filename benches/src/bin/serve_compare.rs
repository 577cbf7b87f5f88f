//! `serve-compare`: the `qedstream serve` binary (as users run it) against qemu-nbd and
//! qemu-storage-daemon (QSD) exporting the same image with the same options, on a unix
//! socket, in one run. Four comparisons, each printed as a ratio (their time / ours, or our
//! p99 / idle p99):
//!
//! 1. sequential reads of a fully local QED image, read-only: `nbdcopy URI null:`, against
//!    QSD's `--export type=nbd` of a qed node and `qemu-nbd -r -f qed`;
//! 2. random 4 KiB reads at queue depth 16 over the same image: our own driver (one
//!    `nbd-client` connection, 16 requests in flight at seeded random offsets), the same
//!    driver against every server;
//! 3. first-touch copy-on-read: `nbdcopy URI null:` of a fresh empty overlay over a raw base
//!    (ours: `serve` of the overlay, copy-on-read by default; QSD: file + qed over its
//!    backing + a `copy-on-read` filter, exported writable);
//! 4. guest read latency while a full-speed stream runs: random 4 KiB reads at queue depth 1
//!    through the export of a fresh overlay, p99 idle and while `serve --stream` (QSD:
//!    `block-stream` over QMP) streams the overlay; only samples that start and end while the
//!    job runs count;
//! 5. writes through a writable export (ours: `serve`; qemu-nbd `--cache=writeback`; QSD: a
//!    writable qed node, `cache=writeback`): random 4 KiB writes at queue depth 16 and
//!    sequential 1 MiB writes over the whole disk (4 in flight), each over a fresh empty image
//!    (allocating) and in place over a local one, a FLUSH at the end counted in the time;
//!    medians of the per-run ratios, and each server's CPU seconds per GiB (from its rusage).
//!
//! Flags: `--quick`, `--writes-only` (comparison 5 alone), `--no-latency` (all but 4),
//! `--latency-only` (4 alone), `--cache-none`: every server with O_DIRECT, as production VMs
//! run their disks (ours `--cache none`, qemu-nbd `--cache=none`, QSD `cache.direct=on`;
//! backings inherit it) instead of through the page cache.
//!
//! ```text
//! cargo build --release -p engine --bin qedstream
//! cargo run --release -p qedstream-benches --bin serve-compare [-- --quick]
//! ```
//! The `qedstream` binary is taken from the runner's own directory (same profile), or from
//! `$QEDSTREAM`. `--quick` (32 MiB, 1 run) only proves the runner works; the full run (1 GiB,
//! 3 runs each, interleaved) is for a quiet machine. Scratch files go under `$BENCH_DIR` (default
//! /var/tmp). Needs qemu-img, qemu-nbd, qemu-storage-daemon and nbdcopy.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_client::{Client, ClientConfig};
use qedstream_benches::XorShift;
use qedstream_benches::{
    qsd_with_qed_nodes, serve_command, start_until_ready, terminate, wait_for_server,
};
use qedstream_tests::tools;
use serde_json::Value;

/// Every server opens its files with O_DIRECT (`--cache-none`).
static DIRECT: AtomicBool = AtomicBool::new(false);

fn direct() -> bool {
    DIRECT.load(Ordering::Relaxed)
}

/// Sizes and repeat counts of one mode.
#[derive(Clone, Copy)]
struct Plan {
    size: u64,
    runs: usize,
    random_reads: usize,
    latency_samples: usize,
}

/// A server under test, killed (ours: SIGTERM first) when stopped.
struct Served {
    child: Child,
    /// Cleared when the server reports its job completed (ours: stdout; QSD: QMP event).
    job_running: Arc<AtomicBool>,
    qmp: Option<UnixStream>,
}

impl Served {
    /// Stops the server; returns its CPU seconds (user + sys over its whole life, from the
    /// rusage of the reaped child: no other child is reaped meanwhile).
    fn stop(mut self) -> f64 {
        let cpu0 = qedstream_benches::children_cpu_seconds();
        terminate(&mut self.child);
        drop(self.qmp.take());
        qedstream_benches::children_cpu_seconds() - cpu0
    }
}

/// Waits until `sock` accepts a connection ([`wait_for_server`]).
fn wait_for_socket(sock: &Path, child: &mut Child) {
    wait_for_server(child, || UnixStream::connect(sock).is_ok());
}

/// `qedstream serve --output=json --nbd unix:SOCK [extra] IMAGE`; waits for the ready line
/// and watches stdout for the job's completion.
fn start_ours(image: &Path, sock: &Path, extra: &[&str]) -> Served {
    let mut cmd = serve_command();
    cmd.arg("--nbd")
        .arg(format!("unix:{}", sock.display()))
        .args(extra);
    if direct() {
        cmd.args(["--cache", "none"]);
    }
    cmd.arg(image);
    let (child, lines) = start_until_ready(&mut cmd);
    let running = Arc::new(AtomicBool::new(extra.contains(&"--stream")));
    let flag = Arc::clone(&running);
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            // `cancelled` is the runner stopping the server once it has its samples.
            if v["event"] == "completed" || v["event"] == "cancelled" {
                flag.store(false, Ordering::SeqCst);
            }
            if v["event"] == "error" || v["event"] == "failed" {
                panic!("stream failed: {v}");
            }
        }
    });
    Served {
        child,
        job_running: running,
        qmp: None,
    }
}

/// `qemu-nbd -f qed` of `image`: read-only, or writable; `--cache=writeback`, or
/// `--cache=none` with `--cache-none`.
fn start_qemu_nbd(image: &Path, sock: &Path, writable: bool) -> Served {
    let mut cmd = Command::new("qemu-nbd");
    if !writable {
        cmd.arg("-r");
    }
    let cache = if direct() {
        "--cache=none"
    } else {
        "--cache=writeback"
    };
    cmd.args([cache, "-f", "qed", "--persistent", "--shared=8", "-k"])
        .arg(sock)
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = tools::spawn(&mut cmd).expect("cannot run qemu-nbd (is it installed?)");
    wait_for_socket(sock, &mut child);
    Served {
        child,
        job_running: Arc::new(AtomicBool::new(false)),
        qmp: None,
    }
}

/// How QSD exports the image.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QsdMode {
    /// A read-only qed node.
    ReadOnly,
    /// A writable qed node (`cache=writeback`, the file driver's default).
    Writable,
    /// A writable qed over its backing with a copy-on-read filter on top.
    CopyOnRead,
}

/// QSD exporting `image` as `mode` says; a QMP monitor on `sock.qmp`.
fn start_qsd(image: &Path, sock: &Path, mode: QsdMode) -> Served {
    let qmp_sock = sock.with_extension("qmp");
    let _ = std::fs::remove_file(&qmp_sock);
    let writable = mode != QsdMode::ReadOnly;
    let (mut cmd, node) =
        qsd_with_qed_nodes(image, writable, mode == QsdMode::CopyOnRead, direct());
    cmd.arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .arg("--export")
        .arg(format!(
            "type=nbd,id=e0,node-name={node},name=,writable={}",
            if writable { "on" } else { "off" }
        ))
        .arg("--chardev")
        .arg(format!(
            "socket,id=m,path={},server=on,wait=off",
            qmp_sock.display()
        ))
        .arg("--monitor")
        .arg("chardev=m")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child =
        tools::spawn(&mut cmd).expect("cannot run qemu-storage-daemon (is it installed?)");
    wait_for_socket(sock, &mut child);
    wait_for_socket(&qmp_sock, &mut child);
    let qmp = UnixStream::connect(&qmp_sock).expect("QMP socket");
    Served {
        child,
        job_running: Arc::new(AtomicBool::new(false)),
        qmp: Some(qmp),
    }
}

/// Starts QSD's block-stream of node `d0` at full speed; a thread clears `job_running` on
/// BLOCK_JOB_COMPLETED.
fn qsd_block_stream(served: &mut Served) {
    let mut stream = served.qmp.take().expect("QMP");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    let mut reply = |stream: &mut UnixStream, cmd: &str| {
        stream.write_all(cmd.as_bytes()).expect("QMP write");
        loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).expect("QMP") > 0, "QMP closed");
            let v: Value = serde_json::from_str(&line).expect("QMP JSON");
            if v.get("error").is_some() {
                panic!("QMP {cmd}: {v}");
            }
            if v.get("return").is_some() {
                return;
            }
        }
    };
    reply(&mut stream, "{\"execute\":\"qmp_capabilities\"}\n");
    served.job_running.store(true, Ordering::SeqCst);
    reply(
        &mut stream,
        r#"{"execute":"block-stream","arguments":{"job-id":"s","device":"d0"}}"#,
    );
    let flag = Arc::clone(&served.job_running);
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v["event"] == "BLOCK_JOB_COMPLETED" {
                assert!(v["data"].get("error").is_none(), "{v}");
                flag.store(false, Ordering::SeqCst);
            }
        }
    });
    served.qmp = Some(stream);
}

fn connect(rt: &tokio::runtime::Runtime, uri: &str) -> Client {
    let config = ClientConfig {
        connections: 1,
        reconnect_delay: Duration::ZERO,
        request_timeout: None,
        ..ClientConfig::default()
    };
    rt.block_on(Client::connect_str(uri, config))
        .expect("connecting the driver")
}

/// `count` random 4 KiB reads, `depth` in flight; wall time.
fn random_reads(rt: &tokio::runtime::Runtime, uri: &str, count: usize, depth: usize) -> Duration {
    let client = connect(rt, uri);
    let blocks = client.size() / 4096;
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for worker in 0..depth {
            let c = client.clone();
            let n = count / depth;
            tasks.push(tokio::spawn(async move {
                let mut rng = XorShift::new(worker as u64 + 1);
                let mut buf = vec![0u8; 4096];
                for _ in 0..n {
                    let at = rng.below(blocks) * 4096;
                    buf = c.read_buf(at, buf).await.expect("read");
                }
            }));
        }
        for t in tasks {
            t.await.expect("driver task");
        }
    });
    let elapsed = t.elapsed();
    rt.block_on(client.close());
    elapsed
}

/// A write workload of the driver.
#[derive(Clone, Copy)]
enum Writes {
    /// `count` 4 KiB writes at seeded random 4 KiB-aligned offsets, 16 in flight.
    Random4k { count: usize },
    /// 1 MiB writes over the whole disk in order, 4 in flight.
    Sequential1m,
}

impl Writes {
    fn bytes(self, size: u64) -> u64 {
        match self {
            Writes::Random4k { count } => count as u64 * 4096,
            Writes::Sequential1m => size,
        }
    }
}

/// Runs `writes` through one connection, then one FLUSH; the wall time of both.
fn write_workload(rt: &tokio::runtime::Runtime, uri: &str, writes: Writes) -> Duration {
    let client = connect(rt, uri);
    assert!(
        client.can_write() && client.can_flush(),
        "{uri}: not writable"
    );
    let size = client.size();
    let (depth, block, count) = match writes {
        Writes::Random4k { count } => (16, 4096u64, count as u64),
        Writes::Sequential1m => (4, 1 << 20, size >> 20),
    };
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for worker in 0..depth {
            let (c, next) = (client.clone(), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                let mut rng = XorShift::new(worker as u64 + 11);
                let mut buf = vec![0u8; block as usize];
                rng.fill(&mut buf);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let at = match writes {
                        Writes::Random4k { .. } => rng.below(size / block) * block,
                        Writes::Sequential1m => i * block,
                    };
                    buf[0] = i as u8;
                    c.write(at, &buf).await.expect("write");
                }
            }));
        }
        for t in tasks {
            t.await.expect("driver task");
        }
        client.flush().await.expect("flush");
    });
    let elapsed = t.elapsed();
    rt.block_on(client.close());
    elapsed
}

/// One write figure per server: wall times and server CPU seconds.
struct WriteFigures {
    kind: &'static str,
    wall: Figure,
    cpu: Figure,
}

/// Comparison 5: `writes` through each writable server, over a fresh empty image
/// (`allocating`) or in place over the local image; the image is made anew for each run.
fn write_comparison(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    plan: Plan,
    writes: Writes,
    allocating: bool,
) -> Vec<WriteFigures> {
    let sock = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let image = dir.join("w.qed");
    let mut out: Vec<WriteFigures> = ["ours", "qemu-nbd", "qsd"]
        .iter()
        .map(|&kind| WriteFigures {
            kind,
            wall: Figure { samples: vec![] },
            cpu: Figure { samples: vec![] },
        })
        .collect();
    for _ in 0..plan.runs {
        for fig in out.iter_mut() {
            let _ = std::fs::remove_file(&sock);
            let _ = std::fs::remove_file(&image);
            if allocating {
                let size = plan.size.to_string();
                tools::ok(
                    dir,
                    "qemu-img",
                    &["create", "-q", "-f", "qed", "w.qed", &size],
                );
            } else {
                let args = [
                    "convert", "-q", "-f", "raw", "-O", "qed", "base.raw", "w.qed",
                ];
                tools::ok(dir, "qemu-img", &args);
            }
            let served = match fig.kind {
                "ours" => start_ours(&image, &sock, &[]),
                "qemu-nbd" => start_qemu_nbd(&image, &sock, true),
                _ => start_qsd(&image, &sock, QsdMode::Writable),
            };
            fig.wall
                .samples
                .push(write_workload(rt, &uri, writes).as_secs_f64());
            fig.cpu.samples.push(served.stop());
            assert_eq!(tools::qemu_check(dir, "w.qed"), 0, "{}: check", fig.kind);
        }
    }
    let _ = std::fs::remove_file(&image);
    out
}

fn print_writes(rt: &tokio::runtime::Runtime, d: &Path, plan: Plan) {
    let random = Writes::Random4k {
        count: plan.random_reads / 4,
    };
    let cases = [
        ("random 4k writes qd16, allocating", random, true),
        ("random 4k writes qd16, in place", random, false),
        (
            "sequential 1M writes qd4, allocating",
            Writes::Sequential1m,
            true,
        ),
        (
            "sequential 1M writes qd4, in place",
            Writes::Sequential1m,
            false,
        ),
    ];
    for (name, writes, allocating) in cases {
        let figs = write_comparison(rt, d, plan, writes, allocating);
        let gib = writes.bytes(plan.size) as f64 / (1u64 << 30) as f64;
        println!("{name} ({} MiB + FLUSH):", writes.bytes(plan.size) >> 20);
        for f in &figs {
            let ratios: Vec<f64> = f
                .wall
                .samples
                .iter()
                .zip(&figs[0].wall.samples)
                .map(|(t, o)| t / o)
                .collect();
            println!(
                "  {:>9}: wall {}   server CPU {:.2} s/GiB   their / ours {:.2}x",
                f.kind,
                f.wall.show(),
                f.cpu.median() / gib,
                qedstream_benches::median(&ratios)
            );
        }
    }
}

/// Random 4 KiB reads one at a time, each timed; only while `running` holds (when `gated`),
/// at most `max` samples. Returns the latencies in microseconds, sorted.
fn latencies(
    rt: &tokio::runtime::Runtime,
    uri: &str,
    max: usize,
    running: Option<&AtomicBool>,
) -> Vec<f64> {
    let client = connect(rt, uri);
    let blocks = client.size() / 4096;
    let mut rng = XorShift::new(99);
    let mut out = Vec::with_capacity(max);
    rt.block_on(async {
        let mut buf = vec![0u8; 4096];
        while out.len() < max {
            let live = running.is_none_or(|r| r.load(Ordering::SeqCst));
            if !live {
                break;
            }
            let at = rng.below(blocks) * 4096;
            let t = Instant::now();
            buf = client.read_buf(at, buf).await.expect("read");
            let us = t.elapsed().as_secs_f64() * 1e6;
            if running.is_none_or(|r| r.load(Ordering::SeqCst)) {
                out.push(us);
            }
        }
    });
    rt.block_on(client.close());
    out.sort_by(f64::total_cmp);
    out
}

fn p99(sorted: &[f64]) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

fn nbdcopy(dir: &Path, uri: &str) -> Duration {
    let t = Instant::now();
    tools::ok(dir, "nbdcopy", &[uri, "null:"]);
    t.elapsed()
}

/// A raw file of `size` seeded random bytes.
fn random_raw(path: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create base");
    let mut rng = XorShift::new(7);
    let mut buf = vec![0u8; 8 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all_at(&buf[..n], pos).expect("write base");
        pos += n as u64;
    }
}

/// A fresh empty QED overlay over `base.raw`.
fn fresh_overlay(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_file(dir.join("top.qed"));
    tools::ok(
        dir,
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "top.qed",
        ],
    );
    dir.join("top.qed")
}

/// Median of `runs` results, and the spread (min, max).
struct Figure {
    samples: Vec<f64>,
}

impl Figure {
    fn median(&self) -> f64 {
        let mut v = self.samples.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    fn show(&self) -> String {
        let list: Vec<String> = self.samples.iter().map(|s| format!("{s:.3}")).collect();
        format!("{:.3} [{}]", self.median(), list.join(" "))
    }
}

/// Comparisons 1 and 2: the fully local image, per server: (nbdcopy s, random qd16 s).
fn local_reads(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    plan: Plan,
) -> Vec<(&'static str, Figure, Figure)> {
    let image = dir.join("local.qed");
    tools::ok(
        dir,
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qed",
            "base.raw",
            "local.qed",
        ],
    );
    let sock = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let kinds = ["ours", "qemu-nbd", "qsd"];
    let mut out: Vec<_> = kinds
        .iter()
        .map(|&k| (k, Figure { samples: vec![] }, Figure { samples: vec![] }))
        .collect();
    for _ in 0..plan.runs {
        for (kind, copy, random) in out.iter_mut() {
            let _ = std::fs::remove_file(&sock);
            let served = match *kind {
                "ours" => start_ours(&image, &sock, &["--read-only"]),
                "qemu-nbd" => start_qemu_nbd(&image, &sock, false),
                _ => start_qsd(&image, &sock, QsdMode::ReadOnly),
            };
            copy.samples.push(nbdcopy(dir, &uri).as_secs_f64());
            let r = random_reads(rt, &uri, plan.random_reads, 16);
            random.samples.push(r.as_secs_f64());
            let cpu = served.stop();
            let gib = (plan.size + plan.random_reads as u64 * 4096) as f64 / (1u64 << 30) as f64;
            println!(
                "    {kind}: server CPU {:.2} s/GiB read (nbdcopy + random)",
                cpu / gib
            );
        }
    }
    std::fs::remove_file(&image).ok();
    out
}

/// Comparison 3: first-touch copy-on-read of a whole fresh overlay: (ours s, QSD s).
fn first_touch(dir: &Path, plan: Plan) -> (Figure, Figure) {
    let sock = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let (mut ours, mut qsd) = (Figure { samples: vec![] }, Figure { samples: vec![] });
    for _ in 0..plan.runs {
        for (i, fig) in [&mut ours, &mut qsd].into_iter().enumerate() {
            let _ = std::fs::remove_file(&sock);
            let top = fresh_overlay(dir);
            let served = if i == 0 {
                start_ours(&top, &sock, &[])
            } else {
                start_qsd(&top, &sock, QsdMode::CopyOnRead)
            };
            fig.samples.push(nbdcopy(dir, &uri).as_secs_f64());
            let cpu = served.stop();
            let gib = plan.size as f64 / (1u64 << 30) as f64;
            println!(
                "    {}: server CPU {:.2} s/GiB copied in",
                ["ours", "qsd"][i],
                cpu / gib
            );
            let map = tools::ok(dir, "qemu-img", &["map", "--output=json", "top.qed"]);
            assert!(
                !map.contains("\"depth\": 1"),
                "{}: the overlay was not fully copied in",
                ["ours", "qsd"][i]
            );
        }
    }
    (ours, qsd)
}

/// Comparison 4: p99 of QD1 random reads idle and during a full-speed stream, per server.
fn stream_latency(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    plan: Plan,
) -> Vec<(&'static str, Figure, Figure, usize)> {
    let sock = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let mut out = vec![
        (
            "ours",
            Figure { samples: vec![] },
            Figure { samples: vec![] },
            0,
        ),
        (
            "qsd",
            Figure { samples: vec![] },
            Figure { samples: vec![] },
            0,
        ),
    ];
    for _ in 0..plan.runs {
        for (kind, idle, busy, n) in out.iter_mut() {
            for streaming in [false, true] {
                let _ = std::fs::remove_file(&sock);
                let top = fresh_overlay(dir);
                let ours = *kind == "ours";
                let mut served = match (ours, streaming) {
                    (true, false) => start_ours(&top, &sock, &[]),
                    (true, true) => start_ours(&top, &sock, &["--stream"]),
                    (false, _) => start_qsd(&top, &sock, QsdMode::CopyOnRead),
                };
                if streaming && !ours {
                    qsd_block_stream(&mut served);
                }
                let gate = streaming.then_some(&*served.job_running);
                let lat = latencies(rt, &uri, plan.latency_samples, gate);
                if streaming {
                    *n += lat.len();
                    busy.samples.push(p99(&lat));
                } else {
                    idle.samples.push(p99(&lat));
                }
                served.stop();
            }
        }
    }
    out
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    DIRECT.store(
        std::env::args().any(|a| a == "--cache-none"),
        Ordering::Relaxed,
    );
    // `--latency-only`: comparison 4 alone (for tuning the stream's effect on guest reads).
    let latency_only = std::env::args().any(|a| a == "--latency-only");
    let plan = if quick {
        Plan {
            size: 32 << 20,
            runs: 1,
            random_reads: 4096,
            latency_samples: 500,
        }
    } else {
        Plan {
            size: 1 << 30,
            runs: 3,
            random_reads: 65536,
            latency_samples: 5000,
        }
    };
    let root = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(root).expect("temp dir");
    let d = dir.path();
    random_raw(&d.join("base.raw"), plan.size);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "serve-compare: {} MiB, {} run(s) each, interleaved; times in s as median [runs]; {}",
        plan.size >> 20,
        plan.runs,
        if direct() {
            "O_DIRECT (--cache none, cache.direct=on)"
        } else {
            "through the page cache"
        }
    );
    if latency_only {
        print_latency(&rt, d, plan);
        return;
    }
    // `--writes-only`: comparison 5 alone; `--no-latency`: all but comparison 4.
    if std::env::args().any(|a| a == "--writes-only") {
        print_writes(&rt, d, plan);
        return;
    }
    let local = local_reads(&rt, d, plan);
    let ours = &local[0];
    for (kind, copy, random) in &local {
        println!(
            "{kind:>9}: nbdcopy {}   random 4k qd16 x{}: {}",
            copy.show(),
            plan.random_reads,
            random.show()
        );
    }
    for (kind, copy, random) in &local[1..] {
        println!(
            "{kind} / ours (above 1: ours faster): sequential {:.2}x   random 4k qd16 {:.2}x",
            copy.median() / ours.1.median(),
            random.median() / ours.2.median()
        );
    }
    let (cor_ours, cor_qsd) = first_touch(d, plan);
    println!(
        "first-touch copy-on-read, nbdcopy of a fresh overlay over raw: ours {}   qsd {}   qsd / ours {:.2}x (target 2)",
        cor_ours.show(),
        cor_qsd.show(),
        cor_qsd.median() / cor_ours.median()
    );
    print_writes(&rt, d, plan);
    if !std::env::args().any(|a| a == "--no-latency") {
        print_latency(&rt, d, plan);
    }
}

fn print_latency(rt: &tokio::runtime::Runtime, d: &Path, plan: Plan) {
    for (kind, idle, busy, n) in stream_latency(rt, d, plan) {
        println!(
            "{kind:>9}: QD1 4k read p99 idle {} us   during stream {} us ({n} samples)   ratio {:.2}x (target <= 3)",
            idle.show(),
            busy.show(),
            busy.median() / idle.median()
        );
    }
}
