//! The sync protocol's messages (SPEC §7) and their CBOR framing.
//!
//! Each WebSocket binary frame holds one CBOR array `[protocol_version, message]`, so every
//! frame, not only the first, says which protocol it speaks, and a relay can refuse a device
//! from the future with a clear reason instead of a parse error. Decoding takes bytes from the
//! network: it bounds the input size before parsing, never panics, and never allocates more
//! than the input could describe.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::{Bytes, LwwLoss, Mutation, Origin, Outcome};
use crate::registry::{Role, SchemaHash};

pub const PROTOCOL_VERSION: u16 = 1;

/// Largest frame either side accepts. Far below tungstenite's 64 MiB default: a pull page or
/// push batch is cut to fit.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Most mutations in one `Push`.
pub const MAX_BATCH: usize = 256;
/// Largest change payload of one mutation.
pub const MAX_MUTATION_CHANGE_BYTES: usize = 1024 * 1024;
/// Requests of one kind a device may have sent and not yet had answered. A device that pipelines
/// more is cut off: each answer can be megabytes, and the relay holds what it has not sent.
pub const MAX_PULLS_IN_FLIGHT: usize = 2;
pub const MAX_PUSHES_IN_FLIGHT: usize = 2;
pub const MAX_PINGS_IN_FLIGHT: usize = 8;
/// CBOR nesting the decoder follows before giving up (our messages nest a handful deep; JSON
/// values inside LWW losses a little more).
const MAX_NESTING: usize = 64;

/// A space the authenticated user belongs to, with the user's role there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceGrant {
    pub space_id: Uuid,
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub user_id: Uuid,
    pub name: String,
    pub spaces: Vec<SpaceGrant>,
}

/// Where a pull continues. Opaque to the device: it stores the cursor the relay last gave it
/// and sends it back. `seq` is the relay's change-feed sequence number, never a wall-clock time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullCursor {
    /// Every feed entry visible to the user up to this sequence number has been delivered.
    pub seq: u64,
    /// Set while a new device receives compacted documents instead of the feed.
    pub snapshot: Option<SnapshotCursor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCursor {
    /// The feed position the snapshot started at; the feed resumes from here afterwards.
    pub upto_seq: u64,
    /// The last document key delivered.
    pub after_key: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedPayload {
    /// The Automerge changes one applied mutation added (the device's, plus any the relay wrote).
    Changes(Vec<Bytes>),
    /// The whole document, compacted: what a new device gets instead of every change.
    Snapshot(Bytes),
    /// Left out because the receiving device made this change itself.
    Own,
}

/// One applied mutation, or one compacted document, as a device receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedEntry {
    pub seq: u64,
    pub space_id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    /// The entity's relay version after this entry.
    pub version: u64,
    pub payload: FeedPayload,
    /// `None` for snapshots.
    pub origin: Option<Origin>,
    /// LWW values this entry overrode; a device finding itself as the loser lists them.
    #[serde(default)]
    pub lww_losses: Vec<LwwLoss>,
}

/// The answer for one mutation of a push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MutationResult {
    pub mutation_id: Uuid,
    pub outcome: Outcome,
}

/// Why a connection was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFailure {
    UnknownDevice,
    Revoked,
    BadSignature,
    NonceExpired,
    UnsupportedProtocol,
    SchemaMismatch,
    InvalidToken,
    TokenExpired,
    TokenUsed,
    AlreadyEnrolled,
    /// The presented public key is not a strict ed25519 key (small order, or not canonically
    /// encoded): nobody can be proven to hold its private half.
    BadKey,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::UnknownDevice => "unknown_device",
            AuthFailure::Revoked => "revoked",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::NonceExpired => "nonce_expired",
            AuthFailure::UnsupportedProtocol => "unsupported_protocol",
            AuthFailure::SchemaMismatch => "schema_mismatch",
            AuthFailure::InvalidToken => "invalid_token",
            AuthFailure::TokenExpired => "token_expired",
            AuthFailure::TokenUsed => "token_used",
            AuthFailure::AlreadyEnrolled => "already_enrolled",
            AuthFailure::BadKey => "bad_key",
        }
    }
}

/// Errors about the session rather than one mutation; the relay closes after sending one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not a valid message.
    Malformed,
    /// A message arrived that the session's state does not allow (e.g. push before auth).
    UnexpectedMessage,
    /// A limit was exceeded (frame size, batch size, rate).
    LimitExceeded,
    /// The relay is shutting down or overloaded; reconnect later.
    Unavailable,
    /// The relay failed internally; nothing was acknowledged that is not durable.
    Internal,
}

