//! Attacks on enrollment and authentication against a real relay process, in raw frames: every
//! refusal is asserted together with what the relay's database holds afterwards (nothing new)
//! and that honest devices still enroll and sync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fieldsync_schema::signing::{enroll_signing_bytes, rotate_signing_bytes};
use fieldsync_schema::wire::{AuthFailure, ErrorCode, PROTOCOL_VERSION};
use fieldsync_schema::{Bytes, ClientMessage, DeviceKey, PullCursor, RelayMessage, SchemaHash};
use fieldsync_tests::Relay;
use fieldsync_tests::attacker::{
    Dev, Frame, RawConn, auth_message, device_key, enroll_message, forbidden, hello, honest_round_trip, run, stored,
};
use serde_json::json;
use uuid::Uuid;

/// The identity point: a "key" under which `(R = identity, S = 0)` verifies for every message
/// with a lax verifier.
fn identity_point() -> [u8; 32] {
    let mut k = [0u8; 32];
    k[0] = 1;
    k
}

fn universal_signature() -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = 1;
    s
}

/// Small-order and otherwise unacceptable 32-byte keys.
fn bad_keys() -> Vec<(&'static str, Vec<u8>)> {
    let mut off_curve = [0u8; 32];
    off_curve[0] = 2;
    // y = p + 1: the identity under a second, non-canonical encoding.
    let mut non_canonical = [0xffu8; 32];
    non_canonical[0] = 0xee;
    non_canonical[31] = 0x7f;
    // An order-8 torsion point.
    let torsion: Vec<u8> = (0..32)
        .map(|i| {
            u8::from_str_radix(
                &"26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"[i * 2..i * 2 + 2],
                16,
            )
            .unwrap()
        })
        .collect();
    vec![
        ("identity", identity_point().to_vec()),
        ("off-curve", off_curve.to_vec()),
        ("non-canonical", non_canonical.to_vec()),
        ("torsion", torsion),
    ]
}

/// Sends one message on a fresh connection and expects an `AuthFailed` and a close.
async fn refused(relay: &Relay, msg: ClientMessage) -> AuthFailure {
    let mut conn = RawConn::open(relay).await;
    conn.send(&msg).await;
    conn.expect_auth_failed().await
}

fn raw_enroll(token: &str, device_id: Uuid, public_key: Vec<u8>, proof: Vec<u8>) -> ClientMessage {
    ClientMessage::Enroll {
        protocol_version: PROTOCOL_VERSION,
        token: token.to_string(),
        device_id,
        public_key: Bytes(public_key),
        schema_hash: fieldsync_tests::attacker::schema_hash(),
        schema_version: 1,
        proof: Bytes(proof),
        replaces: None,
    }
}

