//! A relay process applying several spaces at once: `--workers` threads over `--shards` files,
//! devices of different spaces syncing at the same time, every space numbered on its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_tests::relay_files::RelayFiles;
use fieldsync_tests::{Peer, Relay};
use serde_json::{Value, json};

#[test]
fn spaces_sync_in_parallel_over_the_shards_of_one_relay() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start_with(&data, 0, &["--workers", "2", "--shards", "3"], &[("RUST_LOG", "warn")]);
    let spaces = ["clinic", "gym", "rehab"];
    for (i, space) in spaces.iter().enumerate() {
        relay.setup(space, &[(&format!("user{i}"), "clinician")]);
    }
    let listed = relay.admin(&["space", "list"]);
    let mut shards: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["shard"].as_u64().unwrap())
        .collect();
    shards.sort();
    assert_eq!(shards, vec![0, 1, 2], "one space per shard: {listed}");

    // A device per space, each writing and syncing at the same time as the others.
    let peers: Vec<Peer> = (0..spaces.len())
        .map(|i| {
            let p = Peer::init(&dir.path().join(format!("device{i}")));
            p.enroll(&relay, &format!("user{i}"));
            p
        })
        .collect();
    std::thread::scope(|scope| {
        for (i, p) in peers.iter().enumerate() {
            scope.spawn(move || {
                for n in 0..8 {
                    p.put("patient", &json!({ "name": format!("s{i} p{n}") }).to_string());
                    if n % 3 == 2 {
                        p.ok(&["sync"]);
                    }
                }
                p.ok(&["sync"]);
            });
        }
    });
    for p in &peers {
        assert_eq!(p.status()["unsynced"], json!(0));
        let listed = p.json(&["list", "patient"]);
        assert_eq!(
            listed.as_array().unwrap().len(),
            8,
            "each device sees its own space only"
        );
    }

    // Every space counts 1..8 on its own, in its own chain.
    let verify = relay.admin(&["audit", "verify"]);
    let chains = verify["spaces"].as_array().unwrap();
    assert_eq!(chains.len(), 3);
    assert!(
        chains
            .iter()
            .all(|c| c["records"] == json!(8) && c["first_bad"].is_null()),
        "{verify}"
    );
    let files = RelayFiles::open(&data);
    assert_eq!(files.counts().feed, 24);
    assert!(files.backend.consistency().unwrap().problems().is_empty());
    drop(files);

    // The shard count is the directory's own: a restart asking for more keeps three.
    relay.stop();
    let relay = Relay::start_with(&data, 0, &["--shards", "5"], &[("RUST_LOG", "warn")]);
    let stats: Value = relay.admin(&["stats"]);
    assert_eq!(stats["shards"], json!(3), "{stats}");
    assert!(!data.join("shards/shard-3.db").exists());
}
