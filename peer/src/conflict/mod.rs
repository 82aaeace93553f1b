//! Conflict prompts (SPEC §9): what the user sees when the relay refused a change, and what
//! they can do about it.
//!
//! - A `Conflict` (a gated record changed on the relay, or was deleted there) becomes a
//!   [`ConflictRecord`]: a three-way view, field by field, of `base`, `mine` and `theirs` with
//!   who wrote each side and when ([`Device::conflicts`]). The user resolves it with
//!   [`Device::resolve`] (keep mine, keep theirs, or a per-field merge): one new change on top of
//!   both sides, sent as a `Resolve` mutation on the relay's current version (`resolve.rs`).
//! - Any other blocking answer (signed, locked, invalid, forbidden) becomes a [`RejectedEdit`]:
//!   the edit's values are kept for its author, the local document returns to the relay's
//!   state, and the user discards it or turns a signed note's edit into an addendum
//!   (`reject.rs`).
//! - LWW losses are listed with an undo window of 24 hours (`lww.rs`).
//!
//! The outbox stays halted until the user acts: nothing is resolved or discarded implicitly.

pub(crate) mod lww;
mod record;
mod reject;
mod resolve;
mod settlement;
mod view;

use fieldsync_schema::document::META_DELETED;
use fieldsync_schema::{ConflictReason, FieldKind, MutationKind, Origin, Outcome};
use rusqlite::{Connection, params};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

pub use lww::{LwwLossRecord, UNDO_WINDOW_MS};
pub(crate) use record::{record_conflict, record_rejection};
pub use reject::{DiscardReport, RejectedEdit};
pub use resolve::Resolution;

use settlement::Unsettled;

use crate::device::Device;
use crate::entity::{self, parse_uuid};
use crate::error::{PeerError, Result};

/// Who wrote one side of a field, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Author {
    /// `None`: the relay itself (it writes only LWW settlements).
    pub device_id: Option<Uuid>,
    /// Known for this device's writes and for the relay writes the conflict named.
    pub user_id: Option<Uuid>,
    pub mutation_id: Option<Uuid>,
    /// The write's HLC wall time when known, else its change's timestamp (whole seconds).
    pub at_ms: u64,
}

/// A whole version of the record: its fields and whether it is deleted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RecordState {
    pub fields: Map<String, Value>,
    pub deleted: bool,
}

/// How the two sides relate for one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldStatus {
    /// Neither side changed it.
    Unchanged,
    /// Only this device changed it.
    Mine,
    /// Only the relay's side changed it.
    Theirs,
    /// Both changed it to the same value.
    Same,
    /// Both changed it, differently: the user decides.
    Contested,
    /// A counter: concurrent increments add up, nothing to choose.
    Merged,
}

/// One side's value of a field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Side {
    /// `null`: the field is absent on this side.
    pub value: Value,
    /// Differs from `base`.
    pub changed: bool,
    /// Who changed it (only when `changed`).
    pub by: Option<Author>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldConflict {
    /// A schema field, or `_deleted` for the tombstone (delete versus edit).
    pub field: String,
    pub status: FieldStatus,
    pub base: Value,
    pub mine: Side,
    pub theirs: Side,
    /// A field this app version's schema does not know (a device on a newer version wrote it).
    /// Every resolution keeps the relay's value; a merged resolution cannot set it.
    pub from_newer_version: bool,
}

