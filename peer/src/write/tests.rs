//! Tests of local writes: validation, local policy, the outbox and its envelopes.

use fieldsync_schema::document::{content_hash, parse_change};
use fieldsync_schema::signing::{self, verify_mutation};
use fieldsync_schema::{MutationKind, Role, Rule};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::testutil::{Fixture, T0, enroll, obj, space};
use crate::{FieldFilter, PeerError, SyncState};

fn field_errors(e: PeerError) -> Vec<(String, Rule)> {
    match e {
        PeerError::Invalid { errors, .. } => errors.0.into_iter().map(|e| (e.field, e.rule)).collect(),
        other => panic!("expected a validation error, got {other}"),
    }
}

fn refused(e: PeerError, needle: &str) {
    match &e {
        PeerError::Refused { reason, .. } => assert!(reason.contains(needle), "{e}"),
        other => panic!("expected a refusal mentioning {needle}, got {other}"),
    }
}

#[test]
fn an_invalid_write_changes_nothing_and_names_every_field() {
    let mut f = Fixture::new(1);
    let p = f.patient("Ada");
    let before = f.dev.get(p).unwrap().unwrap();
    let outbox = f.outbox_count();
    let err = f
        .dev
        .put(
            "patient",
            Some(p),
            obj(json!({"name": null, "date_of_birth": "2026-02-30", "colour": "red"})),
        )
        .unwrap_err();
    let text = err.to_string();
    let errs = field_errors(err);
    assert!(errs.contains(&("name".into(), Rule::Required)), "{errs:?}");
    assert!(errs.contains(&("date_of_birth".into(), Rule::Format)), "{errs:?}");
    assert!(errs.contains(&("colour".into(), Rule::UnknownField)), "{errs:?}");
    assert!(text.contains("date_of_birth"), "{text}");
    assert_eq!(f.dev.get(p).unwrap().unwrap(), before);
    assert_eq!(f.outbox_count(), outbox);

    // A refused create leaves no entity row behind either.
    let err = f
        .dev
        .put("session", None, obj(json!({"started_at": "2026-11-22T09:30:00Z"})))
        .unwrap_err();
    assert!(field_errors(err).contains(&("patient_id".into(), Rule::Required)));
    assert!(f.dev.list("session", &[], true).unwrap().is_empty());
    assert_eq!(f.outbox_count(), outbox);
}

#[test]
fn references_must_point_at_live_local_entities_of_the_right_type() {
    let mut f = Fixture::new(2);
    let p = f.patient("Ada");
    let session = |pid: Uuid| obj(json!({"patient_id": pid.to_string(), "started_at": "2026-11-22T09:30:00Z"}));
    let missing = Uuid::from_bytes([9; 16]);
    let err = f.dev.put("session", None, session(missing)).unwrap_err();
    assert_eq!(field_errors(err), vec![("patient_id".to_string(), Rule::Ref)]);

    let s = f.dev.put("session", None, session(p)).unwrap().entity_id;
    // A session id is not a patient.
    let err = f.dev.put("session", None, session(s)).unwrap_err();
    assert_eq!(field_errors(err), vec![("patient_id".to_string(), Rule::Ref)]);

    let p2 = f.patient("Grace");
    f.dev.delete("patient", p2).unwrap();
    let err = f
        .dev
        .update("session", s, obj(json!({"patient_id": p2.to_string()})))
        .unwrap_err();
    assert_eq!(field_errors(err), vec![("patient_id".to_string(), Rule::Ref)]);

    // A record whose (unchanged) referent was deleted later can still be edited.
    f.dev.delete("patient", p).unwrap();
    f.dev.update("session", s, obj(json!({"status": "completed"}))).unwrap();
}

