//! What a new user tripped over in their first hour, each as a test: errors under `--json`
//! are JSON, typos get a suggestion, ids get "not a UUID", `user add` never changes a role,
//! token lifetimes are bounded, and the Quickstart's pipelines survive `set -euo pipefail`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use fieldsync_tests::{Peer, Relay, bin};
use serde_json::Value;

fn admin_raw(relay: &Relay, args: &[&str]) -> Output {
    Command::new(bin("fieldsync-relay"))
        .args(["admin", "--data"])
        .arg(&relay.data)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn admin_errors_are_json_under_json_and_typos_and_role_changes_get_told() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);

    let out = admin_raw(&relay, &["--json", "enroll", "nobody"]);
    assert!(!out.status.success());
    let err: Value = serde_json::from_str(stderr(&out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(err["kind"], "not_found", "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("no user named `nobody`"),
        "{err}"
    );
    let plain = admin_raw(&relay, &["enroll", "nobody"]);
    assert!(
        stderr(&plain).starts_with("error: ") && stderr(&plain).contains("no user named `nobody` (users: dana)"),
        "{}",
        stderr(&plain)
    );

    let typo = admin_raw(
        &relay,
        &["user", "add", "sam", "--space", "clinc", "--role", "assistant"],
    );
    assert!(!typo.status.success());
    assert!(stderr(&typo).contains("did you mean `clinic`?"), "{}", stderr(&typo));

    for role in ["assistant", "admin"] {
        let again = admin_raw(&relay, &["user", "add", "dana", "--space", "clinic", "--role", role]);
        assert!(!again.status.success(), "{role}");
        assert!(
            stderr(&again).contains("already a member of `clinic` as clinician"),
            "{}",
            stderr(&again)
        );
        assert!(stderr(&again).contains("admin user role dana"), "{}", stderr(&again));
    }
    let users = relay.admin(&["user", "list"]);
    assert!(
        users.to_string().contains("clinician") && !users.to_string().contains("\"admin\""),
        "{users}"
    );

    for hours in ["0", "100000"] {
        let out = admin_raw(&relay, &["enroll", "dana", "--valid-hours", hours]);
        assert!(!out.status.success(), "{hours}");
        assert!(stderr(&out).contains("1..=720"), "{}", stderr(&out));
    }
    let bad_id = admin_raw(&relay, &["device", "revoke", "not-an-id"]);
    assert!(stderr(&bad_id).contains("is not a UUID"), "{}", stderr(&bad_id));
}

#[test]
fn the_device_cli_suggests_types_and_spaces_lists_the_schema_and_explains_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let tablet = Peer::init(&dir.path().join("tablet"));
    tablet.enroll(&relay, "dana");

    let typo = tablet.fails(&["put", "pateint", "--json", r#"{"name": "Ada"}"#]);
    assert!(
        typo.starts_with("error: unknown entity type `pateint`"),
        "put's --json is its fields, not JSON output: {typo}"
    );
    assert!(typo.contains("did you mean `patient`?"), "{typo}");
    assert!(typo.contains("fieldsync-peer schema"), "{typo}");
    let space = tablet.fails(&["put", "patient", "--space", "clinc", "--json", r#"{"name": "Ada"}"#]);
    assert!(space.contains("did you mean `clinic`?"), "{space}");
    let by_name = tablet.ok(&["put", "patient", "--space", "clinic", "--json", r#"{"name": "Ada"}"#]);
    assert_eq!(tablet.get("patient", by_name.trim())["fields"]["name"], "Ada");
    let bad_id = tablet.fails(&["get", "patient", "nope"]);
    assert!(bad_id.contains("`nope` is not a UUID"), "{bad_id}");

    let out = Command::new(bin("fieldsync-peer"))
        .args(["schema", "patient"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.starts_with("patient (gated"), "{listing}");
    assert!(listing.contains("string, required"), "{listing}");
    let out = Command::new(bin("fieldsync-relay"))
        .args(["schema", "show", "--json"])
        .output()
        .unwrap();
    let types: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        types.as_array().unwrap().iter().any(|t| t["name"] == "intake_form"),
        "{types}"
    );

    let out = tablet.run(&["get", "patient", "67e55044-10b1-426f-9247-bb680e5fe0c8", "--json"]);
    assert!(!out.status.success());
    let err: Value = serde_json::from_str(stderr(&out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(err["kind"], "not_found", "{err}");
}

#[test]
fn the_quickstart_pipelines_pass_under_pipefail() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let script = format!(
        "set -euo pipefail; for i in 1 2 3 4 5; do TOKEN=$({} admin --data {} enroll dana | head -1); test -n \"$TOKEN\"; done",
        bin("fieldsync-relay").display(),
        relay.data.display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn sync_watch_says_what_moves_and_does_not_promise_a_reconnect_after_a_revocation() {
    use std::io::{BufRead, BufReader};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let watcher = Peer::init(&dir.path().join("watcher"));
    let writer = Peer::init(&dir.path().join("writer"));
    watcher.enroll(&relay, "dana");
    writer.enroll(&relay, "dana");
    let mut child = Command::new(bin("fieldsync-peer"))
        .arg("--data")
        .arg(&watcher.data)
        .args(["sync", "--watch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let seen = |needle: &str| lines.lock().unwrap().iter().any(|l| l.contains(needle));
    assert!(fieldsync_tests::eventually(Duration::from_secs(10), || seen(
        "connected"
    )));
    writer.put("patient", r#"{"name": "Live"}"#);
    writer.ok(&["sync"]);
    assert!(
        fieldsync_tests::eventually(Duration::from_secs(10), || seen("received 1 change(s)")),
        "{:?}",
        lines.lock().unwrap()
    );
    // What an app's listener hears, the watch prints: the record another device changed.
    assert!(
        fieldsync_tests::eventually(Duration::from_secs(10), || seen("changed: patient ")),
        "{:?}",
        lines.lock().unwrap()
    );

    let device = watcher.status()["device_id"].as_str().unwrap().to_string();
    relay.admin(&["device", "revoke", &device]);
    let exited = fieldsync_tests::eventually(Duration::from_secs(10), || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    assert!(exited, "watch stops once the device is revoked");
    std::thread::sleep(Duration::from_millis(200));
    let all = lines.lock().unwrap().join("\n");
    assert!(!all.contains("reconnecting"), "{all}");
    assert!(all.contains("revoked"), "{all}");
}

#[test]
fn devices_carry_the_label_their_token_gave_them_and_can_be_renamed() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let token = relay.admin(&["enroll", "dana", "--label", "Dana's iPad"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let ipad = Peer::init(&dir.path().join("ipad"));
    ipad.ok(&["enroll", "--relay", &relay.url(), "--token", &token]);
    let devices = relay.admin(&["device", "list"]);
    assert_eq!(devices[0]["label"], "Dana's iPad", "{devices}");
    let id = devices[0]["device_id"].as_str().unwrap().to_string();

    relay.admin(&["device", "label", &id, "  Front desk iPad "]);
    assert_eq!(relay.admin(&["device", "list"])[0]["label"], "Front desk iPad");
    let text = admin_raw(&relay, &["device", "list"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("\"Front desk iPad\""));
    for bad in ["", "   ", &"x".repeat(81)] {
        let out = admin_raw(&relay, &["device", "label", &id, bad]);
        assert!(!out.status.success(), "{bad:?}");
        assert!(
            stderr(&out).contains("a device label is 1–80 printable characters"),
            "{}",
            stderr(&out)
        );
    }
}

/// The README's Quickstart block, run as written under `set -euo pipefail` (binaries from this
/// build, the relay on a free port instead of 7070).
#[test]
fn the_readme_quickstart_runs_under_pipefail_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split("## Quickstart").nth(1).unwrap();
    let block = section.split("```sh\n").nth(1).unwrap().split("\n```").next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay-data"), 0);
    let script: String = block
        .lines()
        .filter(|l| !l.starts_with("cargo build"))
        .map(|l| {
            l.replace(
                "./target/release/fieldsync-relay",
                &bin("fieldsync-relay").display().to_string(),
            )
            .replace(
                "./target/release/fieldsync-peer",
                &bin("fieldsync-peer").display().to_string(),
            )
            .replace("127.0.0.1:7070", &relay.addr.to_string())
        })
        .collect::<Vec<_>>()
        .join("\n");
    let out = Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    assert!(stdout.contains("Ada Lovelace"), "{stdout}");
}

#[test]
fn the_conflict_archive_names_the_space_and_the_devices() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("gym", &[("alex", "patient")]);
    let enroll = |name: &str, label: &str| {
        let token = relay.admin(&["enroll", "alex", "--label", label])["token"]
            .as_str()
            .unwrap()
            .to_string();
        let peer = Peer::init(&dir.path().join(name));
        peer.ok(&["enroll", "--relay", &relay.url(), "--token", &token]);
        peer
    };
    let phone = enroll("phone", "Alex's phone");
    let watch = enroll("watch", "Alex's watch");
    let s = phone.put("settings", r#"{"units": "kg"}"#);
    phone.ok(&["sync"]);
    watch.ok(&["sync"]);
    phone.ok(&["put", "settings", &s, "--json", r#"{"units": "lb"}"#]);
    std::thread::sleep(std::time::Duration::from_millis(5));
    watch.ok(&["put", "settings", &s, "--json", r#"{"units": "st"}"#]);
    watch.ok(&["sync"]);
    phone.ok(&["sync"]);

    let out = admin_raw(&relay, &["conflicts"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("in gym"), "{text}");
    assert!(text.contains("alex's \"Alex's phone\""), "the loser by name: {text}");
    assert!(text.contains("alex's \"Alex's watch\""), "the winner by name: {text}");
    let rows = relay.admin(&["conflicts"]);
    assert_eq!(rows[0]["space"], "gym", "{rows}");
    assert!(rows[0]["winner"].as_str().unwrap().contains("Alex's watch"), "{rows}");
}

/// The first event `want` accepts (within 20 s; every other event is kept for the failure).
async fn heard_on(
    events: &mut tokio::sync::broadcast::Receiver<fieldsync_peer::ClientEvent>,
    want: impl Fn(&fieldsync_peer::ClientEvent) -> bool,
) -> fieldsync_peer::ClientEvent {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) if want(&e) => return e,
            Ok(Ok(e)) => seen.push(e),
            other => panic!("not heard ({other:?}); heard {seen:?}"),
        }
    }
}

/// The 30-line program an app developer writes (README, "Embed it"): one `Client` per device,
/// enrolled and started from Rust, hearing another device's write through its listener.
#[test]
fn an_app_holds_one_client_that_syncs_live_and_hears_another_devices_write() {
    use fieldsync_peer::{Client, ClientEvent, Notice, SyncStatus};
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician"), ("sam", "clinician")]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let phone = Client::open(&dir.path().join("phone")).unwrap();
        let tablet = Client::open(&dir.path().join("tablet")).unwrap();
        assert!(phone.start().is_err(), "not enrolled yet");
        phone.enroll(&relay.url(), &relay.token("dana")).await.unwrap();
        tablet.enroll(&relay.url(), &relay.token("sam")).await.unwrap();
        let mut heard = tablet.subscribe();
        let mut phone_heard = phone.subscribe();
        phone.start().unwrap();
        tablet.start().unwrap();
        assert!(tablet.start().is_err(), "one sync task per client");
        heard_on(&mut heard, |e| matches!(e, ClientEvent::Connected)).await;

        let id = phone
            .write("patient")
            .set("name", "Ada")
            .set("mrn", "M-1")
            .save()
            .unwrap()
            .entity_id;
        let changed = heard_on(
            &mut heard,
            |e| matches!(e, ClientEvent::Notice(Notice::Changed { entity_id, .. }) if *entity_id == id),
        )
        .await;
        assert!(
            matches!(changed, ClientEvent::Notice(Notice::Changed { ref entity_type, .. }) if entity_type == "patient")
        );
        // The listener ran after the commit: the record is there, for every clone of the client.
        let seen = tablet.clone().get(id).unwrap().unwrap();
        assert_eq!(seen.fields["name"], "Ada");
        // The phone heard its write go out: the status every handle reads is the sync task's,
        // online and synced (not "offline", as a second handle beside a watch once said).
        heard_on(
            &mut phone_heard,
            |e| matches!(e, ClientEvent::Status(s) if s.state == SyncStatus::Synced && s.unsynced == 0),
        )
        .await;
        assert_eq!(phone.clone().status().unwrap().state, SyncStatus::Synced);
        // Edits are builder-style too, and the phone hears the tablet's.
        tablet
            .write("patient")
            .id(id)
            .set("mrn", "M-2")
            .clear("phone")
            .save()
            .unwrap();
        heard_on(&mut phone_heard, |e| {
            matches!(e, ClientEvent::Notice(Notice::Changed { .. }))
        })
        .await;
        assert_eq!(phone.get(id).unwrap().unwrap().fields["mrn"], "M-2");
        phone.stop().await;
        tablet.stop().await;
        phone.stop().await; // stopping twice is harmless
        // Stopped, the device still works offline and its writes wait for the next start.
        phone.write("patient").id(id).set("mrn", "M-3").save().unwrap();
        assert_eq!(phone.status().unwrap().state, SyncStatus::Offline);
        // Dropping the last handle of a running client ends its sync task too.
        let mut last = tablet.subscribe();
        tablet.start().unwrap();
        heard_on(&mut last, |e| matches!(e, ClientEvent::Connected)).await;
        drop(tablet);
        // Once the task ended nothing holds the device: the channel closes.
        let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            while !matches!(last.recv().await, Err(tokio::sync::broadcast::error::RecvError::Closed)) {}
        })
        .await;
        assert!(closed.is_ok(), "the sync task ended and released the device");
    });
}
