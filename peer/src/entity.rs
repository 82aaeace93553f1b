//! Entity rows: one Automerge document per entity plus what is needed to list and filter
//! without loading documents (materialised fields JSON, flags, heads).
//!
//! Only one document is ever loaded at a time, so opening and listing a device with many
//! thousands of entities costs the same as with ten.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use fieldsync_schema::document::NoteSignature;
use fieldsync_schema::{EntityDoc, Schema};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{PeerError, Result};

/// Where an entity stands with the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// The relay has confirmed every local change.
    Synced,
    /// Local changes wait in the outbox.
    Pending,
    /// The relay answered `Conflict`; both sides are in the document until resolved.
    Conflict,
    /// The relay refused a change for another reason (invalid, locked, signed, forbidden).
    Rejected,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Synced => "synced",
            SyncState::Pending => "pending",
            SyncState::Conflict => "conflict",
            SyncState::Rejected => "rejected",
        }
    }
}

impl fmt::Display for SyncState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SyncState {
    type Err = PeerError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "synced" => Ok(SyncState::Synced),
            "pending" => Ok(SyncState::Pending),
            "conflict" => Ok(SyncState::Conflict),
            "rejected" => Ok(SyncState::Rejected),
            other => Err(PeerError::Corrupt(format!("unknown sync state `{other}`"))),
        }
    }
}

/// An entity as the app sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entity {
    pub entity_id: Uuid,
    pub entity_type: String,
    pub space_id: Uuid,
    pub fields: Map<String, Value>,
    /// The last relay version this device knows of (0: the relay has not confirmed it yet).
    pub relay_version: u64,
    pub sync_state: SyncState,
    pub deleted: bool,
    pub signed: bool,
    pub locked: bool,
    /// Only filled by `get` (it needs the document).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<NoteSignature>,
    /// Automerge heads (hex change hashes).
    pub heads: Vec<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// The bookkeeping of an entity row, without the document.
#[derive(Debug, Clone)]
pub(crate) struct EntityMeta {
    pub entity_id: Uuid,
    pub entity_type: String,
    pub space_id: Uuid,
    pub relay_version: u64,
    pub sync_state: SyncState,
}

pub(crate) struct Loaded {
    pub meta: EntityMeta,
    pub doc: EntityDoc,
}

const COLUMNS: &str = "entity_id, entity_type, space_id, fields, relay_version, sync_state, deleted, signed, locked, \
                       heads, created_at_ms, updated_at_ms";

pub(crate) fn parse_uuid(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|_| PeerError::Corrupt(format!("`{s}` is not a UUID")))
}

fn u64_of(i: i64) -> u64 {
    u64::try_from(i).unwrap_or(0)
}

pub(crate) fn i64_of(u: u64) -> i64 {
    i64::try_from(u).unwrap_or(i64::MAX)
}

/// Raw row, converted outside the rusqlite closure so conversion errors stay ours.
struct RawRow {
    id: String,
    ty: String,
    space: String,
    fields: String,
    relay_version: i64,
    state: String,
    deleted: bool,
    signed: bool,
    locked: bool,
    heads: String,
    created: i64,
    updated: i64,
}

fn raw(r: &Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: r.get(0)?,
        ty: r.get(1)?,
        space: r.get(2)?,
        fields: r.get(3)?,
        relay_version: r.get(4)?,
        state: r.get(5)?,
        deleted: r.get(6)?,
        signed: r.get(7)?,
        locked: r.get(8)?,
        heads: r.get(9)?,
        created: r.get(10)?,
        updated: r.get(11)?,
    })
}

