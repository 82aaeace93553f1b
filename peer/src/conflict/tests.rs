//! Conflict records, resolutions, rejections and LWW undo, with hand-built relay answers (no
//! relay needed). The end-to-end versions over the real relay are in `tests/tests/conflicts.rs`.

use fieldsync_schema::document::{actor_device, device_actor, parse_change};
use fieldsync_schema::wire::MutationResult;
use fieldsync_schema::{
    Bytes, ConflictReason, EntityDoc, Hlc, Mutation, MutationKind, Origin, Outcome, Role, Schema, TimeSource,
};
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;
use crate::testutil::{Fixture, T0, enroll, obj};
use crate::{OutboxState, SyncState, SyncStatus};

mod rejections;
mod sealed;

pub(super) const OTHER: Uuid = Uuid::from_bytes([0xbb; 16]);
pub(super) const OTHER_USER: Uuid = Uuid::from_bytes([0xcc; 16]);

pub(super) fn enrolled(seed: u64) -> Fixture {
    let mut f = Fixture::new(seed);
    enroll(&mut f.dev, Role::Clinician);
    f
}

pub(super) fn applied(id: Uuid, version: u64) -> MutationResult {
    MutationResult {
        mutation_id: id,
        outcome: Outcome::Applied {
            version,
            seq: version,
            duplicate_of: None,
            lww_lost: vec![],
        },
    }
}

/// Pushes what the outbox would send now and applies `answer` for it; returns what was sent.
pub(super) fn push(f: &mut Fixture, answer: impl FnOnce(&[Mutation]) -> Vec<MutationResult>) -> Vec<Mutation> {
    let now = f.time.now_ms();
    let batch = f.dev.pushable(now, 256).unwrap();
    let ids: Vec<Uuid> = batch.iter().map(|m| m.mutation_id).collect();
    f.dev.mark_sent(&ids, now).unwrap();
    let results = answer(&batch);
    f.dev.apply_push_results(&ids, &results, now).unwrap();
    batch
}

/// Pushes everything queued and has the relay apply all of it at `version`.
pub(super) fn push_all_applied(f: &mut Fixture, version: u64) -> Vec<Mutation> {
    push(f, |b| b.iter().map(|m| applied(m.mutation_id, version)).collect())
}

/// Another device's change to the relay's copy `base` of an entity.
pub(super) fn their_change(base: &[u8], edit: impl FnOnce(&mut EntityDoc)) -> Bytes {
    let mut doc = EntityDoc::load(base, device_actor(OTHER)).unwrap();
    edit(&mut doc);
    Bytes(doc.commit(T0 + 60_000).unwrap().raw_bytes().to_vec())
}

pub(super) fn their_patch(base: &[u8], entity_type: &str, patch: Value) -> Bytes {
    let schema = Schema::default_schema();
    let ty = schema.entity_type(entity_type).unwrap().clone();
    their_change(base, |d| d.write_fields(&ty, &obj(patch)).unwrap())
}

pub(super) fn conflict(m: &Mutation, server_version: u64, change: Bytes, reason: ConflictReason) -> MutationResult {
    MutationResult {
        mutation_id: m.mutation_id,
        outcome: Outcome::Conflict {
            server_version,
            server_changes: vec![change],
            reason,
            authors: vec![Origin {
                device_id: OTHER,
                user_id: OTHER_USER,
                mutation_id: Uuid::from_bytes([0xdd; 16]),
                hlc: Hlc {
                    physical_ms: T0 + 60_000,
                    counter: 0,
                    device: OTHER,
                },
            }],
        },
    }
}

/// A workout at relay version 1, edited here (`mine`) and on the relay (`theirs`, version 2):
/// returns (id, the conflicted mutation).
pub(super) fn workout_conflict(f: &mut Fixture, mine: Value, theirs: Value) -> (Uuid, Mutation) {
    let id = f
        .dev
        .put("workout", None, obj(json!({"name": "Push day", "notes": "warm-up"})))
        .unwrap()
        .entity_id;
    push_all_applied(f, 1);
    let base = f.dev.document_bytes(id).unwrap();
    f.time.advance(1_000);
    f.dev.update("workout", id, obj(mine)).unwrap();
    let theirs = their_patch(&base, "workout", theirs);
    let sent = push(f, |b| {
        vec![conflict(&b[0], 2, theirs.clone(), ConflictReason::StaleBase)]
    });
    (id, sent[0].clone())
}

