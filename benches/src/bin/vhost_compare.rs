//! `vhost-compare`: the server side of vhost-user-blk alone, with no guest: `qedstream serve
//! --vhost-user-blk` (the binary, as users run it) against qemu-storage-daemon's
//! `--export type=vhost-user-blk` of the same image, driven by the same front end in this
//! process (`qedstream_tests::vhost_front`: guest memory, one split virtqueue, the virtio-blk
//! driver). Three workloads, each printed with medians, the ratio their time / ours, and the
//! server's CPU seconds (user + system, from /proc):
//!
//! 1. random 4 KiB reads at queue depth 16 over a fully local QED image (requests per second);
//! 2. sequential 1 MiB reads, 4 in flight, of the same image;
//! 3. first-touch copy-on-read: the same sequential reads through a fresh empty overlay over a
//!    raw base (ours: `serve` of the overlay, copy-on-read by default; QSD: file + qed over its
//!    backing + a `copy-on-read` filter, exported writable);
//! 4. during a stream: the random reads of (1) through a fresh empty overlay while the stream
//!    job fills it at a rate limit of a sixteenth of the image per second (ours: `serve
//!    --stream --rate`; QSD: `block-stream` with `speed`, whose copy-on-read filter the export
//!    then reads through). The random reads touch nearly every cluster, so they copy in much of
//!    the image themselves, beside the job. Both jobs are asked over QMP, after the reads,
//!    whether they are still running; the runner says when one had already ended.
//!
//! ```text
//! cargo build --release -p engine --bin qedstream
//! cargo run --release -p qedstream-benches --bin vhost-compare [-- --quick]
//! ```
//! The `qedstream` binary is taken from the runner's own directory (same profile), or from
//! `$QEDSTREAM`. `--quick` (64 MiB, 1 run) only proves the runner works; the full run (1 GiB,
//! 3 runs each, interleaved) is for a quiet machine; `--size-mib N` changes the image size. Scratch files go under `$BENCH_DIR`
//! (default /var/tmp). Needs qemu-img and qemu-storage-daemon.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qedstream_benches::vhost::{job_running, start_ours, start_qsd, start_streaming, Server};
use qedstream_benches::XorShift;
use qedstream_tests::tools;
use qedstream_tests::vhost_front::{BlkRequest, VhostFront};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Sizes and repeat counts of one mode.
#[derive(Clone, Copy)]
struct Plan {
    size: u64,
    runs: usize,
    random_reads: usize,
}

/// The random reads through a fresh overlay while the server streams it at `rate` bytes/s;
/// the measurement, and whether the stream was still running when the reads ended.
fn measure_during_stream(
    d: &Path,
    name: &str,
    sock: &Path,
    rate: u64,
    random: &[(u64, u32)],
) -> ((Duration, f64), bool) {
    let overlay = d.join(format!("streamed-{name}.qed"));
    let _ = std::fs::remove_file(&overlay);
    let file = overlay.file_name().unwrap().to_str().unwrap();
    tools::create_overlay(d, "base.raw", "raw", file, None);
    let qmp = d.join("qmp.sock");
    let server = start_streaming(name, &overlay, sock, &qmp, rate);
    let measured = measure(&server, sock, 16, random);
    let running = job_running(&qmp);
    server.stop();
    assert_eq!(tools::qemu_check(d, file), 0, "{file} after the stream");
    (measured, running)
}

/// Runs `requests` on queue 0 with up to `depth` in flight; the wall time.
fn drive(front: &mut VhostFront, depth: u16, requests: &[(u64, u32)]) -> Duration {
    let started = Instant::now();
    let mut next = requests.iter();
    let mut free: Vec<u16> = (0..depth).collect();
    let mut outstanding = 0usize;
    loop {
        while let Some(slot) = free.pop() {
            match next.next() {
                Some(&(offset, len)) => {
                    front
                        .submit(0, slot, BlkRequest::Read { offset, len })
                        .expect("submit");
                    outstanding += 1;
                }
                None => {
                    free.push(slot);
                    break;
                }
            }
        }
        if outstanding == 0 {
            return started.elapsed();
        }
        for done in front.wait(0).expect("completion") {
            assert_eq!(done.status, 0, "a read failed: {done:?}");
            free.push(done.slot);
            outstanding -= 1;
        }
    }
}

fn random_reads(plan: Plan, seed: u64) -> Vec<(u64, u32)> {
    let mut rng = XorShift::new(seed);
    let blocks = plan.size / (4 * KIB);
    (0..plan.random_reads)
        .map(|_| (rng.below(blocks) * 4 * KIB, 4 * KIB as u32))
        .collect()
}

fn sequential_reads(plan: Plan) -> Vec<(u64, u32)> {
    (0..plan.size / MIB)
        .map(|i| (i * MIB, MIB as u32))
        .collect()
}

