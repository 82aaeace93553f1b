//! What the relay stored, read from its files beside the running relay.

use std::time::Duration;

use fieldsync_schema::EntityDoc;
use fieldsync_schema::document::device_actor;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::Relay;

/// What the relay's database holds, read through a read-only connection of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub devices: u64,
    pub documents: u64,
    pub feed: u64,
    pub receipts: u64,
    pub audit: u64,
    pub archive: u64,
    pub tokens_used: u64,
}

impl Stored {
    /// The same, ignoring receipts (a refusal decided after the sender was proven leaves its
    /// answer as a receipt, so a retry gets the same answer; it stores no data).
    pub fn data(&self) -> (u64, u64, u64, u64, u64, u64) {
        (
            self.devices,
            self.documents,
            self.feed,
            self.audit,
            self.archive,
            self.tokens_used,
        )
    }
}

fn open_read_only(path: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open a relay database file read-only");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

/// The relay's directory database (spaces, users, tokens, devices), read-only.
pub fn directory_db(relay: &Relay) -> rusqlite::Connection {
    open_read_only(&relay.data.join("relay.db"))
}

/// Every shard database of the relay (documents, feeds, receipts, audit, archive), read-only.
pub fn shard_dbs(relay: &Relay) -> Vec<rusqlite::Connection> {
    let mut files: Vec<_> = std::fs::read_dir(relay.data.join("shards"))
        .expect("the relay's shards")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "db"))
        .collect();
    files.sort();
    files.iter().map(|p| open_read_only(p)).collect()
}

/// `sql` (a `SELECT COUNT(*)` with `params`) summed over every shard.
pub fn count_in_shards(relay: &Relay, sql: &str, params: impl rusqlite::Params + Clone) -> u64 {
    shard_dbs(relay)
        .iter()
        .map(|c| c.query_row(sql, params.clone(), |r| r.get::<_, i64>(0)).unwrap() as u64)
        .sum()
}

pub fn stored(relay: &Relay) -> Stored {
    let directory = directory_db(relay);
    let in_directory = |sql: &str| -> u64 { directory.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64 };
    let in_shards = |sql: &str| count_in_shards(relay, sql, []);
    Stored {
        devices: in_directory("SELECT COUNT(*) FROM devices"),
        documents: in_shards("SELECT COUNT(*) FROM documents"),
        feed: in_shards("SELECT COUNT(*) FROM feed"),
        receipts: in_shards("SELECT COUNT(*) FROM receipts"),
        audit: in_shards("SELECT COUNT(*) FROM audit"),
        archive: in_shards("SELECT COUNT(*) FROM conflict_archive"),
        tokens_used: in_directory("SELECT COUNT(*) FROM tokens WHERE used_ms IS NOT NULL"),
    }
}

/// The relay's version of an entity (`None`: the relay has no such entity).
pub fn version_of(relay: &Relay, entity: Uuid) -> Option<u64> {
    shard_dbs(relay).iter().find_map(|c| {
        c.query_row(
            "SELECT version FROM documents WHERE entity_id = ?1",
            [entity.as_bytes().to_vec()],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .map(|v| v as u64)
    })
}

/// The public key the relay holds for a device (`None`: not enrolled).
pub fn device_key(relay: &Relay, device: Uuid) -> Option<Vec<u8>> {
    directory_db(relay)
        .query_row(
            "SELECT public_key FROM devices WHERE device_id = ?1",
            [device.as_bytes().to_vec()],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .ok()
}

/// The relay's current fields of an entity, from its stored document.
pub fn relay_fields(relay: &Relay, entity: Uuid) -> Map<String, Value> {
    use fieldsync_relay::store::{Backend, SpaceStore};
    let backend = fieldsync_relay::store::sqlite::SqliteBackend::open_current(&relay.data).unwrap();
    for n in 0..backend.shard_count() {
        let shard = backend.open_shard(n).unwrap();
        if let Some(row) = shard.document(entity).unwrap() {
            let bytes = shard.document_bytes(row.doc_key).unwrap();
            return EntityDoc::load(&bytes, device_actor(Uuid::nil())).unwrap().fields();
        }
    }
    panic!("the relay has no entity {entity}")
}
