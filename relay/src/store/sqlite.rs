//! The embedded SQLite store: WAL with `synchronous=FULL`, so a committed transaction survives
//! power loss, and `BEGIN IMMEDIATE`, so a group commit takes the write lock up front instead of
//! failing half way when an admin command writes at the same time.

use std::path::Path;
use std::time::{Duration, Instant};

use fieldsync_schema::{Bytes, Hlc, Role};
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};
use uuid::Uuid;

use super::{
    ArchiveRow, AuditRow, Counts, DeviceRow, DocumentRow, DocumentUpdate, FeedRow, MembershipRow, NewFeedRow,
    ReceiptRow, SpaceRow, Store, StoreError, StoreResult, TokenRow, UserRow,
};

mod extra;
mod migrate;

pub use extra::Consistency;

const SCHEMA_SQL: &str = include_str!("schema.sql");
pub const DB_FILE: &str = "relay.db";

pub struct SqliteStore {
    conn: Connection,
    relay_id: Uuid,
    /// How long each `COMMIT` took since the server last asked (metrics; never read by the core).
    commit_times: Vec<Duration>,
    /// Membership and revocation writes made through this handle: `PRAGMA data_version` only
    /// sees other connections' commits, and the marker must move for these too.
    access_writes: u64,
}

fn space_row(r: &Row<'_>) -> rusqlite::Result<SpaceRow> {
    Ok(SpaceRow {
        space_id: uuid_col(r, 0)?,
        name: r.get(1)?,
        created_ms: u64_col(r, 2)?,
    })
}

fn user_row(r: &Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        user_id: uuid_col(r, 0)?,
        name: r.get(1)?,
        created_ms: u64_col(r, 2)?,
    })
}

fn archive_row(r: &Row<'_>) -> rusqlite::Result<ArchiveRow> {
    Ok(ArchiveRow {
        archive_id: u64_col(r, 0)?,
        kind: r.get(1)?,
        space_id: uuid_col(r, 2)?,
        entity_type: r.get(3)?,
        entity_id: uuid_col(r, 4)?,
        field: r.get(5)?,
        losing_json: r.get(6)?,
        winning_json: r.get(7)?,
        loser_device: opt_uuid_col(r, 8)?,
        loser_mutation: opt_uuid_col(r, 9)?,
        winner_device: opt_uuid_col(r, 10)?,
        winner_mutation: opt_uuid_col(r, 11)?,
        version: u64_col(r, 12)?,
        created_ms: u64_col(r, 13)?,
    })
}

fn uuid_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Uuid> {
    let bytes: Vec<u8> = row.get(idx)?;
    Uuid::from_slice(&bytes)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Blob, Box::new(e)))
}

fn opt_uuid_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<Uuid>> {
    let bytes: Option<Vec<u8>> = row.get(idx)?;
    bytes
        .map(|b| Uuid::from_slice(&b))
        .transpose()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Blob, Box::new(e)))
}

fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    Ok(v as u64)
}

fn opt_u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = row.get(idx)?;
    Ok(v.map(|v| v as u64))
}

fn hlc_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Hlc> {
    let s: String = row.get(idx)?;
    s.parse()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
}

fn role_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Role> {
    let s: String = row.get(idx)?;
    s.parse::<Role>().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            Box::new(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        )
    })
}

fn i(v: u64) -> i64 {
    v as i64
}

const DOC_COLS: &str =
    "doc_key, entity_id, space_id, entity_type, version, last_seq, deleted, signed, locked, lww_stamps";

fn doc_row(row: &Row<'_>) -> rusqlite::Result<DocumentRow> {
    Ok(DocumentRow {
        doc_key: u64_col(row, 0)?,
        entity_id: uuid_col(row, 1)?,
        space_id: uuid_col(row, 2)?,
        entity_type: row.get(3)?,
        version: u64_col(row, 4)?,
        last_seq: u64_col(row, 5)?,
        deleted: row.get(6)?,
        signed: row.get(7)?,
        locked: row.get(8)?,
        lww_stamps: row.get(9)?,
    })
}

