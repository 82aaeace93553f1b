//! The store half of sync: what the machine's decisions do to the device database. Each
//! relay answer is applied in one transaction, so a crash leaves either all of a page (and its
//! cursor) or none of it.

use fieldsync_schema::document::parse_change;
use fieldsync_schema::wire::{FeedEntry, FeedPayload, MutationResult, PullCursor};
use fieldsync_schema::{Disposition, EntityDoc, Hlc, HlcClock, Mutation, Outcome, Schema};
use rusqlite::{Transaction, TransactionBehavior};
use serde::Serialize;
use uuid::Uuid;

use crate::conflict::lww;
use crate::db::{self, keys};
use crate::device::{Device, Notice};
use crate::entity::{self, EntityMeta, SyncState};
use crate::error::{PeerError, Result};
use crate::{outbox, windows};

/// What one `PushResult` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PushTally {
    pub applied: u64,
    pub conflicts: u64,
    pub rejected: u64,
    pub not_attempted: u64,
}

impl Device {
    pub(crate) fn pushable(&self, now_ms: u64, limit: usize) -> Result<Vec<Mutation>> {
        outbox::pushable(&self.conn, now_ms, limit)
    }

    pub(crate) fn next_due(&self) -> Result<Option<u64>> {
        outbox::next_due(&self.conn)
    }

    /// Whether a blocked item halts the outbox.
    pub(crate) fn is_halted(&self) -> Result<bool> {
        Ok(outbox::first_blocked(&self.conn)?.is_some())
    }

    pub(crate) fn pending_count(&self) -> Result<u64> {
        outbox::pending_count(&self.conn)
    }

