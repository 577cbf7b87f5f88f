//! # qedstream-benches: measurements, not assertions
//!
//! - `cargo bench -p qedstream-benches --bench qed`: criterion benches of the `qed` crate
//!   (mapping lookups, sequential allocating writes, random writes).
//! - `cargo run --release -p qedstream-benches --bin qed-compare`: the same workloads run side
//!   by side with `qemu-io` and `qemu-img convert -O qed` in one run, printed as ratios.
//!
//! Helpers shared by both live here.

/// A small, fast, seeded generator (xorshift64*), so runs are repeatable; shared with the
/// tests.
pub use qedstream_tests::XorShift;

/// Writes a sparse file of `size` bytes: extents of 64 KiB to 8 MiB, each random data with
/// probability `data_percent`/100, the rest holes. Returns the data bytes written.
pub fn sparse_random_file(path: &std::path::Path, size: u64, data_percent: u64, seed: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create sparse file");
    f.set_len(size).expect("size sparse file");
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; 8 << 20];
    let (mut pos, mut data) = (0u64, 0u64);
    while pos < size {
        let len = (65536u64 << (rng.next_u64() % 8)).min(size - pos);
        if rng.next_u64() % 100 < data_percent {
            rng.fill(&mut buf[..len as usize]);
            f.write_all_at(&buf[..len as usize], pos)
                .expect("write sparse file");
            data += len;
        }
        pos += len;
    }
    f.sync_all().expect("sync sparse file");
    data
}
