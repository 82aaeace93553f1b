//! The exact bytes a device signs, and the key type it signs them with.
//!
//! Every signed structure starts with its own domain tag so a signature made for one purpose
//! (say, answering a connect challenge) can never be replayed as another (a mutation). Fields are
//! written with fixed widths or a length prefix, so two different values can never produce the
//! same bytes; no serializer's choices are involved.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::Rng;
use uuid::Uuid;

use crate::envelope::{Bytes, Mutation};
use crate::hlc::Hlc;

pub const MUTATION_TAG: &[u8] = b"fieldsync/mutation/v1\0";
pub const CONNECT_TAG: &[u8] = b"fieldsync/connect/v1\0";
pub const ENROLL_TAG: &[u8] = b"fieldsync/enroll/v1\0";
pub const ROTATE_TAG: &[u8] = b"fieldsync/rotate-key/v1\0";
pub const REPLACE_TAG: &[u8] = b"fieldsync/replace-device/v1\0";
pub const NOTE_SIGNATURE_TAG: &[u8] = b"fieldsync/note-signature/v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("malformed public key")]
    BadKey,
    /// A point of small order (the identity among them): signatures "by" it can be forged
    /// without any private key, so no device may register one.
    #[error("weak public key (a point of small order)")]
    WeakKey,
    /// A point encoded with a y coordinate of p or more: the same key under a second name.
    #[error("public key is not canonically encoded")]
    NonCanonicalKey,
    #[error("malformed signature (expected 64 bytes)")]
    Malformed,
    #[error("signature does not verify")]
    Invalid,
}

/// Length-prefixed, fixed-width field writer for signing bytes.
struct Canon(Vec<u8>);

impl Canon {
    fn new(tag: &[u8]) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(tag);
        Canon(v)
    }
    fn uuid(&mut self, u: &Uuid) -> &mut Self {
        self.0.extend_from_slice(u.as_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }
    fn u16(&mut self, x: u16) -> &mut Self {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    fn hlc(&mut self, h: &Hlc) -> &mut Self {
        self.u64(h.physical_ms).u32(h.counter).uuid(&h.device)
    }
    fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// The bytes covered by a mutation's signature: every field except the signature itself.
pub fn mutation_signing_bytes(m: &Mutation) -> Vec<u8> {
    let mut c = Canon::new(MUTATION_TAG);
    c.uuid(&m.mutation_id)
        .uuid(&m.device_id)
        .uuid(&m.user_id)
        .uuid(&m.space_id)
        .bytes(m.entity_type.as_bytes())
        .uuid(&m.entity_id)
        .u8(m.kind.code())
        .hlc(&m.client_timestamp);
    match m.base_version {
        None => c.u8(0),
        Some(v) => c.u8(1).u64(v),
    };
    c.u64(m.changes.len() as u64);
    for ch in &m.changes {
        c.bytes(&ch.0);
    }
    c.finish()
}

/// The bytes a device signs to answer a connect challenge (SPEC §4).
pub fn connect_signing_bytes(
    protocol_version: u16,
    relay_id: &Uuid,
    nonce: &[u8],
    device_id: &Uuid,
    public_key: &[u8; 32],
) -> Vec<u8> {
    Canon::new(CONNECT_TAG)
        .u16(protocol_version)
        .uuid(relay_id)
        .bytes(nonce)
        .uuid(device_id)
        .bytes(public_key)
        .finish()
}

/// The bytes a device signs when enrolling, proving it holds the key it registers.
pub fn enroll_signing_bytes(token: &str, device_id: &Uuid, public_key: &[u8; 32]) -> Vec<u8> {
    Canon::new(ENROLL_TAG)
        .bytes(token.as_bytes())
        .uuid(device_id)
        .bytes(public_key)
        .finish()
}

/// The bytes a revoked device's old key signs to hand its unsynced work to the new identity it
/// enrolls with the token (issue 19): only the holder of the old key can move its outbox.
pub fn replace_signing_bytes(token: &str, old_device_id: &Uuid, new_device_id: &Uuid, new_key: &[u8; 32]) -> Vec<u8> {
    Canon::new(REPLACE_TAG)
        .bytes(token.as_bytes())
        .uuid(old_device_id)
        .uuid(new_device_id)
        .bytes(new_key)
        .finish()
}

/// The bytes the old key signs to hand over to a new key (SPEC §4, key rotation).
pub fn rotate_signing_bytes(device_id: &Uuid, old_key: &[u8; 32], new_key: &[u8; 32]) -> Vec<u8> {
    Canon::new(ROTATE_TAG)
        .uuid(device_id)
        .bytes(old_key)
        .bytes(new_key)
        .finish()
}

/// The bytes of a clinical note signature: which note, which content, who, when.
pub fn note_signature_bytes(
    entity_id: &Uuid,
    content_hash: &[u8; 32],
    signer_user: &Uuid,
    signer_device: &Uuid,
    signed_at_ms: u64,
) -> Vec<u8> {
    Canon::new(NOTE_SIGNATURE_TAG)
        .uuid(entity_id)
        .bytes(content_hash)
        .uuid(signer_user)
        .uuid(signer_device)
        .u64(signed_at_ms)
        .finish()
}

/// A device's ed25519 key pair.
#[derive(Clone)]
pub struct DeviceKey(SigningKey);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey(public {})", hex::encode(self.public_key()))
    }
}

