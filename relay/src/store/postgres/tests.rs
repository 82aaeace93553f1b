//! The PostgreSQL store against a real, throwaway server: the directory's rules (unique names,
//! single-use tokens, the access marker), the shard's (per-shard counts, receipts unique by
//! mutation id), and the one several writers rely on: a space's head is locked by the writing
//! transaction, so a second writer of the space waits and then builds on what the first wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::time::Duration;

use fieldsync_schema::Role;
use uuid::Uuid;

use super::throwaway::Throwaway;
use super::*;
use crate::store::{Directory, ReceiptRow, SpaceHead, SpaceStore};

fn store(test: &str) -> Option<(Throwaway, PgBackend)> {
    let server = Throwaway::start_or_skip(test)?;
    let url = server.database("relay");
    let backend = PgBackend::open(&url, Uuid::from_u128(0xAA), 2).unwrap();
    Some((server, backend))
}

fn head(seq: u64) -> SpaceHead {
    SpaceHead {
        seq,
        audit_seq: seq,
        audit_hash: format!("{seq:064}"),
    }
}

#[test]
fn the_directory_keeps_names_unique_tokens_single_use_and_moves_the_access_marker() {
    let Some((_server, backend)) = store("the_directory_keeps_names_unique") else {
        return;
    };
    let mut dir = backend.open_directory().unwrap();
    assert_eq!(dir.relay_id(), Uuid::from_u128(0xAA));
    let clinic = dir.create_space(Uuid::from_u128(1), "clinic", 10).unwrap();
    let gym = dir.create_space(Uuid::from_u128(2), "gym", 11).unwrap();
    assert_eq!((clinic.shard, gym.shard), (0, 1), "spaces spread over the shards");
    assert!(matches!(
        dir.create_space(Uuid::from_u128(3), "clinic", 12),
        Err(StoreError::Conflict(_))
    ));
    dir.create_user(Uuid::from_u128(10), "dana", 13).unwrap();
    assert!(matches!(
        dir.create_user(Uuid::from_u128(11), "dana", 14),
        Err(StoreError::Conflict(_))
    ));

    let marker = dir.outside_writes_marker().unwrap();
    dir.set_membership(Uuid::from_u128(10), clinic.space_id, Role::Clinician)
        .unwrap();
    // Another handle (another relay, the admin tool) sees the access change move the marker.
    let other = backend.open_directory().unwrap();
    assert!(other.outside_writes_marker().unwrap() > marker);
    assert_eq!(other.memberships(Uuid::from_u128(10)).unwrap()[0].role, Role::Clinician);

    dir.create_token([7; 32], Uuid::from_u128(10), 20, 100).unwrap();
    dir.use_token(&[7; 32], Uuid::from_u128(99), 21).unwrap();
    assert!(matches!(
        dir.use_token(&[7; 32], Uuid::from_u128(98), 22),
        Err(StoreError::Conflict(_))
    ));
    dir.register_device(Uuid::from_u128(99), Uuid::from_u128(10), &[1; 32], 23)
        .unwrap();
    assert!(matches!(
        dir.register_device(Uuid::from_u128(99), Uuid::from_u128(10), &[1; 32], 24),
        Err(StoreError::Conflict(_))
    ));
    let before = other.outside_writes_marker().unwrap();
    assert!(dir.revoke_device(Uuid::from_u128(99), 30).unwrap());
    assert!(
        other.outside_writes_marker().unwrap() > before,
        "a revocation moves the marker"
    );
    assert_eq!(other.revoked_since(30).unwrap(), [(Uuid::from_u128(99), 30)]);
    assert_eq!(other.counts().unwrap().devices, 1);

    // A remote wipe: asked once, recorded once, read back by another relay.
    assert!(
        !dir.record_wipe(Uuid::from_u128(99), 31, 2).unwrap(),
        "no wipe was asked"
    );
    assert!(dir.request_wipe(Uuid::from_u128(99), 32).unwrap());
    assert!(!dir.request_wipe(Uuid::from_u128(99), 33).unwrap(), "already asked");
    assert!(other.device(Uuid::from_u128(99)).unwrap().unwrap().wipe_pending());
    assert!(dir.record_wipe(Uuid::from_u128(99), 34, 2).unwrap());
    assert!(!dir.record_wipe(Uuid::from_u128(99), 35, 5).unwrap(), "recorded once");
    let row = other.device(Uuid::from_u128(99)).unwrap().unwrap();
    assert_eq!(
        (row.wipe_requested_ms, row.wiped_ms, row.wipe_discarded),
        (Some(32), Some(34), Some(2))
    );
    assert!(!row.wipe_pending());
}

