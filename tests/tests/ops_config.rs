//! Operating the relay (issue 8), continued: TLS with a test CA, the config file driving
//! scheduled verified backups, and structured logs that name every mutation's device, user and
//! mutation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldsync_tests::{Peer, Relay, eventually, http_get, metric, stdout_of};
use serde_json::{Value, json};
use uuid::Uuid;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A stderr line of a relay logging as JSON: `None` for the one start-up banner `serve` prints
/// before logging starts; any other line must be one JSON object, or the test fails.
fn log_json(line: &str) -> Option<Value> {
    if line.starts_with("fieldsync relay ") && line.contains(" listening on ") {
        return None;
    }
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
    assert!(v.is_object(), "a log line that is not an object: {line}");
    Some(v)
}

#[test]
fn tls_works_with_the_test_ca_and_fails_with_another() {
    let dir = tempfile::tempdir().unwrap();
    let ca = fieldsync_tests::tls::TestCa::new("fieldsync test CA");
    let other = fieldsync_tests::tls::TestCa::new("someone else's CA");
    let (cert, key) = ca.issue_server(dir.path());
    let ca_pem = ca.write_ca(&dir.path().join("ca.pem"));
    let other_pem = other.write_ca(&dir.path().join("other.pem"));
    let relay = Relay::start_with(
        &dir.path().join("relay"),
        0,
        &["--tls-cert", p(&cert), "--tls-key", p(&key)],
        &[("RUST_LOG", "warn")],
    );
    assert_eq!(relay.scheme, "wss");
    relay.setup("clinic", &[("dana", "clinician")]);
    let url = relay.url();
    let a = Peer::init(&dir.path().join("a"));
    let token = relay.token("dana");

    // The wrong CA, and no CA (the system roots do not know the test CA), are refused.
    let wrong = a.fails(&["--ca-file", p(&other_pem), "enroll", "--relay", &url, "--token", &token]);
    assert!(wrong.to_lowercase().contains("certificate"), "{wrong}");
    let none = a.fails(&["enroll", "--relay", &url, "--token", &token]);
    assert!(none.contains("cannot reach") || none.contains("TLS"), "{none}");
    // Plain WebSocket to the TLS port gets nowhere either.
    let plain = a.fails(&["enroll", "--relay", &format!("ws://{}", relay.addr), "--token", &token]);
    assert!(plain.contains("cannot reach"), "{plain}");

    // The right CA: enrollment, a write and a sync over wss://.
    a.ok(&["--ca-file", p(&ca_pem), "enroll", "--relay", &url, "--token", &token]);
    let id = a.put("patient", r#"{"name": "Tls"}"#);
    a.ok(&["--ca-file", p(&ca_pem), "sync"]);
    let b = Peer::init(&dir.path().join("b"));
    b.ok(&[
        "--ca-file",
        p(&ca_pem),
        "enroll",
        "--relay",
        &url,
        "--token",
        &relay.token("dana"),
    ]);
    b.ok(&["--ca-file", p(&ca_pem), "sync"]);
    assert_eq!(
        b.get("patient", &id)["fields"]["name"],
        json!("Tls"),
        "{}",
        b.get("patient", &id)
    );
    // Without the CA file the synced device cannot reach the relay, and keeps its data.
    assert!(a.fails(&["sync"]).contains("sync failed"));
}

#[test]
fn the_config_file_drives_scheduled_verified_backups_with_retention_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "data = \"relay\"\nbackup_dir = \"backups\"\nbackup_every = \"1s\"\nbackup_keep = 2\nlog_format = \"json\"\n",
    )
    .unwrap();
    // --data comes from the file; the flag for the listen address overrides nothing there.
    let mut cmd = std::process::Command::new(fieldsync_tests::bin("fieldsync-relay"));
    cmd.args(["serve", "--config", p(&config), "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let addr = {
        let found = eventually(Duration::from_secs(30), || {
            lines.lock().unwrap().iter().any(|l| l.contains("listening on ws://"))
        });
        assert!(found, "relay did not start: {:?}", lines.lock().unwrap());
        let all = lines.lock().unwrap();
        let line = all.iter().find(|l| l.contains("listening on ws://")).unwrap();
        let rest = line.split("ws://").nth(1).unwrap();
        rest.split('/').next().unwrap().parse::<std::net::SocketAddr>().unwrap()
    };
    let backups_ok = || {
        let (_, body) = http_get(addr, "/v1/status");
        serde_json::from_str::<Value>(&body).unwrap()["backups"]["ok"]
            .as_u64()
            .unwrap_or(0)
    };
    let took_three = eventually(Duration::from_secs(30), || backups_ok() >= 3);
    let metrics = http_get(addr, "/metrics").1;
    let _ = child.kill();
    let _ = child.wait();
    assert!(took_three, "scheduled backups did not run: {:?}", lines.lock().unwrap());
    assert!(metric(&metrics, r#"fieldsync_backups_total{result="ok"}"#).unwrap() >= 3.0);
    assert!(metric(&metrics, "fieldsync_backup_last_success_timestamp_seconds").is_some());
    let files = fieldsync_relay::backup::scheduled_backups(&dir.path().join("backups")).unwrap();
    assert_eq!(files.len(), 2, "retention keeps the newest 2: {files:?}");
    let drill = Relay::cli(&["restore-drill", "--from", p(&files[1])]);
    assert!(drill.status.success(), "{}", stdout_of(&drill));
    // Every log line is one JSON object (all but the start-up banner, which is not a log line);
    // backups are logged with their drill verdict.
    let logs = lines.lock().unwrap();
    let json_lines: Vec<Value> = logs.iter().filter_map(|l| log_json(l)).collect();
    assert!(json_lines.len() >= 3, "{logs:?}");
    assert!(json_lines.iter().any(|v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("restore-drill: OK"))
    }));
}

#[test]
fn every_log_line_about_a_mutation_names_its_device_user_and_mutation() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(
        &dir.path().join("relay"),
        0,
        &["--log-format", "json"],
        &[("RUST_LOG", "fieldsync_relay=debug")],
    );
    relay.setup("clinic", &[("dana", "clinician")]);
    let a = Peer::init(&dir.path().join("a"));
    let b = Peer::init(&dir.path().join("b"));
    a.enroll(&relay, "dana");
    b.enroll(&relay, "dana");
    let id = a.put("patient", r#"{"name": "Logged"}"#);
    a.ok(&["sync"]);
    b.ok(&["sync"]);
    a.ok(&["put", "patient", &id, "--json", r#"{"phone": "1"}"#]);
    a.ok(&["sync"]);
    b.ok(&["put", "patient", &id, "--json", r#"{"phone": "2"}"#]);
    let _ = b.run(&["sync"]);
    let about_mutations = || -> Vec<Value> {
        relay
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| log_json(l))
            .filter(|v| v.to_string().contains("mutation"))
            .collect()
    };
    assert!(eventually(Duration::from_secs(5), || {
        about_mutations()
            .iter()
            .any(|v| v["fields"]["message"] == json!("mutation refused"))
    }));
    let lines = about_mutations();
    assert!(lines.len() >= 6, "{lines:?}");
    for v in &lines {
        // The ids may sit on the event or on an enclosing span.
        let mut scopes = vec![v["fields"].clone()];
        scopes.extend(v["spans"].as_array().cloned().unwrap_or_default());
        for key in ["device_id", "user_id", "mutation_id"] {
            let found = scopes
                .iter()
                .any(|s| s[key].as_str().is_some_and(|x| Uuid::parse_str(x).is_ok()));
            assert!(found, "no {key} in {v}");
        }
    }
}