pub(super) fn field<'a>(c: &'a ConflictRecord, name: &str) -> &'a FieldConflict {
    c.fields
        .iter()
        .find(|x| x.field == name)
        .unwrap_or_else(|| panic!("no field {name}: {c:#?}"))
}

#[test]
fn a_conflict_shows_base_mine_and_theirs_field_by_field_with_who_and_when() {
    let mut f = enrolled(1);
    let (id, m) = workout_conflict(
        &mut f,
        json!({"notes": "Bench 3x225, Squat 3x315", "rpe": 8.0}),
        json!({"notes": "Bench 3x225", "duration_min": 45}),
    );
    let e = f.dev.get(id).unwrap().unwrap();
    assert_eq!((e.sync_state, e.relay_version), (SyncState::Conflict, 2));
    let status = f.dev.status().unwrap();
    assert_eq!(status.state, SyncStatus::Blocked);
    let blocked = status.blocked.unwrap();
    assert_eq!((blocked.entity_id, blocked.outcome.as_str()), (id, "conflict"));
    assert!(blocked.reason.contains("changed on the relay"), "{}", blocked.reason);

    let all = f.dev.conflicts().unwrap();
    assert_eq!(all.len(), 1);
    let c = &all[0];
    assert_eq!(
        (c.entity_id, c.mutation_id, c.reason),
        (id, m.mutation_id, ConflictReason::StaleBase)
    );
    assert_eq!((c.base_version, c.server_version, c.relay_version), (Some(1), 2, 2));
    assert_eq!(c.base.fields, obj(json!({"name": "Push day", "notes": "warm-up"})));
    assert_eq!(
        c.mine.fields,
        obj(json!({"name": "Push day", "notes": "Bench 3x225, Squat 3x315", "rpe": 8.0}))
    );
    assert_eq!(
        c.theirs.fields,
        obj(json!({"name": "Push day", "notes": "Bench 3x225", "duration_min": 45}))
    );
    let notes = field(c, "notes");
    assert_eq!(notes.status, FieldStatus::Contested);
    assert_eq!(notes.base, json!("warm-up"));
    let mine_by = notes.mine.by.clone().unwrap();
    assert_eq!(
        (mine_by.device_id, mine_by.user_id, mine_by.mutation_id),
        (
            Some(f.dev.device_id()),
            Some(Uuid::from_bytes([0x11; 16])),
            Some(m.mutation_id)
        )
    );
    assert_eq!(mine_by.at_ms, m.client_timestamp.physical_ms);
    let theirs_by = notes.theirs.by.clone().unwrap();
    assert_eq!(
        (theirs_by.device_id, theirs_by.user_id, theirs_by.at_ms),
        (Some(OTHER), Some(OTHER_USER), T0 + 60_000)
    );
    assert_eq!(field(c, "rpe").status, FieldStatus::Mine);
    assert!(field(c, "rpe").theirs.by.is_none());
    assert_eq!(field(c, "duration_min").status, FieldStatus::Theirs);
    assert_eq!(field(c, "name").status, FieldStatus::Unchanged);
    assert!(c.fields.iter().all(|x| x.field != "_deleted"), "nobody deleted it");
    assert_eq!(c.carried_mutations, vec![m.mutation_id]);
    assert_eq!(c.options, vec!["keep_mine", "keep_theirs", "merged"]);
}

