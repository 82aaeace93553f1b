//! Rows of the PostgreSQL store: the functions that map a row to its struct, one each (the
//! column lists are the SQLite store's, so both read the same shape).

use fieldsync_schema::{Hlc, Role};
use postgres::Row;
use postgres::types::FromSql;
use uuid::Uuid;

use crate::store::{
    ArchiveRow, AuditRow, DeviceRow, DocumentRow, FeedRow, SpaceRow, StoreError, StoreResult, TokenRow, UserRow,
};

pub(super) const SPACE_COLS: &str = "space_id, name, created_ms, shard";
pub(super) const USER_COLS: &str = "user_id, name, created_ms";
pub(super) const DOC_COLS: &str =
    "doc_key, entity_id, space_id, entity_type, version, last_seq, deleted, signed, locked, lww_stamps, window_day";
pub(super) const FEED_COLS: &str = "seq, doc_key, space_id, entity_type, entity_id, version, origin_device, \
                                    origin_user, mutation_id, hlc, changes, lww_losses";
pub(super) const AUDIT_COLS: &str = "audit_id, audit_seq, seq, mutation_id, actor_id, device_id, space_id, \
                                     entity_type, entity_id, kind, version, before_json, after_json, client_ts, \
                                     server_ts_ms, prev_hash, hash";
pub(super) const DEVICE_COLS: &str = "device_id, user_id, public_key, enrolled_ms, revoked_ms, last_seen_ms, label, wipe_requested_ms, wiped_ms, wipe_discarded, replaces";
pub(super) const TOKEN_COLS: &str = "token_hash, user_id, created_ms, expires_ms, used_ms, used_by, label";
pub(super) const ARCHIVE_COLS: &str = "archive_id, kind, space_id, entity_type, entity_id, field, losing_json, \
                                       winning_json, loser_device, loser_mutation, winner_device, winner_mutation, \
                                       version, created_ms";

/// A column of the expected type, or a `Corrupt` error naming it.
pub(super) fn col<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> StoreResult<T> {
    row.try_get(idx).map_err(|e| {
        StoreError::Corrupt(format!(
            "column {}: {e}",
            row.columns().get(idx).map_or("?", |c| c.name())
        ))
    })
}

/// BIGINT columns hold u64 values below 2^63 (`i` saturates on the way in).
pub(super) fn u64_col(row: &Row, idx: usize) -> StoreResult<u64> {
    Ok(col::<i64>(row, idx)?.max(0) as u64)
}

pub(super) fn opt_u64_col(row: &Row, idx: usize) -> StoreResult<Option<u64>> {
    Ok(col::<Option<i64>>(row, idx)?.map(|v| v.max(0) as u64))
}

/// A u64 as a BIGINT; saturating, so `u64::MAX` ("no upper bound") stays the largest value.
pub(super) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn hlc_col(row: &Row, idx: usize) -> StoreResult<Hlc> {
    let s: String = col(row, idx)?;
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("stored HLC `{s}`: {e}")))
}

pub(super) fn role_col(row: &Row, idx: usize) -> StoreResult<Role> {
    let s: String = col(row, idx)?;
    s.parse::<Role>()
        .map_err(|e| StoreError::Corrupt(format!("stored role `{s}`: {e}")))
}

pub(super) fn space_row(r: &Row) -> StoreResult<SpaceRow> {
    Ok(SpaceRow {
        space_id: col(r, 0)?,
        name: col(r, 1)?,
        created_ms: u64_col(r, 2)?,
        shard: col::<i32>(r, 3)?.max(0) as u32,
    })
}

pub(super) fn user_row(r: &Row) -> StoreResult<UserRow> {
    Ok(UserRow {
        user_id: col(r, 0)?,
        name: col(r, 1)?,
        created_ms: u64_col(r, 2)?,
    })
}

