//! Field authority, superseded requests and possible duplicates on the relay core (SPEC §17):
//! the relay refuses a write to a field its writer does not own, merges concurrent writes that
//! each touched only their owner's fields, and flags a new record matching a live one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, TestDevice, TestRelay, applied_version, clinic};
use fieldsync_schema::{MutationKind, Outcome, Rule};
use serde_json::{Value, json};
use uuid::Uuid;

fn forbidden_because(o: Outcome, needle: &str) {
    match o {
        Outcome::Forbidden { reason } => assert!(reason.contains(needle), "refused, but because: {reason}"),
        other => panic!("expected Forbidden ({needle}), got {other:?}"),
    }
}

fn is_conflict(o: &Outcome) -> bool {
    matches!(o, Outcome::Conflict { .. })
}

/// The delete that merges `merged` into `survivor`.
fn merge_into(dev: &mut TestDevice, merged: Uuid, survivor: Uuid, now: u64) -> fieldsync_schema::Mutation {
    dev.write("workout", merged, MutationKind::Delete, now, |d, ty| {
        d.set_deleted(true).unwrap();
        let mut p = serde_json::Map::new();
        p.insert("merged_into".into(), Value::String(survivor.to_string()));
        d.write_fields(ty, &p).unwrap();
    })
}

const RUN: &str = "2026-11-22T07:00:00Z";

/// A workout the patient logged, known to the patient's phone and the service.
fn workout(r: &mut TestRelay, phone: &mut TestDevice, svc: &mut TestDevice) -> Uuid {
    let (w, m) = phone.create(
        "workout",
        json!({"name": "Morning run", "activity_type": "run", "started_at": RUN}),
        T0,
    );
    assert_eq!(applied_version(&r.push_one(phone, m)), 1);
    r.pull(svc);
    w
}

#[test]
fn a_write_to_a_field_the_writer_does_not_own_is_refused_with_the_owner_named() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut svc = r.device("svc", 2);
    let w = workout(&mut r, &mut phone, &mut svc);
    // Each refused write from a device of its own (a refused change stays in its local copy).
    let mut seed = 10;
    let mut refused = |r: &mut TestRelay, user: &str, patch: Value, needle: &str| {
        seed += 1;
        let mut dev = r.device(user, seed);
        r.pull(&mut dev);
        let m = dev.update("workout", w, patch, T0 + seed);
        forbidden_because(r.push_one(&mut dev, m), needle);
    };
    refused(
        &mut r,
        "pat",
        json!({"avg_hr": 150}),
        "`avg_hr` of `workout` is owned by the service",
    );
    refused(
        &mut r,
        "svc",
        json!({"notes": "felt great"}),
        "`notes` of `workout` is owned by the user",
    );
    // Only the relay sets the duplicate flag, only a merge's delete names a survivor.
    refused(
        &mut r,
        "pat",
        json!({"duplicate_of": w.to_string()}),
        "set only by the relay",
    );
    refused(
        &mut r,
        "pat",
        json!({"merged_into": w.to_string()}),
        "written only by the delete that merges",
    );
    // A manual log may carry a provisional measurement, never a service-only one.
    let (_, m) = phone.create("workout", json!({"name": "Run", "distance_m": 5000.0}), T0 + 2);
    assert_eq!(applied_version(&r.push_one(&mut phone, m)), 1);
    let (_, m) = phone.create("workout", json!({"name": "Run", "max_hr": 180}), T0 + 3);
    forbidden_because(r.push_one(&mut phone, m), "`max_hr`");
    assert_eq!(r.version_of(w), 1, "nothing refused was applied");
}

#[test]
fn concurrent_writes_to_each_owners_own_fields_merge_without_a_prompt() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut svc = r.device("svc", 2);
    let w = workout(&mut r, &mut phone, &mut svc);
    // Both from version 1: the watch's import and the phone's notes.
    let gps = svc.update(
        "workout",
        w,
        json!({"distance_m": 10012.5, "avg_hr": 152, "avg_pace_s_per_km": 312.0, "source": "garmin"}),
        T0 + 10,
    );
    let feel = phone.update(
        "workout",
        w,
        json!({"notes": "hills hurt", "rpe": 7.5, "feeling": "good"}),
        T0 + 20,
    );
    assert_eq!(applied_version(&r.push_one(&mut svc, gps)), 2);
    assert_eq!(applied_version(&r.push_one(&mut phone, feel)), 3, "no conflict");
    let f = r.fields_of(w);
    for (k, v) in [
        ("distance_m", json!(10012.5)),
        ("avg_hr", json!(152)),
        ("source", json!("garmin")),
        ("notes", json!("hills hurt")),
        ("rpe", json!(7.5)),
        ("feeling", json!("good")),
        ("name", json!("Morning run")),
    ] {
        assert_eq!(f.get(k), Some(&v), "{k} in {f:?}");
    }
    // The other order merges too: the service's write on a base without the phone's edit.
    let feel = phone.update("workout", w, json!({"notes": "hills hurt less"}), T0 + 30);
    let gps = svc.update("workout", w, json!({"max_hr": 181}), T0 + 31);
    assert_eq!(applied_version(&r.push_one(&mut phone, feel)), 4);
    assert_eq!(applied_version(&r.push_one(&mut svc, gps)), 5);
    let f = r.fields_of(w);
    assert_eq!(
        (f["notes"].clone(), f["max_hr"].clone()),
        (json!("hills hurt less"), json!(181))
    );
    // Each writer's audit record is its own.
    let audit: Vec<_> = r.audit_rows().into_iter().filter(|a| a.entity_id == w).collect();
    let devices: Vec<Uuid> = audit.iter().map(|a| a.device_id).collect();
    assert_eq!(
        devices,
        vec![
            phone.device_id,
            svc.device_id,
            phone.device_id,
            phone.device_id,
            svc.device_id
        ]
    );
}