#[test]
fn a_signed_note_refuses_every_later_write_and_its_signature_verifies() {
    let mut f = Fixture::new(3);
    let p = f.patient("Ada");
    let n = f
        .dev
        .put(
            "note",
            None,
            obj(json!({"patient_id": p.to_string(), "body": "Knee stable."})),
        )
        .unwrap()
        .entity_id;
    let err = f.dev.sign_note(n).unwrap_err();
    refused(err, "not enrolled");

    enroll(&mut f.dev, Role::Clinician);
    let r = f.dev.sign_note(n).unwrap();
    assert_eq!(r.kind, MutationKind::Sign);
    let e = f.dev.get(n).unwrap().unwrap();
    assert!(e.signed);
    let sig = e.signature.clone().unwrap();
    assert_eq!(sig.signer_user, Uuid::from_bytes([0x11; 16]));
    assert_eq!(sig.content_hash, hex::encode(content_hash(&e.fields)));
    let bytes = signing::note_signature_bytes(
        &n,
        &content_hash(&e.fields),
        &sig.signer_user,
        &sig.signer_device,
        sig.signed_at_ms,
    );
    signing::verify(&f.dev.public_key(), &bytes, &hex::decode(&sig.signature).unwrap()).unwrap();

    let outbox = f.outbox_count();
    refused(f.dev.edit_note(n, "Knee stable. Edited.").unwrap_err(), "signed");
    refused(
        f.dev.update("note", n, obj(json!({"title": "x"}))).unwrap_err(),
        "signed",
    );
    refused(f.dev.delete("note", n).unwrap_err(), "signed");
    refused(f.dev.sign_note(n).unwrap_err(), "signed");
    assert_eq!(f.outbox_count(), outbox);
    assert_eq!(f.dev.get(n).unwrap().unwrap().fields, e.fields);
}

#[test]
fn an_assistant_may_not_sign() {
    let mut f = Fixture::new(4);
    enroll(&mut f.dev, Role::Assistant);
    let p = f.patient("Ada");
    let n = f
        .dev
        .put("note", None, obj(json!({"patient_id": p.to_string(), "body": "x"})))
        .unwrap()
        .entity_id;
    refused(f.dev.sign_note(n).unwrap_err(), "may not sign");
}

#[test]
fn a_locked_form_refuses_every_later_write() {
    let mut f = Fixture::new(5);
    let p = f.patient("Ada");
    let form = f
        .dev
        .put(
            "intake_form",
            None,
            obj(json!({"patient_id": p.to_string(), "answers": "No allergies."})),
        )
        .unwrap()
        .entity_id;
    let r = f.dev.lock("intake_form", form).unwrap();
    assert_eq!(r.kind, MutationKind::Lock);
    assert!(!r.combined, "a lock is never combined");
    assert!(f.dev.get(form).unwrap().unwrap().locked);
    let outbox = f.outbox_count();
    refused(
        f.dev.edit_text("intake_form", form, "answers", "Peanuts.").unwrap_err(),
        "locked",
    );
    refused(
        f.dev
            .update("intake_form", form, obj(json!({"locked": false})))
            .unwrap_err(),
        "locked",
    );
    refused(f.dev.delete("intake_form", form).unwrap_err(), "locked");
    assert_eq!(f.outbox_count(), outbox);
    refused(f.dev.lock("patient", p).unwrap_err(), "cannot be locked");
}

#[test]
fn append_only_server_owned_and_roles_are_enforced_locally() {
    let mut f = Fixture::new(6);
    let c = f
        .dev
        .put("checkin", None, obj(json!({"date": "2026-11-22", "soreness": 3})))
        .unwrap()
        .entity_id;
    refused(
        f.dev.update("checkin", c, obj(json!({"soreness": 4}))).unwrap_err(),
        "append-only",
    );
    f.dev.delete("checkin", c).unwrap();
    refused(
        f.dev.put("exercise", None, obj(json!({"name": "Squat"}))).unwrap_err(),
        "not enrolled",
    );

    enroll(&mut f.dev, Role::Clinician);
    refused(
        f.dev.put("exercise", None, obj(json!({"name": "Squat"}))).unwrap_err(),
        "server-owned",
    );
    let mut g = Fixture::new(7);
    enroll(&mut g.dev, Role::Admin);
    g.dev.put("exercise", None, obj(json!({"name": "Squat"}))).unwrap();
    let mut h = Fixture::new(8);
    enroll(&mut h.dev, Role::Patient);
    refused(
        h.dev.put("patient", None, obj(json!({"name": "x"}))).unwrap_err(),
        "may not write",
    );
    let err = h
        .dev
        .put_in_space(
            Some(Uuid::from_bytes([3; 16])),
            "workout",
            None,
            obj(json!({"name": "Legs"})),
        )
        .unwrap_err();
    assert!(err.to_string().contains("not a member"), "{err}");
}

