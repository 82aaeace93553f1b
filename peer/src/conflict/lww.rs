//! LWW losses on the losing device (SPEC §9): listed, and undoable for 24 hours.
//!
//! There is no prompt for last-writer-wins types: the relay's deterministic winner stands. The
//! losing device stores each loss naming it (from `Applied.lww_lost` or a feed entry's
//! `lww_losses`); undo re-applies the lost value as a new, ordinary write with a fresh HLC, so
//! it becomes the latest writer and wins. The window counts from when this device learned of
//! the loss: a user cannot be expected to undo what they were not shown.

use fieldsync_schema::document::META_DELETED;
use fieldsync_schema::{LwwLoss, MutationKind};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use serde_json::Map;
use uuid::Uuid;

use crate::device::Device;
use crate::entity::{self, SyncState, i64_of, parse_uuid};
use crate::error::{PeerError, Result};
use crate::outbox;
use crate::rules::Op;
use crate::write::WriteReceipt;

/// How long after the device learned of a loss it can still be undone.
pub const UNDO_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;

/// One lost LWW value, as the losing device lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LwwLossRecord {
    pub loss_id: u64,
    #[serde(flatten)]
    pub loss: LwwLoss,
    pub recorded_at_ms: u64,
    /// After this, undo is refused.
    pub undo_until_ms: u64,
    pub undone_at_ms: Option<u64>,
    /// The write that re-applied the value.
    pub undo_mutation: Option<Uuid>,
}

type Row = (i64, String, i64, Option<i64>, Option<String>);

fn to_record(r: Row) -> Result<LwwLossRecord> {
    let (id, loss, at, undone, undo_mutation) = r;
    let loss: LwwLoss =
        serde_json::from_str(&loss).map_err(|e| PeerError::Corrupt(format!("stored LWW loss {id}: {e}")))?;
    let recorded_at_ms = u64::try_from(at).unwrap_or(0);
    Ok(LwwLossRecord {
        loss_id: u64::try_from(id).unwrap_or(0),
        loss,
        recorded_at_ms,
        undo_until_ms: recorded_at_ms.saturating_add(UNDO_WINDOW_MS),
        undone_at_ms: undone.map(|u| u64::try_from(u).unwrap_or(0)),
        undo_mutation: undo_mutation.as_deref().map(parse_uuid).transpose()?,
    })
}

const SELECT: &str = "SELECT id, loss, recorded_at_ms, undone_at_ms, undo_mutation FROM lww_losses";

