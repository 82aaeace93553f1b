//! The attacks an independent client found (security issue): each reproduced against the core,
//! asserting the refusal and that nothing stored was revealed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, TestDevice, TestRelay};
use fieldsync_relay::admin;
use fieldsync_relay::core::{Input, Output};
use fieldsync_relay::store::Directory;
use fieldsync_schema::signing::{enroll_signing_bytes, rotate_signing_bytes};
use fieldsync_schema::wire::{AuthFailure, PROTOCOL_VERSION};
use fieldsync_schema::{Bytes, ClientMessage, ConflictReason, Mutation, Outcome, RelayMessage, Role, Schema, ids};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::json;
use uuid::Uuid;

/// A "signature" that verifies for every message under the identity key with non-strict
/// verification: R = identity, S = 0.
fn universal_signature() -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = 1;
    s
}

/// Two tenants: a clinic with a patient record, and a gym whose member knows the record's id.
struct TwoTenants {
    relay: TestRelay,
    gym_dev: TestDevice,
    clinic_dev: TestDevice,
    patient: Uuid,
}

fn two_tenants() -> TwoTenants {
    let mut relay = TestRelay::new();
    relay.space("clinic");
    relay.space("gym");
    relay.user("carla", "clinic", Role::Clinician);
    relay.user("gus", "gym", Role::Patient);
    let mut clinic_dev = relay.device("carla", 1);
    let gym_dev = relay.device("gus", 2);
    let (patient, m) = clinic_dev.create(
        "patient",
        json!({"name": "Secret Person", "date_of_birth": "1970-01-02"}),
        T0,
    );
    assert!(matches!(relay.push_one(&mut clinic_dev, m), Outcome::Applied { .. }));
    TwoTenants {
        relay,
        gym_dev,
        clinic_dev,
        patient,
    }
}

fn resign(dev: &TestDevice, mut m: Mutation) -> Mutation {
    dev.key.sign_mutation(&mut m);
    m
}

fn carries_no_stored_data(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Conflict {
            server_changes,
            authors,
            ..
        } => server_changes.is_empty() && authors.is_empty(),
        Outcome::Applied { lww_lost, .. } => lww_lost.is_empty(),
        Outcome::AlreadyApplied { original } => carries_no_stored_data(original),
        _ => true,
    }
}

