//! The stream job against the tools that do the same copy, on the same data, in one run: a
//! 1 GiB base with 60% random data in 64 KiB..8 MiB extents, the rest holes, under an empty QED
//! overlay, backed (a) by the raw file and (b) by qemu-nbd (`-r -f raw`, unix socket). A third
//! case streams from a zlib-compressed qcow2 base (`qemu-img convert -c` of the same base, as
//! cloud images are shipped) under the same empty QED overlay, against block-stream only
//! ([`qcow2_case`]).
//!
//! For each backing, each run streams the overlay with the `qedstream` binary (`qedstream
//! stream`, a whole process: open, stream, unlink, close) and with QEMU's block-stream
//! (qemu-storage-daemon over QMP, job time), and copies the same data with the plain tool for
//! it, durably: `cp --sparse=always` then `sync` for the raw file, `nbdcopy --flush` of the
//! export to a file for qemu-nbd; and `qemu-img rebase -b ''` (safe mode: it copies what the
//! backing holds into the overlay, then drops the link) followed by `sync`. Runs are
//! interleaved (ours, QEMU's two, the plain tool, then again), so a machine whose load changes
//! affects all alike. Printed per backing: median wall
//! times, CPU seconds (user + sys, from `wait4`) per GiB of data, and the medians of the
//! per-run ratios. Each streamed image is checked with `qemu-img compare` against the base.
//!
//! The cost of TLS ([`tls_case`]): a second qemu-nbd serves the same base over TLS
//! (`tls-creds-x509`, `verify-peer=on`, credentials made by `certtool`), and each run streams
//! the overlay from the plain-text and from the TLS export with the `qedstream` binary, and
//! copies both with `nbdcopy --flush` (libnbd over GnuTLS) as the reference; printed: the
//! median wall and CPU times and the TLS/plain ratios of each.
//!
//! Then the backend × cache matrix of our stream over the raw file: `--aio io_uring` and
//! `--aio threads`, each through the page cache (`--cache writeback`) and with O_DIRECT
//! (`--cache none`), runs interleaved, medians printed with each one's ratio to its own
//! backend's buffered time. The matrix runs twice: with the base in the page cache (warm, as
//! every other case here), and cold, the base's pages dropped before each run (`dd
//! iflag=nocache count=0`): with `--cache none` the base is read from the disk either way (the
//! backing inherits the cache mode, as in QEMU), so the cold rows compare the two modes on the
//! same reads.
//!
//! `cargo build --release -p engine --bin qedstream && cargo run --release -p qedstream-benches
//! --bin stream-compare [-- --quick] [--runs N] [--io-only] [--tls-only]` (the `qedstream`
//! binary is taken from the same folder as this one, or from `$QEDSTREAM`; `--io-only`: the
//! matrix alone; `--tls-only`: the TLS case alone).

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qedstream_benches::qedstream_binary;
use qedstream_benches::sparse_random_file;
use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::qsd;
use qedstream_tests::tls::create_args;
use qedstream_tests::tools::ok_command;

/// Wall time and CPU time (user + sys) of one child process.
#[derive(Clone, Copy, Debug)]
struct Timed {
    wall: Duration,
    cpu: Duration,
}

/// Runs `cmd` to its end, failing loudly when it cannot start or fails; times it with
/// `wait4` (the child's own user and system time).
fn timed(cmd: &mut Command) -> Timed {
    let t = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet waited for; `status` and `usage` are valid
    // for writes for the duration of the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = t.elapsed();
    assert_eq!(
        r,
        pid,
        "wait4 of {cmd:?}: {}",
        std::io::Error::last_os_error()
    );
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed: status {status:#x}"
    );
    std::mem::forget(child);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Timed {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
    }
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_d(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// A fresh empty overlay `name` in `d` over `backing` (raw).
fn overlay(d: &Path, name: &str, backing: &str) {
    let _ = std::fs::remove_file(d.join(name));
    ok_command(Command::new("qemu-img").current_dir(d).args([
        "create", "-q", "-f", "qed", "-b", backing, "-F", "raw", name,
    ]));
}

fn compare(d: &Path, image: &str) {
    ok_command(
        Command::new("qemu-img")
            .current_dir(d)
            .args(["compare", "-q", "-f", "qed", "-F", "raw", image, "base.raw"]),
    );
}

/// The plain copy for a backing: `cp --sparse=always` + `sync` (raw), `nbdcopy --flush` (NBD).
fn plain_copy(d: &Path, backing: &Backing) -> Timed {
    let _ = std::fs::remove_file(d.join("copy.raw"));
    match backing {
        Backing::Raw => {
            let cp = timed(Command::new("cp").current_dir(d).args([
                "--sparse=always",
                "base.raw",
                "copy.raw",
            ]));
            let sync = timed(Command::new("sync").current_dir(d).arg("copy.raw"));
            Timed {
                wall: cp.wall + sync.wall,
                cpu: cp.cpu + sync.cpu,
            }
        }
        Backing::Nbd(uri) => timed(
            Command::new("nbdcopy")
                .current_dir(d)
                .args(["--flush", uri, "copy.raw"]),
        ),
    }
}

enum Backing {
    Raw,
    Nbd(String),
}

impl Backing {
    fn name(&self) -> &'static str {
        match self {
            Backing::Raw => "raw file",
            Backing::Nbd(_) => "qemu-nbd (unix socket)",
        }
    }
    fn plain(&self) -> &'static str {
        match self {
            Backing::Raw => "cp --sparse=always + sync",
            Backing::Nbd(_) => "nbdcopy --flush",
        }
    }
    fn header_name(&self) -> String {
        match self {
            Backing::Raw => "base.raw".into(),
            Backing::Nbd(uri) => uri.clone(),
        }
    }
}

