//! Refused edits (discard, addendum), stale signatures and LWW undo.

use fieldsync_schema::wire::{FeedEntry, FeedPayload, MutationResult, PullCursor};
use fieldsync_schema::{ConflictReason, FieldError, Hlc, LwwLoss, Mutation, MutationKind, Outcome, Rule, TimeSource};
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;

#[test]
fn a_refused_edit_of_a_signed_note_is_kept_the_note_returns_to_the_relay_and_becomes_an_addendum() {
    let mut f = enrolled(7);
    let patient = f.patient("Ada");
    let note = f
        .dev
        .put(
            "note",
            None,
            obj(json!({"patient_id": patient.to_string(), "body": "Knee stable."})),
        )
        .unwrap()
        .entity_id;
    push_all_applied(&mut f, 1);
    f.dev.edit_note(note, "Knee stable. Add balance work.").unwrap();
    let other = f.patient("Behind the refusal");
    push(&mut f, |b| {
        vec![
            MutationResult {
                mutation_id: b[0].mutation_id,
                outcome: Outcome::RejectedImmutable {
                    reason: "note is signed".into(),
                },
            },
            MutationResult {
                mutation_id: b[1].mutation_id,
                outcome: Outcome::NotAttempted,
            },
        ]
    });
    let e = f.dev.get(note).unwrap().unwrap();
    assert_eq!(
        e.fields["body"],
        json!("Knee stable."),
        "the local note is the relay's again"
    );
    assert_eq!(e.sync_state, SyncState::Rejected);
    let status = f.dev.status().unwrap();
    assert_eq!(status.state, SyncStatus::Blocked);
    assert_eq!(status.blocked.as_ref().unwrap().outcome, "rejected_immutable");
    let rejected = f.dev.rejections().unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].fields["body"], json!("Knee stable. Add balance work."));
    assert_eq!(rejected[0].options, vec!["discard", "addendum"]);
    assert!(
        matches!(f.dev.resolve(note, Resolution::KeepMine), Err(PeerError::Resolution(m)) if m.contains("addendum"))
    );

    let add = f.dev.make_addendum(note).unwrap();
    let addendum = f.dev.get(add.entity_id).unwrap().unwrap();
    assert_eq!(
        addendum.fields,
        obj(
            json!({"patient_id": patient.to_string(), "addendum_to": note.to_string(), "body": "Knee stable. Add balance work."})
        )
    );
    assert!(f.dev.rejections().unwrap().is_empty());
    let status = f.dev.status().unwrap();
    assert_eq!(
        (status.state, status.unsynced),
        (SyncStatus::Offline, 3),
        "refused edit + later write + addendum"
    );
    let sent = push_all_applied(&mut f, 1);
    assert_eq!(
        sent.iter().map(|m| m.entity_id).collect::<Vec<_>>(),
        vec![other, add.entity_id]
    );
    assert_eq!(f.dev.status().unwrap().unsynced, 0);
    assert_eq!(f.dev.get(note).unwrap().unwrap().sync_state, SyncState::Synced);
}

#[test]
fn discarding_is_explicit_and_a_refused_create_disappears_as_a_local_tombstone() {
    let mut f = enrolled(8);
    let p = f.patient("Never accepted");
    let later = f.patient("Later");
    push(&mut f, |b| {
        vec![
            MutationResult {
                mutation_id: b[0].mutation_id,
                outcome: Outcome::Invalid {
                    errors: vec![FieldError::new("name", Rule::Format, "bad")],
                },
            },
            MutationResult {
                mutation_id: b[1].mutation_id,
                outcome: Outcome::NotAttempted,
            },
        ]
    });
    assert_eq!(f.dev.get(p).unwrap().unwrap().fields["name"], json!("Never accepted"));
    assert_eq!(f.dev.rejections().unwrap()[0].options, vec!["discard"]);
    assert!(f.dev.make_addendum(p).is_err());
    assert_eq!(f.dev.status().unwrap().unsynced, 2);
    let report = f.dev.discard_rejection(p).unwrap();
    assert_eq!(report.values["name"], json!("Never accepted"));
    assert_eq!(report.discarded.len(), 1);
    let e = f.dev.get(p).unwrap().unwrap();
    assert!(e.deleted);
    assert_eq!(f.dev.status().unwrap().unsynced, 1, "only the later write is left");
    let sent = push_all_applied(&mut f, 1);
    assert_eq!(sent.iter().map(|m| m.entity_id).collect::<Vec<_>>(), vec![later]);
    assert!(matches!(f.dev.discard_rejection(p), Err(PeerError::Resolution(_))));
}

