//! Who owns which field, superseded requests and duplicates end to end (SPEC §17), over the
//! real relay and device binaries: the four scenarios of the running and workout apps'
//! reference documents, each checked field by field on the relay and both devices, with the
//! audit trail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_relay::store::AuditRow;
use fieldsync_tests::relay_files::RelayFiles;
use fieldsync_tests::{Peer, Relay};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// One runner's phone (and tablet) and the service that imports the watch's data.
struct Runner {
    _dir: tempfile::TempDir,
    relay: Relay,
    phone: Peer,
    tablet: Peer,
    importer: Peer,
}

fn runner() -> Runner {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("alex", &[("alex", "patient"), ("importer", "service")]);
    let phone = Peer::init(&dir.path().join("phone"));
    let tablet = Peer::init(&dir.path().join("tablet"));
    let importer = Peer::init(&dir.path().join("importer"));
    phone.enroll(&relay, "alex");
    tablet.enroll(&relay, "alex");
    importer.enroll(&relay, "importer");
    Runner {
        _dir: dir,
        relay,
        phone,
        tablet,
        importer,
    }
}

fn sync(p: &Peer) -> Value {
    p.json(&["sync"])["summary"].clone()
}

fn device_id(p: &Peer) -> Uuid {
    p.status()["device_id"].as_str().unwrap().parse().unwrap()
}

fn fields(p: &Peer, ty: &str, id: &str) -> Map<String, Value> {
    p.get(ty, id)["fields"].as_object().unwrap().clone()
}

fn relay_fields(r: &Relay, id: &str) -> Map<String, Value> {
    RelayFiles::open(&r.data).fields(id.parse().unwrap())
}

fn audit_of(r: &Relay, id: &str) -> Vec<AuditRow> {
    let id: Uuid = id.parse().unwrap();
    RelayFiles::open(&r.data)
        .audit()
        .into_iter()
        .filter(|a| a.entity_id == id)
        .collect()
}

/// Asserts every expected field, and that `absent` fields are not there.
fn assert_fields(at: &str, got: &Map<String, Value>, expect: &Value, absent: &[&str]) {
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(got.get(k), Some(v), "{at}: `{k}` in {got:?}");
    }
    for k in absent {
        assert!(!got.contains_key(*k), "{at}: `{k}` should be absent from {got:?}");
    }
}

