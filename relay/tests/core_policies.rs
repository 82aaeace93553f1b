//! Every policy and outcome of the relay core (SPEC §5, §6, §10).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use automerge::transaction::Transactable;
use common::{T0, TestRelay, applied_version, clinic, obj, settings_on_two_devices};
use fieldsync_schema::{ConflictReason, FieldError, MutationKind, Outcome, Role, Rule, document};
use serde_json::json;

/// The reason of a `Forbidden` outcome; fails the test for any other outcome.
fn forbidden_because(o: Outcome, needle: &str) {
    match o {
        Outcome::Forbidden { reason } => assert!(reason.contains(needle), "refused, but because: {reason}"),
        other => panic!("expected Forbidden ({needle}), got {other:?}"),
    }
}

fn errors(o: &Outcome) -> &[FieldError] {
    match o {
        Outcome::Invalid { errors } => errors,
        other => panic!("expected invalid, got {other:?}"),
    }
}

/// A patient and a session on it, created and pushed by `dev`; returns (patient, session).
fn patient_and_session(r: &mut TestRelay, dev: &mut common::TestDevice) -> (uuid::Uuid, uuid::Uuid) {
    let (p, m) = dev.create("patient", json!({"name": "Ada"}), T0);
    assert_eq!(applied_version(&r.push_one(dev, m)), 1);
    let (s, m) = dev.create(
        "session",
        json!({"patient_id": p.to_string(), "started_at": "2026-11-22T09:00:00Z", "status": "planned"}),
        T0,
    );
    assert_eq!(applied_version(&r.push_one(dev, m)), 1);
    (p, s)
}

#[test]
fn two_devices_edit_the_same_session_from_the_same_base_and_the_second_gets_a_conflict() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let mut b = r.device("sam", 2);
    let (_, s) = patient_and_session(&mut r, &mut a);
    r.pull(&mut b);
    assert_eq!(b.versions[&s], 1);

    let ma = a.update("session", s, json!({"status": "in_progress"}), T0 + 10);
    let mb = b.update("session", s, json!({"status": "cancelled"}), T0 + 20);
    assert_eq!(applied_version(&r.push_one(&mut a, ma.clone())), 2);
    let outcome = r.push_one(&mut b, mb);
    let Outcome::Conflict {
        server_version,
        server_changes,
        reason,
        authors,
    } = outcome
    else {
        panic!("expected conflict, got {outcome:?}");
    };
    assert_eq!((server_version, reason), (2, ConflictReason::StaleBase));
    // The conflict carries exactly the first device's change, and says who made it.
    assert_eq!(server_changes, ma.changes);
    assert_eq!(authors.len(), 1);
    assert_eq!(
        (authors[0].device_id, authors[0].mutation_id),
        (a.device_id, ma.mutation_id)
    );
    assert_eq!(
        r.fields_of(s)["status"],
        json!("in_progress"),
        "the relay kept the first write"
    );

    // B merges the relay's change and resolves on the relay's current version.
    let parsed = server_changes
        .iter()
        .map(|c| document::parse_change(&c.0).unwrap())
        .collect();
    b.docs.get_mut(&s).unwrap().apply(parsed).unwrap();
    b.set_version(s, server_version);
    let mut resolve = b.write("session", s, MutationKind::Resolve, T0 + 30, |d, ty| {
        d.write_fields(ty, &obj(json!({"status": "cancelled"}))).unwrap()
    });
    // The resolution carries the rejected change too: it is part of the history it builds on.
    let rejected_change = b.docs.get_mut(&s).unwrap().all_changes();
    let own: Vec<_> = rejected_change
        .iter()
        .filter(|c| document::actor_device(c.actor_id()) == Some(b.device_id))
        .map(|c| fieldsync_schema::Bytes(c.raw_bytes().to_vec()))
        .collect();
    resolve.changes = own;
    b.key.sign_mutation(&mut resolve);
    assert_eq!(applied_version(&r.push_one(&mut b, resolve)), 3);
    assert_eq!(r.fields_of(s)["status"], json!("cancelled"));
}

