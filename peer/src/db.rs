//! The device database: connection settings, tables, and the `meta` key-value helpers.
//!
//! One SQLite file per device. WAL with `synchronous=FULL` because a write the app was told is
//! committed must survive power loss, not only a process kill (`NORMAL` may drop the last
//! transactions on power loss). The layout is versioned with `PRAGMA user_version` so a later
//! build can migrate an older file instead of misreading it.

use std::path::Path;

use fieldsync_schema::sqlite_file::FileProblem;
use fieldsync_schema::sqlite_key::{self, DatabaseKey};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{PeerError, Result};

pub const DB_FILE: &str = "device.db";
pub const SCHEMA_VERSION: i64 = 2;
/// Tables an importable backup must contain.
pub const REQUIRED_TABLES: [&str; 5] = ["meta", "entities", "outbox", "conflicts", "lww_losses"];

const DDL: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE IF NOT EXISTS entities (
    entity_id     TEXT PRIMARY KEY,
    entity_type   TEXT NOT NULL,
    space_id      TEXT NOT NULL,
    doc           BLOB NOT NULL,
    fields        TEXT NOT NULL,
    heads         TEXT NOT NULL,
    relay_version INTEGER NOT NULL DEFAULT 0,
    sync_state    TEXT NOT NULL CHECK (sync_state IN ('synced', 'pending', 'conflict', 'rejected')),
    deleted       INTEGER NOT NULL DEFAULT 0,
    signed        INTEGER NOT NULL DEFAULT 0,
    locked        INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS entities_by_type ON entities (entity_type, entity_id);
CREATE INDEX IF NOT EXISTS entities_by_space ON entities (space_id);

CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    mutation_id     TEXT NOT NULL UNIQUE,
    entity_id       TEXT NOT NULL REFERENCES entities (entity_id),
    entity_type     TEXT NOT NULL,
    kind            TEXT NOT NULL,
    envelope        BLOB NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'blocked', 'superseded')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    created_at_ms   INTEGER NOT NULL,
    last_attempt_ms INTEGER,
    outcome         TEXT,
    error           TEXT,
    applied_version INTEGER,
    position        INTEGER,
    superseded_by   TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS outbox_by_state ON outbox (state, seq);
CREATE INDEX IF NOT EXISTS outbox_by_entity ON outbox (entity_id, state);

CREATE TABLE IF NOT EXISTS conflicts (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_id      TEXT NOT NULL REFERENCES entities (entity_id),
    mutation_id    TEXT NOT NULL,
    server_version INTEGER NOT NULL,
    outcome        TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    resolved       INTEGER NOT NULL DEFAULT 0,
    resolved_at_ms INTEGER,
    resolution     TEXT,
    resolution_mutation TEXT
) STRICT;

CREATE TABLE IF NOT EXISTS lww_losses (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_id      TEXT NOT NULL,
    field          TEXT NOT NULL,
    loser_mutation TEXT NOT NULL,
    loss           TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    undone_at_ms   INTEGER,
    undo_mutation  TEXT,
    UNIQUE (entity_id, field, loser_mutation)
) STRICT;

CREATE TABLE IF NOT EXISTS rejected_edits (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_id      TEXT NOT NULL REFERENCES entities (entity_id),
    entity_type    TEXT NOT NULL,
    mutation_id    TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    fields         TEXT NOT NULL,
    deleted        INTEGER NOT NULL,
    upto_seq       INTEGER NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    resolved_at_ms INTEGER,
    resolution     TEXT,
    resolution_mutation TEXT
) STRICT;
"#;

/// Layout 1 → 2 (conflict resolution): where a resolution sits in the outbox and what it
/// superseded, how conflicts were resolved, which LWW losses were undone. Layout 2 also adds
/// `rejected_edits`, which the `CREATE TABLE IF NOT EXISTS` of [`DDL`] creates.
const MIGRATE_1_TO_2: &str = r#"
ALTER TABLE outbox ADD COLUMN position INTEGER;
ALTER TABLE outbox ADD COLUMN superseded_by TEXT;
ALTER TABLE conflicts ADD COLUMN resolved_at_ms INTEGER;
ALTER TABLE conflicts ADD COLUMN resolution TEXT;
ALTER TABLE conflicts ADD COLUMN resolution_mutation TEXT;
ALTER TABLE lww_losses ADD COLUMN undone_at_ms INTEGER;
ALTER TABLE lww_losses ADD COLUMN undo_mutation TEXT;
"#;