#[test]
fn keep_theirs_is_one_change_on_top_of_both_carrying_every_unconfirmed_change_in_the_conflicts_place() {
    let mut f = enrolled(2);
    let (id, m) = workout_conflict(&mut f, json!({"notes": "mine"}), json!({"notes": "theirs"}));
    // Local writes keep working while blocked: one more to the workout, one to another record.
    let q = f.dev.update("workout", id, obj(json!({"rpe": 7.0}))).unwrap();
    let other = f.patient("Queued behind");
    assert_eq!(f.dev.status().unwrap().unsynced, 3);
    assert!(f.dev.pushable(f.time.now_ms(), 256).unwrap().is_empty(), "halted");

    let r = f.dev.resolve(id, Resolution::KeepTheirs).unwrap();
    let rid = r.mutation_id.unwrap();
    assert_eq!(r.kind, MutationKind::Resolve);
    let resolution = f.dev.envelope(rid).unwrap().unwrap();
    assert_eq!(resolution.base_version, Some(2), "based on the relay's current version");
    // Carried: the refused change, the one queued behind it, then the resolution.
    let q_env = f.dev.envelope(q.mutation_id.unwrap()).unwrap().unwrap();
    let mut expected = m.changes.clone();
    expected.extend(q_env.changes.clone());
    assert_eq!(&resolution.changes[..2], &expected[..]);
    assert_eq!(resolution.changes.len(), 3);
    // The write queued behind the conflict was made on the merged document, so the decision
    // on top of it sits on top of both sides.
    let decision = parse_change(&resolution.changes[2].0).unwrap();
    let queued = parse_change(&q_env.changes[0].0).unwrap();
    assert_eq!(decision.deps(), [queued.hash()]);
    assert_eq!(queued.deps().len(), 2, "mine and theirs");
    assert_eq!(actor_device(decision.actor_id()), Some(f.dev.device_id()));
    assert_eq!(f.dev.get(id).unwrap().unwrap().heads, vec![decision.hash().to_string()]);

    let e = f.dev.get(id).unwrap().unwrap();
    assert_eq!(e.fields, obj(json!({"name": "Push day", "notes": "theirs"})));
    assert_eq!(e.sync_state, SyncState::Pending);
    assert!(f.dev.conflicts().unwrap().is_empty());
    let items = f.dev.queue(true).unwrap();
    let state_of = |mid: Uuid| items.iter().find(|i| i.mutation_id == mid).unwrap().clone();
    assert_eq!(state_of(m.mutation_id).state, OutboxState::Superseded);
    assert_eq!(state_of(m.mutation_id).superseded_by, Some(rid));
    assert_eq!(state_of(q.mutation_id.unwrap()).superseded_by, Some(rid));
    // Nothing lost yet: the carried items count until the relay confirms the resolution.
    let status = f.dev.status().unwrap();
    assert_eq!((status.state, status.unsynced), (SyncStatus::Offline, 4));
    // The resolution goes first, where the conflict stood; then the later write.
    let next: Vec<Uuid> = f
        .dev
        .pushable(f.time.now_ms(), 256)
        .unwrap()
        .iter()
        .map(|m| m.mutation_id)
        .collect();
    assert_eq!(next.len(), 2);
    assert_eq!(next[0], rid);
    assert_eq!(f.dev.envelope(next[1]).unwrap().unwrap().entity_id, other);
    // `queue` lists in push order: the resolution right after the item it replaced.
    let listed: Vec<Uuid> = f.dev.queue(false).unwrap().iter().map(|i| i.mutation_id).collect();
    assert_eq!(listed[..2], [m.mutation_id, rid]);
    push(&mut f, |b| {
        vec![applied(b[0].mutation_id, 3), applied(b[1].mutation_id, 1)]
    });
    let status = f.dev.status().unwrap();
    assert_eq!(status.unsynced, 0, "{:?}", f.dev.queue(false).unwrap());
    let e = f.dev.get(id).unwrap().unwrap();
    assert_eq!((e.sync_state, e.relay_version), (SyncState::Synced, 3));
    // A later write builds on the resolution's version.
    let later = f.dev.update("workout", id, obj(json!({"rpe": 9.0}))).unwrap();
    assert_eq!(
        f.dev
            .envelope(later.mutation_id.unwrap())
            .unwrap()
            .unwrap()
            .base_version,
        Some(3)
    );
}

