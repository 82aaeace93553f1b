//! Attacks across tenants through a real relay process, in raw frames: a member of one space
//! reading (every pull cursor form, live entries, receipt replays, the welcome) and writing
//! (foreign space ids, foreign entity ids, references) into another, and a member removed from
//! a space while connected. Each test asserts the refusal, that no stored value reached the
//! attacker (byte for byte, in every frame it received), that the relay's database holds
//! nothing new, and that honest devices still sync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_schema::wire::{SnapshotCursor, SpaceCursor};
use fieldsync_schema::{ConflictReason, FeedEntry, Mutation, Outcome, PullCursor, RelayMessage, Rule};
use fieldsync_tests::Relay;
use fieldsync_tests::attacker::{
    Dev, RawConn, Recorder, carries_data, forbidden, honest_round_trip, relay_fields, run, stored, version_of,
};
use serde_json::json;
use uuid::Uuid;

const MARKER: &str = "SECRET-MARKER-123";
const MRN: &str = "MRN-SECRET-4711";
const NOTE: &str = "NOTE-SECRET-knee-0042";

fn applied(o: &Outcome) -> u64 {
    o.applied().unwrap_or_else(|| panic!("expected applied, got {o:?}")).0
}

fn two_spaces(dir: &std::path::Path) -> Relay {
    let relay = Relay::start(&dir.join("relay"), 0);
    relay.setup("clinic", &[("carla", "clinician")]);
    relay.setup("gym", &[("gus", "clinician")]);
    relay
}

/// Every entry in `entries` belongs to `space`.
fn only_space(entries: &[FeedEntry], space: Uuid, what: &str) {
    for e in entries {
        assert_eq!(
            e.space_id, space,
            "{what}: received {} {} of another space",
            e.entity_type, e.entity_id
        );
    }
}

/// The stored values of the clinic never reached the attacker, in any frame.
fn reveals_nothing(recorder: &Recorder, clinic: Uuid) {
    assert!(!recorder.is_empty());
    for secret in [MARKER, MRN, NOTE] {
        assert!(!recorder.contains(secret.as_bytes()), "{secret} reached the attacker");
    }
    assert!(
        !recorder.contains(clinic.as_bytes()),
        "the clinic's space id reached the attacker"
    );
    assert!(
        !recorder.contains(clinic.to_string().as_bytes()),
        "the clinic's space id reached the attacker"
    );
}

/// The clinic's records: a patient and a note carrying the secret strings.
async fn clinic_records(relay: &Relay, carla: &mut Dev) -> (Uuid, Uuid) {
    let mut conn = carla.connect(relay).await;
    let (patient, m) = carla.create("patient", json!({"name": MARKER, "mrn": MRN}));
    assert_eq!(applied(&carla.push_one(&mut conn, m).await), 1);
    let (note, m) = carla.create("note", json!({"patient_id": patient.to_string(), "body": NOTE}));
    assert_eq!(applied(&carla.push_one(&mut conn, m).await), 1);
    (patient, note)
}

