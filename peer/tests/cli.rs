//! The `fieldsync-peer` binary on real directories, one process per command.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use fieldsync_peer::Device;
use fieldsync_schema::wire::{SpaceGrant, UserInfo};
use fieldsync_schema::{ManualTime, Role};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::Value;
use uuid::Uuid;

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fieldsync-peer"))
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn fail(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(!out.status.success(), "{args:?} should have failed");
    assert!(out.stdout.is_empty(), "errors go to stderr only");
    String::from_utf8(out.stderr).unwrap()
}

fn json(dir: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&ok(dir, args)).unwrap()
}

fn init() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    ok(d.path(), &["init"]);
    d
}

fn put(dir: &Path, ty: &str, fields: &str) -> String {
    ok(dir, &["put", ty, "--json", fields])
}

fn queue_ids(dir: &Path) -> Vec<String> {
    json(dir, &["queue", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["mutation_id"].as_str().unwrap().to_string())
        .collect()
}

/// Enrolls the device through the library (the network handshake is another issue).
fn enroll(dir: &Path, role: Role) {
    let time = ManualTime::new(1_795_000_000_000);
    let mut dev = Device::open(dir, Arc::new(time), Box::new(ChaCha20Rng::seed_from_u64(1))).unwrap();
    let space = Uuid::from_bytes([5; 16]);
    let user = UserInfo {
        user_id: Uuid::from_bytes([1; 16]),
        name: "dana".into(),
        spaces: vec![SpaceGrant {
            space_id: space,
            name: "clinic".into(),
            role,
        }],
    };
    dev.enroll_complete("ws://relay.test", Uuid::from_bytes([7; 16]), user, space)
        .unwrap();
}

#[test]
fn writes_persist_across_process_restarts() {
    let d = init();
    let id = put(d.path(), "patient", r#"{"name": "Ada"}"#);
    Uuid::parse_str(&id).unwrap();
    let got = json(d.path(), &["get", "patient", &id, "--json"]);
    assert_eq!(got["fields"]["name"], "Ada");
    assert_eq!(
        ok(d.path(), &["put", "patient", &id, "--json", r#"{"mrn": "A-1"}"#]),
        id
    );
    let list = json(d.path(), &["list", "patient", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["fields"]["mrn"], "A-1");
    assert_eq!(list[0]["fields"]["name"], "Ada");
    let status = json(d.path(), &["status", "--json"]);
    assert_eq!(
        status["unsynced"], 1,
        "create and update combined before the first send"
    );
    assert_eq!(status["state"], "offline");
    assert_eq!(status["enrolled"], Value::Null);
    assert!(ok(d.path(), &["status"]).contains("not enrolled"));
    let filtered = json(d.path(), &["list", "patient", "--where", "mrn=A-1", "--json"]);
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    let none = json(d.path(), &["list", "patient", "--where", "mrn=B", "--json"]);
    assert!(none.as_array().unwrap().is_empty());
}

#[test]
fn an_invalid_write_changes_nothing_and_names_the_field() {
    let d = init();
    let id = put(d.path(), "patient", r#"{"name": "Ada"}"#);
    let before = (
        json(d.path(), &["queue", "--json"]),
        json(d.path(), &["get", "patient", &id, "--json"]),
    );
    let err = fail(
        d.path(),
        &[
            "put",
            "patient",
            &id,
            "--json",
            r#"{"name": null, "date_of_birth": "yesterday"}"#,
        ],
    );
    assert!(err.contains("name") && err.contains("date_of_birth"), "{err}");
    let err = fail(
        d.path(),
        &["put", "session", "--json", r#"{"started_at": "2026-11-22T09:30:00Z"}"#],
    );
    assert!(err.contains("patient_id"), "{err}");
    let after = (
        json(d.path(), &["queue", "--json"]),
        json(d.path(), &["get", "patient", &id, "--json"]),
    );
    assert_eq!(before, after);
    assert!(
        json(d.path(), &["list", "session", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(fail(d.path(), &["put", "spaceship", "--json", "{}"]).contains("spaceship"));
    assert!(fail(d.path(), &["get", "patient", &Uuid::nil().to_string()]).contains("no entity"));
    assert!(fail(d.path(), &["put", "patient", "--json", "[1]"]).contains("JSON object"));
    let empty = tempfile::tempdir().unwrap();
    assert!(fail(empty.path(), &["status"]).contains("init"));
}

#[test]
fn outbox_order_is_write_order_and_ids_are_stable_across_restarts() {
    let d = init();
    let a = put(d.path(), "patient", r#"{"name": "A"}"#);
    let b = put(d.path(), "patient", r#"{"name": "B"}"#);
    ok(d.path(), &["put", "patient", &a, "--json", r#"{"mrn": "1"}"#]);
    ok(d.path(), &["delete", "patient", &b]);
    let q = json(d.path(), &["queue", "--json"]);
    let order: Vec<(String, String)> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["entity_id"].as_str().unwrap().into(),
                i["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            (a.clone(), "create".into()),
            (b.clone(), "create".into()),
            (a, "update".into()),
            (b, "delete".into())
        ]
    );
    let ids = queue_ids(d.path());
    assert_eq!(queue_ids(d.path()), ids);
    assert_eq!(json(d.path(), &["queue", "--json"]), q);
    assert!(ok(d.path(), &["queue"]).contains(&ids[0]));
    let r = json(d.path(), &["retry", "--json"]);
    assert_eq!(r["made_due"], 0);
}

#[test]
fn a_signed_note_and_a_locked_form_refuse_edits() {
    let d = init();
    let p = put(d.path(), "patient", r#"{"name": "Ada"}"#);
    let n = put(
        d.path(),
        "note",
        &format!(r#"{{"patient_id": "{p}", "body": "Knee stable."}}"#),
    );
    assert!(fail(d.path(), &["sign", &n]).contains("not enrolled"));
    enroll(d.path(), Role::Clinician);
    ok(d.path(), &["note-edit", &n, "--text", "Knee stable. ROM improved."]);
    ok(d.path(), &["sign", &n]);
    let note = json(d.path(), &["get", "note", &n, "--json"]);
    assert_eq!(note["signed"], true);
    assert_eq!(note["fields"]["body"], "Knee stable. ROM improved.");
    let queued = queue_ids(d.path()).len();
    let err = fail(d.path(), &["note-edit", &n, "--text", "changed"]);
    assert!(err.contains("signed") && err.contains("read-only"), "{err}");
    assert!(fail(d.path(), &["delete", "note", &n]).contains("signed"));

    let form = put(
        d.path(),
        "intake_form",
        &format!(r#"{{"patient_id": "{p}", "answers": "None."}}"#),
    );
    ok(d.path(), &["lock", "intake_form", &form]);
    let queued_after_lock = queue_ids(d.path()).len();
    let err = fail(
        d.path(),
        &["put", "intake_form", &form, "--json", r#"{"answers": "Peanuts."}"#],
    );
    assert!(err.contains("locked"), "{err}");
    assert_eq!(queue_ids(d.path()).len(), queued_after_lock);
    assert!(queued_after_lock > queued);
    let form_now = json(d.path(), &["get", "intake_form", &form, "--json"]);
    assert_eq!(
        (form_now["fields"]["answers"].clone(), form_now["locked"].clone()),
        ("None.".into(), true.into())
    );
    assert!(fail(d.path(), &["lock", "patient", &p]).contains("cannot be locked"));
}

#[test]
fn counters_and_saved_documents() {
    let d = init();
    let v = put(d.path(), "volume", r#"{"week": "2026-11-16"}"#);
    ok(d.path(), &["incr", "volume", &v, "legs_sets", "4"]);
    ok(d.path(), &["incr", "volume", &v, "legs_sets", "-1"]);
    assert!(fail(d.path(), &["incr", "volume", &v, "legs_sets", "-9"]).contains("minimum"));
    let file = d.path().join("volume.automerge");
    let got = json(
        d.path(),
        &["get", "volume", &v, "--save", file.to_str().unwrap(), "--json"],
    );
    assert_eq!(got["fields"]["legs_sets"], 3);
    let bytes = std::fs::read(&file).unwrap();
    let doc = automerge::AutoCommit::load(&bytes).unwrap();
    use automerge::ReadDoc;
    let (value, _) = doc.get(automerge::ROOT, "legs_sets").unwrap().unwrap();
    assert_eq!(value.as_i64(), Some(3));
}

#[test]
fn export_then_import_on_a_fresh_dir_reproduces_every_entity_and_the_outbox() {
    let d = init();
    let p = put(d.path(), "patient", r#"{"name": "Ada", "date_of_birth": "1815-12-10"}"#);
    put(
        d.path(),
        "session",
        &format!(r#"{{"patient_id": "{p}", "started_at": "2026-11-22T09:30:00Z"}}"#),
    );
    put(
        d.path(),
        "note",
        &format!(r#"{{"patient_id": "{p}", "body": "Seen."}}"#),
    );
    let gone = put(d.path(), "patient", r#"{"name": "Gone"}"#);
    ok(d.path(), &["delete", "patient", &gone]);
    let backup = d.path().join("backup.fsync");
    let report = json(d.path(), &["export", backup.to_str().unwrap(), "--json"]);
    assert_eq!(report["entities"], 4);
    assert!(fail(d.path(), &["export", backup.to_str().unwrap()]).contains("exists"));

    let fresh = tempfile::tempdir().unwrap();
    let target = fresh.path().join("restored");
    ok(&target, &["import", backup.to_str().unwrap()]);
    for ty in ["patient", "session", "note"] {
        let args = ["list", ty, "--deleted", "--json"];
        assert_eq!(json(&target, &args), json(d.path(), &args), "{ty}");
    }
    assert_eq!(
        json(&target, &["queue", "--all", "--json"]),
        json(d.path(), &["queue", "--all", "--json"])
    );
    let (s1, s2) = (
        json(&target, &["status", "--json"]),
        json(d.path(), &["status", "--json"]),
    );
    assert_eq!(
        (s1["device_id"].clone(), s1["unsynced"].clone()),
        (s2["device_id"].clone(), s2["unsynced"].clone())
    );
    // The restored device keeps working.
    put(&target, "patient", r#"{"name": "After"}"#);

    assert!(fail(&target, &["import", backup.to_str().unwrap()]).contains("already holds a device"));
    let junk = fresh.path().join("junk.db");
    std::fs::write(&junk, b"definitely not sqlite").unwrap();
    let other = fresh.path().join("other");
    let err = fail(&other, &["import", junk.to_str().unwrap()]);
    assert!(err.contains("junk.db"), "{err}");
    assert!(!other.join("device.db").exists());
}

#[test]
fn sign_out_is_refused_while_unsynced_unless_exported_or_forced() {
    let d = init();
    put(d.path(), "patient", r#"{"name": "Ada"}"#);
    let err = fail(d.path(), &["sign-out"]);
    assert!(err.contains("not confirmed") && err.contains("export"), "{err}");
    assert!(d.path().join("device.db").exists());
    let backup = d.path().join("b1");
    ok(d.path(), &["export", backup.to_str().unwrap()]);
    // A write after the export makes the backup stale again.
    put(d.path(), "patient", r#"{"name": "Bo"}"#);
    fail(d.path(), &["sign-out"]);
    let backup2 = d.path().join("b2");
    ok(d.path(), &["export", backup2.to_str().unwrap()]);
    let out = json(d.path(), &["sign-out", "--json"]);
    assert_eq!(out["forced"], false);
    assert!(!d.path().join("device.db").exists());
    assert!(fail(d.path(), &["status"]).contains("init"));

    let e = init();
    put(e.path(), "patient", r#"{"name": "Ada"}"#);
    let out = json(e.path(), &["sign-out", "--force", "--json"]);
    assert_eq!(
        (out["forced"].clone(), out["unsynced_at_sign_out"].clone()),
        (true.into(), 1.into())
    );
    assert!(!e.path().join("device.db").exists());
    // Nothing unsynced: sign-out needs nothing.
    let f = init();
    ok(f.path(), &["sign-out"]);
}

#[test]
fn a_sigkill_mid_burst_loses_no_committed_write() {
    let d = init();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fieldsync-peer"))
        .arg("--data")
        .arg(d.path())
        .args(["burst", "--count", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut committed = Vec::new();
    while committed.len() < 150 {
        let line = lines.next().unwrap().unwrap();
        committed.push(line.strip_prefix("committed ").unwrap().to_string());
    }
    child.kill().unwrap(); // SIGKILL on Unix
    // Every line already written was written after its commit.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(id) = line.strip_prefix("committed ") {
            committed.push(id.to_string());
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the burst must have been killed, not finished");

    let dev = Device::open(
        d.path(),
        Arc::new(ManualTime::new(0)),
        Box::new(ChaCha20Rng::seed_from_u64(3)),
    )
    .unwrap();
    let conn = dev.connection();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");
    for id in &committed {
        let e = dev.get(Uuid::parse_str(id).unwrap()).unwrap();
        assert!(e.is_some(), "committed write {id} was lost");
    }
    let entities: i64 = conn
        .query_row("SELECT COUNT(*) FROM entities", [], |r| r.get(0))
        .unwrap();
    assert!(entities as usize >= committed.len());
    // Outbox and entities agree: one create per entity, none dangling.
    let outbox: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).unwrap();
    let unmatched: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM entities e WHERE (SELECT COUNT(*) FROM outbox o WHERE o.entity_id = e.entity_id \
             AND o.kind = 'create') != 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let fk: i64 = conn
        .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!((outbox, unmatched, fk), (entities, 0, 0));
    assert_eq!(dev.status().unwrap().unsynced as i64, entities);
    drop(dev);
    // And the CLI opens it as usual.
    assert_eq!(json(d.path(), &["status", "--json"])["unsynced"], entities);
}

#[test]
fn conflict_commands_report_nothing_to_do_clearly_and_fail_on_stderr() {
    let d = init();
    let p = put(d.path(), "patient", r#"{"name": "Ada"}"#);
    assert_eq!(ok(d.path(), &["conflicts"]), "no conflicts or rejected changes");
    assert_eq!(
        json(d.path(), &["conflicts", "--json"]),
        serde_json::json!({"conflicts": [], "rejections": []})
    );
    assert_eq!(
        json(d.path(), &["conflicts", "--lww", "--json"]),
        serde_json::json!({"lww_losses": []})
    );
    let err = fail(d.path(), &["resolve", "patient", &p, "--keep", "mine"]);
    assert!(err.contains("no unresolved conflict"), "{err}");
    let err = fail(d.path(), &["resolve", "patient", &p, "--discard"]);
    assert!(err.contains("no refused change"), "{err}");
    let err = fail(d.path(), &["resolve", "patient", &p]);
    assert!(err.contains("--keep"), "a resolution must say how: {err}");
    let err = fail(d.path(), &["resolve", "patient", &p, "--keep", "mine", "--discard"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = fail(d.path(), &["resolve", "workout", &p, "--keep", "mine"]);
    assert!(err.contains("not a `workout`"), "{err}");
    let err = fail(d.path(), &["undo", "42"]);
    assert!(err.contains("no LWW loss 42"), "{err}");
}