/// Opens (creating if needed) the database file with the settings every connection needs, and
/// brings an older layout up to date in one transaction. With `key` the file is encrypted at
/// rest (a new file is created encrypted); a wrong or missing key is an error, never a new,
/// empty database.
pub fn open(path: &Path, key: Option<&DatabaseKey>) -> Result<Connection> {
    let mut conn = sqlite_key::open_rw(path, key)?;
    configure(&conn)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(PeerError::Corrupt(format!(
            "{} was written by a newer fieldsync (layout {version}, this build knows {SCHEMA_VERSION})",
            path.display()
        )));
    }
    if version < SCHEMA_VERSION {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if current == 1 {
            tx.execute_batch(MIGRATE_1_TO_2)?;
        }
        tx.execute_batch(DDL)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
    }
    Ok(conn)
}

pub fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(PeerError::Corrupt(format!(
            "could not switch to WAL (journal mode is {mode})"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // 16 MiB of page cache (SQLite's default is 2 MiB): an encrypted page is decrypted and its
    // HMAC checked at every read from the file, so a list over thousands of records that did
    // not fit the cache cost 4-6x its plaintext time (README, "Encryption at rest").
    conn.pragma_update(None, "cache_size", -16384)?;
    Ok(())
}

/// `PRAGMA integrity_check` plus the tables this build expects; `Err` says what is wrong.
pub fn check_integrity(conn: &Connection) -> Result<(), String> {
    fieldsync_schema::sqlite_file::check(conn, &REQUIRED_TABLES).map_err(|problem| match problem {
        FileProblem::MissingTable(table) => format!("not a fieldsync device backup: table `{table}` is missing"),
        other => other.to_string(),
    })
}

pub fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

pub fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

pub fn meta_delete(conn: &Connection, key: &str) -> Result<()> {
    conn.execute("DELETE FROM meta WHERE key = ?1", [key])?;
    Ok(())
}

/// Deletes every `meta` entry but `keep` (a remote wipe keeps the device's identity).
pub fn meta_retain(conn: &Connection, keep: &[&str]) -> Result<()> {
    let placeholders = vec!["?"; keep.len()].join(", ");
    conn.execute(
        &format!("DELETE FROM meta WHERE key NOT IN ({placeholders})"),
        rusqlite::params_from_iter(keep),
    )?;
    Ok(())
}

pub fn meta_get_json<T: DeserializeOwned>(conn: &Connection, key: &str) -> Result<Option<T>> {
    match meta_get(conn, key)? {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| PeerError::Corrupt(format!("meta `{key}`: {e}"))),
    }
}

pub fn meta_set_json<T: Serialize>(conn: &Connection, key: &str, value: &T) -> Result<()> {
    let s = serde_json::to_string(value).map_err(|e| PeerError::Corrupt(format!("meta `{key}`: {e}")))?;
    meta_set(conn, key, &s)
}

pub fn meta_get_u64(conn: &Connection, key: &str) -> Result<Option<u64>> {
    match meta_get(conn, key)? {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| PeerError::Corrupt(format!("meta `{key}` is not a number: {s}"))),
    }
}

