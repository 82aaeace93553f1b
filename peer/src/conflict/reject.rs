//! Rejected edits: changes the relay refused for good (signed, locked, invalid, forbidden).
//!
//! The relay stores its answer as the mutation's receipt, so resending can never help. The
//! edit's values stay listed for their author until the user acts: discard them (the only way
//! anything leaves the outbox unsent, SPEC §8), or — for an edit of a signed note — turn them
//! into an addendum, a new note linked to the signed one.

use fieldsync_schema::Outcome;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::settlement::{Settlement, Unsettled};
use super::{close_conflict, view};
use crate::device::Device;
use crate::entity::{self, SyncState, i64_of, parse_uuid};
use crate::error::{PeerError, Result};
use crate::outbox;
use crate::rules::Op;
use crate::write::WriteReceipt;

/// A change the relay refused, kept for its author.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RejectedEdit {
    pub rejection_id: u64,
    pub entity_type: String,
    pub entity_id: Uuid,
    /// The refused outbox item.
    pub mutation_id: Uuid,
    pub outcome: Outcome,
    pub reason: String,
    /// The record as this device had it with the refused change (and those queued behind it):
    /// for a note, the text that was not accepted.
    pub fields: Map<String, Value>,
    pub deleted: bool,
    pub recorded_at_ms: u64,
    /// What the user can do: `discard`, and `addendum` for an edit of a signed note.
    pub options: Vec<&'static str>,
}

/// What `discard_rejection` dropped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiscardReport {
    pub entity_type: String,
    pub entity_id: Uuid,
    /// The outbox items that will never be sent (state `superseded`, nothing superseding them).
    pub discarded: Vec<Uuid>,
    /// The values the discarded changes held.
    pub values: Map<String, Value>,
}

struct OpenRejection {
    id: u64,
    edit: RejectedEdit,
    upto_seq: u64,
}

type Row = (i64, String, String, String, String, String, bool, i64, i64);