#[test]
fn fields_both_may_write_and_two_people_on_one_record_stay_gated() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut tablet = r.device("pat", 3);
    let mut svc = r.device("svc", 2);
    let w = workout(&mut r, &mut phone, &mut svc);
    r.pull(&mut tablet);
    let a = phone.update("workout", w, json!({"notes": "a"}), T0 + 1);
    let b = tablet.update("workout", w, json!({"rpe": 6.0}), T0 + 2);
    assert_eq!(applied_version(&r.push_one(&mut phone, a)), 2);
    assert!(is_conflict(&r.push_one(&mut tablet, b)), "two people: a prompt");
    // A shared field (the name) is gated between person and service.
    r.pull(&mut svc);
    r.pull(&mut phone);
    let a = phone.update("workout", w, json!({"name": "Tempo run"}), T0 + 3);
    let b = svc.update("workout", w, json!({"name": "Run (Garmin)"}), T0 + 4);
    assert_eq!(applied_version(&r.push_one(&mut phone, a)), 3);
    assert!(is_conflict(&r.push_one(&mut svc, b)));
}

#[test]
fn a_provisional_value_stands_until_the_service_writes_and_the_service_value_is_kept() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut svc = r.device("svc", 2);
    let w = workout(&mut r, &mut phone, &mut svc);
    let manual = phone.update("workout", w, json!({"distance_m": 9000.0}), T0 + 1);
    let watch = svc.update("workout", w, json!({"distance_m": 10012.5}), T0 + 2);
    assert_eq!(applied_version(&r.push_one(&mut phone, manual)), 2);
    assert_eq!(
        applied_version(&r.push_one(&mut svc, watch)),
        3,
        "the owner's write stands"
    );
    assert_eq!(r.fields_of(w)["distance_m"], json!(10012.5));
    // A person's stale write to the service's field is a prompt, not an overwrite.
    let stale = phone.update("workout", w, json!({"distance_m": 9500.0}), T0 + 3);
    assert!(is_conflict(&r.push_one(&mut phone, stale)));
    assert_eq!(r.fields_of(w)["distance_m"], json!(10012.5));
}

#[test]
fn a_service_supersedes_a_request_while_the_user_edits_it_without_a_prompt() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut svc = r.device("svc", 2);
    let (plan, m) = svc.create("plan", json!({"name": "Base block", "plan_version": 1}), T0);
    assert_eq!(applied_version(&r.push_one(&mut svc, m)), 1);
    r.pull(&mut phone);
    let (req, m) = phone.create(
        "plan_change_request",
        json!({"plan_id": plan.to_string(), "plan_version": 1, "workout_date": "2026-11-24", "move_to": "2026-11-25"}),
        T0 + 1,
    );
    assert_eq!(applied_version(&r.push_one(&mut phone, m)), 1);
    r.pull(&mut svc);
    let reason = phone.update("plan_change_request", req, json!({"reason": "travel"}), T0 + 2);
    let sup = svc.update(
        "plan_change_request",
        req,
        json!({"superseded_at": "2026-11-23T06:00:00Z", "superseded_by_version": 2,
               "superseded_notice": "Your plan was regenerated after Sunday's long run."}),
        T0 + 3,
    );
    assert_eq!(applied_version(&r.push_one(&mut svc, sup)), 2);
    assert_eq!(applied_version(&r.push_one(&mut phone, reason)), 3);
    let f = r.fields_of(req);
    assert_eq!(f["reason"], json!("travel"));
    assert_eq!(f["superseded_by_version"], json!(2));
    // The user cannot mark or unmark it.
    r.pull(&mut phone);
    let m = phone.update("plan_change_request", req, json!({"superseded_notice": null}), T0 + 4);
    forbidden_because(r.push_one(&mut phone, m), "owned by the service");
}