/// Meta keys, in one place so that no two modules pick the same name for different things.
pub mod keys {
    pub const DEVICE_ID: &str = "device_id";
    pub const SECRET_KEY: &str = "device_secret_key";
    pub const CREATED_AT: &str = "created_at_ms";
    pub const ENROLLMENT: &str = "enrollment";
    pub const HLC: &str = "hlc_last";
    pub const CURSOR: &str = "pull_cursor";
    pub const LAST_SYNC: &str = "last_sync_ms";
    pub const AUTH_FAILED: &str = "auth_failed";
    pub const WRITE_COUNTER: &str = "write_counter";
    pub const EXPORTED_AT: &str = "exported_at_ms";
    pub const EXPORTED_WRITE_COUNTER: &str = "exported_write_counter";
    pub const SCHEMA_HASH: &str = "schema_hash";
    pub const RELAY_SCHEMA_VERSION: &str = "relay_schema_version";
    pub const RELAY_BEHIND: &str = "relay_behind";
    /// A remote wipe's record ([`crate::wipe::WipeRecord`]): the data is gone, writes refused.
    pub const WIPED: &str = "wiped";
    /// The revoked device whose unconfirmed changes this identity took over
    /// ([`crate::new_identity`]).
    pub const REPLACED_DEVICE: &str = "replaced_device";
    /// The entity types this device holds ([`crate::selective`]); absent: every type.
    pub const SYNCED_TYPES: &str = "synced_types";
    /// The device syncs by windows (SPEC §16); absent: it downloads everything.
    pub const WINDOWED: &str = "windowed";
    /// Records to fetch whole at the next connection (JSON list of ids, oldest first).
    pub const FETCH_QUEUE: &str = "fetch_queue";
    /// Evict automatically after a sync once the device holds more records than this.
    pub const EVICT_ABOVE: &str = "evict_above";
    /// The device is on a metered link ([`crate::selective`]): reference data waits.
    pub const METERED: &str = "metered";
    /// The last relay said it walks snapshots in priority order ([`crate::sync`]).
    pub const PRIORITY_WALK: &str = "priority_walk";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_sets_wal_full_and_foreign_keys_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let conn = open(&path, None).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        let fk: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        assert_eq!((mode.as_str(), sync, fk), ("wal", 2, 1));
        meta_set(&conn, "k", "v1").unwrap();
        meta_set(&conn, "k", "v2").unwrap();
        drop(conn);
        let conn = open(&path, None).unwrap();
        assert_eq!(meta_get(&conn, "k").unwrap().as_deref(), Some("v2"));
        assert!(check_integrity(&conn).is_ok());
    }

    /// The layout of the first release (user_version 1), to prove that files written by it open.
    const V1_DDL: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE IF NOT EXISTS entities (
    entity_id     TEXT PRIMARY KEY,
    entity_type   TEXT NOT NULL,
    space_id      TEXT NOT NULL,
    doc           BLOB NOT NULL,
    fields        TEXT NOT NULL,
    heads         TEXT NOT NULL,
    relay_version INTEGER NOT NULL DEFAULT 0,
    sync_state    TEXT NOT NULL CHECK (sync_state IN ('synced', 'pending', 'conflict', 'rejected')),
    deleted       INTEGER NOT NULL DEFAULT 0,
    signed        INTEGER NOT NULL DEFAULT 0,
    locked        INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS entities_by_type ON entities (entity_type, entity_id);
CREATE INDEX IF NOT EXISTS entities_by_space ON entities (space_id);

CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    mutation_id     TEXT NOT NULL UNIQUE,
    entity_id       TEXT NOT NULL REFERENCES entities (entity_id),
    entity_type     TEXT NOT NULL,
    kind            TEXT NOT NULL,
    envelope        BLOB NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'blocked', 'superseded')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    created_at_ms   INTEGER NOT NULL,
    last_attempt_ms INTEGER,
    outcome         TEXT,
    error           TEXT,
    applied_version INTEGER
) STRICT;
CREATE INDEX IF NOT EXISTS outbox_by_state ON outbox (state, seq);
CREATE INDEX IF NOT EXISTS outbox_by_entity ON outbox (entity_id, state);

CREATE TABLE IF NOT EXISTS conflicts (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_id      TEXT NOT NULL REFERENCES entities (entity_id),
    mutation_id    TEXT NOT NULL,
    server_version INTEGER NOT NULL,
    outcome        TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    resolved       INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE IF NOT EXISTS lww_losses (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_id      TEXT NOT NULL,
    field          TEXT NOT NULL,
    loser_mutation TEXT NOT NULL,
    loss           TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    UNIQUE (entity_id, field, loser_mutation)
) STRICT;
"#;

    #[test]
    fn a_layout_1_file_is_migrated_in_place_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(V1_DDL).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute_batch(
                "INSERT INTO entities VALUES ('e', 'patient', 's', x'00', '{}', '[]', 0, 'pending', 0, 0, 0, 1, 1);
                 INSERT INTO outbox (mutation_id, entity_id, entity_type, kind, envelope, state, created_at_ms)
                 VALUES ('m', 'e', 'patient', 'create', x'00', 'pending', 1);
                 INSERT INTO lww_losses (entity_id, field, loser_mutation, loss, recorded_at_ms)
                 VALUES ('e', 'units', 'm', '{}', 1);",
            )
            .unwrap();
        }
        let conn = open(&path, None).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let (position, superseded_by): (Option<i64>, Option<String>) = conn
            .query_row(
                "SELECT position, superseded_by FROM outbox WHERE mutation_id = 'm'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((position, superseded_by), (None, None));
        let undone: Option<i64> = conn
            .query_row("SELECT undone_at_ms FROM lww_losses", [], |r| r.get(0))
            .unwrap();
        assert_eq!(undone, None);
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM rejected_edits", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        drop(conn);
        // Opening again is a no-op.
        open(&path, None).unwrap();
    }

    #[test]
    fn a_file_from_a_newer_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let conn = open(&path, None).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(conn);
        let err = open(&path, None).unwrap_err().to_string();
        assert!(err.contains("newer"), "{err}");
    }

    #[test]
    fn integrity_check_names_a_missing_table() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE meta (key TEXT)").unwrap();
        let err = check_integrity(&conn).unwrap_err();
        assert!(err.contains("entities"), "{err}");
    }
}