#[test]
fn an_edit_of_a_signed_note_is_rejected_and_the_note_does_not_change() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let mut b = r.device("sam", 2);
    let (p, _) = patient_and_session(&mut r, &mut a);
    let (n, m) = a.create("note", json!({"patient_id": p.to_string(), "body": "Knee stable."}), T0);
    r.push_one(&mut a, m);
    r.pull(&mut b);
    let sign = a.sign_note(n, T0 + 5);
    assert_eq!(applied_version(&r.push_one(&mut a, sign)), 2);
    let signed_bytes = r.doc_bytes(n);

    let edit = b.write("note", n, MutationKind::Update, T0 + 6, |d, _| {
        d.set_text("body", "Knee unstable.").unwrap()
    });
    let outcome = r.push_one(&mut b, edit);
    assert!(matches!(outcome, Outcome::RejectedImmutable { .. }), "{outcome:?}");
    assert_eq!(r.doc_bytes(n), signed_bytes, "a signed note's bytes never change");
    // Signing again, or deleting, is refused too.
    let del = a.delete("note", n, T0 + 7);
    assert!(matches!(r.push_one(&mut a, del), Outcome::RejectedImmutable { .. }));
}

#[test]
fn notes_merge_concurrent_edits_and_only_signers_may_sign() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let mut b = r.device("ava", 2);
    let (p, _) = patient_and_session(&mut r, &mut a);
    let (n, m) = a.create(
        "note",
        json!({"patient_id": p.to_string(), "body": "Knee stable. Continue plan."}),
        T0,
    );
    r.push_one(&mut a, m);
    r.pull(&mut b);
    let ea = a.write("note", n, MutationKind::Update, T0 + 1, |d, _| {
        d.set_text("body", "Knee stable, swelling down. Continue plan.")
            .unwrap()
    });
    let eb = b.write("note", n, MutationKind::Update, T0 + 2, |d, _| {
        d.set_text("body", "Knee stable. Continue plan; add balance work.")
            .unwrap()
    });
    r.push_one(&mut a, ea);
    // Notes have no version gate: the stale edit merges.
    assert_eq!(applied_version(&r.push_one(&mut b, eb)), 3);
    let body = r.fields_of(n)["body"].as_str().unwrap().to_string();
    assert!(
        body.contains("swelling down") && body.contains("balance work"),
        "{body}"
    );

    // An assistant may write notes but not sign them.
    r.pull(&mut b);
    let sign = b.sign_note(n, T0 + 3);
    forbidden_because(r.push_one(&mut b, sign), "role `assistant` may not sign `note`");
    assert!(!r.document_row(n).signed, "nothing was signed");
    // A signer must have seen the latest content: a stale base is a conflict.
    let sign = a.sign_note(n, T0 + 4);
    let o = r.push_one(&mut a, sign);
    assert!(
        matches!(
            o,
            Outcome::Conflict {
                reason: fieldsync_schema::ConflictReason::StaleBase,
                ..
            }
        ),
        "{o:?}"
    );
    assert!(!r.document_row(n).signed, "nothing was signed");
}

#[test]
fn a_forged_note_signature_is_refused() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let (p, _) = patient_and_session(&mut r, &mut a);
    let (n, m) = a.create("note", json!({"patient_id": p.to_string(), "body": "x"}), T0);
    r.push_one(&mut a, m);
    let (user, device) = (a.user_id, a.device_id);
    let sign = a.write("note", n, MutationKind::Sign, T0 + 1, |d, _| {
        d.set_signature(&document::NoteSignature {
            signer_user: user,
            signer_device: device,
            signed_at_ms: T0,
            content_hash: hex::encode(document::content_hash(&d.fields())),
            signature: hex::encode([7u8; 64]),
        })
        .unwrap()
    });
    let o = r.push_one(&mut a, sign);
    assert!(errors(&o).iter().any(|e| e.field == "_signature"), "{o:?}");
    assert!(!r.document_row(n).signed);
}

