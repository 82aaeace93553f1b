//! Conflict prompts end to end (SPEC §9), over the real relay binary: the workout scenario of
//! reference document 004, the signed note and locked intake form of 001, LWW settings on a
//! phone and a tablet, and delete versus edit (writes queued behind a conflict: `conflict_queue.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use fieldsync_peer::Device;
use fieldsync_relay::store::ArchiveRow;
use fieldsync_schema::{EntityDoc, ManualTime, TimeSource};
use fieldsync_tests::relay_files::RelayFiles;
use fieldsync_tests::{Peer, Relay, obj};
use rand_core::SeedableRng;
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// One user's phone and tablet, enrolled with a relay (reference document 004).
struct Gym {
    _dir: tempfile::TempDir,
    relay: Relay,
    phone: Peer,
    tablet: Peer,
}

fn gym() -> Gym {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("gym", &[("alex", "patient")]);
    let phone = Peer::init(&dir.path().join("phone"));
    let tablet = Peer::init(&dir.path().join("tablet"));
    phone.enroll(&relay, "alex");
    tablet.enroll(&relay, "alex");
    Gym {
        _dir: dir,
        relay,
        phone,
        tablet,
    }
}

fn device_id(p: &Peer) -> String {
    p.status()["device_id"].as_str().unwrap().to_string()
}

/// The relay's files, read beside the running relay (WAL allows it).
fn store(relay: &Relay) -> RelayFiles {
    RelayFiles::open(&relay.data)
}

/// The relay's document of an entity, its version and whether it is deleted.
fn relay_doc(relay: &Relay, id: &str) -> (EntityDoc, u64, bool) {
    store(relay).doc(id.parse().unwrap())
}

fn relay_fields(relay: &Relay, id: &str) -> Map<String, Value> {
    store(relay).fields(id.parse().unwrap())
}

/// Whether the relay's history holds a change by `device` after which `field` read `value`.
fn history_has(relay: &Relay, id: &str, device: &str, field: &str, value: &Value) -> bool {
    store(relay).history_has(id.parse().unwrap(), device.parse().unwrap(), field, value)
}

fn archive(relay: &Relay, id: &str, kind: &str) -> Vec<ArchiveRow> {
    let id: Uuid = id.parse().unwrap();
    store(relay)
        .archive()
        .into_iter()
        .filter(|a| a.entity_id == id && a.kind == kind)
        .collect()
}

fn field<'a>(conflict: &'a Value, name: &str) -> &'a Value {
    conflict["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == json!(name))
        .unwrap_or_else(|| panic!("no field {name} in {conflict:#}"))
}

