//! The spaces' data on PostgreSQL: documents, feeds, receipts, audit chains and the conflict
//! archive, for every shard (a shard here is only which worker applies a space).

use std::cell::Cell;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::columns::{
    ARCHIVE_COLS, AUDIT_COLS, DOC_COLS, FEED_COLS, archive_row, audit_row, col, doc_row, feed_row, i, rows, u64_col,
};
use super::{Conn, is_unique_violation};
use crate::audit::GENESIS_HASH;
use crate::store::{
    ArchiveRow, AuditRow, DocumentRow, DocumentUpdate, DuplicateKeyRow, FeedRow, ReceiptRow, ShardCounts, SpaceHead,
    SpaceStore, StoreError, StoreResult,
};

pub struct PgShard {
    pub(super) conn: Conn,
    /// The shard this handle applies: one database holds every shard, so what is counted or
    /// listed per shard (counts, spaces held, the archive) is filtered to its spaces.
    shard: i32,
    /// Inside a writing transaction: `space_head` then locks the space's row.
    writing: Cell<bool>,
    /// How long each `COMMIT` took since the server last asked (metrics; never read by the core).
    commit_times: Vec<Duration>,
    /// Reconnects the server has been told of (metrics).
    reconnects_reported: u64,
}

impl PgShard {
    pub(super) fn new(client: postgres::Client, url: &str, shard: u32) -> Self {
        PgShard {
            conn: Conn::new(client, url),
            shard: i32::try_from(shard).unwrap_or(i32::MAX),
            writing: Cell::new(false),
            commit_times: Vec::new(),
            reconnects_reported: 0,
        }
    }

    fn limit(limit: usize) -> i64 {
        i64::try_from(limit).unwrap_or(i64::MAX)
    }
}

impl SpaceStore for PgShard {
    fn begin(&mut self) -> StoreResult<()> {
        self.conn.begin("BEGIN")?;
        self.writing.set(true);
        Ok(())
    }

    fn commit(&mut self) -> StoreResult<()> {
        let started = Instant::now();
        self.writing.set(false);
        self.conn.finish("COMMIT")?;
        if self.commit_times.len() < 1024 {
            self.commit_times.push(started.elapsed());
        }
        Ok(())
    }

    fn rollback(&mut self) -> StoreResult<()> {
        self.writing.set(false);
        self.conn.finish("ROLLBACK")
    }

    fn begin_read(&mut self) -> StoreResult<()> {
        // One snapshot for the whole run of reads, as SQLite's read transaction gives.
        self.conn.begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    }

    fn end_read(&mut self) -> StoreResult<()> {
        self.conn.finish("COMMIT")
    }

    fn space_head(&self, space_id: Uuid) -> StoreResult<SpaceHead> {
        let row = if self.writing.get() {
            // The head the next mutation builds on: lock it until this transaction ends, so
            // another relay's worker writing the same space waits for this commit and then
            // reads the head it left. A new space gets its row first (there is nothing to lock).
            self.conn.try_with(|c| {
                c.execute(
                    "INSERT INTO space_heads(space_id, seq, audit_seq, audit_hash) VALUES ($1, 0, 0, $2)
                     ON CONFLICT (space_id) DO NOTHING",
                    &[&space_id, &GENESIS_HASH],
                )?;
                Ok(c.query_opt(
                    "SELECT seq, audit_seq, audit_hash FROM space_heads WHERE space_id = $1 FOR UPDATE",
                    &[&space_id],
                )?)
            })?
        } else {
            self.conn.with(|c| {
                c.query_opt(
                    "SELECT seq, audit_seq, audit_hash FROM space_heads WHERE space_id = $1",
                    &[&space_id],
                )
            })?
        };
        match row {
            Some(r) => Ok(SpaceHead {
                seq: u64_col(&r, 0)?,
                audit_seq: u64_col(&r, 1)?,
                audit_hash: col(&r, 2)?,
            }),
            None => Ok(SpaceHead {
                seq: 0,
                audit_seq: 0,
                audit_hash: GENESIS_HASH.to_string(),
            }),
        }
    }

    fn set_space_head(&mut self, space_id: Uuid, head: &SpaceHead) -> StoreResult<()> {
        self.conn.with(|c| {
            c.execute(
                "INSERT INTO space_heads(space_id, seq, audit_seq, audit_hash) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (space_id) DO UPDATE SET seq = excluded.seq, audit_seq = excluded.audit_seq,
                 audit_hash = excluded.audit_hash",
                &[&space_id, &i(head.seq), &i(head.audit_seq), &head.audit_hash],
            )?;
            // Delivered to every listening relay when (and only if) this transaction commits:
            // the space, and the database's clock now (Unix ms) for the listeners' lag metric.
            c.execute(
                "SELECT pg_notify($1, $2 || ' ' || floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)",
                &[&super::COMMIT_CHANNEL, &space_id.to_string()],
            )
        })?;
        Ok(())
    }

