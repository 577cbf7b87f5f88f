//! The stream job against QEMU's block-stream (qemu-storage-daemon, driven over QMP), on the
//! same image, in one run: a 1 GiB base with 60% random data in 64 KiB..8 MiB extents, the rest
//! holes, under an empty QED overlay, backed (a) by the raw file and (b) by qemu-nbd on a unix
//! socket. Times are job wall times (ours in-process: open, stream, unlink, close; QEMU's from
//! the block-stream command to BLOCK_JOB_COMPLETED). Prints medians and QEMU time / our time.
//! Each result is checked with `qemu-img compare` against the base.
//!
//! Then the backend × cache matrix of our stream over the raw file: io_uring and threads,
//! each through the page cache (`cache=writeback`) and with O_DIRECT (`cache=none`), runs
//! interleaved, medians printed with each one's ratio to its own backend's buffered time.
//!
//! `cargo run --release -p qedstream-benches --bin stream-compare [-- --quick] [--io-only]`
//! (`--io-only`: the matrix alone)

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use copy_on_read::{CorDevice, CorOptions};
use engine::stream::{StreamJob, StreamOptions};
use qedstream_benches::sparse_random_file;
use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::qsd;
use qedstream_tests::tools::ok_command;

fn our_stream(rt: &tokio::runtime::Runtime, image: &Path) -> Duration {
    our_stream_with(rt, image, qed::IoConfig::default())
}

fn our_stream_with(rt: &tokio::runtime::Runtime, image: &Path, io: qed::IoConfig) -> Duration {
    rt.block_on(async {
        let t = Instant::now();
        let mut options = CorOptions::default();
        options.gate.io = io;
        let dev = Arc::new(CorDevice::open(image, options).await.unwrap());
        let outcome = StreamJob::start(dev.clone(), StreamOptions::default())
            .wait()
            .await
            .unwrap();
        assert!(outcome.unlinked);
        copy_on_read::BlockDevice::close(&*dev).await.unwrap();
        t.elapsed()
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 1 } else { 3 };
    let size: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    let d = dir.path();
    let data = sparse_random_file(&d.join("base.raw"), size, 60, 11);
    println!(
        "base: {} MiB, {} MiB of data ({:.0}%)",
        size >> 20,
        data >> 20,
        data as f64 * 100.0 / size as f64
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    if std::env::args().any(|a| a == "--io-only") {
        return io_matrix(&rt, d, runs, data);
    }
    let sock = d.join("nbd.sock");
    let mut args: Vec<OsString> = ["-r", "-t", "-e", "8", "-f", "raw", "-k"]
        .map(OsString::from)
        .to_vec();
    args.push(sock.clone().into());
    args.push(d.join("base.raw").into());
    let _nbd = NbdServer::start("qemu-nbd", args, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    for (name, backing) in [
        ("raw file", "base.raw".to_string()),
        ("qemu-nbd (unix socket)", uri),
    ] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            for img in ["ours.qed", "qemu.qed"] {
                let _ = std::fs::remove_file(d.join(img));
                ok_command(
                    Command::new("qemu-img")
                        .current_dir(d)
                        .args(["create", "-f", "qed", "-b", &backing, "-F", "raw", img]),
                );
            }
            ours.push(our_stream(&rt, &d.join("ours.qed")));
            theirs.push(qsd::block_stream(d, "qemu.qed"));
            for img in ["ours.qed", "qemu.qed"] {
                ok_command(
                    Command::new("qemu-img")
                        .current_dir(d)
                        .args(["compare", "-f", "qed", "-F", "raw", img, "base.raw"]),
                );
            }
        }
        let (o, q) = (median(ours), median(theirs));
        let mbs = |t: Duration| data as f64 / t.as_secs_f64() / 1e6;
        println!(
            "stream over {name:<24} ours {:>7.3}s ({:>6.0} MB/s of data)   qemu block-stream {:>7.3}s ({:>6.0} MB/s)   qemu/ours {:>5.2}x",
            o.as_secs_f64(),
            mbs(o),
            q.as_secs_f64(),
            mbs(q),
            q.as_secs_f64() / o.as_secs_f64()
        );
    }
    io_matrix(&rt, d, runs, data);
}

/// The four backend × cache configurations, with their names.
fn io_configs() -> Vec<(String, qed::IoConfig)> {
    let mut out = Vec::new();
    for aio in [qed::Aio::IoUring, qed::Aio::Threads] {
        for cache in [qed::CacheMode::Writeback, qed::CacheMode::None] {
            let io = qed::IoConfig { cache, aio };
            let name = format!("{}/{}", io.backend().unwrap().name(), cache.name());
            out.push((name, io));
        }
    }
    out
}

/// Our stream over the raw base under each configuration, interleaved run by run.
fn io_matrix(rt: &tokio::runtime::Runtime, d: &Path, runs: usize, data: u64) {
    let configs = io_configs();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    for _ in 0..runs.max(3) {
        for (i, (_, io)) in configs.iter().enumerate() {
            let _ = std::fs::remove_file(d.join("io.qed"));
            ok_command(Command::new("qemu-img").current_dir(d).args([
                "create", "-f", "qed", "-b", "base.raw", "-F", "raw", "io.qed",
            ]));
            times[i].push(our_stream_with(rt, &d.join("io.qed"), *io));
            ok_command(
                Command::new("qemu-img")
                    .current_dir(d)
                    .args(["compare", "-f", "qed", "-F", "raw", "io.qed", "base.raw"]),
            );
        }
    }
    let medians: Vec<Duration> = times.into_iter().map(median).collect();
    for (i, (name, _)) in configs.iter().enumerate() {
        // Configurations come in pairs: (writeback, none) per backend.
        let buffered = medians[i - i % 2];
        let t = medians[i].as_secs_f64();
        println!(
            "stream, raw file, {name:<20} {t:>7.3}s ({:>6.0} MB/s of data)   / own buffered {:>5.2}x   / io_uring/writeback {:>5.2}x",
            data as f64 / t / 1e6,
            t / buffered.as_secs_f64(),
            t / medians[0].as_secs_f64()
        );
    }
}