impl DeviceKey {
    /// A fresh key from the injected randomness source.
    pub fn generate(rng: &mut impl Rng) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        DeviceKey(SigningKey::from_bytes(&seed))
    }

    pub fn from_secret(secret: &[u8; 32]) -> Self {
        DeviceKey(SigningKey::from_bytes(secret))
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Fills in `m.signature` over [`mutation_signing_bytes`].
    pub fn sign_mutation(&self, m: &mut Mutation) {
        m.signature = Bytes(self.sign(&mutation_signing_bytes(m)).to_vec());
    }

    /// Answers the relay's connect challenge as `device_id` (SPEC §4): a signature over
    /// [`connect_signing_bytes`] with this protocol version and this key.
    pub fn answer_challenge(&self, relay_id: &Uuid, nonce: &[u8], device_id: &Uuid) -> [u8; 64] {
        self.sign(&connect_signing_bytes(
            crate::wire::PROTOCOL_VERSION,
            relay_id,
            nonce,
            device_id,
            &self.public_key(),
        ))
    }

    /// Proves to the relay, when enrolling with `token`, that this device holds the key.
    pub fn enrollment_proof(&self, token: &str, device_id: &Uuid) -> [u8; 64] {
        self.sign(&enroll_signing_bytes(token, device_id, &self.public_key()))
    }
}

/// A device's public key, parsed once. Parsing decompresses a curve point, which costs about as
/// much as a verification; a relay checking thousands of mutations per second of the same
/// device keeps one of these per session instead of parsing the key for every signature.
#[derive(Clone)]
pub struct Verifier {
    key: VerifyingKey,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({})", hex::encode(self.key.to_bytes()))
    }
}

impl Verifier {
    /// Parses a device key strictly: 32 bytes, a point on the curve, canonically encoded, not of
    /// small order. Every place that accepts a key (enrollment, rotation, a session) goes
    /// through here, so a weak key can never be registered or used.
    pub fn new(public_key: &[u8]) -> Result<Self, SignatureError> {
        let pk: &[u8; 32] = public_key.try_into().map_err(|_| SignatureError::BadKey)?;
        let key = VerifyingKey::from_bytes(pk).map_err(|_| SignatureError::BadKey)?;
        if key.is_weak() {
            return Err(SignatureError::WeakKey);
        }
        if key.to_edwards().compress().to_bytes() != *pk {
            return Err(SignatureError::NonCanonicalKey);
        }
        Ok(Verifier { key })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Strict ed25519 verification: besides the equation, R must be canonical and of large
    /// order and S reduced, so a signature has exactly one accepted form.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let sig: &[u8; 64] = signature.try_into().map_err(|_| SignatureError::Malformed)?;
        self.key
            .verify_strict(message, &Signature::from_bytes(sig))
            .map_err(|_| SignatureError::Invalid)
    }

