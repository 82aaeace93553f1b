//! The directory on PostgreSQL: spaces and their shards, users, memberships, enrollment
//! tokens, devices, served schemas.

use fieldsync_schema::Role;
use uuid::Uuid;

use super::columns::{
    DEVICE_COLS, SPACE_COLS, TOKEN_COLS, USER_COLS, col, device_row, i, role_col, rows, space_row, token_row, u64_col,
    user_row,
};
use super::{Conn, is_unique_violation};
use crate::store::{
    AuditRow, DeviceRow, Directory, DirectoryCounts, MembershipRow, ServedSchema, SpaceRow, StoreError, StoreResult,
    TokenRow, UserRow,
};

pub struct PgDirectory {
    pub(super) conn: Conn,
    relay_id: Uuid,
    shards: u32,
}

impl PgDirectory {
    pub(super) fn new(client: postgres::Client, url: &str, relay_id: Uuid, shards: u32) -> Self {
        PgDirectory {
            conn: Conn::new(client, url),
            relay_id,
            shards,
        }
    }

    /// Moves the access marker every relay's front watches (in the writing transaction, so it
    /// moves exactly when the change commits).
    fn access_changed(&self) -> StoreResult<()> {
        self.conn.with(|c| {
            c.execute("SELECT nextval('access_changes')", &[])?;
            c.execute("SELECT pg_notify($1, '')", &[&super::ACCESS_CHANNEL])
        })?;
        Ok(())
    }

    fn one<T>(
        &self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        map: fn(&postgres::Row) -> StoreResult<T>,
    ) -> StoreResult<Option<T>> {
        self.conn
            .try_with(|c| c.query_opt(sql, params)?.as_ref().map(map).transpose())
    }

    fn all<T>(&self, sql: &str, map: fn(&postgres::Row) -> StoreResult<T>) -> StoreResult<Vec<T>> {
        rows(self.conn.with(|c| c.query(sql, &[]))?, map)
    }

    fn execute(&self, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> StoreResult<u64> {
        self.conn.with(|c| c.execute(sql, params))
    }

    /// An insert whose unique key is taken answers `Conflict` with `taken`.
    fn insert_unique(
        &self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        taken: String,
    ) -> StoreResult<()> {
        match self.conn.raw(|c| c.execute(sql, params)) {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(taken)),
            Err(e) => Err(e.into()),
        }
    }
}

impl Directory for PgDirectory {
    fn relay_id(&self) -> Uuid {
        self.relay_id
    }

    fn shard_count(&self) -> u32 {
        self.shards
    }

    fn begin(&mut self) -> StoreResult<()> {
        self.conn.begin("BEGIN")
    }

    fn commit(&mut self) -> StoreResult<()> {
        self.conn.finish("COMMIT")
    }

    fn rollback(&mut self) -> StoreResult<()> {
        self.conn.finish("ROLLBACK")
    }

    fn create_space(&mut self, space_id: Uuid, name: &str, now_ms: u64) -> StoreResult<SpaceRow> {
        // The least used shard (ties: the lowest), so spaces spread evenly over the workers.
        let mut counts = vec![0u64; self.shards as usize];
        for row in self
            .conn
            .with(|c| c.query("SELECT shard, COUNT(*) FROM spaces GROUP BY shard", &[]))?
        {
            let shard: i32 = col(&row, 0)?;
            let n: i64 = col(&row, 1)?;
            if let Some(c) = usize::try_from(shard).ok().and_then(|s| counts.get_mut(s)) {
                *c = n.max(0) as u64;
            }
        }
        let shard = (0..self.shards).min_by_key(|s| (counts[*s as usize], *s)).unwrap_or(0);
        self.insert_unique(
            "INSERT INTO spaces(space_id, name, created_ms, shard) VALUES ($1, $2, $3, $4)",
            &[&space_id, &name, &i(now_ms), &(shard as i32)],
            format!("a space named `{name}` already exists"),
        )?;
        Ok(SpaceRow {
            space_id,
            name: name.to_string(),
            created_ms: now_ms,
            shard,
        })
    }

    fn space(&self, space_id: Uuid) -> StoreResult<Option<SpaceRow>> {
        self.one(
            &format!("SELECT {SPACE_COLS} FROM spaces WHERE space_id = $1"),
            &[&space_id],
            space_row,
        )
    }

    fn space_by_name(&self, name: &str) -> StoreResult<Option<SpaceRow>> {
        self.one(
            &format!("SELECT {SPACE_COLS} FROM spaces WHERE name = $1"),
            &[&name],
            space_row,
        )
    }

    fn spaces(&self) -> StoreResult<Vec<SpaceRow>> {
        self.all(&format!("SELECT {SPACE_COLS} FROM spaces ORDER BY name"), space_row)
    }

    fn create_user(&mut self, user_id: Uuid, name: &str, now_ms: u64) -> StoreResult<()> {
        self.insert_unique(
            "INSERT INTO users(user_id, name, created_ms) VALUES ($1, $2, $3)",
            &[&user_id, &name, &i(now_ms)],
            format!("a user named `{name}` already exists"),
        )
    }

