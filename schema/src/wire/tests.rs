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
            schema_version: 1,
            compression: false,
            types: None,
            windowed: false,
            priority: false,
            metered: false,
        },
        ClientMessage::Enroll {
            protocol_version: PROTOCOL_VERSION,
            token: "tok-123".into(),
            device_id: id(1),
            public_key: Bytes(vec![5; 32]),
            schema_hash: Schema::default_schema().hash(),
            schema_version: 1,
            proof: Bytes(vec![6; 64]),
            replaces: None,
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
        ClientMessage::Fetch {
            ids: vec![id(2), id(3)],
        },
        ClientMessage::Pull {
            cursor: PullCursor {
                spaces: [
                    (
                        id(4),
                        SpaceCursor {
                            seq: 10,
                            snapshot: Some(SnapshotCursor {
                                upto_seq: 99,
                                after_key: 5,
                                low_pass: true,
                            }),
                        },
                    ),
                    (id(5), SpaceCursor { seq: 3, snapshot: None }),
                ]
                .into_iter()
                .collect(),
                legacy_seq: Some(7),
            },
            max_entries: 500,
        },
        ClientMessage::RotateKey {
            new_public_key: Bytes(vec![8; 32]),
            signature: Bytes(vec![9; 64]),
        },
        ClientMessage::Ping { nonce: 77 },
        ClientMessage::Wiped { discarded: 3 },
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
            duplicate_of: None,
            lww_lost: vec![loss()],
        },
        Outcome::AlreadyApplied {
            original: Box::new(Outcome::Applied {
                version: 2,
                seq: 10,
                duplicate_of: None,
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
            schema_version: 1,
            compression: true,
            fetch: true,
            priority: false,
        },
        RelayMessage::AuthFailed {
            reason: AuthFailure::Revoked,
            message: "device revoked".into(),
        },
        RelayMessage::Enrolled {
            relay_id: id(9),
            user: user.clone(),
        },
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
                spaces: [(
                    id(4),
                    SpaceCursor {
                        seq: 11,
                        snapshot: None,
                    },
                )]
                .into_iter()
                .collect(),
                legacy_seq: None,
            },
            caught_up: true,
        },
        RelayMessage::Live {
            entries: vec![entry(FeedPayload::Own)],
        },
        RelayMessage::Fetched {
            entries: vec![entry(FeedPayload::Snapshot(Bytes(vec![7; 40])))],
            unknown: vec![id(2), id(3)],
            later: vec![id(4)],
        },
        RelayMessage::UserChanged { user: user.clone() },
        RelayMessage::KeyRotated,
        RelayMessage::Wipe,
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
