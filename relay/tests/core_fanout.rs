//! Live fan-out with another writer on the same store (a second relay): a device's cursor never
//! moves past a feed row it has not received (issue: two relays on one data directory, and a
//! watching device that silently missed a record for good).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, TestDevice, TestRelay, live_entries};
use fieldsync_relay::core::{ConnId, Input, Output, RelayCore};
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_schema::wire::SpaceCursor;
use fieldsync_schema::{ClientMessage, RelayMessage, Role};
use serde_json::json;

/// Logs `dev` in on `core` (another relay than the one it enrolled through).
fn login_on(core: &mut RelayCore<SqliteBackend>, conn: ConnId, dev: &TestDevice, now: u64) {
    core.handle([Input::Opened(conn)], 0);
    let out = core.handle([Input::message(conn, dev.hello())], now);
    let Output::Send(_, RelayMessage::Challenge { relay_id, nonce }) = &out[0] else {
        panic!("{out:?}")
    };
    let out = core.handle([Input::message(conn, dev.auth(*relay_id, &nonce.0))], now + 1);
    assert!(
        matches!(&out[0], Output::Send(_, RelayMessage::Welcome { .. })),
        "{out:?}"
    );
}

fn push_on(core: &mut RelayCore<SqliteBackend>, conn: ConnId, m: fieldsync_schema::Mutation, now: u64) -> Vec<Output> {
    core.handle(
        [Input::message(
            conn,
            ClientMessage::Push {
                batch_id: 1,
                mutations: vec![m],
            },
        )],
        now,
    )
}

#[test]
fn rows_another_relay_committed_reach_live_devices_before_this_relays_own_and_none_is_skipped() {
    let mut r = TestRelay::new();
    let clinic = r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    r.user("cody", "clinic", Role::Clinician);
    let mut watcher = r.device("dana", 1);
    let mut writer_a = r.device("dana", 2);
    let mut writer_b = r.device("cody", 3);
    let mut relay_b = r.second_core();
    login_on(&mut relay_b, 50, &writer_b, r.now);
    writer_b.conn = 50;
    assert!(
        r.pull(&mut watcher).is_empty(),
        "caught up: the watcher is live on relay A"
    );

    // Relay B commits seq 1; relay A commits nothing: its tick delivers B's row.
    let (p1, m1) = writer_b.create("patient", json!({"name": "From relay B"}), T0 + 10);
    let out = push_on(&mut relay_b, 50, m1, T0 + 10);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Send(50, RelayMessage::PushResult { .. })))
    );
    r.now += 300;
    let ticked = r.core.handle([Input::Tick], r.now);
    let seen = live_entries(&ticked, watcher.conn);
    assert_eq!(
        seen.iter().map(|e| (e.seq, e.entity_id)).collect::<Vec<_>>(),
        vec![(1, p1)]
    );

    // B commits seq 2, then A commits seq 3 before any tick: the watcher gets 2, then 3.
    let (p2, m2) = writer_b.create("patient", json!({"name": "Also from B"}), T0 + 20);
    push_on(&mut relay_b, 50, m2, T0 + 20);
    let (p3, m3) = writer_a.create("patient", json!({"name": "From relay A"}), T0 + 30);
    let out = push_on(&mut r.core, writer_a.conn, m3, T0 + 30);
    let seen: Vec<_> = live_entries(&out, watcher.conn)
        .iter()
        .map(|e| (e.seq, e.entity_id))
        .collect();
    assert_eq!(
        seen,
        vec![(2, p2), (3, p3)],
        "B's row first, then A's own, none skipped"
    );

    // The watcher's device applies every entry it was sent; pulling from its cursor afterwards
    // finds nothing it missed.
    watcher
        .cursor
        .spaces
        .insert(clinic, SpaceCursor { seq: 3, snapshot: None });
    assert!(r.pull(&mut watcher).is_empty());
}

#[test]
fn every_live_entry_a_device_gets_with_two_relays_writing_is_a_dense_run_of_the_feed() {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    let mut watcher = r.device("dana", 1);
    let mut writer_a = r.device("dana", 2);
    let mut writer_b = r.device("dana", 3);
    let mut relay_b = r.second_core();
    login_on(&mut relay_b, 50, &writer_b, r.now);
    writer_b.conn = 50;
    r.pull(&mut watcher);
    let mut received = Vec::new();
    for i in 0..40u64 {
        let now = T0 + 100 * (i + 1);
        let on_b = i % 3 != 0;
        let out = if on_b {
            let (_, m) = writer_b.create("patient", json!({"name": format!("b{i}")}), now);
            push_on(&mut relay_b, 50, m, now);
            if i % 5 == 0 {
                r.now = now;
                r.core.handle([Input::Tick], now)
            } else {
                Vec::new()
            }
        } else {
            let (_, m) = writer_a.create("patient", json!({"name": format!("a{i}")}), now);
            push_on(&mut r.core, writer_a.conn, m, now)
        };
        received.extend(live_entries(&out, watcher.conn).into_iter().map(|e| e.seq));
    }
    r.now += 1000;
    received.extend(
        live_entries(&r.core.handle([Input::Tick], r.now), watcher.conn)
            .into_iter()
            .map(|e| e.seq),
    );
    assert_eq!(received, (1..=40).collect::<Vec<u64>>(), "every seq once, in order");
}
