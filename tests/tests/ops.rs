//! Operating the relay (issue 8): backups under load and restore drills, metrics, admin and
//! revocation over real sockets (TLS, the config file and structured logs: `ops_config.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fieldsync_peer::OutboxState;
use fieldsync_peer::net::{self, WatchEvent};
use fieldsync_peer::sync::SyncMachine;
use fieldsync_relay::store::Backend;
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_tests::{
    Peer, Relay, eventually, http_get, metric, open_device, plaintext_in, quiet, runtime, stdout_of,
};
use serde_json::{Value, json};
use uuid::Uuid;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn a_backup_taken_under_load_restores_with_every_acknowledged_mutation_present() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let token = relay.token("dana");
    let url = relay.url();
    let acked: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (acked, stop, dev_dir) = (acked.clone(), stop.clone(), dir.path().join("dev"));
        std::thread::spawn(move || {
            let rt = runtime();
            let mut dev = open_device(&dev_dir, 11);
            rt.block_on(net::enroll(&mut dev, &url, &token)).unwrap();
            let mut machine = SyncMachine::default();
            let started = Instant::now();
            let mut i = 0;
            // Bounded: stops when told, or after a minute whatever happens.
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                for _ in 0..10 {
                    let mut f = serde_json::Map::new();
                    f.insert("name".into(), json!(format!("patient {i}")));
                    dev.put("patient", None, f).unwrap();
                    i += 1;
                }
                rt.block_on(net::sync_once(&mut dev, &mut machine, &quiet())).unwrap();
                let applied: Vec<Uuid> = dev
                    .queue(true)
                    .unwrap()
                    .into_iter()
                    .filter(|item| item.state == OutboxState::Applied)
                    .map(|item| item.mutation_id)
                    .collect();
                acked.lock().unwrap().extend(applied);
            }
        })
    };
    let count = || acked.lock().unwrap().len();
    assert!(eventually(Duration::from_secs(30), || count() >= 100), "no load");

    // Everything acknowledged before the backup starts must be in it.
    let before: HashSet<Uuid> = acked.lock().unwrap().clone();
    let backup = dir.path().join("backups/relay");
    let out = Relay::cli(&["backup", "--data", p(&relay.data), "--to", p(&backup), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written: Value = serde_json::from_str(&stdout_of(&out)).unwrap();
    assert!(written["backup"]["bytes"].as_u64().unwrap() > 0);
    // The load went on during and after the backup.
    assert!(
        eventually(Duration::from_secs(30), || count() >= before.len() + 50),
        "the relay stopped acknowledging during the backup"
    );
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let drill = Relay::cli(&["restore-drill", "--from", p(&backup)]);
    let verdict = stdout_of(&drill);
    assert!(drill.status.success(), "{verdict}");
    assert!(verdict.starts_with("restore-drill: OK"), "{verdict}");

    let restored = dir.path().join("restored");
    let out = Relay::cli(&["restore", "--from", p(&backup), "--data", p(&restored)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = SqliteBackend::open_existing(&restored).unwrap();
    let shards: Vec<_> = (0..store.shard_count()).map(|n| store.open_shard(n).unwrap()).collect();
    let missing: Vec<&Uuid> = before
        .iter()
        .filter(|m| !shards.iter().any(|s| s.applied(**m).unwrap()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged mutations missing from the backup",
        missing.len(),
        before.len()
    );
    assert!(fieldsync_relay::audit::verify(&store).unwrap().ok());
    // The restored directory serves.
    drop(shards);
    drop(store);
    let again = Relay::start(&restored, 0);
    assert_eq!(http_get(again.addr, "/healthz").0, 200);
}

#[test]
fn restore_drill_on_a_corrupted_or_doctored_copy_fails_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let a = Peer::init(&dir.path().join("a"));
    a.enroll(&relay, "dana");
    for i in 0..30 {
        a.put(
            "patient",
            &format!(r#"{{"name": "P{i}", "phone": "{}"}}"#, "5".repeat(30)),
        );
    }
    a.ok(&["sync"]);
    let backup = dir.path().join("good");
    let out = Relay::cli(&["backup", "--data", p(&relay.data), "--to", p(&backup), "--verify"]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    assert!(stdout_of(&out).contains("restore-drill: OK"), "{}", stdout_of(&out));
    // The clinic's data lives in the largest shard file.
    let shard_of_clinic = std::fs::read_dir(backup.join("shards"))
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .file_name();
    let copy_backup = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(to.join("shards")).unwrap();
        std::fs::copy(backup.join("relay.db"), to.join("relay.db")).unwrap();
        for e in std::fs::read_dir(backup.join("shards")).unwrap().flatten() {
            std::fs::copy(e.path(), to.join("shards").join(e.file_name())).unwrap();
        }
        (to.clone(), to.join("shards").join(&shard_of_clinic))
    };

    // Garbage over pages in the middle of the shard file.
    let (corrupted, shard) = copy_backup("corrupted");
    let mut bytes = std::fs::read(&shard).unwrap();
    assert!(bytes.len() > 5 * 4096, "backup unexpectedly small");
    let from = bytes.len() / 2;
    for b in &mut bytes[from..from + 8192] {
        *b = 0xA5;
    }
    std::fs::write(&shard, &bytes).unwrap();
    let out = Relay::cli(&["restore-drill", "--from", p(&corrupted)]);
    assert!(!out.status.success(), "a corrupted backup passed: {}", stdout_of(&out));
    assert!(
        stdout_of(&out).starts_with("restore-drill: FAILED: "),
        "{}",
        stdout_of(&out)
    );
    assert_eq!(stdout_of(&out).lines().count(), 1, "one verdict line");

    // A sound SQLite file whose audit history was edited behind the triggers' back.
    let (doctored, shard) = copy_backup("doctored");
    let conn = rusqlite::Connection::open(&shard).unwrap();
    conn.execute_batch(
        "DROP TRIGGER audit_no_update;
         UPDATE audit SET after_json = '{\"name\":\"Mallory\"}' WHERE audit_seq = 7;",
    )
    .unwrap();
    drop(conn);
    let out = Relay::cli(&["restore-drill", "--from", p(&doctored), "--json"]);
    assert!(!out.status.success());
    let report: Value = serde_json::from_str(&stdout_of(&out)).unwrap();
    let verdict = report["verdict"].as_str().unwrap();
    assert!(verdict.contains("audit chain broken at record 7"), "{verdict}");

    // `restore` refuses both and leaves the target alone.
    let target = dir.path().join("target");
    for bad in [&corrupted, &doctored] {
        let out = Relay::cli(&["restore", "--from", p(bad), "--data", p(&target)]);
        assert!(!out.status.success());
        assert!(!target.join("relay.db").exists());
    }
    // And a good backup does not replace a live relay's database.
    let out = Relay::cli(&["restore", "--from", p(&backup), "--data", p(&relay.data), "--force"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it"), "{out:?}");
}

#[test]
fn metrics_move_as_traffic_flows() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let scrape = || {
        let (code, body) = http_get(relay.addr, "/metrics");
        assert_eq!(code, 200);
        body
    };
    let m0 = scrape();
    assert_eq!(metric(&m0, "fieldsync_up"), Some(1.0));
    assert_eq!(metric(&m0, "fieldsync_mutations_applied_total"), Some(0.0));
    assert_eq!(metric(&m0, "fieldsync_connections"), Some(0.0));

    let a = Peer::init(&dir.path().join("a"));
    let b = Peer::init(&dir.path().join("b"));
    a.enroll(&relay, "dana");
    b.enroll(&relay, "dana");
    let id = a.put("patient", r#"{"name": "Ada"}"#);
    for i in 0..4 {
        a.put("patient", &format!(r#"{{"name": "N{i}"}}"#));
    }
    a.ok(&["sync"]);
    b.ok(&["sync"]);
    let m1 = scrape();
    assert_eq!(metric(&m1, "fieldsync_mutations_applied_total"), Some(5.0), "{m1}");
    assert_eq!(
        metric(&m1, r#"fieldsync_mutations_total{outcome="applied"}"#),
        Some(5.0)
    );
    assert_eq!(metric(&m1, "fieldsync_audit_records_total"), Some(5.0));
    assert!(metric(&m1, "fieldsync_commits_total").unwrap() >= 1.0);
    assert!(metric(&m1, "fieldsync_commit_seconds_count").unwrap() >= 1.0);
    assert_eq!(metric(&m1, "fieldsync_apply_seconds_count"), Some(5.0));
    assert!(metric(&m1, "fieldsync_group_seconds_count").unwrap() >= 1.0);
    assert_eq!(metric(&m1, "fieldsync_enrollments_total"), Some(2.0));
    assert!(metric(&m1, "fieldsync_connections_opened_total").unwrap() >= 4.0);
    assert!(metric(&m1, "fieldsync_pull_pages_total").unwrap() >= 2.0);
    assert_eq!(
        metric(&m1, "fieldsync_send_queue_messages"),
        Some(0.0),
        "nothing waits to be sent once both devices are done: {m1}"
    );

    // A stale edit of a clinical record is a conflict; an unknown device an auth failure.
    a.ok(&["put", "patient", &id, "--json", r#"{"phone": "1"}"#]);
    a.ok(&["sync"]);
    b.ok(&["put", "patient", &id, "--json", r#"{"phone": "2"}"#]);
    let synced = b.json(&["sync"]);
    assert_eq!(synced["summary"]["conflicts"], json!(1), "{synced}");
    let stranger = Peer::init(&dir.path().join("stranger"));
    let refused = stranger.run(&["enroll", "--relay", &relay.url(), "--token", "fse_0000"]);
    assert!(!refused.status.success(), "an unknown token enrolled: {refused:?}");
    let m2 = scrape();
    assert_eq!(metric(&m2, "fieldsync_mutations_applied_total"), Some(6.0), "{m2}");
    assert_eq!(metric(&m2, "fieldsync_conflicts_total"), Some(1.0), "{m2}");
    assert_eq!(
        metric(&m2, r#"fieldsync_mutations_total{outcome="conflict"}"#),
        Some(1.0)
    );
    let auth_failures: f64 = m2
        .lines()
        .filter(|l| l.starts_with("fieldsync_auth_failures_total{reason="))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(auth_failures, 1.0, "the stranger's one refused enrollment: {m2}");

    // A watching device is a connection while it is connected.
    let mut watcher = std::process::Command::new(fieldsync_tests::bin("fieldsync-peer"))
        .arg("--data")
        .arg(&a.data)
        .args(["sync", "--watch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let connected = eventually(Duration::from_secs(10), || {
        metric(&scrape(), "fieldsync_connections_authenticated") == Some(1.0)
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert!(connected, "the watching device never showed as a connection");
    assert!(eventually(Duration::from_secs(10), || {
        metric(&scrape(), "fieldsync_connections") == Some(0.0)
    }));

    let (code, status) = http_get(relay.addr, "/v1/status");
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["stats"]["applied"], json!(6));
    assert_eq!(status["version"], json!(env!("CARGO_PKG_VERSION")));
    assert!(status["uptime_seconds"].is_u64(), "{status}");
    // Apply groups count commits of mutations, not the front's idle turns.
    let groups = metric(&m2, "fieldsync_groups_total").unwrap();
    assert_eq!(Some(groups), metric(&m2, "fieldsync_group_seconds_count"), "{m2}");
    assert!(groups >= 1.0, "{m2}");
    assert_eq!(http_get(relay.addr, "/healthz"), (200, "ok\n".to_string()));
}

/// The relay's count of authenticated sessions (`/v1/status`).
fn authenticated_sessions(relay: &Relay) -> Value {
    let (_, body) = http_get(relay.addr, "/v1/status");
    serde_json::from_str::<Value>(&body).unwrap()["authenticated"].clone()
}

#[test]
fn a_revoked_device_is_disconnected_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let token = relay.token("dana");
    let url = relay.url();
    let mut dev = open_device(&dir.path().join("dev"), 5);
    let rt = runtime();
    rt.block_on(net::enroll(&mut dev, &url, &token)).unwrap();
    let device_id = dev.device_id();
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    let watcher = std::thread::spawn(move || {
        let rt = runtime();
        let mut machine = SyncMachine::default();
        let opts = quiet();
        let result = rt.block_on(async {
            let stop = tokio::time::sleep(Duration::from_secs(30));
            net::watch(&mut dev, &mut machine, &opts, stop, |e| {
                let label = match e {
                    WatchEvent::Connected => "connected".to_string(),
                    WatchEvent::Disconnected { reason, .. } => format!("disconnected: {reason}"),
                    WatchEvent::Summary(_) => "summary".to_string(),
                    WatchEvent::Progress(_) => return,
                };
                let _ = tx.send((Instant::now(), label));
            })
            .await
        });
        let _ = tx.send((Instant::now(), format!("watch ended: {result:?}")));
    });
    let (_, first) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(first, "connected");
    let authenticated = || authenticated_sessions(&relay);
    assert!(eventually(Duration::from_secs(10), || authenticated() == json!(1)));

    let revoke = relay.admin(&["device", "revoke", &device_id.to_string()]);
    let revoked_at = Instant::now();
    assert_eq!(revoke["revoked"], json!(true));
    let (at, event) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("still connected after 5 s");
    let took = at.saturating_duration_since(revoked_at);
    assert!(took < Duration::from_secs(1), "disconnected after {took:?}");
    eprintln!("revoked device disconnected after {took:?} ({event})");
    // It does not come back, and is not told it will: the relay's `revoked` ends the watch
    // loop with the refusal, with no "disconnected, reconnecting" before it.
    assert!(
        event.starts_with("watch ended: Err") && event.contains("revoked"),
        "{event}"
    );
    watcher.join().unwrap();
    assert_eq!(authenticated(), json!(0));
    let metrics = http_get(relay.addr, "/metrics").1;
    assert_eq!(
        metric(&metrics, "fieldsync_revoked_disconnects_total"),
        Some(1.0),
        "{metrics}"
    );
}

#[test]
fn admin_commands_cover_users_tokens_devices_audit_conflicts_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician"), ("sam", "assistant")]);
    relay.admin(&["space", "add", "gym"]);
    relay.admin(&["user", "add", "sam", "--space", "gym", "--role", "patient"]);
    let changed = relay.admin(&["user", "role", "sam", "--space", "clinic", "--role", "clinician"]);
    assert_eq!(changed["previous_role"], json!("assistant"));
    relay.admin(&["user", "remove", "sam", "--space", "gym"]);
    let users = relay.admin(&["user", "list"]);
    let sam = users.as_array().unwrap().iter().find(|u| u["name"] == "sam").unwrap();
    assert_eq!(sam["memberships"].as_array().unwrap().len(), 1);
    assert_eq!(sam["memberships"][0]["role"], json!("clinician"));

    // Tokens: listed by id only; an expired token no longer enrolls.
    let token = relay.token("dana");
    let tokens = relay.admin(&["token", "list"]);
    let row = &tokens.as_array().unwrap()[0];
    assert_eq!(row["state"], json!("active"));
    assert!(!tokens.to_string().contains(&token), "a token leaked into the listing");
    let id = row["token_id"].as_str().unwrap().to_string();
    relay.admin(&["token", "expire", &id]);
    assert_eq!(relay.admin(&["token", "list"])[0]["state"], json!("expired"));
    let a = Peer::init(&dir.path().join("a"));
    let refused = a.fails(&["enroll", "--relay", &relay.url(), "--token", &token]);
    assert!(refused.contains("expired"), "{refused}");

    // Two devices, an LWW race for the archive.
    let b = Peer::init(&dir.path().join("b"));
    a.enroll(&relay, "dana");
    b.enroll(&relay, "sam");
    let profile = a.put("profile", r#"{"display_name": "first"}"#);
    a.ok(&["sync"]);
    b.ok(&["sync"]);
    a.ok(&["put", "profile", &profile, "--json", r#"{"bio": "from a"}"#]);
    b.ok(&["put", "profile", &profile, "--json", r#"{"bio": "from b"}"#]);
    a.ok(&["sync"]);
    b.ok(&["sync"]);
    let conflicts = relay.admin(&["conflicts", "--entity", &profile]);
    let rows = conflicts.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{conflicts}");
    assert_eq!(rows[0]["kind"], json!("lww"));
    assert_eq!(rows[0]["field"], json!("bio"));

    let devices = relay.admin(&["device", "list"]);
    assert_eq!(devices.as_array().unwrap().len(), 2);
    assert!(devices[0]["last_seen_at"].is_string(), "{devices}");

    let verify = relay.admin(&["audit", "verify"]);
    assert_eq!(verify["records"], json!(3));
    let chains = verify["spaces"].as_array().unwrap();
    assert_eq!(chains.len(), 2, "one chain per space: {verify}");
    assert!(chains.iter().all(|c| c["first_bad"].is_null()), "{verify}");
    let text = Relay::cli(&["admin", "--data", p(&relay.data), "audit", "verify"]);
    assert!(
        stdout_of(&text).starts_with("audit chains OK: 3 records verified in 2 spaces"),
        "{}",
        stdout_of(&text)
    );
    // A sequence number is per space: without one named, it is refused.
    let ambiguous = Relay::cli(&["admin", "--data", p(&relay.data), "audit", "export", "--since", "2"]);
    assert!(!ambiguous.status.success());
    assert!(
        String::from_utf8_lossy(&ambiguous.stderr).contains("needs --space"),
        "{ambiguous:?}"
    );
    let export = Relay::cli(&[
        "admin",
        "--data",
        p(&relay.data),
        "audit",
        "export",
        "--space",
        "clinic",
        "--since",
        "2",
    ]);
    assert!(export.status.success(), "{export:?}");
    let lines: Vec<Value> = stdout_of(&export)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "records after seq 2");
    assert_eq!(lines[0]["seq"], json!(3));
    assert_eq!(lines[0]["space"], json!("clinic"));
    assert!(lines[0]["hash"].is_string() && lines[0]["server_ts"].is_string());
    let all = Relay::cli(&[
        "admin",
        "--data",
        p(&relay.data),
        "audit",
        "export",
        "--since",
        "2000-01-01",
    ]);
    assert_eq!(stdout_of(&all).lines().count(), 3);

    let stats = relay.admin(&["stats"]);
    assert_eq!(stats["counts"]["audit"], json!(3));
    assert_eq!(stats["counts"]["devices"], json!(2));
    assert_eq!(stats["counts"]["archive"], json!(1));
    // Text output exists for every command too.
    let text = Relay::cli(&["admin", "--data", p(&relay.data), "stats"]);
    assert!(stdout_of(&text).contains("audit records 3"), "{}", stdout_of(&text));
}

/// A lost tablet (SPEC §16): the operator revokes it with a wipe; at its next contact the
/// device erases its records — synced and unsynced — and reports what it discarded; the
/// relay's device list shows the wipe; no record's text is left in the device's files; the
/// device takes no writes, and a second contact is refused as any revoked device.
#[test]
fn a_device_revoked_with_a_wipe_erases_its_data_at_its_next_contact_and_the_relay_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let tablet = Peer::init(&dir.path().join("tablet"));
    tablet.enroll(&relay, "dana");
    tablet.put("patient", r#"{"name": "Quillon Verbatimsky", "mrn": "MRN-SYNCED-1"}"#);
    tablet.ok(&["sync"]);
    // Two changes the relay never sees.
    tablet.put("patient", r#"{"name": "Ottoline Unsyncedworth"}"#);
    tablet.put("patient", r#"{"name": "Perpetua Offlineham"}"#);
    assert_eq!(tablet.status()["unsynced"], json!(2));
    let device_id = tablet.status()["device_id"].as_str().unwrap().to_string();
    assert!(plaintext_in(&tablet.data, "Quillon Verbatimsky"));

    let asked = relay.admin(&["device", "revoke", &device_id, "--wipe"]);
    assert_eq!(asked["wipe"], json!("pending"));
    let listed = relay.admin(&["device", "list"]);
    assert!(listed[0]["wipe_requested_at"].is_string(), "{listed}");
    assert!(listed[0]["wiped_at"].is_null(), "{listed}");

    let refused = tablet.fails(&["sync"]);
    assert!(refused.contains("erased its local data"), "{refused}");
    let status = tablet.status();
    assert_eq!(status["entities"], json!(0), "{status}");
    assert_eq!(status["unsynced"], json!(0), "{status}");
    assert_eq!(status["wiped"]["discarded"], json!(2), "{status}");
    for needle in [
        "Quillon Verbatimsky",
        "MRN-SYNCED-1",
        "Ottoline Unsyncedworth",
        "Perpetua Offlineham",
    ] {
        assert!(
            !plaintext_in(&tablet.data, needle),
            "`{needle}` is still in the device's files"
        );
    }
    let write = tablet.fails(&["put", "patient", "--json", r#"{"name": "After"}"#]);
    assert!(write.contains("erased at its relay's request"), "{write}");

    let listed = relay.admin(&["device", "list"]);
    assert!(listed[0]["wiped_at"].is_string(), "{listed}");
    assert_eq!(listed[0]["wipe_discarded"], json!(2), "{listed}");
    // The relay's copy is untouched: the synced record is still there for the clinic.
    let stats = relay.admin(&["stats"]);
    assert_eq!(stats["counts"]["documents"], json!(1), "{stats}");

    let again = tablet.fails(&["sync"]);
    assert!(again.contains("revoked") && !again.contains("erased"), "{again}");
    assert_eq!(tablet.status()["wiped"]["discarded"], json!(2));
}

/// A device watching live when it is revoked with a wipe is told at once (within the relay's
/// revocation tick), erases its data while connected, and its watch ends with the refusal.
#[test]
fn a_watching_device_revoked_with_a_wipe_erases_its_data_without_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let token = relay.token("dana");
    let url = relay.url();
    let dev_dir = dir.path().join("dev");
    let mut dev = open_device(&dev_dir, 6);
    runtime().block_on(net::enroll(&mut dev, &url, &token)).unwrap();
    dev.put(
        "patient",
        None,
        serde_json::from_value(json!({"name": "Quillon Verbatimsky"})).unwrap(),
    )
    .unwrap();
    let device_id = dev.device_id();
    let watcher = std::thread::spawn(move || {
        let mut machine = SyncMachine::default();
        let result = runtime().block_on(async {
            let stop = tokio::time::sleep(Duration::from_secs(30));
            net::watch(&mut dev, &mut machine, &quiet(), stop, |_| {}).await
        });
        (result, dev)
    });
    let authenticated = || authenticated_sessions(&relay);
    assert!(eventually(Duration::from_secs(10), || authenticated() == json!(1)));
    assert!(eventually(Duration::from_secs(10), || {
        relay.admin(&["stats"])["counts"]["documents"] == json!(1)
    }));

    relay.admin(&["device", "revoke", &device_id.to_string(), "--wipe"]);
    let (result, dev) = watcher.join().unwrap();
    let err = result.unwrap_err().to_string();
    assert!(err.contains("erased its local data"), "{err}");
    let status = dev.status().unwrap();
    assert_eq!((status.entities, status.wiped.map(|w| w.discarded)), (0, Some(0)));
    assert!(!plaintext_in(&dev_dir, "Quillon Verbatimsky"));
    let listed = relay.admin(&["device", "list"]);
    assert_eq!(listed[0]["wipe_discarded"], json!(0), "{listed}");
}
