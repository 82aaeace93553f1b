//! Last-writer-wins per field, by (HLC, device id) — SPEC §5 and §9.
//!
//! Automerge alone would settle concurrent writes by its own operation order, not by the
//! writers' clocks; so the relay keeps, per field, the stamp of the write that currently wins
//! and decides each contested field itself. A write whose changes depend on the winner's change
//! saw the winner and simply replaces it. A concurrent write wins only with a greater (HLC,
//! device); the other side is recorded as a loss. Delete versus edit is decided the same way
//! through the `_deleted` key, as the IronFlow requirements ask: the later of the two stands
//! and the earlier is archived and reported to its device.
//!
//! "Saw" is decided by Automerge causality, not by `base_version`: a device's base counts its
//! own queued writes, so a second write queued offline has a base that may equal the version
//! another device's write got meanwhile, without having seen it.

use std::collections::BTreeMap;

use fieldsync_schema::document::META_DELETED;
use fieldsync_schema::{LwwLoss, Mutation, MutationKind};
use serde_json::{Map, Value};

use crate::store::{LwwStamp, StoreError};

/// The decision for one LWW mutation.
pub(crate) struct LwwPlan {
    /// The value each contested field must end with (`Null` = absent). `_deleted` is a bool.
    pub targets: BTreeMap<String, Value>,
    /// Stamps after this mutation, serialised for the document row.
    pub stamps_json: String,
    /// Fields this mutation lost (reported on its `Applied` outcome).
    pub lost: Vec<LwwLoss>,
    /// Values of earlier writers this mutation overrode (reported on its feed entry).
    pub overridden: Vec<LwwLoss>,
}

pub(crate) struct LwwInput<'a> {
    pub mutation: &'a Mutation,
    /// The document's current version (0 for a new entity) and its stamps.
    pub version: u64,
    pub stamps_json: &'a str,
    /// Keys the mutation's changes write (schema fields and reserved keys).
    pub touched: Vec<String>,
    pub before: &'a Map<String, Value>,
    pub before_deleted: bool,
    /// The fields as the writer left them (the document at the mutation's own heads).
    pub mine: &'a Map<String, Value>,
    pub mine_deleted: bool,
    /// The mutation's last change (hex), recorded in the stamps it wins.
    pub head: Option<String>,
    /// Whether the writer had the stamp's write when it wrote.
    pub saw: &'a mut dyn FnMut(&LwwStamp) -> bool,
}

fn beats(m: &Mutation, s: &LwwStamp) -> bool {
    (m.client_timestamp, m.device_id) > (s.hlc, s.device)
}

pub(crate) fn parse_stamps(json: &str) -> Result<BTreeMap<String, LwwStamp>, StoreError> {
    if json.is_empty() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("LWW stamps: {e}")))
}

pub(crate) fn plan(input: LwwInput<'_>) -> Result<LwwPlan, StoreError> {
    let m = input.mutation;
    let mut stamps = parse_stamps(input.stamps_json)?;
    let new_version = input.version + 1;
    let saw = input.saw;
    let my_stamp = LwwStamp {
        hlc: m.client_timestamp,
        device: m.device_id,
        mutation: m.mutation_id,
        version: new_version,
        change: input.head.clone(),
    };
    let value_of = |map: &Map<String, Value>, deleted: bool, f: &str| -> Value {
        if f == META_DELETED {
            Value::Bool(deleted)
        } else {
            map.get(f).cloned().unwrap_or(Value::Null)
        }
    };
    let loss = |f: &str, loser: &LwwStamp, loser_value: Value, winner: &LwwStamp, winner_value: Value| LwwLoss {
        entity_type: m.entity_type.clone(),
        entity_id: m.entity_id,
        field: f.to_string(),
        loser_device: loser.device,
        loser_mutation: loser.mutation,
        loser_hlc: loser.hlc,
        loser_value,
        winner_device: winner.device,
        winner_mutation: winner.mutation,
        winner_hlc: winner.hlc,
        winner_value,
    };

    // What this mutation wants for `_deleted`, if it contests it at all.
    let wants_deleted = match m.kind {
        MutationKind::Delete => Some(true),
        MutationKind::Resolve if input.touched.iter().any(|k| k == META_DELETED) => Some(input.mine_deleted),
        _ if input.before_deleted => Some(false), // an edit of a deleted entity contests the delete
        _ => None,
    };
    let mut targets = BTreeMap::new();
    let mut lost = Vec::new();
    let mut overridden = Vec::new();
    let mut lost_the_tombstone = false;

    if let Some(wanted) = wants_deleted {
        // A delete competes with the newest concurrent write to any field; an edit of a deleted
        // entity competes with the delete.
        let rival = if m.kind == MutationKind::Delete {
            stamps
                .iter()
                .filter(|(_, s)| !saw(s))
                .max_by(|a, b| (a.1.hlc, a.1.device).cmp(&(b.1.hlc, b.1.device)))
                .map(|(f, s)| (f.clone(), s.clone()))
        } else {
            stamps
                .get(META_DELETED)
                .filter(|s| !saw(s))
                .map(|s| (META_DELETED.to_string(), s.clone()))
        };
        match rival {
            Some((_, rival)) if !beats(m, &rival) => {
                lost_the_tombstone = true;
                lost.push(loss(
                    META_DELETED,
                    &my_stamp,
                    Value::Bool(wanted),
                    &rival,
                    Value::Bool(input.before_deleted),
                ));
                targets.insert(META_DELETED.to_string(), Value::Bool(input.before_deleted));
            }
            Some((field, rival)) => {
                overridden.push(loss(
                    &field,
                    &rival,
                    value_of(input.before, input.before_deleted, &field),
                    &my_stamp,
                    Value::Bool(wanted),
                ));
                stamps.insert(META_DELETED.to_string(), my_stamp.clone());
                targets.insert(META_DELETED.to_string(), Value::Bool(wanted));
            }
            None => {
                stamps.insert(META_DELETED.to_string(), my_stamp.clone());
                targets.insert(META_DELETED.to_string(), Value::Bool(wanted));
            }
        }
    }

    for f in input.touched.iter().filter(|f| !f.starts_with('_')) {
        let mine = value_of(input.mine, input.mine_deleted, f);
        let before = value_of(input.before, input.before_deleted, f);
        let existing = stamps.get(f).filter(|s| !saw(s)).cloned();
        let wins = !lost_the_tombstone && existing.as_ref().is_none_or(|s| beats(m, s));
        if wins {
            if let Some(s) = &existing {
                overridden.push(loss(f, s, before, &my_stamp, mine.clone()));
            }
            stamps.insert(f.clone(), my_stamp.clone());
            targets.insert(f.clone(), mine);
        } else {
            let winner = existing.unwrap_or_else(|| stamps.get(META_DELETED).cloned().unwrap_or(my_stamp.clone()));
            lost.push(loss(f, &my_stamp, mine, &winner, before.clone()));
            targets.insert(f.clone(), before);
        }
    }
    let stamps_json = serde_json::to_string(&stamps).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(LwwPlan {
        targets,
        stamps_json,
        lost,
        overridden,
    })
}