#[test]
fn counters_change_only_by_increments() {
    let mut f = Fixture::new(9);
    let v = f
        .dev
        .put("volume", None, obj(json!({"week": "2026-11-16", "legs_sets": 2})))
        .unwrap()
        .entity_id;
    let err = f.dev.update("volume", v, obj(json!({"legs_sets": 5}))).unwrap_err();
    assert_eq!(field_errors(err), vec![("legs_sets".to_string(), Rule::NotAllowed)]);
    refused(f.dev.increment("volume", v, "week", 1).unwrap_err(), "not a counter");
    f.dev.increment("volume", v, "legs_sets", 3).unwrap();
    f.dev.increment("volume", v, "core_sets", 1).unwrap();
    let err = f.dev.increment("volume", v, "core_sets", -2).unwrap_err();
    assert_eq!(field_errors(err), vec![("core_sets".to_string(), Rule::Min)]);
    let fields = f.dev.get(v).unwrap().unwrap().fields;
    assert_eq!(
        (fields["legs_sets"].clone(), fields["core_sets"].clone()),
        (json!(5), json!(1))
    );
}

#[test]
fn outbox_order_is_write_order_and_ids_and_envelopes_survive_reopening() {
    let mut f = Fixture::new(10);
    let a = f.patient("A");
    let b = f.patient("B");
    let mut ids = Vec::new();
    for (i, id) in [a, b, a, b, a].into_iter().enumerate() {
        f.time.advance(10);
        let r = f
            .dev
            .update("patient", id, obj(json!({"mrn": format!("m{i}")})))
            .unwrap();
        assert!(!r.combined, "alternating entities never combine");
        ids.push(r.mutation_id.unwrap());
    }
    let queue: Vec<Uuid> = f.dev.queue(false).unwrap().into_iter().map(|i| i.mutation_id).collect();
    assert_eq!(queue[2..], ids[..]);
    let envelopes: Vec<_> = queue.iter().map(|m| f.dev.envelope(*m).unwrap().unwrap()).collect();
    let f = f.reopen(999);
    let again: Vec<Uuid> = f.dev.queue(false).unwrap().into_iter().map(|i| i.mutation_id).collect();
    assert_eq!(again, queue);
    let envelopes_again: Vec<_> = again.iter().map(|m| f.dev.envelope(*m).unwrap().unwrap()).collect();
    assert_eq!(envelopes_again, envelopes);
    let seqs: Vec<u64> = f.dev.queue(false).unwrap().iter().map(|i| i.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn envelopes_are_signed_stamped_by_the_injected_clock_and_based_on_known_versions() {
    let mut f = Fixture::new(11);
    let p = f.patient("Ada");
    let q = f.patient("Bo");
    let m = f
        .dev
        .envelope(f.dev.queue(false).unwrap()[0].mutation_id)
        .unwrap()
        .unwrap();
    verify_mutation(&f.dev.public_key(), &m).unwrap();
    assert_eq!(m.device_id, f.dev.device_id());
    assert_eq!((m.user_id, m.space_id), (Uuid::nil(), Uuid::nil()));
    assert_eq!(m.kind, MutationKind::Create);
    assert_eq!(m.base_version, None);
    let change = parse_change(&m.changes[0].0).unwrap();
    assert_eq!(change.timestamp(), i64::try_from(T0 / 1000).unwrap());
    assert_eq!(
        fieldsync_schema::document::actor_device(change.actor_id()),
        Some(f.dev.device_id())
    );
    assert_eq!(m.client_timestamp.physical_ms, T0);

    // The relay has confirmed version 3 of p; one more unconfirmed write on p queued after it
    // makes the next one build on 4.
    f.dev
        .connection()
        .execute_batch("UPDATE outbox SET state = 'applied'; UPDATE entities SET relay_version = 3;")
        .unwrap();
    let r1 = f.dev.update("patient", p, obj(json!({"mrn": "1"}))).unwrap();
    f.dev.update("patient", q, obj(json!({"mrn": "x"}))).unwrap();
    let r2 = f.dev.update("patient", p, obj(json!({"mrn": "2"}))).unwrap();
    let b1 = f.dev.envelope(r1.mutation_id.unwrap()).unwrap().unwrap().base_version;
    let b2 = f.dev.envelope(r2.mutation_id.unwrap()).unwrap().unwrap().base_version;
    assert_eq!((b1, b2), (Some(3), Some(4)));
}

#[test]
fn consecutive_unsent_writes_to_one_entity_combine_but_never_after_sending() {
    let mut f = Fixture::new(12);
    let p = f.patient("Ada");
    let first = f.dev.queue(false).unwrap()[0].clone();
    f.time.advance(5);
    let r = f.dev.update("patient", p, obj(json!({"mrn": "1"}))).unwrap();
    assert!(r.combined);
    assert_eq!(r.mutation_id, Some(first.mutation_id));
    let m = f.dev.envelope(first.mutation_id).unwrap().unwrap();
    assert_eq!((m.kind, m.changes.len()), (MutationKind::Create, 2));
    assert_eq!(m.client_timestamp.physical_ms, T0 + 5);
    verify_mutation(&f.dev.public_key(), &m).unwrap();

    // Once an item was sent, later writes get their own item.
    f.dev
        .connection()
        .execute("UPDATE outbox SET attempts = 1", [])
        .unwrap();
    let r = f.dev.update("patient", p, obj(json!({"mrn": "2"}))).unwrap();
    assert!(!r.combined);
    // A delete never joins; nor does anything after it.
    let d = f.dev.delete("patient", p).unwrap();
    assert!(!d.combined);
    assert_eq!(f.outbox_count(), 3);
    // An unchanged value queues nothing at all.
    let q = f.patient("Bo");
    let r = f.dev.update("patient", q, obj(json!({"name": "Bo"}))).unwrap();
    assert_eq!(r.mutation_id, None);
}

#[test]
fn enrollment_adopts_unsent_writes_into_the_default_space_with_the_same_ids() {
    let mut f = Fixture::new(13);
    let p = f.patient("Ada");
    let before = f.dev.queue(false).unwrap();
    enroll(&mut f.dev, Role::Clinician);
    let after = f.dev.queue(false).unwrap();
    assert_eq!(
        before.iter().map(|i| i.mutation_id).collect::<Vec<_>>(),
        after.iter().map(|i| i.mutation_id).collect::<Vec<_>>()
    );
    let m = f.dev.envelope(after[0].mutation_id).unwrap().unwrap();
    assert_eq!((m.user_id, m.space_id), (Uuid::from_bytes([0x11; 16]), space()));
    verify_mutation(&f.dev.public_key(), &m).unwrap();
    assert_eq!(f.dev.get(p).unwrap().unwrap().space_id, space());
    let s = f
        .dev
        .put(
            "session",
            None,
            obj(json!({"patient_id": p.to_string(), "started_at": "2026-11-22T09:30:00Z"})),
        )
        .unwrap();
    assert_eq!(f.dev.get(s.entity_id).unwrap().unwrap().space_id, space());
    let f = f.reopen(1);
    assert_eq!(f.dev.status().unwrap().enrolled.unwrap().default_space, space());
}

#[test]
fn identity_comes_from_the_rng_once_and_the_hlc_stays_monotonic_across_restarts() {
    let a = Fixture::new(42);
    let b = Fixture::new(42);
    assert_eq!(a.dev.device_id(), b.dev.device_id());
    assert_eq!(a.dev.public_key(), b.dev.public_key());
    let id = a.dev.device_id();
    let mut a = a.reopen(7);
    assert_eq!(a.dev.device_id(), id);

    a.time.set(T0 + 10_000);
    let p = a.patient("Ada");
    let h1 = a
        .dev
        .envelope(a.dev.queue(false).unwrap()[0].mutation_id)
        .unwrap()
        .unwrap()
        .client_timestamp;
    let mut a = a.reopen(7);
    a.time.set(T0); // the wall clock went back ten seconds
    a.dev.delete("patient", p).unwrap();
    let q = a.dev.queue(false).unwrap();
    let h2 = a.dev.envelope(q[1].mutation_id).unwrap().unwrap().client_timestamp;
    assert!(h2 > h1, "{h2} after {h1}");
}

#[test]
fn deletes_are_tombstones_hidden_from_lists_and_filters_use_materialised_fields() {
    let mut f = Fixture::new(14);
    let a = f.patient("Ada");
    let b = f.patient("Bo");
    f.dev
        .update("patient", b, obj(json!({"date_of_birth": "1990-01-02"})))
        .unwrap();
    let by_name = f
        .dev
        .list(
            "patient",
            &[FieldFilter {
                field: "name".into(),
                value: json!("Bo"),
            }],
            false,
        )
        .unwrap();
    assert_eq!(by_name.iter().map(|e| e.entity_id).collect::<Vec<_>>(), vec![b]);
    f.dev.delete("patient", a).unwrap();
    let live: Vec<Uuid> = f
        .dev
        .list("patient", &[], false)
        .unwrap()
        .iter()
        .map(|e| e.entity_id)
        .collect();
    assert_eq!(live, vec![b]);
    assert_eq!(f.dev.list("patient", &[], true).unwrap().len(), 2);
    let gone = f.dev.get(a).unwrap().unwrap();
    assert!(gone.deleted && gone.sync_state == SyncState::Pending);
    refused(
        f.dev.update("patient", a, obj(json!({"mrn": "x"}))).unwrap_err(),
        "deleted",
    );
    let err = f
        .dev
        .list(
            "patient",
            &[FieldFilter {
                field: "name') OR 1=1 --".into(),
                value: json!(1),
            }],
            false,
        )
        .unwrap_err();
    assert!(err.to_string().contains("not a field"), "{err}");
    let w = f
        .dev
        .put("volume", None, obj(json!({"week": "2026-11-16", "legs_sets": 4})))
        .unwrap();
    let n = f
        .dev
        .list(
            "volume",
            &[FieldFilter {
                field: "legs_sets".into(),
                value: json!(4),
            }],
            false,
        )
        .unwrap();
    assert_eq!(n[0].entity_id, w.entity_id);
    // A number typed on the command line finds a string-valued field holding those digits.
    f.dev.update("patient", b, obj(json!({"phone": "555"}))).unwrap();
    let filter = |value: Value| FieldFilter {
        field: "phone".into(),
        value,
    };
    for value in [json!(555), json!("555")] {
        let found = f.dev.list("patient", &[filter(value)], false).unwrap();
        assert_eq!(found.iter().map(|e| e.entity_id).collect::<Vec<_>>(), vec![b]);
    }
    assert!(f.dev.list("patient", &[filter(json!(556))], false).unwrap().is_empty());
}

#[test]
fn device_and_machine_can_move_to_a_network_task() {
    fn is_send<T: Send>() {}
    is_send::<crate::Device>();
    is_send::<crate::sync::SyncMachine>();
}

/// Text that Automerge cannot shrink: a change carries about one byte per character.
fn incompressible(len: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            char::from(b'a' + ((x >> 33) % 26) as u8)
        })
        .collect()
}

