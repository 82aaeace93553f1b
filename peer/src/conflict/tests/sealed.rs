//! Conflicts on records that were signed or locked on the relay meanwhile: only the options
//! that will be accepted are offered, and each offered option is accepted (seed 2114 of the
//! simulator: an intake form locked elsewhere offered keep-mine, keep-theirs and merged, and
//! refused all three).

use fieldsync_schema::document::NoteSignature;
use fieldsync_schema::wire::{FeedEntry, FeedPayload, PullCursor};

use super::*;

/// An intake form at relay version 1, edited here while another device locked it on the relay.
fn locked_form_conflict(f: &mut Fixture) -> Uuid {
    let patient = f.patient("Ada");
    let form = f
        .dev
        .put(
            "intake_form",
            None,
            obj(json!({"patient_id": patient.to_string(), "answers": "pain: knee"})),
        )
        .unwrap()
        .entity_id;
    push_all_applied(f, 1);
    let base = f.dev.document_bytes(form).unwrap();
    f.time.advance(1_000);
    f.dev
        .update(
            "intake_form",
            form,
            obj(json!({"submitted_at": "2026-11-30T10:00:00Z"})),
        )
        .unwrap();
    f.dev
        .edit_text("intake_form", form, "answers", "pain: left knee")
        .unwrap();
    let lock = their_patch(&base, "intake_form", json!({"locked": true}));
    push(f, |b| vec![conflict(&b[0], 2, lock.clone(), ConflictReason::StaleBase)]);
    form
}

#[test]
fn a_conflict_on_a_record_locked_on_the_relay_offers_only_discard_and_discard_is_accepted() {
    let mut f = enrolled(21);
    let form = locked_form_conflict(&mut f);
    let later = f.patient("Queued behind the conflict");
    let c = f.dev.conflicts().unwrap().remove(0);
    assert_eq!(c.options, vec!["discard"], "only what will be accepted is offered");
    for r in [
        Resolution::KeepMine,
        Resolution::KeepTheirs,
        Resolution::Merged(obj(json!({}))),
    ] {
        assert!(matches!(f.dev.resolve(form, r), Err(PeerError::Resolution(m)) if m.contains("--discard")));
    }
    assert!(f.dev.make_addendum(form).is_err(), "an intake form has no addendum");
    let report = f.dev.discard_rejection(form).unwrap();
    assert_eq!(
        report.discarded.len(),
        1,
        "both edits, combined into one item before the first send"
    );
    assert_eq!(
        report.values["answers"],
        json!("pain: left knee"),
        "the user sees what was dropped"
    );
    let e = f.dev.get(form).unwrap().unwrap();
    assert!(e.locked, "the form shows the relay's state");
    assert_eq!(e.fields["answers"], json!("pain: knee"));
    assert!(f.dev.conflicts().unwrap().is_empty());
    // The outbox moves on to the write queued behind the conflict.
    let status = f.dev.status().unwrap();
    assert_ne!(status.state, SyncStatus::Blocked);
    let sent = push_all_applied(&mut f, 1);
    assert_eq!(sent.iter().map(|m| m.entity_id).collect::<Vec<_>>(), vec![later]);
    assert_eq!(f.dev.status().unwrap().unsynced, 0);
}

#[test]
fn a_conflict_that_becomes_locked_by_a_later_pull_changes_its_options() {
    let mut f = enrolled(22);
    let patient = f.patient("Ada");
    let form = f
        .dev
        .put(
            "intake_form",
            None,
            obj(json!({"patient_id": patient.to_string(), "answers": "a"})),
        )
        .unwrap()
        .entity_id;
    push_all_applied(&mut f, 1);
    let base = f.dev.document_bytes(form).unwrap();
    f.dev.edit_text("intake_form", form, "answers", "mine").unwrap();
    let theirs = their_change(&base, |d| d.set_text("answers", "theirs").unwrap());
    push(&mut f, |b| {
        vec![conflict(&b[0], 2, theirs.clone(), ConflictReason::StaleBase)]
    });
    assert_eq!(
        f.dev.conflicts().unwrap()[0].options,
        vec!["keep_mine", "keep_theirs", "merged"]
    );
    // Another device locks the form; the pull delivers it before the user decides.
    let mut relay_doc = EntityDoc::load(&base, device_actor(OTHER)).unwrap();
    relay_doc.apply(vec![parse_change(&theirs.0).unwrap()]).unwrap();
    let ty = Schema::default_schema().entity_type("intake_form").unwrap().clone();
    relay_doc.write_fields(&ty, &obj(json!({"locked": true}))).unwrap();
    let lock = relay_doc.commit(T0 + 90_000).unwrap();
    let entry = FeedEntry {
        seq: 3,
        space_id: crate::testutil::space(),
        entity_type: "intake_form".into(),
        entity_id: form,
        version: 3,
        payload: FeedPayload::Changes(vec![Bytes(lock.raw_bytes().to_vec())]),
        origin: None,
        lww_losses: vec![],
    };
    let now = f.time.now_ms();
    f.dev
        .apply_feed(&[entry], PullCursor::at(crate::testutil::space(), 3), now)
        .unwrap();
    let c = f.dev.conflicts().unwrap().remove(0);
    assert_eq!(c.options, vec!["discard"]);
    assert!(f.dev.resolve(form, Resolution::KeepMine).is_err());
    f.dev.discard_rejection(form).unwrap();
    assert!(f.dev.get(form).unwrap().unwrap().locked);
}

