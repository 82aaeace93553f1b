//! Exponential backoff with full jitter.
//!
//! Full jitter (a uniform draw between zero and the exponential ceiling) spreads the retries of
//! many devices that lost the relay at the same moment, instead of having them return in waves.
//! The draw comes from the device's injected RNG, so a simulation seed reproduces every delay.

/// Delay bounds: the ceiling doubles per attempt from `base_ms` up to `cap_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base_ms: u64,
    pub cap_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_ms: 500,
            cap_ms: 60_000,
        }
    }
}

impl Backoff {
    /// The largest delay after `attempt` failures in a row (attempt 0: the first failure).
    pub fn ceiling(&self, attempt: u32) -> u64 {
        let factor = 1u64.checked_shl(attempt.min(63)).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(factor).min(self.cap_ms)
    }

    /// A delay in `0..=ceiling(attempt)` chosen by `random` (a uniform `u64`).
    pub fn delay(&self, attempt: u32, random: u64) -> u64 {
        let ceiling = self.ceiling(attempt);
        match ceiling.checked_add(1) {
            Some(span) => random % span,
            None => random,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ceiling_doubles_until_the_cap() {
        let b = Backoff::default();
        let c: Vec<u64> = (0..10).map(|a| b.ceiling(a)).collect();
        assert_eq!(
            c,
            [500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        assert_eq!(b.ceiling(1_000), 60_000);
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_the_ceiling(attempt in 0u32..100, r in any::<u64>()) {
            let b = Backoff::default();
            prop_assert!(b.delay(attempt, r) <= b.ceiling(attempt));
        }
    }
}
