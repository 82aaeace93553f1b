//! The directory on SQLite (`DIR/relay.db`): spaces and their shards, users, memberships,
//! enrollment tokens, devices.

use fieldsync_schema::Role;
use fieldsync_schema::sqlite_key::DatabaseKey;
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::columns::{
    DEVICE_COLS, SPACE_COLS, TOKEN_COLS, audit_row, device_row, i, role_col, space_row, token_row, u64_col, user_row,
    uuid_col,
};
use super::connect;
use crate::store::{
    AuditRow, DeviceRow, Directory, DirectoryCounts, MembershipRow, ServedSchema, SpaceRow, StoreError, StoreResult,
    TokenRow, UserRow,
};

const SCHEMA_SQL: &str = include_str!("../directory.sql");

pub struct SqliteDirectory {
    conn: Connection,
    relay_id: Uuid,
    shards: u32,
    /// Membership and revocation writes made through this handle: `PRAGMA data_version` only
    /// sees other connections' commits, and the marker must move for these too.
    access_writes: u64,
}

impl SqliteDirectory {
    /// Opens the directory of a prepared store (see `SqliteBackend::open`).
    pub(super) fn open(path: &std::path::Path, key: Option<&DatabaseKey>) -> StoreResult<Self> {
        let conn = connect(path, key)?;
        Self::create_tables(&conn)?;
        let id: Vec<u8> = conn.query_row("SELECT value FROM meta WHERE key = 'relay_id'", [], |r| r.get(0))?;
        let relay_id = Uuid::from_slice(&id).map_err(|e| StoreError::Corrupt(format!("relay id: {e}")))?;
        let shards = super::meta_u64(&conn, "shards")?
            .ok_or_else(|| StoreError::Corrupt("the directory does not say how many shards it has".into()))?;
        Ok(SqliteDirectory {
            conn,
            relay_id,
            shards: shards as u32,
            access_writes: 0,
        })
    }

    /// Creates the directory's tables (a new store, or the migration of a round-1 one).
    pub(super) fn create_tables(conn: &Connection) -> StoreResult<()> {
        conn.execute_batch(SCHEMA_SQL)?;
        // Columns added after a store was created: nullable, so adding them changes no row.
        for (table, column, kind) in [
            ("tokens", "label", "TEXT"),
            ("devices", "label", "TEXT"),
            ("devices", "wipe_requested_ms", "INTEGER"),
            ("devices", "wiped_ms", "INTEGER"),
            ("devices", "wipe_discarded", "INTEGER"),
            ("devices", "replaces", "BLOB"),
        ] {
            let present: i64 = conn.query_row(
                &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
                [column],
                |r| r.get(0),
            )?;
            if present == 0 {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
            }
        }
        Ok(())
    }

    /// The underlying connection, for operations outside the trait (integrity checks, export).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

impl Directory for SqliteDirectory {
    fn relay_id(&self) -> Uuid {
        self.relay_id
    }

    fn shard_count(&self) -> u32 {
        self.shards
    }

    fn begin(&mut self) -> StoreResult<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    fn commit(&mut self) -> StoreResult<()> {
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

    fn create_space(&mut self, space_id: Uuid, name: &str, now_ms: u64) -> StoreResult<SpaceRow> {
        // The least used shard (ties: the lowest), so spaces spread evenly over the writers.
        let mut counts = vec![0u64; self.shards as usize];
        {
            let mut st = self
                .conn
                .prepare_cached("SELECT shard, COUNT(*) FROM spaces GROUP BY shard")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (shard, n) = row?;
                if let Some(c) = counts.get_mut(shard as usize) {
                    *c = n as u64;
                }
            }
        }
        let shard = (0..self.shards).min_by_key(|s| (counts[*s as usize], *s)).unwrap_or(0);
        match self.conn.execute(
            "INSERT INTO spaces(space_id, name, created_ms, shard) VALUES (?1, ?2, ?3, ?4)",
            params![space_id.as_bytes().to_vec(), name, i(now_ms), shard],
        ) {
            Ok(_) => Ok(SpaceRow {
                space_id,
                name: name.to_string(),
                created_ms: now_ms,
                shard,
            }),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::Conflict(format!("a space named `{name}` already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn space(&self, space_id: Uuid) -> StoreResult<Option<SpaceRow>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {SPACE_COLS} FROM spaces WHERE space_id = ?1"))?
            .query_row(params![space_id.as_bytes().to_vec()], space_row)
            .optional()?)
    }

