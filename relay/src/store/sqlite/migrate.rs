//! Preparing a data directory: creating the layout on first open, and migrating a round-1
//! directory (one `relay.db`, one global feed and audit chain) to the per-space layout
//! (directory + shards, a feed and an audit chain per space).
//!
//! The migration is crash-safe by construction: the shards are written and committed first;
//! only then does one directory transaction record `layout = 2` and drop the round-1 tables it
//! copied. A crash before that commit leaves `relay.db` as it was, and the next open deletes the
//! half-written shards and starts again. The round-1 audit chain is verified before anything is
//! copied (a doctored file is refused, never blessed), kept as `v1_audit` (never updated or
//! deleted, verified by `audit verify`), and each space's records continue as that space's
//! new chain.

use std::collections::BTreeMap;
use std::path::Path;

use fieldsync_schema::sqlite_key::DatabaseKey;
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::columns::{audit_row, uuid_col};
use super::directory::SqliteDirectory;
use super::shard::SqliteShard;
use super::{LAYOUT, Migrate, SHARDS_DIR, meta_u64, set_meta_u64, shard_path};
use crate::audit::{GENESIS_HASH, record_hash, record_hash_round_one};
use crate::store::{AuditRow, SpaceHead, SpaceStore, StoreError, StoreResult};

fn has_table(conn: &Connection, table: &str) -> StoreResult<bool> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

fn has_column(conn: &Connection, table: &str, column: &str) -> StoreResult<bool> {
    let mut st = conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?;
    Ok(st.exists([column])?)
}

/// Makes `dir` a current store: creates it, or migrates a round-1 one. Returns the relay id
/// and the shard count.
pub(super) fn prepare(
    conn: &Connection,
    dir: &Path,
    new_relay_id: Uuid,
    new_shards: u32,
    migrate: Migrate,
    key: Option<&DatabaseKey>,
) -> StoreResult<(Uuid, u32)> {
    SqliteDirectory::create_tables(conn)?;
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES ('relay_id', ?1)",
        params![new_relay_id.as_bytes().to_vec()],
    )?;
    let id: Vec<u8> = conn.query_row("SELECT value FROM meta WHERE key = 'relay_id'", [], |r| r.get(0))?;
    let relay_id = Uuid::from_slice(&id).map_err(|e| StoreError::Corrupt(format!("relay id: {e}")))?;
    match meta_u64(conn, "layout")? {
        Some(LAYOUT) => {}
        Some(newer) if newer > LAYOUT => {
            return Err(StoreError::Corrupt(format!(
                "this relay store has layout {newer}, newer than this build understands ({LAYOUT}); \
                 run a newer fieldsync-relay"
            )));
        }
        _ if has_table(conn, "feed")? => {
            if migrate == Migrate::No {
                return Err(StoreError::Corrupt(format!(
                    "{} holds a round-1 relay store; start `fieldsync-relay serve --data {}` once to migrate it",
                    dir.display(),
                    dir.display()
                )));
            }
            migrate_round_one(conn, dir, new_shards, key)?
        }
        _ => {
            // A new store. Shard files without a directory are someone's data (a half-finished
            // restore, a directory deleted by hand): adopting them would serve rows no directory
            // row describes.
            if let Some(stray) = stray_shard_file(dir)? {
                return Err(StoreError::Corrupt(format!(
                    "{} exists but {} is new: shard files without their directory; move them away or \
                     restore the whole data directory",
                    stray.display(),
                    dir.join(super::DB_FILE).display()
                )));
            }
            conn.execute_batch("BEGIN IMMEDIATE")?;
            set_meta_u64(conn, "shards", u64::from(new_shards))?;
            set_meta_u64(conn, "layout", LAYOUT)?;
            conn.execute_batch("COMMIT")?;
        }
    }
    let shards = meta_u64(conn, "shards")?.unwrap_or(u64::from(new_shards)) as u32;
    for n in 0..shards {
        SqliteShard::open(&shard_path(dir, n), key)?;
    }
    Ok((relay_id, shards))
}

