//! A revoked device's new identity (issue 19): the relay enrolls it only with the old key's
//! consent, for a revoked device of the token's user that was never ordered to wipe and was not
//! taken over before; the new identity may push the changes the old device authored offline,
//! and no other device may.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestDevice, TestRelay};
use fieldsync_relay::admin;
use fieldsync_relay::core::Output;
use fieldsync_relay::store::Directory;
use fieldsync_schema::signing::replace_signing_bytes;
use fieldsync_schema::testkit::{HandDevice, Versions};
use fieldsync_schema::wire::{AuthFailure, Replacement};
use fieldsync_schema::{Bytes, ClientMessage, DeviceKey, Mutation, Outcome, PullCursor, RelayMessage, Role, ids};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::json;
use uuid::Uuid;

fn clinic() -> TestRelay {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    r.user("eve", "clinic", Role::Clinician);
    r
}

/// A fresh identity's enrollment taking over from `old`, the hand-over signed by `signer`.
fn takeover(
    r: &mut TestRelay,
    old: &TestDevice,
    user: &str,
    signer: &DeviceKey,
    seed: u64,
) -> (TestDevice, Vec<Output>) {
    let (token, _) = admin::create_enrollment_token(r.core.directory_mut(), user, 60_000, r.now, &mut r.rng).unwrap();
    let mut hand = HandDevice::new(ChaCha20Rng::seed_from_u64(seed), Versions::Recorded);
    hand.device_id = ids::new_uuid(&mut hand.rng);
    let mut request = hand.enroll(&token);
    let consent = replace_signing_bytes(&token, &old.device_id, &hand.device_id, &hand.key.public_key());
    if let ClientMessage::Enroll { replaces, .. } = &mut request {
        *replaces = Some(Box::new(Replacement {
            device_id: old.device_id,
            signature: Bytes(signer.sign(&consent).to_vec()),
        }));
    }
    let c = r.connect();
    let out = r.send(c, request);
    let dev = TestDevice {
        hand,
        conn: 0,
        cursor: PullCursor::default(),
    };
    (dev, out)
}

fn refusal(out: &[Output]) -> Option<(AuthFailure, String)> {
    out.iter().find_map(|o| match o {
        Output::Send(_, RelayMessage::AuthFailed { reason, message }) => Some((*reason, message.clone())),
        _ => None,
    })
}

/// `m` re-signed by `by`: what the device does to its outbox when it adopts the new identity.
fn resigned(mut m: Mutation, by: &TestDevice) -> Mutation {
    m.device_id = by.device_id;
    m.client_timestamp.device = by.device_id;
    by.key.sign_mutation(&mut m);
    m
}

#[test]
fn a_revoked_devices_new_identity_pushes_what_the_old_one_wrote_offline() {
    let mut r = clinic();
    let mut old = r.device("dana", 1);
    let (entity, offline) = old.create("patient", json!({"name": "Written Offline"}), r.now);
    let not_yet = refusal(&takeover(&mut r, &old, "dana", &old.key.clone(), 30).1).unwrap();
    assert!(not_yet.1.contains("is not revoked"), "{not_yet:?}");
    admin::revoke_device(r.core.directory_mut(), old.device_id, r.now).unwrap();

    // Consent from another key, or a token of another user: refused, nothing enrolled.
    let stranger = DeviceKey::generate(&mut ChaCha20Rng::seed_from_u64(99));
    let forged = refusal(&takeover(&mut r, &old, "dana", &stranger, 31).1).unwrap();
    assert_eq!(forged.0, AuthFailure::BadSignature, "{forged:?}");
    let others = refusal(&takeover(&mut r, &old, "eve", &old.key.clone(), 32).1).unwrap();
    assert!(others.1.contains("not a device of this token's user"), "{others:?}");
    let devices_before = r.core.directory().devices().unwrap().len();

    let (mut new, out) = takeover(&mut r, &old, "dana", &old.key.clone(), 33);
    let Some(Output::Send(_, RelayMessage::Enrolled { user, .. })) = out.first() else {
        panic!("the takeover was refused: {out:?}")
    };
    new.hand.adopt_user(&user.clone());
    assert_eq!(r.core.directory().devices().unwrap().len(), devices_before + 1);
    let row = r.core.directory().device(new.device_id).unwrap().unwrap();
    assert_eq!(row.replaces, Some(old.device_id));
    assert_eq!(
        r.core.directory().replaced_by(old.device_id).unwrap(),
        Some(new.device_id)
    );
    // Once taken over, never again.
    let twice = refusal(&takeover(&mut r, &old, "dana", &old.key.clone(), 34).1).unwrap();
    assert!(twice.1.contains("already taken over"), "{twice:?}");

    new.conn = r.login(&new);
    let carried = resigned(offline.clone(), &new);
    let outcome = r.push_one(&mut new, carried);
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    assert_eq!(r.fields_of(entity)["name"], json!("Written Offline"));

    // Another device of the same user may not push the old device's changes.
    let mut other = r.device("dana", 2);
    let (_, more) = old.create("patient", json!({"name": "Not Yours"}), r.now);
    let more = resigned(more, &other);
    let outcome = r.push_one(&mut other, more);
    assert!(
        matches!(&outcome, Outcome::Forbidden { reason } if reason.contains("not authored by the sending device")),
        "{outcome:?}"
    );
}

#[test]
fn a_change_the_revoked_device_got_applied_is_answered_from_its_receipt() {
    let mut r = clinic();
    let mut old = r.device("dana", 1);
    let (_, m) = old.create("patient", json!({"name": "Applied, answer lost"}), r.now);
    let first = r.push_one(&mut old, m.clone());
    let Outcome::Applied { version, .. } = first else {
        panic!("{first:?}")
    };
    admin::revoke_device(r.core.directory_mut(), old.device_id, r.now).unwrap();
    let (mut new, out) = takeover(&mut r, &old, "dana", &old.key.clone(), 40);
    let Some(Output::Send(_, RelayMessage::Enrolled { user, .. })) = out.first() else {
        panic!("{out:?}")
    };
    new.hand.adopt_user(&user.clone());
    new.conn = r.login(&new);
    let repeat = resigned(m, &new);
    let again = r.push_one(&mut new, repeat);
    assert!(
        matches!(&again, Outcome::AlreadyApplied { original } if matches!(**original, Outcome::Applied { version: v, .. } if v == version)),
        "{again:?}"
    );
}

#[test]
fn a_device_ordered_to_wipe_is_never_taken_over() {
    let mut r = clinic();
    let old = r.device("dana", 1);
    admin::revoke_and_wipe(r.core.directory_mut(), old.device_id, r.now).unwrap();
    let refused = refusal(&takeover(&mut r, &old, "dana", &old.key.clone(), 50).1).unwrap();
    assert!(refused.1.contains("ordered to erase"), "{refused:?}");
    assert_eq!(r.core.directory().replaced_by(old.device_id).unwrap(), None::<Uuid>);
}
