//! Conflict resolutions on the relay (SPEC §9, §10): a `Resolve` carries the device's refused
//! changes and its decision, is gated on the current version, and every value it discards goes
//! to the conflict archive with the value that replaced it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, TestDevice, TestRelay, applied_version, obj};
use fieldsync_relay::store::ArchiveRow;
use fieldsync_schema::{Bytes, ConflictReason, EntityDoc, MutationKind, Outcome, Role, document};
use serde_json::{Value, json};
use uuid::Uuid;

fn gym() -> TestRelay {
    let mut r = TestRelay::new();
    r.space("gym");
    r.user("phone", "gym", Role::Patient);
    r.user("tablet", "gym", Role::Patient);
    r
}

/// A workout created by `a` (version 1) and known to `b`; then `a` and `b` edit it from the
/// same base, `a` first (version 2), and `b` gets a conflict that it merges locally.
fn conflicted_workout(r: &mut TestRelay, a: &mut TestDevice, b: &mut TestDevice, mine: Value, theirs: Value) -> Uuid {
    let (w, m) = a.create("workout", json!({"name": "Push day", "notes": "warm-up"}), T0);
    assert_eq!(applied_version(&r.push_one(a, m)), 1);
    r.pull(b);
    let ma = a.update("workout", w, theirs, T0 + 10);
    let mb = b.update("workout", w, mine, T0 + 20);
    assert_eq!(applied_version(&r.push_one(a, ma)), 2);
    let Outcome::Conflict {
        server_version,
        server_changes,
        reason: ConflictReason::StaleBase,
        ..
    } = r.push_one(b, mb)
    else {
        panic!("expected a conflict")
    };
    let parsed = server_changes
        .iter()
        .map(|c| document::parse_change(&c.0).unwrap())
        .collect();
    b.docs.get_mut(&w).unwrap().apply(parsed).unwrap();
    b.set_version(w, server_version);
    w
}

/// `b`'s resolution: its changes the relay lacks, then a decision writing `patch` (and the
/// tombstone, if given).
fn resolution(
    r: &TestRelay,
    b: &mut TestDevice,
    w: Uuid,
    patch: Value,
    deleted: Option<bool>,
) -> fieldsync_schema::Mutation {
    let relay_doc = EntityDoc::load(&r.doc_bytes(w), document::device_actor(Uuid::nil())).unwrap();
    let mut relay_doc = relay_doc;
    let patch = obj(patch);
    let mut m = b.write("workout", w, MutationKind::Resolve, T0 + 30, |d, ty| {
        d.write_fields(ty, &patch).unwrap();
        if let Some(del) = deleted {
            d.set_deleted(del).unwrap();
        }
    });
    let decision = m.changes[0].clone();
    let mut changes: Vec<Bytes> = b
        .docs
        .get_mut(&w)
        .unwrap()
        .all_changes()
        .into_iter()
        .filter(|c| !relay_doc.has_change(&c.hash()) && c.raw_bytes() != decision.0.as_slice())
        .map(|c| Bytes(c.raw_bytes().to_vec()))
        .collect();
    changes.push(decision);
    m.changes = changes;
    b.key.sign_mutation(&mut m);
    m
}

fn resolution_rows(r: &TestRelay, w: Uuid) -> Vec<ArchiveRow> {
    let mut rows: Vec<ArchiveRow> = r
        .archive_rows()
        .into_iter()
        .filter(|a| a.entity_id == w && a.kind == "resolution")
        .collect();
    rows.sort_by(|x, y| (&x.field, &x.losing_json).cmp(&(&y.field, &y.losing_json)));
    rows
}

fn lost(rows: &[ArchiveRow]) -> Vec<(String, String, String, Option<Uuid>)> {
    rows.iter()
        .map(|a| {
            (
                a.field.clone().unwrap_or_default(),
                a.losing_json.clone(),
                a.winning_json.clone(),
                a.loser_device,
            )
        })
        .collect()
}

