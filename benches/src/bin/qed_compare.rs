//! Side-by-side runs of the same QED workloads through our `qed` crate and through QEMU
//! (`qemu-io`, `qemu-img convert -O qed`), in one run, on the same files. Prints medians of
//! three runs and the ratio QEMU time / our time (above 1: we are faster).
//!
//! `cargo build --release -p engine --bin qedstream &&
//! cargo run --release -p qedstream-benches --bin qed-compare [-- --quick] [--convert-only]`
//!
//! The convert comparison runs the `qedstream` binary (beside this runner, or `$QEDSTREAM`)
//! and `qemu-img` as processes, `$CONVERT_RUNS` times each (default 5), interleaved.
//!
//! Then the write cases again under each I/O backend × cache mode (io_uring and threads, each
//! with `cache=writeback` and `cache=none`), against qemu-io with the same `-t CACHE -i AIO`,
//! runs interleaved, medians.
//!
//! `--io-only`: the backend × cache matrix alone, three runs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use copy_on_read::{CorDevice, CorOptions, SyncDevice};
use qed::{BackingFormat, CreateOptions, GuestOffset, Image, OpenOptions};
use qedstream_benches::XorShift;
use qedstream_tests::tools::ok_command;

const MIB: u64 = 1 << 20;

fn qemu_io(image: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qed"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    ok_command(c.arg(image));
}

fn qemu_img(args: &[&str]) {
    ok_command(Command::new("qemu-img").args(args));
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(runs: usize, mut setup: impl FnMut(), mut f: impl FnMut()) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                setup();
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn report(name: &str, bytes: u64, ours: Duration, qemu: Duration) {
    let mbs = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    println!(
        "{name:<48} ours {:>8.3}s ({:>7.1} MB/s)   qemu {:>8.3}s ({:>7.1} MB/s)   qemu/ours {:>5.2}x",
        ours.as_secs_f64(),
        mbs(ours),
        qemu.as_secs_f64(),
        mbs(qemu),
        qemu.as_secs_f64() / ours.as_secs_f64()
    );
}

fn create(path: &Path, size: u64, backing: Option<&str>) {
    let _ = std::fs::remove_file(path);
    let mut options = CreateOptions::new(size);
    options.backing = backing.map(|b| (b.to_string(), BackingFormat::Raw));
    Image::create_path(path, &options).unwrap();
}

/// The image with its backing, read and filled through the chain reader (the image itself
/// never reads its backing).
/// An image without a backing: the `qed` crate itself, from this thread.
fn open_alone(path: &Path) -> Image {
    Image::open_path(path, OpenOptions::default()).unwrap()
}

/// The image over its backing, written through the copy-on-read device from this thread (as
/// `qemu-io` writes through QEMU's block layer); copy-on-read off, as qemu-io's default. (The
/// image never reads its backing: a write covering part of a cluster is merged with the
/// backing there.)
fn open(path: &Path) -> SyncDevice<CorDevice> {
    let options = CorOptions {
        copy_on_read: false,
        ..CorOptions::default()
    };
    SyncDevice::open(path, options).unwrap()
}

/// `qedstream convert -O qed` against `qemu-img convert -O qed` (`-t writeback`, then `sync`
/// of the output: both end durable) and, for reference, `qemu-img convert -t none` (O_DIRECT),
/// each run as a process, interleaved, over a 1 GiB raw file with 60% random data in 1 MiB
/// extents (the rest holes) and over the same disk as a QED image. Prints the median of the
/// per-run ratios (qemu / ours) and CPU seconds per GiB of virtual disk (user + sys of the
/// process, from its rusage).
fn convert_comparison(d: &Path, quick: bool) {
    let size = if quick { 256 * MIB } else { 1024 * MIB };
    let runs = std::env::var("CONVERT_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if quick { 1 } else { 5 });
    let raw = d.join("src.raw");
    let data = qedstream_benches::sparse_mib_extents(&raw, size, 60, 9);
    let (raw_s, qed_s) = (raw.to_str().unwrap(), d.join("src.qed"));
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qed",
        raw_s,
        qed_s.to_str().unwrap(),
    ]);
    let gib = size as f64 / (1u64 << 30) as f64;
    println!(
        "convert -O qed, {} MiB virtual, {:.0}% data in 1 MiB extents, {runs} runs interleaved (wall s; CPU s/GiB virtual)",
        size / MIB,
        data as f64 * 100.0 / size as f64
    );
    for (format, src) in [("raw", raw.clone()), ("qed", qed_s.clone())] {
        let src = src.to_str().unwrap().to_string();
        let out = d.join("out.qed");
        let out_s = out.to_str().unwrap().to_string();
        let ours_bin = qedstream_binary();
        let contestants: [(&str, Vec<Vec<String>>); 3] = [
            (
                "ours",
                vec![vec![
                    ours_bin.clone(),
                    "convert".into(),
                    "-f".into(),
                    format.into(),
                    "-O".into(),
                    "qed".into(),
                    src.clone(),
                    out_s.clone(),
                ]],
            ),
            (
                "qemu-img -t writeback + sync",
                vec![
                    qemu_convert_args("writeback", format, &src, &out_s),
                    vec!["sync".into(), out_s.clone()],
                ],
            ),
            (
                "qemu-img -t none",
                vec![qemu_convert_args("none", format, &src, &out_s)],
            ),
        ];
        let mut walls = vec![Vec::new(); contestants.len()];
        let mut cpus = vec![Vec::new(); contestants.len()];
        for run in 0..runs {
            // Alternate who goes first, so neither always inherits the other's writeback.
            let mut order: Vec<usize> = (0..contestants.len()).collect();
            if run % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let _ = std::fs::remove_file(&out);
                let (mut wall, mut cpu) = (0.0, 0.0);
                for argv in &contestants[i].1 {
                    let (w, c) =
                        qedstream_benches::run_measured(Command::new(&argv[0]).args(&argv[1..]));
                    wall += w;
                    cpu += c;
                }
                walls[i].push(wall);
                cpus[i].push(cpu);
            }
            if run == 0 {
                let cmp = Command::new("qemu-img")
                    .args(["compare", "-f", format, "-F", "qed", &src, &out_s])
                    .status()
                    .expect("qemu-img compare");
                assert!(cmp.success(), "the output differs from the source");
            }
        }
        let _ = std::fs::remove_file(&out);
        for (i, (name, _)) in contestants.iter().enumerate() {
            let ratios: Vec<f64> = walls[i].iter().zip(&walls[0]).map(|(t, o)| t / o).collect();
            let list: Vec<String> = walls[i].iter().map(|w| format!("{w:.2}")).collect();
            println!(
                "  {format} -> qed {name:<30} wall {:.3} [{}]  CPU {:.2} s/GiB  ratio/ours {:.2}x",
                qedstream_benches::median(&walls[i]),
                list.join(" "),
                qedstream_benches::median(&cpus[i]) / gib,
                qedstream_benches::median(&ratios)
            );
        }
    }
}

