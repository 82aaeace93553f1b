//! Attacks on envelopes and roles through a real relay process, in raw frames: envelopes and
//! Automerge changes naming another device, role violations (a patient writing clinical
//! records, an assistant signing, unlocking a locked form, editing a signed note), a demotion
//! on an open session, replays and one-byte tampering. Each test asserts the refusal, that the
//! relay's database holds nothing new and that honest devices still sync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use fieldsync_schema::document::device_actor;
use fieldsync_schema::{Bytes, EntityDoc, Mutation, MutationKind, Outcome, Schema};
use fieldsync_tests::Relay;
use fieldsync_tests::attacker::{
    Dev, carries_data, forbidden, honest_round_trip, obj, relay_fields, run, stored, version_of,
};
use serde_json::json;
use uuid::Uuid;

fn applied(o: &Outcome) -> u64 {
    o.applied().unwrap_or_else(|| panic!("expected applied, got {o:?}")).0
}

#[test]
fn spoofed_envelopes_and_changes_of_another_device_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("carla", "clinician"), ("mallory", "clinician")]);
    run(async {
        let mut carla = Dev::enroll(&relay, "carla", 1).await;
        let mut cc = carla.connect(&relay).await;
        let (patient, carla_create) = carla.create("patient", json!({"name": "Carla's patient"}));
        applied(&carla.push_one(&mut cc, carla_create.clone()).await);
        let mut mallory = Dev::enroll(&relay, "mallory", 2).await;
        let mut conn = mallory.connect(&relay).await;
        mallory.pull_all(&mut conn).await;
        let before = stored(&relay);

        // Envelopes naming carla's device or user, signed by mallory.
        let (_, base) = mallory.create("patient", json!({"name": "Spoofed"}));
        let spoofs = [
            ("device", carla.device_id, mallory.user.user_id),
            ("user", mallory.device_id, carla.user.user_id),
            ("both", carla.device_id, carla.user.user_id),
        ];
        for (what, device_id, user_id) in spoofs {
            let mut m = Mutation {
                device_id,
                user_id,
                mutation_id: mallory.new_id(),
                ..base.clone()
            };
            m.client_timestamp.device = device_id;
            let m = mallory.resign(m);
            let outcome = mallory.push_one(&mut conn, m).await;
            assert!(forbidden(&outcome).contains("device or user"), "{what}: {outcome:?}");
        }
        // Carla's own captured envelope, verbatim, on mallory's session.
        let outcome = mallory.push_one(&mut conn, carla_create.clone()).await;
        assert!(forbidden(&outcome).contains("device or user"), "{outcome:?}");
        // The HLC timestamp naming carla's device.
        let mut m = Mutation {
            mutation_id: mallory.new_id(),
            ..base.clone()
        };
        m.client_timestamp.device = carla.device_id;
        let outcome = mallory.push_one(&mut conn, mallory.resign(m)).await;
        assert!(forbidden(&outcome).contains("HLC"), "{outcome:?}");
        assert_eq!(
            stored(&relay).receipts,
            before.receipts,
            "refused before proof, yet a receipt was written"
        );

        // Automerge changes authored by carla's actor in mallory's envelope: a new document ...
        let schema = Schema::default_schema();
        let ty = schema.entity_type("patient").unwrap();
        let mut forged = EntityDoc::new(device_actor(carla.device_id));
        forged.init_type("patient").unwrap();
        forged
            .write_fields(ty, &obj(json!({"name": "In carla's name"})))
            .unwrap();
        let change = forged.commit(fieldsync_tests::attacker::now_ms()).unwrap();
        let forged_id = mallory.new_id();
        let m = mallory.envelope(
            "patient",
            forged_id,
            MutationKind::Create,
            vec![Bytes(change.raw_bytes().to_vec())],
        );
        let outcome = mallory.push_one(&mut conn, m).await;
        assert!(forbidden(&outcome).contains("not authored"), "{outcome:?}");
        // ... a change of mallory's followed by one of carla's ...
        let mut own = EntityDoc::new(device_actor(mallory.device_id));
        own.init_type("patient").unwrap();
        own.write_fields(ty, &obj(json!({"name": "Mixed"}))).unwrap();
        let first = own.commit(fieldsync_tests::attacker::now_ms()).unwrap();
        let mut theirs = EntityDoc::load(&own.save(), device_actor(carla.device_id)).unwrap();
        theirs.write_fields(ty, &obj(json!({"mrn": "by carla?"}))).unwrap();
        let second = theirs.commit(fieldsync_tests::attacker::now_ms()).unwrap();
        let mixed_id = mallory.new_id();
        let m = mallory.envelope(
            "patient",
            mixed_id,
            MutationKind::Create,
            vec![Bytes(first.raw_bytes().to_vec()), Bytes(second.raw_bytes().to_vec())],
        );
        assert!(forbidden(&mallory.push_one(&mut conn, m).await).contains("not authored"));
        // ... and carla's captured change bytes, re-wrapped as mallory's update of the record.
        mallory.versions.insert(patient, 1);
        let m = mallory.envelope("patient", patient, MutationKind::Update, carla_create.changes.clone());
        assert!(forbidden(&mallory.push_one(&mut conn, m).await).contains("not authored"));

        // Nothing was stored, and carla's record is as she left it.
        assert_eq!(stored(&relay).data(), before.data());
        assert_eq!(version_of(&relay, forged_id), None);
        assert_eq!(version_of(&relay, patient), Some(1));
        assert_eq!(relay_fields(&relay, patient)["name"], json!("Carla's patient"));
        // Mallory's honest write under her own identity works.
        let (_, m) = mallory.create("patient", json!({"name": "Mallory's own"}));
        applied(&mallory.push_one(&mut conn, m).await);
        honest_round_trip(&relay, dir.path(), "carla", "patient", json!({"name": "Honest"})).await;
    });
}