pub(super) fn doc_row(r: &Row) -> StoreResult<DocumentRow> {
    Ok(DocumentRow {
        doc_key: u64_col(r, 0)?,
        entity_id: col(r, 1)?,
        space_id: col(r, 2)?,
        entity_type: col(r, 3)?,
        version: u64_col(r, 4)?,
        last_seq: u64_col(r, 5)?,
        deleted: col(r, 6)?,
        signed: col(r, 7)?,
        locked: col(r, 8)?,
        lww_stamps: col(r, 9)?,
        window_day: col(r, 10)?,
    })
}

pub(super) fn feed_row(r: &Row) -> StoreResult<FeedRow> {
    Ok(FeedRow {
        seq: u64_col(r, 0)?,
        doc_key: u64_col(r, 1)?,
        space_id: col(r, 2)?,
        entity_type: col(r, 3)?,
        entity_id: col(r, 4)?,
        version: u64_col(r, 5)?,
        origin_device: col(r, 6)?,
        origin_user: col(r, 7)?,
        mutation_id: col(r, 8)?,
        hlc: hlc_col(r, 9)?,
        changes: col(r, 10)?,
        lww_losses: col(r, 11)?,
    })
}

pub(super) fn audit_row(r: &Row) -> StoreResult<AuditRow> {
    Ok(AuditRow {
        audit_id: u64_col(r, 0)?,
        audit_seq: u64_col(r, 1)?,
        seq: u64_col(r, 2)?,
        mutation_id: col(r, 3)?,
        actor_id: col(r, 4)?,
        device_id: col(r, 5)?,
        space_id: col(r, 6)?,
        entity_type: col(r, 7)?,
        entity_id: col(r, 8)?,
        kind: col(r, 9)?,
        version: u64_col(r, 10)?,
        before_json: col(r, 11)?,
        after_json: col(r, 12)?,
        client_ts: col(r, 13)?,
        server_ts_ms: u64_col(r, 14)?,
        prev_hash: col(r, 15)?,
        hash: col(r, 16)?,
    })
}

pub(super) fn device_row(r: &Row) -> StoreResult<DeviceRow> {
    Ok(DeviceRow {
        device_id: col(r, 0)?,
        user_id: col(r, 1)?,
        public_key: col(r, 2)?,
        enrolled_ms: u64_col(r, 3)?,
        revoked_ms: opt_u64_col(r, 4)?,
        last_seen_ms: opt_u64_col(r, 5)?,
        label: col(r, 6)?,
        wipe_requested_ms: opt_u64_col(r, 7)?,
        wiped_ms: opt_u64_col(r, 8)?,
        wipe_discarded: opt_u64_col(r, 9)?,
        replaces: col(r, 10)?,
    })
}

pub(super) fn token_row(r: &Row) -> StoreResult<TokenRow> {
    let hash: Vec<u8> = col(r, 0)?;
    let token_hash: [u8; 32] = hash
        .try_into()
        .map_err(|_| StoreError::Corrupt("token hash is not 32 bytes".into()))?;
    Ok(TokenRow {
        token_hash,
        user_id: col(r, 1)?,
        created_ms: u64_col(r, 2)?,
        expires_ms: u64_col(r, 3)?,
        used_ms: opt_u64_col(r, 4)?,
        used_by: col::<Option<Uuid>>(r, 5)?,
        label: col(r, 6)?,
    })
}

pub(super) fn archive_row(r: &Row) -> StoreResult<ArchiveRow> {
    Ok(ArchiveRow {
        archive_id: u64_col(r, 0)?,
        kind: col(r, 1)?,
        space_id: col(r, 2)?,
        entity_type: col(r, 3)?,
        entity_id: col(r, 4)?,
        field: col(r, 5)?,
        losing_json: col(r, 6)?,
        winning_json: col(r, 7)?,
        loser_device: col(r, 8)?,
        loser_mutation: col(r, 9)?,
        winner_device: col(r, 10)?,
        winner_mutation: col(r, 11)?,
        version: u64_col(r, 12)?,
        created_ms: u64_col(r, 13)?,
    })
}

/// Every row through `map`, stopping at the first that does not read.
pub(super) fn rows<T>(rows: Vec<Row>, map: fn(&Row) -> StoreResult<T>) -> StoreResult<Vec<T>> {
    rows.iter().map(map).collect()
}
