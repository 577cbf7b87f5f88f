//! Helpers shared by the `qed` integration tests.

/// A tiny seeded xorshift64 generator, so every failure replays (the seed must be non-zero).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 pseudo-random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