#[test]
fn oversized_writes_are_refused_and_a_long_offline_session_stays_sendable() {
    use fieldsync_schema::wire::{MAX_MESSAGE_BYTES, MAX_MUTATION_CHANGE_BYTES};
    use fieldsync_schema::{ClientMessage, Schema};
    use rand_core::SeedableRng;

    let dir = tempfile::tempdir().unwrap();
    let time = fieldsync_schema::ManualTime::new(T0);
    let schema = Schema::from_toml_str(
        r#"
        [types.doc]
        policy = "gated"
        write = ["admin"]
        fields.body = { type = "string" }
        "#,
    )
    .unwrap();
    let mut dev = crate::Device::open_with_schema(
        dir.path(),
        std::sync::Arc::new(time.clone()),
        Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(7)),
        std::sync::Arc::new(schema),
    )
    .unwrap();

    // One write larger than the relay accepts: refused at once, nothing stored.
    let huge = incompressible(MAX_MUTATION_CHANGE_BYTES + 1, 1);
    refused(dev.put("doc", None, obj(json!({ "body": huge }))).unwrap_err(), "limit");
    assert!(dev.list("doc", &[], true).unwrap().is_empty());
    assert!(dev.queue(false).unwrap().is_empty());

    // Sixty large edits of one record offline: combined only up to the combining limit, and
    // the first batch fits in one frame even though the queue as a whole does not.
    let id = dev.put("doc", None, obj(json!({ "body": "draft" }))).unwrap().entity_id;
    for k in 0..60 {
        dev.put("doc", Some(id), obj(json!({ "body": incompressible(100_000, k + 2) })))
            .unwrap();
    }
    let items = dev.queue(false).unwrap();
    assert!(items.len() > 20, "{} items", items.len());
    let mut total = 0;
    for item in &items {
        let env = dev.envelope(item.mutation_id).unwrap().unwrap();
        let size: usize = env.changes.iter().map(|c| c.0.len()).sum();
        assert!(size <= crate::write::COMBINE_LIMIT_BYTES, "{size}");
        total += size;
    }
    assert!(
        total > MAX_MESSAGE_BYTES,
        "the queue must not fit one frame for this test"
    );
    let batch = dev.pushable(T0, fieldsync_schema::wire::MAX_BATCH).unwrap();
    assert!(!batch.is_empty() && batch.len() < items.len(), "{}", batch.len());
    assert_eq!(batch[0].mutation_id, items[0].mutation_id);
    let frame = ClientMessage::Push {
        batch_id: 1,
        mutations: batch,
    }
    .encode();
    assert!(frame.len() <= MAX_MESSAGE_BYTES, "{} bytes", frame.len());
}

#[test]
fn an_increment_leaves_a_field_of_a_newer_schema_alone() {
    let mut f = Fixture::new(15);
    let w = f
        .dev
        .put("volume", None, obj(json!({"week": "2026-11-16"})))
        .unwrap()
        .entity_id;
    // A device on a newer schema version added a field this device's schema does not know.
    let mut loaded = crate::entity::load(&f.dev.conn, w, f.dev.actor()).unwrap().unwrap();
    {
        use automerge::transaction::Transactable;
        loaded
            .doc
            .automerge()
            .put(automerge::ROOT, "note", "deload week")
            .unwrap();
    }
    loaded.doc.commit(T0);
    crate::entity::store(&f.dev.conn, &f.dev.schema, &loaded.meta, &mut loaded.doc, T0).unwrap();
    f.dev.increment("volume", w, "legs_sets", 2).unwrap();
    let fields = f.dev.get(w).unwrap().unwrap().fields;
    assert_eq!(
        (fields["note"].clone(), fields["legs_sets"].clone()),
        (json!("deload week"), json!(2))
    );
    // What the increment sets is still judged.
    let below = f.dev.increment("volume", w, "legs_sets", -5).unwrap_err();
    assert!(matches!(below, PeerError::Invalid { .. }), "{below}");
}