fn qemu_convert_args(cache: &str, format: &str, src: &str, out: &str) -> Vec<String> {
    [
        "qemu-img", "convert", "-t", cache, "-f", format, "-O", "qed", src, out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The `qedstream` binary beside this runner (same profile), or `$QEDSTREAM`.
fn qedstream_binary() -> String {
    qedstream_benches::qedstream_binary()
        .to_string_lossy()
        .into_owned()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--convert-only") {
        let root = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let dir = tempfile::tempdir_in(root).unwrap();
        convert_comparison(dir.path(), quick);
        return;
    }
    let runs = if quick { 1 } else { 3 };
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    let d = dir.path();
    let img = d.join("w.qed");
    let pattern = vec![0x5au8; MIB as usize];
    if std::env::args().any(|a| a == "--io-only") {
        std::fs::write(d.join("base.raw"), vec![0x11u8; (64 * MIB) as usize]).unwrap();
        return write_matrix(d, runs.max(3), quick);
    }

    // qemu-io's own start-up and close, to read the small cases fairly.
    create(&img, 1 << 30, None);
    let startup = time(runs, || {}, || qemu_io(&img, &["read 0 512".to_string()]));
    println!(
        "qemu-io start-up and close alone: {:.3}s (included in the qemu column)",
        startup.as_secs_f64()
    );

    // 1. Sequential 1 MiB allocating writes, no backing file.
    let total = if quick { 64 * MIB } else { 256 * MIB };
    let n = total / MIB;
    let ours = time(
        runs,
        || create(&img, 1 << 30, None),
        || {
            let image = open_alone(&img);
            for i in 0..n {
                image.write_at(&pattern, GuestOffset(i * MIB)).unwrap();
            }
            image.close().unwrap();
        },
    );
    let cmds: Vec<String> = (0..n)
        .map(|i| format!("write -P 0x5a {} 1M", i * MIB))
        .collect();
    let qemu = time(
        runs,
        || create(&img, 1 << 30, None),
        || qemu_io(&img, &cmds),
    );
    report(
        &format!("sequential 1 MiB writes, {} MiB, no backing", total / MIB),
        total,
        ours,
        qemu,
    );

    // 2. Sequential 64 KiB allocating writes over a raw backing (a flush per allocation).
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0x11u8; (64 * MIB) as usize]).unwrap();
    let total = 64 * MIB;
    let n = total / 65536;
    let ours = time(
        runs,
        || create(&img, 64 * MIB, Some("base.raw")),
        || {
            let image = open(&img);
            for i in 0..n {
                image.write_at(&pattern[..65536], i * 65536).unwrap();
            }
            image.close().unwrap();
        },
    );
    let cmds: Vec<String> = (0..n)
        .map(|i| format!("write -P 0x5a {} 64k", i * 65536))
        .collect();
    let qemu = time(
        runs,
        || create(&img, 64 * MIB, Some("base.raw")),
        || qemu_io(&img, &cmds),
    );
    report(
        "sequential 64 KiB writes, 64 MiB, raw backing",
        total,
        ours,
        qemu,
    );

    // 3. One large write over a raw backing: we allocate one run and update each L2 once.
    let ours = time(
        runs,
        || create(&img, 64 * MIB, Some("base.raw")),
        || {
            let image = open(&img);
            let big = vec![0x5au8; (32 * MIB) as usize];
            image.write_at(&big, 1000).unwrap();
            image.close().unwrap();
        },
    );
    let cmds = vec!["write -P 0x5a 1000 32M".to_string()];
    let qemu = time(
        runs,
        || create(&img, 64 * MIB, Some("base.raw")),
        || qemu_io(&img, &cmds),
    );
    report(
        "one 32 MiB unaligned write, raw backing",
        32 * MIB,
        ours,
        qemu,
    );

    // 4. Random 4 KiB allocating writes into a 1 GiB image.
    let count = if quick { 1024 } else { 4096 };
    let mut rng = XorShift::new(42);
    let offsets: Vec<u64> = (0..count)
        .map(|_| (rng.next_u64() % (1 << 30)) & !4095)
        .collect();
    let ours = time(
        runs,
        || create(&img, 1 << 30, None),
        || {
            let image = open_alone(&img);
            for &o in &offsets {
                image.write_at(&pattern[..4096], GuestOffset(o)).unwrap();
            }
            image.close().unwrap();
        },
    );
    let cmds: Vec<String> = offsets
        .iter()
        .map(|o| format!("write -P 0x5a {o} 4k"))
        .collect();
    let qemu = time(
        runs,
        || create(&img, 1 << 30, None),
        || qemu_io(&img, &cmds),
    );
    report(
        &format!("random 4 KiB allocating writes x{count}"),
        count * 4096,
        ours,
        qemu,
    );

    // 5. convert -O qed, as processes: see `convert_comparison`.
    convert_comparison(d, quick);
    write_matrix(d, runs.max(3), quick);
}