    pub(crate) fn mark_sent(&mut self, ids: &[Uuid], now_ms: u64) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for id in ids {
            outbox::mark_sent(&tx, *id, now_ms)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Applies a batch's answers by mutation id. Items of the batch without an answer stay
    /// pending (sent again under the same id).
    pub(crate) fn apply_push_results(
        &mut self,
        batch: &[Uuid],
        results: &[MutationResult],
        now_ms: u64,
    ) -> Result<PushTally> {
        let actor = self.actor();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut tally = PushTally::default();
        let mut notices = Vec::new();
        for r in results {
            if !batch.contains(&r.mutation_id) {
                return Err(PeerError::Corrupt(format!(
                    "the relay answered for mutation {}, which is not in the batch",
                    r.mutation_id
                )));
            }
            let item = outbox::get(&tx, r.mutation_id)?.ok_or(PeerError::NoSuchMutation(r.mutation_id))?;
            match r.outcome.disposition() {
                Disposition::Done => {
                    let (version, _) = r.outcome.applied().unwrap_or((0, 0));
                    outbox::mark_applied(&tx, r.mutation_id, &r.outcome, version)?;
                    entity::learn_relay_version(&tx, item.entity_id, version)?;
                    let applied = match &r.outcome {
                        Outcome::AlreadyApplied { original } => original.as_ref(),
                        other => other,
                    };
                    if let Outcome::Applied {
                        lww_lost, duplicate_of, ..
                    } = applied
                    {
                        for loss in lww_lost {
                            lww::record_loss(&tx, loss, now_ms)?;
                            notices.push(loss_notice(loss));
                        }
                        if let Some(other) = duplicate_of {
                            notices.push(Notice::PossibleDuplicate {
                                entity_type: item.entity_type.clone(),
                                entity_id: item.entity_id,
                                duplicate_of: *other,
                            });
                        }
                    }
                    settle_entity(&tx, item.entity_id)?;
                    tally.applied += 1;
                }
                Disposition::Blocking => {
                    outbox::mark_blocked(&tx, r.mutation_id, &r.outcome)?;
                    let (entity_type, entity_id) = (item.entity_type.clone(), item.entity_id);
                    if matches!(r.outcome, Outcome::Conflict { .. }) {
                        crate::conflict::record_conflict(&tx, &self.schema, &item, &r.outcome, actor.clone(), now_ms)?;
                        tally.conflicts += 1;
                        notices.push(Notice::Conflict { entity_type, entity_id });
                    } else {
                        crate::conflict::record_rejection(&tx, &self.schema, &item, &r.outcome, actor.clone(), now_ms)?;
                        tally.rejected += 1;
                        notices.push(Notice::Rejected { entity_type, entity_id });
                    }
                }
                Disposition::Retry => {
                    outbox::schedule_retry(&tx, r.mutation_id, 0, &r.outcome.describe())?;
                    tally.not_attempted += 1;
                }
            }
        }

        tx.commit()?;
        self.notices.extend(notices);
        Ok(tally)
    }

    /// A batch the relay did not process: every item stays pending, due again at `next_ms`.
    pub(crate) fn defer_batch(&mut self, batch: &[Uuid], next_ms: u64, reason: &str) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for id in batch {
            outbox::schedule_retry(&tx, *id, next_ms, reason)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Where the next pull continues. A cursor stored before per-space order (`{"seq": N}` of
    /// the relay's old global feed) is handed back as `legacy_seq` for the relay to convert.
    pub fn cursor(&self) -> Result<PullCursor> {
        stored_cursor(&self.conn)
    }

    /// Applies a page of feed entries and moves the cursor, in one transaction.
    pub(crate) fn apply_feed(&mut self, entries: &[FeedEntry], cursor: PullCursor, now_ms: u64) -> Result<()> {
        let (actor, device_id) = (self.actor(), self.device_id);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let notices = apply_entries(&tx, &self.schema, &mut self.hlc, actor, device_id, entries, now_ms)?;
        db::meta_set_json(&tx, keys::CURSOR, &cursor)?;
        tx.commit()?;
        self.notices.extend(notices);
        Ok(())
    }

    /// Applies live entries, each only if it is the next of its space (a gap means the device
    /// missed something: what follows waits for a pull), and moves each space's position.
    /// Returns whether every entry fitted; `false` asks the machine to pull.
    pub(crate) fn apply_live(&mut self, entries: &[FeedEntry], now_ms: u64) -> Result<bool> {
        let (actor, device_id) = (self.actor(), self.device_id);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut cursor = stored_cursor(&tx)?;
        let (next, fitted) = contiguous(entries, &mut cursor);
        let notices = apply_entries(&tx, &self.schema, &mut self.hlc, actor, device_id, &next, now_ms)?;
        db::meta_set_json(&tx, keys::CURSOR, &cursor)?;
        tx.commit()?;
        self.notices.extend(notices);
        Ok(fitted)
    }

    /// Applies the answer to a fetch: the records it brought (whole), in one transaction; every
    /// id it answered leaves the queue, and what the records reference joins it.
    pub(crate) fn apply_fetched(&mut self, entries: &[FeedEntry], unknown: &[Uuid], now_ms: u64) -> Result<()> {
        let (actor, device_id) = (self.actor(), self.device_id);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        windows::unqueue_fetch(&tx, &windows::answered(entries, unknown))?;
        let notices = apply_entries(&tx, &self.schema, &mut self.hlc, actor, device_id, entries, now_ms)?;
        tx.commit()?;
        self.notices.extend(notices);
        Ok(())
    }

    /// What this device asks the relay to send it (its `Hello`'s delivery fields), as stored.
    pub(crate) fn delivery(&self) -> Result<Delivery> {
        Ok(Delivery {
            types: self.synced_types()?,
            windowed: self.windowed()?,
            metered: self.metered()?,
        })
    }

    /// The relay said whether it walks snapshots in priority order. An unfinished snapshot
    /// from one that did, continued on one that does not, would miss the reference data the
    /// first walk skipped: such a space's snapshot starts again (what is held merges as no-ops).
    pub(crate) fn note_relay_priority(&mut self, priority: bool) -> Result<()> {
        let was = db::meta_get(&self.conn, keys::PRIORITY_WALK)?.is_some();
        if priority == was {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        if priority {
            db::meta_set(&tx, keys::PRIORITY_WALK, "1")?;
        } else {
            db::meta_delete(&tx, keys::PRIORITY_WALK)?;
            let mut cursor = stored_cursor(&tx)?;
            cursor.spaces.retain(|_, position| position.snapshot.is_none());
            db::meta_set_json(&tx, keys::CURSOR, &cursor)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Folds the relay's clock into the HLC (so local stamps follow what the relay has seen).
    pub(crate) fn observe_relay_time(&mut self, server_time_ms: u64, now_ms: u64) -> Result<()> {
        let remote = Hlc {
            physical_ms: server_time_ms,
            counter: 0,
            device: Uuid::nil(),
        };
        self.hlc.observe(&remote, now_ms);
        db::meta_set_json(&self.conn, keys::HLC, &self.hlc.last())
    }

    pub(crate) fn set_auth_failed(&mut self, reason: Option<&str>) -> Result<()> {
        match reason {
            Some(r) => db::meta_set(&self.conn, keys::AUTH_FAILED, r),
            None => db::meta_delete(&self.conn, keys::AUTH_FAILED),
        }
    }

    /// The schema version the relay said it serves at the last `Welcome` (status shows it beside
    /// the device's own).
    pub(crate) fn record_relay_schema_version(&mut self, version: u64) -> Result<()> {
        db::meta_set(&self.conn, keys::RELAY_SCHEMA_VERSION, &version.to_string())
    }

    /// Why the relay cannot take this device's changes yet (its schema is older), or `None`.
    pub(crate) fn set_relay_behind(&mut self, message: Option<&str>) -> Result<()> {
        match message {
            Some(m) => db::meta_set(&self.conn, keys::RELAY_BEHIND, m),
            None => db::meta_delete(&self.conn, keys::RELAY_BEHIND),
        }
    }

    /// Records a completed sync; a windowed device over its eviction bound evicts then.
    pub(crate) fn record_sync_complete(&mut self, now_ms: u64) -> Result<()> {
        db::meta_set(&self.conn, keys::LAST_SYNC, &now_ms.to_string())?;
        // Housekeeping, not part of the sync: if it fails, the records stay and the sync stands
        // (`evict` run by hand reports the error).
        let _ = self.evict_if_over_bound();
        Ok(())
    }

    pub(crate) fn set_link(&mut self, online: bool, caught_up: bool) {
        self.link.online = online;
        self.link.caught_up = caught_up;
    }
}

/// The delivery fields of a `Hello`: which types, whether by windows, whether on a metered link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub types: Option<Vec<String>>,
    pub windowed: bool,
    pub metered: bool,
}

/// Applies feed entries in `tx`, folding their origins' clocks into the device's HLC; returns
/// what an app's listener hears once `tx` commits.
fn apply_entries(
    tx: &Transaction<'_>,
    schema: &Schema,
    hlc: &mut HlcClock,
    actor: automerge::ActorId,
    device_id: Uuid,
    entries: &[FeedEntry],
    now_ms: u64,
) -> Result<Vec<Notice>> {
    crate::write::fold_stored_hlc(hlc, tx)?;
    let windowed = windows::windowed(tx)?;
    let mut notices = Vec::new();
    for e in entries {
        notices.extend(
            e.lww_losses
                .iter()
                .filter(|l| l.loser_device == device_id)
                .map(loss_notice),
        );
        if apply_entry(tx, schema, e, actor.clone(), device_id, windowed, now_ms)? {
            notices.push(Notice::Changed {
                entity_type: e.entity_type.clone(),
                entity_id: e.entity_id,
            });
        }
        if let Some(origin) = &e.origin {
            hlc.observe(&origin.hlc, now_ms);
        }
    }
    db::meta_set_json(tx, keys::HLC, &hlc.last())?;
    Ok(notices)
}

fn loss_notice(loss: &fieldsync_schema::LwwLoss) -> Notice {
    Notice::LwwLoss {
        entity_type: loss.entity_type.clone(),
        entity_id: loss.entity_id,
        field: loss.field.clone(),
    }
}

/// The stored cursor; the round-1 form `{"seq": N, "snapshot": ...}` becomes `legacy_seq: N`
/// (or nothing, if a snapshot was under way: it restarts, and applying a snapshot again is
/// harmless).
fn stored_cursor(conn: &rusqlite::Connection) -> Result<PullCursor> {
    let Some(value) = db::meta_get_json::<serde_json::Value>(conn, keys::CURSOR)? else {
        return Ok(PullCursor::default());
    };
    if let Some(seq) = value.get("seq").and_then(serde_json::Value::as_u64) {
        let snapshot_under_way = value.get("snapshot").is_some_and(|s| !s.is_null());
        return Ok(PullCursor {
            spaces: Default::default(),
            legacy_seq: (!snapshot_under_way && seq > 0).then_some(seq),
        });
    }
    serde_json::from_value(value).map_err(|e| PeerError::Corrupt(format!("meta `{}`: {e}", keys::CURSOR)))
}

/// The entries that continue `cursor` space by space (the next seq of their space, in order),
/// with `cursor` moved past them, and whether every entry did. An entry at or below the
/// position is one the device already has (dropped); one beyond it means a gap: it and the rest
/// of its space wait for a pull.
fn contiguous(entries: &[FeedEntry], cursor: &mut PullCursor) -> (Vec<FeedEntry>, bool) {
    let mut fitted = true;
    let mut gapped = std::collections::BTreeSet::new();
    let mut next = Vec::new();
    for e in entries {
        let position = cursor.spaces.entry(e.space_id).or_default();
        if gapped.contains(&e.space_id) || position.snapshot.is_some() || e.seq > position.seq + 1 {
            gapped.insert(e.space_id);
            fitted = false;
        } else if e.seq == position.seq + 1 {
            position.seq = e.seq;
            // A type this device does not hold: only its place in the feed (selective sync).
            if !matches!(e.payload, FeedPayload::NotSelected) {
                next.push(e.clone());
            }
        }
    }
    (next, fitted)
}

/// An entity whose outbox items are all confirmed is synced (a conflict or rejection stays
/// until resolved).
fn settle_entity(tx: &Transaction<'_>, id: Uuid) -> Result<()> {
    if outbox::unconfirmed_for(tx, id)? == 0 {
        entity::mark_synced_if_pending(tx, id)?;
    }
    Ok(())
}

/// Applies one entry; returns whether the record changed on this device (a listener hears of it).
/// On a device that syncs by windows, a change to a record it does not hold is skipped (it
/// builds on changes the device never got: the record comes whole when fetched), and the
/// references of every record stored are fetched if not held.
fn apply_entry(
    tx: &Transaction<'_>,
    schema: &Schema,
    e: &FeedEntry,
    actor: automerge::ActorId,
    device_id: Uuid,
    windowed: bool,
    now_ms: u64,
) -> Result<bool> {
    for loss in e.lww_losses.iter().filter(|l| l.loser_device == device_id) {
        lww::record_loss(tx, loss, now_ms)?;
    }
    if matches!(e.payload, FeedPayload::NotSelected) {
        return Ok(false);
    }
    if matches!(e.payload, FeedPayload::Own) {
        // This device's own change: nothing to merge, only the relay version to learn (a record
        // this device no longer holds, restored from an older backup, comes with a later
        // snapshot or change). Loading the document would cost more than everything else here.
        entity::learn_relay_version(tx, e.entity_id, e.version)?;
        return Ok(false);
    }
    let existing = entity::load(tx, e.entity_id, actor.clone())?;
    if let Some(l) = &existing
        && l.meta.entity_type != e.entity_type
    {
        return Err(PeerError::Corrupt(format!(
            "the relay sent entity {} as a `{}`, but it is a `{}` here",
            e.entity_id, e.entity_type, l.meta.entity_type
        )));
    }
    let (mut meta, mut doc) = match existing {
        Some(l) => (l.meta, l.doc),
        None => {
            let meta = EntityMeta {
                entity_id: e.entity_id,
                entity_type: e.entity_type.clone(),
                space_id: e.space_id,
                relay_version: 0,
                sync_state: SyncState::Synced,
            };
            (meta, EntityDoc::new(actor))
        }
    };
    let heads_before = doc.heads(); // empty for a document this entry creates here
    match &e.payload {
        FeedPayload::Changes(bytes) => {
            let changes = bytes
                .iter()
                .map(|b| parse_change(&b.0))
                .collect::<Result<Vec<_>, _>>()?;
            doc.apply(changes)?;
            // Not held: only a record's first version can start it here (a later one builds on
            // changes the device never got, even where, like a concurrent create of the same
            // id, nothing says so).
            if windowed && heads_before.is_empty() && (e.version > 1 || !doc.missing_deps().is_empty()) {
                return Ok(false);
            }
        }
        FeedPayload::Snapshot(bytes) => {
            // Merge, never replace: local changes the relay has not seen yet must survive.
            doc.automerge()
                .load_incremental(&bytes.0)
                .map_err(|err| PeerError::Corrupt(format!("snapshot of {}: {err}", e.entity_id)))?;
        }
        FeedPayload::Own | FeedPayload::NotSelected => return Ok(false), // handled above
    }
    if !heads_before.is_empty() && heads_before == doc.heads() && meta.space_id == e.space_id {
        // Nothing new (a snapshot or change this device already holds, such as its own
        // records after a pull from scratch): record the version, skip re-saving the document.
        entity::learn_relay_version(tx, e.entity_id, e.version)?;
        return Ok(false);
    }
    meta.relay_version = meta.relay_version.max(e.version);
    meta.space_id = e.space_id;
    entity::store(tx, schema, &meta, &mut doc, now_ms)?;
    if windowed {
        let fields = entity::viewed(schema, &meta.entity_type, doc.fields());
        windows::queue_fetch(tx, windows::missing_references(tx, schema, &meta.entity_type, &fields)?)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use fieldsync_schema::{FeedEntry, FeedPayload, PullCursor};
    use uuid::Uuid;

    use super::contiguous;

    fn entry(space: Uuid, seq: u64, payload: FeedPayload) -> FeedEntry {
        FeedEntry {
            seq,
            space_id: space,
            entity_type: if payload == FeedPayload::NotSelected {
                String::new()
            } else {
                "patient".into()
            },
            entity_id: if payload == FeedPayload::NotSelected {
                Uuid::nil()
            } else {
                Uuid::from_u128(seq.into())
            },
            version: seq,
            payload,
            origin: None,
            lww_losses: Vec::new(),
        }
    }

    #[test]
    fn an_entry_of_a_type_not_held_moves_the_position_and_is_not_applied() {
        let space = Uuid::from_u128(7);
        let mut cursor = PullCursor::at(space, 4);
        let entries = [
            entry(space, 5, FeedPayload::NotSelected),
            entry(space, 6, FeedPayload::Changes(Vec::new())),
        ];
        let (next, fitted) = contiguous(&entries, &mut cursor);
        assert!(fitted, "no gap: the skipped entry still counts as the next one");
        assert_eq!(next.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6]);
        assert_eq!(cursor.seq(&space), 6);
        // Without its place the next entry would be a gap, waiting for a pull.
        let mut cursor = PullCursor::at(space, 4);
        let (next, fitted) = contiguous(&entries[1..], &mut cursor);
        assert!(!fitted && next.is_empty());
        assert_eq!(cursor.seq(&space), 4);
    }
}
