//! criterion benches of the `qed` crate on real files.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qed::{CreateOptions, GuestOffset, Image, OpenOptions};
use qedstream_benches::XorShift;

const MIB: u64 = 1 << 20;

fn new_image(dir: &std::path::Path, size: u64) -> Image {
    let path = dir.join("bench.qed");
    Image::create_path(&path, &CreateOptions::new(size)).unwrap();
    Image::open_path(&path, OpenOptions::default()).unwrap()
}

fn lookups(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let image = new_image(dir.path(), 1 << 30);
    // Allocate every other 64 KiB cluster of the first 256 MiB: a fragmented map.
    let data = vec![0x5au8; 65536];
    for i in (0..(256 * MIB / 65536)).step_by(2) {
        image.write_at(&data, qed::GuestOffset(i * 65536)).unwrap();
    }
    let mut group = c.benchmark_group("lookup");
    group.bench_function("mapping_at (cached L2)", |b| {
        let mut rng = XorShift::new(7);
        b.iter(|| {
            let off = (rng.next_u64() % (256 * MIB)) & !511;
            black_box(image.mapping_at(GuestOffset(off), 65536).unwrap())
        })
    });
    group.throughput(Throughput::Bytes(256 * MIB));
    group.bench_function("map 256 MiB (2048 extents)", |b| {
        b.iter(|| black_box(image.map(GuestOffset(0), 256 * MIB).unwrap().len()))
    });
    group.finish();
    image.close().unwrap();
}

fn writes(c: &mut Criterion) {
    let mut group = c.benchmark_group("write");
    group.sample_size(10);
    let total = 64 * MIB;
    group.throughput(Throughput::Bytes(total));
    let mut payload = vec![0u8; MIB as usize];
    XorShift::new(1).fill(&mut payload);
    group.bench_function("sequential 1 MiB allocating, 64 MiB", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let image = new_image(dir.path(), 1 << 30);
                (dir, image)
            },
            |(dir, image)| {
                for i in 0..total / MIB {
                    image.write_at(&payload, qed::GuestOffset(i * MIB)).unwrap();
                }
                image.close().unwrap();
                drop(dir);
            },
            BatchSize::PerIteration,
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let image = new_image(dir.path(), 1 << 30);
    for i in 0..total / MIB {
        image.write_at(&payload, qed::GuestOffset(i * MIB)).unwrap();
    }
    group.throughput(Throughput::Bytes(4096 * 1024));
    group.bench_function("random 4 KiB in place, 1024 writes", |b| {
        let mut rng = XorShift::new(3);
        b.iter(|| {
            for _ in 0..1024 {
                let off = (rng.next_u64() % total) & !4095;
                image
                    .write_at(&payload[..4096], qed::GuestOffset(off))
                    .unwrap();
            }
        })
    });
    group.bench_function("random 4 KiB allocating, 1024 writes", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let image = new_image(dir.path(), 1 << 30);
                (dir, image, XorShift::new(5))
            },
            |(dir, image, mut rng)| {
                for _ in 0..1024 {
                    let off = (rng.next_u64() % (1 << 30)) & !4095;
                    image
                        .write_at(&payload[..4096], qed::GuestOffset(off))
                        .unwrap();
                }
                image.close().unwrap();
                drop(dir);
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    image.close().unwrap();
}

criterion_group!(benches, lookups, writes);
criterion_main!(benches);