/// A shard file already in `DIR/shards`, if any.
fn stray_shard_file(dir: &Path) -> StoreResult<Option<std::path::PathBuf>> {
    let shards = dir.join(SHARDS_DIR);
    if !shards.is_dir() {
        return Ok(None);
    }
    for entry in std::fs::read_dir(&shards)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("shard-") && name.ends_with(".db") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The round-1 tables that hold space data (copied into the shards, then dropped), in an order
/// that drops a referencing table before the one it references (`feed.doc_key` references
/// `documents`; with foreign keys on, dropping `documents` first fails).
const ROUND_ONE_DATA: [&str; 4] = ["feed", "receipts", "conflict_archive", "documents"];

fn migrate_round_one(conn: &Connection, dir: &Path, shards: u32, key: Option<&DatabaseKey>) -> StoreResult<()> {
    tracing::info!(dir = %dir.display(), shards, "migrating a round-1 relay store to per-space order");
    bind_receipts(conn)?;
    let chain = verify_round_one_chain(conn)?;
    // Half-written shards of an interrupted attempt: the directory still says round 1.
    for n in 0..shards {
        let path = shard_path(dir, n);
        for suffix in ["", "-wal", "-shm"] {
            let p = path.with_file_name(format!(
                "{}{suffix}",
                path.file_name().and_then(|f| f.to_str()).unwrap_or_default()
            ));
            if p.exists() {
                std::fs::remove_file(&p)?;
            }
        }
    }
    if !has_column(conn, "spaces", "shard")? {
        conn.execute_batch("ALTER TABLE spaces ADD COLUMN shard INTEGER NOT NULL DEFAULT 0")?;
    }
    // Spread the spaces over the shards in a fixed order.
    let spaces: Vec<Uuid> = {
        let mut st = conn.prepare("SELECT space_id FROM spaces ORDER BY created_ms, space_id")?;
        let rows = st.query_map([], |r| uuid_col(r, 0))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut shard_of: BTreeMap<Uuid, u32> = BTreeMap::new();
    for (k, space) in spaces.iter().enumerate() {
        shard_of.insert(*space, k as u32 % shards);
    }
    let db = dir.join(super::DB_FILE);
    for n in 0..shards {
        let mine: Vec<Uuid> = shard_of.iter().filter(|(_, s)| **s == n).map(|(id, _)| *id).collect();
        let mut shard = SqliteShard::open(&shard_path(dir, n), key)?;
        copy_into_shard(&mut shard, &db, &mine, n == 0)?;
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    for (space, shard) in &shard_of {
        conn.execute(
            "UPDATE spaces SET shard = ?2 WHERE space_id = ?1",
            params![space.as_bytes().to_vec(), shard],
        )?;
    }
    for table in ROUND_ONE_DATA {
        conn.execute_batch(&format!("DROP TABLE IF EXISTS {table}"))?;
    }
    // The round-1 chain stays, immutable, beside the new per-space chains.
    conn.execute_batch(
        "DROP TRIGGER IF EXISTS audit_no_update; DROP TRIGGER IF EXISTS audit_no_delete;
         ALTER TABLE audit RENAME TO v1_audit;
         CREATE TRIGGER IF NOT EXISTS v1_audit_no_update BEFORE UPDATE ON v1_audit
         BEGIN SELECT RAISE(ABORT, 'audit records are immutable'); END;
         CREATE TRIGGER IF NOT EXISTS v1_audit_no_delete BEFORE DELETE ON v1_audit
         BEGIN SELECT RAISE(ABORT, 'audit records are immutable'); END;",
    )?;
    set_meta_u64(conn, "shards", u64::from(shards))?;
    set_meta_u64(conn, "layout", LAYOUT)?;
    set_meta_u64(conn, "migrated_v1_records", chain.records)?;
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('migrated_v1_head', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![chain.head.as_bytes().to_vec()],
    )?;
    conn.execute_batch("COMMIT")?;
    // The dropped tables' pages are free; give them back.
    conn.execute_batch("VACUUM")?;
    tracing::info!(records = chain.records, "round-1 relay store migrated");
    Ok(())
}

/// Receipts of round 1 gained the entity, space and envelope hash they answer (a receipt
/// replayed for a different envelope revealed another space's record). Old receipts of applied
/// mutations get their entity and space from the feed; their hash stays unknown.
fn bind_receipts(conn: &Connection) -> StoreResult<()> {
    if has_column(conn, "receipts", "envelope_hash")? {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         ALTER TABLE receipts ADD COLUMN entity_id BLOB;
         ALTER TABLE receipts ADD COLUMN space_id BLOB;
         ALTER TABLE receipts ADD COLUMN envelope_hash BLOB;
         UPDATE receipts SET entity_id = f.entity_id, space_id = f.space_id
             FROM feed f WHERE f.mutation_id = receipts.mutation_id;
         COMMIT;",
    )?;
    Ok(())
}

struct RoundOneChain {
    records: u64,
    head: String,
}

/// The round-1 audit chain, verified from genesis: a broken chain stops the migration.
fn verify_round_one_chain(conn: &Connection) -> StoreResult<RoundOneChain> {
    let mut st = conn.prepare(
        "SELECT audit_id, 0, seq, mutation_id, actor_id, device_id, space_id, entity_type, entity_id, kind, version,
         before_json, after_json, client_ts, server_ts_ms, prev_hash, hash FROM audit ORDER BY audit_id",
    )?;
    let mut rows = st.query([])?;
    let mut prev = GENESIS_HASH.to_string();
    let mut records = 0;
    while let Some(row) = rows.next()? {
        let r = audit_row(row)?;
        if r.prev_hash != prev || record_hash_round_one(&r) != r.hash {
            return Err(StoreError::Corrupt(format!(
                "the round-1 audit chain is broken at record {} (mutation {}); restore a verified backup \
                 before upgrading",
                r.audit_id, r.mutation_id
            )));
        }
        prev = r.hash;
        records += 1;
    }
    Ok(RoundOneChain { records, head: prev })
}

/// Copies the round-1 rows of `spaces` into `shard`: documents (same keys), feed rows
/// renumbered per space (keeping their global seq as `legacy_seq`), receipts, the archive, and
/// each space's audit records re-chained per space. Receipts that name no space (refusals
/// decided before receipts were bound) go to shard 0, where a retry of them is looked up last.
fn copy_into_shard(shard: &mut SqliteShard, db: &Path, spaces: &[Uuid], unbound_receipts: bool) -> StoreResult<()> {
    {
        let conn = &shard.conn;
        conn.execute("ATTACH DATABASE ?1 AS v1", [db.display().to_string()])?;
        // The feed goes in before the documents (their positions are computed from it):
        // foreign keys are checked at the commit.
        conn.execute_batch(
            "BEGIN IMMEDIATE; PRAGMA defer_foreign_keys = ON; CREATE TEMP TABLE mine(space_id BLOB PRIMARY KEY);",
        )?;
        for s in spaces {
            conn.execute("INSERT INTO temp.mine(space_id) VALUES (?1)", [s.as_bytes().to_vec()])?;
        }
    }
    shard.conn.execute_batch(
        "INSERT INTO feed(space_id, seq, doc_key, entity_type, entity_id, version, origin_device, origin_user,
             mutation_id, hlc, changes, lww_losses, legacy_seq)
         SELECT space_id, ROW_NUMBER() OVER (PARTITION BY space_id ORDER BY seq), doc_key, entity_type, entity_id,
             version, origin_device, origin_user, mutation_id, hlc, changes, lww_losses, seq
         FROM v1.feed WHERE space_id IN (SELECT space_id FROM temp.mine);
         INSERT INTO documents(doc_key, entity_id, space_id, entity_type, version, last_seq, deleted, signed, locked,
             lww_stamps, snapshot, snapshot_seq, created_ms, updated_ms)
         SELECT d.doc_key, d.entity_id, d.space_id, d.entity_type, d.version,
             COALESCE((SELECT MAX(f.seq) FROM feed f WHERE f.space_id = d.space_id AND f.legacy_seq <= d.last_seq), 0),
             d.deleted, d.signed, d.locked, d.lww_stamps, d.snapshot,
             COALESCE((SELECT MAX(f.seq) FROM feed f WHERE f.space_id = d.space_id AND f.legacy_seq <= d.snapshot_seq), 0),
             d.created_ms, d.updated_ms
         FROM v1.documents d WHERE d.space_id IN (SELECT space_id FROM temp.mine);
         INSERT INTO conflict_archive(kind, space_id, entity_type, entity_id, field, losing_json, winning_json,
             loser_device, loser_mutation, winner_device, winner_mutation, version, created_ms)
         SELECT kind, space_id, entity_type, entity_id, field, losing_json, winning_json, loser_device,
             loser_mutation, winner_device, winner_mutation, version, created_ms
         FROM v1.conflict_archive WHERE space_id IN (SELECT space_id FROM temp.mine) ORDER BY archive_id;
         INSERT INTO receipts(mutation_id, device_id, outcome, created_ms, entity_id, space_id, envelope_hash)
         SELECT mutation_id, device_id, outcome, created_ms, entity_id, space_id, envelope_hash
         FROM v1.receipts WHERE space_id IN (SELECT space_id FROM temp.mine);",
    )?;
    if unbound_receipts {
        shard.conn.execute_batch(
            "INSERT OR IGNORE INTO receipts(mutation_id, device_id, outcome, created_ms, entity_id, space_id,
                 envelope_hash)
             SELECT mutation_id, device_id, outcome, created_ms, entity_id, space_id, envelope_hash
             FROM v1.receipts WHERE space_id IS NULL;",
        )?;
    }
    // Each space's audit records, in their round-1 order, chained anew per space.
    for space in spaces {
        let old: Vec<AuditRow> = {
            let mut st = shard.conn.prepare(
                "SELECT a.audit_id, 0, COALESCE(f.seq, 0), a.mutation_id, a.actor_id, a.device_id, a.space_id,
                 a.entity_type, a.entity_id, a.kind, a.version, a.before_json, a.after_json, a.client_ts,
                 a.server_ts_ms, a.prev_hash, a.hash
                 FROM v1.audit a LEFT JOIN feed f ON f.space_id = a.space_id AND f.legacy_seq = a.seq
                 WHERE a.space_id = ?1 ORDER BY a.audit_id",
            )?;
            let rows = st.query_map([space.as_bytes().to_vec()], audit_row)?;
            rows.collect::<Result<_, _>>()?
        };
        let mut prev = GENESIS_HASH.to_string();
        let mut audit_seq = 0;
        for mut row in old {
            audit_seq += 1;
            row.audit_seq = audit_seq;
            row.prev_hash = prev;
            row.hash = record_hash(&row);
            prev = row.hash.clone();
            shard.append_audit(&row)?;
        }
        let seq: Option<i64> = shard
            .conn
            .query_row(
                "SELECT MAX(seq) FROM feed WHERE space_id = ?1",
                [space.as_bytes().to_vec()],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        shard.set_space_head(
            *space,
            &SpaceHead {
                seq: seq.unwrap_or(0) as u64,
                audit_seq,
                audit_hash: prev,
            },
        )?;
    }
    shard
        .conn
        .execute_batch("DROP TABLE temp.mine; COMMIT; DETACH DATABASE v1;")?;
    Ok(())
}