#[test]
fn role_limits_locks_and_signatures_hold_against_crafted_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup(
        "clinic",
        &[("carla", "clinician"), ("ann", "assistant"), ("pat", "patient")],
    );
    run(async {
        let mut carla = Dev::enroll(&relay, "carla", 1).await;
        let mut cc = carla.connect(&relay).await;
        let (patient, m) = carla.create("patient", json!({"name": "Pat"}));
        applied(&carla.push_one(&mut cc, m).await);
        let (form, m) = carla.create(
            "intake_form",
            json!({"patient_id": patient.to_string(), "answers": "a"}),
        );
        applied(&carla.push_one(&mut cc, m).await);
        let m = carla.lock("intake_form", form);
        assert_eq!(applied(&carla.push_one(&mut cc, m).await), 2);
        let (signed, m) = carla.create("note", json!({"patient_id": patient.to_string(), "body": "Final"}));
        applied(&carla.push_one(&mut cc, m).await);
        let m = carla.sign_note(signed);
        assert_eq!(applied(&carla.push_one(&mut cc, m).await), 2);

        let (carla_note, m) = carla.create("note", json!({"patient_id": patient.to_string(), "body": "Mine"}));
        applied(&carla.push_one(&mut cc, m).await);
        let mut ann = Dev::enroll(&relay, "ann", 2).await;
        let mut ac = ann.connect(&relay).await;
        ann.pull_all(&mut ac).await;
        let (ann_note, m) = ann.create("note", json!({"patient_id": patient.to_string(), "body": "Draft"}));
        applied(&ann.push_one(&mut ac, m).await);
        let mut pat = Dev::enroll(&relay, "pat", 3).await;
        let mut pc = pat.connect(&relay).await;
        pat.pull_all(&mut pc).await;
        let before = stored(&relay);

        // A patient writing clinical and reference types.
        for (ty, fields) in [
            (
                "session",
                json!({"patient_id": patient.to_string(), "started_at": "2026-11-30T09:00:00Z"}),
            ),
            (
                "note",
                json!({"patient_id": patient.to_string(), "body": "self-diagnosis"}),
            ),
            ("patient", json!({"name": "Another patient"})),
            ("exercise", json!({"name": "Made up"})),
            ("role", json!({"user_name": "pat", "role": "admin"})),
        ] {
            let (id, m) = pat.create(ty, fields);
            let outcome = pat.push_one(&mut pc, m).await;
            assert!(forbidden(&outcome).contains("may not write"), "{ty}: {outcome:?}");
            pat.forget(id);
        }
        let m = pat.update("patient", patient, json!({"name": "Renamed by pat"}));
        forbidden(&pat.push_one(&mut pc, m).await);
        pat.forget(patient);
        // An assistant signing a note: as a Sign, and as an Update that writes the signature.
        let m = ann.sign_note(ann_note);
        assert!(forbidden(&ann.push_one(&mut ac, m).await).contains("may not sign"));
        ann.forget(ann_note);
        ann.pull_all(&mut ac).await;
        let m = ann.sign_note_as(ann_note, MutationKind::Update);
        match ann.push_one(&mut ac, m).await {
            Outcome::Invalid { errors } => assert!(errors.iter().any(|e| e.field == "_signature"), "{errors:?}"),
            other => panic!("a signature written by an update: {other:?}"),
        }
        ann.forget(ann_note);
        ann.pull_all(&mut ac).await;
        // A tombstone written by an update.
        let m = ann.write("note", ann_note, MutationKind::Update, |d, _| {
            d.set_deleted(true).unwrap()
        });
        match ann.push_one(&mut ac, m).await {
            Outcome::Invalid { errors } => assert!(errors.iter().any(|e| e.field == "_deleted"), "{errors:?}"),
            other => panic!("a tombstone written by an update: {other:?}"),
        }
        ann.forget(ann_note);
        ann.pull_all(&mut ac).await;
        // A clinician's signature naming another signer.
        let ann_user = ann.user.user_id;
        let key = carla.key.clone();
        let carla_device = carla.device_id;
        let m = carla.write("note", carla_note, MutationKind::Sign, |d, _| {
            let hash = fieldsync_schema::document::content_hash(&d.fields());
            let sig = key.sign(&fieldsync_schema::signing::note_signature_bytes(
                &carla_note,
                &hash,
                &ann_user,
                &carla_device,
                5,
            ));
            d.set_signature(&fieldsync_schema::document::NoteSignature {
                signer_user: ann_user,
                signer_device: carla_device,
                signed_at_ms: 5,
                content_hash: hash.iter().map(|b| format!("{b:02x}")).collect(),
                signature: sig.iter().map(|b| format!("{b:02x}")).collect(),
            })
            .unwrap()
        });
        assert!(matches!(carla.push_one(&mut cc, m).await, Outcome::Invalid { .. }));
        carla.forget(carla_note);
        carla.pull_all(&mut cc).await;

        // Unlocking the locked form, by its author and by the patient; editing, deleting it.
        let m = carla.update("intake_form", form, json!({"locked": false}));
        assert!(matches!(
            carla.push_one(&mut cc, m).await,
            Outcome::RejectedLocked { .. }
        ));
        let m = carla.update("intake_form", form, json!({"answers": "changed"}));
        assert!(matches!(
            carla.push_one(&mut cc, m).await,
            Outcome::RejectedLocked { .. }
        ));
        let m = carla.delete("intake_form", form);
        assert!(matches!(
            carla.push_one(&mut cc, m).await,
            Outcome::RejectedLocked { .. }
        ));
        let m = pat.update("intake_form", form, json!({"locked": false}));
        assert!(matches!(pat.push_one(&mut pc, m).await, Outcome::RejectedLocked { .. }));
        // Editing, deleting, re-signing the signed note.
        carla.forget(signed);
        carla.pull_all(&mut cc).await;
        let m = carla.update("note", signed, json!({"body": "Final, amended"}));
        assert!(matches!(
            carla.push_one(&mut cc, m).await,
            Outcome::RejectedImmutable { .. }
        ));
        let m = carla.delete("note", signed);
        assert!(matches!(
            carla.push_one(&mut cc, m).await,
            Outcome::RejectedImmutable { .. }
        ));
        let m = carla.sign_note(signed);
        assert!(matches!(
            carla.push_one(&mut cc, m).await,
            Outcome::RejectedImmutable { .. }
        ));
        let m = ann.update("note", signed, json!({"title": "sneaky"}));
        assert!(matches!(
            ann.push_one(&mut ac, m).await,
            Outcome::RejectedImmutable { .. }
        ));

        // Nothing changed: versions and stored state are as before the attacks.
        assert_eq!(stored(&relay).data(), before.data());
        assert_eq!(version_of(&relay, patient), Some(1));
        assert_eq!(version_of(&relay, form), Some(2));
        assert_eq!(version_of(&relay, signed), Some(2));
        assert_eq!(version_of(&relay, ann_note), Some(1));
        assert_eq!(version_of(&relay, carla_note), Some(1));
        let f = relay_fields(&relay, form);
        assert_eq!((f["locked"].clone(), f["answers"].clone()), (json!(true), json!("a")));
        assert_eq!(relay_fields(&relay, signed)["body"], json!("Final"));
        honest_round_trip(&relay, dir.path(), "ann", "patient", json!({"name": "Honest"})).await;
    });
}

