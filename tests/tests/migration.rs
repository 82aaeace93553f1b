//! Upgrading from round 1 (one global order): a relay data directory and a device written by
//! the last release before per-space order (`tests/fixtures/round1`, see its `make.sh`) are
//! upgraded by this build. Nothing stored is lost, the old audit chain is verified and kept,
//! every space gets its own numbering and chain, and the old device — whose stored cursor is a
//! position in the old global feed, behind writes of other devices — catches up on exactly what
//! it missed.
//!
//! Schema upgrades (devices on mixed schema versions) run in this binary too, from
//! `upgrades/schema_evolution.rs` (one test binary fewer to link).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "upgrades/schema_evolution.rs"]
mod schema_evolution;

use std::path::{Path, PathBuf};

use fieldsync_tests::relay_files::RelayFiles;
use fieldsync_tests::{Peer, Relay, stdout_of};
use serde_json::{Value, json};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/round1")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Points a device at a relay's new address (the fixture's relay listened on another port).
fn move_relay(device: &Path, url: &str) {
    let conn = rusqlite::Connection::open(device.join("device.db")).unwrap();
    let stored: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'enrollment'", [], |r| r.get(0))
        .unwrap();
    let mut enrollment: Value = serde_json::from_str(&stored).unwrap();
    enrollment["relay_url"] = json!(url);
    conn.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'enrollment'",
        [enrollment.to_string()],
    )
    .unwrap();
}

#[test]
fn a_round_one_relay_and_device_upgrade_without_losing_or_repeating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    copy_dir(&fixture().join("relay"), &data);
    let device = dir.path().join("dana");
    copy_dir(&fixture().join("dana"), &device);
    let old_cursor: Value = {
        let conn = rusqlite::Connection::open(device.join("device.db")).unwrap();
        let s: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'pull_cursor'", [], |r| r.get(0))
            .unwrap();
        serde_json::from_str(&s).unwrap()
    };
    assert!(
        old_cursor["seq"].as_u64().unwrap() > 0,
        "a round-1 cursor: {old_cursor}"
    );

    // The old single-file database passes a restore drill (migrated in the scratch copy only).
    let before = std::fs::read(data.join("relay.db")).unwrap();
    let drill = Relay::cli(&["restore-drill", "--from", data.join("relay.db").to_str().unwrap()]);
    assert!(drill.status.success(), "{}", stdout_of(&drill));
    assert_eq!(
        std::fs::read(data.join("relay.db")).unwrap(),
        before,
        "the drill changed the file"
    );
    // Admin commands do not migrate a store a relay may be serving; they say what to do.
    let admin = Relay::cli(&["admin", "--data", data.to_str().unwrap(), "stats"]);
    assert!(!admin.status.success());
    assert!(
        String::from_utf8_lossy(&admin.stderr).contains("fieldsync-relay serve"),
        "{admin:?}"
    );

    // `serve` migrates.
    let relay = Relay::start(&data, 0);
    let files = RelayFiles::open(&data);
    let counts = files.counts();
    assert_eq!(counts.spaces, 2);
    assert!(counts.feed >= 10, "{counts:?}");
    assert_eq!(counts.audit, counts.feed);
    assert!(counts.archive >= 1, "the LWW loser survived: {counts:?}");
    let report = files.verify();
    assert!(report.ok(), "{report:?}");
    let old_chain = report.round_one.as_ref().expect("the round-1 chain is kept");
    assert_eq!(old_chain.records, counts.audit, "every old record kept");
    assert_eq!(report.spaces.len(), 2);
    assert!(files.backend.consistency().unwrap().problems().is_empty());
    // Each space is numbered 1..n on its own.
    for chain in &report.spaces {
        let seqs: Vec<u64> = files
            .audit()
            .iter()
            .filter(|a| a.space_id == chain.space_id)
            .map(|a| a.seq)
            .collect();
        assert_eq!(seqs, (1..=chain.records).collect::<Vec<_>>());
    }
    let verify = relay.admin(&["audit", "verify"]);
    assert!(verify["round_one"]["first_bad"].is_null(), "{verify}");
    drop(files);

    // The old device: its round-1 cursor is converted once, and it receives exactly the rows
    // written after its last sync (gus's and carl's last edits), then everything matches.
    move_relay(&device, &relay.url());
    let dana = Peer { data: device.clone() };
    let synced = dana.json(&["sync"]);
    assert_eq!(
        synced["summary"]["pulled"],
        json!(2),
        "only the two rows written after her last sync, not everything again: {synced}"
    );
    let status = dana.status();
    assert_eq!(status["unsynced"], json!(0), "{status}");
    let files = RelayFiles::open(&data);
    for entity in ["patient", "note", "profile"] {
        let listed = dana.json(&["list", entity]);
        for e in listed.as_array().unwrap() {
            let id = e["id"].as_str().or_else(|| e["entity_id"].as_str()).unwrap();
            let relay_fields = files.fields(id.parse().unwrap());
            assert_eq!(
                e["fields"],
                Value::Object(relay_fields),
                "{entity} {id} differs from the relay after the upgrade"
            );
        }
    }
    let patients = dana.json(&["list", "patient"]);
    let names: Vec<&str> = patients
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["fields"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"Gus G. Gym"),
        "gus's edit after dana's last sync: {names:?}"
    );
    assert!(
        patients
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["fields"]["mrn"] == json!("C-2")),
        "carl's edit after dana's last sync: {patients}"
    );
    // Her cursor is per space now.
    let conn = rusqlite::Connection::open(device.join("device.db")).unwrap();
    let s: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'pull_cursor'", [], |r| r.get(0))
        .unwrap();
    let cursor: Value = serde_json::from_str(&s).unwrap();
    assert_eq!(cursor["spaces"].as_object().unwrap().len(), 2, "{cursor}");
    assert!(cursor.get("legacy_seq").is_none(), "{cursor}");

    // New writes continue each space's numbering.
    dana.put("patient", r#"{"name": "After the upgrade"}"#);
    dana.ok(&["sync"]);
    let files = RelayFiles::open(&data);
    assert!(files.verify().ok());
    assert_eq!(files.counts().feed, counts.feed + 1);
    assert!(files.backend.consistency().unwrap().problems().is_empty());
}

#[test]
fn a_migration_interrupted_before_its_commit_starts_again_from_the_untouched_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    copy_dir(&fixture().join("relay"), &data);
    // What a crash mid-migration leaves: shard files half written, the directory still round 1.
    std::fs::create_dir_all(data.join("shards")).unwrap();
    std::fs::write(data.join("shards/shard-0.db"), vec![0x5a; 8192]).unwrap();
    std::fs::write(data.join("shards/shard-1.db-wal"), vec![0x11; 4096]).unwrap();
    let backend = fieldsync_relay::store::sqlite::SqliteBackend::open(&data, uuid::Uuid::nil()).unwrap();
    let report = fieldsync_relay::audit::verify(&backend).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 12, "the fixture's twelve records, each once");
    assert!(backend.consistency().unwrap().problems().is_empty());
}