/// Messages from a device to the relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientMessage {
    /// Opens an authenticated session.
    Hello {
        protocol_version: u16,
        device_id: Uuid,
        schema_hash: SchemaHash,
    },
    /// Registers this device's key with a single-use enrollment token.
    Enroll {
        protocol_version: u16,
        token: String,
        device_id: Uuid,
        public_key: Bytes,
        schema_hash: SchemaHash,
        /// Signature over [`crate::signing::enroll_signing_bytes`].
        proof: Bytes,
    },
    /// Answers the challenge: signature over [`crate::signing::connect_signing_bytes`].
    Auth {
        signature: Bytes,
    },
    Push {
        batch_id: u64,
        mutations: Vec<Mutation>,
    },
    Pull {
        cursor: PullCursor,
        max_entries: u32,
    },
    /// Replaces the device key; `signature` is by the old key over
    /// [`crate::signing::rotate_signing_bytes`].
    RotateKey {
        new_public_key: Bytes,
        signature: Bytes,
    },
    Ping {
        nonce: u64,
    },
}

/// Messages from the relay to a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayMessage {
    Challenge {
        relay_id: Uuid,
        nonce: Bytes,
    },
    Welcome {
        relay_id: Uuid,
        user: UserInfo,
        server_time_ms: u64,
        max_batch: u32,
    },
    AuthFailed {
        reason: AuthFailure,
        message: String,
    },
    Enrolled {
        relay_id: Uuid,
        user: UserInfo,
    },
    PushResult {
        batch_id: u64,
        results: Vec<MutationResult>,
    },
    /// The batch was not processed (overload, internal error); resend it later, same ids.
    PushDeferred {
        batch_id: u64,
        retry_after_ms: u64,
        reason: String,
    },
    /// One page of a pull.
    Changes {
        entries: Vec<FeedEntry>,
        next: PullCursor,
        caught_up: bool,
    },
    /// Entries applied after the device caught up, pushed as they commit.
    Live {
        entries: Vec<FeedEntry>,
        cursor: PullCursor,
    },
    KeyRotated,
    Pong {
        nonce: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    #[error("malformed message: {0}")]
    Malformed(String),
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    // Writing into a Vec cannot fail, and every message type serialises (no maps with non-string
    // keys, no custom serialisers that error).
    #[allow(clippy::expect_used)]
    ciborium::into_writer(&(PROTOCOL_VERSION, msg), &mut out).expect("protocol messages serialise");
    out
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    match ciborium::de::from_reader_with_recursion_limit::<(u16, T), _>(bytes, MAX_NESTING) {
        Ok((PROTOCOL_VERSION, msg)) => Ok(msg),
        Ok((v, _)) => Err(WireError::UnsupportedVersion(v)),
        Err(e) => {
            // A frame from another protocol version may not parse as our messages at all; say
            // so rather than "malformed" when its version number is readable.
            if let Ok((v, _)) =
                ciborium::de::from_reader_with_recursion_limit::<(u16, serde::de::IgnoredAny), _>(bytes, MAX_NESTING)
                && v != PROTOCOL_VERSION
            {
                return Err(WireError::UnsupportedVersion(v));
            }
            Err(WireError::Malformed(e.to_string()))
        }
    }
}

impl ClientMessage {
    /// Opens a session for an enrolled device.
    pub fn hello(device_id: Uuid, schema_hash: SchemaHash) -> Self {
        ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            device_id,
            schema_hash,
        }
    }

    /// Answers a `Challenge` with `key` (see [`crate::DeviceKey::answer_challenge`]).
    pub fn auth(key: &crate::DeviceKey, relay_id: &Uuid, nonce: &[u8], device_id: &Uuid) -> Self {
        ClientMessage::Auth {
            signature: Bytes(key.answer_challenge(relay_id, nonce, device_id).to_vec()),
        }
    }

    /// Registers `key` for `device_id` with an enrollment token, with the proof of holding it.
    pub fn enroll(key: &crate::DeviceKey, token: &str, device_id: Uuid, schema_hash: SchemaHash) -> Self {
        ClientMessage::Enroll {
            protocol_version: PROTOCOL_VERSION,
            token: token.to_string(),
            device_id,
            public_key: Bytes(key.public_key().to_vec()),
            schema_hash,
            proof: Bytes(key.enrollment_proof(token, &device_id).to_vec()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode(bytes)
    }
    pub fn name(&self) -> &'static str {
        match self {
            ClientMessage::Hello { .. } => "hello",
            ClientMessage::Enroll { .. } => "enroll",
            ClientMessage::Auth { .. } => "auth",
            ClientMessage::Push { .. } => "push",
            ClientMessage::Pull { .. } => "pull",
            ClientMessage::RotateKey { .. } => "rotate_key",
            ClientMessage::Ping { .. } => "ping",
        }
    }
}