#[test]
fn enrollment_refuses_spent_expired_unknown_tokens_and_keys_nobody_can_prove() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    run(async {
        // An honest enrollment spends its token.
        let token = relay.token("dana");
        let (key, device, _) = Dev::identity(1);
        let mut conn = RawConn::open(&relay).await;
        conn.send(&enroll_message(&token, device, &key)).await;
        assert!(matches!(conn.recv().await, RelayMessage::Enrolled { .. }));
        let before = stored(&relay);
        assert_eq!((before.devices, before.tokens_used), (1, 1));

        // The same token again, for another device.
        let (key2, device2, _) = Dev::identity(2);
        assert_eq!(
            refused(&relay, enroll_message(&token, device2, &key2)).await,
            AuthFailure::TokenUsed
        );
        // An expired token: one whose time ran out (issued through the library with no time
        // left: the CLI takes 1–720 hours), and one expired by the operator.
        let refused_ttl = Relay::cli(&[
            "admin",
            "--data",
            relay.data.to_str().unwrap(),
            "enroll",
            "dana",
            "--valid-hours",
            "0",
        ]);
        assert!(!refused_ttl.status.success());
        assert!(String::from_utf8_lossy(&refused_ttl.stderr).contains("1..=720"));
        let zero = {
            use fieldsync_relay::store::Backend;
            let backend = fieldsync_relay::store::sqlite::SqliteBackend::open_current(&relay.data).unwrap();
            let mut directory = backend.open_directory().unwrap();
            let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::seed_from_u64(5);
            let now = fieldsync_schema::TimeSource::now_ms(&fieldsync_schema::SystemTimeSource);
            fieldsync_relay::admin::create_enrollment_token(&mut directory, "dana", 0, now, &mut rng)
                .unwrap()
                .0
        };
        assert_eq!(
            refused(&relay, enroll_message(&zero, device2, &key2)).await,
            AuthFailure::TokenExpired
        );
        let expired = relay.token("dana");
        relay.admin(&["token", "expire", &expired]);
        assert_eq!(
            refused(&relay, enroll_message(&expired, device2, &key2)).await,
            AuthFailure::TokenExpired
        );
        // Tokens nobody issued, including the prefix of a real one and a real one's case-flip.
        let fresh = relay.token("dana");
        for guess in [
            "fse_0000000000000000000000000000000000000000".to_string(),
            fresh[..fresh.len() - 1].to_string(),
            fresh.to_uppercase(),
            String::new(),
        ] {
            assert_eq!(
                refused(&relay, enroll_message(&guess, device2, &key2)).await,
                AuthFailure::InvalidToken,
                "{guess:?}"
            );
        }

        // With a valid token (`fresh`): keys of the wrong length.
        for len in [0usize, 31, 33, 64] {
            let reason = refused(&relay, raw_enroll(&fresh, device2, vec![7; len], vec![0; 64])).await;
            assert_eq!(reason, AuthFailure::BadKey, "{len}-byte key");
        }
        // Weak and malformed points, with the proof that a lax verifier accepts for the identity.
        for (name, k) in bad_keys() {
            let reason = refused(&relay, raw_enroll(&fresh, device2, k, universal_signature().to_vec())).await;
            assert_eq!(reason, AuthFailure::BadKey, "{name}");
        }
        // Someone else's public key (the enrolled device's), with a proof by the attacker's key.
        let their_key = key.public_key();
        let proof = key2.sign(&enroll_signing_bytes(&fresh, &device2, &their_key));
        assert_eq!(
            refused(&relay, raw_enroll(&fresh, device2, their_key.to_vec(), proof.to_vec())).await,
            AuthFailure::BadSignature
        );
        // A real proof by the attacker's key, but made for another token / device id.
        let other_proof = key2.sign(&enroll_signing_bytes(&token, &device2, &key2.public_key()));
        assert_eq!(
            refused(
                &relay,
                raw_enroll(&fresh, device2, key2.public_key().to_vec(), other_proof.to_vec())
            )
            .await,
            AuthFailure::BadSignature
        );
        let wrong_device = key2.sign(&enroll_signing_bytes(
            &fresh,
            &Uuid::from_bytes([9; 16]),
            &key2.public_key(),
        ));
        assert_eq!(
            refused(
                &relay,
                raw_enroll(&fresh, device2, key2.public_key().to_vec(), wrong_device.to_vec())
            )
            .await,
            AuthFailure::BadSignature
        );
        // A valid proof, but for the device id of the enrolled device: no takeover.
        assert_eq!(
            refused(&relay, enroll_message(&fresh, device, &key2)).await,
            AuthFailure::AlreadyEnrolled
        );
        assert_eq!(
            device_key(&relay, device),
            Some(key.public_key().to_vec()),
            "the key was replaced"
        );
        // Another schema or protocol version.
        let mut other_schema = enroll_message(&fresh, device2, &key2);
        if let ClientMessage::Enroll { schema_hash, .. } = &mut other_schema {
            *schema_hash = SchemaHash([0; 32]);
        }
        assert_eq!(refused(&relay, other_schema).await, AuthFailure::SchemaMismatch);
        let mut other_protocol = enroll_message(&fresh, device2, &key2);
        if let ClientMessage::Enroll { protocol_version, .. } = &mut other_protocol {
            *protocol_version = PROTOCOL_VERSION + 1;
        }
        assert_eq!(refused(&relay, other_protocol).await, AuthFailure::UnsupportedProtocol);
        // Enrolling on a connection that is already authenticating.
        let mut conn = RawConn::open(&relay).await;
        conn.send(&hello(device)).await;
        assert!(matches!(conn.recv().await, RelayMessage::Challenge { .. }));
        conn.send(&enroll_message(&fresh, device2, &key2)).await;
        let (message, end) = conn.expect_error_close(ErrorCode::UnexpectedMessage).await;
        assert_eq!(end.code(), Some(1002), "{message}: {end:?}");

        // Nothing was registered and no token was spent by any of it.
        assert_eq!(stored(&relay), before);
        // The valid token survived the failed attempts: the honest device gets it.
        let mut conn = RawConn::open(&relay).await;
        conn.send(&enroll_message(&fresh, device2, &key2)).await;
        assert!(matches!(conn.recv().await, RelayMessage::Enrolled { .. }));
        assert_eq!(device_key(&relay, device2), Some(key2.public_key().to_vec()));
        honest_round_trip(&relay, dir.path(), "dana", "patient", json!({"name": "Ada"})).await;
    });
}

