//! The offline / intermittent / online parity matrix of reference document 002, through the
//! real CLI and the real relay: every essential workflow works without a network and converges
//! once one is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_tests::{Peer, Relay};
use serde_json::json;

fn clinic(dir: &std::path::Path) -> Relay {
    let relay = Relay::start(&dir.join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician"), ("sam", "clinician")]);
    relay
}

#[test]
fn create_read_edit_delete_offline_then_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = clinic(dir.path());
    let a = Peer::init(&dir.path().join("a"));
    let b = Peer::init(&dir.path().join("b"));
    a.enroll(&relay, "dana");
    b.enroll(&relay, "sam");
    relay.stop();

    // Offline: every essential operation works and nothing waits for the network.
    let p = a.put("patient", r#"{"name": "Ada"}"#);
    let gone = a.put("patient", r#"{"name": "Temp"}"#);
    assert_eq!(a.get("patient", &p)["fields"]["name"], json!("Ada"));
    a.ok(&["put", "patient", &p, "--json", r#"{"mrn": "M-1"}"#]);
    a.ok(&["delete", "patient", &gone]);
    let status = a.status();
    assert_eq!(status["state"], json!("offline"));
    assert_eq!(status["unsynced"], json!(4));
    // A sync attempt fails clearly and loses nothing.
    let err = a.fails(&["sync"]);
    assert!(
        err.contains("cannot reach the relay") && err.contains("stay queued"),
        "{err}"
    );
    assert_eq!(a.status()["unsynced"], json!(4));

    // Online again: everything goes out, and the other device receives it.
    relay.restart();
    let summary = a.json(&["sync"]);
    assert_eq!(summary["summary"]["applied"], json!(4), "{summary}");
    assert_eq!(a.status()["state"], json!("synced"));
    b.ok(&["sync"]);
    let got = b.get("patient", &p);
    assert_eq!(got["fields"], json!({"name": "Ada", "mrn": "M-1"}));
    let listed = b.json(&["list", "patient"]);
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "the deleted patient is not listed: {listed}"
    );
    let with_deleted = b.json(&["list", "patient", "--deleted"]);
    assert_eq!(with_deleted.as_array().unwrap().len(), 2, "the tombstone syncs too");
}

#[test]
fn a_device_restarted_offline_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = clinic(dir.path());
    let a = Peer::init(&dir.path().join("a"));
    a.enroll(&relay, "dana");
    relay.stop();
    let p = a.put("patient", r#"{"name": "Ada"}"#);
    // Each CLI command is a fresh process: this is a restart between every write.
    let s = a.put(
        "session",
        &format!(r#"{{"patient_id": "{p}", "started_at": "2026-11-22T09:00:00Z", "status": "in_progress"}}"#),
    );
    a.ok(&["put", "session", &s, "--json", r#"{"status": "completed"}"#]);
    let queue = a.json(&["queue"]);
    assert_eq!(
        queue.as_array().unwrap().len(),
        2,
        "create and update of the session combine: {queue}"
    );
    relay.restart();
    a.ok(&["sync"]);
    assert_eq!(a.status()["unsynced"], json!(0));
    let b = Peer::init(&dir.path().join("b"));
    b.enroll(&relay, "sam");
    b.ok(&["sync"]);
    assert_eq!(b.get("session", &s)["fields"]["status"], json!("completed"));
}

#[test]
fn local_data_stays_usable_after_the_device_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let relay = clinic(dir.path());
    let a = Peer::init(&dir.path().join("a"));
    a.enroll(&relay, "dana");
    let p = a.put("patient", r#"{"name": "Ada"}"#);
    a.ok(&["sync"]);
    let device = a.status()["device_id"].as_str().unwrap().to_string();
    relay.admin(&["device", "revoke", &device]);

    let err = a.fails(&["sync"]);
    assert!(err.contains("revoked"), "{err}");
    let status = a.status();
    assert_eq!(status["state"], json!("auth_failed"), "{status}");
    // Reading and writing still work: credentials gate sync, never local use.
    assert_eq!(a.get("patient", &p)["fields"]["name"], json!("Ada"));
    a.ok(&["put", "patient", &p, "--json", r#"{"mrn": "after-revoke"}"#]);
    assert_eq!(a.get("patient", &p)["fields"]["mrn"], json!("after-revoke"));
    assert_eq!(a.status()["unsynced"], json!(1));
}

#[test]
fn enrollment_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let relay = clinic(dir.path());
    let a = Peer::init(&dir.path().join("a"));
    let err = a.fails(&["enroll", "--relay", &relay.url(), "--token", "fse_nonsense"]);
    assert!(err.contains("invalid_token"), "{err}");
    let err = a.fails(&["enroll", "--relay", "http://nope", "--token", "x"]);
    assert!(err.contains("not a relay address"), "{err}");
    let err = a.fails(&["sync"]);
    assert!(err.contains("not enrolled"), "{err}");
}