/// One measurement: the wall time and the server's CPU seconds for `requests`.
fn measure(server: &Server, sock: &Path, depth: u16, requests: &[(u64, u32)]) -> (Duration, f64) {
    let mut front = VhostFront::connect(sock, 1, depth, MIB as u32).expect("front end");
    let cpu = server.cpu_seconds();
    let wall = drive(&mut front, depth, requests);
    let cpu = server.cpu_seconds() - cpu;
    drop(front);
    (wall, cpu)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Per server: wall seconds and CPU seconds of each run.
#[derive(Default)]
struct Runs {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Runs {
    fn push(&mut self, (wall, cpu): (Duration, f64)) {
        self.wall.push(wall.as_secs_f64());
        self.cpu.push(cpu);
    }
}

fn report(what: &str, units: f64, unit: &str, ours: &Runs, qsd: &Runs) {
    let (o, q) = (median(ours.wall.clone()), median(qsd.wall.clone()));
    println!(
        "{what:<44} ours {:>9.0} {unit}/s ({:.3} s, CPU {:.2} s)  QSD {:>9.0} {unit}/s ({:.3} s, CPU {:.2} s)  QSD/ours {:.2}",
        units / o,
        o,
        median(ours.cpu.clone()),
        units / q,
        q,
        median(qsd.cpu.clone()),
        q / o
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut plan = if quick {
        Plan {
            size: 64 * MIB,
            runs: 1,
            random_reads: 16_384,
        }
    } else {
        Plan {
            size: 1024 * MIB,
            runs: 3,
            random_reads: 131_072,
        }
    };
    if let Some(i) = args.iter().position(|a| a == "--size-mib") {
        let mib: u64 = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--size-mib N");
        plan.size = mib * MIB;
    }
    let scratch =
        std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::tempdir_in(scratch).expect("scratch dir");
    let d = dir.path();
    let base = d.join("base.raw");
    let mut bytes = vec![0u8; plan.size as usize];
    XorShift::new(0xB10C).fill(&mut bytes);
    std::fs::write(&base, &bytes).expect("writing the base");
    drop(bytes);
    tools::ok(
        d,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qed", "base.raw", "local.qed"],
    );
    let local = d.join("local.qed");
    let sock = d.join("blk.sock");

    let random = random_reads(plan, 7);
    let sequential = sequential_reads(plan);
    let (mut rand_ours, mut rand_qsd) = (Runs::default(), Runs::default());
    let (mut seq_ours, mut seq_qsd) = (Runs::default(), Runs::default());
    let (mut cor_ours, mut cor_qsd) = (Runs::default(), Runs::default());
    let (mut streamed_ours, mut streamed_qsd) = (Runs::default(), Runs::default());
    let mut finished_first = Vec::new();
    let rate = plan.size / 16;
    for run in 0..plan.runs {
        eprintln!("run {} of {}", run + 1, plan.runs);
        let ours = start_ours(&local, &sock, true);
        rand_ours.push(measure(&ours, &sock, 16, &random));
        seq_ours.push(measure(&ours, &sock, 4, &sequential));
        ours.stop();
        let qsd = start_qsd(&local, &sock, false);
        rand_qsd.push(measure(&qsd, &sock, 16, &random));
        seq_qsd.push(measure(&qsd, &sock, 4, &sequential));
        qsd.stop();

        for (name, runs) in [("ours", &mut cor_ours), ("qsd", &mut cor_qsd)] {
            let overlay = d.join(format!("cor-{name}.qed"));
            let _ = std::fs::remove_file(&overlay);
            tools::create_overlay(
                d,
                "base.raw",
                "raw",
                overlay.file_name().unwrap().to_str().unwrap(),
                None,
            );
            let server = if name == "ours" {
                start_ours(&overlay, &sock, false)
            } else {
                start_qsd(&overlay, &sock, true)
            };
            runs.push(measure(&server, &sock, 4, &sequential));
            server.stop();
            assert_eq!(
                tools::qemu_check(d, overlay.file_name().unwrap().to_str().unwrap()),
                0
            );
        }
        for (name, runs) in [("ours", &mut streamed_ours), ("QSD", &mut streamed_qsd)] {
            let (measured, running) = measure_during_stream(d, name, &sock, rate, &random);
            runs.push(measured);
            if !running {
                finished_first.push(format!("{name} (run {})", run + 1));
            }
        }
    }
    println!(
        "vhost-user-blk server, {} MiB image, {} run(s), medians:",
        plan.size / MIB,
        plan.runs
    );
    report(
        "random 4 KiB reads, QD 16, local image",
        plan.random_reads as f64,
        "req",
        &rand_ours,
        &rand_qsd,
    );
    let mib = (plan.size / MIB) as f64;
    report(
        "sequential 1 MiB reads, QD 4, local image",
        mib,
        "MiB",
        &seq_ours,
        &seq_qsd,
    );
    report(
        "first-touch copy-on-read, 1 MiB reads, QD 4",
        mib,
        "MiB",
        &cor_ours,
        &cor_qsd,
    );
    report(
        &format!("random 4 KiB reads, QD 16, stream at {} MiB/s", rate / MIB),
        plan.random_reads as f64,
        "req",
        &streamed_ours,
        &streamed_qsd,
    );
    if !finished_first.is_empty() {
        println!(
            "  note: the stream ended before the reads in {} (the reads and the job between them \
             had copied everything in)",
            finished_first.join(", ")
        );
    }
}