fn to_entity(r: RawRow) -> Result<Entity> {
    let fields: Map<String, Value> =
        serde_json::from_str(&r.fields).map_err(|e| PeerError::Corrupt(format!("fields of {}: {e}", r.id)))?;
    let heads: Vec<String> =
        serde_json::from_str(&r.heads).map_err(|e| PeerError::Corrupt(format!("heads of {}: {e}", r.id)))?;
    Ok(Entity {
        entity_id: parse_uuid(&r.id)?,
        entity_type: r.ty,
        space_id: parse_uuid(&r.space)?,
        fields,
        relay_version: u64_of(r.relay_version),
        sync_state: r.state.parse()?,
        deleted: r.deleted,
        signed: r.signed,
        locked: r.locked,
        signature: None,
        heads,
        created_at_ms: u64_of(r.created),
        updated_at_ms: u64_of(r.updated),
    })
}

/// The row without its document.
pub(crate) fn get(conn: &Connection, id: Uuid) -> Result<Option<Entity>> {
    let row = conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM entities WHERE entity_id = ?1"),
            [id.to_string()],
            raw,
        )
        .optional()?;
    row.map(to_entity).transpose()
}

/// Loads one entity and its document (the only place documents are loaded).
pub(crate) fn load(conn: &Connection, id: Uuid, actor: automerge::ActorId) -> Result<Option<Loaded>> {
    let row = conn
        .query_row(
            "SELECT entity_type, space_id, relay_version, sync_state, doc FROM entities \
             WHERE entity_id = ?1",
            [id.to_string()],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            },
        )
        .optional()?;
    let Some((ty, space, version, state, bytes)) = row else {
        return Ok(None);
    };
    let doc = EntityDoc::load(&bytes, actor)?;
    Ok(Some(Loaded {
        meta: EntityMeta {
            entity_id: id,
            entity_type: ty,
            space_id: parse_uuid(&space)?,
            relay_version: u64_of(version),
            sync_state: state.parse()?,
        },
        doc,
    }))
}

/// A record's stored fields as `schema` names them (unchanged for a type it does not know).
pub(crate) fn viewed(schema: &Schema, entity_type: &str, stored: Map<String, Value>) -> Map<String, Value> {
    match schema.entity_type(entity_type) {
        Some(ty) => ty.view(stored),
        None => stored,
    }
}

/// Re-derives every record's `fields` column from its document under `schema`: what a device
/// does once when its app moves to a schema with declared renames or defaults, so lists and
/// filters find records written before the change under the new names.
pub(crate) fn refresh_fields(conn: &Connection, schema: &Schema, actor: automerge::ActorId) -> Result<()> {
    let mut read = conn.prepare("SELECT entity_id, entity_type, doc FROM entities")?;
    let mut update = conn.prepare("UPDATE entities SET fields = ?2 WHERE entity_id = ?1")?;
    let mut rows = read.query([])?;
    while let Some(row) = rows.next()? {
        let (id, ty, bytes): (String, String, Vec<u8>) = (row.get(0)?, row.get(1)?, row.get(2)?);
        if schema.entity_type(&ty).is_none_or(|t| !t.has_migrations()) {
            continue;
        }
        let doc = EntityDoc::load(&bytes, actor.clone())?;
        let fields = Value::Object(viewed(schema, &ty, doc.fields())).to_string();
        update.execute(params![id, fields])?;
    }
    Ok(())
}

/// Writes the document and everything derived from it (fields, heads, flags) in one row.
///
/// The `fields` column holds the record as `schema` names it ([`fieldsync_schema::EntityType::view`]: a renamed
/// field under its new name, declared defaults filled in), so reads and list filters on this
/// device see what its app version expects; the document keeps what was stored.
pub(crate) fn store(
    conn: &Connection,
    schema: &Schema,
    meta: &EntityMeta,
    doc: &mut EntityDoc,
    now_ms: u64,
) -> Result<()> {
    let fields = Value::Object(viewed(schema, &meta.entity_type, doc.fields())).to_string();
    let heads: Vec<String> = doc.heads().iter().map(|h| h.to_string()).collect();
    let heads = serde_json::to_string(&heads).map_err(|e| PeerError::Corrupt(e.to_string()))?;
    let bytes = doc.save();
    conn.execute(
        "INSERT INTO entities (entity_id, entity_type, space_id, doc, fields, heads, relay_version, sync_state, \
                               deleted, signed, locked, created_at_ms, updated_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)
         ON CONFLICT (entity_id) DO UPDATE SET
            space_id = excluded.space_id, doc = excluded.doc, fields = excluded.fields, heads = excluded.heads,
            relay_version = excluded.relay_version, sync_state = excluded.sync_state, deleted = excluded.deleted,
            signed = excluded.signed, locked = excluded.locked, updated_at_ms = excluded.updated_at_ms",
        params![
            meta.entity_id.to_string(),
            meta.entity_type,
            meta.space_id.to_string(),
            bytes,
            fields,
            heads,
            i64_of(meta.relay_version),
            meta.sync_state.as_str(),
            doc.is_deleted(),
            doc.is_signed(),
            doc.is_locked(),
            i64_of(now_ms),
        ],
    )?;
    Ok(())
}

