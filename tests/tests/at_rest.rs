//! What a device holds on its disk and on the wire (issue 19): the device database encrypted
//! at rest with the app's key, over the real `fieldsync-peer` and `fieldsync-relay` binaries;
//! frames compressed between a device and a relay that both read them; the types a device holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use fieldsync_peer::net;
use fieldsync_peer::sync::SyncMachine;
use fieldsync_tests::{Peer, Relay, open_device, plaintext_in, quiet, runtime};
use serde_json::{Value, json};

const KEY: &str = "5e1c0ffee5e1c0ffee5e1c0ffee5e1c0ffee5e1c0ffee5e1c0ffee5e1c0ffee5";
const OTHER_KEY: &str = "0b5e55ed0b5e55ed0b5e55ed0b5e55ed0b5e55ed0b5e55ed0b5e55ed0b5e55ed";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn key_file(dir: &Path, name: &str, hex: &str) -> std::path::PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, format!("{hex}\n")).unwrap();
    file
}

fn error_kind(peer: &Peer, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = peer.run(&args);
    assert!(!out.status.success(), "{args:?} unexpectedly succeeded");
    serde_json::from_slice::<Value>(&out.stderr)
        .or_else(|_| serde_json::from_slice::<Value>(&out.stdout))
        .unwrap()["kind"]
        .clone()
}

/// A clinic tablet created encrypted: its records sync as usual, no byte of a record is
/// readable in its files or its export, a wrong or missing key opens nothing (and changes
/// nothing), the export restores only with the key, and `rekey` moves it to a new key.
#[test]
fn an_encrypted_device_syncs_holds_no_plaintext_and_opens_only_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let key = key_file(dir.path(), "tablet.key", KEY);
    let other = key_file(dir.path(), "other.key", OTHER_KEY);
    let with_key = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--db-key-file".to_string(), p(&key).to_string()]);
        v
    };
    let tablet = Peer {
        data: dir.path().join("tablet"),
    };
    let run = |args: Vec<String>| tablet.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run(with_key(&["init"]));
    run(with_key(&[
        "enroll",
        "--relay",
        &relay.url(),
        "--token",
        &relay.token("dana"),
    ]));
    let id = run(with_key(&[
        "put",
        "patient",
        "--json",
        r#"{"name": "Quillon Verbatimsky", "mrn": "MRN-AT-REST-7"}"#,
    ]))
    .trim()
    .to_string();
    run(with_key(&["sync"]));
    let status: Value = serde_json::from_str(&run(with_key(&["status", "--json"]))).unwrap();
    assert_eq!(status["encrypted"], json!(true), "{status}");
    assert_eq!(status["unsynced"], json!(0), "{status}");
    for needle in ["Quillon Verbatimsky", "MRN-AT-REST-7", "Verbatimsky"] {
        assert!(
            !plaintext_in(&tablet.data, needle),
            "`{needle}` readable in the device's files"
        );
    }

    // The clinic's other device (plaintext, for contrast) gets the record through the relay.
    let phone = Peer::init(&dir.path().join("phone"));
    phone.enroll(&relay, "dana");
    phone.ok(&["sync"]);
    assert_eq!(
        phone.get("patient", &id)["fields"]["name"],
        json!("Quillon Verbatimsky")
    );
    assert!(
        plaintext_in(&phone.data, "Verbatimsky"),
        "the contrast: a plaintext device"
    );

    // No key, or the wrong one: a clear error, and the file is not touched.
    let before = std::fs::read(tablet.data.join("device.db")).unwrap();
    assert_eq!(error_kind(&tablet, &["status"]), json!("key"));
    assert!(tablet.fails(&["status"]).contains("is encrypted"));
    assert_eq!(
        error_kind(&tablet, &["status", "--db-key-file", p(&other)]),
        json!("key")
    );
    let wrong = tablet.fails(&[
        "put",
        "patient",
        "--json",
        r#"{"name": "X"}"#,
        "--db-key-file",
        p(&other),
    ]);
    assert!(wrong.contains("does not open"), "{wrong}");
    assert_eq!(std::fs::read(tablet.data.join("device.db")).unwrap(), before);
    let malformed = key_file(dir.path(), "short.key", "abc");
    assert!(
        tablet
            .fails(&["status", "--db-key-file", p(&malformed)])
            .contains("64 hex digits")
    );

    // The export is encrypted with the same key and restores only with it.
    let backup = dir.path().join("tablet.backup");
    run(with_key(&["export", p(&backup)]));
    assert!(!plaintext_in(&backup, "Verbatimsky"));
    let restored = Peer {
        data: dir.path().join("restored"),
    };
    assert!(restored.fails(&["import", p(&backup)]).contains("is encrypted"));
    assert!(
        !restored.data.join("device.db").exists(),
        "a refused import leaves no device behind"
    );
    restored.ok(&["import", p(&backup), "--db-key-file", p(&key)]);
    let got: Value =
        serde_json::from_str(&restored.ok(&["get", "patient", &id, "--json", "--db-key-file", p(&key)])).unwrap();
    assert_eq!(got["fields"]["mrn"], json!("MRN-AT-REST-7"));

    // Key change: the old key no longer opens it, the new one does, and it still syncs.
    run(with_key(&["rekey", "--new-key-file", p(&other)]));
    assert!(
        tablet
            .fails(&["status", "--db-key-file", p(&key)])
            .contains("does not open")
    );
    tablet.ok(&[
        "put",
        "patient",
        "--json",
        r#"{"name": "Rekeyed Later"}"#,
        "--db-key-file",
        p(&other),
    ]);
    tablet.ok(&["sync", "--db-key-file", p(&other)]);
    phone.ok(&["sync"]);
    let names: Vec<Value> = phone
        .json(&["list", "patient"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["fields"]["name"].clone())
        .collect();
    assert!(names.contains(&json!("Rekeyed Later")), "{names:?}");
}