    fn document(&self, entity_id: Uuid) -> StoreResult<Option<DocumentRow>> {
        self.conn.try_with(|c| {
            c.query_opt(
                &format!("SELECT {DOC_COLS} FROM documents WHERE entity_id = $1"),
                &[&entity_id],
            )?
            .as_ref()
            .map(doc_row)
            .transpose()
        })
    }

    fn document_bytes(&self, doc_key: u64) -> StoreResult<Vec<u8>> {
        self.conn.try_with(|c| {
            let row = c
                .query_opt(
                    "SELECT snapshot, snapshot_seq FROM documents WHERE doc_key = $1",
                    &[&i(doc_key)],
                )?
                .ok_or_else(|| StoreError::NotFound(format!("document {doc_key}")))?;
            let mut bytes: Vec<u8> = col(&row, 0)?;
            let snapshot_seq: i64 = col(&row, 1)?;
            for change in c.query(
                "SELECT changes FROM feed WHERE doc_key = $1 AND seq > $2 ORDER BY seq",
                &[&i(doc_key), &snapshot_seq],
            )? {
                let blob: Vec<u8> = col(&change, 0)?;
                crate::store::append_feed_changes(&blob, &mut bytes)?;
            }
            Ok(bytes)
        })
    }

    fn insert_document(&mut self, entity_id: Uuid, space_id: Uuid, entity_type: &str, now_ms: u64) -> StoreResult<u64> {
        let row = self.conn.with(|c| {
            c.query_one(
                "INSERT INTO documents(entity_id, space_id, entity_type, version, last_seq, created_ms, updated_ms)
                 VALUES ($1, $2, $3, 0, 0, $4, $4) RETURNING doc_key",
                &[&entity_id, &space_id, &entity_type, &i(now_ms)],
            )
        })?;
        u64_col(&row, 0)
    }

    fn update_document(&mut self, doc_key: u64, u: &DocumentUpdate, seq: u64, now_ms: u64) -> StoreResult<()> {
        self.conn.with(|c| {
            c.execute(
                "UPDATE documents SET version = $2, last_seq = $3, deleted = $4, signed = $5, locked = $6,
                 lww_stamps = $7, updated_ms = $8, window_day = $9 WHERE doc_key = $1",
                &[
                    &i(doc_key),
                    &i(u.version),
                    &i(seq),
                    &u.deleted,
                    &u.signed,
                    &u.locked,
                    &u.lww_stamps,
                    &i(now_ms),
                    &u.window_day,
                ],
            )
        })?;
        Ok(())
    }

    fn save_snapshot(&mut self, doc_key: u64, bytes: &[u8], upto_seq: u64) -> StoreResult<()> {
        self.conn.with(|c| {
            c.execute(
                "UPDATE documents SET snapshot = $2, snapshot_seq = $3 WHERE doc_key = $1",
                &[&i(doc_key), &bytes, &i(upto_seq)],
            )
        })?;
        Ok(())
    }

    fn changes_since_snapshot(&self, doc_key: u64) -> StoreResult<u64> {
        let row = self.conn.with(|c| {
            c.query_one(
                "SELECT COUNT(*) FROM feed WHERE doc_key = $1
                 AND seq > (SELECT snapshot_seq FROM documents WHERE doc_key = $1)",
                &[&i(doc_key)],
            )
        })?;
        u64_col(&row, 0)
    }