#[test]
fn a_conflict_of_values_is_never_discarded_and_a_stale_signature_only_is() {
    let mut f = enrolled(9);
    let (id, _) = workout_conflict(&mut f, json!({"notes": "mine"}), json!({"notes": "theirs"}));
    assert!(matches!(f.dev.discard_rejection(id), Err(PeerError::Resolution(m)) if m.contains("resolved")));

    let mut g = enrolled(10);
    let patient = g.patient("Ada");
    let note = g
        .dev
        .put(
            "note",
            None,
            obj(json!({"patient_id": patient.to_string(), "body": "v1"})),
        )
        .unwrap()
        .entity_id;
    push_all_applied(&mut g, 1);
    let base = g.dev.document_bytes(note).unwrap();
    g.dev.sign_note(note).unwrap();
    let edit = their_change(&base, |d| d.set_text("body", "v1, edited").unwrap());
    push(&mut g, |b| {
        vec![conflict(&b[0], 2, edit.clone(), ConflictReason::StaleBase)]
    });
    let c = g.dev.conflicts().unwrap().remove(0);
    assert_eq!((c.kind, c.options.clone()), (MutationKind::Sign, vec!["discard"]));
    assert!(
        matches!(g.dev.resolve(note, Resolution::KeepMine), Err(PeerError::Resolution(m)) if m.contains("sign again"))
    );
    g.dev.discard_rejection(note).unwrap();
    let e = g.dev.get(note).unwrap().unwrap();
    assert!(!e.signed, "the stale signature is gone");
    assert_eq!(e.fields["body"], json!("v1, edited"));
    assert_eq!(g.dev.status().unwrap().unsynced, 0);
    g.dev.sign_note(note).unwrap();
    assert_eq!(g.dev.envelope_of_last().base_version, Some(2));
}

impl crate::Device {
    fn envelope_of_last(&self) -> Mutation {
        let last = self.queue(false).unwrap().pop().unwrap();
        self.envelope(last.mutation_id).unwrap().unwrap()
    }
}

#[test]
fn an_lww_loss_is_undone_by_a_new_write_within_24_hours_and_refused_after() {
    let mut f = enrolled(11);
    let s = f
        .dev
        .put("settings", None, obj(json!({"units": "lb"})))
        .unwrap()
        .entity_id;
    push_all_applied(&mut f, 1);
    f.dev
        .update("settings", s, obj(json!({"units": "kg", "notifications": true})))
        .unwrap();
    let me = f.dev.device_id();
    let stamp = |ms, device| Hlc {
        physical_ms: ms,
        counter: 0,
        device,
    };
    push(&mut f, |b| {
        let loss = |field: &str, mine: Value, winner: Value| LwwLoss {
            entity_type: "settings".into(),
            entity_id: s,
            field: field.into(),
            loser_device: me,
            loser_mutation: b[0].mutation_id,
            loser_hlc: b[0].client_timestamp,
            loser_value: mine,
            winner_device: OTHER,
            winner_mutation: Uuid::from_bytes([3; 16]),
            winner_hlc: stamp(T0 + 10_000_000, OTHER),
            winner_value: winner,
        };
        vec![MutationResult {
            mutation_id: b[0].mutation_id,
            outcome: Outcome::Applied {
                version: 3,
                seq: 3,
                duplicate_of: None,
                lww_lost: vec![
                    loss("units", json!("kg"), json!("st")),
                    loss("notifications", json!(true), json!(false)),
                ],
            },
        }]
    });
    let records = f.dev.lww_loss_records().unwrap();
    assert_eq!(records.len(), 2);
    // Until the relay's settlement is pulled, the record here still shows the lost values.
    let units = records.iter().find(|r| r.loss.field == "units").unwrap().loss_id;
    assert!(matches!(f.dev.undo_lww_loss(units), Err(PeerError::Resolution(m)) if m.contains("sync first")));
    let bytes = f.dev.document_bytes(s).unwrap();
    let settlement = their_patch(&bytes, "settings", json!({"units": "st", "notifications": false}));
    let entry = FeedEntry {
        seq: 3,
        space_id: crate::testutil::space(),
        entity_type: "settings".into(),
        entity_id: s,
        version: 3,
        payload: FeedPayload::Changes(vec![settlement]),
        origin: None,
        lww_losses: vec![],
    };
    f.dev
        .apply_feed(&[entry], PullCursor::at(crate::testutil::space(), 3), f.time.now_ms())
        .unwrap();
    assert_eq!(f.dev.get(s).unwrap().unwrap().fields["units"], json!("st"));
    let units = records.iter().find(|r| r.loss.field == "units").unwrap().clone();
    assert_eq!(units.undo_until_ms, units.recorded_at_ms + UNDO_WINDOW_MS);
    f.time.advance(UNDO_WINDOW_MS - 1);
    let r = f.dev.undo_lww_loss(units.loss_id).unwrap();
    let env = f.dev.envelope(r.mutation_id.unwrap()).unwrap().unwrap();
    assert_eq!(env.kind, MutationKind::Update);
    assert!(env.client_timestamp > units.loss.loser_hlc, "a fresh clock, so it wins");
    let undone = f
        .dev
        .lww_loss_records()
        .unwrap()
        .into_iter()
        .find(|x| x.loss_id == units.loss_id)
        .unwrap();
    assert_eq!(undone.undo_mutation, r.mutation_id);
    assert!(matches!(f.dev.undo_lww_loss(units.loss_id), Err(PeerError::Resolution(m)) if m.contains("already")));
    let other = records.iter().find(|r| r.loss.field == "notifications").unwrap();
    f.time.advance(2);
    let err = f.dev.undo_lww_loss(other.loss_id).unwrap_err().to_string();
    assert!(err.contains("24 hours"), "{err}");
}