/// A device made before the app supplied a key is encrypted in place: what it had queued
/// survives, no record text is left in its files, and it syncs with the key afterwards.
#[test]
fn a_plaintext_device_is_encrypted_with_its_queue_intact() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let key = key_file(dir.path(), "k", KEY);
    let tablet = Peer::init(&dir.path().join("tablet"));
    tablet.enroll(&relay, "dana");
    tablet.put("patient", r#"{"name": "Ottoline Unsyncedworth"}"#);
    assert_eq!(tablet.status()["unsynced"], json!(1));
    let out = tablet.ok(&["rekey", "--new-key-file", p(&key)]);
    assert!(out.contains("encrypted"), "{out}");
    assert!(!plaintext_in(&tablet.data, "Unsyncedworth"));
    assert!(tablet.fails(&["status"]).contains("is encrypted"));
    let status: Value = serde_json::from_str(&tablet.ok(&["status", "--json", "--db-key-file", p(&key)])).unwrap();
    assert_eq!(
        (status["unsynced"].clone(), status["encrypted"].clone()),
        (json!(1), json!(true))
    );
    tablet.ok(&["sync", "--db-key-file", p(&key)]);
    let stats = relay.admin(&["stats"]);
    assert_eq!(stats["counts"]["documents"], json!(1), "{stats}");
}

/// A relay whose SQLite store is encrypted with an operator's key: no record text in any of its
/// files or its backups; without the key neither the relay, its admin tools nor a restore drill
/// open it, and the relay says the key is missing instead of calling the files damaged.
#[test]
fn an_encrypted_relay_store_holds_no_plaintext_and_opens_only_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let key = key_file(dir.path(), "relay.key", KEY);
    let mut relay = Relay::start_with(&data, 0, &[], &[("RUST_LOG", "warn"), ("FIELDSYNC_RELAY_DB_KEY", KEY)]);
    relay.setup("clinic", &[("dana", "clinician")]);
    let tablet = Peer::init(&dir.path().join("tablet"));
    tablet.enroll(&relay, "dana");
    let id = tablet.put("patient", r#"{"name": "Quillon Verbatimsky", "mrn": "MRN-RELAY-9"}"#);
    tablet.ok(&["sync"]);
    assert_eq!(relay.admin(&["stats"])["counts"]["documents"], json!(1));
    for needle in ["Verbatimsky", "MRN-RELAY-9"] {
        assert!(
            !plaintext_in(&data, needle) && !plaintext_in(&data.join("shards"), needle),
            "`{needle}` readable in the relay's files"
        );
    }

    // The admin tools need the key (the relay's environment has it; this call does not).
    let out = Relay::cli(&["admin", "--data", p(&data), "--json", "stats"]);
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["kind"], json!("key"), "{err}");
    assert!(err["error"].as_str().unwrap().contains("is encrypted"), "{err}");

    // A backup is encrypted with the same key and drills only with it.
    let backup = dir.path().join("backup");
    let out = Relay::cli(&[
        "backup",
        "--data",
        p(&data),
        "--to",
        p(&backup),
        "--verify",
        "--db-key-file",
        p(&key),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!plaintext_in(&backup, "Verbatimsky") && !plaintext_in(&backup.join("shards"), "Verbatimsky"));
    let out = Relay::cli(&["restore-drill", "--from", p(&backup)]);
    assert!(!out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("is encrypted"), "{said}");
    assert!(
        Relay::cli(&["restore-drill", "--from", p(&backup), "--db-key-file", p(&key)])
            .status
            .success()
    );

    // Restarted without its key, the relay refuses to start and says why; nothing is "damaged".
    relay.kill();
    let out = std::process::Command::new(fieldsync_tests::bin("fieldsync-relay"))
        .args(["serve", "--data", p(&data), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("is encrypted") && !said.contains("damaged"), "{said}");
    relay.restart();
    let phone = Peer::init(&dir.path().join("phone"));
    phone.enroll(&relay, "dana");
    phone.ok(&["sync"]);
    assert_eq!(phone.get("patient", &id)["fields"]["mrn"], json!("MRN-RELAY-9"));
}

/// Frames between a device and a relay that both read compressed frames go compressed: a new
/// device's catch-up of the same records costs a fraction of the bytes of one that does not
/// offer compression (what an older device gets), and both end with the same records.
#[test]
fn a_catch_up_with_compression_moves_a_fraction_of_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let rt = runtime();
    let mut writer = open_device(&dir.path().join("writer"), 1);
    rt.block_on(net::enroll(&mut writer, &relay.url(), &relay.token("dana")))
        .unwrap();
    for i in 0..300 {
        let fields = serde_json::from_value(json!({
            "name": format!("Patient number {i}"),
            "mrn": format!("MRN-{i:06}"),
        }))
        .unwrap();
        writer.put("patient", None, fields).unwrap();
    }
    let pushing = quiet();
    rt.block_on(net::sync_once(&mut writer, &mut SyncMachine::default(), &pushing))
        .unwrap();
    let plain_push = {
        let opts = fieldsync_peer::net::SyncOptions {
            compression: false,
            ..quiet()
        };
        let mut second = open_device(&dir.path().join("second-writer"), 2);
        rt.block_on(net::enroll(&mut second, &relay.url(), &relay.token("dana")))
            .unwrap();
        for i in 0..300 {
            let fields = serde_json::from_value(
                json!({"name": format!("Other patient {i}"), "mrn": format!("MRN-{:06}", i + 1000)}),
            )
            .unwrap();
            second.put("patient", None, fields).unwrap();
        }
        rt.block_on(net::sync_once(&mut second, &mut SyncMachine::default(), &opts))
            .unwrap();
        opts.traffic.total()
    };
    let compressed_push = pushing.traffic.total();
    assert!(
        compressed_push.sent_bytes * 2 < plain_push.sent_bytes,
        "pushing 300 patients: {compressed_push:?} compressed, {plain_push:?} plain"
    );

    let catch_up = |name: &str, seed: u64, compression: bool| {
        let opts = fieldsync_peer::net::SyncOptions { compression, ..quiet() };
        let mut dev = open_device(&dir.path().join(name), seed);
        rt.block_on(net::enroll(&mut dev, &relay.url(), &relay.token("dana")))
            .unwrap();
        rt.block_on(net::sync_once(&mut dev, &mut SyncMachine::default(), &opts))
            .unwrap();
        (dev.list("patient", &[], false).unwrap().len(), opts.traffic.total())
    };
    let (with, compressed) = catch_up("new-compressed", 3, true);
    let (without, plain) = catch_up("new-plain", 4, false);
    assert_eq!((with, without), (600, 600));
    assert!(
        compressed.received_bytes * 2 < plain.received_bytes,
        "catch-up of 600 patients: {compressed:?} compressed, {plain:?} plain"
    );
}

