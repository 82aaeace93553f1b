//! Several relay processes on one PostgreSQL store (issue 16), against a throwaway PostgreSQL
//! server the test starts: one cluster identity, devices on different relays converging and
//! hearing each other's writes live, one `Applied` and one conflict prompt for a gated record
//! edited through two relays, a relay killed mid-push whose device fails over through its load
//! balancer without losing or repeating anything, a device holding the cluster's addresses
//! failing over by itself, and a relay that missed writes catching up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fieldsync_peer::{Client, ClientEvent, Notice};
use fieldsync_relay::store::postgres::throwaway::Throwaway;
use fieldsync_tests::proxy::Proxy;
use fieldsync_tests::{Peer, Relay, eventually, http_get};
use serde_json::{Value, json};

struct Cluster {
    _server: Throwaway,
    dir: tempfile::TempDir,
    url: String,
}

impl Cluster {
    fn new(test: &str) -> Option<Cluster> {
        let server = Throwaway::start_or_skip(test)?;
        let url = server.database("relay");
        Some(Cluster {
            _server: server,
            dir: tempfile::tempdir().unwrap(),
            url,
        })
    }

    fn relay(&self, name: &str) -> Relay {
        Relay::start_postgres(&self.url, &self.dir.path().join(name), 0)
    }

