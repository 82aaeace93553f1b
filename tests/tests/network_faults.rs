//! Live propagation and what the network and the relay process can do wrong: a relay killed
//! mid-push, connections cut mid-batch, clients that send garbage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fieldsync_peer::net;
use fieldsync_peer::sync::{SyncInput, SyncMachine};
use fieldsync_peer::{Device, OutboxState};
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_tests::attacker::version_of;
use fieldsync_tests::proxy::Proxy;
use fieldsync_tests::{Peer, Relay, eventually, obj, open_device, quiet};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn enrolled_device(rt: &tokio::runtime::Runtime, dir: &std::path::Path, relay: &Relay, url: &str, seed: u64) -> Device {
    let mut dev = open_device(dir, seed);
    rt.block_on(net::enroll(&mut dev, url, &relay.token("dana"))).unwrap();
    dev
}

#[test]
fn a_write_on_one_device_reaches_a_watching_device_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let a = Peer::init(&dir.path().join("a"));
    let b = Peer::init(&dir.path().join("b"));
    a.enroll(&relay, "dana");
    b.enroll(&relay, "dana");
    let mut watcher = std::process::Command::new(fieldsync_tests::bin("fieldsync-peer"))
        .arg("--data")
        .arg(&b.data)
        .args(["sync", "--watch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the watcher is connected and caught up.
    assert!(eventually(Duration::from_secs(10), || b.status()["state"] == json!("synced")));
    std::thread::sleep(Duration::from_millis(300));
    let p = a.put("patient", r#"{"name": "Grace"}"#);
    a.ok(&["sync"]);
    let synced_at = std::time::Instant::now();
    let seen = eventually(Duration::from_secs(1), || {
        b.run(&["get", "patient", &p]).status.success()
    });
    let took = synced_at.elapsed();
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert!(seen, "B did not see A's write within a second of A's sync");
    eprintln!("live propagation observed after {took:?}");
}

#[test]
fn the_relay_killed_mid_push_loses_nothing_acknowledged_and_the_device_finishes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = relay.url();
    let dev_dir = dir.path().join("a");
    let mut dev = enrolled_device(&rt, &dev_dir, &relay, &url, 1);
    let total = 3000;
    for i in 0..total {
        dev.put("patient", None, obj(json!({"name": format!("P{i}")}))).unwrap();
    }
    // Push in the background; kill the relay as soon as some of it is acknowledged.
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut machine = SyncMachine::default();
        let r = rt.block_on(net::sync_once(&mut dev, &mut machine, &quiet()));
        (dev, r.map(|_| ()).map_err(|e| e.to_string()))
    });
    let observer = open_device(&dev_dir, 2);
    let applied = |d: &Device| {
        d.queue(true)
            .unwrap()
            .iter()
            .filter(|i| i.state == OutboxState::Applied)
            .count()
    };
    assert!(
        eventually(Duration::from_secs(60), || applied(&observer) > 0),
        "nothing was acknowledged"
    );
    relay.kill();
    let (mut dev, result) = handle.join().unwrap();
    let acknowledged_before_kill: Vec<_> = dev
        .queue(true)
        .unwrap()
        .into_iter()
        .filter(|i| i.state == OutboxState::Applied)
        .map(|i| i.entity_id)
        .collect();
    assert!(
        acknowledged_before_kill.len() < total,
        "the kill came too late to test anything ({result:?})"
    );
    assert!(result.is_err(), "the sync cannot have completed against a killed relay");

    // Every acknowledged write is on disk at the relay.
    for id in &acknowledged_before_kill {
        assert_eq!(version_of(&relay, *id), Some(1), "acknowledged {id} was lost");
    }
    relay.restart();
    let mut machine = SyncMachine::default();
    rt.block_on(net::sync_once(&mut dev, &mut machine, &quiet())).unwrap();
    assert_eq!(dev.status().unwrap().unsynced, 0);
    relay.stop();
    let store = SqliteBackend::open_existing(&relay.data).unwrap();
    let counts = store.counts().unwrap();
    assert_eq!(counts.documents, total as u64, "{counts:?}");
    assert_eq!(
        counts.audit, total as u64,
        "every mutation applied exactly once: {counts:?}"
    );
    let report = fieldsync_relay::audit::verify(&store).unwrap();
    assert!(report.ok(), "{report:?}");
}

