//! What a blocking answer does to the device, inside the transaction that applies the push
//! result: the item is already marked `blocked` (halting the outbox); here the entity and the
//! record the user will see are written.

use fieldsync_schema::document::parse_change;
use fieldsync_schema::{Outcome, Schema};
use rusqlite::{Transaction, params};
use serde_json::Value;

use super::view;
use crate::entity::{self, SyncState, i64_of};
use crate::error::{PeerError, Result};
use crate::outbox::{self, OutboxItem};

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| PeerError::Corrupt(e.to_string()))
}

/// A `Conflict`: the relay's missing changes are merged into the local document (so it holds
/// both sides), the entity is marked `conflict`, and the answer is kept for the prompt.
pub(crate) fn record_conflict(
    tx: &Transaction<'_>,
    schema: &Schema,
    item: &OutboxItem,
    outcome: &Outcome,
    actor: automerge::ActorId,
    now_ms: u64,
) -> Result<()> {
    let Outcome::Conflict {
        server_version,
        server_changes,
        ..
    } = outcome
    else {
        return Ok(());
    };
    if let Some(mut loaded) = entity::load(tx, item.entity_id, actor)? {
        let changes = server_changes
            .iter()
            .map(|c| parse_change(&c.0))
            .collect::<Result<Vec<_>, _>>()?;
        loaded.doc.apply(changes)?;
        loaded.meta.relay_version = loaded.meta.relay_version.max(*server_version);
        loaded.meta.sync_state = SyncState::Conflict;
        entity::store(tx, schema, &loaded.meta, &mut loaded.doc, now_ms)?;
    }
    tx.execute(
        "INSERT INTO conflicts (entity_id, mutation_id, server_version, outcome, recorded_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            item.entity_id.to_string(),
            item.mutation_id.to_string(),
            i64_of(*server_version),
            json(outcome)?,
            i64_of(now_ms)
        ],
    )?;
    Ok(())
}

/// Any other blocking answer (signed, locked, invalid, forbidden): the relay will never apply
/// this item, so its values — with those of the entity's items queued behind it — are kept in
/// `rejected_edits` for their author, and the local document returns to the relay's state: a
/// signed note must not show text the relay refused, and later writes must not build on a
/// change that will never reach the relay. A record the relay never had (a refused create)
/// keeps its document until the user discards it. The items stay in the outbox, blocked and
/// pending, until the user discards them or makes an addendum: nothing is dropped implicitly.
pub(crate) fn record_rejection(
    tx: &Transaction<'_>,
    schema: &Schema,
    item: &OutboxItem,
    outcome: &Outcome,
    actor: automerge::ActorId,
    now_ms: u64,
) -> Result<()> {
    let Some(mut loaded) = entity::load(tx, item.entity_id, actor.clone())? else {
        return Ok(());
    };
    let kept = loaded.doc.fields();
    let deleted = loaded.doc.is_deleted();
    let upto = outbox::max_seq(tx)?;
    if loaded.meta.relay_version > 0 {
        let own = view::own_changes(tx, item.entity_id, Some(upto))?;
        let mut doc = view::relay_view(&mut loaded.doc, &own.hashes, actor)?;
        loaded.meta.sync_state = SyncState::Rejected;
        entity::store(tx, schema, &loaded.meta, &mut doc, now_ms)?;
    } else {
        entity::set_sync_state(tx, item.entity_id, SyncState::Rejected)?;
    }
    tx.execute(
        "INSERT INTO rejected_edits (entity_id, entity_type, mutation_id, outcome, fields, deleted, upto_seq,
                                     recorded_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            item.entity_id.to_string(),
            item.entity_type,
            item.mutation_id.to_string(),
            json(outcome)?,
            Value::Object(kept).to_string(),
            deleted,
            i64_of(upto),
            i64_of(now_ms)
        ],
    )?;
    Ok(())
}