    fn space_by_name(&self, name: &str) -> StoreResult<Option<SpaceRow>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {SPACE_COLS} FROM spaces WHERE name = ?1"))?
            .query_row(params![name], space_row)
            .optional()?)
    }

    fn spaces(&self) -> StoreResult<Vec<SpaceRow>> {
        let mut st = self
            .conn
            .prepare_cached(&format!("SELECT {SPACE_COLS} FROM spaces ORDER BY name"))?;
        let rows = st.query_map([], space_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    fn set_token_label(&mut self, token_hash: &[u8; 32], label: &str) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE tokens SET label = ?2 WHERE token_hash = ?1",
            params![token_hash.to_vec(), label],
        )?;
        Ok(())
    }

    fn set_device_label(&mut self, device_id: Uuid, label: &str) -> StoreResult<bool> {
        let n = self.conn.execute(
            "UPDATE devices SET label = ?2 WHERE device_id = ?1",
            params![device_id.as_bytes().to_vec(), label],
        )?;
        Ok(n > 0)
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

    fn request_wipe(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<bool> {
        self.access_writes += 1;
        let n = self.conn.execute(
            "UPDATE devices SET wipe_requested_ms = ?2
             WHERE device_id = ?1 AND revoked_ms IS NOT NULL AND wipe_requested_ms IS NULL",
            params![device_id.as_bytes().to_vec(), i(now_ms)],
        )?;
        Ok(n > 0)
    }

    fn record_wipe(&mut self, device_id: Uuid, now_ms: u64, discarded: u64) -> StoreResult<bool> {
        let n = self.conn.execute(
            "UPDATE devices SET wiped_ms = ?2, wipe_discarded = ?3
             WHERE device_id = ?1 AND wipe_requested_ms IS NOT NULL AND wiped_ms IS NULL",
            params![device_id.as_bytes().to_vec(), i(now_ms), i(discarded)],
        )?;
        Ok(n > 0)
    }

    fn set_device_replaces(&mut self, device_id: Uuid, replaces: Uuid) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE devices SET replaces = ?2 WHERE device_id = ?1",
            params![device_id.as_bytes().to_vec(), replaces.as_bytes().to_vec()],
        )?;
        Ok(())
    }

    fn replaced_by(&self, device_id: Uuid) -> StoreResult<Option<Uuid>> {
        let found: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT device_id FROM devices WHERE replaces = ?1",
                [device_id.as_bytes().to_vec()],
                |r| r.get(0),
            )
            .optional()?;
        found
            .map(|b| Uuid::from_slice(&b).map_err(|e| StoreError::Corrupt(format!("device id: {e}"))))
            .transpose()
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

    fn round_one_audit_after(&self, after_id: u64, limit: usize) -> StoreResult<Vec<AuditRow>> {
        let exists: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'v1_audit'",
            [],
            |r| r.get(0),
        )?;
        if exists == 0 {
            return Ok(Vec::new());
        }
        let mut st = self.conn.prepare_cached(
            "SELECT audit_id, 0, seq, mutation_id, actor_id, device_id, space_id, entity_type, entity_id, kind,
             version, before_json, after_json, client_ts, server_ts_ms, prev_hash, hash
             FROM v1_audit WHERE audit_id > ?1 ORDER BY audit_id LIMIT ?2",
        )?;
        let rows = st.query_map(params![i(after_id), limit.min(i64::MAX as usize) as i64], audit_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn served_schemas(&self) -> StoreResult<Vec<ServedSchema>> {
        let mut st = self.conn.prepare_cached(
            "SELECT hash, version, toml, first_served_ms, retired_ms FROM served_schemas ORDER BY rowid",
        )?;
        let rows = st.query_map([], |r| {
            Ok(ServedSchema {
                hash: r.get(0)?,
                version: u64_col(r, 1)?,
                toml: r.get(2)?,
                first_served_ms: u64_col(r, 3)?,
                retired_ms: r.get::<_, Option<i64>>(4)?.map(|v| u64::try_from(v).unwrap_or(0)),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn record_served_schema(&mut self, schema: &ServedSchema) -> StoreResult<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO served_schemas (hash, version, toml, first_served_ms) VALUES (?1, ?2, ?3, ?4)",
            params![schema.hash, i(schema.version), schema.toml, i(schema.first_served_ms)],
        )?;
        Ok(())
    }

    fn retire_served_schema(&mut self, hash: &str, now_ms: u64) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE served_schemas SET retired_ms = ?2 WHERE hash = ?1 AND retired_ms IS NULL",
            params![hash, i(now_ms)],
        )?;
        Ok(())
    }

    fn counts(&self) -> StoreResult<DirectoryCounts> {
        let count = |table: &str| -> StoreResult<u64> {
            let n: i64 = self
                .conn
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
            Ok(n as u64)
        };
        Ok(DirectoryCounts {
            spaces: count("spaces")?,
            users: count("users")?,
            devices: count("devices")?,
        })
    }
}