#[test]
fn keep_mine_archives_theirs_and_keep_theirs_archives_mine() {
    let mut r = gym();
    let mut a = r.device("phone", 1);
    let mut b = r.device("tablet", 2);
    let w = conflicted_workout(
        &mut r,
        &mut a,
        &mut b,
        json!({"notes": "tablet", "rpe": 8.0}),
        json!({"notes": "phone", "duration_min": 45}),
    );
    // Keep mine: the phone's values lose.
    let m = resolution(
        &r,
        &mut b,
        w,
        json!({"notes": "tablet", "rpe": 8.0, "duration_min": null}),
        None,
    );
    assert_eq!(m.changes.len(), 2, "the refused change and the decision");
    assert_eq!(applied_version(&r.push_one(&mut b, m.clone())), 3);
    assert_eq!(
        r.fields_of(w),
        obj(json!({"name": "Push day", "notes": "tablet", "rpe": 8.0}))
    );
    let rows = resolution_rows(&r, w);
    assert_eq!(
        lost(&rows),
        vec![
            ("duration_min".into(), "45".into(), "null".into(), Some(a.device_id)),
            (
                "notes".into(),
                "\"phone\"".into(),
                "\"tablet\"".into(),
                Some(a.device_id)
            ),
        ]
    );
    assert!(
        rows.iter()
            .all(|x| x.winner_device == Some(b.device_id) && x.winner_mutation == Some(m.mutation_id))
    );
    assert!(rows.iter().all(|x| x.version == 3 && x.space_id == m.space_id));
    // The history keeps both sides: the phone's change is still in the document.
    let mut doc = EntityDoc::load(&r.doc_bytes(w), document::device_actor(Uuid::nil())).unwrap();
    let phone_change = doc
        .all_changes()
        .into_iter()
        .find(|c| document::actor_device(c.actor_id()) == Some(a.device_id) && c.seq() == 2)
        .unwrap();
    assert_eq!(doc.fields_at(&[phone_change.hash()])["notes"], json!("phone"));

    // Keep theirs, on a second workout: the tablet's own values lose.
    let w2 = conflicted_workout(
        &mut r,
        &mut a,
        &mut b,
        json!({"notes": "tablet", "rpe": 8.0}),
        json!({"notes": "phone", "duration_min": 45}),
    );
    let m = resolution(
        &r,
        &mut b,
        w2,
        json!({"notes": "phone", "rpe": null, "duration_min": 45}),
        None,
    );
    assert_eq!(applied_version(&r.push_one(&mut b, m.clone())), 3);
    assert_eq!(
        lost(&resolution_rows(&r, w2)),
        vec![
            (
                "notes".into(),
                "\"tablet\"".into(),
                "\"phone\"".into(),
                Some(b.device_id)
            ),
            ("rpe".into(), "8.0".into(), "null".into(), Some(b.device_id)),
        ]
    );
    let rows = resolution_rows(&r, w2);
    assert!(rows.iter().all(|x| x.loser_mutation == Some(m.mutation_id)));
    // The surviving note was written by the phone: the archive credits the phone, not the
    // tablet that chose it; the absent `rpe` is the tablet's decision.
    let notes = rows.iter().find(|x| x.field.as_deref() == Some("notes")).unwrap();
    assert_eq!((notes.winner_device, notes.winner_mutation), (Some(a.device_id), None));
    let rpe = rows.iter().find(|x| x.field.as_deref() == Some("rpe")).unwrap();
    assert_eq!(
        (rpe.winner_device, rpe.winner_mutation),
        (Some(b.device_id), Some(m.mutation_id))
    );
}

#[test]
fn a_merge_archives_both_losing_sides_and_a_stale_resolution_is_a_conflict() {
    let mut r = gym();
    let mut a = r.device("phone", 1);
    let mut b = r.device("tablet", 2);
    let w = conflicted_workout(
        &mut r,
        &mut a,
        &mut b,
        json!({"notes": "tablet"}),
        json!({"notes": "phone"}),
    );
    // The phone writes again before the tablet's resolution arrives: the resolution is stale.
    let again = a.update("workout", w, json!({"rpe": 6.0}), T0 + 25);
    assert_eq!(applied_version(&r.push_one(&mut a, again)), 3);
    let stale = resolution(&r, &mut b, w, json!({"notes": "both"}), None);
    let Outcome::Conflict {
        server_version: 3,
        server_changes,
        ..
    } = r.push_one(&mut b, stale)
    else {
        panic!("a stale resolution is a conflict too")
    };
    let parsed = server_changes
        .iter()
        .map(|c| document::parse_change(&c.0).unwrap())
        .collect();
    b.docs.get_mut(&w).unwrap().apply(parsed).unwrap();
    b.set_version(w, 3);
    let m = resolution(&r, &mut b, w, json!({"notes": "phone + tablet"}), None);
    assert_eq!(m.changes.len(), 3, "refused change, first decision, second decision");
    assert_eq!(applied_version(&r.push_one(&mut b, m)), 4);
    assert_eq!(r.fields_of(w)["notes"], json!("phone + tablet"));
    assert_eq!(r.fields_of(w)["rpe"], json!(6.0));
    let rows = lost(&resolution_rows(&r, w));
    assert!(
        rows.contains(&(
            "notes".into(),
            "\"phone\"".into(),
            "\"phone + tablet\"".into(),
            Some(a.device_id)
        )),
        "{rows:?}"
    );
    assert!(
        rows.contains(&(
            "notes".into(),
            "\"both\"".into(),
            "\"phone + tablet\"".into(),
            Some(b.device_id)
        )),
        "{rows:?}"
    );
    assert!(
        !rows.iter().any(|x| x.0 == "rpe"),
        "the merge kept the phone's rpe: {rows:?}"
    );
}

#[test]
fn keeping_an_edit_against_a_delete_restores_the_record_and_archives_the_tombstone() {
    let mut r = gym();
    let mut a = r.device("phone", 1);
    let mut b = r.device("tablet", 2);
    let (w, m) = a.create("workout", json!({"name": "Leg day"}), T0);
    r.push_one(&mut a, m);
    r.pull(&mut b);
    let del = a.delete("workout", w, T0 + 1);
    assert_eq!(applied_version(&r.push_one(&mut a, del)), 2);
    let edit = b.update("workout", w, json!({"notes": "squats"}), T0 + 2);
    let Outcome::Conflict {
        server_changes,
        reason: ConflictReason::Deleted,
        ..
    } = r.push_one(&mut b, edit)
    else {
        panic!("delete versus edit is a conflict")
    };
    let parsed = server_changes
        .iter()
        .map(|c| document::parse_change(&c.0).unwrap())
        .collect();
    b.docs.get_mut(&w).unwrap().apply(parsed).unwrap();
    b.set_version(w, 2);
    let m = resolution(&r, &mut b, w, json!({}), Some(false));
    assert_eq!(applied_version(&r.push_one(&mut b, m)), 3);
    assert!(!r.document_row(w).deleted);
    assert_eq!(r.fields_of(w), obj(json!({"name": "Leg day", "notes": "squats"})));
    assert_eq!(
        lost(&resolution_rows(&r, w)),
        vec![("_deleted".into(), "true".into(), "false".into(), Some(a.device_id))]
    );
}