fn open_rejections(conn: &Connection, entity: Option<Uuid>) -> Result<Vec<OpenRejection>> {
    let mut stmt = conn.prepare(
        "SELECT id, entity_id, entity_type, mutation_id, outcome, fields, deleted, upto_seq, recorded_at_ms
         FROM rejected_edits WHERE resolved_at_ms IS NULL AND (?1 IS NULL OR entity_id = ?1) ORDER BY id",
    )?;
    let rows = stmt.query_map(params![entity.map(|e| e.to_string())], |r| {
        Ok::<Row, _>((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (id, entity_id, entity_type, mutation_id, outcome, fields, deleted, upto, at) = r?;
        let corrupt = |e: serde_json::Error| PeerError::Corrupt(format!("stored rejection {id}: {e}"));
        let outcome: Outcome = serde_json::from_str(&outcome).map_err(corrupt)?;
        let fields: Map<String, Value> = serde_json::from_str(&fields).map_err(corrupt)?;
        let mut options = vec!["discard"];
        if matches!(outcome, Outcome::RejectedImmutable { .. }) && fields.get("body").is_some_and(Value::is_string) {
            options.push("addendum");
        }
        out.push(OpenRejection {
            id: u64::try_from(id).unwrap_or(0),
            upto_seq: u64::try_from(upto).unwrap_or(0),
            edit: RejectedEdit {
                rejection_id: u64::try_from(id).unwrap_or(0),
                entity_type,
                entity_id: parse_uuid(&entity_id)?,
                mutation_id: parse_uuid(&mutation_id)?,
                reason: outcome.describe(),
                outcome,
                fields,
                deleted,
                recorded_at_ms: u64::try_from(at).unwrap_or(0),
                options,
            },
        });
    }
    Ok(out)
}

fn close_rejection(conn: &Connection, id: u64, resolution: &str, by: Option<Uuid>, now_ms: u64) -> Result<()> {
    conn.execute(
        "UPDATE rejected_edits SET resolved_at_ms = ?2, resolution = ?3, resolution_mutation = ?4 WHERE id = ?1",
        params![i64_of(id), i64_of(now_ms), resolution, by.map(|u| u.to_string())],
    )?;
    Ok(())
}

/// After its refused items leave the outbox, an entity is `pending` if it still has
/// unconfirmed items (written after the refusal), else `synced`.
fn settle(tx: &Transaction<'_>, entity_id: Uuid) -> Result<()> {
    let state = if outbox::unconfirmed_for(tx, entity_id)? > 0 {
        SyncState::Pending
    } else {
        SyncState::Synced
    };
    entity::set_sync_state(tx, entity_id, state)
}

impl Device {
    /// Every change the relay refused that its author has not dealt with yet, oldest first.
    pub fn rejections(&self) -> Result<Vec<RejectedEdit>> {
        Ok(open_rejections(&self.conn, None)?.into_iter().map(|r| r.edit).collect())
    }

    /// Drops the refused change of `entity_id` (and the entity's items queued behind it when it
    /// was refused) for good, so the outbox moves on. Also takes back a signature the relay
    /// answered with a conflict (it was made on an older version). Conflicts of values are not
    /// discarded: they are resolved, so that nothing of either side is lost.
    pub fn discard_rejection(&mut self, entity_id: Uuid) -> Result<DiscardReport> {
        let now = self.time.now_ms();
        let me = self.device_id;
        let actor = self.actor();
        let (conn, mut w) = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let report = if let Some(r) = open_rejections(&tx, Some(entity_id))?.pop() {
            let own = view::own_changes(&tx, entity_id, Some(r.upto_seq))?;
            let ids = own.mutation_ids();
            outbox::supersede(&tx, &ids, None, "discarded by the user after the relay refused it")?;
            if let Some(mut loaded) = entity::load(&tx, entity_id, actor)?
                && loaded.meta.relay_version == 0
                && !loaded.doc.is_deleted()
            {
                // The relay never had this record: it disappears from this device as a tombstone.
                loaded.doc.set_deleted(true)?;
                loaded.doc.commit(now);
                entity::store(&tx, w.schema, &loaded.meta, &mut loaded.doc, now)?;
            }
            close_rejection(&tx, r.id, "discarded", None, now)?;
            DiscardReport {
                entity_type: r.edit.entity_type,
                entity_id,
                discarded: ids,
                values: r.edit.fields,
            }
        } else {
            discard_unsettleable_conflict(&tx, w.schema, entity_id, me, w.actor.clone(), now)?
        };
        settle(&tx, entity_id)?;
        w.finish(&tx)?;
        tx.commit()?;
        Ok(report)
    }

    /// Turns the refused edit of a signed note into an addendum: a new note with the refused
    /// text as its body, `addendum_to` the signed note, same patient and session. The refused
    /// items are superseded by the addendum (unsynced until the relay has it). The edit is a
    /// rejection (the note was signed when it arrived) or a conflict whose note was signed on
    /// the relay meanwhile.
    pub fn make_addendum(&mut self, note_id: Uuid) -> Result<WriteReceipt> {
        let now = self.time.now_ms();
        let me = self.device_id;
        let (conn, mut w) = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        w.fold_clock(&tx)?;
        let source = if let Some(r) = open_rejections(&tx, Some(note_id))?.pop() {
            if !r.edit.options.contains(&"addendum") {
                return Err(PeerError::Resolution(format!(
                    "only an edit refused because the note is signed becomes an addendum; this one was: {}",
                    r.edit.reason
                )));
            }
            AddendumSource {
                entity_type: r.edit.entity_type,
                refused: r.edit.fields,
                items: view::own_changes(&tx, note_id, Some(r.upto_seq))?.mutation_ids(),
                closes: Closes::Rejection(r.id),
            }
        } else {
            match Unsettled::of_entity(&tx, w.schema, note_id, me, w.actor.clone())? {
                Some(mut u) if u.settlement == (Settlement::Sealed { addendum: true }) => {
                    // The refused changes never reach the relay: the note shows the signed text.
                    let mut doc = view::relay_view(&mut u.loaded.doc, &u.own.hashes, w.actor.clone())?;
                    entity::store(&tx, w.schema, &u.loaded.meta, &mut doc, now)?;
                    AddendumSource {
                        entity_type: u.loaded.meta.entity_type,
                        refused: u.sides.mine.fields,
                        items: u.own.mutation_ids(),
                        closes: Closes::Conflict(u.open.conflict_id),
                    }
                }
                _ => {
                    return Err(PeerError::Resolution(format!(
                        "{note_id} has no refused edit to turn into an addendum"
                    )));
                }
            }
        };
        let current = entity::get(&tx, note_id)?.ok_or(PeerError::NotFound {
            entity_type: Some(source.entity_type.clone()),
            id: note_id,
        })?;
        let mut fields = Map::new();
        for key in ["patient_id", "session_id"] {
            if let Some(v) = current.fields.get(key).or_else(|| source.refused.get(key)) {
                fields.insert(key.to_string(), v.clone());
            }
        }
        fields.insert("addendum_to".into(), Value::String(note_id.to_string()));
        fields.insert(
            "body".into(),
            source.refused.get("body").cloned().unwrap_or(Value::Null),
        );
        let receipt = w.write(
            &tx,
            &source.entity_type,
            None,
            Some(current.space_id),
            Op::Put(fields),
            true,
            now,
        )?;
        outbox::supersede(
            &tx,
            &source.items,
            receipt.mutation_id,
            "replaced by an addendum (the note is signed)",
        )?;
        match source.closes {
            Closes::Rejection(id) => close_rejection(&tx, id, "addendum", receipt.mutation_id, now)?,
            Closes::Conflict(id) => close_conflict(&tx, id, "addendum", receipt.mutation_id, now)?,
        }
        settle(&tx, note_id)?;
        w.finish(&tx)?;
        tx.commit()?;
        Ok(receipt)
    }
}

/// What an addendum is made from.
struct AddendumSource {
    entity_type: String,
    /// The note as this device had it with the refused edit.
    refused: Map<String, Value>,
    /// The outbox items the addendum replaces.
    items: Vec<Uuid>,
    closes: Closes,
}

enum Closes {
    Rejection(u64),
    Conflict(u64),
}

/// A conflict that no choice of values can settle (see [`Settlement`]): a signature made on an
/// older version, or a change to a record signed or locked on the relay meanwhile. Every
/// unconfirmed item of the entity leaves the outbox (they could never be applied), and the
/// local document returns to the relay's state; the report shows what was dropped.
fn discard_unsettleable_conflict(
    tx: &Transaction<'_>,
    schema: &fieldsync_schema::Schema,
    entity_id: Uuid,
    me: Uuid,
    actor: automerge::ActorId,
    now: u64,
) -> Result<DiscardReport> {
    let Some(mut u) = Unsettled::of_entity(tx, schema, entity_id, me, actor.clone())? else {
        return Err(PeerError::Resolution(format!(
            "{entity_id} has no refused change to discard"
        )));
    };
    if u.settlement == Settlement::ByValues {
        return Err(PeerError::Resolution(format!(
            "{entity_id} has a conflict, which is resolved rather than discarded (keep mine, keep theirs \
             or merge), so that neither side is lost"
        )));
    }
    let values = u.sides.mine.fields.clone();
    let mut doc = view::relay_view(&mut u.loaded.doc, &u.own.hashes, actor)?;
    entity::store(tx, schema, &u.loaded.meta, &mut doc, now)?;
    let ids = u.own.mutation_ids();
    let why = match u.settlement {
        Settlement::StaleSignature => "signature discarded: it covered an older version",
        _ => "discarded by the user: the record is signed or locked on the relay",
    };
    outbox::supersede(tx, &ids, None, why)?;
    close_conflict(tx, u.open.conflict_id, "discarded", None, now)?;
    Ok(DiscardReport {
        entity_type: u.loaded.meta.entity_type,
        entity_id,
        discarded: ids,
        values,
    })
}
