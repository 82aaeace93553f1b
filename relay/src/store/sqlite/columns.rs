//! Rows of the SQLite store: column lists and the functions that map a row to its struct, one
//! each, shared by the directory, the shards and the operator queries.

use fieldsync_schema::{Hlc, Role};
use rusqlite::Row;
use uuid::Uuid;

use crate::store::{ArchiveRow, AuditRow, DeviceRow, DocumentRow, FeedRow, SpaceRow, TokenRow, UserRow};

pub(super) const SPACE_COLS: &str = "space_id, name, created_ms, shard";

pub(super) fn space_row(r: &Row<'_>) -> rusqlite::Result<SpaceRow> {
    Ok(SpaceRow {
        space_id: uuid_col(r, 0)?,
        name: r.get(1)?,
        created_ms: u64_col(r, 2)?,
        shard: u64_col(r, 3)? as u32,
    })
}

pub(super) fn user_row(r: &Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        user_id: uuid_col(r, 0)?,
        name: r.get(1)?,
        created_ms: u64_col(r, 2)?,
    })
}

pub(super) fn archive_row(r: &Row<'_>) -> rusqlite::Result<ArchiveRow> {
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

pub(super) fn uuid_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Uuid> {
    let bytes: Vec<u8> = row.get(idx)?;
    Uuid::from_slice(&bytes)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Blob, Box::new(e)))
}

pub(super) fn opt_uuid_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<Uuid>> {
    let bytes: Option<Vec<u8>> = row.get(idx)?;
    bytes
        .map(|b| Uuid::from_slice(&b))
        .transpose()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Blob, Box::new(e)))
}

pub(super) fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    Ok(v as u64)
}

pub(super) fn opt_u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = row.get(idx)?;
    Ok(v.map(|v| v as u64))
}

pub(super) fn hlc_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Hlc> {
    let s: String = row.get(idx)?;
    s.parse()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
}

pub(super) fn role_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Role> {
    let s: String = row.get(idx)?;
    s.parse::<Role>().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            Box::new(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        )
    })
}

/// A u64 as SQLite's integer; saturating, so `u64::MAX` ("no upper bound") stays the largest
/// value rather than wrapping to -1.
pub(super) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) const DOC_COLS: &str =
    "doc_key, entity_id, space_id, entity_type, version, last_seq, deleted, signed, locked, lww_stamps, window_day";

pub(super) fn doc_row(row: &Row<'_>) -> rusqlite::Result<DocumentRow> {
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
        window_day: row.get(10)?,
    })
}

pub(super) const FEED_COLS: &str = "seq, doc_key, space_id, entity_type, entity_id, version, origin_device, \
                                    origin_user, mutation_id, hlc, changes, lww_losses";

pub(super) fn feed_row(row: &Row<'_>) -> rusqlite::Result<FeedRow> {
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

pub(super) const AUDIT_COLS: &str = "audit_id, audit_seq, seq, mutation_id, actor_id, device_id, space_id, \
                                     entity_type, entity_id, kind, version, before_json, after_json, client_ts, \
                                     server_ts_ms, prev_hash, hash";

pub(super) fn audit_row(row: &Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        audit_id: u64_col(row, 0)?,
        audit_seq: u64_col(row, 1)?,
        seq: u64_col(row, 2)?,
        mutation_id: uuid_col(row, 3)?,
        actor_id: uuid_col(row, 4)?,
        device_id: uuid_col(row, 5)?,
        space_id: uuid_col(row, 6)?,
        entity_type: row.get(7)?,
        entity_id: uuid_col(row, 8)?,
        kind: row.get(9)?,
        version: u64_col(row, 10)?,
        before_json: row.get(11)?,
        after_json: row.get(12)?,
        client_ts: row.get(13)?,
        server_ts_ms: u64_col(row, 14)?,
        prev_hash: row.get(15)?,
        hash: row.get(16)?,
    })
}

pub(super) const DEVICE_COLS: &str = "device_id, user_id, public_key, enrolled_ms, revoked_ms, last_seen_ms, label, wipe_requested_ms, wiped_ms, wipe_discarded, replaces";

pub(super) fn device_row(row: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        device_id: uuid_col(row, 0)?,
        user_id: uuid_col(row, 1)?,
        public_key: row.get(2)?,
        enrolled_ms: u64_col(row, 3)?,
        revoked_ms: opt_u64_col(row, 4)?,
        last_seen_ms: opt_u64_col(row, 5)?,
        label: row.get(6)?,
        wipe_requested_ms: opt_u64_col(row, 7)?,
        wiped_ms: opt_u64_col(row, 8)?,
        wipe_discarded: opt_u64_col(row, 9)?,
        replaces: opt_uuid_col(row, 10)?,
    })
}

pub(super) const TOKEN_COLS: &str = "token_hash, user_id, created_ms, expires_ms, used_ms, used_by, label";

pub(super) fn token_row(row: &Row<'_>) -> rusqlite::Result<TokenRow> {
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
        label: row.get(6)?,
    })
}
