//! `vm-compare`: a real guest reads its whole disk over vhost-user-blk, served by `qedstream
//! serve --vhost-user-blk` and by qemu-storage-daemon's vhost-user-blk export of the same
//! image, in one run: the guest kit of the tests (`guest/`, booted under TCG, 1 vCPU, 1 queue)
//! hashes `/dev/vda` with `dd bs=1M | sha256sum` and reports how long that took by its own
//! clock. Two cases:
//!
//! 1. a fully local QED image (`qemu-img convert` of the base), exported read-only;
//! 2. during a stream: a fresh empty overlay over the raw base, its stream job running at a
//!    rate limit of a sixteenth of the image per second (ours: `serve --stream --rate`; QSD:
//!    `block-stream` with `speed`, the export reading through the job's copy-on-read filter).
//!    Whether each job still ran when the guest was done is asked over QMP and printed.
//!
//! Printed per case and server: medians of the guest's hash time, QEMU's whole wall time (boot
//! to power-off), and the server's CPU seconds (user + system, from /proc) over the guest's
//! life; then the median of the per-run ratios QSD / ours of the hash time. Every guest's hash
//! must equal the base's. Under TCG the guest's own CPU dominates its read time, so the server
//! side alone is measured by `vhost-compare`.
//!
//! ```text
//! cargo build --release -p engine --bin qedstream
//! cargo run --release -p qedstream-benches --bin vm-compare [-- --quick] [--runs N] [--size-mib N]
//! ```
//! `--quick`: 64 MiB, one run. Default: 256 MiB, three runs, servers interleaved. Needs
//! qemu-system-x86_64, qemu-storage-daemon, qemu-img and the guest kit (`guest/build-kit.sh`,
//! built on first use).

use std::path::{Path, PathBuf};

use qedstream_benches::vhost::{job_running, start_ours, start_qsd, start_streaming, Server};
use qedstream_tests::guest::{GuestAction, GuestDisk, GuestKit, GuestReport};
use qedstream_tests::{tools, vm_serve};

const MIB: u64 = 1 << 20;
const SERVERS: [&str; 2] = ["ours", "QSD"];

/// One guest's figures.
#[derive(Clone, Copy, Debug)]
struct Sample {
    hash: f64,
    wall: f64,
    cpu: f64,
}

/// Boots the guest on the vhost-user-blk socket `sock` of `server`; checks its hash.
fn read_disk(server: &Server, sock: &Path, size: u64, expected_sha256: &str) -> Sample {
    let disk = GuestDisk::VhostUserBlk {
        socket: sock.to_path_buf(),
        queues: 1,
    };
    let cpu = server.cpu_seconds();
    let report: GuestReport = GuestKit::get().boot(disk, GuestAction::Hash);
    let cpu = server.cpu_seconds() - cpu;
    assert_eq!(report.size, size, "{}", report.console);
    assert_eq!(report.sha256, expected_sha256, "{}", report.console);
    Sample {
        hash: report
            .hash_seconds
            .expect("the guest reports its hash time (QEDSTREAM-HASH-TIME)"),
        wall: report.elapsed.as_secs_f64(),
        cpu,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The samples of one case, per server (in [`SERVERS`] order).
#[derive(Default)]
struct Case {
    samples: [Vec<Sample>; 2],
    /// Runs where a stream job had ended before the guest was done: "server (run n)".
    finished_first: Vec<String>,
}

impl Case {
    fn report(&self, what: &str) {
        println!("{what}:");
        for (name, samples) in SERVERS.iter().zip(&self.samples) {
            let pick = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
            println!(
                "  {name:<5} guest hash {:>7.2} s   QEMU wall {:>7.2} s   server CPU {:>6.2} s",
                pick(|s| s.hash),
                pick(|s| s.wall),
                pick(|s| s.cpu)
            );
        }
        let ratios = self.samples[0]
            .iter()
            .zip(&self.samples[1])
            .map(|(ours, qsd)| qsd.hash / ours.hash)
            .collect();
        println!("  QSD / ours, guest hash time: {:.2}", median(ratios));
        if !self.finished_first.is_empty() {
            println!(
                "  note: the stream had ended before the guest was done in {}",
                self.finished_first.join(", ")
            );
        }
    }
}

fn arg_value(args: &[String], name: &str) -> Option<u64> {
    let i = args.iter().position(|a| a == name)?;
    Some(
        args.get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} N")),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let size = arg_value(&args, "--size-mib").unwrap_or(if quick { 64 } else { 256 }) * MIB;
    let runs = arg_value(&args, "--runs").unwrap_or(if quick { 1 } else { 3 });
    let scratch =
        std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::tempdir_in(scratch).expect("scratch dir");
    let d = dir.path();
    let base = vm_serve::random_base(d, size, 0x5EED);
    let expected = vm_serve::sha256_of_bytes(d, &base);
    drop(base);
    tools::ok(
        d,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qed", "base.raw", "local.qed"],
    );
    let local = d.join("local.qed");
    let sock = d.join("blk.sock");
    let qmp = d.join("qmp.sock");
    let rate = size / 16;
    GuestKit::get();

    let (mut local_case, mut stream_case) = (Case::default(), Case::default());
    for run in 1..=runs {
        eprintln!("run {run} of {runs}");
        for (i, name) in SERVERS.iter().enumerate() {
            let server = if i == 0 {
                start_ours(&local, &sock, true)
            } else {
                start_qsd(&local, &sock, false)
            };
            local_case.samples[i].push(read_disk(&server, &sock, size, &expected));
            server.stop();

            let overlay = format!("streamed-{name}.qed");
            let _ = std::fs::remove_file(d.join(&overlay));
            tools::create_overlay(d, "base.raw", "raw", &overlay, None);
            let server = start_streaming(name, &d.join(&overlay), &sock, &qmp, rate);
            stream_case.samples[i].push(read_disk(&server, &sock, size, &expected));
            if !job_running(&qmp) {
                stream_case
                    .finished_first
                    .push(format!("{name} (run {run})"));
            }
            server.stop();
            assert_eq!(tools::qemu_check(d, &overlay), 0, "{overlay}");
        }
    }
    println!(
        "a TCG guest hashing its {} MiB disk over vhost-user-blk, {runs} run(s), medians:",
        size / MIB
    );
    local_case.report("fully local QED image");
    stream_case.report(&format!(
        "empty overlay over a raw base, stream at {} MiB/s",
        rate / MIB
    ));
}
