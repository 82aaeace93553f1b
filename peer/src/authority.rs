//! What SPEC §17 gives a device: possible duplicates the relay flagged, merged or dismissed by
//! the user, and requests a service superseded (a reschedule overtaken by a new plan).
//!
//! The flags and notices arrive as ordinary fields of the records (`duplicate_of`, written by
//! the relay; `superseded_*`, written by the service), so they sync, survive restarts and show
//! on every device of the user without any state of their own here.

use fieldsync_schema::MutationKind;
use fieldsync_schema::registry::{
    DUPLICATE_OF, SUPERSEDED_AT, SUPERSEDED_BY_VERSION, SUPERSEDED_NOTICE, is_service_record, merged_fields,
};
use rusqlite::TransactionBehavior;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::device::Device;
use crate::entity::Entity;
use crate::error::{PeerError, Result};
use crate::rules::Op;
use crate::write::WriteReceipt;

/// A record the relay flagged as possibly the same as another live one.
#[derive(Debug, Clone, Serialize)]
pub struct PossibleDuplicate {
    pub entity_type: String,
    /// The flagged (newer) record.
    pub entity_id: Uuid,
    /// The record it may duplicate.
    pub duplicate_of: Uuid,
    pub fields: Map<String, Value>,
    pub other_fields: Map<String, Value>,
}

/// What a merge wrote.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// The record that keeps the combined data.
    pub survivor: Uuid,
    /// The record that became a tombstone naming the survivor in `merged_into`.
    pub merged: Uuid,
    /// The fields the survivor took from the merged record.
    pub took: Map<String, Value>,
    /// The survivor's update (none when it lacked nothing) and the merged record's tombstone.
    pub survivor_write: Option<WriteReceipt>,
    pub tombstone_write: WriteReceipt,
}

/// A user's request a service marked superseded; the request itself is kept.
#[derive(Debug, Clone, Serialize)]
pub struct SupersededRequest {
    pub entity_type: String,
    pub entity_id: Uuid,
    /// The type the request was for (`plan`).
    pub request_for: String,
    pub superseded_at: Option<String>,
    pub superseded_by_version: Option<i64>,
    pub notice: Option<String>,
    pub fields: Map<String, Value>,
}

