//! Step 10 of acceptance: writing an applied mutation in the turn's transaction — document
//! state, version + 1, the space's next feed seq, the audit record linked to the space's chain,
//! conflict-archive rows, the snapshot when due — and the entry the front fans out.

use automerge::{Change, ChangeHash};
use fieldsync_schema::wire::FeedPayload;
use fieldsync_schema::{EntityDoc, FeedEntry, Mutation, MutationKind, Origin, Outcome, Policy};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::accept::{cbor, to_bytes};
use super::archive;
use super::checks::state_json;
use super::lww;
use super::{Group, SpaceWorker};
use crate::audit::record_hash;
use crate::core::AppliedEntry;
use crate::store::{AuditRow, DocumentRow, DocumentUpdate, FeedRow, SpaceHead, SpaceStore, StoreError};

pub(super) struct WriteApplied<'a> {
    pub(super) m: &'a Mutation,
    pub(super) row: Option<&'a DocumentRow>,
    pub(super) doc: EntityDoc,
    pub(super) changes: &'a [Change],
    pub(super) extra_changes: Vec<Change>,
    pub(super) lww_plan: Option<lww::LwwPlan>,
    pub(super) before: &'a Map<String, Value>,
    pub(super) before_deleted: bool,
    pub(super) before_signed: bool,
    pub(super) before_heads: &'a [ChangeHash],
    /// The fields after the mutation, as validated.
    pub(super) after: Map<String, Value>,
    /// The older record a new one was flagged as possibly duplicating (SPEC §17).
    pub(super) duplicate_of: Option<Uuid>,
    pub(super) now_ms: u64,
    pub(super) group: &'a mut Group,
}

impl<S: SpaceStore> SpaceWorker<S> {
    pub(super) fn write_applied(&mut self, w: WriteApplied<'_>) -> Result<Outcome, StoreError> {
        let WriteApplied {
            m,
            row,
            mut doc,
            changes,
            extra_changes,
            lww_plan,
            before,
            before_deleted,
            before_signed,
            before_heads,
            after,
            duplicate_of,
            now_ms,
            group,
        } = w;
        let doc_key = match row {
            Some(r) => r.doc_key,
            None => self
                .store
                .insert_document(m.entity_id, m.space_id, &m.entity_type, now_ms)?,
        };
        let version = row.map_or(0, |r| r.version) + 1;
        // Where a sync window places the record, kept beside it for windowed pulls (SPEC §16).
        let window_day = self
            .schema
            .entity_type(&m.entity_type)
            .and_then(|t| t.window.as_ref())
            .and_then(|w| w.day_of_record(&after));
        let mut all_changes = to_bytes(changes);
        let relay_changes = to_bytes(&extra_changes);
        all_changes.extend(relay_changes.iter().cloned());
        let origin_payload = if relay_changes.is_empty() {
            FeedPayload::Own
        } else {
            FeedPayload::Changes(relay_changes)
        };
        let (lost, overridden, stamps) = match lww_plan {
            Some(p) => (p.lost, p.overridden, p.stamps_json),
            None => (
                Vec::new(),
                Vec::new(),
                row.map(|r| r.lww_stamps.clone()).unwrap_or_default(),
            ),
        };
        // The space's next place: its head, read once per turn inside the transaction.
        let head = match group.heads.remove(&m.space_id) {
            Some(h) => h,
            None => self.store.space_head(m.space_id)?,
        };
        let seq = head.seq + 1;
        self.store.append_feed(&FeedRow {
            seq,
            doc_key,
            space_id: m.space_id,
            entity_type: m.entity_type.clone(),
            entity_id: m.entity_id,
            version,
            origin_device: m.device_id,
            origin_user: m.user_id,
            mutation_id: m.mutation_id,
            hlc: m.client_timestamp,
            changes: cbor(&all_changes)?,
            lww_losses: cbor(&overridden)?,
        })?;
        self.store.update_document(
            doc_key,
            &DocumentUpdate {
                version,
                deleted: doc.is_deleted(),
                signed: doc.is_signed(),
                locked: doc.is_locked(),
                lww_stamps: stamps,
                window_day,
            },
            seq,
            now_ms,
        )?;
        let mut audit = AuditRow {
            audit_id: 0,
            audit_seq: head.audit_seq + 1,
            seq,
            mutation_id: m.mutation_id,
            actor_id: m.user_id,
            device_id: m.device_id,
            space_id: m.space_id,
            entity_type: m.entity_type.clone(),
            entity_id: m.entity_id,
            kind: m.kind.to_string(),
            version,
            before_json: if row.is_some() {
                state_json(before, before_deleted, before_signed)
            } else {
                "null".to_string()
            },
            after_json: state_json(&after, doc.is_deleted(), doc.is_signed()),
            client_ts: m.client_timestamp.to_string(),
            server_ts_ms: now_ms,
            prev_hash: head.audit_hash,
            hash: String::new(),
        };
        audit.hash = record_hash(&audit);
        self.store.append_audit(&audit)?;
        // The turn's transaction holds the space's write lock: its next record links here.
        group.heads.insert(
            m.space_id,
            SpaceHead {
                seq,
                audit_seq: audit.audit_seq,
                audit_hash: audit.hash.clone(),
            },
        );
        for loss in lost.iter().chain(&overridden) {
            self.store.archive(&archive::lww_row(m, loss, version, now_ms))?;
        }
        if m.kind == MutationKind::Resolve
            && let Some(ty) = self.schema.entity_type(&m.entity_type)
            && ty.policy != Policy::Lww
        {
            let before = archive::Before {
                fields: before,
                deleted: before_deleted,
                heads: before_heads,
            };
            for row in archive::resolution_rows(ty, m, changes, &doc, &before, version, now_ms) {
                self.store.archive(&row)?;
            }
        }
        let since = match self.since_snapshot.get(&doc_key) {
            Some(n) => n + 1,
            None => self.store.changes_since_snapshot(doc_key)?,
        };
        if self.since_snapshot.len() > 100_000 {
            // Only a hint for when to compact: forget it rather than grow without bound.
            self.since_snapshot.clear();
        }
        self.since_snapshot.insert(doc_key, since);
        if since >= self.config.snapshot_every {
            self.since_snapshot.insert(doc_key, 0);
            let bytes = doc.save();
            self.store.save_snapshot(doc_key, &bytes, seq)?;
        }
        self.docs.put(doc_key, version, doc);
        group.touched_docs.insert(doc_key);
        group.applied.push(AppliedEntry {
            entry: FeedEntry {
                seq,
                space_id: m.space_id,
                entity_type: m.entity_type.clone(),
                entity_id: m.entity_id,
                version,
                payload: FeedPayload::Changes(all_changes),
                origin: Some(Origin {
                    device_id: m.device_id,
                    user_id: m.user_id,
                    mutation_id: m.mutation_id,
                    hlc: m.client_timestamp,
                }),
                lww_losses: overridden,
            },
            origin_device: m.device_id,
            origin_payload,
        });
        Ok(Outcome::Applied {
            version,
            seq,
            lww_lost: lost,
            duplicate_of,
        })
    }
}