#[test]
fn the_workout_edited_offline_on_two_devices_prompts_on_the_later_one_and_each_resolution_lands() {
    let g = gym();
    let (phone_id, tablet_id) = (device_id(&g.phone), device_id(&g.tablet));
    let workouts: Vec<String> = (0..3)
        .map(|_| g.phone.put("workout", r#"{"name": "Push day", "notes": "warm-up"}"#))
        .collect();
    g.phone.ok(&["sync"]);
    g.tablet.ok(&["sync"]);
    // Both edit every workout offline; the phone reconnects first.
    for w in &workouts {
        g.phone.ok(&[
            "put",
            "workout",
            w,
            "--json",
            r#"{"notes": "Bench 3x225", "duration_min": 45}"#,
        ]);
        g.tablet.ok(&[
            "put",
            "workout",
            w,
            "--json",
            r#"{"notes": "Bench 3x225, Squat 3x315", "rpe": 8}"#,
        ]);
    }
    assert_eq!(g.phone.json(&["sync"])["summary"]["applied"], json!(3));
    let summary = g.tablet.json(&["sync"]);
    assert_eq!(summary["summary"]["conflicts"], json!(1), "{summary}");

    // The tablet is blocked, says on what and why, and keeps working locally.
    let status = g.tablet.status();
    assert_eq!(status["state"], json!("blocked"));
    assert_eq!(status["blocked"]["entity_id"], json!(workouts[0]));
    assert_eq!(status["blocked"]["outcome"], json!("conflict"));
    assert!(
        status["blocked"]["reason"]
            .as_str()
            .unwrap()
            .contains("changed on the relay"),
        "{status}"
    );
    let extra = g.tablet.put("workout", r#"{"name": "Evening run"}"#);
    assert_eq!(g.tablet.status()["unsynced"], json!(4));

    // The prompt: three-way, field by field, with who wrote what.
    let listed = g.tablet.json(&["conflicts"]);
    let c = &listed["conflicts"][0];
    assert_eq!(listed["conflicts"].as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(c["entity_id"], json!(workouts[0]));
    assert_eq!(
        (c["base_version"].clone(), c["server_version"].clone()),
        (json!(1), json!(2))
    );
    let notes = field(c, "notes");
    assert_eq!(notes["status"], json!("contested"));
    assert_eq!(notes["base"], json!("warm-up"));
    assert_eq!(notes["mine"]["value"], json!("Bench 3x225, Squat 3x315"));
    assert_eq!(notes["mine"]["by"]["device_id"], json!(tablet_id));
    assert_eq!(notes["theirs"]["value"], json!("Bench 3x225"));
    assert_eq!(notes["theirs"]["by"]["device_id"], json!(phone_id));
    assert_eq!(notes["theirs"]["by"]["user_id"], status["enrolled"]["user_id"]);
    assert!(notes["theirs"]["by"]["at_ms"].as_u64().unwrap() > 0);
    assert_eq!(field(c, "duration_min")["status"], json!("theirs"));
    assert_eq!(field(c, "rpe")["status"], json!("mine"));
    let human = g.tablet.ok(&["conflicts"]);
    assert!(
        human.contains("(stale_base)")
            && human.contains("CONTESTED")
            && human.contains("--keep mine")
            && human.contains("you (alex) on device"),
        "{human}"
    );

    // Keep theirs on the first, keep mine on the second, a per-field merge on the third.
    g.tablet.ok(&["resolve", "workout", &workouts[0], "--keep", "theirs"]);
    g.tablet.ok(&["sync"]);
    assert_eq!(g.tablet.status()["blocked"]["entity_id"], json!(workouts[1]));
    g.tablet.ok(&["resolve", "workout", &workouts[1], "--keep", "mine"]);
    g.tablet.ok(&["sync"]);
    assert_eq!(g.tablet.status()["blocked"]["entity_id"], json!(workouts[2]));
    let err = g
        .tablet
        .fails(&["resolve", "workout", &workouts[2], "--json", r#"{"rpe": 12}"#]);
    assert!(err.contains("rpe"), "an invalid merge is refused: {err}");
    g.tablet.ok(&[
        "resolve",
        "workout",
        &workouts[2],
        "--json",
        r#"{"notes": "Bench 3x225 + Squat 3x315", "rpe": 8}"#,
    ]);
    let summary = g.tablet.json(&["sync"]);
    assert_eq!(summary["status"]["state"], json!("synced"), "{summary}");
    assert_eq!(summary["status"]["unsynced"], json!(0));

    let expected = [
        json!({"name": "Push day", "notes": "Bench 3x225", "duration_min": 45}),
        json!({"name": "Push day", "notes": "Bench 3x225, Squat 3x315", "rpe": 8.0}),
        json!({"name": "Push day", "notes": "Bench 3x225 + Squat 3x315", "duration_min": 45, "rpe": 8.0}),
    ];
    for (w, want) in workouts.iter().zip(&expected) {
        let (_, version, deleted) = relay_doc(&g.relay, w);
        assert_eq!((version, deleted), (3, false), "one resolution on top of both");
        assert_eq!(relay_fields(&g.relay, w), obj(want.clone()), "{w}");
        // History keeps both sides.
        assert!(history_has(&g.relay, w, &phone_id, "notes", &json!("Bench 3x225")));
        assert!(history_has(
            &g.relay,
            w,
            &tablet_id,
            "notes",
            &json!("Bench 3x225, Squat 3x315")
        ));
    }
    // The relay archived what each resolution discarded, with the winning value.
    let lost = |w: &str| -> Vec<(String, String, String)> {
        let mut v: Vec<_> = archive(&g.relay, w, "resolution")
            .into_iter()
            .map(|a| (a.field.unwrap(), a.losing_json, a.loser_device.unwrap().to_string()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        lost(&workouts[0]),
        vec![
            ("notes".into(), "\"Bench 3x225, Squat 3x315\"".into(), tablet_id.clone()),
            ("rpe".into(), "8.0".into(), tablet_id.clone()),
        ]
    );
    assert_eq!(
        lost(&workouts[1]),
        vec![
            ("duration_min".into(), "45".into(), phone_id.clone()),
            ("notes".into(), "\"Bench 3x225\"".into(), phone_id.clone()),
        ]
    );
    assert_eq!(
        lost(&workouts[2]),
        vec![
            ("notes".into(), "\"Bench 3x225\"".into(), phone_id.clone()),
            ("notes".into(), "\"Bench 3x225, Squat 3x315\"".into(), tablet_id.clone()),
        ]
    );
    // Both devices converge, including the write made while blocked.
    g.phone.ok(&["sync"]);
    for (w, want) in workouts.iter().zip(&expected) {
        assert_eq!(g.phone.get("workout", w)["fields"], *want);
        assert_eq!(g.tablet.get("workout", w)["fields"], *want);
    }
    assert_eq!(g.phone.get("workout", &extra)["fields"]["name"], json!("Evening run"));
    assert!(
        g.tablet.json(&["conflicts"])["conflicts"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_signed_note_and_a_locked_intake_form_refuse_late_edits_which_stay_with_their_author() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician"), ("sam", "clinician")]);
    let a = Peer::init(&dir.path().join("a"));
    let b = Peer::init(&dir.path().join("b"));
    a.enroll(&relay, "dana");
    b.enroll(&relay, "sam");
    let p = a.put("patient", r#"{"name": "Ada"}"#);
    let note = a.put(
        "note",
        &format!(r#"{{"patient_id": "{p}", "body": "Knee stable. Continue plan."}}"#),
    );
    let form = a.put(
        "intake_form",
        &format!(r#"{{"patient_id": "{p}", "answers": "No allergies."}}"#),
    );
    a.ok(&["sync"]);
    b.ok(&["sync"]);

    // Concurrent edits of an unsigned note merge: both are in the text.
    a.ok(&[
        "note-edit",
        &note,
        "--text",
        "Knee stable, swelling down. Continue plan.",
    ]);
    b.ok(&[
        "note-edit",
        &note,
        "--text",
        "Knee stable. Continue plan; add balance work.",
    ]);
    a.ok(&["sync"]);
    b.ok(&["sync"]);
    a.ok(&["sync"]);
    let merged = relay_fields(&relay, &note)["body"].as_str().unwrap().to_string();
    assert!(
        merged.contains("swelling down") && merged.contains("balance work"),
        "{merged}"
    );
    assert_eq!(a.get("note", &note)["fields"]["body"], json!(merged));
    assert_eq!(b.get("note", &note)["fields"]["body"], json!(merged));

    // A signs and locks; B edits both without having seen that.
    a.ok(&["sign", &note]);
    a.ok(&["lock", "intake_form", &form]);
    a.ok(&["sync"]);
    let late_text = format!("{merged} Recheck in two weeks.");
    b.ok(&["note-edit", &note, "--text", &late_text]);
    b.ok(&[
        "put",
        "intake_form",
        &form,
        "--json",
        r#"{"answers": "No allergies. Penicillin?"}"#,
    ]);
    b.ok(&["sync"]);
    let status = b.status();
    assert_eq!(status["state"], json!("blocked"));
    assert_eq!(status["blocked"]["entity_id"], json!(note));
    assert_eq!(status["blocked"]["outcome"], json!("rejected_immutable"));
    // The local note is the relay's signed note again, read-only; the refused text is kept.
    let local = b.get("note", &note);
    assert_eq!(
        (local["signed"].clone(), local["fields"]["body"].clone()),
        (json!(true), json!(merged))
    );
    let err = b.fails(&["note-edit", &note, "--text", "again"]);
    assert!(err.contains("signed"), "{err}");
    let listed = b.json(&["conflicts"]);
    let r = &listed["rejections"][0];
    assert_eq!(r["fields"]["body"], json!(late_text));
    assert_eq!(r["options"], json!(["discard", "addendum"]));
    // Local writes keep working while blocked.
    b.put("patient", r#"{"name": "Grace"}"#);

    let addendum = b.ok(&["resolve", "note", &note, "--addendum"]).trim().to_string();
    b.ok(&["sync"]);
    let status = b.status();
    assert_eq!(status["blocked"]["entity_id"], json!(form));
    assert_eq!(status["blocked"]["outcome"], json!("rejected_locked"));
    assert_eq!(b.get("intake_form", &form)["fields"]["answers"], json!("No allergies."));
    assert_eq!(
        b.json(&["conflicts"])["rejections"][0]["fields"]["answers"],
        json!("No allergies. Penicillin?")
    );
    let err = b.fails(&["resolve", "intake_form", &form, "--keep", "mine"]);
    assert!(err.contains("--discard"), "{err}");
    let out = b.ok(&["resolve", "intake_form", &form, "--discard"]);
    assert!(out.contains("Penicillin"), "the discarded values are shown: {out}");
    let summary = b.json(&["sync"]);
    assert_eq!(summary["status"]["state"], json!("synced"), "{summary}");
    assert_eq!(summary["status"]["unsynced"], json!(0));

    // The relay: the signed note and the locked form never changed; the addendum links them.
    let s = store(&relay);
    let (note_row, _) = s.document(note.parse().unwrap()).unwrap();
    assert!(note_row.signed);
    assert_eq!(relay_fields(&relay, &note)["body"], json!(merged));
    assert_eq!(relay_fields(&relay, &form)["answers"], json!("No allergies."));
    assert_eq!(
        relay_fields(&relay, &addendum),
        obj(json!({"patient_id": p, "addendum_to": note, "body": late_text}))
    );
    a.ok(&["sync"]);
    assert_eq!(a.get("note", &addendum)["fields"]["addendum_to"], json!(note));
}

#[test]
fn lww_settings_have_a_deterministic_winner_and_the_loser_can_undo_for_24_hours() {
    let g = gym();
    let (phone_id, tablet_id) = (device_id(&g.phone), device_id(&g.tablet));
    let s = g.phone.put("settings", r#"{"units": "kg"}"#);
    g.phone.ok(&["sync"]);
    g.tablet.ok(&["sync"]);
    // The phone writes first, the tablet later; the tablet reaches the relay first anyway.
    g.phone.ok(&[
        "put",
        "settings",
        &s,
        "--json",
        r#"{"units": "lb", "goal_race_date": "2026-05-01"}"#,
    ]);
    wait_past_last_stamp(&g.phone);
    g.tablet.ok(&[
        "put",
        "settings",
        &s,
        "--json",
        r#"{"units": "st", "goal_race_date": "2026-06-01"}"#,
    ]);
    g.tablet.ok(&["sync"]);
    let summary = g.phone.json(&["sync"]);
    assert_eq!(
        summary["status"]["state"],
        json!("synced"),
        "no prompt for LWW: {summary}"
    );
    g.tablet.ok(&["sync"]);
    for dev in [&g.phone, &g.tablet] {
        assert_eq!(
            dev.get("settings", &s)["fields"]["units"],
            json!("st"),
            "the later write wins"
        );
    }
    assert_eq!(relay_fields(&g.relay, &s)["units"], json!("st"));
    let rows = archive(&g.relay, &s, "lww");
    assert!(
        rows.iter().any(|a| a.losing_json == "\"lb\""
            && a.loser_device.map(|d| d.to_string()) == Some(phone_id.clone())
            && a.winner_device.map(|d| d.to_string()) == Some(tablet_id.clone())),
        "{rows:?}"
    );

    // The phone lists its losses and undoes one: its value is written again and wins.
    let losses = g.phone.json(&["conflicts", "--lww"]);
    assert_eq!(losses["lww_losses"].as_array().unwrap().len(), 2, "{losses:#}");
    let pick = |name: &str| {
        losses["lww_losses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["field"] == json!(name))
            .unwrap()
            .clone()
    };
    let loss = &pick("units");
    assert_eq!(
        (
            loss["field"].clone(),
            loss["loser_value"].clone(),
            loss["winner_value"].clone()
        ),
        (json!("units"), json!("lb"), json!("st"))
    );
    assert_eq!(
        loss["undo_until_ms"].as_u64().unwrap() - loss["recorded_at_ms"].as_u64().unwrap(),
        24 * 3600 * 1000
    );
    let id = loss["loss_id"].to_string();
    g.phone.ok(&["undo", &id]);
    let err = g.phone.fails(&["undo", &id]);
    assert!(err.contains("already undone"), "{err}");
    g.phone.ok(&["sync"]);
    g.tablet.ok(&["sync"]);
    assert_eq!(relay_fields(&g.relay, &s)["units"], json!("lb"));
    assert_eq!(g.tablet.get("settings", &s)["fields"]["units"], json!("lb"));

    // The undo saw the winner: an ordinary later write, so the tablet lost nothing to it.
    assert!(
        g.tablet.json(&["conflicts", "--lww"])["lww_losses"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(relay_fields(&g.relay, &s)["goal_race_date"], json!("2026-06-01"));

    // A day and more later, the phone's other loss can no longer be undone.
    let goal = pick("goal_race_date");
    assert_eq!(goal["loser_value"], json!("2026-05-01"));
    let later = ManualTime::new(fieldsync_schema::SystemTimeSource.now_ms() + 25 * 3600 * 1000);
    let mut phone = Device::open(
        &g.phone.data,
        Arc::new(later),
        Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(7)),
    )
    .unwrap();
    let err = phone
        .undo_lww_loss(goal["loss_id"].as_u64().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("24 hours"), "{err}");
    assert_eq!(phone.status().unwrap().unsynced, 0, "nothing was written");
}

#[test]
fn delete_versus_edit_of_a_workout_is_a_conflict_either_way_round() {
    let g = gym();
    let edited_there = g.phone.put("workout", r#"{"name": "Leg day"}"#);
    let deleted_there = g.phone.put("workout", r#"{"name": "Arm day"}"#);
    g.phone.ok(&["sync"]);
    g.tablet.ok(&["sync"]);
    // The phone deletes one and edits the other; the tablet does the opposite.
    g.phone.ok(&["delete", "workout", &edited_there]);
    g.phone
        .ok(&["put", "workout", &deleted_there, "--json", r#"{"notes": "curls"}"#]);
    g.tablet
        .ok(&["put", "workout", &edited_there, "--json", r#"{"notes": "squats"}"#]);
    g.tablet.ok(&["delete", "workout", &deleted_there]);
    g.phone.ok(&["sync"]);
    g.tablet.ok(&["sync"]);

    // The tablet's edit met the phone's delete.
    let c = g.tablet.json(&["conflicts"])["conflicts"][0].clone();
    assert_eq!(
        (c["entity_id"].clone(), c["reason"].clone()),
        (json!(edited_there), json!("deleted"))
    );
    let del = field(&c, "_deleted");
    assert_eq!(
        (
            del["base"].clone(),
            del["mine"]["value"].clone(),
            del["theirs"]["value"].clone()
        ),
        (json!(false), json!(false), json!(true))
    );
    assert_eq!(g.tablet.get("workout", &edited_there)["deleted"], json!(true));
    g.tablet.ok(&["resolve", "workout", &edited_there, "--keep", "mine"]);
    g.tablet.ok(&["sync"]);
    let (_, _, deleted) = relay_doc(&g.relay, &edited_there);
    assert!(!deleted, "keep mine brings the record back");
    assert_eq!(
        relay_fields(&g.relay, &edited_there),
        obj(json!({"name": "Leg day", "notes": "squats"}))
    );
    assert!(
        archive(&g.relay, &edited_there, "resolution")
            .iter()
            .any(|a| a.field.as_deref() == Some("_deleted"))
    );

    // The tablet's delete met the phone's edit: keeping the delete archives the edit.
    let c = g.tablet.json(&["conflicts"])["conflicts"][0].clone();
    assert_eq!(
        (c["entity_id"].clone(), c["reason"].clone()),
        (json!(deleted_there), json!("stale_base"))
    );
    assert_eq!(field(&c, "_deleted")["mine"]["value"], json!(true));
    assert_eq!(field(&c, "notes")["theirs"]["value"], json!("curls"));
    g.tablet.ok(&["resolve", "workout", &deleted_there, "--keep", "mine"]);
    assert_eq!(g.tablet.json(&["sync"])["status"]["unsynced"], json!(0));
    let (_, _, deleted) = relay_doc(&g.relay, &deleted_there);
    assert!(deleted);
    assert!(
        archive(&g.relay, &deleted_there, "resolution")
            .iter()
            .any(|a| a.losing_json == "\"curls\"")
    );
    g.phone.ok(&["sync"]);
    assert_eq!(g.phone.get("workout", &edited_there)["deleted"], json!(false));
    assert_eq!(g.phone.get("workout", &deleted_there)["deleted"], json!(true));
}

/// Waits until the wall clock has passed `peer`'s last HLC stamp: the processes of this machine
/// share one clock, so the next write of any device is stamped later than every write of `peer`.
fn wait_past_last_stamp(peer: &Peer) {
    let conn = rusqlite::Connection::open(peer.data.join("device.db")).unwrap();
    let stored: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'hlc_last'", [], |r| r.get(0))
        .unwrap();
    let last: fieldsync_schema::Hlc = serde_json::from_str(&stored).unwrap();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    while now_ms() <= last.physical_ms {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