#[test]
fn concurrent_counter_increments_sum_and_overwrites_are_refused() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let mut b = r.device("pat", 2);
    let (v, m) = a.create("volume", json!({"week": "2026-11-16", "legs_sets": 0}), T0);
    r.push_one(&mut a, m);
    r.pull(&mut b);
    for i in 0..3 {
        let ma = a.increment("volume", v, "legs_sets", 2, T0 + i);
        let mb = b.increment("volume", v, "legs_sets", 5, T0 + i);
        assert!(r.push_one(&mut a, ma).applied().is_some());
        assert!(r.push_one(&mut b, mb).applied().is_some());
    }
    assert_eq!(r.fields_of(v)["legs_sets"], json!(21));
    // Putting a counter value instead of incrementing would lose concurrent increments.
    let reset = a.write("volume", v, MutationKind::Update, T0 + 9, |d, _| {
        d.automerge().put(automerge::ROOT, "legs_sets", 0i64).unwrap()
    });
    let o = r.push_one(&mut a, reset);
    assert!(errors(&o).iter().any(|e| e.field == "legs_sets"), "{o:?}");
    assert_eq!(r.fields_of(v)["legs_sets"], json!(21));
    // Counters are created with the entity: a create that leaves one out is refused, since two
    // devices creating it later would make two counters and lose one's increments.
    let partial = a.write(
        "volume",
        uuid::Uuid::from_bytes([8; 16]),
        MutationKind::Create,
        T0,
        |d, ty| {
            d.write_fields(ty, &obj(json!({"week": "2026-11-23", "legs_sets": 0})))
                .unwrap()
        },
    );
    let o = r.push_one(&mut a, partial);
    assert!(
        errors(&o)
            .iter()
            .any(|e| e.field == "core_sets" && e.rule == Rule::Required),
        "{o:?}"
    );
}

#[test]
fn lww_keeps_the_max_hlc_even_when_the_older_write_arrives_last() {
    let (mut r, mut phone, mut tablet, s) = settings_on_two_devices(json!({"units": "kg"}));
    // The tablet's clock is a day ahead: its edit is the later one by HLC though made "first".
    let newer = tablet.update("settings", s, json!({"units": "lb"}), T0 + 86_400_000);
    let older = phone.update("settings", s, json!({"units": "st"}), T0 + 1_000);
    assert!(r.push_one(&mut tablet, newer.clone()).applied().is_some());
    let o = r.push_one(&mut phone, older.clone());
    let Outcome::Applied { lww_lost, version, .. } = &o else {
        panic!("expected applied, got {o:?}")
    };
    assert_eq!(*version, 3, "the losing write is still applied to history");
    assert_eq!(lww_lost.len(), 1, "{lww_lost:?}");
    assert_eq!(lww_lost[0].field, "units");
    assert_eq!(lww_lost[0].loser_value, json!("st"));
    assert_eq!(lww_lost[0].winner_value, json!("lb"));
    assert_eq!(lww_lost[0].loser_device, phone.device_id);
    assert_eq!(r.fields_of(s)["units"], json!("lb"), "the max (HLC, device) stands");
    let archive = r.archive_rows();
    assert!(
        archive
            .iter()
            .any(|a| a.losing_json == "\"st\"" && a.winning_json == "\"lb\""),
        "{archive:?}"
    );

    // Both devices converge on the winner after pulling; the phone, whose own write lost,
    // receives the relay's settling change rather than an empty "own" entry.
    let entries = r.pull(&mut phone);
    assert!(
        entries
            .iter()
            .any(|e| matches!(e.payload, fieldsync_schema::FeedPayload::Changes(_))
                && e.origin.is_some_and(|o| o.device_id == phone.device_id)),
        "{entries:?}"
    );
    r.pull(&mut tablet);
    assert_eq!(phone.fields(s)["units"], json!("lb"));
    assert_eq!(tablet.fields(s)["units"], json!("lb"));
}