/// What the runs of one backing measured.
#[derive(Default)]
struct Runs {
    ours: Vec<Timed>,
    qemu: Vec<Duration>,
    rebase: Vec<Timed>,
    plain: Vec<Timed>,
}

/// `qemu-img rebase -b ''` of a fresh overlay `rebase.qed` (it copies everything the backing
/// holds into it, then drops the link), then `sync`: the same durable end as ours.
fn qemu_img_rebase(d: &Path, backing: &Backing) -> Timed {
    overlay(d, "rebase.qed", &backing.header_name());
    let rebase = timed(Command::new("qemu-img").current_dir(d).args([
        "rebase",
        "-q",
        "-f",
        "qed",
        "-b",
        "",
        "rebase.qed",
    ]));
    let sync = timed(Command::new("sync").current_dir(d).arg("rebase.qed"));
    compare(d, "rebase.qed");
    Timed {
        wall: rebase.wall + sync.wall,
        cpu: rebase.cpu + sync.cpu,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse::<usize>().expect("--runs N"))
        .unwrap_or(if quick { 1 } else { 5 });
    let size: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let bin = qedstream_binary();
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    let d = dir.path();
    let data = sparse_random_file(&d.join("base.raw"), size, 60, 11);
    let gib = data as f64 / (1u64 << 30) as f64;
    println!(
        "base: {} MiB, {} MiB of data ({:.0}%); {runs} interleaved runs; {}",
        size >> 20,
        data >> 20,
        data as f64 * 100.0 / size as f64,
        bin.display()
    );
    if args.iter().any(|a| a == "--io-only") {
        return io_matrix(&bin, d, runs.max(3), data);
    }
    let sock = d.join("nbd.sock");
    let mut nbd_args: Vec<OsString> = ["-r", "-t", "-f", "raw", "-k"].map(OsString::from).to_vec();
    nbd_args.push(sock.clone().into());
    nbd_args.push(d.join("base.raw").into());
    let _nbd = NbdServer::start("qemu-nbd", nbd_args, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    tls_case(&bin, d, runs, &uri, gib);
    if args.iter().any(|a| a == "--tls-only") {
        return;
    }
    for backing in [Backing::Raw, Backing::Nbd(uri)] {
        let mut r = Runs::default();
        for _ in 0..runs {
            overlay(d, "ours.qed", &backing.header_name());
            r.ours.push(timed(
                Command::new(&bin)
                    .current_dir(d)
                    .args(["stream", "ours.qed"]),
            ));
            compare(d, "ours.qed");
            overlay(d, "qemu.qed", &backing.header_name());
            r.qemu.push(qsd::block_stream(d, "qemu.qed"));
            compare(d, "qemu.qed");
            r.rebase.push(qemu_img_rebase(d, &backing));
            r.plain.push(plain_copy(d, &backing));
        }
        report(&backing, &r, data, gib);
    }
    qcow2_case(&bin, d, runs, data);
    io_matrix(&bin, d, runs.max(3), data);
}

/// The TLS case: qemu-nbd over TLS beside the plain-text export at `plain_uri`, our stream
/// and nbdcopy from each, `runs` times interleaved; every streamed image compared with the
/// base. Prints the medians and the TLS/plain ratios.
fn tls_case(bin: &Path, d: &Path, runs: usize, plain_uri: &str, gib: f64) {
    use qedstream_tests::tls::{Pki, Validity};
    let pki = Pki::new(&d.join("pki"), "stream-compare CA");
    let server = pki.server("server", &["localhost"], Validity::Current);
    let client = pki.client("client", true, Validity::Current);
    let sock = d.join("tls.sock");
    let mut args: Vec<OsString> = vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on",
            server.display()
        )
        .into(),
    ];
    args.extend(["--tls-creds", "tls0", "-r", "-t", "-f", "raw", "-k"].map(OsString::from));
    args.push(sock.clone().into());
    args.push(d.join("base.raw").into());
    let _tls = NbdServer::start("qemu-nbd", args, &sock);
    let tls_uri = format!("nbds+unix:///?socket={}", sock.display());
    let nbdcopy_tls_uri = format!("{tls_uri}&tls-certificates={}", client.display());
    let creds = client.to_str().expect("a UTF-8 path");
    let stream = |uri: &str| {
        let _ = std::fs::remove_file(d.join("tls.qed"));
        ok_command(
            Command::new(bin)
                .current_dir(d)
                .args(create_args(creds, uri, "tls.qed")),
        );
        let t = timed(Command::new(bin).current_dir(d).args([
            "stream",
            "--tls-creds",
            creds,
            "tls.qed",
        ]));
        compare(d, "tls.qed");
        t
    };
    let nbdcopy = |uri: &str| {
        let _ = std::fs::remove_file(d.join("copy.raw"));
        timed(
            Command::new("nbdcopy")
                .current_dir(d)
                .args(["--flush", uri, "copy.raw"]),
        )
    };
    let mut m: [Vec<Timed>; 4] = Default::default();
    for _ in 0..runs {
        m[0].push(stream(plain_uri));
        m[1].push(stream(&tls_uri));
        m[2].push(nbdcopy(plain_uri));
        m[3].push(nbdcopy(&nbdcopy_tls_uri));
    }
    let wall = |v: &[Timed]| median_d(&v.iter().map(|t| t.wall).collect::<Vec<_>>()).as_secs_f64();
    let cpu = |v: &[Timed]| median_f(v.iter().map(|t| t.cpu.as_secs_f64() / gib).collect());
    // Medians of the per-run ratios: each pair ran back to back, so load that drifts over the
    // runs cancels out.
    let ratio = |a: &[Timed], b: &[Timed], f: fn(&Timed) -> f64| {
        median_f(a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect())
    };
    let w = |t: &Timed| t.wall.as_secs_f64();
    let c = |t: &Timed| t.cpu.as_secs_f64();
    println!("stream over qemu-nbd, plain text vs TLS (unix socket, verify-peer=on):");
    for (name, plain, tls) in [
        ("qedstream stream", &m[0], &m[1]),
        ("nbdcopy --flush", &m[2], &m[3]),
    ] {
        println!(
            "  {name:<17} plain {:>7.3}s CPU {:>5.2} s/GiB   TLS {:>7.3}s CPU {:>5.2} s/GiB   medians of TLS/plain ratios: wall {:.2}, CPU {:.2}",
            wall(plain),
            cpu(plain),
            wall(tls),
            cpu(tls),
            ratio(tls, plain, w),
            ratio(tls, plain, c)
        );
    }
    println!(
        "  ours/nbdcopy over TLS (medians of ratios): wall {:.2}, CPU {:.2}",
        ratio(&m[1], &m[3], w),
        ratio(&m[1], &m[3], c)
    );
}