    fn peer(&self, name: &str) -> Peer {
        Peer::init(&self.dir.path().join(name))
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn relay_id(relay: &Relay) -> Value {
    let (code, body) = http_get(relay.addr, "/v1/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["relay_id"].clone()
}

/// The drill on the cluster's store: `verify --store URL` (chains, cross-table checks,
/// receipts) passes; returns its audit report.
fn verify(relay: &Relay) -> Value {
    let url = relay.store().expect("a cluster relay");
    let out = Relay::cli(&["verify", "--store", url, "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success() && report["ok"] == json!(true), "{report}");
    assert_eq!(relay.admin(&["audit", "verify"])["records"], report["audit"]["records"]);
    report["audit"].clone()
}

/// A sample of the relay's `/metrics` (0 when absent).
fn metric(relay: &Relay, sample: &str) -> u64 {
    let (code, text) = http_get(relay.addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn heard(events: &mut tokio::sync::broadcast::Receiver<ClientEvent>, id: uuid::Uuid) -> Duration {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(ClientEvent::Notice(Notice::Changed { entity_id, .. }))) if entity_id == id => {
                return started.elapsed();
            }
            Ok(Ok(_)) => {}
            other => panic!("the write of another relay's device was not heard: {other:?}"),
        }
    }
}

#[test]
fn devices_on_two_relays_share_one_identity_converge_and_hear_each_others_writes_live() {
    let Some(c) = Cluster::new("devices_on_two_relays") else {
        return;
    };
    let a = c.relay("a");
    let b = c.relay("b");
    assert_eq!(relay_id(&a), relay_id(&b), "one relay identity for the cluster");
    a.setup("clinic", &[("dana", "clinician"), ("cody", "clinician")]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tablet = Client::open(&c.path("tablet")).unwrap();
        let phone = Client::open(&c.path("phone")).unwrap();
        tablet.enroll(&a.url(), &a.token("dana")).await.unwrap();
        // A token the admin made through one relay's store enrolls through the other.
        phone.enroll(&b.url(), &a.token("cody")).await.unwrap();
        let mut tablet_heard = tablet.subscribe();
        let mut phone_heard = phone.subscribe();
        tablet.start().unwrap();
        phone.start().unwrap();
        for events in [&mut tablet_heard, &mut phone_heard] {
            while !matches!(events.recv().await, Ok(ClientEvent::Connected)) {}
        }
        let on_a = tablet.write("patient").set("name", "Ada").save().unwrap().entity_id;
        let took = heard(&mut phone_heard, on_a).await;
        eprintln!("a write through relay A reached a device on relay B live in {took:?}");
        let on_b = phone.write("patient").set("name", "Grace").save().unwrap().entity_id;
        heard(&mut tablet_heard, on_b).await;
        for client in [&tablet, &phone] {
            let names: Vec<Value> = client
                .list("patient", &[])
                .unwrap()
                .into_iter()
                .map(|e| e.fields["name"].clone())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");
        }
        tablet.stop().await;
        phone.stop().await;
    });
    let stats = b.admin(&["stats"]);
    assert_eq!(
        (stats["counts"]["feed"].clone(), stats["counts"]["receipts"].clone()),
        (json!(2), json!(2))
    );
    // Each relay's /metrics shows its store and what it heard of the other's commit.
    assert_eq!(metric(&b, "fieldsync_store_info{kind=\"postgres\"}"), 1);
    assert!(
        metric(&b, "fieldsync_notifications_total") >= 1,
        "relay B heard relay A's commit"
    );
    assert!(metric(&b, "fieldsync_notification_lag_seconds_count") >= 1);
    verify(&b);
}

#[test]
fn a_gated_record_edited_through_two_relays_gets_one_applied_and_one_conflict_prompt() {
    let Some(c) = Cluster::new("a_gated_record_edited_through_two_relays") else {
        return;
    };
    let a = c.relay("a");
    let b = c.relay("b");
    a.setup("clinic", &[("dana", "clinician"), ("cody", "clinician")]);
    let tablet = c.peer("tablet");
    let phone = c.peer("phone");
    tablet.enroll(&a, "dana");
    phone.ok(&["enroll", "--relay", &b.url(), "--token", &a.token("cody")]);
    let id = tablet.put("patient", r#"{"name": "Ada", "phone": "1"}"#);
    tablet.ok(&["sync"]);
    phone.ok(&["sync"]);
    tablet.ok(&["put", "patient", &id, "--json", r#"{"phone": "2"}"#]);
    phone.ok(&["put", "patient", &id, "--json", r#"{"phone": "3"}"#]);
    assert_eq!(tablet.json(&["sync"])["summary"]["applied"], json!(1));
    let summary = phone.json(&["sync"]);
    assert_eq!(summary["summary"]["conflicts"], json!(1), "{summary}");
    let conflicts = phone.json(&["conflicts"]);
    assert_eq!(conflicts["conflicts"].as_array().map(Vec::len), Some(1), "{conflicts}");
    assert_eq!(
        conflicts["conflicts"][0]["theirs"]["fields"]["phone"],
        json!("2"),
        "the edit relay A applied"
    );
    assert_eq!(
        b.admin(&["stats"])["counts"]["feed"],
        json!(2),
        "the create and one edit"
    );
    verify(&a);
}

#[test]
fn a_relay_killed_mid_push_fails_its_device_over_without_losing_or_repeating_anything() {
    let Some(c) = Cluster::new("a_relay_killed_mid_push") else {
        return;
    };
    let mut a = c.relay("a");
    let b = c.relay("b");
    a.setup("clinic", &[("dana", "clinician")]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The device knows one address: the load balancer's, which sends it to relay A.
    let balancer = runtime.block_on(Proxy::start(a.addr));
    let tablet = c.peer("tablet");
    tablet.ok(&["enroll", "--relay", &balancer.url(), "--token", &a.token("dana")]);
    const RECORDS: usize = 600;
    for n in 0..RECORDS {
        tablet.put("patient", &format!(r#"{{"name": "Patient {n}"}}"#));
    }
    let sent_before = balancer.upstream_bytes.load(Ordering::SeqCst);
    let mut sync = std::process::Command::new(fieldsync_tests::bin("fieldsync-peer"))
        .arg("--data")
        .arg(c.path("tablet"))
        .arg("sync")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Mid-push: once the device has sent more than its first batch (256 compressed pushes are
    // about 32 KB of the ~75 KB in all), relay A dies.
    let committed = || b.admin(&["stats"])["counts"]["feed"].as_u64().unwrap_or(0);
    assert!(eventually(Duration::from_secs(30), || {
        balancer.upstream_bytes.load(Ordering::SeqCst) > sent_before + 40_000
    }));
    a.kill();
    let _ = sync.wait();
    let unsynced = tablet.status()["unsynced"].as_u64().unwrap();
    let committed_by_a = committed();
    eprintln!("relay A killed with {committed_by_a} writes committed and {unsynced} of {RECORDS} unconfirmed");
    assert!(unsynced > 0, "the push was over before the kill: nothing to fail over");
    assert!(committed_by_a > 0, "relay A died before committing anything");
    // The balancer moves to relay B; the device syncs again and drains.
    balancer.retarget(b.addr);
    tablet.ok(&["sync"]);
    assert_eq!(tablet.status()["unsynced"], json!(0));
    let stats = b.admin(&["stats"]);
    let counts = &stats["counts"];
    assert_eq!(
        (
            counts["documents"].clone(),
            counts["feed"].clone(),
            counts["receipts"].clone()
        ),
        (json!(RECORDS), json!(RECORDS), json!(RECORDS)),
        "every write applied exactly once: {stats}"
    );
    let report = verify(&b);
    assert_eq!(report["records"], json!(RECORDS));
    drop(balancer);
    drop(runtime);
}

#[test]
fn a_relay_that_was_down_while_others_wrote_serves_everything_after_its_restart() {
    let Some(c) = Cluster::new("a_relay_that_was_down") else {
        return;
    };
    let a = c.relay("a");
    let mut b = c.relay("b");
    a.setup("clinic", &[("dana", "clinician"), ("cody", "clinician")]);
    let tablet = c.peer("tablet");
    let phone = c.peer("phone");
    tablet.enroll(&a, "dana");
    phone.ok(&["enroll", "--relay", &b.url(), "--token", &a.token("cody")]);
    b.kill();
    let ids: Vec<String> = (0..5)
        .map(|n| tablet.put("patient", &format!(r#"{{"name": "P{n}"}}"#)))
        .collect();
    tablet.ok(&["sync"]);
    b.restart();
    phone.ok(&["sync"]);
    for id in &ids {
        assert!(
            phone.get("patient", id)["fields"]["name"].is_string(),
            "{id} missing on the phone"
        );
    }
}

/// The device holds the cluster's addresses itself (no load balancer): when its relay dies it
/// moves on by itself, in one-shot sync and while watching, and an address of another relay
/// listed by mistake (it does not know the device) neither takes the device nor marks it
/// refused.
#[test]
fn a_device_holding_the_clusters_addresses_fails_over_by_itself_and_skips_a_stranger() {
    let Some(c) = Cluster::new("a_device_holding_the_clusters_addresses") else {
        return;
    };
    let mut a = c.relay("a");
    let b = c.relay("b");
    let stranger = Relay::start(&c.path("stranger"), 0);
    a.setup("clinic", &[("dana", "clinician"), ("cody", "clinician")]);
    let tablet = c.peer("tablet");
    tablet.enroll(&a, "dana");
    let list = format!("{},{},{}", a.url(), stranger.url(), b.url());
    let relays = tablet.json(&["relays", "--set", &list]);
    assert_eq!(relays["relays"].as_array().map(Vec::len), Some(3), "{relays}");
    let bad = tablet.fails(&["relays", "--set", "http://nowhere:1"]);
    assert!(bad.contains("not a relay address"), "{bad}");
    tablet.put("patient", r#"{"name": "Ada"}"#);
    tablet.ok(&["sync"]);

    // A phone watching through the same list, connected to relay A when it dies.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let phone = Client::open(&c.path("phone")).unwrap();
    runtime.block_on(phone.enroll(&a.url(), &a.token("cody"))).unwrap();
    phone.set_relays(&[a.url(), stranger.url(), b.url()]).unwrap();
    let mut phone_heard = phone.subscribe();
    runtime.block_on(async {
        phone.start().unwrap();
        while !matches!(phone_heard.recv().await, Ok(ClientEvent::Connected)) {}
    });

    a.kill();
    // One-shot: A cannot be reached, the stranger refuses, B takes the write.
    let grace = tablet.put("patient", r#"{"name": "Grace"}"#);
    tablet.ok(&["sync"]);
    let status = tablet.status();
    assert_eq!(status["unsynced"], json!(0), "{status}");
    assert!(status["auth_failure"].is_null(), "{status}");
    assert_eq!(status["state"], json!("synced"), "{status}");
    // Watching: the phone finds B on its own and hears the write made through it.
    let grace = uuid::Uuid::parse_str(&grace).unwrap();
    let took = runtime.block_on(heard(&mut phone_heard, grace));
    eprintln!("the watching device failed over and heard the write {took:?} after the other's sync");
    // Both devices did try the stranger on the way (it refused them as unknown devices).
    let refused = metric(&stranger, "fieldsync_auth_failures_total{reason=\"unknown_device\"}");
    assert!(refused >= 2, "the stranger refused {refused} times");
    assert!(phone.status().unwrap().auth_failure.is_none());
    assert_eq!(phone.relays().len(), 3);
    runtime.block_on(phone.stop());
    assert_eq!(b.admin(&["stats"])["counts"]["feed"], json!(2));
    verify(&b);
}