    fn user(&self, user_id: Uuid) -> StoreResult<Option<UserRow>> {
        self.one(
            &format!("SELECT {USER_COLS} FROM users WHERE user_id = $1"),
            &[&user_id],
            user_row,
        )
    }

    fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRow>> {
        self.one(
            &format!("SELECT {USER_COLS} FROM users WHERE name = $1"),
            &[&name],
            user_row,
        )
    }

    fn users(&self) -> StoreResult<Vec<UserRow>> {
        self.all(&format!("SELECT {USER_COLS} FROM users ORDER BY name"), user_row)
    }

    fn set_membership(&mut self, user_id: Uuid, space_id: Uuid, role: Role) -> StoreResult<()> {
        self.execute(
            "INSERT INTO memberships(user_id, space_id, role) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, space_id) DO UPDATE SET role = excluded.role",
            &[&user_id, &space_id, &role.as_str()],
        )?;
        self.access_changed()
    }

    fn remove_membership(&mut self, user_id: Uuid, space_id: Uuid) -> StoreResult<bool> {
        let n = self.execute(
            "DELETE FROM memberships WHERE user_id = $1 AND space_id = $2",
            &[&user_id, &space_id],
        )?;
        self.access_changed()?;
        Ok(n > 0)
    }

    fn memberships(&self, user_id: Uuid) -> StoreResult<Vec<MembershipRow>> {
        let found = self.conn.with(|c| {
            c.query(
                "SELECT m.space_id, s.name, m.role FROM memberships m JOIN spaces s ON s.space_id = m.space_id
                 WHERE m.user_id = $1 ORDER BY s.name",
                &[&user_id],
            )
        })?;
        rows(found, |r| {
            Ok(MembershipRow {
                space_id: col(r, 0)?,
                space_name: col(r, 1)?,
                role: role_col(r, 2)?,
            })
        })
    }

    fn create_token(&mut self, token_hash: [u8; 32], user_id: Uuid, now_ms: u64, expires_ms: u64) -> StoreResult<()> {
        self.execute(
            "INSERT INTO tokens(token_hash, user_id, created_ms, expires_ms) VALUES ($1, $2, $3, $4)",
            &[&token_hash.to_vec(), &user_id, &i(now_ms), &i(expires_ms)],
        )?;
        Ok(())
    }

    fn token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<TokenRow>> {
        self.one(
            &format!("SELECT {TOKEN_COLS} FROM tokens WHERE token_hash = $1"),
            &[&token_hash.to_vec()],
            token_row,
        )
    }

    fn tokens(&self) -> StoreResult<Vec<TokenRow>> {
        self.all(
            &format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created_ms"),
            token_row,
        )
    }

    fn use_token(&mut self, token_hash: &[u8; 32], device_id: Uuid, now_ms: u64) -> StoreResult<()> {
        let n = self.execute(
            "UPDATE tokens SET used_ms = $2, used_by = $3 WHERE token_hash = $1 AND used_ms IS NULL",
            &[&token_hash.to_vec(), &i(now_ms), &device_id],
        )?;
        if n == 0 {
            return Err(StoreError::Conflict("enrollment token already used".into()));
        }
        Ok(())
    }

    fn expire_token(&mut self, token_hash: &[u8; 32], now_ms: u64) -> StoreResult<bool> {
        let n = self.execute(
            "UPDATE tokens SET expires_ms = LEAST(expires_ms, $2) WHERE token_hash = $1 AND used_ms IS NULL",
            &[&token_hash.to_vec(), &i(now_ms)],
        )?;
        Ok(n > 0)
    }

    fn set_token_label(&mut self, token_hash: &[u8; 32], label: &str) -> StoreResult<()> {
        self.execute(
            "UPDATE tokens SET label = $2 WHERE token_hash = $1",
            &[&token_hash.to_vec(), &label],
        )?;
        Ok(())
    }

    fn set_device_label(&mut self, device_id: Uuid, label: &str) -> StoreResult<bool> {
        let n = self.execute(
            "UPDATE devices SET label = $2 WHERE device_id = $1",
            &[&device_id, &label],
        )?;
        Ok(n > 0)
    }

    fn register_device(&mut self, device_id: Uuid, user_id: Uuid, public_key: &[u8], now_ms: u64) -> StoreResult<()> {
        self.insert_unique(
            "INSERT INTO devices(device_id, user_id, public_key, enrolled_ms) VALUES ($1, $2, $3, $4)",
            &[&device_id, &user_id, &public_key, &i(now_ms)],
            format!("device {device_id} is already enrolled"),
        )
    }

    fn device(&self, device_id: Uuid) -> StoreResult<Option<DeviceRow>> {
        self.one(
            &format!("SELECT {DEVICE_COLS} FROM devices WHERE device_id = $1"),
            &[&device_id],
            device_row,
        )
    }

    fn devices(&self) -> StoreResult<Vec<DeviceRow>> {
        self.all(
            &format!("SELECT {DEVICE_COLS} FROM devices ORDER BY enrolled_ms, device_id"),
            device_row,
        )
    }

