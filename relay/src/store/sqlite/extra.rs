//! Operator queries on a SQLite store that the relay core never needs: filtered audit pages for
//! export, the conflict archive by entity or kind, counts over every file, and the consistency
//! checks of a restore drill. Read-only; outside the [`SpaceStore`](crate::store::SpaceStore) trait on purpose.

use rusqlite::{params, params_from_iter};
use uuid::Uuid;

use std::collections::BTreeMap;

use super::columns::{AUDIT_COLS, archive_row, audit_row, i};
use super::{SqliteBackend, SqliteShard};
use crate::store::consistency::Consistency;
use crate::store::{ArchiveRow, AuditRow, Backend, Counts, Directory, SpaceStore, StoreResult};

impl SqliteBackend {
    /// Everything the store holds, counted over the directory and every shard.
    pub fn counts(&self) -> StoreResult<Counts> {
        Counts::of_store(self)
    }

    /// The cross-table checks of every shard, and that each shard holds only spaces the
    /// directory assigns to it.
    pub fn consistency(&self) -> StoreResult<Consistency> {
        let assigned: BTreeMap<Uuid, u32> = self
            .open_directory()?
            .spaces()?
            .into_iter()
            .map(|s| (s.space_id, s.shard))
            .collect();
        let mut total = Consistency::default();
        for n in 0..self.shard_count() {
            let shard = self.open_shard(n)?;
            total += shard.consistency()?;
            total.misplaced_spaces += shard
                .spaces_held()?
                .into_iter()
                .filter(|space| assigned.get(space) != Some(&n))
                .count() as u64;
        }
        Ok(total)
    }
}

impl SqliteShard {
    /// Audit records of this shard with `audit_id > after_id`, in write order, optionally of
    /// one space only, after its feed seq `after_seq`, and at or after `since_ms` (server time).
    pub fn audit_page(
        &self,
        after_id: u64,
        space: Option<Uuid>,
        after_seq: Option<u64>,
        since_ms: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<AuditRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {AUDIT_COLS} FROM audit WHERE audit_id > ?1 AND (?2 IS NULL OR space_id = ?2) AND seq > ?3
             AND server_ts_ms >= ?4 ORDER BY audit_id LIMIT ?5"
        ))?;
        let rows = st.query_map(
            params![
                i(after_id),
                space.map(|s| s.as_bytes().to_vec()),
                i(after_seq.unwrap_or(0)),
                i(since_ms.unwrap_or(0)),
                limit as i64
            ],
            audit_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The conflict archive, newest first, optionally for one entity and/or one kind
    /// (`lww`, `resolution`).
    pub fn archive_query(
        &self,
        entity: Option<Uuid>,
        kind: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<ArchiveRow>> {
        let mut sql = String::from(
            "SELECT archive_id, kind, space_id, entity_type, entity_id, field, losing_json, winning_json,
             loser_device, loser_mutation, winner_device, winner_mutation, version, created_ms
             FROM conflict_archive WHERE 1 = 1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(e) = entity {
            sql.push_str(" AND entity_id = ?");
            args.push(rusqlite::types::Value::Blob(e.as_bytes().to_vec()));
        }
        if let Some(k) = kind {
            sql.push_str(" AND kind = ?");
            args.push(rusqlite::types::Value::Text(k.to_string()));
        }
        sql.push_str(" ORDER BY archive_id DESC LIMIT ?");
        args.push(rusqlite::types::Value::Integer(limit.min(i64::MAX as usize) as i64));
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map(params_from_iter(args), archive_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// `PRAGMA integrity_check`: `["ok"]` when the file is sound, else SQLite's findings.
    pub fn integrity_check(&self) -> StoreResult<Vec<String>> {
        let mut st = self.conn.prepare("PRAGMA integrity_check")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The cross-table checks of a restore drill.
    pub fn consistency(&self) -> StoreResult<Consistency> {
        // `misplaced_spaces` needs the directory: counted by `SqliteBackend::consistency`.
        Consistency::counted(|sql| Ok(self.conn.query_row(sql, [], |r| r.get(0))?))
    }

    /// Whether a mutation was applied (it has a feed row); for drills and tests.
    pub fn applied(&self, mutation_id: Uuid) -> StoreResult<bool> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM feed WHERE mutation_id = ?1",
            params![mutation_id.as_bytes().to_vec()],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }
}