const FEED_COLS: &str = "seq, doc_key, space_id, entity_type, entity_id, version, origin_device, origin_user, \
                         mutation_id, hlc, changes, lww_losses";

fn feed_row(row: &Row<'_>) -> rusqlite::Result<FeedRow> {
    Ok(FeedRow {
        seq: u64_col(row, 0)?,
        doc_key: u64_col(row, 1)?,
        space_id: uuid_col(row, 2)?,
        entity_type: row.get(3)?,
        entity_id: uuid_col(row, 4)?,
        version: u64_col(row, 5)?,
        origin_device: uuid_col(row, 6)?,
        origin_user: uuid_col(row, 7)?,
        mutation_id: uuid_col(row, 8)?,
        hlc: hlc_col(row, 9)?,
        changes: row.get(10)?,
        lww_losses: row.get(11)?,
    })
}

const AUDIT_COLS: &str = "audit_id, seq, mutation_id, actor_id, device_id, space_id, entity_type, entity_id, kind, \
                          version, before_json, after_json, client_ts, server_ts_ms, prev_hash, hash";

fn audit_row(row: &Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        audit_id: u64_col(row, 0)?,
        seq: u64_col(row, 1)?,
        mutation_id: uuid_col(row, 2)?,
        actor_id: uuid_col(row, 3)?,
        device_id: uuid_col(row, 4)?,
        space_id: uuid_col(row, 5)?,
        entity_type: row.get(6)?,
        entity_id: uuid_col(row, 7)?,
        kind: row.get(8)?,
        version: u64_col(row, 9)?,
        before_json: row.get(10)?,
        after_json: row.get(11)?,
        client_ts: row.get(12)?,
        server_ts_ms: u64_col(row, 13)?,
        prev_hash: row.get(14)?,
        hash: row.get(15)?,
    })
}

const DEVICE_COLS: &str = "device_id, user_id, public_key, enrolled_ms, revoked_ms, last_seen_ms";

fn device_row(row: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        device_id: uuid_col(row, 0)?,
        user_id: uuid_col(row, 1)?,
        public_key: row.get(2)?,
        enrolled_ms: u64_col(row, 3)?,
        revoked_ms: opt_u64_col(row, 4)?,
        last_seen_ms: opt_u64_col(row, 5)?,
    })
}

const TOKEN_COLS: &str = "token_hash, user_id, created_ms, expires_ms, used_ms, used_by";

fn token_row(row: &Row<'_>) -> rusqlite::Result<TokenRow> {
    let hash: Vec<u8> = row.get(0)?;
    let token_hash: [u8; 32] = hash.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            Box::new(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "token hash is not 32 bytes",
            )),
        )
    })?;
    Ok(TokenRow {
        token_hash,
        user_id: uuid_col(row, 1)?,
        created_ms: u64_col(row, 2)?,
        expires_ms: u64_col(row, 3)?,
        used_ms: opt_u64_col(row, 4)?,
        used_by: opt_uuid_col(row, 5)?,
    })
}