#[test]
fn a_second_writer_of_a_space_waits_for_the_first_and_builds_on_its_head() {
    let Some((_server, backend)) = store("a_second_writer_of_a_space_waits") else {
        return;
    };
    let space = backend
        .open_directory()
        .unwrap()
        .create_space(Uuid::from_u128(1), "clinic", 1)
        .unwrap()
        .space_id;
    let mut first = backend.open_shard(0).unwrap();
    first.begin().unwrap();
    assert_eq!(first.space_head(space).unwrap().seq, 0, "a new space starts at genesis");

    // Another relay's worker starts writing the same space while the first holds its head.
    let (saw, seen) = mpsc::channel();
    let second_backend = backend.clone();
    let second = std::thread::spawn(move || {
        let mut second = second_backend.open_shard(0).unwrap();
        second.begin().unwrap();
        let seen_head = second.space_head(space).unwrap();
        saw.send(seen_head.seq).unwrap();
        second.set_space_head(space, &head(seen_head.seq + 1)).unwrap();
        second.commit().unwrap();
    });
    assert!(
        seen.recv_timeout(Duration::from_millis(500)).is_err(),
        "the second writer read the head while the first held it"
    );
    first.set_space_head(space, &head(1)).unwrap();
    first.commit().unwrap();
    assert_eq!(
        seen.recv_timeout(Duration::from_secs(30)).unwrap(),
        1,
        "it builds on the first commit"
    );
    second.join().unwrap();
    assert_eq!(first.space_head(space).unwrap(), head(2));
}

#[test]
fn receipts_are_unique_by_mutation_id_and_counts_are_per_shard() {
    let Some((_server, backend)) = store("receipts_are_unique_by_mutation_id") else {
        return;
    };
    let mut dir = backend.open_directory().unwrap();
    let clinic = dir.create_space(Uuid::from_u128(1), "clinic", 1).unwrap();
    let receipt = ReceiptRow {
        mutation_id: Uuid::from_u128(5),
        device_id: Uuid::from_u128(6),
        entity_id: Some(Uuid::from_u128(7)),
        space_id: Some(clinic.space_id),
        envelope_hash: Some([3; 32]),
        outcome: vec![1, 2, 3],
        created_ms: 9,
    };
    let mut a = backend.open_shard(0).unwrap();
    let mut b = backend.open_shard(0).unwrap();
    a.put_receipt(&receipt).unwrap();
    // The same mutation decided again (a retry that reached another relay) is refused whole.
    assert!(matches!(b.put_receipt(&receipt), Err(StoreError::Conflict(_))));
    let stored = b.receipt(receipt.mutation_id).unwrap().unwrap();
    assert_eq!(
        (stored.device_id, stored.envelope_hash, stored.outcome),
        (receipt.device_id, receipt.envelope_hash, receipt.outcome)
    );

    assert!(backend.consistency().unwrap().problems().is_empty());
    // A feed row without its audit record and receipt is what a drill must catch.
    backend
        .open_shard(0)
        .unwrap()
        .conn
        .batch(&format!(
            "INSERT INTO documents(entity_id, space_id, entity_type, version, last_seq, created_ms, updated_ms)
             VALUES ('{e}', '{s}', 'patient', 1, 1, 0, 0);
             INSERT INTO feed(space_id, seq, doc_key, entity_type, entity_id, version, origin_device, origin_user,
             mutation_id, hlc, changes, lww_losses)
             SELECT '{s}', 1, doc_key, 'patient', '{e}', 1, '{e}', '{e}', '{e}', '0', '\\x', '\\x' FROM documents",
            e = Uuid::from_u128(8),
            s = clinic.space_id
        ))
        .unwrap();
    let found = backend.consistency().unwrap();
    assert_eq!(
        (
            found.feed_without_audit,
            found.feed_without_receipt,
            found.broken_sequences
        ),
        (1, 1, 1),
        "{found:?}"
    );

    let shard0 = backend.open_shard(0).unwrap().counts().unwrap();
    let shard1 = backend.open_shard(1).unwrap().counts().unwrap();
    assert_eq!(
        (shard0.receipts, shard1.receipts),
        (1, 0),
        "each shard counts its own spaces only"
    );
    assert_eq!(
        backend.open_shard(1).unwrap().spaces_held().unwrap(),
        Vec::<Uuid>::new()
    );
}