/// The stream from a compressed qcow2 base (made from `base.raw` in `d`): the `qedstream`
/// binary and qemu-storage-daemon's block-stream, `runs` times each, every result
/// `qemu-img compare`d against the qcow2. Prints one line like the raw and NBD cases.
fn qcow2_case(bin: &Path, d: &Path, runs: usize, data: u64) {
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
                "-q",
                "-f",
                "qed",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                img,
            ]);
        }
        let t = timed(
            Command::new(bin)
                .current_dir(d)
                .args(["stream", "ours.qed"]),
        );
        ours.push(t.wall);
        theirs.push(qsd::block_stream(d, "qemu.qed"));
        for img in ["ours.qed", "qemu.qed"] {
            qemu_img(&["compare", "-f", "qed", "-F", "qcow2", img, "base.qcow2"]);
        }
    }
    let (o, q) = (median_d(&ours), median_d(&theirs));
    let mbs = |t: Duration| data as f64 / t.as_secs_f64() / 1e6;
    println!(
        "stream over a compressed qcow2 file: ours {:>7.3}s ({:>6.0} MB/s of data)   qemu block-stream {:>7.3}s ({:>6.0} MB/s)   qemu/ours {:>5.2}x",
        o.as_secs_f64(),
        mbs(o),
        q.as_secs_f64(),
        mbs(q),
        q.as_secs_f64() / o.as_secs_f64()
    );
}

/// The four backend × cache configurations: their names and `qedstream` options, in pairs
/// (writeback, none) per backend.
const IO_CONFIGS: [(&str, [&str; 4]); 4] = [
    (
        "io_uring/writeback",
        ["--aio", "io_uring", "--cache", "writeback"],
    ),
    ("io_uring/none", ["--aio", "io_uring", "--cache", "none"]),
    (
        "threads/writeback",
        ["--aio", "threads", "--cache", "writeback"],
    ),
    ("threads/none", ["--aio", "threads", "--cache", "none"]),
];

