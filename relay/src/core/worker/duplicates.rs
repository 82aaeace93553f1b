//! Possible duplicates (SPEC §17): the relay keeps an index of every live record of a type
//! that declares `duplicates` and, when a new record matches one, flags it — it writes the
//! other record's id into the new record's `duplicate_of`, as the relay's own change in the
//! same version, so every replica sees the flag with the record. Nothing is merged here: the
//! user merges (a tombstone naming its survivor) or dismisses (clears the flag).

use automerge::Change;
use fieldsync_schema::registry::{DUPLICATE_OF, duplicate_key};
use fieldsync_schema::{EntityDoc, EntityType, Mutation, MutationKind};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::SpaceWorker;
use crate::store::{DuplicateKeyRow, SpaceStore, StoreError};

impl<S: SpaceStore> SpaceWorker<S> {
    /// Keeps the index current for the record `m` wrote and flags a new record that matches
    /// an older live one. `after` and `extra` receive the flag when one is written; the
    /// flagged record's match is returned (for the `Applied` outcome).
    pub(super) fn index_duplicates(
        &mut self,
        ty: &EntityType,
        m: &Mutation,
        doc: &mut EntityDoc,
        after: &mut Map<String, Value>,
        extra: &mut Vec<Change>,
        now_ms: u64,
    ) -> Result<Option<Uuid>, StoreError> {
        let Some(window) = ty.duplicates.as_ref().map(|d| i64::from(d.within_minutes) * 60_000) else {
            return Ok(None);
        };
        let mut flagged = None;
        let key = if doc.is_deleted() {
            None
        } else {
            duplicate_key(ty, after)
        };
        if m.kind == MutationKind::Create
            && let Some((key, at_ms)) = &key
        {
            let found = self
                .store
                .duplicate_candidates(m.space_id, &ty.name, key, at_ms - window, at_ms + window)?;
            if let Some(other) = found.into_iter().find(|id| *id != m.entity_id) {
                let mut flag = Map::new();
                flag.insert(DUPLICATE_OF.into(), Value::String(other.to_string()));
                doc.write_fields(ty, &flag)
                    .map_err(|e| StoreError::Corrupt(format!("flagging a duplicate: {e}")))?;
                if let Some(change) = doc.commit(now_ms) {
                    extra.push(change);
                }
                after.extend(flag);
                flagged = Some(other);
                tracing::debug!(entity = %m.entity_id, %other, "possible duplicate flagged");
            }
        }
        self.store.put_duplicate_key(&DuplicateKeyRow {
            entity_id: m.entity_id,
            space_id: m.space_id,
            entity_type: ty.name.clone(),
            at_ms: key.as_ref().map_or(0, |k| k.1),
            key: key.map(|k| k.0),
        })?;
        Ok(flagged)
    }
}