#[test]
fn a_demotion_takes_effect_on_an_open_session_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("carla", "clinician"), ("cody", "clinician")]);
    run(async {
        let mut carla = Dev::enroll(&relay, "carla", 1).await;
        let mut conn = carla.connect(&relay).await;
        let (patient, m) = carla.create("patient", json!({"name": "Pat"}));
        applied(&carla.push_one(&mut conn, m).await);
        let (note, m) = carla.create("note", json!({"patient_id": patient.to_string(), "body": "Draft"}));
        applied(&carla.push_one(&mut conn, m).await);
        let before = stored(&relay);

        relay.admin(&["user", "role", "carla", "--space", "clinic", "--role", "patient"]);
        let demoted_at = std::time::Instant::now();
        // Probe with a session that lacks its required fields: a clinician gets `Invalid`, a
        // patient `Forbidden` (the role is checked first), and neither stores anything.
        loop {
            let (id, m) = carla.create("session", json!({"location": "Room 1"}));
            carla.forget(id);
            match carla.push_one(&mut conn, m).await {
                Outcome::Forbidden { reason } => {
                    assert!(reason.contains("patient"), "{reason}");
                    break;
                }
                Outcome::Invalid { .. } => {}
                other => panic!("{other:?}"),
            }
            assert!(
                demoted_at.elapsed() < std::time::Duration::from_secs(2),
                "the open session kept the clinician role for {:?}",
                demoted_at.elapsed()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // From then on the session writes and signs as a patient.
        let m = carla.sign_note(note);
        forbidden(&carla.push_one(&mut conn, m).await);
        carla.forget(note);
        let (_, m) = carla.create(
            "session",
            json!({"patient_id": patient.to_string(), "started_at": "2026-11-30T09:00:00Z"}),
        );
        forbidden(&carla.push_one(&mut conn, m).await);
        assert_eq!(stored(&relay).data(), before.data());
        assert_eq!(version_of(&relay, note), Some(1));
        honest_round_trip(&relay, dir.path(), "cody", "patient", json!({"name": "Honest"})).await;
    });
}

#[test]
fn replayed_and_tampered_envelopes_are_refused_and_never_applied_twice() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("carla", "clinician"), ("mallory", "clinician")]);
    run(async {
        let mut carla = Dev::enroll(&relay, "carla", 1).await;
        let mut carla2 = Dev::enroll(&relay, "carla", 2).await;
        let mut mallory = Dev::enroll(&relay, "mallory", 3).await;
        let mut conn = carla.connect(&relay).await;
        let (patient, create) = carla.create("patient", json!({"name": "Ada"}));
        let first = carla.push_one(&mut conn, create.clone()).await;
        let (version, seq) = first.applied().unwrap();
        let after_create = stored(&relay);

        // The applied envelope again: on the same connection, a new one, twice in one batch.
        let expected = Outcome::AlreadyApplied {
            original: Box::new(Outcome::Applied {
                version,
                seq,
                duplicate_of: None,
                lww_lost: Vec::new(),
            }),
        };
        assert_eq!(carla.push_one(&mut conn, create.clone()).await, expected);
        let mut other = carla.connect(&relay).await;
        assert_eq!(carla.push_one(&mut other, create.clone()).await, expected);
        let twice = carla.push(&mut other, vec![create.clone(), create.clone()]).await;
        assert!(twice.iter().all(|r| r.outcome == expected), "{twice:?}");
        // Another device of the same user, and another user, pushing the captured envelope.
        let mut c2 = carla2.connect(&relay).await;
        assert!(forbidden(&carla2.push_one(&mut c2, create.clone()).await).contains("device or user"));
        let mut mc = mallory.connect(&relay).await;
        forbidden(&mallory.push_one(&mut mc, create.clone()).await);
        // Carla's mutation id under another device's own, validly signed, content.
        let (_, mine) = carla2.create("patient", json!({"name": "Hijack"}));
        let hijack = carla2.resign(Mutation {
            mutation_id: create.mutation_id,
            ..mine
        });
        let outcome = carla2.push_one(&mut c2, hijack).await;
        assert!(forbidden(&outcome).contains("another device"), "{outcome:?}");
        assert!(!carries_data(&outcome));
        assert_eq!(stored(&relay).data(), after_create.data());
        assert_eq!(version_of(&relay, patient), Some(1));

        // An update, captured before it is sent, tampered with one byte at a time.
        let update = carla.update("patient", patient, json!({"name": "Ada L."}));
        let mut tampered: Vec<(&str, Mutation)> = Vec::new();
        let flip = |f: &dyn Fn(&mut Mutation)| {
            let mut m = update.clone();
            f(&mut m);
            m
        };
        tampered.push((
            "a change byte",
            flip(&|m| {
                let n = m.changes[0].0.len();
                m.changes[0].0[n - 3] ^= 0x01;
            }),
        ));
        tampered.push(("the entity id", flip(&|m| m.entity_id = flip_uuid(m.entity_id))));
        tampered.push((
            "the base version",
            flip(&|m| m.base_version = m.base_version.map(|v| v ^ 0x100)),
        ));
        tampered.push(("the kind", flip(&|m| m.kind = MutationKind::Resolve)));
        tampered.push(("the space id", flip(&|m| m.space_id = flip_uuid(m.space_id))));
        tampered.push(("the entity type", flip(&|m| m.entity_type = "session".into())));
        tampered.push(("the HLC", flip(&|m| m.client_timestamp.physical_ms ^= 1)));
        tampered.push(("the signature", flip(&|m| m.signature.0[7] ^= 0x80)));
        tampered.push(("a dropped signature", flip(&|m| m.signature = Bytes(Vec::new()))));
        tampered.push(("an added change", flip(&|m| m.changes.push(m.changes[0].clone()))));
        let ids: BTreeSet<Uuid> = tampered.iter().map(|(_, m)| m.mutation_id).collect();
        assert_eq!(ids.len(), 1);
        for (what, m) in tampered {
            let outcome = carla.push_one(&mut conn, m).await;
            assert!(forbidden(&outcome).contains("signature"), "{what}: {outcome:?}");
        }
        assert_eq!(
            stored(&relay),
            after_create,
            "a tampered envelope left a trace (a receipt or data)"
        );
        // The untampered original still applies once: the attempts did not poison its id.
        assert_eq!(applied(&carla.push_one(&mut conn, update.clone()).await), 2);
        let after_update = stored(&relay);
        assert!(matches!(
            carla.push_one(&mut conn, update.clone()).await,
            Outcome::AlreadyApplied { .. }
        ));
        // The same id with a different, validly signed content.
        let mut changed = carla.update("patient", patient, json!({"name": "Ada Lovelace"}));
        changed.mutation_id = update.mutation_id;
        let changed = carla.resign(changed);
        let outcome = carla.push_one(&mut conn, changed).await;
        assert!(forbidden(&outcome).contains("different"), "{outcome:?}");
        assert_eq!(stored(&relay).data(), after_update.data());
        assert_eq!(version_of(&relay, patient), Some(2));
        assert_eq!(relay_fields(&relay, patient)["name"], json!("Ada L."));
        let audit = fieldsync_tests::attacker::count_in_shards(
            &relay,
            "SELECT COUNT(*) FROM audit WHERE entity_id = ?1",
            [patient.as_bytes().to_vec()],
        );
        assert_eq!(audit, 2, "one audit record per applied mutation");
        assert!(relay.admin(&["audit", "verify"])["first_bad"].is_null());
        honest_round_trip(&relay, dir.path(), "carla", "patient", json!({"name": "Honest"})).await;
    });
}

fn flip_uuid(u: Uuid) -> Uuid {
    let mut b = *u.as_bytes();
    b[15] ^= 1;
    Uuid::from_bytes(b)
}
