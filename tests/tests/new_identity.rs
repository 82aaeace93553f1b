//! A revoked device's work is not stranded (issue 19), over the real binaries: the device
//! knows it is revoked, keeps accepting writes with a warning, and `enroll --new-identity`
//! with a new token carries every unsynced change to a fresh identity the relay records as its
//! replacement — never for a device ordered to wipe, never for one still active.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_tests::{Peer, Relay};
use serde_json::{Value, json};

fn names(peer: &Peer) -> Vec<String> {
    let mut names: Vec<String> = peer
        .json(&["list", "patient"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["fields"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn a_device_revoked_by_mistake_carries_its_unsynced_changes_to_a_new_identity() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let tablet = Peer::init(&dir.path().join("tablet"));
    tablet.enroll(&relay, "dana");
    tablet.put("patient", r#"{"name": "Synced Before"}"#);
    tablet.ok(&["sync"]);
    tablet.put("patient", r#"{"name": "Offline One"}"#);
    tablet.put("patient", r#"{"name": "Offline Two"}"#);
    let old_id = tablet.status()["device_id"].as_str().unwrap().to_string();

    relay.admin(&["device", "revoke", &old_id]);
    let refused = tablet.fails(&["sync"]);
    assert!(refused.contains("revoked"), "{refused}");
    let status = tablet.ok(&["status"]);
    assert!(status.contains("enroll --new-identity"), "{status}");
    // Writes still work locally, with a warning that they cannot sync.
    let out = tablet.run(&["put", "patient", "--json", r#"{"name": "Written While Revoked"}"#]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"), "{out:?}");
    assert_eq!(tablet.status()["unsynced"], json!(3));
    // The same identity cannot come back.
    let again = tablet.fails(&["enroll", "--relay", &relay.url(), "--token", &relay.token("dana")]);
    assert!(again.contains("already enrolled"), "{again}");

    let report = tablet.json(&["enroll", "--new-identity", "--token", &relay.token("dana")]);
    assert_eq!(report["old_device_id"], json!(old_id));
    assert_eq!(report["carried"], json!(3), "{report}");
    let new_id = report["new_device_id"].as_str().unwrap().to_string();
    assert_ne!(new_id, old_id);
    assert_eq!(tablet.status()["device_id"], json!(new_id));

    let summary = tablet.ok(&["sync"]);
    assert_eq!(tablet.status()["unsynced"], json!(0), "{summary}");
    let stats = relay.admin(&["stats"]);
    assert_eq!(stats["counts"]["documents"], json!(4), "{stats}");
    let phone = Peer::init(&dir.path().join("phone"));
    phone.enroll(&relay, "dana");
    phone.ok(&["sync"]);
    assert_eq!(
        names(&phone),
        ["Offline One", "Offline Two", "Synced Before", "Written While Revoked"]
    );
    // The relay's device list says which device the new identity replaces.
    let devices = relay.admin(&["device", "list"]);
    let new_row: &Value = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == json!(new_id))
        .unwrap();
    assert_eq!(new_row["replaces"], json!(old_id), "{devices}");
    // Edits after the hand-over keep working on records the old identity created.
    let first = phone.json(&["list", "patient", "--where", "name=Offline One"])[0]["entity_id"]
        .as_str()
        .unwrap()
        .to_string();
    tablet.ok(&["put", "patient", &first, "--json", r#"{"name": "Offline One, edited"}"#]);
    tablet.ok(&["sync"]);
    phone.ok(&["sync"]);
    assert_eq!(
        phone.get("patient", &first)["fields"]["name"],
        json!("Offline One, edited")
    );
}

#[test]
fn a_new_identity_is_refused_for_a_device_ordered_to_wipe_or_still_active() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);

    // Still active: it syncs its own changes.
    let active = Peer::init(&dir.path().join("active"));
    active.enroll(&relay, "dana");
    let token = relay.token("dana");
    let refused = active.fails(&["enroll", "--new-identity", "--token", &token]);
    assert!(refused.contains("is not revoked"), "{refused}");

    // Revoked with a wipe: its data is meant to be gone, not carried anywhere.
    let lost = Peer::init(&dir.path().join("lost"));
    lost.enroll(&relay, "dana");
    lost.put("patient", r#"{"name": "Never Carried"}"#);
    let lost_id = lost.status()["device_id"].as_str().unwrap().to_string();
    relay.admin(&["device", "revoke", &lost_id, "--wipe"]);
    let refused = lost.fails(&["enroll", "--new-identity", "--token", &token]);
    assert!(refused.contains("ordered to erase"), "{refused}");
    assert_eq!(
        lost.status()["device_id"],
        json!(lost_id),
        "nothing changed on the device"
    );
    // The refused attempts did not use up the token.
    let fresh = Peer::init(&dir.path().join("fresh"));
    fresh.ok(&["enroll", "--relay", &relay.url(), "--token", &token]);
    assert_eq!(relay.admin(&["stats"])["counts"]["documents"], json!(0));
}