/// Upper-bound estimate of a JSON value's CBOR size (for memory accounting, not framing).
fn json_size(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    match v {
        Value::Null | Value::Bool(_) => 1,
        Value::Number(_) => 9,
        Value::String(s) => s.len() + 9,
        Value::Array(a) => 9 + a.iter().map(json_size).sum::<usize>(),
        Value::Object(o) => 9 + o.iter().map(|(k, v)| k.len() + 9 + json_size(v)).sum::<usize>(),
    }
}

fn loss_size(l: &LwwLoss) -> usize {
    512 + l.entity_type.len() + l.field.len() + json_size(&l.loser_value) + json_size(&l.winner_value)
}

fn bytes_size(b: &[Bytes]) -> usize {
    b.iter().map(|c| c.0.len() + 9).sum()
}

fn outcome_size(o: &Outcome) -> usize {
    64 + match o {
        Outcome::Applied { lww_lost, .. } => lww_lost.iter().map(loss_size).sum(),
        Outcome::AlreadyApplied { original } => outcome_size(original),
        Outcome::Conflict {
            server_changes,
            authors,
            ..
        } => bytes_size(server_changes) + authors.len() * 128,
        Outcome::RejectedImmutable { reason } | Outcome::RejectedLocked { reason } | Outcome::Forbidden { reason } => {
            reason.len()
        }
        Outcome::Invalid { errors } => errors.iter().map(|e| 64 + e.field.len() + e.message.len()).sum(),
        Outcome::NotAttempted => 0,
    }
}

/// Upper-bound estimate of an entry's encoded size.
pub fn entry_size(e: &FeedEntry) -> usize {
    let payload = match &e.payload {
        FeedPayload::Changes(c) => bytes_size(c),
        FeedPayload::Snapshot(b) => b.0.len() + 9,
        FeedPayload::Own => 0,
    };
    320 + e.entity_type.len() + payload + e.lww_losses.iter().map(loss_size).sum::<usize>()
}

impl RelayMessage {
    /// A cheap upper-bound estimate of [`RelayMessage::encode`]'s length, so the relay can
    /// account for what it holds per connection without encoding twice.
    pub fn size_hint(&self) -> usize {
        let body = match self {
            RelayMessage::Welcome { user, .. } | RelayMessage::Enrolled { user, .. } => {
                user.name.len() + user.spaces.iter().map(|s| 64 + s.name.len()).sum::<usize>()
            }
            RelayMessage::AuthFailed { message, .. } | RelayMessage::Error { message, .. } => message.len(),
            RelayMessage::PushDeferred { reason, .. } => reason.len(),
            RelayMessage::PushResult { results, .. } => results.iter().map(|r| 24 + outcome_size(&r.outcome)).sum(),
            RelayMessage::Changes { entries, .. } | RelayMessage::Live { entries, .. } => {
                entries.iter().map(entry_size).sum()
            }
            RelayMessage::Challenge { nonce, .. } => nonce.0.len(),
            RelayMessage::KeyRotated | RelayMessage::Pong { .. } => 0,
        };
        128 + body
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode(bytes)
    }
    pub fn name(&self) -> &'static str {
        match self {
            RelayMessage::Challenge { .. } => "challenge",
            RelayMessage::Welcome { .. } => "welcome",
            RelayMessage::AuthFailed { .. } => "auth_failed",
            RelayMessage::Enrolled { .. } => "enrolled",
            RelayMessage::PushResult { .. } => "push_result",
            RelayMessage::PushDeferred { .. } => "push_deferred",
            RelayMessage::Changes { .. } => "changes",
            RelayMessage::Live { .. } => "live",
            RelayMessage::KeyRotated => "key_rotated",
            RelayMessage::Pong { .. } => "pong",
            RelayMessage::Error { .. } => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::envelope::{ConflictReason, MutationKind};
    use crate::hlc::Hlc;
    use crate::registry::Schema;
    use crate::validate::{FieldError, Rule};

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn hlc() -> Hlc {
        Hlc {
            physical_ms: 1_795_000_000_000,
            counter: 3,
            device: id(1),
        }
    }

    fn mutation() -> Mutation {
        Mutation {
            mutation_id: id(2),
            device_id: id(1),
            user_id: id(3),
            space_id: id(4),
            entity_type: "session".into(),
            entity_id: id(5),
            kind: MutationKind::Update,
            client_timestamp: hlc(),
            base_version: Some(7),
            changes: vec![Bytes(vec![0x85, 0x6f, 0x4a, 0x83]), Bytes(vec![1; 300])],
            signature: Bytes(vec![9; 64]),
        }
    }

    fn loss() -> LwwLoss {
        LwwLoss {
            entity_type: "settings".into(),
            entity_id: id(6),
            field: "units".into(),
            loser_device: id(1),
            loser_mutation: id(2),
            loser_hlc: hlc(),
            loser_value: json!("lb"),
            winner_device: id(7),
            winner_mutation: id(8),
            winner_hlc: hlc(),
            winner_value: json!({"nested": [1, 2.5, null, true]}),
        }
    }

    fn every_client_message() -> Vec<ClientMessage> {
        vec![
            ClientMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                device_id: id(1),
                schema_hash: Schema::default_schema().hash(),
            },
            ClientMessage::Enroll {
                protocol_version: PROTOCOL_VERSION,
                token: "tok-123".into(),
                device_id: id(1),
                public_key: Bytes(vec![5; 32]),
                schema_hash: Schema::default_schema().hash(),
                proof: Bytes(vec![6; 64]),
            },
            ClientMessage::Auth {
                signature: Bytes(vec![7; 64]),
            },
            ClientMessage::Push {
                batch_id: 42,
                mutations: vec![
                    mutation(),
                    Mutation {
                        base_version: None,
                        ..mutation()
                    },
                ],
            },
            ClientMessage::Pull {
                cursor: PullCursor {
                    seq: 10,
                    snapshot: Some(SnapshotCursor {
                        upto_seq: 99,
                        after_key: 5,
                    }),
                },
                max_entries: 500,
            },
            ClientMessage::RotateKey {
                new_public_key: Bytes(vec![8; 32]),
                signature: Bytes(vec![9; 64]),
            },
            ClientMessage::Ping { nonce: 77 },
        ]
    }