impl Device {
    /// Live records flagged as possible duplicates of another live record, oldest type first.
    pub fn possible_duplicates(&self) -> Result<Vec<PossibleDuplicate>> {
        let mut out = Vec::new();
        let types: Vec<String> = self
            .schema()
            .types()
            .filter(|t| t.duplicates.is_some())
            .map(|t| t.name.clone())
            .collect();
        for ty in types {
            for e in self.list(&ty, &[], false)? {
                let Some(other) = flagged(&e) else { continue };
                match self.get(other)? {
                    Some(o) if !o.deleted && o.entity_type == e.entity_type => out.push(PossibleDuplicate {
                        entity_type: e.entity_type.clone(),
                        entity_id: e.entity_id,
                        duplicate_of: other,
                        fields: e.fields.clone(),
                        other_fields: o.fields,
                    }),
                    // The other record was deleted or merged since: nothing left to decide.
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Merges a flagged record with the one it may duplicate, in one local transaction: the
    /// survivor (the service's record when one of the two is, so its measured values stay the
    /// service's; else the older record) takes the other's values by field authority, and the
    /// other becomes a tombstone naming the survivor in `merged_into`. Both histories stay.
    /// Refused while the other record holds a field this app's schema version does not know.
    pub fn merge_duplicate(&mut self, flagged_id: Uuid) -> Result<MergeReport> {
        let flagged_entity = self.live(flagged_id)?;
        let other_id = flagged(&flagged_entity)
            .ok_or_else(|| PeerError::NotAllowed(format!("{flagged_id} is not flagged as a possible duplicate")))?;
        let other_entity = self.live(other_id)?;
        if other_entity.entity_type != flagged_entity.entity_type {
            return Err(PeerError::NotAllowed(format!(
                "{flagged_id} and {other_id} are not of the same type"
            )));
        }
        let ty = self
            .schema()
            .entity_type(&flagged_entity.entity_type)
            .ok_or_else(|| PeerError::unknown_type(self.schema(), &flagged_entity.entity_type))?
            .clone();
        let flagged_is_service = is_service_record(&ty, &flagged_entity.fields);
        let other_is_service = is_service_record(&ty, &other_entity.fields);
        let (survivor, merged) = if flagged_is_service && !other_is_service {
            (flagged_entity, other_entity)
        } else {
            (other_entity, flagged_entity)
        };
        // A field a newer schema version added would be dropped: the merge could not carry it.
        if let Some(key) = merged
            .fields
            .iter()
            .find(|(k, v)| !v.is_null() && ty.field(k).is_none())
            .map(|(k, _)| k)
        {
            return Err(PeerError::NotAllowed(format!(
                "{} holds `{key}`, which this app's schema (version {}) does not know, so a merge \
                 would lose it; update the app to merge, or keep both",
                merged.entity_id,
                self.schema().version()
            )));
        }
        let survivor_is_service = is_service_record(&ty, &survivor.fields);
        let took = merged_fields(&ty, &survivor.fields, &merged.fields, survivor_is_service);
        let mut patch = took.clone();
        if survivor.fields.contains_key(DUPLICATE_OF) {
            patch.insert(DUPLICATE_OF.into(), Value::Null); // the flag is settled
        }
        let now = self.now_ms();
        let (conn, mut w) = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        w.fold_clock(&tx)?;
        let survivor_write = if patch.is_empty() {
            None
        } else {
            Some(w.write(
                &tx,
                &ty.name,
                Some(survivor.entity_id),
                None,
                Op::Put(patch),
                false,
                now,
            )?)
        };
        let tombstone = w.write(
            &tx,
            &ty.name,
            Some(merged.entity_id),
            None,
            Op::MergeInto(survivor.entity_id),
            false,
            now,
        )?;
        debug_assert_eq!(tombstone.kind, MutationKind::Delete);
        w.finish(&tx)?;
        tx.commit()?;
        Ok(MergeReport {
            survivor: survivor.entity_id,
            merged: merged.entity_id,
            took,
            survivor_write,
            tombstone_write: tombstone,
        })
    }

    /// Dismisses a possible-duplicate flag: the two records are distinct and both stay.
    pub fn dismiss_duplicate(&mut self, flagged_id: Uuid) -> Result<WriteReceipt> {
        let e = self.live(flagged_id)?;
        if flagged(&e).is_none() {
            return Err(PeerError::NotAllowed(format!(
                "{flagged_id} is not flagged as a possible duplicate"
            )));
        }
        let mut patch = Map::new();
        patch.insert(DUPLICATE_OF.into(), Value::Null);
        self.update(&e.entity_type, flagged_id, patch)
    }

    /// Requests (records of types with `request_for`) a service marked superseded.
    pub fn superseded_requests(&self) -> Result<Vec<SupersededRequest>> {
        let mut out = Vec::new();
        let types: Vec<(String, String)> = self
            .schema()
            .types()
            .filter_map(|t| t.request_for.clone().map(|f| (t.name.clone(), f)))
            .collect();
        for (ty, request_for) in types {
            for e in self.list(&ty, &[], false)? {
                if e.fields.get(SUPERSEDED_AT).is_none_or(Value::is_null) {
                    continue;
                }
                out.push(SupersededRequest {
                    entity_type: e.entity_type.clone(),
                    entity_id: e.entity_id,
                    request_for: request_for.clone(),
                    superseded_at: e.fields.get(SUPERSEDED_AT).and_then(Value::as_str).map(str::to_string),
                    superseded_by_version: e.fields.get(SUPERSEDED_BY_VERSION).and_then(Value::as_i64),
                    notice: e
                        .fields
                        .get(SUPERSEDED_NOTICE)
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    fields: e.fields,
                });
            }
        }
        Ok(out)
    }

    /// Marks a request superseded (a service's write: the fields are the service's). Nothing is
    /// deleted; the user's device lists the request with `notice`.
    pub fn supersede_request(&mut self, id: Uuid, by_version: i64, notice: &str) -> Result<WriteReceipt> {
        let e = self.live(id)?;
        let is_request = self
            .schema()
            .entity_type(&e.entity_type)
            .is_some_and(|t| t.request_for.is_some());
        if !is_request {
            return Err(PeerError::NotAllowed(format!(
                "`{}` is not a request type (it declares no `request_for`)",
                e.entity_type
            )));
        }
        let mut patch = Map::new();
        let now = fieldsync_schema::time_fmt::render_ms(self.now_ms());
        patch.insert(SUPERSEDED_AT.into(), Value::String(now));
        patch.insert(SUPERSEDED_BY_VERSION.into(), Value::from(by_version));
        patch.insert(SUPERSEDED_NOTICE.into(), Value::String(notice.to_string()));
        self.update(&e.entity_type, id, patch)
    }

    fn live(&self, id: Uuid) -> Result<Entity> {
        match self.get(id)? {
            Some(e) if !e.deleted => Ok(e),
            Some(e) => Err(PeerError::refused(&e.entity_type, id, "it is deleted".to_string())),
            None => Err(PeerError::NotFound { entity_type: None, id }),
        }
    }
}

/// The record a flagged record may duplicate.
fn flagged(e: &Entity) -> Option<Uuid> {
    e.fields
        .get(DUPLICATE_OF)
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
}
