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