/// Records that the relay holds `id` at `version` or later (versions only move forward).
pub(crate) fn learn_relay_version(conn: &Connection, id: Uuid, version: u64) -> Result<()> {
    conn.execute(
        "UPDATE entities SET relay_version = MAX(relay_version, ?2) WHERE entity_id = ?1",
        params![id.to_string(), i64_of(version)],
    )?;
    Ok(())
}

/// A pending entity becomes synced (a conflict or rejection stays until resolved).
pub(crate) fn mark_synced_if_pending(conn: &Connection, id: Uuid) -> Result<()> {
    conn.execute(
        "UPDATE entities SET sync_state = 'synced' WHERE entity_id = ?1 AND sync_state = 'pending'",
        [id.to_string()],
    )?;
    Ok(())
}

/// Moves every entity of space `from` into `to` (records written before enrollment, in the
/// nil space, join the user's default space).
pub(crate) fn move_space(conn: &Connection, from: Uuid, to: Uuid) -> Result<()> {
    conn.execute(
        "UPDATE entities SET space_id = ?1 WHERE space_id = ?2",
        [to.to_string(), from.to_string()],
    )?;
    Ok(())
}

pub(crate) fn set_sync_state(conn: &Connection, id: Uuid, state: SyncState) -> Result<()> {
    conn.execute(
        "UPDATE entities SET sync_state = ?2 WHERE entity_id = ?1",
        params![id.to_string(), state.as_str()],
    )?;
    Ok(())
}

/// A field filter of `list`: materialised field `field` equals `value` (`null`: absent).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldFilter {
    pub field: String,
    pub value: Value,
}

/// Entities of one type, filtered on materialised fields with SQLite's `json_extract`, in id
/// order. Field names must have been checked against the schema (they go into a JSON path).
pub(crate) fn list(
    conn: &Connection,
    entity_type: &str,
    filters: &[FieldFilter],
    include_deleted: bool,
) -> Result<Vec<Entity>> {
    let mut sql = format!("SELECT {COLUMNS} FROM entities WHERE entity_type = ?1");
    let mut args: Vec<SqlValue> = vec![SqlValue::Text(entity_type.to_string())];
    if !include_deleted {
        sql.push_str(" AND deleted = 0");
    }
    for f in filters {
        let path = format!("'$.{}'", f.field.replace('\'', ""));
        let value = match &f.value {
            Value::Null => {
                sql.push_str(&format!(" AND json_extract(fields, {path}) IS NULL"));
                continue;
            }
            Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
            Value::Number(n) => match n.as_i64() {
                Some(i) => SqlValue::Integer(i),
                None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => SqlValue::Text(s.clone()),
            other => SqlValue::Text(other.to_string()),
        };
        args.push(value);
        sql.push_str(&format!(" AND json_extract(fields, {path}) = ?{}", args.len()));
    }
    sql.push_str(" ORDER BY entity_id");
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), raw)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(to_entity(r?)?);
    }
    Ok(out)
}