/// An image without a backing, its file read and written as `io` says.
fn open_alone_with(path: &Path, io: qed::IoConfig) -> Image {
    let file = qed::file::open(path, qed::Access::ReadWrite).unwrap();
    let options = OpenOptions {
        path: Some(path.to_path_buf()),
        ..OpenOptions::default()
    };
    Image::open(io.storage(file).unwrap(), options).unwrap()
}

/// The image over its backing through the copy-on-read device, every file as `io` says.
fn open_with(path: &Path, io: qed::IoConfig) -> SyncDevice<CorDevice> {
    let mut options = CorOptions {
        copy_on_read: false,
        ..CorOptions::default()
    };
    options.gate.io = io;
    SyncDevice::open(path, options).unwrap()
}

/// Our side of a write workload: the image, and how its files are read and written.
type OurWrites = Box<dyn Fn(&Path, qed::IoConfig)>;

/// One write workload: its name, bytes written, our run, and qemu-io's commands.
struct WriteCase {
    name: String,
    bytes: u64,
    backing: bool,
    ours: OurWrites,
    qemu: Vec<String>,
}

fn write_cases(quick: bool) -> Vec<WriteCase> {
    let seq = if quick { 64 * MIB } else { 256 * MIB };
    let count = if quick { 1024 } else { 4096 };
    let mut rng = XorShift::new(42);
    let offsets: Vec<u64> = (0..count)
        .map(|_| (rng.next_u64() % (1 << 30)) & !4095)
        .collect();
    let random = offsets.clone();
    vec![
        WriteCase {
            name: format!("sequential 1 MiB writes, {} MiB", seq / MIB),
            bytes: seq,
            backing: false,
            ours: Box::new(move |img, io| {
                let image = open_alone_with(img, io);
                let pattern = vec![0x5au8; MIB as usize];
                for i in 0..seq / MIB {
                    image.write_at(&pattern, GuestOffset(i * MIB)).unwrap();
                }
                image.close().unwrap();
            }),
            qemu: (0..seq / MIB)
                .map(|i| format!("write -P 0x5a {} 1M", i * MIB))
                .collect(),
        },
        WriteCase {
            name: "sequential 64 KiB writes, raw backing".into(),
            bytes: 64 * MIB,
            backing: true,
            ours: Box::new(|img, io| {
                let image = open_with(img, io);
                let pattern = vec![0x5au8; 65536];
                for i in 0..(64 * MIB) / 65536 {
                    image.write_at(&pattern, i * 65536).unwrap();
                }
                image.close().unwrap();
            }),
            qemu: (0..(64 * MIB) / 65536)
                .map(|i| format!("write -P 0x5a {} 64k", i * 65536))
                .collect(),
        },
        WriteCase {
            name: format!("random 4 KiB allocating writes x{count}"),
            bytes: count * 4096,
            backing: false,
            ours: Box::new(move |img, io| {
                let image = open_alone_with(img, io);
                let pattern = vec![0x5au8; 4096];
                for &o in &random {
                    image.write_at(&pattern, GuestOffset(o)).unwrap();
                }
                image.close().unwrap();
            }),
            qemu: offsets
                .iter()
                .map(|o| format!("write -P 0x5a {o} 4k"))
                .collect(),
        },
    ]
}

