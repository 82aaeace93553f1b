//! Acceptance steps that mutation testing found untested (issue 23): each refusal names its
//! reason, and each rule is shown to hold on both sides of its edge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, clinic, obj, settings_on_two_devices};
use fieldsync_schema::document::device_actor;
use fieldsync_schema::wire::MAX_MUTATION_CHANGE_BYTES;
use fieldsync_schema::{Bytes, EntityDoc, Mutation, MutationKind, Outcome, Schema};
use serde_json::json;
use uuid::Uuid;

fn forbidden_because(o: &Outcome, needle: &str) {
    match o {
        Outcome::Forbidden { reason } => assert!(reason.contains(needle), "refused, but because: {reason}"),
        other => panic!("expected Forbidden ({needle}), got {other:?}"),
    }
}

fn invalid_because(o: &Outcome, field: &str, needle: &str) {
    match o {
        Outcome::Invalid { errors } => assert!(
            errors.iter().any(|e| e.field == field && e.message.contains(needle)),
            "invalid, but: {errors:?}"
        ),
        other => panic!("expected Invalid ({field}: {needle}), got {other:?}"),
    }
}

/// A new space stored in the same shard as `space`, so that the worker of `space` finds its
/// records (a record of another shard is not found at all, which would test nothing).
fn space_beside(r: &mut common::TestRelay, space: &str) -> String {
    let shard = r.space_row(space).shard;
    (0..16)
        .map(|i| format!("annex-{i}"))
        .find(|name| {
            r.space(name);
            r.space_row(name).shard == shard
        })
        .expect("a space in the same shard")
}

fn resign(dev: &common::TestDevice, mut m: Mutation) -> Mutation {
    dev.key.sign_mutation(&mut m);
    m
}

#[test]
fn an_envelope_naming_another_user_of_the_same_device_is_refused() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let (_, mut m) = a.create("patient", json!({"name": "Ada"}), T0);
    m.user_id = Uuid::from_bytes([0x77; 16]);
    let m = resign(&a, m);
    forbidden_because(&r.push_one(&mut a, m), "device or user does not match");
}

#[test]
fn a_mutation_naming_an_entity_under_another_type_or_space_finds_nothing() {
    let mut r = clinic();
    // A second space of dana's in the same shard as the clinic, so the document is found.
    let other = space_beside(&mut r, "clinic");
    r.user("dana", &other, fieldsync_schema::Role::Clinician);
    let mut a = r.device("dana", 1);
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    r.push_one(&mut a, m);
    let u = a.update("patient", p, json!({"mrn": "1"}), T0 + 1);

    let mut as_other_type = u.clone();
    as_other_type.entity_type = "assignment".into();
    as_other_type.mutation_id = Uuid::from_bytes([0xA1; 16]);
    let as_other_type = resign(&a, as_other_type);
    forbidden_because(&r.push_one(&mut a, as_other_type), "no such entity in this space");

    let mut in_other_space = u.clone();
    // Whichever of dana's two spaces the record is not in.
    let home = r.document_row(p).space_id;
    in_other_space.space_id = [r.space_row("clinic").space_id, r.space_row(&other).space_id]
        .into_iter()
        .find(|s| *s != home)
        .unwrap();
    in_other_space.mutation_id = Uuid::from_bytes([0xA2; 16]);
    let in_other_space = resign(&a, in_other_space);
    forbidden_because(&r.push_one(&mut a, in_other_space), "no such entity in this space");

    assert!(r.push_one(&mut a, u).applied().is_some(), "the honest update applies");
}

#[test]
fn changes_up_to_the_size_limit_are_read_and_one_byte_more_is_refused() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let id = Uuid::from_bytes([3; 16]);
    let at_limit = a.envelope(
        "patient",
        id,
        MutationKind::Create,
        vec![Bytes(vec![0; MAX_MUTATION_CHANGE_BYTES])],
        T0,
    );
    match r.push_one(&mut a, at_limit) {
        Outcome::Invalid { errors } => assert!(
            errors.iter().all(|e| !e.message.contains("exceed the limit")),
            "exactly the limit is not too large: {errors:?}"
        ),
        other => panic!("{other:?}"),
    }
    let over = a.envelope(
        "patient",
        id,
        MutationKind::Create,
        vec![Bytes(vec![0; MAX_MUTATION_CHANGE_BYTES + 1])],
        T0,
    );
    invalid_because(&r.push_one(&mut a, over), "changes", "exceed the limit");
}