#[test]
fn a_new_record_matching_a_live_one_is_flagged_and_a_merge_or_dismissal_settles_it() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut svc = r.device("svc", 2);
    let (manual, m) = phone.create(
        "workout",
        json!({"name": "Run", "activity_type": "run", "started_at": "2026-11-22T07:03:00Z", "rpe": 7.0}),
        T0,
    );
    assert_eq!(applied_version(&r.push_one(&mut phone, m)), 1);
    let (watch, m) = svc.create(
        "workout",
        json!({"name": "Morning Run", "activity_type": "run", "started_at": RUN, "avg_hr": 150, "source": "garmin"}),
        T0 + 1,
    );
    let m_id = m.mutation_id;
    let outcome = r.push_one(&mut svc, m.clone());
    assert!(
        matches!(outcome, Outcome::Applied { version: 1, duplicate_of: Some(d), .. } if d == manual),
        "the outcome names the match: {outcome:?}"
    );
    assert_eq!(r.fields_of(watch)["duplicate_of"], json!(manual.to_string()), "flagged");
    // A retry is answered from the receipt with the same detail.
    match r.push_one(&mut svc, m) {
        Outcome::AlreadyApplied { original } => assert!(
            matches!(*original, Outcome::Applied { duplicate_of: Some(d), .. } if d == manual),
            "{original:?}"
        ),
        other => panic!("retry of {m_id}: {other:?}"),
    }
    assert!(
        !r.fields_of(manual).contains_key("duplicate_of"),
        "the older record is left alone"
    );
    // Not a match: another activity type, or more than ten minutes apart.
    for (i, (kind, at)) in [("ride", RUN), ("run", "2026-11-22T07:14:00Z")].into_iter().enumerate() {
        let (other, m) = phone.create(
            "workout",
            json!({"name": "x", "activity_type": kind, "started_at": at}),
            T0 + 2 + i as u64,
        );
        let outcome = r.push_one(&mut phone, m);
        assert!(
            matches!(
                outcome,
                Outcome::Applied {
                    version: 1,
                    duplicate_of: None,
                    ..
                }
            ),
            "{outcome:?}"
        );
        assert!(!r.fields_of(other).contains_key("duplicate_of"), "{kind} at {at}");
    }
    // The merge: the watch's record takes the manual RPE, the manual log becomes a tombstone.
    r.pull(&mut phone);
    let m = phone.update("workout", watch, json!({"rpe": 7.0, "duplicate_of": null}), T0 + 10);
    assert_eq!(applied_version(&r.push_one(&mut phone, m)), 2);
    let mut tablet = r.device("pat", 3);
    r.pull(&mut tablet);
    let itself = merge_into(&mut tablet, manual, manual, T0 + 11);
    match r.push_one(&mut tablet, itself) {
        Outcome::Invalid { errors } => assert!(errors.iter().any(|e| e.field == "merged_into" && e.rule == Rule::Ref)),
        other => panic!("a record merged into itself: {other:?}"),
    }
    let merge = merge_into(&mut phone, manual, watch, T0 + 12);
    assert_eq!(applied_version(&r.push_one(&mut phone, merge)), 2);
    let row = r.document_row(manual);
    assert!(row.deleted);
    assert_eq!(r.fields_of(manual)["merged_into"], json!(watch.to_string()));
    // A merged-away record is no longer a match: a third log of the same run matches the survivor.
    let (third, m) = phone.create(
        "workout",
        json!({"name": "Run again", "activity_type": "run", "started_at": "2026-11-22T07:05:00Z"}),
        T0 + 13,
    );
    assert_eq!(applied_version(&r.push_one(&mut phone, m)), 1);
    assert_eq!(r.fields_of(third)["duplicate_of"], json!(watch.to_string()));
}

/// The version gate does not take the envelope's word for what a write was built on: a change
/// made on an older version, sent under the current base (a device's refused edit left in its
/// document and carried by its next write, or a client lying about its base), would leave a
/// field with two concurrent values for Automerge's tie-break to pick. It is a conflict.
#[test]
fn a_change_made_on_an_older_version_under_the_current_base_is_a_conflict() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut tablet = r.device("pat", 3);
    let mut svc = r.device("svc", 2);
    let w = workout(&mut r, &mut phone, &mut svc);
    r.pull(&mut tablet);
    let a = phone.update("workout", w, json!({"notes": "from the phone"}), T0 + 1);
    assert_eq!(applied_version(&r.push_one(&mut phone, a)), 2);
    // The tablet edits on version 1, then claims version 2 for the same change.
    let stale = tablet.update("workout", w, json!({"notes": "from the tablet"}), T0 + 2);
    tablet.set_version(w, 2);
    let forged = tablet.envelope("workout", w, MutationKind::Update, stale.changes.clone(), T0 + 3);
    assert_eq!(forged.base_version, Some(2));
    let outcome = r.push_one(&mut tablet, forged);
    assert!(
        is_conflict(&outcome),
        "built on version 1 whatever it claims: {outcome:?}"
    );
    assert_eq!(r.version_of(w), 2);
    assert_eq!(r.fields_of(w)["notes"], json!("from the phone"));
    // A write on what the tablet really saw, touching another field, is applied as before.
    let mut fresh = r.device("pat", 4);
    r.pull(&mut fresh);
    let rpe = fresh.update("workout", w, json!({"rpe": 7.0}), T0 + 4);
    assert_eq!(applied_version(&r.push_one(&mut fresh, rpe)), 3);
}