/// qemu-io on `image` with QEMU's own cache mode and aio backend.
fn qemu_io_with(image: &Path, io: qed::IoConfig, cmds: &[String]) {
    let aio = io.backend().unwrap().name();
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qed", "-t", io.cache.name(), "-i", aio]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    ok_command(c.arg(image));
}

/// The write cases under every backend × cache mode, ours and qemu-io's, interleaved.
fn write_matrix(d: &Path, runs: usize, quick: bool) {
    let img = d.join("m.qed");
    let mut configs = Vec::new();
    for aio in [qed::Aio::IoUring, qed::Aio::Threads] {
        for cache in [qed::CacheMode::Writeback, qed::CacheMode::None] {
            configs.push(qed::IoConfig { cache, aio });
        }
    }
    let name = |io: &qed::IoConfig| format!("{}/{}", io.backend().unwrap().name(), io.cache.name());
    for case in write_cases(quick) {
        let size = if case.backing { 64 * MIB } else { 1 << 30 };
        let backing = case.backing.then_some("base.raw");
        let mut ours = vec![Vec::new(); configs.len()];
        let mut qemu = vec![Vec::new(); configs.len()];
        for _ in 0..runs {
            for (i, io) in configs.iter().enumerate() {
                create(&img, size, backing);
                let t = Instant::now();
                (case.ours)(&img, *io);
                ours[i].push(t.elapsed());
                create(&img, size, backing);
                let t = Instant::now();
                qemu_io_with(&img, *io, &case.qemu);
                qemu[i].push(t.elapsed());
            }
        }
        let ours: Vec<Duration> = ours.into_iter().map(median).collect();
        for (i, io) in configs.iter().enumerate() {
            let q = median(std::mem::take(&mut qemu[i]));
            report(
                &format!("{}, {}", case.name, name(io)),
                case.bytes,
                ours[i],
                q,
            );
            println!(
                "{:<48} ours / own buffered {:>5.2}x",
                "",
                ours[i].as_secs_f64() / ours[i - i % 2].as_secs_f64()
            );
        }
    }
}