#[test]
fn a_receipt_replay_naming_another_spaces_entity_is_refused_and_reveals_nothing() {
    let TwoTenants {
        mut relay,
        mut gym_dev,
        patient,
        ..
    } = two_tenants();
    // The gym member creates a record of their own, then "creates" it again under a new
    // mutation id: the relay answers AlreadyExists and stores that receipt.
    let (own, first) = gym_dev.create("checkin", json!({"date": "2026-11-30"}), T0);
    assert!(matches!(
        relay.push_one(&mut gym_dev, first.clone()),
        Outcome::Applied { .. }
    ));
    let second_id = ids::new_uuid(&mut gym_dev.rng);
    let again = resign(
        &gym_dev,
        Mutation {
            mutation_id: second_id,
            ..first
        },
    );
    match relay.push_one(&mut gym_dev, again.clone()) {
        Outcome::Conflict {
            reason: ConflictReason::AlreadyExists,
            ..
        } => {}
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    // The same mutation id again, validly re-signed, now naming the clinic's patient.
    let probe = resign(
        &gym_dev,
        Mutation {
            entity_id: patient,
            ..again.clone()
        },
    );
    let outcome = relay.push_one(&mut gym_dev, probe);
    assert!(
        matches!(&outcome, Outcome::Forbidden { reason } if reason.contains("different")),
        "a replay that differs from the receipted envelope must be refused: {outcome:?}"
    );
    assert!(carries_no_stored_data(&outcome), "{outcome:?}");
    // Any other difference is refused the same way (space, type, changes).
    let other_space = resign(
        &gym_dev,
        Mutation {
            space_id: Uuid::from_bytes([7; 16]),
            ..again.clone()
        },
    );
    assert!(matches!(
        relay.push_one(&mut gym_dev, other_space),
        Outcome::Forbidden { .. }
    ));
    // The identical envelope still gets its stored answer (idempotency is intact).
    match relay.push_one(&mut gym_dev, again) {
        Outcome::Conflict {
            reason: ConflictReason::AlreadyExists,
            ..
        } => {}
        other => panic!("the identical retry must get its receipt, got {other:?}"),
    }
    let _ = own;
}

#[test]
fn a_stale_base_receipt_replay_naming_another_spaces_entity_reveals_nothing() {
    let TwoTenants {
        mut relay,
        mut gym_dev,
        patient,
        ..
    } = two_tenants();
    let (own, create) = gym_dev.create("workout", json!({"name": "Legs"}), T0);
    relay.push_one(&mut gym_dev, create);
    let first = gym_dev.update("workout", own, json!({"name": "Legs A"}), T0 + 1);
    relay.push_one(&mut gym_dev, first);
    // An update on a base the relay has moved past: a StaleBase conflict receipt.
    gym_dev.set_version(own, 1);
    let stale = gym_dev.update("workout", own, json!({"name": "Legs B"}), T0 + 2);
    assert!(matches!(
        relay.push_one(&mut gym_dev, stale.clone()),
        Outcome::Conflict {
            reason: ConflictReason::StaleBase,
            ..
        }
    ));
    let probe = resign(
        &gym_dev,
        Mutation {
            entity_id: patient,
            entity_type: "patient".into(),
            ..stale
        },
    );
    let outcome = relay.push_one(&mut gym_dev, probe);
    assert!(matches!(outcome, Outcome::Forbidden { .. }), "{outcome:?}");
    assert!(carries_no_stored_data(&outcome));
}

#[test]
fn a_user_removed_from_a_space_cannot_read_it_through_their_own_receipts() {
    let TwoTenants {
        mut relay,
        mut clinic_dev,
        patient,
        ..
    } = two_tenants();
    relay.user("cody", "clinic", Role::Clinician);
    let mut colleague = relay.device("cody", 3);
    relay.pull(&mut colleague);
    // Carla's update on version 1 loses to Cody's: a StaleBase receipt for Carla's mutation.
    let cody = colleague.update("patient", patient, json!({"name": "Secret Person Jr"}), T0 + 5);
    relay.push_one(&mut colleague, cody);
    let stale = clinic_dev.update("patient", patient, json!({"name": "Other"}), T0 + 6);
    match relay.push_one(&mut clinic_dev, stale.clone()) {
        Outcome::Conflict { server_changes, .. } => assert!(!server_changes.is_empty()),
        other => panic!("{other:?}"),
    }
    // Carla leaves the clinic; her open session learns it at the next tick.
    admin::remove_member(relay.core.directory_mut(), "carla", "clinic").unwrap();
    relay.now += 1;
    relay.core.handle([Input::Tick], relay.now);
    let outcome = relay.push_one(&mut clinic_dev, stale);
    assert!(
        matches!(&outcome, Outcome::Forbidden { reason } if reason.contains("member")),
        "{outcome:?}"
    );
    assert!(carries_no_stored_data(&outcome));
}

fn enroll_with(relay: &mut TestRelay, public_key: [u8; 32], proof: [u8; 64], device_id: Uuid) -> Vec<Output> {
    let (token, _) = admin::create_enrollment_token(
        relay.core.directory_mut(),
        "carla",
        admin::DEFAULT_TOKEN_TTL_MS,
        relay.now,
        &mut relay.rng,
    )
    .unwrap();
    let conn = relay.connect();
    relay.send(
        conn,
        ClientMessage::Enroll {
            protocol_version: PROTOCOL_VERSION,
            token,
            device_id,
            public_key: Bytes(public_key.to_vec()),
            schema_hash: Schema::default_schema().hash(),
            schema_version: 1,
            proof: Bytes(proof.to_vec()),
            replaces: None,
        },
    )
}

fn auth_failure(out: &[Output]) -> Option<AuthFailure> {
    out.iter().find_map(|o| match o {
        Output::Send(_, RelayMessage::AuthFailed { reason, .. }) => Some(*reason),
        _ => None,
    })
}

/// Every encoding of a point of small order (the eight torsion points, and non-canonical
/// encodings of some of them): none is a key anyone holds the private half of.
fn small_order_encodings() -> Vec<[u8; 32]> {
    let hex_points = [
        // identity, and the same with the sign bit set
        "0100000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000080",
        // order 2: y = -1
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        // order 4: y = 0
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        // order 8
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        // non-canonical: y = p + 1 (the identity again)
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];
    hex_points
        .iter()
        .map(|h| hex::decode(h).unwrap().try_into().unwrap())
        .collect()
}

#[test]
fn enrollment_with_a_small_order_key_and_a_constant_proof_is_refused() {
    let TwoTenants { mut relay, .. } = two_tenants();
    for (i, key) in small_order_encodings().into_iter().enumerate() {
        let device_id = Uuid::from_bytes([0x40 + i as u8; 16]);
        let out = enroll_with(&mut relay, key, universal_signature(), device_id);
        assert_eq!(
            auth_failure(&out),
            Some(AuthFailure::BadKey),
            "key {} was not refused: {out:?}",
            hex::encode(key)
        );
        assert!(relay.core.directory().device(device_id).unwrap().is_none());
    }
    // The same token-less trick with an honest key but a constant proof fails as well.
    let key = fieldsync_schema::DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(5));
    let out = enroll_with(
        &mut relay,
        key.public_key(),
        universal_signature(),
        Uuid::from_bytes([0x55; 16]),
    );
    assert_eq!(auth_failure(&out), Some(AuthFailure::BadSignature));
}