#[test]
fn a_member_of_another_space_never_receives_anything_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = two_spaces(dir.path());
    run(async {
        let mut carla = Dev::enroll(&relay, "carla", 1).await;
        let clinic = carla.space("clinic");
        let (patient, note) = clinic_records(&relay, &mut carla).await;
        // Control: a clinic device does receive the secrets as plain bytes, so the byte search
        // below would see them.
        let mut colleague = Dev::enroll(&relay, "carla", 2).await;
        let mut c = colleague.connect(&relay).await;
        colleague.pull_all(&mut c).await;
        for secret in [MARKER, MRN, NOTE] {
            assert!(
                colleague.recorder.contains(secret.as_bytes()),
                "control: {secret} not visible"
            );
        }

        let mut gus = Dev::enroll(&relay, "gus", 3).await;
        let gym = gus.space("gym");
        assert_eq!(gus.user.spaces.len(), 1, "enrolled: {:?}", gus.user);
        let mut conn = gus.connect(&relay).await;
        // The welcome names the user's own space only.
        let user = conn.user();
        assert_eq!(user.spaces.len(), 1, "{user:?}");
        assert_eq!((user.spaces[0].space_id, user.spaces[0].name.as_str()), (gym, "gym"));
        // Something of the gym's own, so the pulls below have something to return.
        let (workout, m) = gus.create("workout", json!({"name": "Legs"}));
        applied(&gus.push_one(&mut conn, m).await);

        // Every cursor form: the snapshot from zero, arbitrary and huge sequence numbers, forged
        // snapshot cursors, absurd page sizes.
        let huge = [
            0u64,
            1,
            2,
            3,
            5,
            1 << 32,
            i64::MAX as u64,
            (i64::MAX as u64) + 1,
            u64::MAX - 1,
            u64::MAX,
        ];
        // Each position form, for the gym, for the clinic (a space the user is not in, named
        // in the cursor), and for both; and round-1 global positions.
        let both = |seq: u64, snapshot: Option<SnapshotCursor>| PullCursor {
            spaces: [gym, clinic]
                .into_iter()
                .map(|space| (space, SpaceCursor { seq, snapshot }))
                .collect(),
            legacy_seq: None,
        };
        let mut cursors: Vec<PullCursor> = Vec::new();
        for &seq in &huge {
            cursors.push(PullCursor::at(gym, seq));
            cursors.push(PullCursor::at(clinic, seq));
            cursors.push(both(seq, None));
            cursors.push(PullCursor {
                spaces: Default::default(),
                legacy_seq: Some(seq),
            });
        }
        for &upto_seq in &huge {
            for &after_key in &huge {
                for low_pass in [false, true] {
                    cursors.push(both(
                        0,
                        Some(SnapshotCursor {
                            upto_seq,
                            after_key,
                            low_pass,
                        }),
                    ));
                }
            }
        }
        cursors.push(both(
            7,
            Some(SnapshotCursor {
                upto_seq: 1,
                after_key: 0,
                low_pass: false,
            }),
        ));
        let mut seen_own = false;
        for cursor in cursors {
            for max_entries in [0u32, 1, u32::MAX] {
                let entries = pull_page(&mut conn, cursor.clone(), max_entries).await;
                only_space(&entries, gym, &format!("{cursor:?} max {max_entries}"));
                seen_own |= entries.iter().any(|e| e.entity_id == workout);
            }
        }
        assert!(seen_own, "the pulls never returned the gym's own record");
        // A full pull from zero, following the cursors the relay hands out.
        let (entries, _) = gus.pull_from(&mut conn, PullCursor::default()).await;
        only_space(&entries, gym, "full pull");

        // Live: the clinic writes while gus is caught up; gus gets nothing of it.
        let mut cc = carla.connect(&relay).await;
        let m = carla.update("patient", patient, json!({"name": format!("{MARKER}-v2")}));
        applied(&carla.push_one(&mut cc, m).await);
        let (_, m) = carla.create("patient", json!({"name": format!("{MARKER}-other"), "mrn": MRN}));
        applied(&carla.push_one(&mut cc, m).await);
        // gus's own write after them: its live entry proves the live path is open.
        let m = gus.update("workout", workout, json!({"name": "Legs B"}));
        applied(&gus.push_one(&mut conn, m).await);
        let before = conn.barrier(1).await;
        let live: Vec<FeedEntry> = conn
            .received
            .iter()
            .chain(&before)
            .filter_map(|m| match m {
                RelayMessage::Live { entries, .. } => Some(entries.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(
            live.iter().any(|e| e.entity_id == workout),
            "no live entry for gus's own write"
        );
        only_space(&live, gym, "live");

        // Receipt replays naming the clinic's records. A stale-base conflict of gus's own ...
        gus.versions.insert(workout, 1);
        let stale = gus.update("workout", workout, json!({"name": "Legs C"}));
        match gus.push_one(&mut conn, stale.clone()).await {
            Outcome::Conflict {
                reason: ConflictReason::StaleBase,
                ..
            } => {}
            other => panic!("expected a stale-base conflict, got {other:?}"),
        }
        // ... replayed under the same mutation id, validly re-signed, for the clinic's patient
        // and note, in gus's space or the clinic's.
        for (entity_id, entity_type) in [(patient, "patient"), (note, "note"), (patient, "workout")] {
            for space_id in [gym, clinic] {
                let probe = gus.resign(Mutation {
                    entity_id,
                    entity_type: entity_type.into(),
                    space_id,
                    ..stale.clone()
                });
                let outcome = gus.push_one(&mut conn, probe).await;
                // In the clinic's space the membership check answers first (nothing of the
                // space is read); in his own, the receipt refuses the different change.
                let expected = if space_id == clinic { "member" } else { "different" };
                assert!(forbidden(&outcome).contains(expected), "{outcome:?}");
                assert!(!carries_data(&outcome));
            }
        }
        // An already-exists receipt (a second create of gus's own record under a new id) ...
        let (_, first) = gus.create("checkin", json!({"date": "2026-11-30"}));
        applied(&gus.push_one(&mut conn, first.clone()).await);
        let again = gus.resign(Mutation {
            mutation_id: Uuid::from_bytes([0x33; 16]),
            ..first
        });
        assert!(matches!(
            gus.push_one(&mut conn, again.clone()).await,
            Outcome::Conflict {
                reason: ConflictReason::AlreadyExists,
                ..
            }
        ));
        let probe = gus.resign(Mutation {
            entity_id: patient,
            ..again.clone()
        });
        let outcome = gus.push_one(&mut conn, probe).await;
        assert!(forbidden(&outcome).contains("different"), "{outcome:?}");
        // Fresh mutations probing the clinic's records: a stale update and a create over the
        // id, in gus's own space, must not come back as conflicts carrying the clinic's data.
        for (entity_id, entity_type, patch) in [
            (patient, "patient", json!({"name": "probe"})),
            (note, "note", json!({"title": "probe"})),
        ] {
            let mut probe = gus.update(entity_type, entity_id, patch);
            probe.base_version = Some(0);
            let probe = gus.resign(probe);
            let outcome = gus.push_one(&mut conn, probe).await;
            assert!(!carries_data(&outcome), "{outcome:?}");
            forbidden(&outcome);
            let create = gus.create_with_id(entity_type, entity_id, clinic_like_fields(entity_type, patient));
            let outcome = gus.push_one(&mut conn, create).await;
            assert!(!carries_data(&outcome), "{outcome:?}");
            forbidden(&outcome);
            gus.forget(entity_id);
        }

        // A reconnect: the welcome and a fresh snapshot still show the gym only.
        let mut again = gus.connect(&relay).await;
        assert_eq!(again.user().spaces.len(), 1);
        let entries = gus.pull_all(&mut again).await;
        only_space(&entries, gym, "reconnect");
        reveals_nothing(&gus.recorder, clinic);
        assert_eq!(version_of(&relay, patient), Some(2));
        assert_eq!(relay_fields(&relay, patient)["mrn"], json!(MRN));
        honest_round_trip(&relay, dir.path(), "gus", "workout", json!({"name": "Honest"})).await;
    });
}

/// Fields that make a valid record of the type (for "create over an existing id" probes).
fn clinic_like_fields(entity_type: &str, patient: Uuid) -> serde_json::Value {
    match entity_type {
        "patient" => json!({"name": "Probe"}),
        _ => json!({"patient_id": patient.to_string(), "body": "probe"}),
    }
}

async fn pull_page(conn: &mut RawConn, cursor: PullCursor, max_entries: u32) -> Vec<FeedEntry> {
    conn.send(&fieldsync_schema::ClientMessage::Pull { cursor, max_entries })
        .await;
    loop {
        match conn.recv().await {
            RelayMessage::Changes { entries, .. } => return entries,
            RelayMessage::Live { .. } | RelayMessage::UserChanged { .. } => {}
            other => panic!("expected a page, got {other:?}"),
        }
    }
}

#[test]
fn a_user_removed_from_a_space_stops_reading_and_writing_it_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let relay = two_spaces(dir.path());
    relay.admin(&["user", "add", "carla", "--space", "gym", "--role", "clinician"]);
    relay.admin(&["user", "add", "cody", "--space", "clinic", "--role", "clinician"]);
    run(async {
        let mut carla = Dev::enroll(&relay, "carla", 1).await;
        let clinic = carla.space("clinic");
        let gym = carla.space("gym");
        carla.space_id = clinic;
        let mut conn = carla.connect(&relay).await;
        let (patient, m) = carla.create("patient", json!({"name": "Known to carla"}));
        applied(&carla.push_one(&mut conn, m).await);
        // Cody moves the record on; carla's stale update gets a conflict with his change.
        let mut cody = Dev::enroll(&relay, "cody", 2).await;
        let mut cc = cody.connect(&relay).await;
        cody.pull_all(&mut cc).await;
        let m = cody.update("patient", patient, json!({"name": MARKER, "mrn": MRN}));
        applied(&cody.push_one(&mut cc, m).await);
        let stale = carla.update("patient", patient, json!({"name": "Carla's edit"}));
        match carla.push_one(&mut conn, stale.clone()).await {
            Outcome::Conflict { server_changes, .. } => assert!(!server_changes.is_empty()),
            other => panic!("expected a conflict, got {other:?}"),
        }
        carla.pull_all(&mut conn).await;

        // Carla leaves the clinic while connected.
        relay.admin(&["user", "remove", "carla", "--space", "clinic"]);
        let removed_at = std::time::Instant::now();
        // Her open session stops seeing the clinic: a pull from zero shows the gym only.
        loop {
            let entries = pull_page(&mut conn, PullCursor::default(), 1000).await;
            if entries.iter().all(|e| e.space_id == gym) {
                break;
            }
            assert!(
                removed_at.elapsed() < std::time::Duration::from_secs(2),
                "the session still reads the clinic {:?} after the removal",
                removed_at.elapsed()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let offset_after = carla.recorder.len();
        // Her conflict receipt no longer hands out the clinic's changes.
        let outcome = carla.push_one(&mut conn, stale).await;
        assert!(forbidden(&outcome).contains("member"), "{outcome:?}");
        // She cannot write there.
        let m = carla.update("patient", patient, json!({"name": "After leaving"}));
        forbidden(&carla.push_one(&mut conn, m).await);
        let (_, m) = carla.create("patient", json!({"name": "After leaving"}));
        forbidden(&carla.push_one(&mut conn, m).await);
        // Cody's later clinic writes do not reach her live.
        carla.pull_from(&mut conn, PullCursor::at(clinic, 1)).await;
        let m = cody.update("patient", patient, json!({"mrn": format!("{MRN}-2")}));
        applied(&cody.push_one(&mut cc, m).await);
        let before = conn.barrier(9).await;
        for m in &before {
            if let RelayMessage::Live { entries, .. } = m {
                only_space(entries, gym, "live after removal");
            }
        }
        // A new connection is welcomed to the gym only.
        let again = carla.connect(&relay).await;
        assert_eq!(
            again.user().spaces.iter().map(|s| s.space_id).collect::<Vec<_>>(),
            vec![gym]
        );
        for secret in [MARKER, MRN] {
            assert!(
                !carla.recorder.contains_after(offset_after, secret.as_bytes()),
                "{secret} reached carla after she left"
            );
        }
        assert_eq!(version_of(&relay, patient), Some(3));
        honest_round_trip(&relay, dir.path(), "cody", "patient", json!({"name": "Honest"})).await;
    });
}

#[test]
fn writes_into_another_space_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = two_spaces(dir.path());
    run(async {
        let mut carla = Dev::enroll(&relay, "carla", 1).await;
        let clinic = carla.space("clinic");
        let (patient, note) = clinic_records(&relay, &mut carla).await;
        let mut cc = carla.connect(&relay).await;
        let (session, m) = carla.create(
            "session",
            json!({"patient_id": patient.to_string(), "started_at": "2026-11-30T09:00:00Z"}),
        );
        applied(&carla.push_one(&mut cc, m).await);

        let mut gus = Dev::enroll(&relay, "gus", 3).await;
        let gym = gus.space("gym");
        let mut conn = gus.connect(&relay).await;
        let before = stored(&relay);

        // A create naming the clinic's space.
        gus.space_id = clinic;
        let (_, m) = gus.create("patient", json!({"name": "Planted"}));
        assert!(forbidden(&gus.push_one(&mut conn, m).await).contains("member"));
        // Updates and deletes of the clinic's records, naming either space.
        for space in [clinic, gym] {
            gus.space_id = space;
            for (id, ty, field) in [
                (patient, "patient", "name"),
                (note, "note", "title"),
                (session, "session", "location"),
            ] {
                for (i, base) in [Some(1), Some(0), Some(99)].into_iter().enumerate() {
                    let mut m = gus.update(ty, id, json!({ field: format!("Overwritten {i}") }));
                    m.base_version = base;
                    let m = gus.resign(m);
                    let outcome = gus.push_one(&mut conn, m).await;
                    forbidden(&outcome);
                    assert!(!carries_data(&outcome), "{outcome:?}");
                }
                let m = gus.delete(ty, id);
                forbidden(&gus.push_one(&mut conn, m).await);
                gus.forget(id);
            }
        }
        gus.space_id = gym;
        // Claiming the clinic's entity ids for records of its own.
        let m = gus.create_with_id("patient", patient, json!({"name": "Squatter"}));
        let outcome = gus.push_one(&mut conn, m).await;
        forbidden(&outcome);
        assert!(!carries_data(&outcome));
        gus.forget(patient);
        let m = gus.create_with_id("workout", session, json!({"name": "Squatter"}));
        forbidden(&gus.push_one(&mut conn, m).await);
        gus.forget(session);
        // References from the gym into the clinic: a session for the clinic's patient, a note
        // on it, a set in the clinic's session. The answer is the same as for an id that does
        // not exist anywhere, so it does not even confirm that the record exists.
        let nowhere = Uuid::from_bytes([0x77; 16]);
        for (ty, fields, field) in [
            (
                "session",
                json!({"patient_id": "{}", "started_at": "2026-11-30T09:00:00Z"}),
                "patient_id",
            ),
            ("note", json!({"patient_id": "{}", "body": "x"}), "patient_id"),
            (
                "set",
                json!({"session_id": "{}", "exercise_name": "Squat"}),
                "session_id",
            ),
        ] {
            let target = if field == "session_id" { session } else { patient };
            let mut answers = Vec::new();
            for id in [target, nowhere] {
                let mut f = fields.clone();
                f[field] = json!(id.to_string());
                let (eid, m) = gus.create(ty, f);
                match gus.push_one(&mut conn, m).await {
                    Outcome::Invalid { errors } => {
                        assert!(
                            errors.iter().any(|e| e.field == field && e.rule == Rule::Ref),
                            "{errors:?}"
                        );
                        answers.push(
                            errors
                                .iter()
                                .map(|e| (e.field.clone(), e.message.replace(&id.to_string(), "ID")))
                                .collect::<Vec<_>>(),
                        );
                    }
                    other => panic!("{ty} referring into the clinic: {other:?}"),
                }
                gus.forget(eid);
            }
            assert_eq!(answers[0], answers[1], "{ty}: a foreign record is told apart from none");
        }
        // Re-pointing a valid gym record at the clinic's patient.
        let (gym_patient, m) = gus.create("patient", json!({"name": "Gym member"}));
        applied(&gus.push_one(&mut conn, m).await);
        let (gym_session, m) = gus.create(
            "session",
            json!({"patient_id": gym_patient.to_string(), "started_at": "2026-11-30T10:00:00Z"}),
        );
        applied(&gus.push_one(&mut conn, m).await);
        let after_setup = stored(&relay);
        let m = gus.update("session", gym_session, json!({"patient_id": patient.to_string()}));
        assert!(matches!(gus.push_one(&mut conn, m).await, Outcome::Invalid { .. }));
        assert_eq!(stored(&relay).data(), after_setup.data());
        assert_eq!(version_of(&relay, gym_session), Some(1));

        // Nothing of the attacks was stored: the two records gus made honestly are all.
        let after = stored(&relay);
        assert_eq!(after.documents, before.documents + 2);
        assert_eq!((after.feed, after.audit), (before.feed + 2, before.audit + 2));
        for id in [patient, note, session] {
            assert_eq!(version_of(&relay, id), Some(1), "{id}");
        }
        assert_eq!(relay_fields(&relay, patient)["name"], json!(MARKER));
        reveals_nothing(&gus.recorder, clinic);
        honest_round_trip(&relay, dir.path(), "carla", "patient", json!({"name": "Honest"})).await;
    });
}
