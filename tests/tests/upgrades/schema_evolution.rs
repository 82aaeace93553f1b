//! Schema evolution (issue 18): a relay upgraded to a compatible schema keeps serving the
//! devices still on the old one — their queued writes drain, and fields they do not know
//! survive their edits — and a breaking schema is refused at `serve` with what breaks.
use std::path::{Path, PathBuf};

use fieldsync_tests::relay_files::RelayFiles;
use fieldsync_tests::{Peer, Relay, bin};
use serde_json::json;

const DEFAULT: &str = include_str!("../../../schema/entities.toml");

/// The default schema at version 2: a new optional field, a new enum value and a new type.
fn v2() -> String {
    let s = DEFAULT
        .replacen("schema_version = 1", "schema_version = 2", 1)
        .replacen(
            "fields.phone = { type = \"string\", max_length = 40 }",
            "fields.phone = { type = \"string\", max_length = 40 }\nfields.preferred_name = { type = \"string\", max_length = 100 }",
            1,
        )
        .replacen(
            "values = [\"planned\", \"in_progress\", \"completed\", \"cancelled\"]",
            "values = [\"planned\", \"in_progress\", \"completed\", \"cancelled\", \"no_show\"]",
            1,
        );
    format!(
        "{s}\n[types.referral]\npolicy = \"gated\"\nwrite = [\"admin\", \"clinician\"]\n\
         fields.patient_id = {{ type = \"ref\", to = \"patient\", required = true }}\n\
         fields.reason = {{ type = \"string\", max_length = 200 }}\n"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A relay in `dir` serving the default schema to a clinic whose clinicians each have one
/// device: `devices` are (device directory name, user).
fn clinic<const N: usize>(dir: &Path, devices: [(&str, &str); N]) -> (PathBuf, Relay, [Peer; N]) {
    let data = dir.join("relay");
    let relay = Relay::start(&data, 0);
    let users: Vec<(&str, &str)> = devices.iter().map(|(_, user)| (*user, "clinician")).collect();
    relay.setup("clinic", &users);
    let peers = devices.map(|(name, user)| {
        let peer = Peer::init(&dir.join(name));
        peer.enroll(&relay, user);
        peer
    });
    (data, relay, peers)
}

/// Stops `relay` and starts it again on the same port and data directory with `args` (the
/// operator deploying another schema).
fn redeploy(mut relay: Relay, data: &Path, args: &[&str]) -> Relay {
    relay.stop();
    let port = relay.addr.port();
    drop(relay);
    Relay::start_with(data, port, args, &[("RUST_LOG", "warn")])
}

/// `fieldsync-peer --schema FILE ARGS` on `peer`, which must succeed.
fn with_schema(peer: &Peer, schema: &Path, args: &[&str]) -> String {
    let mut all = vec!["--schema", schema.to_str().unwrap()];
    all.extend_from_slice(args);
    peer.ok(&all)
}

#[test]
fn v1_devices_keep_syncing_through_a_compatible_upgrade_and_keep_the_fields_they_do_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let v2_file = write(dir.path(), "v2.toml", &v2());
    let (data, relay, [old, new]) = clinic(dir.path(), [("old", "dana"), ("new", "sam")]);
    let patient = old.put("patient", r#"{"name": "Ada"}"#);
    old.ok(&["sync"]);
    // Offline, the v1 device queues a write while the relay is upgraded.
    old.ok(&["put", "patient", &patient, "--json", r#"{"mrn": "M-1"}"#]);
    let relay = redeploy(relay, &data, &["--schema", v2_file.to_str().unwrap()]);

    // The v1 device connects to the v2 relay: its queued write drains.
    let synced = old.json(&["sync"]);
    assert_eq!(synced["summary"]["applied"], json!(1), "{synced}");
    let status = old.status();
    assert_eq!(
        (status["schema_version"].clone(), status["relay_schema_version"].clone()),
        (json!(1), json!(2)),
        "{status}"
    );
    assert!(old.ok(&["status"]).contains("schema:    v1 (the relay serves v2)"));

    // The updated device writes what only v2 has: a new field, a new enum value, a new type.
    with_schema(&new, &v2_file, &["sync"]);
    with_schema(
        &new,
        &v2_file,
        &["put", "patient", &patient, "--json", r#"{"preferred_name": "Addie"}"#],
    );
    let session = with_schema(
        &new,
        &v2_file,
        &[
            "put",
            "session",
            "--json",
            &format!(r#"{{"patient_id": "{patient}", "started_at": "2026-12-01T09:00:00Z", "status": "no_show"}}"#),
        ],
    );
    let session = session.trim().to_string();
    with_schema(
        &new,
        &v2_file,
        &[
            "put",
            "referral",
            "--json",
            &format!(r#"{{"patient_id": "{patient}", "reason": "knee"}}"#),
        ],
    );
    with_schema(&new, &v2_file, &["sync"]);

    // The v1 device pulls them, edits both records, and its edits apply.
    old.ok(&["sync"]);
    old.ok(&["put", "patient", &patient, "--json", r#"{"phone": "555"}"#]);
    old.ok(&["put", "session", &session, "--json", r#"{"location": "Room 2"}"#]);
    let synced = old.json(&["sync"]);
    assert_eq!(synced["summary"]["applied"], json!(2), "{synced}");
    assert_eq!(old.status()["unsynced"], json!(0));

    // Nothing the v1 device did not know was lost, on the relay or on either device.
    let files = RelayFiles::open(&data);
    let fields = files.fields(patient.parse().unwrap());
    assert_eq!(fields["preferred_name"], json!("Addie"), "{fields:?}");
    assert_eq!(fields["phone"], json!("555"));
    assert_eq!(fields["mrn"], json!("M-1"), "the write queued before the upgrade");
    let session_fields = files.fields(session.parse().unwrap());
    assert_eq!(session_fields["status"], json!("no_show"), "{session_fields:?}");
    assert_eq!(session_fields["location"], json!("Room 2"));
    drop(files);
    with_schema(&new, &v2_file, &["sync"]);
    let seen = serde_json::from_str::<serde_json::Value>(&with_schema(
        &new,
        &v2_file,
        &["get", "patient", &patient, "--json"],
    ))
    .unwrap();
    assert_eq!(seen["fields"]["preferred_name"], json!("Addie"), "{seen}");
    assert_eq!(seen["fields"]["phone"], json!("555"), "{seen}");
    assert_eq!(old.get("patient", &patient)["fields"]["preferred_name"], json!("Addie"));
    drop(relay);
}

#[test]
fn a_breaking_schema_is_refused_at_serve_with_what_breaks_and_its_devices_are_told_why_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (data, mut relay, [old]) = clinic(dir.path(), [("old", "dana")]);
    old.put("patient", r#"{"name": "Ada"}"#);
    old.ok(&["sync"]);
    relay.stop();

    // v2 retypes a field and narrows a range.
    let breaking = DEFAULT
        .replacen("schema_version = 1", "schema_version = 2", 1)
        .replacen(
            "fields.phone = { type = \"string\", max_length = 40 }",
            "fields.phone = { type = \"int\" }",
            1,
        )
        .replacen(
            "fields.pain_after = { type = \"int\", min = 0, max = 10 }",
            "fields.pain_after = { type = \"int\", min = 0, max = 5 }",
            1,
        );
    let file = write(dir.path(), "breaking.toml", &breaking);
    let refused = std::process::Command::new(bin("fieldsync-relay"))
        .args([
            "serve",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--schema",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("patient.phone: type string → int"), "{stderr}");
    assert!(stderr.contains("session.pain_after: max 10 → 5"), "{stderr}");
    assert!(stderr.contains("--allow-breaking-schema"), "{stderr}");

    // The checker says the same, and exits 1.
    let v1_file = write(dir.path(), "v1.toml", DEFAULT);
    let check = Relay::cli(&[
        "schema",
        "check",
        v1_file.to_str().unwrap(),
        file.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(check.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    let breaking_changes: Vec<&str> = report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "breaking")
        .map(|c| c["location"].as_str().unwrap())
        .collect();
    assert_eq!(breaking_changes, ["patient.phone", "session.pain_after"]);

    // Allowed explicitly, the relay serves v2, and the v1 device is told its version is retired.
    let relay = Relay::start_with(
        &data,
        0,
        &["--schema", file.to_str().unwrap(), "--allow-breaking-schema"],
        &[("RUST_LOG", "error")],
    );
    super::move_relay(&old.data, &relay.url());
    let out = old.run(&["sync"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("schema v1 is no longer accepted"), "{said}");

    // The operator sees which versions the relay serves and which it retired.
    let history = Relay::cli(&["schema", "history", "--data", data.to_str().unwrap(), "--json"]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let states: Vec<(u64, bool)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["version"].as_u64().unwrap(), s["retired_ms"].is_null()))
        .collect();
    assert_eq!(states, [(1, false), (2, true)], "{history}");
    let text = Relay::cli(&["schema", "history", "--data", data.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("its devices are refused"));

    // Retired once, on purpose: later starts of the same schema need no flag.
    drop(relay);
    let again = Relay::start_with(
        &data,
        0,
        &["--schema", file.to_str().unwrap()],
        &[("RUST_LOG", "error")],
    );
    drop(again);
}

#[test]
fn a_device_on_a_newer_schema_waits_for_the_relay_and_drains_once_it_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let v2_file = write(dir.path(), "v2.toml", &v2());
    let (data, relay, [new]) = clinic(dir.path(), [("new", "sam")]);
    let patient = with_schema(
        &new,
        &v2_file,
        &[
            "put",
            "patient",
            "--json",
            r#"{"name": "Ada", "preferred_name": "Addie"}"#,
        ],
    );
    let patient = patient.trim().to_string();

    // The relay still serves v1: the device is not refused, it waits with its changes kept.
    let mut args = vec!["--schema", v2_file.to_str().unwrap(), "sync"];
    let out = new.run(&args);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        said.contains("the relay has not been upgraded to schema v2 yet (it serves v1)"),
        "{said}"
    );
    let status: serde_json::Value = serde_json::from_str(&with_schema(&new, &v2_file, &["status", "--json"])).unwrap();
    assert_eq!(status["state"], json!("waiting_for_relay"), "{status}");
    assert!(status["auth_failure"].is_null(), "not a refused device: {status}");
    assert_eq!(status["unsynced"], json!(1));
    assert!(with_schema(&new, &v2_file, &["status"]).contains("waiting:   "));

    // The relay is upgraded: the device drains and is synced.
    let relay = redeploy(relay, &data, &["--schema", v2_file.to_str().unwrap()]);
    args.push("--json");
    let synced: serde_json::Value = serde_json::from_str(&new.ok(&args)).unwrap();
    assert_eq!(synced["summary"]["applied"], json!(1), "{synced}");
    assert_eq!(synced["status"]["state"], json!("synced"), "{synced}");
    let files = RelayFiles::open(&data);
    assert_eq!(files.fields(patient.parse().unwrap())["preferred_name"], json!("Addie"));
    drop(relay);
}

/// The default schema at version 2 with declared migrations: `patient.phone` renamed to
/// `telephone`, and a new required `consent` that records written before it read as `pending`.
fn v2_with_migrations() -> String {
    DEFAULT
        .replacen("schema_version = 1", "schema_version = 2", 1)
        .replacen(
            "fields.phone = { type = \"string\", max_length = 40 }",
            "fields.telephone = { type = \"string\", max_length = 40, renamed_from = \"phone\" }\n\
             fields.consent = { type = \"enum\", values = [\"pending\", \"given\"], required = true, default = \"pending\" }",
            1,
        )
}

#[test]
fn a_rename_migration_keeps_every_value_across_devices_on_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let v2_file = write(dir.path(), "v2.toml", &v2_with_migrations());
    let check = Relay::cli(&[
        "schema",
        "check",
        write(dir.path(), "v1.toml", DEFAULT).to_str().unwrap(),
        v2_file.to_str().unwrap(),
    ]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}");
    assert!(report.contains("patient.telephone: renamed from `phone`"), "{report}");
    assert!(
        report.contains("patient.consent: new required field with a default"),
        "{report}"
    );

    let (data, relay, [old, new]) = clinic(dir.path(), [("old", "dana"), ("new", "sam")]);
    let queued = old.put("patient", r#"{"name": "Ada", "phone": "111"}"#);
    let untouched = old.put("patient", r#"{"name": "Bo", "phone": "222"}"#);
    old.ok(&["sync"]);
    new.ok(&["sync"]);
    // Queued on the v1 device, under the old name, before the relay moves to v2.
    old.ok(&["put", "patient", &queued, "--json", r#"{"phone": "333"}"#]);
    let relay = redeploy(relay, &data, &["--schema", v2_file.to_str().unwrap()]);

    // The updated app reads records written before the rename under the new name, with the
    // default for the new field, and finds them by the new name.
    let get = |peer: &Peer, id: &str| -> serde_json::Value {
        serde_json::from_str(&with_schema(peer, &v2_file, &["get", "patient", id, "--json"])).unwrap()
    };
    let bo = get(&new, &untouched);
    assert_eq!(
        bo["fields"],
        json!({"name": "Bo", "telephone": "222", "consent": "pending"}),
        "{bo}"
    );
    let found = with_schema(
        &new,
        &v2_file,
        &["list", "patient", "--where", "telephone=222", "--json"],
    );
    assert!(found.contains(&untouched), "{found}");
    with_schema(
        &new,
        &v2_file,
        &["put", "patient", &untouched, "--json", r#"{"telephone": "444"}"#],
    );
    with_schema(&new, &v2_file, &["sync"]);

    // The v1 device drains its old-name write and reads the v2 device's edit under the name it knows.
    let synced = old.json(&["sync"]);
    assert_eq!(synced["summary"]["applied"], json!(1), "{synced}");
    assert_eq!(old.get("patient", &untouched)["fields"]["phone"], json!("444"));
    // The relay's copy of its own write reached it too (a field its version does not know).
    assert_eq!(old.get("patient", &queued)["fields"]["telephone"], json!("333"));
    // A record created by the v1 device without the new required field is accepted.
    let created = old.put("patient", r#"{"name": "Cy", "phone": "555"}"#);
    let synced = old.json(&["sync"]);
    assert_eq!(synced["summary"]["applied"], json!(1), "{synced}");

    with_schema(&new, &v2_file, &["sync"]);
    assert_eq!(get(&new, &queued)["fields"]["telephone"], json!("333"));
    assert_eq!(get(&new, &untouched)["fields"]["telephone"], json!("444"));
    assert_eq!(
        get(&new, &created)["fields"],
        json!({"name": "Cy", "telephone": "555", "consent": "pending"})
    );

    // The relay holds every value under both names: the copy was made once, by the relay, in
    // the feed entry of the write that caused it.
    let files = RelayFiles::open(&data);
    for (id, value) in [(&queued, "333"), (&untouched, "444"), (&created, "555")] {
        let fields = files.fields(id.parse().unwrap());
        assert_eq!(
            (fields["phone"].clone(), fields["telephone"].clone()),
            (json!(value), json!(value)),
            "{fields:?}"
        );
    }
    drop(files);
    drop(relay);
}

#[test]
fn a_version_the_relay_skipped_is_refused_with_the_way_out_and_accepted_once_named() {
    let dir = tempfile::tempdir().unwrap();
    let v2_file = write(dir.path(), "v2.toml", &v2());
    let v3 = v2().replacen("schema_version = 2", "schema_version = 3", 1).replacen(
        "fields.phone = { type = \"string\", max_length = 40 }",
        "fields.phone = { type = \"string\", max_length = 40 }\nfields.pronouns = { type = \"string\", max_length = 40 }",
        1,
    );
    let v3_file = write(dir.path(), "v3.toml", &v3);
    let (data, relay, [new]) = clinic(dir.path(), [("new", "sam")]);
    // The app ships v2 while the relay still runs v1; the relay then goes straight to v3.
    with_schema(
        &new,
        &v2_file,
        &[
            "put",
            "patient",
            "--json",
            r#"{"name": "Ada", "preferred_name": "Addie"}"#,
        ],
    );
    let skipped = redeploy(relay, &data, &["--schema", v3_file.to_str().unwrap()]);
    let out = new.run(&["--schema", v2_file.to_str().unwrap(), "sync"]);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(said.contains("v2, ") && said.contains("--accept-schema"), "{said}");
    let relay = redeploy(
        skipped,
        &data,
        &[
            "--schema",
            v3_file.to_str().unwrap(),
            "--accept-schema",
            v2_file.to_str().unwrap(),
        ],
    );
    let synced: serde_json::Value = serde_json::from_str(&with_schema(&new, &v2_file, &["sync", "--json"])).unwrap();
    assert_eq!(synced["summary"]["applied"], json!(1), "{synced}");
    drop(relay);
}