#[test]
fn lww_a_second_write_queued_offline_has_not_seen_what_arrived_meanwhile() {
    let (mut r, mut phone, mut tablet, s) = settings_on_two_devices(json!({"units": "kg"}));
    // Offline, the tablet queues two edits; the second's base counts the first (1, then 2).
    let t1 = tablet.update("settings", s, json!({"units": "st"}), T0 + 1_000);
    tablet.set_version(s, 2);
    let t2 = tablet.update("settings", s, json!({"units": "oz"}), T0 + 2_000);
    // Meanwhile the phone's edit, later by the clock, becomes version 2: the very number the
    // tablet's second edit names as its base, although the tablet never saw it.
    let p = phone.update("settings", s, json!({"units": "lb"}), T0 + 60_000);
    assert_eq!(r.push_one(&mut phone, p.clone()).applied().map(|a| a.0), Some(2));
    let results = r.push(&mut tablet, vec![t1, t2]);
    for res in &results {
        let Outcome::Applied { lww_lost, .. } = &res.outcome else {
            panic!("expected applied, got {:?}", res.outcome)
        };
        assert_eq!(
            lww_lost.len(),
            1,
            "both tablet edits lose to the later phone edit: {lww_lost:?}"
        );
        assert_eq!(lww_lost[0].winner_mutation, p.mutation_id);
    }
    assert_eq!(r.fields_of(s)["units"], json!("lb"));

    // A write that saw the winner replaces it without a loss, even with an earlier clock (a
    // device that received the record as a snapshot learns no stamps).
    r.pull(&mut tablet);
    let seen = tablet.update("settings", s, json!({"units": "g"}), T0 + 3_000);
    let o = r.push_one(&mut tablet, seen);
    let Outcome::Applied { lww_lost, .. } = &o else {
        panic!("expected applied, got {o:?}")
    };
    assert!(lww_lost.is_empty(), "{lww_lost:?}");
    assert_eq!(r.fields_of(s)["units"], json!("g"));
}

#[test]
fn lww_a_later_concurrent_winner_archives_the_earlier_value_and_tells_its_device() {
    let (mut r, mut phone, mut tablet, s) = settings_on_two_devices(json!({"units": "kg", "notifications": true}));
    let first = phone.update("settings", s, json!({"units": "st"}), T0 + 1_000);
    let second = tablet.update(
        "settings",
        s,
        json!({"units": "lb", "notifications": false}),
        T0 + 2_000,
    );
    r.push_one(&mut phone, first);
    r.push_one(&mut tablet, second);
    assert_eq!(r.fields_of(s)["units"], json!("lb"));
    assert_eq!(r.fields_of(s)["notifications"], json!(false));
    // The phone learns of its loss from the feed entry of the winning write.
    let entries = r.pull(&mut phone);
    let losses: Vec<_> = entries.iter().flat_map(|e| e.lww_losses.iter()).collect();
    assert!(
        losses
            .iter()
            .any(|l| l.loser_device == phone.device_id && l.loser_value == json!("st")),
        "{losses:?}"
    );
}

#[test]
fn lww_records_created_on_two_devices_offline_are_settled_by_the_clock() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut tablet = r.device("pat", 2);
    let id = uuid::Uuid::from_bytes([5; 16]);
    let on_phone = phone.write("settings", id, MutationKind::Create, T0 + 1_000, |d, ty| {
        d.write_fields(ty, &obj(json!({"units": "kg", "notifications": true})))
            .unwrap()
    });
    let on_tablet = tablet.write("settings", id, MutationKind::Create, T0 + 2_000, |d, ty| {
        d.write_fields(ty, &obj(json!({"units": "lb"}))).unwrap()
    });
    assert_eq!(applied_version(&r.push_one(&mut phone, on_phone)), 1);
    assert_eq!(
        applied_version(&r.push_one(&mut tablet, on_tablet)),
        2,
        "no conflict prompt for LWW"
    );
    assert_eq!(r.fields_of(id)["units"], json!("lb"), "the later clock wins");
    assert_eq!(
        r.fields_of(id)["notifications"],
        json!(true),
        "fields only one side wrote stay"
    );
    let archive = r.archive_rows();
    assert!(archive.iter().any(|a| a.losing_json == "\"kg\""), "{archive:?}");
}