    fn revoke_device(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<bool> {
        let n = self.execute(
            "UPDATE devices SET revoked_ms = $2 WHERE device_id = $1 AND revoked_ms IS NULL",
            &[&device_id, &i(now_ms)],
        )?;
        self.access_changed()?;
        Ok(n > 0)
    }

    fn request_wipe(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<bool> {
        let n = self.execute(
            "UPDATE devices SET wipe_requested_ms = $2
             WHERE device_id = $1 AND revoked_ms IS NOT NULL AND wipe_requested_ms IS NULL",
            &[&device_id, &i(now_ms)],
        )?;
        self.access_changed()?;
        Ok(n > 0)
    }

    fn record_wipe(&mut self, device_id: Uuid, now_ms: u64, discarded: u64) -> StoreResult<bool> {
        let n = self.execute(
            "UPDATE devices SET wiped_ms = $2, wipe_discarded = $3
             WHERE device_id = $1 AND wipe_requested_ms IS NOT NULL AND wiped_ms IS NULL",
            &[&device_id, &i(now_ms), &i(discarded)],
        )?;
        Ok(n > 0)
    }

    fn set_device_replaces(&mut self, device_id: Uuid, replaces: Uuid) -> StoreResult<()> {
        self.execute(
            "UPDATE devices SET replaces = $2 WHERE device_id = $1",
            &[&device_id, &replaces],
        )?;
        Ok(())
    }

    fn replaced_by(&self, device_id: Uuid) -> StoreResult<Option<Uuid>> {
        self.one(
            "SELECT device_id FROM devices WHERE replaces = $1",
            &[&device_id],
            |r| col(r, 0),
        )
    }

    fn set_device_key(&mut self, device_id: Uuid, public_key: &[u8]) -> StoreResult<()> {
        self.execute(
            "UPDATE devices SET public_key = $2 WHERE device_id = $1",
            &[&device_id, &public_key],
        )?;
        Ok(())
    }

    fn touch_device(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<()> {
        self.execute(
            "UPDATE devices SET last_seen_ms = $2 WHERE device_id = $1",
            &[&device_id, &i(now_ms)],
        )?;
        Ok(())
    }

    fn revoked_since(&self, since_ms: u64) -> StoreResult<Vec<(Uuid, u64)>> {
        let found = self.conn.with(|c| {
            c.query(
                "SELECT device_id, revoked_ms FROM devices WHERE revoked_ms >= $1 ORDER BY revoked_ms",
                &[&i(since_ms)],
            )
        })?;
        rows(found, |r| Ok((col(r, 0)?, u64_col(r, 1)?)))
    }

    fn outside_writes_marker(&self) -> StoreResult<u64> {
        // The sequence's last value: moved by every access change of every relay and admin tool.
        let row = self
            .conn
            .with(|c| c.query_one("SELECT last_value, is_called FROM access_changes", &[]))?;
        let last: i64 = col(&row, 0)?;
        let called: bool = col(&row, 1)?;
        Ok(if called { last.max(0) as u64 } else { 0 })
    }

    fn counts(&self) -> StoreResult<DirectoryCounts> {
        let row = self.conn.with(|c| {
            c.query_one(
                "SELECT (SELECT COUNT(*) FROM spaces), (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM devices)",
                &[],
            )
        })?;
        Ok(DirectoryCounts {
            spaces: u64_col(&row, 0)?,
            users: u64_col(&row, 1)?,
            devices: u64_col(&row, 2)?,
        })
    }

    fn round_one_audit_after(&self, _after_id: u64, _limit: usize) -> StoreResult<Vec<AuditRow>> {
        // A PostgreSQL store starts in the per-space layout: it never held a round-1 chain.
        Ok(Vec::new())
    }

    fn served_schemas(&self) -> StoreResult<Vec<ServedSchema>> {
        let found = self.conn.with(|c| {
            c.query(
                "SELECT hash, version, toml, first_served_ms, retired_ms FROM served_schemas ORDER BY served_id",
                &[],
            )
        })?;
        rows(found, |r| {
            Ok(ServedSchema {
                hash: col(r, 0)?,
                version: u64_col(r, 1)?,
                toml: col(r, 2)?,
                first_served_ms: u64_col(r, 3)?,
                retired_ms: super::columns::opt_u64_col(r, 4)?,
            })
        })
    }

    fn record_served_schema(&mut self, schema: &ServedSchema) -> StoreResult<()> {
        self.execute(
            "INSERT INTO served_schemas (hash, version, toml, first_served_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (hash) DO NOTHING",
            &[
                &schema.hash,
                &i(schema.version),
                &schema.toml,
                &i(schema.first_served_ms),
            ],
        )?;
        Ok(())
    }

    fn retire_served_schema(&mut self, hash: &str, now_ms: u64) -> StoreResult<()> {
        self.execute(
            "UPDATE served_schemas SET retired_ms = $2 WHERE hash = $1 AND retired_ms IS NULL",
            &[&hash, &i(now_ms)],
        )?;
        Ok(())
    }
}