/// An unresolved `Conflict`, as the resolution prompt shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConflictRecord {
    pub conflict_id: u64,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub space_id: Uuid,
    pub reason: ConflictReason,
    /// The outbox item the relay refused, and its kind.
    pub mutation_id: Uuid,
    pub kind: MutationKind,
    /// The relay version the refused write was built on, and the relay's version then.
    pub base_version: Option<u64>,
    pub server_version: u64,
    /// The relay version this device knows now: what a resolution is based on.
    pub relay_version: u64,
    pub recorded_at_ms: u64,
    /// Every field either side holds, plus `_deleted` when a side is deleted.
    pub fields: Vec<FieldConflict>,
    pub base: RecordState,
    pub mine: RecordState,
    pub theirs: RecordState,
    /// This device's unconfirmed items for the entity, which a resolution carries.
    pub carried_mutations: Vec<Uuid>,
    /// What the user can do, every option accepted when chosen: `keep_mine`, `keep_theirs`,
    /// `merged`; or `discard` alone (a signature built on an older version, a record locked
    /// on the relay); or `discard` and `addendum` (an edit of a note signed on the relay).
    pub options: Vec<&'static str>,
}

/// The open (unresolved) conflict of an entity, as stored when the relay answered.
#[derive(Debug, Clone)]
pub(crate) struct OpenConflict {
    pub conflict_id: u64,
    pub entity_id: Uuid,
    pub mutation_id: Uuid,
    pub server_version: u64,
    pub outcome: Outcome,
    pub recorded_at_ms: u64,
}

impl OpenConflict {
    pub fn reason(&self) -> ConflictReason {
        match &self.outcome {
            Outcome::Conflict { reason, .. } => *reason,
            _ => ConflictReason::StaleBase,
        }
    }

    pub fn authors(&self) -> &[Origin] {
        match &self.outcome {
            Outcome::Conflict { authors, .. } => authors,
            _ => &[],
        }
    }
}

type ConflictRow = (i64, String, String, i64, String, i64);

fn open_conflict_rows(conn: &Connection, entity: Option<Uuid>) -> Result<Vec<OpenConflict>> {
    let mut stmt = conn.prepare(
        "SELECT id, entity_id, mutation_id, server_version, outcome, recorded_at_ms FROM conflicts
         WHERE resolved = 0 AND (?1 IS NULL OR entity_id = ?1) ORDER BY id",
    )?;
    let rows = stmt.query_map(params![entity.map(|e| e.to_string())], |r| {
        Ok::<ConflictRow, _>((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (id, entity_id, mutation_id, server_version, outcome, at) = r?;
        out.push(OpenConflict {
            conflict_id: u64::try_from(id).unwrap_or(0),
            entity_id: parse_uuid(&entity_id)?,
            mutation_id: parse_uuid(&mutation_id)?,
            server_version: u64::try_from(server_version).unwrap_or(0),
            outcome: serde_json::from_str(&outcome)
                .map_err(|e| PeerError::Corrupt(format!("stored conflict {id}: {e}")))?,
            recorded_at_ms: u64::try_from(at).unwrap_or(0),
        });
    }
    Ok(out)
}

/// Whether a conflict, a rejection or a lost last-writer-wins value (which the user may still
/// undo), open or resolved, is on record for the entity: such a record is never evicted (its
/// history stays next to it).
pub(crate) fn has_history(conn: &Connection, entity_id: Uuid) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM conflicts WHERE entity_id = ?1) \
             OR EXISTS (SELECT 1 FROM rejected_edits WHERE entity_id = ?1) \
             OR EXISTS (SELECT 1 FROM lww_losses WHERE entity_id = ?1)",
        [entity_id.to_string()],
        |r| r.get(0),
    )?)
}

/// Deletes every conflict, rejected edit and LWW loss (a remote wipe, `crate::wipe`).
pub(crate) fn erase_all(conn: &Connection) -> Result<()> {
    conn.execute_batch("DELETE FROM conflicts; DELETE FROM rejected_edits; DELETE FROM lww_losses;")?;
    Ok(())
}

pub(crate) fn open_conflict(conn: &Connection, entity_id: Uuid) -> Result<Option<OpenConflict>> {
    Ok(open_conflict_rows(conn, Some(entity_id))?.pop())
}