    fn append_feed(&mut self, r: &FeedRow) -> StoreResult<()> {
        self.conn.with(|c| {
            c.execute(
                "INSERT INTO feed(space_id, seq, doc_key, entity_type, entity_id, version, origin_device, origin_user,
                 mutation_id, hlc, changes, lww_losses) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[
                    &r.space_id,
                    &i(r.seq),
                    &i(r.doc_key),
                    &r.entity_type,
                    &r.entity_id,
                    &i(r.version),
                    &r.origin_device,
                    &r.origin_user,
                    &r.mutation_id,
                    &r.hlc.to_string(),
                    &r.changes,
                    &r.lww_losses,
                ],
            )
        })?;
        Ok(())
    }

    fn max_seq(&self, space_id: Uuid) -> StoreResult<u64> {
        let row = self
            .conn
            .with(|c| c.query_one("SELECT MAX(seq) FROM feed WHERE space_id = $1", &[&space_id]))?;
        Ok(col::<Option<i64>>(&row, 0)?.unwrap_or(0).max(0) as u64)
    }

    fn feed_range(&self, space_id: Uuid, after: u64, upto: u64, limit: usize) -> StoreResult<Vec<FeedRow>> {
        let found = self.conn.with(|c| {
            c.query(
                &format!(
                    "SELECT {FEED_COLS} FROM feed WHERE space_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
                ),
                &[&space_id, &i(after), &i(upto), &Self::limit(limit)],
            )
        })?;
        rows(found, feed_row)
    }

    fn feed_for_document(&self, doc_key: u64, after_version: u64) -> StoreResult<Vec<FeedRow>> {
        let found = self.conn.with(|c| {
            c.query(
                &format!("SELECT {FEED_COLS} FROM feed WHERE doc_key = $1 AND version > $2 ORDER BY seq"),
                &[&i(doc_key), &i(after_version)],
            )
        })?;
        rows(found, feed_row)
    }

    fn documents_after(&self, space_id: Uuid, after_key: u64, limit: usize) -> StoreResult<Vec<DocumentRow>> {
        let found = self.conn.with(|c| {
            c.query(
                &format!(
                    "SELECT {DOC_COLS} FROM documents WHERE space_id = $1 AND doc_key > $2 AND version > 0
                     ORDER BY doc_key LIMIT $3"
                ),
                &[&space_id, &i(after_key), &Self::limit(limit)],
            )
        })?;
        rows(found, doc_row)
    }

    fn seq_at_legacy(&self, _space_id: Uuid, _legacy_seq: u64) -> StoreResult<u64> {
        // Round-1 cursors point into a SQLite relay's global feed; a PostgreSQL store never had
        // one, so such a cursor starts the space from its beginning.
        Ok(0)
    }

    fn receipt(&self, mutation_id: Uuid) -> StoreResult<Option<ReceiptRow>> {
        self.conn.try_with(|c| {
            let Some(r) = c.query_opt(
                "SELECT mutation_id, device_id, entity_id, space_id, envelope_hash, outcome, created_ms
                 FROM receipts WHERE mutation_id = $1",
                &[&mutation_id],
            )?
            else {
                return Ok(None);
            };
            let hash: Option<Vec<u8>> = col(&r, 4)?;
            Ok(Some(ReceiptRow {
                mutation_id: col(&r, 0)?,
                device_id: col(&r, 1)?,
                entity_id: col(&r, 2)?,
                space_id: col(&r, 3)?,
                // A hash of the wrong length can match nothing: it is kept as "different".
                envelope_hash: hash.map(|h| h.try_into().unwrap_or([0; 32])),
                outcome: col(&r, 5)?,
                created_ms: u64_col(&r, 6)?,
            }))
        })
    }

    fn put_duplicate_key(&mut self, r: &DuplicateKeyRow) -> StoreResult<()> {
        self.conn.with(|c| match &r.key {
            Some(key) => c.execute(
                "INSERT INTO duplicate_keys(entity_id, space_id, entity_type, dup_key, at_ms)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT(entity_id) DO UPDATE SET dup_key = excluded.dup_key, at_ms = excluded.at_ms",
                &[&r.entity_id, &r.space_id, &r.entity_type, key, &r.at_ms],
            ),
            None => c.execute("DELETE FROM duplicate_keys WHERE entity_id = $1", &[&r.entity_id]),
        })?;
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
        let found = self.conn.with(|c| {
            c.query(
                "SELECT entity_id FROM duplicate_keys WHERE space_id = $1 AND entity_type = $2 AND dup_key = $3
                 AND at_ms BETWEEN $4 AND $5 ORDER BY at_ms, entity_id LIMIT 16",
                &[&space_id, &entity_type, &key, &from_ms, &to_ms],
            )
        })?;
        Ok(found.iter().map(|row| row.get::<_, Uuid>(0)).collect())
    }

    fn put_receipt(&mut self, r: &ReceiptRow) -> StoreResult<()> {
        let envelope_hash = r.envelope_hash.map(|h| h.to_vec());
        let result = self.conn.raw(|c| {
            c.execute(
                "INSERT INTO receipts(mutation_id, device_id, entity_id, space_id, envelope_hash, outcome, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &r.mutation_id,
                    &r.device_id,
                    &r.entity_id,
                    &r.space_id,
                    &envelope_hash,
                    &r.outcome,
                    &i(r.created_ms),
                ],
            )
        });
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "mutation {} was already decided (by another relay of the cluster)",
                r.mutation_id
            ))),
            Err(e) => Err(e.into()),
        }
    }

    fn append_audit(&mut self, a: &AuditRow) -> StoreResult<u64> {
        let row = self.conn.with(|c| {
            c.query_one(
                "INSERT INTO audit(space_id, audit_seq, seq, mutation_id, actor_id, device_id, entity_type, entity_id,
                 kind, version, before_json, after_json, client_ts, server_ts_ms, prev_hash, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) RETURNING audit_id",
                &[
                    &a.space_id,
                    &i(a.audit_seq),
                    &i(a.seq),
                    &a.mutation_id,
                    &a.actor_id,
                    &a.device_id,
                    &a.entity_type,
                    &a.entity_id,
                    &a.kind,
                    &i(a.version),
                    &a.before_json,
                    &a.after_json,
                    &a.client_ts,
                    &i(a.server_ts_ms),
                    &a.prev_hash,
                    &a.hash,
                ],
            )
        })?;
        u64_col(&row, 0)
    }

    fn audit_after(&self, space_id: Uuid, after: u64, limit: usize) -> StoreResult<Vec<AuditRow>> {
        let found = self.conn.with(|c| {
            c.query(
                &format!(
                    "SELECT {AUDIT_COLS} FROM audit WHERE space_id = $1 AND audit_seq > $2 ORDER BY audit_seq LIMIT $3"
                ),
                &[&space_id, &i(after), &Self::limit(limit)],
            )
        })?;
        rows(found, audit_row)
    }

    fn archive(&mut self, a: &ArchiveRow) -> StoreResult<u64> {
        let row = self.conn.with(|c| {
            c.query_one(
                "INSERT INTO conflict_archive(kind, space_id, entity_type, entity_id, field, losing_json, winning_json,
                 loser_device, loser_mutation, winner_device, winner_mutation, version, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING archive_id",
                &[
                    &a.kind,
                    &a.space_id,
                    &a.entity_type,
                    &a.entity_id,
                    &a.field,
                    &a.losing_json,
                    &a.winning_json,
                    &a.loser_device,
                    &a.loser_mutation,
                    &a.winner_device,
                    &a.winner_mutation,
                    &i(a.version),
                    &i(a.created_ms),
                ],
            )
        })?;
        u64_col(&row, 0)
    }

    fn archive_rows(&self, limit: usize) -> StoreResult<Vec<ArchiveRow>> {
        let found = self.conn.with(|c| {
            c.query(
                &format!(
                    "SELECT {ARCHIVE_COLS} FROM conflict_archive
                     WHERE space_id IN (SELECT space_id FROM spaces WHERE shard = $2)
                     ORDER BY archive_id DESC LIMIT $1"
                ),
                &[&Self::limit(limit), &self.shard],
            )
        })?;
        rows(found, archive_row)
    }

    fn spaces_held(&self) -> StoreResult<Vec<Uuid>> {
        let found = self.conn.with(|c| {
            c.query(
                "SELECT space_id FROM spaces WHERE shard = $1 AND (
                     space_id IN (SELECT space_id FROM space_heads) OR space_id IN (SELECT space_id FROM documents)
                 ) ORDER BY 1",
                &[&self.shard],
            )
        })?;
        rows(found, |r| col(r, 0))
    }

    fn take_reconnects(&mut self) -> u64 {
        let total = self.conn.reconnects.get();
        let new = total.saturating_sub(self.reconnects_reported);
        self.reconnects_reported = total;
        new
    }

    fn take_commit_times(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.commit_times)
    }

    fn counts(&self) -> StoreResult<ShardCounts> {
        let row = self.conn.with(|c| {
            c.query_one(
                "WITH mine AS (SELECT space_id FROM spaces WHERE shard = $1)
                 SELECT (SELECT COUNT(*) FROM documents WHERE space_id IN (SELECT space_id FROM mine)),
                        (SELECT COUNT(*) FROM feed WHERE space_id IN (SELECT space_id FROM mine)),
                        (SELECT COUNT(*) FROM receipts WHERE space_id IN (SELECT space_id FROM mine)
                            OR ($1 = 0 AND (space_id IS NULL OR space_id NOT IN (SELECT space_id FROM spaces)))),
                        (SELECT COUNT(*) FROM audit WHERE space_id IN (SELECT space_id FROM mine)),
                        (SELECT COUNT(*) FROM conflict_archive WHERE space_id IN (SELECT space_id FROM mine))",
                &[&self.shard],
            )
        })?;
        Ok(ShardCounts {
            documents: u64_col(&row, 0)?,
            feed: u64_col(&row, 1)?,
            receipts: u64_col(&row, 2)?,
            audit: u64_col(&row, 3)?,
            archive: u64_col(&row, 4)?,
        })
    }
}