#[test]
fn lww_delete_versus_edit_is_decided_by_the_clock() {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut tablet = r.device("pat", 2);
    let (s, m) = phone.create("journal_entry", json!({"date": "2026-11-22", "pain_level": 3}), T0);
    r.push_one(&mut phone, m);
    r.pull(&mut tablet);
    // The delete is older than a concurrent edit: the edit resurrects the entry.
    let del = phone.delete("journal_entry", s, T0 + 1_000);
    let edit = tablet.update("journal_entry", s, json!({"pain_level": 5}), T0 + 2_000);
    r.push_one(&mut phone, del);
    assert!(r.document_row(s).deleted);
    let o = r.push_one(&mut tablet, edit);
    assert!(o.applied().is_some(), "{o:?}");
    let row = r.document_row(s);
    assert!(!row.deleted, "the later edit wins over the earlier delete");
    assert_eq!(r.fields_of(s)["pain_level"], json!(5));
}

#[test]
fn delete_versus_edit_of_a_gated_record_is_a_conflict() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let mut b = r.device("sam", 2);
    let (_, s) = patient_and_session(&mut r, &mut a);
    r.pull(&mut b);
    let del = a.delete("session", s, T0 + 1);
    assert!(r.push_one(&mut a, del).applied().is_some());
    let edit = b.update("session", s, json!({"status": "completed"}), T0 + 2);
    let o = r.push_one(&mut b, edit);
    assert!(
        matches!(
            o,
            Outcome::Conflict {
                reason: fieldsync_schema::ConflictReason::Deleted,
                ..
            }
        ),
        "{o:?}"
    );
    assert!(r.document_row(s).deleted, "the delete stands");
    // Even an edit on the current version is a conflict once the record is deleted.
    r.adopt(&mut b, s);
    let edit = b.update("session", s, json!({"status": "cancelled"}), T0 + 3);
    assert!(matches!(
        r.push_one(&mut b, edit),
        Outcome::Conflict {
            reason: ConflictReason::Deleted,
            ..
        }
    ));
    // The delete is a tombstone: the row and its history remain.
    assert!(r.document_row(s).deleted);
    assert_eq!(r.fields_of(s)["status"], json!("planned"));
}

#[test]
fn a_locked_intake_form_rejects_every_later_change() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let (p, _) = patient_and_session(&mut r, &mut a);
    let (f, m) = a.create(
        "intake_form",
        json!({"patient_id": p.to_string(), "answers": "No allergies."}),
        T0,
    );
    r.push_one(&mut a, m);
    let lock = a.lock("intake_form", f, T0 + 1);
    assert_eq!(applied_version(&r.push_one(&mut a, lock)), 2);
    let edit = a.update(
        "intake_form",
        f,
        json!({"submitted_at": "2026-11-22T10:00:00Z"}),
        T0 + 2,
    );
    assert!(matches!(r.push_one(&mut a, edit), Outcome::RejectedLocked { .. }));
    assert_eq!(r.version_of(f), 2);
}

#[test]
fn append_only_server_owned_and_roles() {
    let mut r = clinic();
    let mut pat = r.device("pat", 1);
    let mut dana = r.device("dana", 2);
    let mut svc = r.device("svc", 3);
    let (c, m) = pat.create("checkin", json!({"date": "2026-11-22", "soreness": 3}), T0);
    r.push_one(&mut pat, m);
    let edit = pat.update("checkin", c, json!({"soreness": 4}), T0 + 1);
    forbidden_because(r.push_one(&mut pat, edit), "append-only");
    assert_eq!(r.fields_of(c)["soreness"], json!(3), "the entry is unchanged");

    let (_, m) = dana.create("exercise", json!({"name": "Squat"}), T0);
    forbidden_because(r.push_one(&mut dana, m), "role `clinician` may not write `exercise`");
    let (_, m) = svc.create("plan", json!({"name": "Base block"}), T0);
    assert!(r.push_one(&mut svc, m).applied().is_some());

    // A patient may not create clinical records.
    let documents = r.counts().documents;
    let (_, m) = pat.create("patient", json!({"name": "Eve"}), T0);
    forbidden_because(r.push_one(&mut pat, m), "role `patient` may not write `patient`");
    assert_eq!(r.counts().documents, documents, "nothing was created");
}