/// `?, ?, ?` for an `IN (...)` list.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/relay.db`. `new_relay_id` names a relay created now; an
    /// existing database keeps its own id.
    pub fn open_dir(dir: &Path, new_relay_id: Uuid) -> StoreResult<Self> {
        std::fs::create_dir_all(dir)?;
        Self::open(&dir.join(DB_FILE), new_relay_id)
    }

    pub fn open(path: &Path, new_relay_id: Uuid) -> StoreResult<Self> {
        let conn = Connection::open(path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "could not enable WAL (journal_mode={mode})"
            )));
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000; PRAGMA cache_size=-65536;",
        )?;
        conn.execute_batch(SCHEMA_SQL)?;
        migrate::run(&conn)?;
        // Every hot statement stays prepared: rusqlite's default cache (16) is smaller than the
        // store's set of statements, and re-parsing SQL showed up in profiles.
        conn.set_prepared_statement_cache_capacity(256);
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('relay_id', ?1)",
            params![new_relay_id.as_bytes().to_vec()],
        )?;
        let id: Vec<u8> = conn.query_row("SELECT value FROM meta WHERE key = 'relay_id'", [], |r| r.get(0))?;
        let relay_id = Uuid::from_slice(&id).map_err(|e| StoreError::Corrupt(format!("relay id: {e}")))?;
        Ok(SqliteStore {
            conn,
            relay_id,
            commit_times: Vec::new(),
            access_writes: 0,
        })
    }

    /// The underlying connection, for operations outside the trait (backup, integrity checks).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The durations of the commits since the last call (the server's commit-latency metric).
    pub fn take_commit_times(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.commit_times)
    }

    fn changes_blob_concat(blob: &[u8], out: &mut Vec<u8>) -> StoreResult<()> {
        let changes: Vec<Bytes> =
            ciborium::from_reader(blob).map_err(|e| StoreError::Corrupt(format!("feed changes: {e}")))?;
        for c in changes {
            out.extend_from_slice(&c.0);
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn begin(&mut self) -> StoreResult<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    fn commit(&mut self) -> StoreResult<()> {
        let started = Instant::now();
        self.conn.execute_batch("COMMIT")?;
        if self.commit_times.len() < 1024 {
            self.commit_times.push(started.elapsed());
        }
        Ok(())
    }

    fn begin_read(&mut self) -> StoreResult<()> {
        self.conn.execute_batch("BEGIN DEFERRED")?;
        Ok(())
    }

    fn end_read(&mut self) -> StoreResult<()> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    fn rollback(&mut self) -> StoreResult<()> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK")?;
        }
        Ok(())
    }

    fn relay_id(&self) -> Uuid {
        self.relay_id
    }

    fn create_space(&mut self, space_id: Uuid, name: &str, now_ms: u64) -> StoreResult<()> {
        match self.conn.execute(
            "INSERT INTO spaces(space_id, name, created_ms) VALUES (?1, ?2, ?3)",
            params![space_id.as_bytes().to_vec(), name, i(now_ms)],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::Conflict(format!("a space named `{name}` already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn space_by_name(&self, name: &str) -> StoreResult<Option<SpaceRow>> {
        Ok(self
            .conn
            .prepare_cached("SELECT space_id, name, created_ms FROM spaces WHERE name = ?1")?
            .query_row(params![name], space_row)
            .optional()?)
    }

    fn spaces(&self) -> StoreResult<Vec<SpaceRow>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT space_id, name, created_ms FROM spaces ORDER BY name")?;
        let rows = st.query_map([], space_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_user(&mut self, user_id: Uuid, name: &str, now_ms: u64) -> StoreResult<()> {
        match self.conn.execute(
            "INSERT INTO users(user_id, name, created_ms) VALUES (?1, ?2, ?3)",
            params![user_id.as_bytes().to_vec(), name, i(now_ms)],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::Conflict(format!("a user named `{name}` already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn user(&self, user_id: Uuid) -> StoreResult<Option<UserRow>> {
        Ok(self
            .conn
            .prepare_cached("SELECT user_id, name, created_ms FROM users WHERE user_id = ?1")?
            .query_row(params![user_id.as_bytes().to_vec()], user_row)
            .optional()?)
    }

    fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRow>> {
        Ok(self
            .conn
            .prepare_cached("SELECT user_id, name, created_ms FROM users WHERE name = ?1")?
            .query_row(params![name], user_row)
            .optional()?)
    }

    fn users(&self) -> StoreResult<Vec<UserRow>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT user_id, name, created_ms FROM users ORDER BY name")?;
        let rows = st.query_map([], user_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_membership(&mut self, user_id: Uuid, space_id: Uuid, role: Role) -> StoreResult<()> {
        self.access_writes += 1;
        self.conn.execute(
            "INSERT INTO memberships(user_id, space_id, role) VALUES (?1, ?2, ?3)
             ON CONFLICT(user_id, space_id) DO UPDATE SET role = excluded.role",
            params![user_id.as_bytes().to_vec(), space_id.as_bytes().to_vec(), role.as_str()],
        )?;
        Ok(())
    }

    fn remove_membership(&mut self, user_id: Uuid, space_id: Uuid) -> StoreResult<bool> {
        self.access_writes += 1;
        let n = self.conn.execute(
            "DELETE FROM memberships WHERE user_id = ?1 AND space_id = ?2",
            params![user_id.as_bytes().to_vec(), space_id.as_bytes().to_vec()],
        )?;
        Ok(n > 0)
    }

    fn memberships(&self, user_id: Uuid) -> StoreResult<Vec<MembershipRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT m.space_id, s.name, m.role FROM memberships m JOIN spaces s ON s.space_id = m.space_id
             WHERE m.user_id = ?1 ORDER BY s.name",
        )?;
        let rows = st.query_map(params![user_id.as_bytes().to_vec()], |r| {
            Ok(MembershipRow {
                space_id: uuid_col(r, 0)?,
                space_name: r.get(1)?,
                role: role_col(r, 2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_token(&mut self, token_hash: [u8; 32], user_id: Uuid, now_ms: u64, expires_ms: u64) -> StoreResult<()> {
        self.conn.execute(
            "INSERT INTO tokens(token_hash, user_id, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                token_hash.to_vec(),
                user_id.as_bytes().to_vec(),
                i(now_ms),
                i(expires_ms)
            ],
        )?;
        Ok(())
    }

    fn token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<TokenRow>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE token_hash = ?1"))?
            .query_row(params![token_hash.to_vec()], token_row)
            .optional()?)
    }

    fn tokens(&self) -> StoreResult<Vec<TokenRow>> {
        let mut st = self
            .conn
            .prepare_cached(&format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created_ms"))?;
        let rows = st.query_map([], token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn use_token(&mut self, token_hash: &[u8; 32], device_id: Uuid, now_ms: u64) -> StoreResult<()> {
        let n = self.conn.execute(
            "UPDATE tokens SET used_ms = ?2, used_by = ?3 WHERE token_hash = ?1 AND used_ms IS NULL",
            params![token_hash.to_vec(), i(now_ms), device_id.as_bytes().to_vec()],
        )?;
        if n == 0 {
            return Err(StoreError::Conflict("enrollment token already used".into()));
        }
        Ok(())
    }

    fn expire_token(&mut self, token_hash: &[u8; 32], now_ms: u64) -> StoreResult<bool> {
        let n = self.conn.execute(
            "UPDATE tokens SET expires_ms = MIN(expires_ms, ?2) WHERE token_hash = ?1 AND used_ms IS NULL",
            params![token_hash.to_vec(), i(now_ms)],
        )?;
        Ok(n > 0)
    }

    fn register_device(&mut self, device_id: Uuid, user_id: Uuid, public_key: &[u8], now_ms: u64) -> StoreResult<()> {
        match self.conn.execute(
            "INSERT INTO devices(device_id, user_id, public_key, enrolled_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                device_id.as_bytes().to_vec(),
                user_id.as_bytes().to_vec(),
                public_key,
                i(now_ms)
            ],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::Conflict(format!("device {device_id} is already enrolled")))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn device(&self, device_id: Uuid) -> StoreResult<Option<DeviceRow>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {DEVICE_COLS} FROM devices WHERE device_id = ?1"))?
            .query_row(params![device_id.as_bytes().to_vec()], device_row)
            .optional()?)
    }

    fn devices(&self) -> StoreResult<Vec<DeviceRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {DEVICE_COLS} FROM devices ORDER BY enrolled_ms, device_id"
        ))?;
        let rows = st.query_map([], device_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_device(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<bool> {
        self.access_writes += 1;
        let n = self.conn.execute(
            "UPDATE devices SET revoked_ms = ?2 WHERE device_id = ?1 AND revoked_ms IS NULL",
            params![device_id.as_bytes().to_vec(), i(now_ms)],
        )?;
        Ok(n > 0)
    }

    fn set_device_key(&mut self, device_id: Uuid, public_key: &[u8]) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE devices SET public_key = ?2 WHERE device_id = ?1",
            params![device_id.as_bytes().to_vec(), public_key],
        )?;
        Ok(())
    }

    fn touch_device(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<()> {
        self.conn
            .prepare_cached("UPDATE devices SET last_seen_ms = ?2 WHERE device_id = ?1")?
            .execute(params![device_id.as_bytes().to_vec(), i(now_ms)])?;
        Ok(())
    }

    fn document(&self, entity_id: Uuid) -> StoreResult<Option<DocumentRow>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {DOC_COLS} FROM documents WHERE entity_id = ?1"))?
            .query_row(params![entity_id.as_bytes().to_vec()], doc_row)
            .optional()?)
    }

    fn document_bytes(&self, doc_key: u64) -> StoreResult<Vec<u8>> {
        let (mut bytes, snapshot_seq): (Vec<u8>, i64) = self
            .conn
            .prepare_cached("SELECT snapshot, snapshot_seq FROM documents WHERE doc_key = ?1")?
            .query_row(params![i(doc_key)], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let mut st = self
            .conn
            .prepare_cached("SELECT changes FROM feed WHERE doc_key = ?1 AND seq > ?2 ORDER BY seq")?;
        let mut rows = st.query(params![i(doc_key), snapshot_seq])?;
        while let Some(row) = rows.next()? {
            let blob: Vec<u8> = row.get(0)?;
            Self::changes_blob_concat(&blob, &mut bytes)?;
        }
        Ok(bytes)
    }

    fn insert_document(&mut self, entity_id: Uuid, space_id: Uuid, entity_type: &str, now_ms: u64) -> StoreResult<u64> {
        self.conn
            .prepare_cached(
                "INSERT INTO documents(entity_id, space_id, entity_type, version, last_seq, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, 0, 0, ?4, ?4)",
            )?
            .execute(params![
                entity_id.as_bytes().to_vec(),
                space_id.as_bytes().to_vec(),
                entity_type,
                i(now_ms)
            ])?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn update_document(&mut self, doc_key: u64, u: &DocumentUpdate, seq: u64, now_ms: u64) -> StoreResult<()> {
        self.conn
            .prepare_cached(
                "UPDATE documents SET version = ?2, last_seq = ?3, deleted = ?4, signed = ?5, locked = ?6,
                 lww_stamps = ?7, updated_ms = ?8 WHERE doc_key = ?1",
            )?
            .execute(params![
                i(doc_key),
                i(u.version),
                i(seq),
                u.deleted,
                u.signed,
                u.locked,
                u.lww_stamps,
                i(now_ms)
            ])?;
        Ok(())
    }

    fn save_snapshot(&mut self, doc_key: u64, bytes: &[u8], upto_seq: u64) -> StoreResult<()> {
        self.conn
            .prepare_cached("UPDATE documents SET snapshot = ?2, snapshot_seq = ?3 WHERE doc_key = ?1")?
            .execute(params![i(doc_key), bytes, i(upto_seq)])?;
        Ok(())
    }

    fn changes_since_snapshot(&self, doc_key: u64) -> StoreResult<u64> {
        let n: i64 = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FROM feed WHERE doc_key = ?1
                 AND seq > (SELECT snapshot_seq FROM documents WHERE doc_key = ?1)",
            )?
            .query_row(params![i(doc_key)], |r| r.get(0))?;
        Ok(n as u64)
    }

    fn append_feed(&mut self, r: &NewFeedRow) -> StoreResult<u64> {
        self.conn
            .prepare_cached(
                "INSERT INTO feed(doc_key, space_id, entity_type, entity_id, version, origin_device, origin_user,
                 mutation_id, hlc, changes, lww_losses) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                i(r.doc_key),
                r.space_id.as_bytes().to_vec(),
                r.entity_type,
                r.entity_id.as_bytes().to_vec(),
                i(r.version),
                r.origin_device.as_bytes().to_vec(),
                r.origin_user.as_bytes().to_vec(),
                r.mutation_id.as_bytes().to_vec(),
                r.hlc.to_string(),
                r.changes,
                r.lww_losses,
            ])?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn max_seq(&self) -> StoreResult<u64> {
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT MAX(seq) FROM feed")?
            .query_row([], |r| r.get(0))?;
        Ok(v.unwrap_or(0) as u64)
    }

    fn feed_after(&self, spaces: &[Uuid], after_seq: u64, limit: usize) -> StoreResult<Vec<FeedRow>> {
        if spaces.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {FEED_COLS} FROM feed WHERE space_id IN ({}) AND seq > ? ORDER BY seq LIMIT ?",
            placeholders(spaces.len())
        );
        let mut st = self.conn.prepare_cached(&sql)?;
        let mut args: Vec<rusqlite::types::Value> = spaces
            .iter()
            .map(|s| rusqlite::types::Value::Blob(s.as_bytes().to_vec()))
            .collect();
        args.push(rusqlite::types::Value::Integer(i(after_seq)));
        args.push(rusqlite::types::Value::Integer(limit as i64));
        let rows = st.query_map(params_from_iter(args), feed_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn feed_range(&self, after_seq: u64, upto_seq: u64, limit: usize) -> StoreResult<Vec<FeedRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {FEED_COLS} FROM feed WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3"
        ))?;
        let rows = st.query_map(params![i(after_seq), i(upto_seq), limit as i64], feed_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn feed_for_document(&self, doc_key: u64, after_version: u64) -> StoreResult<Vec<FeedRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {FEED_COLS} FROM feed WHERE doc_key = ?1 AND version > ?2 ORDER BY seq"
        ))?;
        let rows = st.query_map(params![i(doc_key), i(after_version)], feed_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn documents_after(&self, spaces: &[Uuid], after_key: u64, limit: usize) -> StoreResult<Vec<DocumentRow>> {
        if spaces.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {DOC_COLS} FROM documents WHERE space_id IN ({}) AND doc_key > ? AND version > 0
             ORDER BY doc_key LIMIT ?",
            placeholders(spaces.len())
        );
        let mut st = self.conn.prepare_cached(&sql)?;
        let mut args: Vec<rusqlite::types::Value> = spaces
            .iter()
            .map(|s| rusqlite::types::Value::Blob(s.as_bytes().to_vec()))
            .collect();
        args.push(rusqlite::types::Value::Integer(i(after_key)));
        args.push(rusqlite::types::Value::Integer(limit as i64));
        let rows = st.query_map(params_from_iter(args), doc_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn receipt(&self, mutation_id: Uuid) -> StoreResult<Option<ReceiptRow>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT mutation_id, device_id, entity_id, space_id, envelope_hash, outcome, created_ms
                 FROM receipts WHERE mutation_id = ?1",
            )?
            .query_row(params![mutation_id.as_bytes().to_vec()], |r| {
                let hash: Option<Vec<u8>> = r.get(4)?;
                Ok(ReceiptRow {
                    mutation_id: uuid_col(r, 0)?,
                    device_id: uuid_col(r, 1)?,
                    entity_id: opt_uuid_col(r, 2)?,
                    space_id: opt_uuid_col(r, 3)?,
                    // A hash of the wrong length can match nothing: it is kept as "different".
                    envelope_hash: hash.map(|h| h.try_into().unwrap_or([0; 32])),
                    outcome: r.get(5)?,
                    created_ms: u64_col(r, 6)?,
                })
            })
            .optional()?)
    }

    fn put_receipt(&mut self, r: &ReceiptRow) -> StoreResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO receipts(mutation_id, device_id, entity_id, space_id, envelope_hash, outcome, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                r.mutation_id.as_bytes().to_vec(),
                r.device_id.as_bytes().to_vec(),
                r.entity_id.map(|u| u.as_bytes().to_vec()),
                r.space_id.map(|u| u.as_bytes().to_vec()),
                r.envelope_hash.map(|h| h.to_vec()),
                r.outcome,
                i(r.created_ms)
            ])?;
        Ok(())
    }

    fn last_audit_hash(&self) -> StoreResult<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT hash FROM audit ORDER BY audit_id DESC LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()?)
    }

    fn append_audit(&mut self, a: &AuditRow) -> StoreResult<u64> {
        self.conn
            .prepare_cached(
                "INSERT INTO audit(seq, mutation_id, actor_id, device_id, space_id, entity_type, entity_id, kind,
                 version, before_json, after_json, client_ts, server_ts_ms, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?
            .execute(params![
                i(a.seq),
                a.mutation_id.as_bytes().to_vec(),
                a.actor_id.as_bytes().to_vec(),
                a.device_id.as_bytes().to_vec(),
                a.space_id.as_bytes().to_vec(),
                a.entity_type,
                a.entity_id.as_bytes().to_vec(),
                a.kind,
                i(a.version),
                a.before_json,
                a.after_json,
                a.client_ts,
                i(a.server_ts_ms),
                a.prev_hash,
                a.hash,
            ])?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn audit_after(&self, after_id: u64, limit: usize) -> StoreResult<Vec<AuditRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {AUDIT_COLS} FROM audit WHERE audit_id > ?1 ORDER BY audit_id LIMIT ?2"
        ))?;
        let rows = st.query_map(params![i(after_id), limit as i64], audit_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn archive(&mut self, a: &ArchiveRow) -> StoreResult<u64> {
        let opt = |u: Option<Uuid>| u.map(|u| u.as_bytes().to_vec());
        self.conn
            .prepare_cached(
                "INSERT INTO conflict_archive(kind, space_id, entity_type, entity_id, field, losing_json, winning_json,
                 loser_device, loser_mutation, winner_device, winner_mutation, version, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                a.kind,
                a.space_id.as_bytes().to_vec(),
                a.entity_type,
                a.entity_id.as_bytes().to_vec(),
                a.field,
                a.losing_json,
                a.winning_json,
                opt(a.loser_device),
                opt(a.loser_mutation),
                opt(a.winner_device),
                opt(a.winner_mutation),
                i(a.version),
                i(a.created_ms),
            ])?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn archive_rows(&self, limit: usize) -> StoreResult<Vec<ArchiveRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT archive_id, kind, space_id, entity_type, entity_id, field, losing_json, winning_json,
             loser_device, loser_mutation, winner_device, winner_mutation, version, created_ms
             FROM conflict_archive ORDER BY archive_id DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit as i64], archive_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoked_since(&self, since_ms: u64) -> StoreResult<Vec<(Uuid, u64)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT device_id, revoked_ms FROM devices WHERE revoked_ms >= ?1 ORDER BY revoked_ms")?;
        let rows = st.query_map(params![i(since_ms)], |r| Ok((uuid_col(r, 0)?, u64_col(r, 1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn outside_writes_marker(&self) -> StoreResult<u64> {
        // SQLite's data_version moves exactly when another connection commits to the file.
        let v: i64 = self.conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        Ok((v as u64).wrapping_add(self.access_writes << 32))
    }

    fn counts(&self) -> StoreResult<Counts> {
        let count = |table: &str| -> StoreResult<u64> {
            let n: i64 = self
                .conn
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
            Ok(n as u64)
        };
        Ok(Counts {
            spaces: count("spaces")?,
            users: count("users")?,
            devices: count("devices")?,
            documents: count("documents")?,
            feed: count("feed")?,
            receipts: count("receipts")?,
            audit: count("audit")?,
            archive: count("conflict_archive")?,
        })
    }
}
