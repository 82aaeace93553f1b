//! One shard on SQLite (`DIR/shards/shard-N.db`): the documents, feeds, receipts, audit chains
//! and conflict archive of the spaces assigned to it.

use std::time::{Duration, Instant};

use fieldsync_schema::sqlite_key::DatabaseKey;
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::columns::{
    AUDIT_COLS, DOC_COLS, FEED_COLS, archive_row, audit_row, doc_row, feed_row, i, opt_uuid_col, u64_col, uuid_col,
};
use super::connect;
use crate::audit::GENESIS_HASH;
use crate::store::{
    ArchiveRow, AuditRow, DocumentRow, DocumentUpdate, DuplicateKeyRow, FeedRow, ReceiptRow, ShardCounts, SpaceHead,
    SpaceStore, StoreResult,
};

const SCHEMA_SQL: &str = include_str!("../shard.sql");

pub struct SqliteShard {
    pub(super) conn: Connection,
    /// How long each `COMMIT` took since the server last asked (metrics; never read by the core).
    commit_times: Vec<Duration>,
}

impl SqliteShard {
    pub(super) fn open(path: &std::path::Path, key: Option<&DatabaseKey>) -> StoreResult<Self> {
        let conn = connect(path, key)?;
        conn.execute_batch(SCHEMA_SQL)?;
        // Added after stores were created: nullable, so adding it changes no row.
        let present: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('documents') WHERE name = 'window_day'",
            [],
            |r| r.get(0),
        )?;
        if present == 0 {
            conn.execute_batch("ALTER TABLE documents ADD COLUMN window_day INTEGER")?;
        }
        Ok(SqliteShard {
            conn,
            commit_times: Vec::new(),
        })
    }

    /// The underlying connection, for operations outside the trait (backup, integrity checks).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

impl SpaceStore for SqliteShard {
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

    fn rollback(&mut self) -> StoreResult<()> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK")?;
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

    fn space_head(&self, space_id: Uuid) -> StoreResult<SpaceHead> {
        let head = self
            .conn
            .prepare_cached("SELECT seq, audit_seq, audit_hash FROM space_heads WHERE space_id = ?1")?
            .query_row(params![space_id.as_bytes().to_vec()], |r| {
                Ok(SpaceHead {
                    seq: u64_col(r, 0)?,
                    audit_seq: u64_col(r, 1)?,
                    audit_hash: r.get(2)?,
                })
            })
            .optional()?;
        Ok(head.unwrap_or_else(|| SpaceHead {
            seq: 0,
            audit_seq: 0,
            audit_hash: GENESIS_HASH.to_string(),
        }))
    }