pub(crate) fn exists_live(conn: &Connection, id: Uuid, entity_type: &str, space: Uuid) -> Result<bool> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM entities WHERE entity_id = ?1 AND entity_type = ?2 AND space_id = ?3 AND deleted = 0",
        params![id.to_string(), entity_type, space.to_string()],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

pub(crate) fn count(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM entities", [], |r| r.get(0))?;
    Ok(u64_of(n))
}

/// A synced record eviction may remove: its stored fields and when this device last stored it.
pub(crate) struct Settled {
    pub id: Uuid,
    pub fields: Map<String, Value>,
    pub stored_ms: u64,
}

/// The synced records of `entity_type` (eviction's candidates).
pub(crate) fn synced_of_type(conn: &Connection, entity_type: &str) -> Result<Vec<Settled>> {
    let mut stmt = conn.prepare(
        "SELECT entity_id, fields, updated_at_ms FROM entities WHERE entity_type = ?1 AND sync_state = 'synced'",
    )?;
    let rows = stmt
        .query_map([entity_type], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(id, fields, stored)| {
            let fields =
                serde_json::from_str(&fields).map_err(|e| PeerError::Corrupt(format!("fields of {id}: {e}")))?;
            Ok(Settled {
                id: parse_uuid(&id)?,
                fields,
                stored_ms: u64_of(stored),
            })
        })
        .collect()
}

/// Every id a held record's `ref` field names (what eviction must keep).
pub(crate) fn referenced_ids(conn: &Connection, schema: &Schema) -> Result<BTreeSet<Uuid>> {
    let mut ids = BTreeSet::new();
    for ty in schema.types() {
        for (field, _) in ty.ref_fields() {
            let path = format!("$.\"{}\"", field.name);
            let mut stmt = conn.prepare(
                "SELECT json_extract(fields, ?2) FROM entities \
                 WHERE entity_type = ?1 AND json_extract(fields, ?2) IS NOT NULL",
            )?;
            let named = stmt
                .query_map(params![ty.name, path], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            ids.extend(named.iter().filter_map(|s| Uuid::parse_str(s).ok()));
        }
    }
    Ok(ids)
}

/// Removes one record from the device (eviction: the relay holds it).
pub(crate) fn erase(conn: &Connection, id: Uuid) -> Result<()> {
    conn.execute("DELETE FROM entities WHERE entity_id = ?1", [id.to_string()])?;
    Ok(())
}

/// Deletes every record (a remote wipe, `crate::wipe`); what refers to them goes first.
pub(crate) fn erase_all(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM entities", [])?;
    Ok(())
}

/// Live records of the given types whose `field` holds a value: the status's counts of flagged
/// duplicates and superseded requests, without reading every record.
pub(crate) fn count_with_field(conn: &Connection, types: &[&str], field: &str) -> Result<u64> {
    let mut total = 0;
    let path = format!("$.{field}");
    for ty in types {
        let n: i64 = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM entities WHERE entity_type = ?1 AND deleted = 0
                 AND json_extract(fields, ?2) IS NOT NULL",
            )?
            .query_row(rusqlite::params![ty, path], |r| r.get(0))?;
        total += u64_of(n);
    }
    Ok(total)
}

/// Live records of the given types flagged as possible duplicates of another live record of
/// their type: the status's count, the same records [`crate::Device::possible_duplicates`]
/// lists (a flag whose other record was deleted or merged since leaves nothing to decide).
pub(crate) fn count_open_duplicates(conn: &Connection, types: &[&str]) -> Result<u64> {
    let mut total = 0;
    let path = format!("$.{}", fieldsync_schema::registry::DUPLICATE_OF);
    for ty in types {
        let n: i64 = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM entities e JOIN entities o
                   ON o.entity_id = json_extract(e.fields, ?2)
                  AND o.entity_type = e.entity_type AND o.deleted = 0
                 WHERE e.entity_type = ?1 AND e.deleted = 0",
            )?
            .query_row(rusqlite::params![ty, path], |r| r.get(0))?;
        total += u64_of(n);
    }
    Ok(total)
}