fn loss_record(conn: &Connection, loss_id: u64) -> Result<Option<LwwLossRecord>> {
    conn.query_row(&format!("{SELECT} WHERE id = ?1"), [i64_of(loss_id)], |r| {
        Ok::<Row, _>((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .optional()?
    .map(to_record)
    .transpose()
}

/// Keeps a value this device lost (once per loser mutation and field: a replayed answer or a
/// page read twice records nothing new).
pub(crate) fn record_loss(conn: &Connection, loss: &LwwLoss, now_ms: u64) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO lww_losses (entity_id, field, loser_mutation, loss, recorded_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            loss.entity_id.to_string(),
            loss.field,
            loss.loser_mutation.to_string(),
            serde_json::to_string(loss).map_err(|e| PeerError::Corrupt(e.to_string()))?,
            i64_of(now_ms)
        ],
    )?;
    Ok(())
}

impl Device {
    /// LWW values this device lost, newest first (SPEC §9: listed on the losing device).
    pub fn lww_losses(&self) -> Result<Vec<LwwLoss>> {
        Ok(self.lww_loss_records()?.into_iter().map(|r| r.loss).collect())
    }

    /// Every LWW value this device lost, newest first, with its undo window.
    pub fn lww_loss_records(&self) -> Result<Vec<LwwLossRecord>> {
        let mut stmt = self.conn.prepare(&format!("{SELECT} ORDER BY id DESC"))?;
        let rows = stmt.query_map([], |r| {
            Ok::<Row, _>((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
        let mut out = Vec::new();
        for r in rows {
            out.push(to_record(r?)?);
        }
        Ok(out)
    }

    /// Re-applies this device's lost value as a new write (it then carries the newest clock and
    /// wins), within [`UNDO_WINDOW_MS`] of learning of the loss. A lost delete is deleted again;
    /// a lost edit of a record the winner deleted brings the record back.
    pub fn undo_lww_loss(&mut self, loss_id: u64) -> Result<WriteReceipt> {
        let now = self.time.now_ms();
        let (conn, mut w) = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        w.fold_clock(&tx)?;
        let rec = loss_record(&tx, loss_id)?
            .ok_or_else(|| PeerError::Resolution(format!("no LWW loss {loss_id} on this device")))?;
        let loss = &rec.loss;
        if let Some(at) = rec.undone_at_ms {
            return Err(PeerError::Resolution(format!(
                "loss {loss_id} was already undone at {}",
                fieldsync_schema::time_fmt::render_ms(at)
            )));
        }
        if now > rec.undo_until_ms {
            return Err(PeerError::Resolution(format!(
                "loss {loss_id} ({} of {} {}) was recorded at {}, more than 24 hours ago: it can no longer be \
                 undone. The value stays in the relay's conflict archive; write it again if it is still wanted",
                loss.field,
                loss.entity_type,
                loss.entity_id,
                fieldsync_schema::time_fmt::render_ms(rec.recorded_at_ms)
            )));
        }
        let current = entity::load(&tx, loss.entity_id, w.actor.clone())?.ok_or(PeerError::NotFound {
            entity_type: Some(loss.entity_type.clone()),
            id: loss.entity_id,
        })?;
        let deleted = current.doc.is_deleted();
        let receipt = if loss.field == META_DELETED {
            match (loss.loser_value.as_bool(), deleted) {
                (Some(true), false) => w.write(
                    &tx,
                    &loss.entity_type,
                    Some(loss.entity_id),
                    None,
                    Op::Delete,
                    false,
                    now,
                )?,
                (Some(false), true) => undelete(&tx, &mut w, current, now)?,
                _ => return Err(still_shows_mine(loss)),
            }
        } else if deleted {
            return Err(PeerError::Resolution(format!(
                "{} {} is deleted; undo the loss of its deletion (`_deleted`) first",
                loss.entity_type, loss.entity_id
            )));
        } else {
            let mut patch = Map::new();
            patch.insert(loss.field.clone(), loss.loser_value.clone());
            w.write(
                &tx,
                &loss.entity_type,
                Some(loss.entity_id),
                None,
                Op::Put(patch),
                false,
                now,
            )?
        };
        if receipt.mutation_id.is_none() {
            return Err(still_shows_mine(loss));
        }
        tx.execute(
            "UPDATE lww_losses SET undone_at_ms = ?2, undo_mutation = ?3 WHERE id = ?1",
            params![i64_of(loss_id), i64_of(now), receipt.mutation_id.map(|u| u.to_string())],
        )?;
        w.finish(&tx)?;
        tx.commit()?;
        Ok(receipt)
    }
}

/// The record here still holds the lost value: the relay's decision has not been pulled yet
/// (or someone wrote the value again), so re-writing it would change nothing and send nothing.
fn still_shows_mine(loss: &LwwLoss) -> PeerError {
    PeerError::Resolution(format!(
        "{} {} still holds your value for `{}` on this device: sync first to receive the winning value, then          undo if it is still wrong",
        loss.entity_type, loss.entity_id, loss.field
    ))
}

/// Brings a deleted LWW record back: only a `Resolve` may clear the tombstone, and the relay
/// settles it by clock like any other field.
fn undelete(
    tx: &rusqlite::Transaction<'_>,
    w: &mut crate::write::Writer<'_>,
    mut loaded: entity::Loaded,
    now: u64,
) -> Result<WriteReceipt> {
    let ty = w
        .schema
        .entity_type(&loaded.meta.entity_type)
        .ok_or_else(|| PeerError::unknown_type(w.schema, &loaded.meta.entity_type))?;
    crate::rules::check_role(ty, &loaded.meta, MutationKind::Resolve, w.enrollment)?;
    loaded.doc.set_deleted(false)?;
    let change = loaded.doc.commit_always(now)?;
    if matches!(loaded.meta.sync_state, SyncState::Synced | SyncState::Pending) {
        loaded.meta.sync_state = SyncState::Pending;
    }
    let base = loaded.meta.relay_version + outbox::unconfirmed_for(tx, loaded.meta.entity_id)?;
    let m = w.signer.mutation(
        &loaded.meta,
        MutationKind::Resolve,
        Some(base),
        vec![change.raw_bytes().to_vec()],
        now,
    );
    outbox::append(tx, &m, now)?;
    entity::store(tx, w.schema, &loaded.meta, &mut loaded.doc, now)?;
    Ok(WriteReceipt {
        entity_id: loaded.meta.entity_id,
        entity_type: loaded.meta.entity_type,
        kind: MutationKind::Resolve,
        mutation_id: Some(m.mutation_id),
        combined: false,
        change_hash: Some(change.hash().to_string()),
    })
}
