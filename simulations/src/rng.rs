//! One seed, independent streams per subsystem. Adding a random draw in one subsystem (say, a
//! new workload action) must not shift every other subsystem's numbers, or a small change
//! would make every old seed mean something else.

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// A stream derived from the run's seed and a subsystem name.
pub fn stream(seed: u64, name: &str) -> ChaCha20Rng {
    let mut h = Sha256::new();
    h.update(b"fieldsync-sim/v1\0");
    h.update(seed.to_be_bytes());
    h.update(name.as_bytes());
    ChaCha20Rng::from_seed(h.finalize().into())
}

/// Small helpers over an RNG, so that call sites read as intent.
pub trait Draw {
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64;
    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool;
    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64;
    /// One element of a non-empty slice.
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T>;
}

impl<R: Rng> Draw for R {
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / ((1u64 << 53) as f64) < p
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len() as u64) as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        assert_eq!(stream(1, "net").next_u64(), stream(1, "net").next_u64());
        assert_ne!(stream(1, "net").next_u64(), stream(1, "workload").next_u64());
        assert_ne!(stream(1, "net").next_u64(), stream(2, "net").next_u64());
    }
}
