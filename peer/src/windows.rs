//! Sync windows on the device (SPEC §16): a device that syncs by windows downloads, the first
//! time, only records dated inside their type's window (the relay leaves the others out of its
//! snapshot pages); it fetches what it needs of the rest — every record a held record
//! references, and whatever the user asks for (`fetch`) — and may evict records that left
//! their window.
//!
//! What a windowed device holds is simply what is in its `entities` table. A change the relay
//! sends for a record it does not hold cannot be applied (it builds on changes the device never
//! got) and is skipped: the record stays out until fetched, whole. Fetches wait in a queue in
//! `meta` that survives restarts and goes out at the next connection, after the pull.
//!
//! Eviction never touches a record with anything unconfirmed (pending or blocked changes), with
//! any conflict or rejection on record, or that another held record references: what it
//! removes is exactly what the relay holds and a fetch brings back.

use std::collections::BTreeSet;

use fieldsync_schema::FeedEntry;
use rusqlite::Connection;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::db::{self, keys};
use crate::device::Device;
use crate::error::{PeerError, Result};
use crate::{conflict, entity, outbox};

/// Automatic eviction leaves records stored on this device within this long (a day).
const RECENTLY_STORED_MS: u64 = 24 * 60 * 60 * 1000;

/// What [`Device::fetch`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchState {
    /// The device holds the record already.
    Held,
    /// Queued: it is fetched at the next connection.
    Queued,
}

/// What [`Device::evict`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EvictReport {
    /// Records removed from the device (the relay holds them; `fetch` brings them back).
    pub evicted: u64,
    /// Records outside their window kept because something of them is not settled: unsynced
    /// or blocked changes, a conflict or rejection on record.
    pub kept_unsettled: u64,
    /// Records outside their window kept because a held record references them.
    pub kept_referenced: u64,
}

impl Device {
    /// Whether this device syncs by windows.
    pub fn windowed(&self) -> Result<bool> {
        windowed(&self.conn)
    }