#[test]
fn authentication_refuses_wrong_keys_replayed_answers_and_challenges_of_another_relay() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician"), ("mallory", "clinician")]);
    run(async {
        let victim = Dev::enroll(&relay, "dana", 1).await;
        let attacker = Dev::enroll(&relay, "mallory", 2).await;
        let before = stored(&relay);

        // Requests before authentication.
        let early: Vec<ClientMessage> = vec![
            ClientMessage::Auth {
                signature: Bytes(vec![0; 64]),
            },
            ClientMessage::Push {
                batch_id: 1,
                mutations: Vec::new(),
            },
            ClientMessage::Pull {
                cursor: PullCursor::default(),
                max_entries: 10,
            },
            ClientMessage::RotateKey {
                new_public_key: Bytes(attacker.key.public_key().to_vec()),
                signature: Bytes(vec![0; 64]),
            },
        ];
        for msg in early {
            let mut conn = RawConn::open(&relay).await;
            conn.send(&msg).await;
            let (_, end) = conn.expect_error_close(ErrorCode::UnexpectedMessage).await;
            assert_eq!(end.code(), Some(1002), "{}: {end:?}", msg.name());
        }
        // A device nobody enrolled; the wrong protocol; the wrong schema.
        assert_eq!(
            refused(&relay, hello(Uuid::from_bytes([0x42; 16]))).await,
            AuthFailure::UnknownDevice
        );
        let other_protocol = ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            device_id: victim.device_id,
            schema_hash: fieldsync_tests::attacker::schema_hash(),
            schema_version: 1,
            compression: false,
            types: None,
            windowed: false,
            priority: false,
            metered: false,
        };
        assert_eq!(refused(&relay, other_protocol).await, AuthFailure::UnsupportedProtocol);
        let other_schema = ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            device_id: victim.device_id,
            schema_hash: SchemaHash([1; 32]),
            schema_version: 1,
            compression: false,
            types: None,
            windowed: false,
            priority: false,
            metered: false,
        };
        assert_eq!(refused(&relay, other_schema).await, AuthFailure::SchemaMismatch);

        // Answers the attacker can make for the victim's challenge.
        type Answer = Box<dyn Fn(Uuid, &[u8]) -> ClientMessage>;
        let attacker_key = attacker.key.clone();
        let attacker_key2 = attacker.key.clone();
        let victim_key = victim.key.clone();
        let victim_id = victim.device_id;
        let answers: Vec<(&str, Answer)> = vec![
            (
                "signed by the attacker's key over the victim's identity",
                Box::new(move |relay_id, nonce| {
                    let bytes = fieldsync_schema::signing::connect_signing_bytes(
                        PROTOCOL_VERSION,
                        &relay_id,
                        nonce,
                        &victim_id,
                        &victim_key.public_key(),
                    );
                    ClientMessage::Auth {
                        signature: Bytes(attacker_key.sign(&bytes).to_vec()),
                    }
                }),
            ),
            (
                "the attacker's own valid answer for its own device",
                Box::new(move |relay_id, nonce| auth_message(&attacker_key2, relay_id, nonce, attacker.device_id)),
            ),
            (
                "the universal forgery",
                Box::new(|_, _| ClientMessage::Auth {
                    signature: Bytes(universal_signature().to_vec()),
                }),
            ),
            (
                "a truncated signature",
                Box::new(|_, _| ClientMessage::Auth {
                    signature: Bytes(vec![3; 63]),
                }),
            ),
            (
                "nothing",
                Box::new(|_, _| ClientMessage::Auth {
                    signature: Bytes(Vec::new()),
                }),
            ),
        ];
        for (name, answer) in &answers {
            let mut conn = RawConn::open(&relay).await;
            conn.send(&hello(victim.device_id)).await;
            let RelayMessage::Challenge { relay_id, nonce } = conn.recv().await else {
                panic!("no challenge")
            };
            conn.send(&answer(relay_id, &nonce.0)).await;
            assert_eq!(conn.expect_auth_failed().await, AuthFailure::BadSignature, "{name}");
        }

        // A captured honest answer, replayed on another connection (a new nonce).
        let mut honest = RawConn::open(&relay).await;
        honest.send(&victim.hello()).await;
        let RelayMessage::Challenge { relay_id, nonce } = honest.recv().await else {
            panic!("no challenge")
        };
        let captured = victim.auth(relay_id, &nonce.0);
        honest.send(&captured).await;
        assert!(matches!(honest.recv().await, RelayMessage::Welcome { .. }));
        let mut replay = RawConn::open(&relay).await;
        replay.send(&victim.hello()).await;
        let RelayMessage::Challenge { nonce: nonce2, .. } = replay.recv().await else {
            panic!("no challenge")
        };
        assert_ne!(nonce.0, nonce2.0, "challenges must not repeat");
        replay.send(&captured).await;
        assert_eq!(replay.expect_auth_failed().await, AuthFailure::BadSignature);
        // The same answer again on the connection it was made for: the nonce is single-use.
        honest.send(&captured).await;
        let (_, end) = honest.expect_error_close(ErrorCode::UnexpectedMessage).await;
        assert_eq!(end.code(), Some(1002));
        // A second Hello on a challenged connection does not get a second nonce to choose from.
        let mut twice = RawConn::open(&relay).await;
        twice.send(&victim.hello()).await;
        assert!(matches!(twice.recv().await, RelayMessage::Challenge { .. }));
        twice.send(&victim.hello()).await;
        let (msgs, end) = twice.until_end().await;
        assert!(
            !msgs
                .iter()
                .any(|m| matches!(m, RelayMessage::Challenge { .. } | RelayMessage::Welcome { .. })),
            "{msgs:?}"
        );
        assert_eq!(end.code(), Some(1002));

        // The victim's own key signs a challenge relayed from another relay (a man in the
        // middle): the signature names that relay's id, so this relay refuses it.
        let mut mitm = RawConn::open(&relay).await;
        mitm.send(&victim.hello()).await;
        let RelayMessage::Challenge { relay_id, nonce } = mitm.recv().await else {
            panic!("no challenge")
        };
        let other_relay = Uuid::from_bytes([0x5A; 16]);
        assert_ne!(other_relay, relay_id);
        mitm.send(&victim.auth(other_relay, &nonce.0)).await;
        assert_eq!(mitm.expect_auth_failed().await, AuthFailure::BadSignature);
        // ... or the victim's signature over another protocol version's bytes.
        let mut old = RawConn::open(&relay).await;
        old.send(&victim.hello()).await;
        let RelayMessage::Challenge { relay_id, nonce } = old.recv().await else {
            panic!("no challenge")
        };
        let bytes = fieldsync_schema::signing::connect_signing_bytes(
            PROTOCOL_VERSION + 1,
            &relay_id,
            &nonce.0,
            &victim.device_id,
            &victim.key.public_key(),
        );
        old.send(&ClientMessage::Auth {
            signature: Bytes(victim.key.sign(&bytes).to_vec()),
        })
        .await;
        assert_eq!(old.expect_auth_failed().await, AuthFailure::BadSignature);

        assert_eq!(stored(&relay).data(), before.data());
        // The victim still logs in.
        let mut conn = victim.connect(&relay).await;
        conn.barrier(1).await;
        honest_round_trip(&relay, dir.path(), "dana", "patient", json!({"name": "Ada"})).await;
    });
}