#[test]
fn a_create_without_its_type_a_delete_without_its_tombstone_and_a_lock_that_does_not_lock_are_invalid() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let schema = Schema::default_schema();
    let patient = schema.entity_type("patient").unwrap();

    // A create whose document never records `_type`.
    let mut doc = EntityDoc::new(device_actor(a.device_id));
    doc.write_fields(patient, &obj(json!({"name": "Ada"}))).unwrap();
    let change = doc.commit(T0).unwrap();
    let untyped = a.envelope(
        "patient",
        Uuid::from_bytes([4; 16]),
        MutationKind::Create,
        vec![Bytes(change.raw_bytes().to_vec())],
        T0,
    );
    invalid_because(&r.push_one(&mut a, untyped), "_type", "must record the entity type");

    // A delete that writes `_deleted: false`.
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    r.push_one(&mut a, m);
    let not_deleting = a.write("patient", p, MutationKind::Delete, T0 + 1, |d, _| {
        d.set_deleted(false).unwrap()
    });
    invalid_because(&r.push_one(&mut a, not_deleting), "_deleted", "must set the tombstone");
    assert_eq!(r.version_of(p), 1, "nothing applied");

    // A lock that writes `locked: false`.
    let (f, m) = a.create(
        "intake_form",
        json!({"patient_id": p.to_string(), "answers": "None."}),
        T0 + 2,
    );
    r.push_one(&mut a, m);
    let not_locking = a.write("intake_form", f, MutationKind::Lock, T0 + 3, |d, ty| {
        d.write_fields(ty, &obj(json!({"locked": false}))).unwrap()
    });
    invalid_because(&r.push_one(&mut a, not_locking), "locked", "must set `locked: true`");
}

#[test]
fn a_change_that_depends_on_one_the_relay_lacks_is_refused_until_its_dependency_arrives() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    r.push_one(&mut a, m);
    let first = a.update("patient", p, json!({"mrn": "1"}), T0 + 1);
    let second = a.update("patient", p, json!({"phone": "2"}), T0 + 2);
    invalid_because(
        &r.push_one(&mut a, second.clone()),
        "changes",
        "push earlier changes first",
    );
    assert!(r.push_one(&mut a, first).applied().is_some());
}