#[test]
fn connections_cut_repeatedly_never_roll_back_a_local_edit_and_retries_reuse_ids() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let proxy = rt.block_on(Proxy::start(relay.addr));
    let mut dev = enrolled_device(&rt, &dir.path().join("a"), &relay, &proxy.url(), 3);
    let mut ids = Vec::new();
    for i in 0..1500 {
        ids.push(
            dev.put("patient", None, obj(json!({"name": format!("P{i}")})))
                .unwrap()
                .entity_id,
        );
    }
    let mutation_ids: Vec<_> = dev.queue(false).unwrap().iter().map(|i| i.mutation_id).collect();
    let mut machine = SyncMachine::default();
    let mut cuts = 0;
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 200, "never finished");
        // Edit locally between attempts: edits must survive whatever the network does.
        let edited = ids[rounds % ids.len()];
        dev.update("patient", edited, obj(json!({"mrn": format!("r{rounds}")})))
            .unwrap();
        let before = proxy.upstream_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let cutter = {
            let bytes = proxy.upstream_bytes.clone();
            // Compressed frames (the default): the 1,500 pushes are about 190 KB upstream.
            let trigger = before + 5_000 + (rounds as u64 * 19_793) % 50_000;
            let p = &proxy;
            async move {
                while bytes.load(std::sync::atomic::Ordering::Relaxed) < trigger {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                p.cut_all();
            }
        };
        let opts = quiet();
        let result = rt.block_on(async {
            tokio::select! {
                r = net::sync_once(&mut dev, &mut machine, &opts) => Some(r),
                _ = cutter => None,
            }
        });
        machine.handle(&mut dev, SyncInput::Disconnected).unwrap();
        assert_eq!(
            dev.get(edited).unwrap().unwrap().fields["mrn"],
            json!(format!("r{rounds}")),
            "local edit rolled back"
        );
        match result {
            Some(Ok(s)) if s.idle && dev.status().unwrap().unsynced == 0 => break,
            Some(_) => {}
            None => cuts += 1,
        }
        // Wait out the machine's reconnect backoff.
        machine = SyncMachine::default();
    }
    assert!(cuts >= 3, "the test should cut connections mid-sync (cut {cuts} times)");
    // The original mutation ids are the ones the relay applied: none was re-created.
    let applied: std::collections::BTreeSet<_> = dev
        .queue(true)
        .unwrap()
        .iter()
        .filter(|i| i.state == OutboxState::Applied)
        .map(|i| i.mutation_id)
        .collect();
    for id in &mutation_ids {
        assert!(
            applied.contains(id),
            "mutation {id} was never applied under its original id"
        );
    }
    // No mutation applied twice: one feed entry and one audit record per applied mutation, and
    // the records' versions add up to exactly that many applications (receipts alone are one
    // per id by construction and could not tell).
    let versions: u64 = ids
        .iter()
        .map(|id| version_of(&relay, *id).expect("on the relay"))
        .sum();
    let store = SqliteBackend::open_existing(&relay.data).unwrap();
    let counts = store.counts().unwrap();
    let n = applied.len() as u64;
    assert_eq!((counts.feed, counts.audit, counts.receipts), (n, n, n), "{counts:?}");
    assert_eq!(versions, n, "each applied mutation raised one version once");
}

#[test]
fn a_client_sending_garbage_is_closed_with_a_reason_and_others_keep_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("{}/v1/sync", relay.url());
    let close = rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
        ws.send(Message::Binary(vec![0xde, 0xad, 0xbe, 0xef].into()))
            .await
            .unwrap();
        let mut reason = None;
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Close(Some(f)) = m {
                reason = Some((u16::from(f.code), f.reason.to_string()));
                break;
            }
        }
        reason
    });
    let (code, reason) = close.expect("a close frame with a reason");
    assert_eq!(code, 1002);
    assert!(reason.contains("malformed"), "{reason}");
    let text_close = rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
        ws.send(Message::Text("hello?".into())).await.unwrap();
        let mut code = None;
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Close(Some(f)) = m {
                code = Some(u16::from(f.code));
                break;
            }
        }
        code
    });
    assert_eq!(text_close, Some(1003));
    // The relay keeps serving everyone else.
    let a = Peer::init(&dir.path().join("a"));
    a.enroll(&relay, "dana");
    a.put("patient", r#"{"name": "Ada"}"#);
    a.ok(&["sync"]);
    assert_eq!(a.status()["unsynced"], json!(0));
}