/// Closes a conflict: how it was resolved, and by which outbox item (none when discarded).
pub(crate) fn close_conflict(
    conn: &Connection,
    conflict_id: u64,
    resolution: &str,
    by: Option<Uuid>,
    now_ms: u64,
) -> Result<()> {
    conn.execute(
        "UPDATE conflicts SET resolved = 1, resolved_at_ms = ?2, resolution = ?3, resolution_mutation = ?4 WHERE id = ?1",
        params![
            entity::i64_of(conflict_id),
            entity::i64_of(now_ms),
            resolution,
            by.map(|u| u.to_string())
        ],
    )?;
    Ok(())
}

impl Device {
    /// Every unresolved conflict, oldest first, as three-way records.
    pub fn conflicts(&self) -> Result<Vec<ConflictRecord>> {
        let mut out = Vec::new();
        for open in open_conflict_rows(&self.conn, None)? {
            out.push(self.conflict_record(&open)?);
        }
        Ok(out)
    }

    fn conflict_record(&self, open: &OpenConflict) -> Result<ConflictRecord> {
        let u = Unsettled::load(&self.conn, &self.schema, open.clone(), self.device_id, self.actor())?;
        let sides = &u.sides;
        let mut fields = Vec::new();
        for key in view::all_keys(&[&sides.base.fields, &sides.mine.fields, &sides.theirs.fields]) {
            let counter = matches!(u.ty.field(&key).map(|f| &f.kind), Some(FieldKind::Counter { .. }));
            let get = |v: &RecordState| v.fields.get(&key).cloned().unwrap_or(Value::Null);
            let mut field = field_conflict(
                &key,
                get(&sides.base),
                get(&sides.mine),
                get(&sides.theirs),
                counter,
                sides,
                &u.own,
                open.authors(),
            );
            field.from_newer_version = u.ty.field(&key).is_none();
            fields.push(field);
        }
        if sides.base.deleted || sides.mine.deleted || sides.theirs.deleted {
            let b = |d: bool| Value::Bool(d);
            fields.push(field_conflict(
                META_DELETED,
                b(sides.base.deleted),
                b(sides.mine.deleted),
                b(sides.theirs.deleted),
                false,
                sides,
                &u.own,
                open.authors(),
            ));
        }
        Ok(ConflictRecord {
            conflict_id: open.conflict_id,
            entity_type: u.loaded.meta.entity_type.clone(),
            entity_id: open.entity_id,
            space_id: u.loaded.meta.space_id,
            reason: open.reason(),
            mutation_id: open.mutation_id,
            kind: u.envelope.kind,
            base_version: u.envelope.base_version,
            server_version: open.server_version,
            relay_version: u.loaded.meta.relay_version,
            recorded_at_ms: open.recorded_at_ms,
            fields,
            carried_mutations: u.own.mutation_ids(),
            base: sides.base.clone(),
            mine: sides.mine.clone(),
            theirs: sides.theirs.clone(),
            options: u.settlement.options(),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn field_conflict(
    key: &str,
    base: Value,
    mine: Value,
    theirs: Value,
    counter: bool,
    sides: &view::Sides,
    own: &view::OwnChanges,
    authors: &[Origin],
) -> FieldConflict {
    let mine_changed = mine != base;
    let theirs_changed = theirs != base;
    let status = match (counter, mine_changed, theirs_changed) {
        (true, _, _) => FieldStatus::Merged,
        (false, false, false) => FieldStatus::Unchanged,
        (false, true, false) => FieldStatus::Mine,
        (false, false, true) => FieldStatus::Theirs,
        (false, true, true) if mine == theirs => FieldStatus::Same,
        (false, true, true) => FieldStatus::Contested,
    };
    FieldConflict {
        field: key.to_string(),
        status,
        mine: Side {
            by: mine_changed.then(|| view::mine_author(own, key)).flatten(),
            value: mine,
            changed: mine_changed,
        },
        theirs: Side {
            by: theirs_changed
                .then(|| view::theirs_author(sides, authors, key))
                .flatten(),
            value: theirs,
            changed: theirs_changed,
        },
        base,
        from_newer_version: false,
    }
}

#[cfg(test)]
mod tests;