#[test]
fn an_lww_write_made_after_seeing_the_current_value_wins_whatever_its_clock() {
    let (mut r, mut phone, mut tablet, s) = settings_on_two_devices(json!({"units": "kg"}));
    // The phone's clock is a day ahead; the tablet pulls the phone's write before its own.
    let ahead = phone.update("settings", s, json!({"units": "lb"}), T0 + 86_400_000);
    r.push_one(&mut phone, ahead);
    r.pull(&mut tablet);
    let after_seeing = tablet.update("settings", s, json!({"units": "st"}), T0 + 1_000);
    match r.push_one(&mut tablet, after_seeing) {
        Outcome::Applied { lww_lost, .. } => assert!(lww_lost.is_empty(), "{lww_lost:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.fields_of(s)["units"], json!("st"), "it saw the value it replaced");
}

#[test]
fn an_uncontested_lww_write_is_stored_as_the_device_wrote_it() {
    let (mut r, mut phone, _tablet, s) = settings_on_two_devices(json!({"units": "kg"}));
    let u = phone.update("settings", s, json!({"units": "lb"}), T0 + 5);
    r.push_one(&mut phone, u);
    let mut stored = EntityDoc::load(&r.doc_bytes(s), device_actor(Uuid::nil())).unwrap();
    let written = phone.docs.get_mut(&s).unwrap().heads();
    assert_eq!(
        stored.heads(),
        written,
        "no settlement change of the relay's own when nothing was contested"
    );
}

fn ref_error(o: &Outcome, field: &str, needle: &str) {
    match o {
        Outcome::Invalid { errors } => assert!(
            errors
                .iter()
                .any(|e| e.field == field && e.rule == fieldsync_schema::Rule::Ref && e.message.contains(needle)),
            "invalid, but: {errors:?}"
        ),
        other => panic!("expected a ref error on {field} ({needle}), got {other:?}"),
    }
}

#[test]
fn a_reference_must_name_a_live_record_of_its_type_in_the_same_space() {
    let mut r = clinic();
    let annex = space_beside(&mut r, "clinic");
    r.user("ann", &annex, fieldsync_schema::Role::Clinician);
    let mut a = r.device("dana", 1);
    let mut elsewhere = r.device("ann", 2);
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    r.push_one(&mut a, m);
    let started = "2026-11-22T09:00:00Z";
    let (s, m) = a.create(
        "session",
        json!({"patient_id": p.to_string(), "started_at": started}),
        T0,
    );
    assert!(r.push_one(&mut a, m).applied().is_some());

    // A record of another type under the right id shape.
    let (_, m) = a.create(
        "session",
        json!({"patient_id": s.to_string(), "started_at": started}),
        T0,
    );
    ref_error(&r.push_one(&mut a, m), "patient_id", "no patient");
    // A patient whose create was refused (the relay holds nothing of it at any version).
    let (refused, m) = a.create("patient", json!({"mrn": "no name"}), T0);
    assert!(matches!(r.push_one(&mut a, m), Outcome::Invalid { .. }));
    let (_, m) = a.create(
        "session",
        json!({"patient_id": refused.to_string(), "started_at": started}),
        T0,
    );
    ref_error(&r.push_one(&mut a, m), "patient_id", "no patient");
    // A patient of another space, even one stored in the same shard.
    let (_, m) = elsewhere.create(
        "session",
        json!({"patient_id": p.to_string(), "started_at": started}),
        T0,
    );
    ref_error(&r.push_one(&mut elsewhere, m), "patient_id", "no patient");

    // Once the patient is deleted, a write that sets the reference is refused, and a write
    // that leaves an existing one alone is not.
    let del = a.delete("patient", p, T0 + 1);
    assert!(r.push_one(&mut a, del).applied().is_some());
    let (_, m) = a.create(
        "session",
        json!({"patient_id": p.to_string(), "started_at": started}),
        T0 + 2,
    );
    ref_error(&r.push_one(&mut a, m), "patient_id", "refers to a deleted patient");
    let untouched = a.update("session", s, json!({"location": "Room 2"}), T0 + 3);
    assert!(
        r.push_one(&mut a, untouched).applied().is_some(),
        "an old reference does not lock its referrer"
    );
}

#[test]
fn a_note_signature_must_name_the_sending_user_and_device_even_when_it_verifies() {
    use fieldsync_schema::document::{NoteSignature, content_hash};
    use fieldsync_schema::signing::note_signature_bytes;
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    r.push_one(&mut a, m);
    let (n, m) = a.create("note", json!({"patient_id": p.to_string(), "body": "x"}), T0);
    r.push_one(&mut a, m);
    let key = a.key.clone();
    let (user, device) = (a.user_id, a.device_id);
    let someone = Uuid::from_bytes([0x5a; 16]);
    // Signed with the device's own key, naming another user (then another device).
    for (signer_user, signer_device) in [(someone, device), (user, someone)] {
        let sign = a.write("note", n, MutationKind::Sign, T0 + 1, |d, _| {
            let hash = content_hash(&d.fields());
            let sig = key.sign(&note_signature_bytes(&n, &hash, &signer_user, &signer_device, T0 + 1));
            d.set_signature(&NoteSignature {
                signer_user,
                signer_device,
                signed_at_ms: T0 + 1,
                content_hash: hex::encode(hash),
                signature: hex::encode(sig),
            })
            .unwrap()
        });
        invalid_because(
            &r.push_one(&mut a, sign),
            "_signature",
            "signed by the user and device sending",
        );
        a.docs.remove(&n);
        r.adopt(&mut a, n);
    }
    assert!(!r.document_row(n).signed);
}

#[test]
fn an_lww_edit_older_than_a_delete_leaves_the_record_deleted_and_its_values_as_they_were() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut tablet = r.device("pat", 2);
    let (s, m) = phone.create("journal_entry", json!({"date": "2026-11-22", "pain_level": 3}), T0);
    r.push_one(&mut phone, m);
    r.pull(&mut tablet);
    let del = phone.delete("journal_entry", s, T0 + 2_000);
    let stale = tablet.update("journal_entry", s, json!({"pain_level": 5}), T0 + 1_000);
    r.push_one(&mut phone, del);
    match r.push_one(&mut tablet, stale) {
        Outcome::Applied { lww_lost, .. } => {
            let fields: Vec<&str> = lww_lost.iter().map(|l| l.field.as_str()).collect();
            assert_eq!(fields, ["_deleted", "pain_level"], "{lww_lost:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(r.document_row(s).deleted, "the newer delete stands");
    assert_eq!(
        r.fields_of(s)["pain_level"],
        json!(3),
        "the losing value was settled away"
    );
}