#[test]
fn a_revoked_device_is_refused_and_its_open_sessions_close_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    run(async {
        let mut victim = Dev::enroll(&relay, "dana", 1).await;
        let mut other = Dev::enroll(&relay, "dana", 2).await;
        // An open, caught-up session, and a connection waiting with a challenge.
        let mut session = victim.connect(&relay).await;
        victim.pull_all(&mut session).await;
        let mut challenged = RawConn::open(&relay).await;
        challenged.send(&victim.hello()).await;
        let RelayMessage::Challenge { relay_id, nonce } = challenged.recv().await else {
            panic!("no challenge")
        };
        let mut bystander = other.connect(&relay).await;
        other.pull_all(&mut bystander).await;

        relay.admin(&["device", "revoke", &victim.device_id.to_string()]);
        let revoked_at = Instant::now();
        let (msgs, end) = session.until_end().await;
        let took = revoked_at.elapsed();
        assert!(
            matches!(
                msgs.as_slice(),
                [RelayMessage::AuthFailed {
                    reason: AuthFailure::Revoked,
                    ..
                }]
            ),
            "{msgs:?}"
        );
        assert_eq!(end.code(), Some(1008), "{end:?}");
        assert!(
            took < Duration::from_secs(2),
            "the open session lived {took:?} after the revocation"
        );
        // The challenged connection cannot finish logging in with the revoked key.
        let _ = challenged.send_bytes(victim.auth(relay_id, &nonce.0).encode()).await;
        let (msgs, _) = challenged.until_end().await;
        assert!(
            msgs.iter().any(|m| matches!(
                m,
                RelayMessage::AuthFailed {
                    reason: AuthFailure::Revoked,
                    ..
                }
            )),
            "{msgs:?}"
        );
        assert!(
            !msgs.iter().any(|m| matches!(m, RelayMessage::Welcome { .. })),
            "{msgs:?}"
        );
        // New connections are refused at Hello.
        assert_eq!(refused(&relay, victim.hello()).await, AuthFailure::Revoked);
        // Re-enrolling the revoked device id with a new token does not bring it back.
        let token = relay.token("dana");
        let (key, _, _) = Dev::identity(3);
        assert_eq!(
            refused(&relay, enroll_message(&token, victim.device_id, &key)).await,
            AuthFailure::AlreadyEnrolled
        );
        // Nothing it sends after the revocation is stored, and the other device is unaffected.
        let before = stored(&relay);
        let (_, m) = victim.create("patient", json!({"name": "After revocation"}));
        let mut attempt = RawConn::open(&relay).await;
        attempt.send(&victim.hello()).await;
        let push = ClientMessage::Push {
            batch_id: 1,
            mutations: vec![m],
        };
        let _ = attempt.send_bytes(push.encode()).await;
        let (msgs, _) = attempt.until_end().await;
        assert!(
            !msgs.iter().any(|m| matches!(m, RelayMessage::PushResult { .. })),
            "{msgs:?}"
        );
        assert_eq!(stored(&relay).data(), before.data());
        let (_, m) = other.create("patient", json!({"name": "Still here"}));
        assert!(other.push_one(&mut bystander, m).await.applied().is_some());
        honest_round_trip(&relay, dir.path(), "dana", "patient", json!({"name": "Ada"})).await;
    });
}

