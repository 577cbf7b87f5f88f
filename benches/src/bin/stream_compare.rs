//! The stream job against QEMU's block-stream (qemu-storage-daemon, driven over QMP), on the
//! same image, in one run: a 1 GiB base with 60% random data in 64 KiB..8 MiB extents, the rest
//! holes, under an empty QED overlay, backed (a) by the raw file and (b) by qemu-nbd on a unix
//! socket. Times are job wall times (ours in-process: open, stream, unlink, close; QEMU's from
//! the block-stream command to BLOCK_JOB_COMPLETED). Prints medians and QEMU time / our time.
//! Each result is checked with `qemu-img compare` against the base. A third case streams from
//! a zlib-compressed qcow2 base (`qemu-img convert -c` of the same base, as cloud images are
//! shipped) under the same empty QED overlay ([`qcow2_case`]).
//!
//! `cargo run --release -p qedstream-benches --bin stream-compare [-- --quick]`

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
    rt.block_on(async {
        let t = Instant::now();
        let dev = Arc::new(CorDevice::open(image, CorOptions::default()).await.unwrap());
        let outcome = StreamJob::start(dev.clone(), StreamOptions::default())
            .wait()
            .await
            .unwrap();
        assert!(outcome.unlinked);
        copy_on_read::BlockDevice::close(&*dev).await.unwrap();
        t.elapsed()
    })
}

/// The stream from a compressed qcow2 base (made from `base.raw` in `d`): ours and
/// qemu-storage-daemon's block-stream, `runs` times each, every result `qemu-img compare`d
/// against the qcow2. Prints one line like the raw and NBD cases.
fn qcow2_case(rt: &tokio::runtime::Runtime, d: &Path, runs: usize, data: u64) {
    let qemu_img = |args: &[&str]| ok_command(Command::new("qemu-img").current_dir(d).args(args));
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "base.raw",
        "base.qcow2",
    ]);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for img in ["ours.qed", "qemu.qed"] {
            let _ = std::fs::remove_file(d.join(img));
            qemu_img(&[
                "create",
                "-f",
                "qed",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                img,
            ]);
        }
        ours.push(our_stream(rt, &d.join("ours.qed")));
        theirs.push(qsd::block_stream(d, "qemu.qed"));
        for img in ["ours.qed", "qemu.qed"] {
            qemu_img(&["compare", "-f", "qed", "-F", "qcow2", img, "base.qcow2"]);
        }
    }
    report_qcow2(data, median(ours), median(theirs));
}

/// Prints the qcow2 case's medians, spelled as the other cases'.
fn report_qcow2(data: u64, o: Duration, q: Duration) {
    let name = "compressed qcow2 file";
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
    qcow2_case(&rt, d, runs, data);
}