#[test]
fn the_watch_import_and_the_phones_notes_merge_into_one_workout_without_a_prompt() {
    let r = runner();
    let w = r.phone.put(
        "workout",
        r#"{"name": "Morning run", "activity_type": "run", "started_at": "2026-11-22T07:00:00Z"}"#,
    );
    sync(&r.phone);
    sync(&r.importer);
    // Offline on both sides: the runner writes how it felt, the service imports what was measured.
    r.phone.ok(&[
        "put",
        "workout",
        &w,
        "--json",
        r#"{"notes": "Hills hurt", "rpe": 7.5, "feeling": "good"}"#,
    ]);
    r.importer.ok(&[
        "put",
        "workout",
        &w,
        "--json",
        r#"{"distance_m": 10012.5, "avg_pace_s_per_km": 312.0, "avg_hr": 152, "max_hr": 181, "duration_min": 52, "source": "garmin"}"#,
    ]);
    assert_eq!(sync(&r.importer)["applied"], json!(1));
    let phone_sync = sync(&r.phone);
    assert_eq!(
        (phone_sync["applied"].clone(), phone_sync["conflicts"].clone()),
        (json!(1), json!(0))
    );
    sync(&r.importer);
    let expect = json!({
        "name": "Morning run", "activity_type": "run", "started_at": "2026-11-22T07:00:00Z",
        "distance_m": 10012.5, "avg_pace_s_per_km": 312.0, "avg_hr": 152, "max_hr": 181, "duration_min": 52,
        "source": "garmin", "notes": "Hills hurt", "rpe": 7.5, "feeling": "good",
    });
    assert_fields("relay", &relay_fields(&r.relay, &w), &expect, &["duplicate_of"]);
    assert_fields("phone", &fields(&r.phone, "workout", &w), &expect, &[]);
    assert_fields("importer", &fields(&r.importer, "workout", &w), &expect, &[]);
    for p in [&r.phone, &r.importer] {
        assert_eq!(p.status()["state"], json!("synced"));
    }
    // The audit trail shows both writers, each with what it wrote.
    let audit = audit_of(&r.relay, &w);
    let writers: Vec<(Uuid, &str)> = audit.iter().map(|a| (a.device_id, a.kind.as_str())).collect();
    let (phone_id, importer_id) = (device_id(&r.phone), device_id(&r.importer));
    assert_eq!(
        writers,
        vec![(phone_id, "create"), (importer_id, "update"), (phone_id, "update")]
    );
    assert!(audit[1].after_json.contains("\"avg_hr\":152") && !audit[1].after_json.contains("Hills"));
    assert!(audit[2].after_json.contains("Hills hurt") && audit[2].after_json.contains("\"avg_hr\":152"));
    // Neither side may write the other's fields: refused on the device, with the owner named.
    let refused = r.phone.fails(&["put", "workout", &w, "--json", r#"{"avg_hr": 140}"#]);
    assert!(
        refused.contains("`avg_hr` of `workout` is owned by the service"),
        "{refused}"
    );
    let refused = r.importer.fails(&["put", "workout", &w, "--json", r#"{"rpe": 3}"#]);
    assert!(refused.contains("`rpe` of `workout` is owned by the user"), "{refused}");
    assert_eq!(r.phone.status()["unsynced"], json!(0));
}

#[test]
fn an_offline_reschedule_is_superseded_by_the_new_adaptive_plan_and_kept_with_a_notice() {
    let r = runner();
    let plan = r.importer.put("plan", r#"{"name": "Base block", "plan_version": 1}"#);
    sync(&r.importer);
    sync(&r.phone);
    // Offline, the runner asks to move Tuesday's workout; the backend regenerates the plan.
    let req = r.phone.put(
        "plan_change_request",
        &json!({"plan_id": plan, "plan_version": 1, "workout_date": "2026-11-24", "move_to": "2026-11-25", "reason": "travel"})
            .to_string(),
    );
    r.importer.ok(&[
        "put",
        "plan",
        &plan,
        "--json",
        r#"{"plan_version": 2, "details": "adaptive"}"#,
    ]);
    sync(&r.importer);
    assert_eq!(sync(&r.phone)["applied"], json!(1));
    // The service sees a request against an older plan version and supersedes it.
    sync(&r.importer);
    assert_eq!(
        fields(&r.importer, "plan_change_request", &req)["plan_version"],
        json!(1)
    );
    let notice = "Your plan was regenerated after Sunday's long run; Tuesday's workout moved already.";
    r.importer
        .ok(&["supersede", &req, "--version", "2", "--notice", notice]);
    // Meanwhile the runner adds to the request offline: their field, no prompt.
    r.phone.ok(&[
        "put",
        "plan_change_request",
        &req,
        "--json",
        r#"{"reason": "travel to Lyon"}"#,
    ]);
    sync(&r.importer);
    assert_eq!(sync(&r.phone)["conflicts"], json!(0));
    sync(&r.phone);
    let listed = r.phone.json(&["superseded"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["entity_id"], json!(req));
    assert_eq!(listed[0]["request_for"], json!("plan"));
    assert_eq!(listed[0]["superseded_by_version"], json!(2));
    assert_eq!(listed[0]["notice"], json!(notice));
    assert!(r.phone.ok(&["superseded"]).contains("superseded by plan version 2"));
    assert_eq!(r.phone.status()["superseded_requests"], json!(1));
    // Nothing deleted: the request keeps what the runner asked, the plan is the service's.
    let expect = json!({"plan_id": plan, "plan_version": 1, "workout_date": "2026-11-24", "move_to": "2026-11-25",
        "reason": "travel to Lyon", "superseded_by_version": 2, "superseded_notice": notice});
    assert_fields("relay", &relay_fields(&r.relay, &req), &expect, &[]);
    assert_fields("phone", &fields(&r.phone, "plan_change_request", &req), &expect, &[]);
    assert_eq!(r.phone.get("plan_change_request", &req)["deleted"], json!(false));
    assert_eq!(fields(&r.phone, "plan", &plan)["plan_version"], json!(2));
    let kinds: Vec<(Uuid, String)> = audit_of(&r.relay, &req)
        .into_iter()
        .map(|a| (a.device_id, a.kind))
        .collect();
    let (phone_id, importer_id) = (device_id(&r.phone), device_id(&r.importer));
    assert_eq!(
        kinds,
        vec![
            (phone_id, "create".into()),
            (importer_id, "update".into()),
            (phone_id, "update".into())
        ]
    );
    // The runner cannot take the notice away.
    let refused = r.phone.fails(&[
        "put",
        "plan_change_request",
        &req,
        "--json",
        r#"{"superseded_notice": null}"#,
    ]);
    assert!(refused.contains("owned by the service"), "{refused}");
}

#[test]
fn a_watch_import_and_a_manual_log_of_one_run_are_flagged_and_merged_by_authority() {
    let r = runner();
    let manual = r.phone.put(
        "workout",
        r#"{"name": "Run", "activity_type": "run", "started_at": "2026-11-22T07:03:00Z", "distance_m": 10000.0,
            "duration_min": 50, "rpe": 7.0, "feeling": "tired", "notes": "logged by hand"}"#,
    );
    sync(&r.phone);
    let watch = r.importer.put(
        "workout",
        r#"{"name": "Morning Run", "activity_type": "run", "started_at": "2026-11-22T07:00:00Z",
            "distance_m": 10012.5, "duration_min": 52, "avg_hr": 152, "max_hr": 181, "source": "garmin"}"#,
    );
    sync(&r.importer);
    assert_eq!(
        relay_fields(&r.relay, &watch)["duplicate_of"],
        json!(manual),
        "the relay flagged it"
    );
    sync(&r.phone);
    assert_eq!(r.phone.status()["possible_duplicates"], json!(1));
    let listed = r.phone.json(&["duplicates"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(
        (listed[0]["entity_id"].clone(), listed[0]["duplicate_of"].clone()),
        (json!(watch), json!(manual))
    );
    assert!(r.phone.ok(&["duplicates"]).contains(&format!("--merge {watch}")));

    let report = r.phone.json(&["duplicates", "--merge", &watch]);
    assert_eq!(
        (report["survivor"].clone(), report["merged"].clone()),
        (json!(watch), json!(manual))
    );
    sync(&r.phone);
    sync(&r.importer);
    // The wearable's measurements, the manual log's feelings, in one record.
    let expect = json!({
        "name": "Morning Run", "activity_type": "run", "started_at": "2026-11-22T07:00:00Z",
        "distance_m": 10012.5, "duration_min": 52, "avg_hr": 152, "max_hr": 181, "source": "garmin",
        "rpe": 7.0, "feeling": "tired", "notes": "logged by hand",
    });
    for (at, got) in [
        ("relay", relay_fields(&r.relay, &watch)),
        ("phone", fields(&r.phone, "workout", &watch)),
        ("importer", fields(&r.importer, "workout", &watch)),
    ] {
        assert_fields(at, &got, &expect, &["duplicate_of", "merged_into"]);
    }
    // The manual log is a tombstone naming the survivor, its own values kept in it.
    let tomb = r.importer.get("workout", &manual);
    assert_eq!(tomb["deleted"], json!(true));
    assert_fields(
        "tombstone",
        tomb["fields"].as_object().unwrap(),
        &json!({"merged_into": watch, "distance_m": 10000.0, "rpe": 7.0, "notes": "logged by hand"}),
        &[],
    );
    assert_eq!(r.phone.status()["possible_duplicates"], json!(0));
    assert_eq!(r.phone.json(&["duplicates"]), json!([]));
    // Both histories are kept, each write audited with its writer.
    let (phone_id, importer_id) = (device_id(&r.phone), device_id(&r.importer));
    let of = |id: &str| -> Vec<(Uuid, String)> {
        audit_of(&r.relay, id)
            .into_iter()
            .map(|a| (a.device_id, a.kind))
            .collect()
    };
    assert_eq!(
        of(&manual),
        vec![(phone_id, "create".into()), (phone_id, "delete".into())]
    );
    assert_eq!(
        of(&watch),
        vec![(importer_id, "create".into()), (phone_id, "update".into())]
    );
}

#[test]
fn two_workouts_logged_on_two_devices_at_the_same_time_are_both_kept_until_the_user_decides() {
    let r = runner();
    let a = r.phone.put(
        "workout",
        r#"{"name": "Push day", "activity_type": "strength", "started_at": "2026-11-22T18:00:00Z", "notes": "bench"}"#,
    );
    let b = r.tablet.put(
        "workout",
        r#"{"name": "Push", "activity_type": "strength", "started_at": "2026-11-22T18:04:00Z", "notes": "dips"}"#,
    );
    sync(&r.phone);
    sync(&r.tablet);
    sync(&r.phone);
    for p in [&r.phone, &r.tablet] {
        let listed = p.json(&["duplicates"]);
        assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
        assert_eq!(
            (listed[0]["entity_id"].clone(), listed[0]["duplicate_of"].clone()),
            (json!(b), json!(a))
        );
    }
    // Nothing merged silently: both records whole, on every replica.
    for (id, notes) in [(&a, "bench"), (&b, "dips")] {
        assert_eq!(relay_fields(&r.relay, id)["notes"], json!(notes));
        assert_eq!(fields(&r.phone, "workout", id)["notes"], json!(notes));
    }
    // They were two workouts: the user keeps both.
    r.tablet.ok(&["duplicates", "--dismiss", &b]);
    sync(&r.tablet);
    sync(&r.phone);
    for p in [&r.phone, &r.tablet] {
        assert_eq!(p.json(&["duplicates"]), json!([]));
        assert_eq!(p.status()["possible_duplicates"], json!(0));
        assert_eq!(p.get("workout", &a)["deleted"], json!(false));
        assert_eq!(p.get("workout", &b)["deleted"], json!(false));
    }
    assert_fields(
        "relay",
        &relay_fields(&r.relay, &b),
        &json!({"name": "Push", "notes": "dips"}),
        &["duplicate_of"],
    );
    let kinds: Vec<String> = audit_of(&r.relay, &b).into_iter().map(|a| a.kind).collect();
    assert_eq!(kinds, vec!["create", "update"], "the dismissal is audited");
    // A flag on nothing is refused clearly.
    let refused = r.phone.fails(&["duplicates", "--dismiss", &a]);
    assert!(refused.contains("not flagged"), "{refused}");
}