#[test]
fn validation_runs_on_the_merged_result_with_refs_checked_in_the_space() {
    let mut r = clinic();
    r.space("gym");
    r.user("gus", "gym", Role::Clinician);
    let mut a = r.device("dana", 1);
    let mut g = r.device("gus", 2);
    let (p, _) = patient_and_session(&mut r, &mut a);
    // A session pointing at a patient that does not exist.
    let (_, m) = a.create(
        "session",
        json!({"patient_id": uuid::Uuid::from_bytes([3; 16]).to_string(), "started_at": "2026-11-22T09:00:00Z"}),
        T0,
    );
    let o = r.push_one(&mut a, m);
    assert!(
        errors(&o)
            .iter()
            .any(|e| e.field == "patient_id" && e.rule == Rule::Ref),
        "{o:?}"
    );
    // A set without exercise_id or exercise_name, and an out-of-range rpe: both reported.
    let (_, s) = patient_and_session(&mut r, &mut a);
    let (_, m) = a.create("set", json!({"session_id": s.to_string(), "rpe": 12}), T0);
    let o = r.push_one(&mut a, m);
    let e = errors(&o);
    assert!(
        e.iter()
            .any(|e| e.field == "exercise_name" && e.rule == Rule::RequiredUnless),
        "{o:?}"
    );
    assert!(e.iter().any(|e| e.field == "rpe" && e.rule == Rule::Max), "{o:?}");
    // A patient of another space is not a valid reference.
    let (_, m) = g.create(
        "session",
        json!({"patient_id": p.to_string(), "started_at": "2026-11-22T09:00:00Z"}),
        T0,
    );
    let o = r.push_one(&mut g, m);
    assert!(
        errors(&o)
            .iter()
            .any(|e| e.field == "patient_id" && e.rule == Rule::Ref),
        "{o:?}"
    );
}

#[test]
fn the_first_blocking_failure_stops_the_batch() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let (p1, m1) = a.create("patient", json!({"name": "One"}), T0);
    let (_, bad) = a.create("patient", json!({}), T0);
    let (p3, m3) = a.create("patient", json!({"name": "Three"}), T0);
    let results = r.push(&mut a, vec![m1, bad, m3]);
    assert!(results[0].outcome.applied().is_some());
    assert!(matches!(results[1].outcome, Outcome::Invalid { .. }));
    assert_eq!(results[2].outcome, Outcome::NotAttempted);
    assert_eq!(r.version_of(p1), 1);
    assert_eq!(r.version_of(p3), 0, "not attempted means not applied");
}

#[test]
fn changes_must_be_the_senders_own_and_touch_only_what_the_kind_allows() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let mut b = r.device("sam", 2);
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    let stolen = m.changes.clone();
    r.push_one(&mut a, m);
    r.pull(&mut b);
    // B replays A's change inside its own signed envelope.
    let mut forged = b.update("patient", p, json!({"mrn": "X"}), T0 + 1);
    forged.changes = stolen;
    b.key.sign_mutation(&mut forged);
    forbidden_because(r.push_one(&mut b, forged), "was not authored by the sending device");
    assert!(
        !r.fields_of(p).contains_key("mrn"),
        "nothing of the forged update landed"
    );
    r.adopt(&mut b, p);
    // An update that flips the tombstone is not a delete.
    let sneaky = b.write("patient", p, MutationKind::Update, T0 + 2, |d, _| {
        d.set_deleted(true).unwrap()
    });
    let o = r.push_one(&mut b, sneaky);
    assert!(errors(&o).iter().any(|e| e.field == "_deleted"), "{o:?}");
    assert!(!r.document_row(p).deleted);
}