    /// Syncs by windows from the next connection on, or stops. Stopping drops the pull
    /// position, so the next pull brings everything the windows left out (what is held merges
    /// as a no-op); starting keeps what the device holds (`evict` removes what left its window).
    pub fn set_windowed(&mut self, on: bool) -> Result<()> {
        let tx = self.conn.transaction()?;
        let was = windowed(&tx)?;
        if on {
            db::meta_set(&tx, keys::WINDOWED, "1")?;
        } else {
            db::meta_delete(&tx, keys::WINDOWED)?;
            db::meta_delete(&tx, keys::EVICT_ABOVE)?;
            if was {
                db::meta_delete(&tx, keys::CURSOR)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Asks for a record the device does not hold (outside its window, or evicted): queued, and
    /// fetched whole with its references at the next connection. Works offline.
    pub fn fetch(&mut self, entity_type: &str, id: Uuid) -> Result<FetchState> {
        if self.schema.entity_type(entity_type).is_none() {
            return Err(PeerError::unknown_type(&self.schema, entity_type));
        }
        if self
            .synced_types()?
            .is_some_and(|held| !held.iter().any(|t| t == entity_type))
        {
            // Its later changes would never arrive (selective sync): it would go stale here.
            return Err(PeerError::NotAllowed(format!(
                "this device does not hold `{entity_type}` records (`types --set`)"
            )));
        }
        if let Some(held) = entity::get(&self.conn, id)? {
            if held.entity_type != entity_type {
                return Err(PeerError::WrongType {
                    id,
                    expected: entity_type.to_string(),
                    actual: held.entity_type,
                });
            }
            return Ok(FetchState::Held);
        }
        let tx = self.conn.transaction()?;
        queue_fetch(&tx, [id])?;
        tx.commit()?;
        Ok(FetchState::Queued)
    }

    /// The records waiting to be fetched, oldest first.
    pub fn fetch_queue(&self) -> Result<Vec<Uuid>> {
        fetch_queue(&self.conn)
    }

    /// Up to `limit` ids to ask the relay for; ids the device came to hold meanwhile (a pull
    /// brought them) leave the queue here.
    pub(crate) fn fetch_batch(&mut self, limit: usize) -> Result<Vec<Uuid>> {
        let queue = fetch_queue(&self.conn)?;
        if queue.is_empty() {
            return Ok(queue);
        }
        let mut waiting = Vec::with_capacity(queue.len());
        for id in &queue {
            if entity::get(&self.conn, *id)?.is_none() {
                waiting.push(*id);
            }
        }
        if waiting.len() != queue.len() {
            db::meta_set_json(&self.conn, keys::FETCH_QUEUE, &waiting)?;
        }
        waiting.truncate(limit);
        Ok(waiting)
    }

    /// Evicts automatically after a sync whenever the device holds more than `bound` records
    /// (`None`: only when asked). Only for a device that syncs by windows.
    pub fn set_eviction_bound(&mut self, bound: Option<u64>) -> Result<()> {
        match bound {
            Some(_) if !self.windowed()? => Err(PeerError::NotAllowed(
                "only a device that syncs by windows evicts (`windows --on`)".into(),
            )),
            Some(n) => db::meta_set(&self.conn, keys::EVICT_ABOVE, &n.to_string()),
            None => db::meta_delete(&self.conn, keys::EVICT_ABOVE),
        }
    }

    /// The bound [`Device::set_eviction_bound`] set.
    pub fn eviction_bound(&self) -> Result<Option<u64>> {
        match db::meta_get(&self.conn, keys::EVICT_ABOVE)? {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| PeerError::Corrupt(format!("meta `{}`: {text}", keys::EVICT_ABOVE))),
        }
    }

    /// Evicts when the device holds more records than its bound (after each completed sync).
    pub(crate) fn evict_if_over_bound(&mut self) -> Result<Option<EvictReport>> {
        let Some(bound) = self.eviction_bound()? else {
            return Ok(None);
        };
        if !self.windowed()? || entity::count(&self.conn)? <= bound {
            return Ok(None);
        }
        let recent = self.now_ms().saturating_sub(RECENTLY_STORED_MS);
        self.evict_stored_before(recent).map(Some)
    }

    /// Removes records outside their window that are synced and settled and that no held record
    /// references, repeating until nothing more can go (a record referenced only by evicted
    /// ones goes too). Only on a device that syncs by windows: another device would receive
    /// changes to the evicted records that it could no longer apply.
    pub fn evict(&mut self) -> Result<EvictReport> {
        self.evict_stored_before(u64::MAX)
    }

    /// [`Device::evict`], leaving records stored here at `stored_before_ms` or later (automatic
    /// eviction keeps what just arrived — a record fetched a moment ago is what the user is
    /// looking at).
    fn evict_stored_before(&mut self, stored_before_ms: u64) -> Result<EvictReport> {
        if !self.windowed()? {
            return Err(PeerError::NotAllowed(
                "only a device that syncs by windows evicts (`windows --on`)".into(),
            ));
        }
        let now_ms = self.now_ms();
        let schema = self.schema.clone();
        let tx = self.conn.transaction()?;
        let mut report = EvictReport::default();
        loop {
            let mut round = EvictReport::default();
            let referenced = entity::referenced_ids(&tx, &schema)?;
            for ty in schema.types() {
                let Some(window) = &ty.window else { continue };
                for entity::Settled { id, fields, stored_ms } in entity::synced_of_type(&tx, &ty.name)? {
                    if window.contains(&fields, now_ms) || stored_ms >= stored_before_ms {
                        continue;
                    }
                    if outbox::unconfirmed_for(&tx, id)? > 0 || conflict::has_history(&tx, id)? {
                        round.kept_unsettled += 1;
                    } else if referenced.contains(&id) {
                        round.kept_referenced += 1;
                    } else {
                        outbox::forget_confirmed_for(&tx, id)?;
                        entity::erase(&tx, id)?;
                        round.evicted += 1;
                    }
                }
            }
            report.evicted += round.evicted;
            if round.evicted == 0 {
                report.kept_unsettled = round.kept_unsettled;
                report.kept_referenced = round.kept_referenced;
                break;
            }
        }
        tx.commit()?;
        Ok(report)
    }
}

pub(crate) fn windowed(conn: &Connection) -> Result<bool> {
    Ok(db::meta_get(conn, keys::WINDOWED)?.is_some())
}

fn fetch_queue(conn: &Connection) -> Result<Vec<Uuid>> {
    Ok(db::meta_get_json(conn, keys::FETCH_QUEUE)?.unwrap_or_default())
}

/// Adds `ids` to the fetch queue (once each).
pub(crate) fn queue_fetch(conn: &Connection, ids: impl IntoIterator<Item = Uuid>) -> Result<()> {
    let mut queue = fetch_queue(conn)?;
    let before = queue.len();
    for id in ids {
        if !queue.contains(&id) {
            queue.push(id);
        }
    }
    if queue.len() != before {
        db::meta_set_json(conn, keys::FETCH_QUEUE, &queue)?;
    }
    Ok(())
}

/// Takes answered ids (fetched or unknown to the relay) off the queue.
pub(crate) fn unqueue_fetch(conn: &Connection, answered: &BTreeSet<Uuid>) -> Result<()> {
    let mut queue = fetch_queue(conn)?;
    let before = queue.len();
    queue.retain(|id| !answered.contains(id));
    if queue.len() != before {
        db::meta_set_json(conn, keys::FETCH_QUEUE, &queue)?;
    }
    Ok(())
}

/// The ids `fields` (a stored record of `entity_type`) references that the device does not
/// hold: fetched so that a held record's references are never missing.
pub(crate) fn missing_references(
    conn: &Connection,
    schema: &fieldsync_schema::Schema,
    entity_type: &str,
    fields: &Map<String, Value>,
) -> Result<Vec<Uuid>> {
    let Some(ty) = schema.entity_type(entity_type) else {
        return Ok(Vec::new());
    };
    let held_types: Option<Vec<String>> = db::meta_get_json(conn, keys::SYNCED_TYPES)?;
    let mut missing = Vec::new();
    for (field, to) in ty.ref_fields() {
        // A type the device does not hold: its records would go stale here (selective sync).
        if held_types.as_ref().is_some_and(|held| !held.iter().any(|t| t == to)) {
            continue;
        }
        let Some(id) = fields
            .get(&field.name)
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
        else {
            continue;
        };
        if entity::get(conn, id)?.is_none() {
            missing.push(id);
        }
    }
    Ok(missing)
}

/// The ids a fetch answer settles: every record it brought and every id the relay does not
/// know (or will not show).
pub(crate) fn answered(entries: &[FeedEntry], unknown: &[Uuid]) -> BTreeSet<Uuid> {
    entries
        .iter()
        .map(|e| e.entity_id)
        .chain(unknown.iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use fieldsync_schema::{FeedPayload, PullCursor, Role, TimeSource};
    use serde_json::json;

    use super::*;
    use crate::testutil::{Fixture, T0, enroll, obj, space};

    fn enrolled(seed: u64) -> Fixture {
        let mut f = Fixture::new(seed);
        enroll(&mut f.dev, Role::Clinician);
        f
    }

    /// The changes of every outbox item `writer` made for `id`, oldest first.
    fn changes_of(writer: &Fixture, id: Uuid) -> Vec<fieldsync_schema::Bytes> {
        let mut all = Vec::new();
        for item in writer.dev.queue(true).unwrap() {
            if item.entity_id == id {
                all.extend(writer.dev.envelope(item.mutation_id).unwrap().unwrap().changes);
            }
        }
        all
    }

    /// A feed entry at `seq` carrying the record's first version: every change its writer made
    /// (a later version, only its own changes, is `later`).
    fn entry(seq: u64, entity_type: &str, id: Uuid, changes: Vec<fieldsync_schema::Bytes>) -> FeedEntry {
        FeedEntry {
            seq,
            space_id: space(),
            entity_type: entity_type.into(),
            entity_id: id,
            version: 1,
            payload: FeedPayload::Changes(changes),
            origin: None,
            lww_losses: Vec::new(),
        }
    }

    #[test]
    fn a_change_to_a_record_not_held_is_skipped_and_a_whole_one_is_applied() {
        let mut writer = enrolled(1);
        let patient = writer.patient("Ada Brandt");
        writer
            .dev
            .update("patient", patient, obj(json!({"mrn": "M-1"})))
            .unwrap();
        let changes = changes_of(&writer, patient);
        assert_eq!(changes.len(), 2, "a create and an update");

        let mut reader = enrolled(2);
        reader.dev.set_windowed(true).unwrap();
        let update_only = FeedEntry {
            version: 2,
            ..entry(1, "patient", patient, changes[1..].to_vec())
        };
        reader
            .dev
            .apply_feed(&[update_only], PullCursor::at(space(), 1), T0)
            .unwrap();
        assert!(
            reader.dev.get(patient).unwrap().is_none(),
            "not held: skipped, the record comes whole with fetch"
        );
        assert_eq!(reader.dev.cursor().unwrap().seq(&space()), 1, "the position moves on");

        let whole = entry(2, "patient", patient, changes);
        reader.dev.apply_feed(&[whole], PullCursor::at(space(), 2), T0).unwrap();
        assert_eq!(reader.dev.get(patient).unwrap().unwrap().fields["mrn"], json!("M-1"));
    }

    #[test]
    fn a_stored_record_queues_the_references_the_device_does_not_hold() {
        let mut writer = enrolled(1);
        let patient = writer.patient("Ada Brandt");
        let session = writer
            .dev
            .put(
                "session",
                None,
                obj(json!({"patient_id": patient.to_string(), "started_at": "2026-11-20T09:00:00Z"})),
            )
            .unwrap()
            .entity_id;
        let mut reader = enrolled(2);
        reader.dev.set_windowed(true).unwrap();
        let e = entry(1, "session", session, changes_of(&writer, session));
        reader.dev.apply_feed(&[e], PullCursor::at(space(), 1), T0).unwrap();
        assert!(reader.dev.get(session).unwrap().is_some());
        assert_eq!(reader.dev.fetch_queue().unwrap(), vec![patient]);
        // Once held (a pull brought it), it leaves the queue without being asked for.
        let e = entry(2, "patient", patient, changes_of(&writer, patient));
        reader.dev.apply_feed(&[e], PullCursor::at(space(), 2), T0).unwrap();
        assert!(reader.dev.fetch_batch(MAX).unwrap().is_empty());
        assert!(reader.dev.fetch_queue().unwrap().is_empty());
    }

    #[test]
    fn fetch_refuses_an_unknown_type_and_a_held_record_of_another_type() {
        let mut f = enrolled(1);
        let patient = f.patient("Ada Brandt");
        assert!(matches!(
            f.dev.fetch("patinet", patient),
            Err(PeerError::UnknownType { .. })
        ));
        assert!(matches!(
            f.dev.fetch("session", patient),
            Err(PeerError::WrongType { .. })
        ));
        assert_eq!(f.dev.fetch("patient", patient).unwrap(), FetchState::Held);
        let elsewhere = Uuid::from_u128(9);
        assert_eq!(f.dev.fetch("patient", elsewhere).unwrap(), FetchState::Queued);
        assert_eq!(f.dev.fetch("patient", elsewhere).unwrap(), FetchState::Queued);
        assert_eq!(f.dev.fetch_queue().unwrap(), vec![elsewhere], "queued once");
    }

    #[test]
    fn eviction_at_a_bound_leaves_what_arrived_within_a_day_and_settled_history_decides() {
        let mut writer = enrolled(1);
        let old = writer
            .dev
            .put("journal_entry", None, obj(json!({"date": "2024-01-02", "body": "old"})))
            .unwrap()
            .entity_id;
        let mut reader = enrolled(2);
        reader.dev.set_windowed(true).unwrap();
        reader.dev.set_eviction_bound(Some(0)).unwrap();
        let e = entry(1, "journal_entry", old, changes_of(&writer, old));
        reader.dev.apply_feed(&[e], PullCursor::at(space(), 1), T0).unwrap();
        let kept = reader.dev.evict_if_over_bound().unwrap().unwrap();
        assert_eq!(
            kept.evicted, 0,
            "fetched or pulled a moment ago: the user may be looking at it"
        );
        reader.time.advance(25 * 60 * 60 * 1000);
        assert_eq!(reader.dev.evict_if_over_bound().unwrap().unwrap().evicted, 1);
        assert!(reader.dev.get(old).unwrap().is_none());

        // Asked for, eviction takes what arrived just now too.
        let e = entry(2, "journal_entry", old, changes_of(&writer, old));
        reader
            .dev
            .apply_feed(&[e], PullCursor::at(space(), 2), reader.time.now_ms())
            .unwrap();
        assert_eq!(reader.dev.evict().unwrap().evicted, 1);
    }

    #[test]
    fn a_device_holding_some_types_neither_fetches_nor_follows_references_to_others() {
        let mut writer = enrolled(1);
        let patient = writer.patient("Ada Brandt");
        let session = writer
            .dev
            .put(
                "session",
                None,
                obj(json!({"patient_id": patient.to_string(), "started_at": "2026-11-20T09:00:00Z"})),
            )
            .unwrap()
            .entity_id;
        let mut reader = enrolled(2);
        reader.dev.set_windowed(true).unwrap();
        reader.dev.set_synced_types(Some(vec!["session".into()])).unwrap();
        let e = entry(1, "session", session, changes_of(&writer, session));
        reader.dev.apply_feed(&[e], PullCursor::at(space(), 1), T0).unwrap();
        assert!(
            reader.dev.fetch_queue().unwrap().is_empty(),
            "its later changes would never come"
        );
        assert!(matches!(
            reader.dev.fetch("patient", patient),
            Err(PeerError::NotAllowed(_))
        ));
    }

    const MAX: usize = 64;
}