    /// Verifies a mutation's signature over [`mutation_signing_bytes`].
    pub fn verify_mutation(&self, m: &Mutation) -> Result<(), SignatureError> {
        self.verify(&mutation_signing_bytes(m), &m.signature.0)
    }
}

/// SHA-256 of a mutation's signing bytes: names exactly the envelope a receipt was written for,
/// so a repeat of the mutation id with anything changed is told apart from an honest retry.
pub fn envelope_hash(m: &Mutation) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(mutation_signing_bytes(m)).into()
}

/// Verifies an ed25519 signature by `public_key` over `message`.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
    Verifier::new(public_key)?.verify(message, signature)
}

/// Verifies a mutation's signature against the device's registered key.
pub fn verify_mutation(public_key: &[u8], m: &Mutation) -> Result<(), SignatureError> {
    Verifier::new(public_key)?.verify_mutation(m)
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::envelope::MutationKind;

    fn sample(key: &DeviceKey) -> Mutation {
        let dev = Uuid::from_bytes([1; 16]);
        let mut m = Mutation {
            mutation_id: Uuid::from_bytes([2; 16]),
            device_id: dev,
            user_id: Uuid::from_bytes([3; 16]),
            space_id: Uuid::from_bytes([4; 16]),
            entity_type: "session".into(),
            entity_id: Uuid::from_bytes([5; 16]),
            kind: MutationKind::Update,
            client_timestamp: Hlc {
                physical_ms: 1_000,
                counter: 2,
                device: dev,
            },
            base_version: Some(3),
            changes: vec![Bytes(vec![1, 2, 3]), Bytes(vec![4])],
            signature: Bytes::default(),
        };
        key.sign_mutation(&mut m);
        m
    }

    #[test]
    fn a_signed_mutation_verifies_and_fails_after_any_single_field_changes() {
        let key = DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let m = sample(&key);
        verify_mutation(&key.public_key(), &m).unwrap();

        let other = Uuid::from_bytes([9; 16]);
        type Tamper = Box<dyn Fn(&mut Mutation)>;
        let tampered: Vec<(&str, Tamper)> = vec![
            ("mutation_id", Box::new(move |m| m.mutation_id = other)),
            ("device_id", Box::new(move |m| m.device_id = other)),
            ("user_id", Box::new(move |m| m.user_id = other)),
            ("space_id", Box::new(move |m| m.space_id = other)),
            ("entity_type", Box::new(|m| m.entity_type = "set".into())),
            ("entity_id", Box::new(move |m| m.entity_id = other)),
            ("kind", Box::new(|m| m.kind = MutationKind::Delete)),
            ("hlc physical", Box::new(|m| m.client_timestamp.physical_ms += 1)),
            ("hlc counter", Box::new(|m| m.client_timestamp.counter += 1)),
            ("hlc device", Box::new(move |m| m.client_timestamp.device = other)),
            ("base_version", Box::new(|m| m.base_version = Some(4))),
            ("base_version none", Box::new(|m| m.base_version = None)),
            ("changes content", Box::new(|m| m.changes[0].0[0] ^= 1)),
            ("changes split", Box::new(|m| m.changes = vec![Bytes(vec![1, 2, 3, 4])])),
            (
                "changes dropped",
                Box::new(|m| {
                    m.changes.pop();
                }),
            ),
            ("signature", Box::new(|m| m.signature.0[10] ^= 1)),
        ];
        for (name, f) in tampered {
            let mut t = m.clone();
            f(&mut t);
            assert!(
                verify_mutation(&key.public_key(), &t).is_err(),
                "tampering with {name} went unnoticed"
            );
        }
        let verifier = Verifier::new(&key.public_key()).unwrap();
        assert_eq!(verifier.public_key(), key.public_key());
        verifier.verify_mutation(&m).unwrap();
        let mut forged = m.clone();
        forged.base_version = Some(99);
        assert_eq!(verifier.verify_mutation(&forged), Err(SignatureError::Invalid));
        let other_key = DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(2));
        assert_eq!(
            verify_mutation(&other_key.public_key(), &m),
            Err(SignatureError::Invalid)
        );
        assert_eq!(verify_mutation(&[1, 2, 3], &m), Err(SignatureError::BadKey));
    }

    /// The identity point as a key, with R = identity and S = 0: a "signature" that a lax
    /// verifier accepts for every message.
    #[test]
    fn small_order_and_non_canonical_keys_are_refused_and_forgeries_fail() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut forged = [0u8; 64];
        forged[0] = 1;
        assert_eq!(Verifier::new(&identity).unwrap_err(), SignatureError::WeakKey);
        assert_eq!(verify(&identity, b"anything", &forged), Err(SignatureError::WeakKey));
        // y = p + 1: the identity under a second, non-canonical name (also small order).
        let mut non_canonical = [0xffu8; 32];
        non_canonical[0] = 0xee;
        non_canonical[31] = 0x7f;
        assert!(Verifier::new(&non_canonical).is_err());
        // An order-8 torsion point.
        let torsion: [u8; 32] = hex::decode("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(Verifier::new(&torsion).unwrap_err(), SignatureError::WeakKey);
        // Not a point at all.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert_eq!(Verifier::new(&off_curve).unwrap_err(), SignatureError::BadKey);
        // Honest keys pass, and their signatures verify strictly.
        let key = DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(11));
        let v = Verifier::new(&key.public_key()).unwrap();
        v.verify(b"msg", &key.sign(b"msg")).unwrap();
    }

    #[test]
    fn a_signature_with_s_plus_the_group_order_is_refused() {
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let key = DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(12));
        let mut sig = key.sign(b"msg");
        let mut carry = 0u16;
        for i in 0..32 {
            let sum = sig[32 + i] as u16 + L[i] as u16 + carry;
            sig[32 + i] = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(verify(&key.public_key(), b"msg", &sig), Err(SignatureError::Invalid));
    }

    #[test]
    fn the_envelope_hash_changes_with_every_signed_field() {
        let key = DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(13));
        let m = sample(&key);
        let mut other = m.clone();
        other.entity_id = Uuid::from_bytes([8; 16]);
        assert_ne!(envelope_hash(&m), envelope_hash(&other));
        let mut resigned = m.clone();
        resigned.signature = Bytes(vec![0; 64]);
        assert_eq!(
            envelope_hash(&m),
            envelope_hash(&resigned),
            "the signature is not part of it"
        );
    }

    #[test]
    fn domain_tags_separate_purposes() {
        let key = DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(3));
        let dev = Uuid::from_bytes([1; 16]);
        let connect = connect_signing_bytes(1, &Uuid::nil(), &[7; 32], &dev, &key.public_key());
        let enroll = enroll_signing_bytes("tok", &dev, &key.public_key());
        let sig = key.sign(&connect);
        assert!(verify(&key.public_key(), &connect, &sig).is_ok());
        assert!(verify(&key.public_key(), &enroll, &sig).is_err());
        assert_ne!(connect[..CONNECT_TAG.len()], enroll[..CONNECT_TAG.len()]);
    }

    #[test]
    fn keys_are_reproducible_from_the_injected_rng() {
        let a = DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(42));
        let b = DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(42));
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(DeviceKey::from_secret(&a.secret_bytes()).public_key(), a.public_key());
    }
}