#[test]
fn keep_mine_and_a_per_field_merge_write_the_chosen_values_and_a_bad_merge_writes_nothing() {
    let mut f = enrolled(3);
    let (id, _) = workout_conflict(
        &mut f,
        json!({"notes": "mine", "rpe": 8.0}),
        json!({"notes": "theirs", "duration_min": 45}),
    );
    let before = f.outbox_count();
    let err = f
        .dev
        .resolve(
            id,
            Resolution::Merged(obj(json!({"rpe": 11.0, "name": null, "nope": 1, "_deleted": "x"}))),
        )
        .unwrap_err();
    let PeerError::Invalid { errors, .. } = &err else {
        panic!("{err}")
    };
    let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"nope") && fields.contains(&"_deleted"), "{err}");
    assert_eq!(f.outbox_count(), before, "nothing written");
    let err = f
        .dev
        .resolve(id, Resolution::Merged(obj(json!({"rpe": 11.0, "name": null}))))
        .unwrap_err();
    let PeerError::Invalid { errors, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(errors.0.len(), 2, "every error at once: {err}");
    assert_eq!(f.dev.conflicts().unwrap().len(), 1, "still open");

    f.dev
        .resolve(
            id,
            Resolution::Merged(obj(json!({"notes": "mine + theirs", "rpe": 8.0}))),
        )
        .unwrap();
    assert_eq!(
        f.dev.get(id).unwrap().unwrap().fields,
        obj(json!({"name": "Push day", "notes": "mine + theirs", "rpe": 8.0, "duration_min": 45}))
    );

    let mut g = enrolled(4);
    let (id, _) = workout_conflict(
        &mut g,
        json!({"notes": "mine", "rpe": 8.0}),
        json!({"notes": "theirs", "duration_min": 45}),
    );
    g.dev.resolve(id, Resolution::KeepMine).unwrap();
    assert_eq!(
        g.dev.get(id).unwrap().unwrap().fields,
        obj(json!({"name": "Push day", "notes": "mine", "rpe": 8.0}))
    );
    assert!(matches!(
        g.dev.resolve(id, Resolution::KeepMine),
        Err(PeerError::Resolution(_))
    ));
}

#[test]
fn a_resolution_refused_with_another_conflict_is_resolved_again_carrying_everything() {
    let mut f = enrolled(5);
    let (id, m) = workout_conflict(&mut f, json!({"notes": "mine"}), json!({"notes": "theirs"}));
    let relay_at_2 = {
        // The relay's copy at version 2: base + their change, without ours.
        let c = f.dev.conflicts().unwrap().remove(0);
        c.theirs.fields
    };
    assert_eq!(relay_at_2["notes"], json!("theirs"));
    let r1 = f.dev.resolve(id, Resolution::KeepMine).unwrap().mutation_id.unwrap();
    // Someone wrote again before our resolution arrived.
    let mut relay = EntityDoc::new(device_actor(OTHER));
    let bytes = f.dev.document_bytes(id).unwrap();
    let all = EntityDoc::load(&bytes, device_actor(OTHER)).unwrap().all_changes();
    let ours: Vec<_> = f
        .dev
        .envelope(r1)
        .unwrap()
        .unwrap()
        .changes
        .iter()
        .map(|c| parse_change(&c.0).unwrap().hash())
        .collect();
    relay
        .apply(all.into_iter().filter(|c| !ours.contains(&c.hash())).collect())
        .unwrap();
    let third = their_patch(&relay.save(), "workout", json!({"notes": "theirs again", "rpe": 6.0}));
    push(&mut f, |b| {
        assert_eq!(b[0].mutation_id, r1);
        vec![conflict(&b[0], 3, third.clone(), ConflictReason::StaleBase)]
    });
    let c = f.dev.conflicts().unwrap().remove(0);
    assert_eq!((c.mutation_id, c.kind, c.relay_version), (r1, MutationKind::Resolve, 3));
    assert_eq!(c.mine.fields["notes"], json!("mine"));
    assert_eq!(c.theirs.fields["notes"], json!("theirs again"));
    let r2 = f.dev.resolve(id, Resolution::KeepTheirs).unwrap().mutation_id.unwrap();
    let env = f.dev.envelope(r2).unwrap().unwrap();
    assert_eq!(
        (env.base_version, env.changes.len()),
        (Some(3), 3),
        "refused change + first decision + second"
    );
    assert_eq!(env.changes[0], m.changes[0]);
    let items = f.dev.queue(true).unwrap();
    for superseded in [m.mutation_id, r1] {
        let item = items.iter().find(|i| i.mutation_id == superseded).unwrap();
        assert_eq!((item.state, item.superseded_by), (OutboxState::Superseded, Some(r2)));
    }
    assert_eq!(f.dev.status().unwrap().unsynced, 3);
    push(&mut f, |b| vec![applied(b[0].mutation_id, 4)]);
    assert_eq!(f.dev.status().unwrap().unsynced, 0);
    assert_eq!(f.dev.get(id).unwrap().unwrap().fields["notes"], json!("theirs again"));
}