/// Selective sync: a tablet that holds only patients and sessions never receives a journal
/// entry — not in its first pull, not live while it watches — and gets them once it holds
/// every type again, without enrolling again.
#[test]
fn a_device_holding_some_types_never_receives_another_and_can_widen_later() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let phone = Peer::init(&dir.path().join("phone"));
    phone.enroll(&relay, "dana");
    let patient = phone.put("patient", r#"{"name": "Selma Ortega"}"#);
    phone.put("journal_entry", r#"{"date": "2026-12-01", "body": "JOURNAL-BEFORE"}"#);
    phone.ok(&["sync"]);

    let tablet = Peer::init(&dir.path().join("tablet"));
    tablet.ok(&[
        "enroll",
        "--relay",
        &relay.url(),
        "--token",
        &relay.token("dana"),
        "--types",
        "patient,session",
    ]);
    assert_eq!(tablet.status()["synced_types"], json!(["patient", "session"]));
    tablet.ok(&["sync"]);
    assert_eq!(tablet.get("patient", &patient)["fields"]["name"], json!("Selma Ortega"));
    assert_eq!(tablet.json(&["list", "journal_entry"]), json!([]));

    // Live: the tablet watches while the phone writes one of each.
    let mut watch = std::process::Command::new(fieldsync_tests::bin("fieldsync-peer"))
        .arg("--data")
        .arg(&tablet.data)
        .args(["sync", "--watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    phone.put("journal_entry", r#"{"date": "2026-12-02", "body": "JOURNAL-LIVE"}"#);
    let live_patient = phone.put("patient", r#"{"name": "Lívia Prado"}"#);
    phone.ok(&["sync"]);
    let arrived = fieldsync_tests::eventually(std::time::Duration::from_secs(15), || {
        tablet
            .run(&["get", "patient", &live_patient, "--json"])
            .status
            .success()
    });
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(arrived, "the live patient never reached the tablet");
    assert_eq!(tablet.json(&["list", "journal_entry"]), json!([]));
    assert!(
        !plaintext_in(&tablet.data, "JOURNAL-"),
        "a journal entry reached the tablet's files"
    );

    // Every type again: the next sync brings the journal entries, no new enrollment.
    let widened = tablet.json(&["types", "--all"]);
    assert_eq!(widened["pull_again"], json!(true), "{widened}");
    tablet.ok(&["sync"]);
    let bodies: Vec<Value> = tablet
        .json(&["list", "journal_entry"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["fields"]["body"].clone())
        .collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    let unknown = tablet.fails(&["types", "--set", "patinet"]);
    assert!(unknown.contains("unknown entity type"), "{unknown}");
}
