//! The conflict archive of resolutions (SPEC §10): when a `Resolve` mutation is applied, every
//! value that did not survive it goes to the archive, with the value that replaced it, so an
//! operator can review what each resolution discarded and from whom.
//!
//! A resolution carries the device's refused changes followed by its decision (the last change,
//! by the device's convention). So, per field (and the tombstone `_deleted`):
//!
//! - **base** is the document at the dependencies of the first carried change: what both sides
//!   started from;
//! - **theirs** is what the relay held before the mutation; a value theirs wrote (it differs
//!   from base) that the resolution replaced is archived as lost by the device that wrote it;
//! - **mine** is the document at the device's carried changes without the decision; a value
//!   mine wrote that the resolution replaced is archived as lost by the resolving device.
//!
//! A side that did not touch a field loses nothing there. A resolution that carries nothing but
//! its decision (a refused create cannot travel again) has no base: all of theirs counts.
//!
//! One row per lost field value: `losing_json` the lost value, `winning_json` the resolved one
//! (`null`: absent), like the LWW rows; the winner is whoever wrote the surviving value (the
//! other device after keep-theirs, the resolving device otherwise). The whole before and after states are in the mutation's
//! audit record. Counters are never lost (concurrent increments add up) and are skipped. LWW
//! types archive through their own per-field settlement instead.

use std::collections::BTreeSet;

use automerge::{Change, ChangeHash};
use fieldsync_schema::document::META_DELETED;
use fieldsync_schema::{EntityDoc, EntityType, FieldKind, LwwLoss, Mutation};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::store::ArchiveRow;

/// The relay's state before the resolution.
pub(super) struct Before<'a> {
    pub fields: &'a Map<String, Value>,
    pub deleted: bool,
    pub heads: &'a [ChangeHash],
}

/// The archive rows for an applied resolution `m` whose changes are `changes`; `doc` holds the
/// result.
pub(super) fn resolution_rows(
    ty: &EntityType,
    m: &Mutation,
    changes: &[Change],
    doc: &EntityDoc,
    before: &Before<'_>,
    version: u64,
    now_ms: u64,
) -> Vec<ArchiveRow> {
    // Every side as the current schema names it, so a field renamed since is compared once.
    let resolved = state(ty.view(doc.fields()), doc.is_deleted());
    let theirs = state(ty.view(before.fields.clone()), before.deleted);
    let (base, mine) = match changes.split_last() {
        Some((_, carried)) if !carried.is_empty() => {
            let base_heads = carried[0].deps();
            let base = state(ty.view(doc.fields_at(base_heads)), doc.is_deleted_at(base_heads));
            let mine = ty.view(mine_state(doc, carried, m.device_id));
            (Some(base), Some(mine))
        }
        _ => (None, None),
    };
    let mut keys: BTreeSet<&String> = resolved.keys().chain(theirs.keys()).collect();
    if let Some(mine) = &mine {
        keys.extend(mine.keys());
    }
    // Who the surviving value is credited to: the device that wrote it on the relay's side, when
    // the resolution kept a value the relay already held (keep-theirs: the other device, whose
    // mutation is in the document's feed and audit, not here); otherwise the resolving device
    // and its resolution (keep-mine, or a merged value typed in the resolution).
    let credit = |field: &str, won: &Value| -> (Option<Uuid>, Option<Uuid>) {
        let kept_from_relay = doc
            .values_at(field, before.heads)
            .into_iter()
            .find(|(v, _)| v == won)
            .and_then(|(_, d)| d)
            .filter(|d| *d != m.device_id);
        match kept_from_relay {
            Some(writer) => (Some(writer), None),
            None => (Some(m.device_id), Some(m.mutation_id)),
        }
    };
    let row = |field: &str, losing: &Value, winning: &Value, loser: Option<Uuid>, loser_mutation: Option<Uuid>| {
        let (winner_device, winner_mutation) = credit(field, winning);
        ArchiveRow {
            archive_id: 0,
            kind: "resolution".into(),
            space_id: m.space_id,
            entity_type: m.entity_type.clone(),
            entity_id: m.entity_id,
            field: Some(field.to_string()),
            losing_json: losing.to_string(),
            winning_json: winning.to_string(),
            loser_device: loser,
            loser_mutation,
            winner_device,
            winner_mutation,
            version,
            created_ms: now_ms,
        }
    };
    let mut rows = Vec::new();
    for key in keys {
        if matches!(ty.field(key).map(|f| &f.kind), Some(FieldKind::Counter { .. })) {
            continue;
        }
        let get = |s: &Map<String, Value>| s.get(key).cloned().unwrap_or(Value::Null);
        let won = get(&resolved);
        let started = base.as_ref().map(get);
        let lost_theirs = get(&theirs);
        if lost_theirs != won && started.as_ref() != Some(&lost_theirs) {
            let writer = doc
                .values_at(key, before.heads)
                .into_iter()
                .find(|(v, _)| *v == lost_theirs)
                .and_then(|(_, d)| d);
            rows.push(row(key, &lost_theirs, &won, writer, None));
        }
        if let Some(mine) = &mine {
            let lost_mine = get(mine);
            if lost_mine != won && started.as_ref() != Some(&lost_mine) {
                rows.push(row(key, &lost_mine, &won, Some(m.device_id), Some(m.mutation_id)));
            }
        }
    }
    rows
}

/// Fields plus the tombstone under `_deleted`, so both are compared the same way.
fn state(mut fields: Map<String, Value>, deleted: bool) -> Map<String, Value> {
    fields.insert(META_DELETED.to_string(), Value::Bool(deleted));
    fields
}

/// The record at the device's carried changes, preferring its own value wherever concurrent
/// values remain (changes it made after merging the relay's side).
fn mine_state(doc: &EntityDoc, carried: &[Change], device: Uuid) -> Map<String, Value> {
    let heads: Vec<ChangeHash> = carried.iter().map(Change::hash).collect();
    let mut fields = doc.fields_at(&heads);
    for (key, value) in fields.iter_mut() {
        let values = doc.values_at(key, &heads);
        if values.len() > 1
            && let Some((v, _)) = values.into_iter().find(|(_, d)| *d == Some(device))
        {
            *value = v;
        }
    }
    let deleted_values = doc.values_at(META_DELETED, &heads);
    let deleted = deleted_values
        .iter()
        .find(|(_, d)| deleted_values.len() > 1 && *d == Some(device))
        .or(deleted_values.first())
        .is_some_and(|(v, _)| *v == Value::Bool(true));
    state(fields, deleted)
}

/// The archive row of one LWW loss (the loser's value and the winner's).
pub(super) fn lww_row(m: &Mutation, loss: &LwwLoss, version: u64, now_ms: u64) -> ArchiveRow {
    ArchiveRow {
        archive_id: 0,
        kind: "lww".into(),
        space_id: m.space_id,
        entity_type: loss.entity_type.clone(),
        entity_id: loss.entity_id,
        field: Some(loss.field.clone()),
        losing_json: loss.loser_value.to_string(),
        winning_json: loss.winner_value.to_string(),
        loser_device: Some(loss.loser_device),
        loser_mutation: Some(loss.loser_mutation),
        winner_device: Some(loss.winner_device),
        winner_mutation: Some(loss.winner_mutation),
        version,
        created_ms: now_ms,
    }
}