#[test]
fn a_second_open_keeps_the_store_and_a_missing_one_is_not_created_by_admin_tools() {
    let Some(server) = Throwaway::start_or_skip("a_second_open_keeps_the_store") else {
        return;
    };
    let url = server.database("relay");
    assert!(matches!(PgBackend::open_existing(&url), Err(StoreError::NotFound(_))));
    let first = PgBackend::open(&url, Uuid::from_u128(1), 3).unwrap();
    let again = PgBackend::open(&url, Uuid::from_u128(2), 8).unwrap();
    assert_eq!((again.relay_id(), again.shard_count()), (first.relay_id(), 3));
    assert_eq!(PgBackend::open_existing(&url).unwrap().relay_id(), Uuid::from_u128(1));
    assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
}

/// Ends `conn`'s server process, as a PostgreSQL restart or an administrator would.
fn terminate(backend: &PgBackend, conn: &Conn) {
    let pid: i32 = conn
        .with(|c| c.query_one("SELECT pg_backend_pid()", &[]))
        .unwrap()
        .get(0);
    let mut admin = connect(backend.url()).unwrap();
    admin.execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
}

#[test]
fn a_lost_connection_fails_its_transaction_and_the_next_one_reconnects() {
    let Some((_server, backend)) = store("a_lost_connection_reconnects") else {
        return;
    };
    let mut dir = backend.open_directory().unwrap();
    let clinic = dir.create_space(Uuid::from_u128(1), "clinic", 10).unwrap();
    let mut shard = backend.open_shard(clinic.shard).unwrap();

    // Lost between transactions: the next statement outside one runs on a new connection.
    terminate(&backend, &shard.conn);
    shard.begin().unwrap();
    shard.set_space_head(clinic.space_id, &head(1)).unwrap();
    shard.commit().unwrap();
    assert_eq!(shard.conn.reconnects.get(), 1);

    // Lost inside a transaction: what follows fails (never committed piecemeal on a new
    // connection), the rollback ends it, and nothing of it was kept.
    shard.begin().unwrap();
    assert_eq!(shard.space_head(clinic.space_id).unwrap().seq, 1);
    terminate(&backend, &shard.conn);
    let lost = shard.set_space_head(clinic.space_id, &head(2));
    assert!(lost.is_err(), "a write on the lost connection must fail: {lost:?}");
    assert!(
        shard
            .put_receipt(&ReceiptRow {
                mutation_id: Uuid::from_u128(5),
                device_id: Uuid::from_u128(6),
                entity_id: None,
                space_id: Some(clinic.space_id),
                envelope_hash: None,
                outcome: vec![1],
                created_ms: 9,
            })
            .is_err()
    );
    let _ = shard.rollback();
    assert_eq!(
        shard.conn.reconnects.get(),
        1,
        "no new connection inside the transaction"
    );
    assert!(shard.receipt(Uuid::from_u128(5)).unwrap().is_none());
    assert_eq!(shard.conn.reconnects.get(), 2);
    shard.begin().unwrap();
    assert_eq!(
        shard.space_head(clinic.space_id).unwrap().seq,
        1,
        "the lost write was not kept"
    );
    shard.rollback().unwrap();

    // The directory's handle (the front's): the statement that finds the connection lost
    // fails (it may have been a write: never sent twice), the next runs on a new one.
    terminate(&backend, &dir.conn);
    assert!(dir.space(clinic.space_id).is_err());
    assert!(dir.space(clinic.space_id).unwrap().is_some());
    assert_eq!(dir.conn.reconnects.get(), 1);
}