#[test]
fn an_edit_of_a_note_signed_on_the_relay_meanwhile_offers_discard_and_addendum_and_both_work() {
    for addendum in [true, false] {
        let mut f = enrolled(if addendum { 23 } else { 24 });
        let patient = f.patient("Ada");
        let note = f
            .dev
            .put(
                "note",
                None,
                obj(json!({"patient_id": patient.to_string(), "body": "v1"})),
            )
            .unwrap()
            .entity_id;
        push_all_applied(&mut f, 1);
        let base = f.dev.document_bytes(note).unwrap();
        // The relay deleted the note; this device edits it: a delete-versus-edit conflict.
        f.dev.edit_note(note, "v1 and my addition").unwrap();
        let deleted = their_change(&base, |d| d.set_deleted(true).unwrap());
        push(&mut f, |b| {
            vec![conflict(&b[0], 2, deleted.clone(), ConflictReason::Deleted)]
        });
        assert_eq!(
            f.dev.conflicts().unwrap()[0].options,
            vec!["keep_mine", "keep_theirs", "merged"]
        );
        // Someone restores and signs it on the relay; the pull brings both.
        let mut relay_doc = EntityDoc::load(&base, device_actor(OTHER)).unwrap();
        relay_doc.apply(vec![parse_change(&deleted.0).unwrap()]).unwrap();
        relay_doc.set_deleted(false).unwrap();
        relay_doc
            .set_signature(&NoteSignature {
                signer_user: OTHER_USER,
                signer_device: OTHER,
                signed_at_ms: T0 + 90_000,
                content_hash: "00".repeat(32),
                signature: "00".repeat(64),
            })
            .unwrap();
        let sign = relay_doc.commit(T0 + 90_000).unwrap();
        let entry = FeedEntry {
            seq: 4,
            space_id: crate::testutil::space(),
            entity_type: "note".into(),
            entity_id: note,
            version: 4,
            payload: FeedPayload::Changes(vec![Bytes(sign.raw_bytes().to_vec())]),
            origin: None,
            lww_losses: vec![],
        };
        let now = f.time.now_ms();
        f.dev
            .apply_feed(&[entry], PullCursor::at(crate::testutil::space(), 4), now)
            .unwrap();
        let c = f.dev.conflicts().unwrap().remove(0);
        assert_eq!(c.options, vec!["discard", "addendum"]);
        assert!(f.dev.resolve(note, Resolution::KeepTheirs).is_err());
        if addendum {
            let w = f.dev.make_addendum(note).unwrap();
            let a = f.dev.get(w.entity_id).unwrap().unwrap();
            assert_eq!(
                a.fields["body"],
                json!("v1 and my addition"),
                "the refused text lives on"
            );
            assert_eq!(a.fields["addendum_to"], json!(note.to_string()));
            assert_eq!(a.fields["patient_id"], json!(patient.to_string()));
        } else {
            f.dev.discard_rejection(note).unwrap();
        }
        assert!(f.dev.conflicts().unwrap().is_empty());
        let e = f.dev.get(note).unwrap().unwrap();
        assert!(e.signed);
        assert_eq!(e.fields["body"], json!("v1"), "the signed note shows the relay's text");
        assert_ne!(f.dev.status().unwrap().state, SyncStatus::Blocked);
    }
}
