//! # qedstream-benches: measurements, not assertions
//!
//! - `cargo bench -p qedstream-benches --bench qed`: criterion benches of the `qed` crate
//!   (mapping lookups, sequential allocating writes, random writes).
//! - `cargo run --release -p qedstream-benches --bin qed-compare`: the same workloads run side
//!   by side with `qemu-io` and `qemu-img convert -O qed` in one run, printed as ratios.
//!
//! Helpers shared by both live here.

/// A small, fast, seeded generator (xorshift64*), so runs are repeatable.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

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