#[test]
fn delete_versus_edit_is_a_conflict_and_keep_mine_brings_the_record_back() {
    let mut f = enrolled(6);
    let id = f
        .dev
        .put("workout", None, obj(json!({"name": "Leg day"})))
        .unwrap()
        .entity_id;
    push_all_applied(&mut f, 1);
    let base = f.dev.document_bytes(id).unwrap();
    f.dev
        .update("workout", id, obj(json!({"notes": "added squats"})))
        .unwrap();
    let delete = their_change(&base, |d| d.set_deleted(true).unwrap());
    push(&mut f, |b| {
        vec![conflict(&b[0], 2, delete.clone(), ConflictReason::Deleted)]
    });
    let e = f.dev.get(id).unwrap().unwrap();
    assert!(e.deleted && e.sync_state == SyncState::Conflict);
    // Deleted locally now: an ordinary edit is refused, the resolution is the way out.
    assert!(f.dev.update("workout", id, obj(json!({"rpe": 5.0}))).is_err());
    let c = f.dev.conflicts().unwrap().remove(0);
    assert_eq!(c.reason, ConflictReason::Deleted);
    let del = field(&c, "_deleted");
    assert_eq!(
        (del.base.clone(), del.mine.value.clone(), del.theirs.value.clone()),
        (json!(false), json!(false), json!(true))
    );
    assert_eq!(del.status, FieldStatus::Theirs);
    assert_eq!(del.theirs.by.as_ref().unwrap().device_id, Some(OTHER));
    assert!(c.theirs.deleted && !c.mine.deleted);

    f.dev.resolve(id, Resolution::KeepMine).unwrap();
    let e = f.dev.get(id).unwrap().unwrap();
    assert!(!e.deleted);
    assert_eq!(e.fields, obj(json!({"name": "Leg day", "notes": "added squats"})));
    let sent = push_all_applied(&mut f, 3);
    assert_eq!(sent[0].kind, MutationKind::Resolve);
    let decision = parse_change(&sent[0].changes.last().unwrap().0).unwrap();
    assert!(
        fieldsync_schema::document::RootOps::of(&[decision])
            .unwrap()
            .puts
            .contains("_deleted"),
        "the resolution clears the tombstone explicitly"
    );
}

#[test]
fn a_resolution_records_how_the_conflict_was_resolved() {
    let cases = [
        (40, Resolution::KeepMine, "keep_mine"),
        (41, Resolution::KeepTheirs, "keep_theirs"),
        (42, Resolution::Merged(obj(json!({"notes": "both"}))), "merged"),
    ];
    for (seed, resolution, name) in cases {
        let mut f = enrolled(seed);
        let (id, _) = workout_conflict(&mut f, json!({"notes": "mine"}), json!({"notes": "theirs"}));
        let r = f.dev.resolve(id, resolution).unwrap();
        let (stored, by): (String, String) = f
            .dev
            .connection()
            .query_row("SELECT resolution, resolution_mutation FROM conflicts", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((stored.as_str(), by), (name, r.mutation_id.unwrap().to_string()));
    }
}

#[test]
fn a_resolution_that_would_carry_more_than_the_relay_takes_is_refused_and_changes_nothing() {
    // A service device's plan (long string details), edited behind a conflict.
    let mut f = Fixture::new(43);
    enroll(&mut f.dev, Role::Service);
    let plan = f
        .dev
        .put("plan", None, obj(json!({"name": "Base", "details": "a"})))
        .unwrap()
        .entity_id;
    push_all_applied(&mut f, 1);
    let base = f.dev.document_bytes(plan).unwrap();
    f.time.advance(1_000);
    f.dev.update("plan", plan, obj(json!({"details": "b"}))).unwrap();
    let theirs = their_patch(&base, "plan", json!({"details": "c"}));
    push(&mut f, |b| {
        vec![conflict(&b[0], 2, theirs.clone(), ConflictReason::StaleBase)]
    });
    // Edits queued behind the conflict: together more than one mutation may carry (random
    // letters, so that the changes do not compress).
    let mut seed = 7u64;
    for _ in 0..12 {
        let text: String = (0..100_000)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                char::from(b'a' + (seed >> 59) as u8 % 26)
            })
            .collect();
        f.dev.update("plan", plan, obj(json!({"details": text}))).unwrap();
    }
    let queued = f.dev.status().unwrap().unsynced;
    let err = f.dev.resolve(plan, Resolution::KeepMine).unwrap_err();
    assert!(err.to_string().contains("over the relay's limit"), "{err}");
    assert_eq!(f.dev.conflicts().unwrap().len(), 1, "the conflict stays open");
    assert_eq!(f.dev.status().unwrap().unsynced, queued, "nothing superseded");
}