    fn set_space_head(&mut self, space_id: Uuid, head: &SpaceHead) -> StoreResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO space_heads(space_id, seq, audit_seq, audit_hash) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(space_id) DO UPDATE SET seq = excluded.seq, audit_seq = excluded.audit_seq,
                 audit_hash = excluded.audit_hash",
            )?
            .execute(params![
                space_id.as_bytes().to_vec(),
                i(head.seq),
                i(head.audit_seq),
                head.audit_hash
            ])?;
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
            crate::store::append_feed_changes(&blob, &mut bytes)?;
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
                 lww_stamps = ?7, updated_ms = ?8, window_day = ?9 WHERE doc_key = ?1",
            )?
            .execute(params![
                i(doc_key),
                i(u.version),
                i(seq),
                u.deleted,
                u.signed,
                u.locked,
                u.lww_stamps,
                i(now_ms),
                u.window_day
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

    fn append_feed(&mut self, r: &FeedRow) -> StoreResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO feed(space_id, seq, doc_key, entity_type, entity_id, version, origin_device, origin_user,
                 mutation_id, hlc, changes, lww_losses) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?
            .execute(params![
                r.space_id.as_bytes().to_vec(),
                i(r.seq),
                i(r.doc_key),
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
        Ok(())
    }

    fn max_seq(&self, space_id: Uuid) -> StoreResult<u64> {
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT MAX(seq) FROM feed WHERE space_id = ?1")?
            .query_row(params![space_id.as_bytes().to_vec()], |r| r.get(0))?;
        Ok(v.unwrap_or(0) as u64)
    }

    fn feed_range(&self, space_id: Uuid, after: u64, upto: u64, limit: usize) -> StoreResult<Vec<FeedRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {FEED_COLS} FROM feed WHERE space_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4"
        ))?;
        let rows = st.query_map(
            params![
                space_id.as_bytes().to_vec(),
                i(after),
                i(upto),
                limit.min(i64::MAX as usize) as i64
            ],
            feed_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn feed_for_document(&self, doc_key: u64, after_version: u64) -> StoreResult<Vec<FeedRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {FEED_COLS} FROM feed WHERE doc_key = ?1 AND version > ?2 ORDER BY seq"
        ))?;
        let rows = st.query_map(params![i(doc_key), i(after_version)], feed_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn documents_after(&self, space_id: Uuid, after_key: u64, limit: usize) -> StoreResult<Vec<DocumentRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {DOC_COLS} FROM documents WHERE space_id = ?1 AND doc_key > ?2 AND version > 0
             ORDER BY doc_key LIMIT ?3"
        ))?;
        let rows = st.query_map(
            params![
                space_id.as_bytes().to_vec(),
                i(after_key),
                limit.min(i64::MAX as usize) as i64
            ],
            doc_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn seq_at_legacy(&self, space_id: Uuid, legacy_seq: u64) -> StoreResult<u64> {
        let v: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT MAX(seq) FROM feed WHERE space_id = ?1 AND legacy_seq IS NOT NULL AND legacy_seq <= ?2",
            )?
            .query_row(params![space_id.as_bytes().to_vec(), i(legacy_seq)], |r| r.get(0))?;
        Ok(v.unwrap_or(0) as u64)
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

    fn put_duplicate_key(&mut self, r: &DuplicateKeyRow) -> StoreResult<()> {
        let id = r.entity_id.as_bytes().to_vec();
        match &r.key {
            Some(key) => self
                .conn
                .prepare_cached(
                    "INSERT INTO duplicate_keys(entity_id, space_id, entity_type, dup_key, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(entity_id) DO UPDATE SET dup_key = excluded.dup_key, at_ms = excluded.at_ms",
                )?
                .execute(params![id, r.space_id.as_bytes().to_vec(), r.entity_type, key, r.at_ms])?,
            None => self
                .conn
                .prepare_cached("DELETE FROM duplicate_keys WHERE entity_id = ?1")?
                .execute(params![id])?,
        };
        Ok(())
    }

    fn duplicate_candidates(
        &self,
        space_id: Uuid,
        entity_type: &str,
        key: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<Uuid>> {
        let mut st = self.conn.prepare_cached(
            "SELECT entity_id FROM duplicate_keys WHERE space_id = ?1 AND entity_type = ?2 AND dup_key = ?3
             AND at_ms BETWEEN ?4 AND ?5 ORDER BY at_ms, entity_id LIMIT 16",
        )?;
        let rows = st.query_map(
            params![space_id.as_bytes().to_vec(), entity_type, key, from_ms, to_ms],
            |r| uuid_col(r, 0),
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    fn append_audit(&mut self, a: &AuditRow) -> StoreResult<u64> {
        self.conn
            .prepare_cached(
                "INSERT INTO audit(space_id, audit_seq, seq, mutation_id, actor_id, device_id, entity_type, entity_id,
                 kind, version, before_json, after_json, client_ts, server_ts_ms, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                a.space_id.as_bytes().to_vec(),
                i(a.audit_seq),
                i(a.seq),
                a.mutation_id.as_bytes().to_vec(),
                a.actor_id.as_bytes().to_vec(),
                a.device_id.as_bytes().to_vec(),
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

    fn audit_after(&self, space_id: Uuid, after: u64, limit: usize) -> StoreResult<Vec<AuditRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {AUDIT_COLS} FROM audit WHERE space_id = ?1 AND audit_seq > ?2 ORDER BY audit_seq LIMIT ?3"
        ))?;
        let rows = st.query_map(
            params![
                space_id.as_bytes().to_vec(),
                i(after),
                limit.min(i64::MAX as usize) as i64
            ],
            audit_row,
        )?;
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

    fn spaces_held(&self) -> StoreResult<Vec<Uuid>> {
        let mut st = self.conn.prepare_cached(
            "SELECT space_id FROM space_heads UNION SELECT DISTINCT space_id FROM documents ORDER BY 1",
        )?;
        let rows = st.query_map([], |r| uuid_col(r, 0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn take_commit_times(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.commit_times)
    }

    fn counts(&self) -> StoreResult<ShardCounts> {
        let count = |table: &str| -> StoreResult<u64> {
            let n: i64 = self
                .conn
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
            Ok(n as u64)
        };
        Ok(ShardCounts {
            documents: count("documents")?,
            feed: count("feed")?,
            receipts: count("receipts")?,
            audit: count("audit")?,
            archive: count("conflict_archive")?,
        })
    }
}