#[test]
fn an_enrollment_proof_malleated_to_s_plus_l_is_refused() {
    let TwoTenants { mut relay, .. } = two_tenants();
    // An honest key whose proof is altered into a form only a lax verifier accepts.
    let key = fieldsync_schema::DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(6));
    let device_id = Uuid::from_bytes([0x66; 16]);
    let (token, _) = admin::create_enrollment_token(
        relay.core.directory_mut(),
        "carla",
        admin::DEFAULT_TOKEN_TTL_MS,
        relay.now,
        &mut relay.rng,
    )
    .unwrap();
    let mut proof = key.sign(&enroll_signing_bytes(&token, &device_id, &key.public_key()));
    add_group_order_to_s(&mut proof);
    let conn = relay.connect();
    let out = relay.send(
        conn,
        ClientMessage::Enroll {
            protocol_version: PROTOCOL_VERSION,
            token,
            device_id,
            public_key: Bytes(key.public_key().to_vec()),
            schema_hash: Schema::default_schema().hash(),
            schema_version: 1,
            proof: Bytes(proof.to_vec()),
            replaces: None,
        },
    );
    assert_eq!(auth_failure(&out), Some(AuthFailure::BadSignature), "{out:?}");
}

/// S + l (the group order): the same signature to a lax verifier, malleated to a strict one.
fn add_group_order_to_s(sig: &mut [u8; 64]) {
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut carry = 0u16;
    for i in 0..32 {
        let sum = sig[32 + i] as u16 + L[i] as u16 + carry;
        sig[32 + i] = sum as u8;
        carry = sum >> 8;
    }
}

#[test]
fn key_rotation_to_a_small_order_key_is_refused_and_the_old_key_stays() {
    let TwoTenants {
        mut relay,
        mut clinic_dev,
        ..
    } = two_tenants();
    for weak in small_order_encodings() {
        let old = clinic_dev.key.public_key();
        let signature = clinic_dev
            .key
            .sign(&rotate_signing_bytes(&clinic_dev.device_id, &old, &weak));
        let out = relay.send(
            clinic_dev.conn,
            ClientMessage::RotateKey {
                new_public_key: Bytes(weak.to_vec()),
                signature: Bytes(signature.to_vec()),
            },
        );
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Send(_, RelayMessage::KeyRotated))),
            "rotation to {} was accepted",
            hex::encode(weak)
        );
        let stored = relay.core.directory().device(clinic_dev.device_id).unwrap().unwrap();
        assert_eq!(stored.public_key, old.to_vec());
        // The refused connection is gone; log in again (with the old key) for the next attempt.
        if out.iter().any(|o| matches!(o, Output::Close(..))) {
            clinic_dev.conn = relay.login(&clinic_dev);
        }
    }
}

#[test]
fn a_mutation_signature_malleated_to_s_plus_l_is_refused() {
    let TwoTenants {
        mut relay,
        mut clinic_dev,
        ..
    } = two_tenants();
    let (_, mut m) = clinic_dev.create("patient", json!({"name": "Ada"}), T0 + 10);
    let mut sig: [u8; 64] = m.signature.0.clone().try_into().unwrap();
    add_group_order_to_s(&mut sig);
    m.signature = Bytes(sig.to_vec());
    let outcome = relay.push_one(&mut clinic_dev, m.clone());
    assert!(matches!(outcome, Outcome::Forbidden { .. }), "{outcome:?}");
    assert!(relay.core.document(m.entity_id).unwrap().is_none());
    assert!(relay.receipt(m.mutation_id).is_none());
}

#[test]
fn a_device_rotates_its_key_with_the_old_key_signing_the_new() {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    let mut a = r.device("dana", 1);
    let new_key = fieldsync_schema::DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(77));
    let sig = a.key.sign(&rotate_signing_bytes(
        &a.device_id,
        &a.key.public_key(),
        &new_key.public_key(),
    ));
    let out = r.send(
        a.conn,
        ClientMessage::RotateKey {
            new_public_key: Bytes(new_key.public_key().to_vec()),
            signature: Bytes(sig.to_vec()),
        },
    );
    assert!(matches!(out[0], Output::Send(_, RelayMessage::KeyRotated)), "{out:?}");
    let old_key = std::mem::replace(&mut a.key, new_key);
    let (_, m) = a.create("patient", json!({"name": "Ada"}), T0);
    assert!(
        r.push_one(&mut a, m).applied().is_some(),
        "mutations verify with the new key"
    );
    a.conn = r.login(&a);

    // The old key is worth nothing from now on: not for mutations, not for signing in.
    let new_key = std::mem::replace(&mut a.key, old_key);
    let (_, stale) = a.create("patient", json!({"name": "Signed with the old key"}), T0 + 1);
    assert!(
        matches!(r.push_one(&mut a, stale), fieldsync_schema::Outcome::Forbidden { .. }),
        "a mutation signed with the old key is refused"
    );
    let conn = r.connect();
    let out = r.send(conn, a.hello());
    let Output::Send(_, RelayMessage::Challenge { relay_id, nonce }) = &out[0] else {
        panic!("{out:?}")
    };
    let out = r.send(conn, a.auth(*relay_id, &nonce.0));
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Send(
                _,
                RelayMessage::AuthFailed {
                    reason: AuthFailure::BadSignature,
                    ..
                }
            )
        )),
        "{out:?}"
    );
    a.key = new_key;
}