#[test]
fn a_resolution_leaves_counters_to_their_increments() {
    let mut f = enrolled(44);
    let v = f
        .dev
        .put("volume", None, obj(json!({"week": "2026-11-23"})))
        .unwrap()
        .entity_id;
    push_all_applied(&mut f, 1);
    let base = f.dev.document_bytes(v).unwrap();
    f.time.advance(1_000);
    f.dev.increment("volume", v, "chest_sets", 2).unwrap();
    f.dev.update("volume", v, obj(json!({"week": "2026-11-30"}))).unwrap();
    let theirs = their_change(&base, |d| d.increment("chest_sets", 3).unwrap());
    push(&mut f, |b| {
        vec![conflict(&b[0], 2, theirs.clone(), ConflictReason::StaleBase)]
    });
    let chosen = f.dev.resolve(v, Resolution::Merged(obj(json!({"chest_sets": 9}))));
    assert!(
        matches!(&chosen, Err(PeerError::Invalid { errors, .. }) if errors.0.iter().any(|e| e.field == "chest_sets" && e.rule == fieldsync_schema::Rule::NotAllowed)),
        "{chosen:?}"
    );
    let before = f.dev.get(v).unwrap().unwrap().fields["chest_sets"].clone();
    f.dev.resolve(v, Resolution::KeepMine).unwrap();
    let after = f.dev.get(v).unwrap().unwrap().fields;
    assert_eq!(
        after["chest_sets"], before,
        "both increments stand, untouched by the resolution"
    );
    assert_eq!(before, json!(5));
}

#[test]
fn a_resolution_keeps_fields_this_devices_schema_does_not_know() {
    // The relay's side carries a field of a newer schema version (another device updated).
    let mut f = enrolled(45);
    let id = f
        .dev
        .put("workout", None, obj(json!({"name": "Push day", "notes": "warm-up"})))
        .unwrap()
        .entity_id;
    push_all_applied(&mut f, 1);
    let base = f.dev.document_bytes(id).unwrap();
    f.time.advance(1_000);
    f.dev.update("workout", id, obj(json!({"notes": "mine"}))).unwrap();
    let theirs = their_change(&base, |d| {
        use automerge::transaction::Transactable;
        d.automerge().put(automerge::ROOT, "cadence", "strong").unwrap();
    });
    push(&mut f, |b| {
        vec![conflict(&b[0], 2, theirs.clone(), ConflictReason::StaleBase)]
    });
    // An app's listener hears that a prompt waits.
    let conflicted = crate::Notice::Conflict {
        entity_type: "workout".into(),
        entity_id: id,
    };
    assert!(f.dev.take_notices().contains(&conflicted));
    // The prompt shows the field, marked as one this app version does not know.
    let record = f.dev.conflicts().unwrap().remove(0);
    let shown: Vec<(&str, bool)> = record
        .fields
        .iter()
        .map(|c| (c.field.as_str(), c.from_newer_version))
        .collect();
    assert!(
        shown.contains(&("cadence", true)) && shown.contains(&("notes", false)),
        "{shown:?}"
    );
    f.dev.resolve(id, Resolution::KeepMine).unwrap();
    let fields = f.dev.get(id).unwrap().unwrap().fields;
    assert_eq!(fields["cadence"], json!("strong"), "{fields:?}");
    assert_eq!(fields["notes"], json!("mine"));
}
