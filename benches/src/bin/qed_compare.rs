//! Side-by-side runs of the same QED workloads through our `qed` crate and through QEMU
//! (`qemu-io`, `qemu-img convert -O qed`), in one run, on the same files. Prints medians of
//! three runs and the ratio QEMU time / our time (above 1: we are faster).
//!
//! Then the write cases again under each I/O backend × cache mode (io_uring and threads, each
//! with `cache=writeback` and `cache=none`), against qemu-io with the same `-t CACHE -i AIO`,
//! runs interleaved, medians.
//!
//! `cargo run --release -p qedstream-benches --bin qed-compare [-- --quick] [--io-only]`
//! (`--io-only`: the matrix alone, three runs)

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use copy_on_read::{CorDevice, CorOptions, SyncDevice};
use engine::convert::{convert, Target};
use engine::source::Source;
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

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
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

    // 5. convert raw -> qed: 60% random data in 64 KiB..8 MiB extents, the rest holes.
    let size = if quick { 256 * MIB } else { 1024 * MIB };
    let src = d.join("src.raw");
    qedstream_benches::sparse_random_file(&src, size, 60, 9);
    let out = d.join("out.qed");
    let ours = time(
        runs,
        || {
            let _ = std::fs::remove_file(&out);
        },
        || {
            let source = Source::open(&src, Some("raw")).unwrap();
            convert(
                &source,
                &out,
                &Target::Qed {
                    cluster_size: 65536,
                    table_size: 4,
                },
            )
            .unwrap();
        },
    );
    let (src_s, out_s) = (src.to_str().unwrap(), out.to_str().unwrap());
    let qemu = time(
        runs,
        || {
            let _ = std::fs::remove_file(&out);
        },
        || {
            qemu_img(&[
                "convert",
                "-t",
                "writeback",
                "-f",
                "raw",
                "-O",
                "qed",
                src_s,
                out_s,
            ])
        },
    );
    report(
        &format!("convert {} MiB raw (60% data) -> qed, synced", size / MIB),
        size,
        ours,
        qemu,
    );
    let unsafe_qemu = time(
        runs,
        || {
            let _ = std::fs::remove_file(&out);
        },
        || qemu_img(&["convert", "-f", "raw", "-O", "qed", src_s, out_s]),
    );
    println!(
        "  (qemu-img convert's default cache=unsafe skips the final sync: {:.3}s; ours always syncs)",
        unsafe_qemu.as_secs_f64()
    );
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