/// Drops the base's pages from the page cache (GNU dd: `iflag=nocache count=0` advises
/// the kernel to drop the whole file).
fn drop_base_cache(d: &Path) {
    ok_command(Command::new("dd").current_dir(d).args([
        "if=base.raw",
        "iflag=nocache",
        "count=0",
        "status=none",
    ]));
}

/// `qedstream stream` over the raw base under each configuration, interleaved run by run,
/// with the base warm in the page cache and then with it dropped before each run.
fn io_matrix(bin: &Path, d: &Path, runs: usize, data: u64) {
    for cold in [false, true] {
        io_matrix_runs(bin, d, runs, data, cold);
    }
}

fn io_matrix_runs(bin: &Path, d: &Path, runs: usize, data: u64, cold: bool) {
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); IO_CONFIGS.len()];
    for _ in 0..runs {
        for (i, (_, options)) in IO_CONFIGS.iter().enumerate() {
            overlay(d, "io.qed", "base.raw");
            if cold {
                drop_base_cache(d);
            }
            let t = timed(
                Command::new(bin)
                    .current_dir(d)
                    .arg("stream")
                    .args(options)
                    .arg("io.qed"),
            );
            times[i].push(t.wall);
            compare(d, "io.qed");
        }
    }
    if cold {
        // What the other cases expect: the base back in the page cache.
        ok_command(Command::new("dd").current_dir(d).args([
            "if=base.raw",
            "of=/dev/null",
            "bs=4M",
            "status=none",
        ]));
    }
    let medians: Vec<f64> = times.iter().map(|t| median_d(t).as_secs_f64()).collect();
    let base = if cold { "cold" } else { "warm" };
    for (i, (name, _)) in IO_CONFIGS.iter().enumerate() {
        let t = medians[i];
        println!(
            "stream, raw file ({base} base), {name:<20} {t:>7.3}s ({:>6.0} MB/s of data)   / own buffered {:>5.2}x   / io_uring/writeback {:>5.2}x",
            data as f64 / t / 1e6,
            t / medians[i - i % 2],
            t / medians[0]
        );
    }
}

fn report(backing: &Backing, r: &Runs, data: u64, gib: f64) {
    let walls = |v: &[Timed]| v.iter().map(|t| t.wall).collect::<Vec<_>>();
    let (o, q, p) = (
        median_d(&walls(&r.ours)),
        median_d(&r.qemu),
        median_d(&walls(&r.plain)),
    );
    let cpu = |v: &[Timed]| median_f(v.iter().map(|t| t.cpu.as_secs_f64() / gib).collect());
    let ratio = |a: &[f64], b: &[f64]| median_f(a.iter().zip(b).map(|(x, y)| x / y).collect());
    let ow: Vec<f64> = r.ours.iter().map(|t| t.wall.as_secs_f64()).collect();
    let qw: Vec<f64> = r.qemu.iter().map(Duration::as_secs_f64).collect();
    let pw: Vec<f64> = r.plain.iter().map(|t| t.wall.as_secs_f64()).collect();
    let rw: Vec<f64> = r.rebase.iter().map(|t| t.wall.as_secs_f64()).collect();
    let rb = median_d(&walls(&r.rebase));
    let oc: Vec<f64> = r.ours.iter().map(|t| t.cpu.as_secs_f64()).collect();
    let pc: Vec<f64> = r.plain.iter().map(|t| t.cpu.as_secs_f64()).collect();
    let mbs = |t: Duration| data as f64 / t.as_secs_f64() / 1e6;
    println!("stream over {}:", backing.name());
    println!(
        "  qedstream stream      {:>7.3}s ({:>5.0} MB/s)  CPU {:>5.2} s/GiB",
        o.as_secs_f64(),
        mbs(o),
        cpu(&r.ours)
    );
    println!(
        "  qemu block-stream     {:>7.3}s ({:>5.0} MB/s)  (job time)",
        q.as_secs_f64(),
        mbs(q)
    );
    println!(
        "  qemu-img rebase + sync {:>6.3}s ({:>5.0} MB/s)  CPU {:>5.2} s/GiB",
        rb.as_secs_f64(),
        mbs(rb),
        cpu(&r.rebase)
    );
    println!(
        "  {:<21} {:>7.3}s ({:>5.0} MB/s)  CPU {:>5.2} s/GiB",
        backing.plain(),
        p.as_secs_f64(),
        mbs(p),
        cpu(&r.plain)
    );
    println!(
        "  medians of ratios: ours/{} wall {:.2}, CPU {:.2}; qemu/ours wall {:.2}; qemu-img rebase/ours wall {:.2}",
        backing.plain(),
        ratio(&ow, &pw),
        ratio(&oc, &pc),
        ratio(&qw, &ow),
        ratio(&rw, &ow)
    );
}