#[test]
fn key_rotation_refuses_weak_and_unsigned_keys_and_the_old_key_stops_working() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    run(async {
        let dev = Dev::enroll(&relay, "dana", 1).await;
        let old = dev.key.public_key();
        let (new_key, _, _) = Dev::identity(7);
        let (stranger, _, _) = Dev::identity(8);
        let rotate = |key: &DeviceKey, new: &[u8], signer: &DeviceKey| {
            let new32: [u8; 32] = new.try_into().unwrap_or([0; 32]);
            let sig = signer.sign(&rotate_signing_bytes(&dev.device_id, &key.public_key(), &new32));
            ClientMessage::RotateKey {
                new_public_key: Bytes(new.to_vec()),
                signature: Bytes(sig.to_vec()),
            }
        };
        // Weak keys, even properly signed by the old key.
        for (name, k) in bad_keys() {
            let mut conn = dev.connect(&relay).await;
            conn.send(&rotate(&dev.key, &k, &dev.key)).await;
            assert_eq!(conn.expect_auth_failed().await, AuthFailure::BadKey, "{name}");
            assert_eq!(device_key(&relay, dev.device_id), Some(old.to_vec()), "{name}");
        }
        // A good new key, signed by someone else; a malformed one.
        let mut conn = dev.connect(&relay).await;
        conn.send(&rotate(&dev.key, &new_key.public_key(), &stranger)).await;
        assert_eq!(conn.expect_auth_failed().await, AuthFailure::BadSignature);
        let mut conn = dev.connect(&relay).await;
        conn.send(&rotate(&dev.key, &[5; 31], &dev.key)).await;
        let (msgs, end) = conn.until_end().await;
        assert!(!msgs.iter().any(|m| matches!(m, RelayMessage::KeyRotated)), "{msgs:?}");
        assert!(matches!(end.code(), Some(1002 | 1008)), "{end:?}");
        assert_eq!(device_key(&relay, dev.device_id), Some(old.to_vec()));

        // An honest rotation: afterwards only the new key logs in.
        let mut conn = dev.connect(&relay).await;
        conn.send(&rotate(&dev.key, &new_key.public_key(), &dev.key)).await;
        assert!(matches!(conn.recv().await, RelayMessage::KeyRotated));
        assert_eq!(device_key(&relay, dev.device_id), Some(new_key.public_key().to_vec()));
        let mut stale = RawConn::open(&relay).await;
        stale.send(&dev.hello()).await;
        let RelayMessage::Challenge { relay_id, nonce } = stale.recv().await else {
            panic!("no challenge")
        };
        stale.send(&dev.auth(relay_id, &nonce.0)).await;
        assert_eq!(stale.expect_auth_failed().await, AuthFailure::BadSignature);
        let mut renewed = RawConn::open(&relay).await;
        renewed.send(&dev.hello()).await;
        let RelayMessage::Challenge { relay_id, nonce } = renewed.recv().await else {
            panic!("no challenge")
        };
        renewed
            .send(&auth_message(&new_key, relay_id, &nonce.0, dev.device_id))
            .await;
        assert!(matches!(renewed.recv().await, RelayMessage::Welcome { .. }));
        honest_round_trip(&relay, dir.path(), "dana", "patient", json!({"name": "Ada"})).await;
    });
}

