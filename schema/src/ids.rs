//! Ids drawn from an injected randomness source.
//!
//! Production passes the operating system's generator; the simulator passes a seeded ChaCha
//! stream, so the same seed yields the same device ids, mutation ids and nonces.

use rand_core::Rng;
use uuid::Uuid;

/// A version-4 UUID from `rng`.
pub fn new_uuid(rng: &mut impl Rng) -> Uuid {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// `n` random bytes from `rng` (nonces, tokens).
pub fn random_bytes(rng: &mut impl Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    #[test]
    fn same_seed_same_ids_and_they_are_v4() {
        let a = new_uuid(&mut ChaCha20Rng::seed_from_u64(7));
        let b = new_uuid(&mut ChaCha20Rng::seed_from_u64(7));
        assert_eq!(a, b);
        assert_eq!(a.get_version_num(), 4);
        assert_ne!(a, new_uuid(&mut ChaCha20Rng::seed_from_u64(8)));
    }
}
