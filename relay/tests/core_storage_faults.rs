//! Storage faults under the relay core. A store that cannot write (another writer holds the
//! shard's lock) defers the push and applies nothing. The disk full (SQLite `SQLITE_FULL`, made
//! here with `max_page_count`): a push gets a retryable `PushDeferred` naming the full disk,
//! nothing of the failed group is kept, what was acknowledged before stays, sign-in and pulls
//! keep working, and once there is room again the same mutations are applied exactly once with
//! the audit chain intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, TestRelay};
use fieldsync_relay::core::Output;
use fieldsync_schema::{ClientMessage, RelayMessage, Role};
use serde_json::json;

/// Caps every file (the directory and each shard) at the pages it has now plus `room_pages`,
/// so a write that needs more fails as on a full disk.
fn fill_the_disk(relay: &mut TestRelay, room_pages: i64) {
    let cap = |conn: &rusqlite::Connection| {
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        let _: i64 = conn
            .query_row(&format!("PRAGMA max_page_count = {}", pages + room_pages), [], |r| {
                r.get(0)
            })
            .unwrap();
    };
    cap(relay.core.directory_mut().connection());
    for w in relay.core.workers_mut() {
        cap(w.store_mut().connection());
    }
}

#[test]
fn a_full_disk_defers_pushes_keeps_pulls_and_recovers_when_space_returns() {
    let mut relay = TestRelay::new();
    relay.space("clinic");
    relay.user("dana", "clinic", Role::Clinician);
    let mut writer = relay.device("dana", 1);
    let mut reader = relay.device("dana", 2);
    let (_, first) = writer.create("patient", json!({"name": "Before the disk filled"}), relay.now);
    assert!(relay.push_one(&mut writer, first).applied().is_some());
    let before = relay.counts();

    fill_the_disk(&mut relay, 0);
    let big = "x".repeat(150);
    let mutations: Vec<_> = (0..200)
        .map(|i| {
            writer
                .create("patient", json!({"name": format!("Patient {i} {big}")}), relay.now)
                .1
        })
        .collect();
    let out = relay.send(
        writer.conn,
        ClientMessage::Push {
            batch_id: 7,
            mutations: mutations.clone(),
        },
    );
    let deferred = out.iter().find_map(|o| match o {
        Output::Send(c, RelayMessage::PushDeferred { batch_id, reason, .. }) if *c == writer.conn => {
            Some((*batch_id, reason.clone()))
        }
        _ => None,
    });
    let (batch_id, reason) = deferred.unwrap_or_else(|| panic!("a retryable answer, got {out:?}"));
    assert_eq!(batch_id, 7);
    assert!(reason.contains("disk is full"), "{reason}");
    assert_eq!(relay.counts(), before, "nothing of the failed group was kept");
    for m in &mutations {
        assert!(
            relay.receipt(m.mutation_id).is_none(),
            "no receipt for a deferred mutation"
        );
    }

    // Reads go on: a device signs in and pulls what was acknowledged before the disk filled.
    reader.conn = relay.login(&reader);
    let pulled = relay.pull(&mut reader);
    assert_eq!(pulled.len(), 1, "{pulled:?}");

    // Space returns: the same batch goes through, once.
    fill_the_disk(&mut relay, 1_000_000);
    let results = relay.push(&mut writer, mutations.clone());
    assert!(results.iter().all(|r| r.outcome.applied().is_some()), "{results:?}");
    let again = relay.push(&mut writer, mutations);
    assert!(
        again.iter().all(|r| r.outcome.name() == "already_applied"),
        "{:?}",
        again.iter().map(|r| r.outcome.name()).collect::<Vec<_>>()
    );
    assert_eq!(relay.pull(&mut reader).len(), 200);
    let audit = relay.verify_audit();
    assert!(audit.ok(), "{audit:?}");
    assert_eq!(audit.records, 201);
}

#[test]
fn a_storage_failure_defers_the_push_and_applies_nothing() {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    let mut a = r.device("dana", 1);
    // Another writer holds the write lock of the space's shard.
    let space = r.space_row("clinic");
    r.core.workers()[space.shard as usize]
        .store()
        .connection()
        .busy_timeout(std::time::Duration::from_millis(50))
        .unwrap();
    let blocker = rusqlite::Connection::open(r.shard_file(space.space_id)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    let out = r.send(
        a.conn,
        ClientMessage::Push {
            batch_id: 4,
            mutations: vec![m.clone()],
        },
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Send(_, RelayMessage::PushDeferred { batch_id: 4, .. }))),
        "{out:?}"
    );
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::Send(_, RelayMessage::PushResult { .. })))
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(r.version_of(p), 0);
    // The retry with the same mutation id succeeds.
    assert!(r.push_one(&mut a, m).applied().is_some());
}