    fn every_relay_message() -> Vec<RelayMessage> {
        let user = UserInfo {
            user_id: id(3),
            name: "dana".into(),
            spaces: vec![SpaceGrant {
                space_id: id(4),
                name: "clinic".into(),
                role: Role::Clinician,
            }],
        };
        let outcomes = vec![
            Outcome::Applied {
                version: 2,
                seq: 10,
                lww_lost: vec![loss()],
            },
            Outcome::AlreadyApplied {
                original: Box::new(Outcome::Applied {
                    version: 2,
                    seq: 10,
                    lww_lost: vec![],
                }),
            },
            Outcome::Conflict {
                server_version: 3,
                server_changes: vec![Bytes(vec![1, 2])],
                reason: ConflictReason::StaleBase,
                authors: vec![Origin {
                    device_id: id(1),
                    user_id: id(3),
                    mutation_id: id(2),
                    hlc: hlc(),
                }],
            },
            Outcome::RejectedImmutable {
                reason: "signed".into(),
            },
            Outcome::RejectedLocked {
                reason: "locked".into(),
            },
            Outcome::Invalid {
                errors: vec![FieldError::new("patient_id", Rule::Required, "is required")],
            },
            Outcome::Forbidden { reason: "role".into() },
            Outcome::NotAttempted,
        ];
        let entry = |payload| FeedEntry {
            seq: 11,
            space_id: id(4),
            entity_type: "note".into(),
            entity_id: id(5),
            version: 4,
            payload,
            origin: Some(Origin {
                device_id: id(1),
                user_id: id(3),
                mutation_id: id(2),
                hlc: hlc(),
            }),
            lww_losses: vec![loss()],
        };
        vec![
            RelayMessage::Challenge {
                relay_id: id(9),
                nonce: Bytes(vec![1; 32]),
            },
            RelayMessage::Welcome {
                relay_id: id(9),
                user: user.clone(),
                server_time_ms: 5,
                max_batch: 256,
            },
            RelayMessage::AuthFailed {
                reason: AuthFailure::Revoked,
                message: "device revoked".into(),
            },
            RelayMessage::Enrolled { relay_id: id(9), user },
            RelayMessage::PushResult {
                batch_id: 42,
                results: outcomes
                    .into_iter()
                    .map(|outcome| MutationResult {
                        mutation_id: id(2),
                        outcome,
                    })
                    .collect(),
            },
            RelayMessage::PushDeferred {
                batch_id: 42,
                retry_after_ms: 500,
                reason: "overloaded".into(),
            },
            RelayMessage::Changes {
                entries: vec![
                    entry(FeedPayload::Changes(vec![Bytes(vec![3; 10])])),
                    entry(FeedPayload::Snapshot(Bytes(vec![4; 10]))),
                    entry(FeedPayload::Own),
                ],
                next: PullCursor {
                    seq: 11,
                    snapshot: None,
                },
                caught_up: true,
            },
            RelayMessage::Live {
                entries: vec![entry(FeedPayload::Own)],
                cursor: PullCursor {
                    seq: 11,
                    snapshot: None,
                },
            },
            RelayMessage::KeyRotated,
            RelayMessage::Pong { nonce: 1 },
            RelayMessage::Error {
                code: ErrorCode::Malformed,
                message: "bad frame".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_cbor() {
        for m in every_client_message() {
            let bytes = m.encode();
            assert_eq!(ClientMessage::decode(&bytes).unwrap(), m, "{}", m.name());
        }
        for m in every_relay_message() {
            let bytes = m.encode();
            assert_eq!(RelayMessage::decode(&bytes).unwrap(), m, "{}", m.name());
        }
    }

    #[test]
    fn the_size_hint_is_an_upper_bound_of_the_encoding() {
        for m in every_relay_message() {
            let hint = m.size_hint();
            let real = m.encode().len();
            assert!(hint >= real, "{}: hint {hint} < encoded {real}", m.name());
            assert!(hint <= real * 4 + 512, "{}: hint {hint} far above {real}", m.name());
        }
        let big = RelayMessage::Changes {
            entries: vec![
                FeedEntry {
                    seq: 1,
                    space_id: id(1),
                    entity_type: "note".into(),
                    entity_id: id(2),
                    version: 1,
                    payload: FeedPayload::Changes(vec![Bytes(vec![7; 100_000]); 3]),
                    origin: None,
                    lww_losses: Vec::new(),
                };
                10
            ],
            next: PullCursor::default(),
            caught_up: false,
        };
        let (hint, real) = (big.size_hint(), big.encode().len());
        assert!(hint >= real && hint < real + real / 50, "{hint} vs {real}");
    }

    #[test]
    fn byte_fields_are_compact() {
        let with_changes = |n: usize| {
            ClientMessage::Push {
                batch_id: 1,
                mutations: vec![Mutation {
                    changes: vec![Bytes(vec![0xAB; n])],
                    ..mutation()
                }],
            }
            .encode()
            .len()
        };
        // 1000 bytes of change data must cost ~1000 bytes, not ~2000 (an array of integers).
        let cost = with_changes(1000) - with_changes(0);
        assert!((1000..1010).contains(&cost), "{cost}");
    }

    #[test]
    fn other_protocol_versions_are_named_not_misparsed() {
        let mut out = Vec::new();
        ciborium::into_writer(&(99u16, "hello from the future"), &mut out).unwrap();
        match ClientMessage::decode(&out) {
            Err(WireError::UnsupportedVersion(99)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let big = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(ClientMessage::decode(&big), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn a_huge_declared_length_does_not_allocate_or_panic() {
        // Byte string header claiming 2^62 bytes, followed by nothing.
        let mut evil = vec![0x82, 0x01, 0xA1, 0x64];
        evil.extend_from_slice(b"auth");
        evil.extend_from_slice(&[0xA1, 0x69]);
        evil.extend_from_slice(b"signature");
        evil.extend_from_slice(&[0x5B, 0x40, 0, 0, 0, 0, 0, 0, 0]);
        assert!(ClientMessage::decode(&evil).is_err());
        // Deep nesting is cut off by the recursion limit instead of overflowing the stack.
        let deep = vec![0x81; 100_000];
        assert!(ClientMessage::decode(&deep).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = ClientMessage::decode(&bytes);
            let _ = RelayMessage::decode(&bytes);
        }

        #[test]
        fn truncated_messages_are_errors(cut in 0usize..10_000, which in 0usize..18) {
            let clients = every_client_message();
            let relays = every_relay_message();
            let bytes = if which < clients.len() {
                clients[which].encode()
            } else {
                relays[(which - clients.len()) % relays.len()].encode()
            };
            let cut = cut % bytes.len();
            prop_assert!(ClientMessage::decode(&bytes[..cut]).is_err());
            prop_assert!(RelayMessage::decode(&bytes[..cut]).is_err());
        }

        #[test]
        fn flipped_bytes_never_panic(pos in 0usize..10_000, val in any::<u8>(), which in 0usize..18) {
            let clients = every_client_message();
            let relays = every_relay_message();
            let mut bytes = if which < clients.len() {
                clients[which].encode()
            } else {
                relays[(which - clients.len()) % relays.len()].encode()
            };
            let pos = pos % bytes.len();
            bytes[pos] = val;
            let _ = ClientMessage::decode(&bytes);
            let _ = RelayMessage::decode(&bytes);
        }
    }
}