/// A key is rotated because it may be compromised: a session that authenticated with the old
/// key before the rotation must not keep writing with it.
#[test]
fn a_session_opened_with_the_old_key_cannot_write_with_it_after_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    run(async {
        let mut dev = Dev::enroll(&relay, "dana", 1).await;
        // The thief's session, authenticated with the (stolen) current key.
        let mut thief = dev.connect(&relay).await;
        // The owner rotates on another connection.
        let (new_key, _, _) = Dev::identity(7);
        let mut owner = dev.connect(&relay).await;
        let sig = dev.key.sign(&rotate_signing_bytes(
            &dev.device_id,
            &dev.key.public_key(),
            &new_key.public_key(),
        ));
        owner
            .send(&ClientMessage::RotateKey {
                new_public_key: Bytes(new_key.public_key().to_vec()),
                signature: Bytes(sig.to_vec()),
            })
            .await;
        assert!(matches!(owner.recv().await, RelayMessage::KeyRotated));
        // A mutation signed with the retired key, on the thief's still-open session.
        let before = stored(&relay);
        let (id, m) = dev.create("patient", json!({"name": "Written with a retired key"}));
        thief
            .send(&ClientMessage::Push {
                batch_id: 1,
                mutations: vec![m],
            })
            .await;
        // Refused or disconnected are both fine; applied is not.
        if let Some(Frame::Msg(msg)) = thief.next_within(Duration::from_secs(3)).await
            && let RelayMessage::PushResult { results, .. } = *msg
        {
            forbidden(&results[0].outcome);
        }
        assert_eq!(
            fieldsync_tests::attacker::version_of(&relay, id),
            None,
            "a mutation signed with the retired key was stored"
        );
        assert_eq!(stored(&relay).data(), before.data());
    });
}
