//! Local writes: validate first, then commit document, materialised fields and outbox entry in
//! one SQLite transaction.
//!
//! Every write runs inside one `BEGIN IMMEDIATE` transaction that loads the one document it
//! needs, so a failed check leaves nothing behind (the transaction is dropped) and a reported
//! success is on disk (`synchronous=FULL`) before the call returns.

use fieldsync_schema::document::{NoteSignature, content_hash};
use fieldsync_schema::registry::MERGED_INTO;
use fieldsync_schema::wire::MAX_MUTATION_CHANGE_BYTES;
use fieldsync_schema::{EntityDoc, EntityType, FieldKind, Mutation, MutationKind, ValidationErrors, ids, signing};
use rusqlite::{Transaction, TransactionBehavior};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::db::{self, keys};
use crate::device::Device;
use crate::entity::{self, EntityMeta, SyncState};
use crate::error::{PeerError, Result};
use crate::outbox;
use crate::rules::{self, Op};

/// Writes to one record made offline are combined into one mutation only up to this size, so
/// a long offline session never grows an envelope the relay would refuse (its limit is
/// `MAX_MUTATION_CHANGE_BYTES` of changes per mutation).
pub(crate) const COMBINE_LIMIT_BYTES: usize = MAX_MUTATION_CHANGE_BYTES / 4;

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteReceipt {
    pub entity_id: Uuid,
    pub entity_type: String,
    pub kind: MutationKind,
    /// The outbox item carrying the change; `None` when the write changed nothing.
    pub mutation_id: Option<Uuid>,
    /// The change was appended to the previous, never-sent item for the same entity.
    pub combined: bool,
    /// Hash of the Automerge change this write made.
    pub change_hash: Option<String>,
}

impl Device {
    /// Creates (`id` absent or unknown) or updates (`id` known) an entity with a JSON patch;
    /// `null` removes an optional field. Prints nothing, returns the id in the receipt.
    pub fn put(&mut self, entity_type: &str, id: Option<Uuid>, patch: Map<String, Value>) -> Result<WriteReceipt> {
        self.put_in_space(None, entity_type, id, patch)
    }

    /// `put`, naming the space a new entity goes to (one of the user's; the default otherwise).
    pub fn put_in_space(
        &mut self,
        space: Option<Uuid>,
        entity_type: &str,
        id: Option<Uuid>,
        patch: Map<String, Value>,
    ) -> Result<WriteReceipt> {
        self.write(entity_type.into(), id, space, Op::Put(patch), true)
    }

    /// Updates an existing entity (errors if it does not exist).
    pub fn update(&mut self, entity_type: &str, id: Uuid, patch: Map<String, Value>) -> Result<WriteReceipt> {
        self.write(entity_type.into(), Some(id), None, Op::Put(patch), false)
    }

    /// Tombstones an entity: deletes are never physical.
    pub fn delete(&mut self, entity_type: &str, id: Uuid) -> Result<WriteReceipt> {
        self.write(entity_type.into(), Some(id), None, Op::Delete, false)
    }

    /// Edits a text field in place (a minimal splice), so concurrent edits elsewhere survive.
    pub fn edit_text(&mut self, entity_type: &str, id: Uuid, field: &str, text: &str) -> Result<WriteReceipt> {
        let op = Op::Text {
            field: field.to_string(),
            text: text.to_string(),
        };
        self.write(entity_type.into(), Some(id), None, op, false)
    }

    /// Edits a note's `body`.
    pub fn edit_note(&mut self, id: Uuid, text: &str) -> Result<WriteReceipt> {
        self.edit_text("note", id, "body", text)
    }

    /// Signs a note as the enrolled user; the note is immutable from then on.
    pub fn sign_note(&mut self, id: Uuid) -> Result<WriteReceipt> {
        self.write("note".into(), Some(id), None, Op::Sign, false)
    }

    /// Sets `locked: true` on a lockable record; it is read-only from then on.
    pub fn lock(&mut self, entity_type: &str, id: Uuid) -> Result<WriteReceipt> {
        self.write(entity_type.into(), Some(id), None, Op::Lock, false)
    }

    /// Adds `by` to a counter field.
    pub fn increment(&mut self, entity_type: &str, id: Uuid, field: &str, by: i64) -> Result<WriteReceipt> {
        let op = Op::Increment {
            field: field.to_string(),
            by,
        };
        self.write(entity_type.into(), Some(id), None, op, false)
    }

    fn write(
        &mut self,
        entity_type: String,
        id: Option<Uuid>,
        space: Option<Uuid>,
        op: Op,
        may_create: bool,
    ) -> Result<WriteReceipt> {
        let now = self.time.now_ms();
        let (conn, mut w) = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process (a `sync --watch`) may have moved the clock on since this one opened.
        w.fold_clock(&tx)?;
        let receipt = w.write(&tx, &entity_type, id, space, op, may_create, now)?;
        if receipt.mutation_id.is_none() {
            // Nothing changed (every value equal to the current one): nothing to commit.
            return Ok(receipt);
        }
        w.finish(&tx)?;
        tx.commit()?;
        Ok(receipt)
    }

    /// The connection, and everything else a write needs borrowed apart from it, so that a
    /// write can run inside a transaction the caller holds (resolutions, addenda, undo).
    pub(crate) fn writer(&mut self) -> (&mut rusqlite::Connection, Writer<'_>) {
        let user_id = self.user_id();
        let actor = self.actor();
        (
            &mut self.conn,
            Writer {
                schema: &self.schema,
                enrollment: self.enrollment.as_ref(),
                actor,
                signer: Signer {
                    rng: &mut self.rng,
                    key: &self.key,
                    hlc: &mut self.hlc,
                    device_id: self.device_id,
                    user_id,
                },
            },
        )
    }
}

/// A write in progress: the parts of a `Device` a write needs besides its transaction.
pub(crate) struct Writer<'a> {
    pub schema: &'a fieldsync_schema::Schema,
    pub enrollment: Option<&'a crate::device::Enrollment>,
    pub actor: automerge::ActorId,
    pub signer: Signer<'a>,
}

impl Writer<'_> {
    /// Folds the HLC stamp persisted by other processes into this one's clock.
    pub fn fold_clock(&mut self, tx: &Transaction<'_>) -> Result<()> {
        fold_stored_hlc(self.signer.hlc, tx)
    }

    /// Records that a write happened: the write counter (sign-out's "exported since the last
    /// write?") and the HLC's last stamp.
    pub fn finish(&mut self, tx: &Transaction<'_>) -> Result<()> {
        let counter = db::meta_get_u64(tx, keys::WRITE_COUNTER)?.unwrap_or(0) + 1;
        db::meta_set(tx, keys::WRITE_COUNTER, &counter.to_string())?;
        db::meta_set_json(tx, keys::HLC, &self.signer.hlc.last())
    }

    /// One local write inside `tx`: load, check, apply, commit the change, store the document
    /// and queue (or combine) the mutation. The caller commits `tx` and calls `finish`.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        tx: &Transaction<'_>,
        entity_type: &str,
        id: Option<Uuid>,
        space: Option<Uuid>,
        op: Op,
        may_create: bool,
        now: u64,
    ) -> Result<WriteReceipt> {
        crate::wipe::refuse_if_wiped(tx)?;
        let schema = self.schema;
        let ty = schema
            .entity_type(entity_type)
            .ok_or_else(|| PeerError::unknown_type(schema, entity_type))?;
        let existing = match id {
            Some(id) => entity::load(tx, id, self.actor.clone())?,
            None => None,
        };
        let (mut meta, mut doc, kind) = match existing {
            Some(loaded) => {
                if loaded.meta.entity_type != entity_type {
                    return Err(PeerError::WrongType {
                        id: loaded.meta.entity_id,
                        expected: entity_type.to_string(),
                        actual: loaded.meta.entity_type,
                    });
                }
                let kind = rules::kind_of(&op, false);
                (loaded.meta, loaded.doc, kind)
            }
            None => {
                let Op::Put(_) = op else {
                    return Err(not_found(entity_type, id));
                };
                if !may_create {
                    return Err(not_found(entity_type, id));
                }
                let entity_id = match id {
                    Some(id) => id,
                    None => ids::new_uuid(&mut self.signer.rng),
                };
                let space_id = rules::space_for_create(self.enrollment, space)?;
                let meta = EntityMeta {
                    entity_id,
                    entity_type: entity_type.to_string(),
                    space_id,
                    relay_version: 0,
                    sync_state: SyncState::Pending,
                };
                let mut doc = EntityDoc::new(self.actor.clone());
                doc.init_type(entity_type)?;
                (meta, doc, MutationKind::Create)
            }
        };
        rules::check_allowed(ty, &doc, &meta, kind, self.enrollment)?;
        apply_op(&mut self.signer, tx, ty, &meta, &mut doc, op, kind, now)?;
        if kind == MutationKind::Create {
            doc.init_counters(ty)?;
        }
        let Some(change) = doc.commit(now) else {
            return Ok(WriteReceipt {
                entity_id: meta.entity_id,
                entity_type: entity_type.to_string(),
                kind,
                mutation_id: None,
                combined: false,
                change_hash: None,
            });
        };
        if let Some(role) = self.enrollment.and_then(|e| e.role_in(meta.space_id)) {
            // Field authority (SPEC §17), judged on what the change really touches.
            let ops = fieldsync_schema::document::RootOps::of(std::slice::from_ref(&change))?;
            if let Some(reason) = fieldsync_schema::registry::ownership_refusal(ty, role, &ops, kind.may_merge()) {
                return Err(PeerError::refused(&meta.entity_type, meta.entity_id, reason));
            }
        }
        let change_hash = change.hash().to_string();
        if matches!(meta.sync_state, SyncState::Synced | SyncState::Pending) {
            meta.sync_state = SyncState::Pending;
        }
        entity::store(tx, self.schema, &meta, &mut doc, now)?;
        let (mutation_id, combined) = self.signer.enqueue(tx, &meta, kind, change.raw_bytes().to_vec(), now)?;
        Ok(WriteReceipt {
            entity_id: meta.entity_id,
            entity_type: entity_type.to_string(),
            kind,
            mutation_id: Some(mutation_id),
            combined,
            change_hash: Some(change_hash),
        })
    }
}

/// Validates and performs the operation on the document (not yet committed).
#[allow(clippy::too_many_arguments)]
fn apply_op(
    signer: &mut Signer<'_>,
    tx: &Transaction<'_>,
    ty: &EntityType,
    meta: &EntityMeta,
    doc: &mut EntityDoc,
    op: Op,
    kind: MutationKind,
    now: u64,
) -> Result<()> {
    // Signatures cover what the document stores; rules judge the record as this schema names it.
    let current = doc.fields();
    let viewed = ty.view_of(&current);
    match op {
        Op::Put(patch) => {
            rules::validate_patch(tx, ty, meta, &viewed, &patch, kind == MutationKind::Create)?;
            doc.write_fields(ty, &patch)?;
        }
        Op::Delete => doc.set_deleted(true)?,
        Op::MergeInto(survivor) => {
            let mut patch = Map::new();
            patch.insert(MERGED_INTO.into(), Value::String(survivor.to_string()));
            if survivor == meta.entity_id {
                return Err(PeerError::refused(
                    &meta.entity_type,
                    meta.entity_id,
                    "a record cannot be merged into itself",
                ));
            }
            rules::validate_patch(tx, ty, meta, &viewed, &patch, false)?;
            doc.write_fields(ty, &patch)?;
            doc.set_deleted(true)?;
        }
        Op::Text { field, text } => {
            match ty.field(&field).map(|f| &f.kind) {
                Some(FieldKind::Text { .. }) => {}
                _ => {
                    return Err(PeerError::refused(
                        &meta.entity_type,
                        meta.entity_id,
                        format!("`{field}` is not a text field of `{}`", ty.name),
                    ));
                }
            }
            let mut patch = Map::new();
            patch.insert(field.clone(), Value::String(text.clone()));
            rules::validate_patch(tx, ty, meta, &viewed, &patch, false)?;
            doc.set_text(&field, &text)?;
        }
        Op::Lock => {
            let mut patch = Map::new();
            patch.insert("locked".into(), Value::Bool(true));
            rules::validate_patch(tx, ty, meta, &viewed, &patch, false)?;
            doc.write_fields(ty, &patch)?;
        }
        Op::Increment { field, by } => {
            match ty.field(&field).map(|f| &f.kind) {
                Some(FieldKind::Counter { .. }) => {}
                _ => {
                    return Err(PeerError::refused(
                        &meta.entity_type,
                        meta.entity_id,
                        format!("`{field}` is not a counter field of `{}`", ty.name),
                    ));
                }
            }
            let old = viewed.get(&field).and_then(Value::as_i64).unwrap_or(0);
            let mut merged = viewed.clone().into_owned();
            merged.insert(field.clone(), Value::from(old.saturating_add(by)));
            // Only what the increment sets is judged: a field from a newer schema version this
            // device does not know must not refuse the increment (it stays untouched).
            let errors = rules::schema_errors(ty, &merged, |f| f == field);
            if !errors.is_empty() {
                return Err(PeerError::Invalid {
                    entity_type: ty.name.clone(),
                    errors: ValidationErrors(errors),
                });
            }
            doc.increment(&field, by)?;
        }
        Op::Sign => {
            let signer_user = signer.user_id;
            let hash = hex::encode(content_hash(&current));
            let bytes = signing::note_signature_bytes(
                &meta.entity_id,
                &content_hash(&current),
                &signer_user,
                &signer.device_id,
                now,
            );
            let sig = NoteSignature {
                signer_user,
                signer_device: signer.device_id,
                signed_at_ms: now,
                content_hash: hash,
                signature: hex::encode(signer.key.sign(&bytes)),
            };
            doc.set_signature(&sig)?;
        }
    }
    Ok(())
}

/// What signs and stamps a write: the device key, its HLC and its RNG (for mutation ids).
pub(crate) struct Signer<'a> {
    pub rng: &'a mut crate::device::DeviceRng,
    pub key: &'a fieldsync_schema::DeviceKey,
    pub hlc: &'a mut fieldsync_schema::HlcClock,
    pub device_id: Uuid,
    pub user_id: Uuid,
}

impl Signer<'_> {
    /// A new signed mutation for `meta` with a fresh id and HLC stamp.
    pub fn mutation(
        &mut self,
        meta: &EntityMeta,
        kind: MutationKind,
        base_version: Option<u64>,
        changes: Vec<Vec<u8>>,
        now: u64,
    ) -> Mutation {
        let mut m = Mutation {
            mutation_id: ids::new_uuid(&mut self.rng),
            device_id: self.device_id,
            user_id: self.user_id,
            space_id: meta.space_id,
            entity_type: meta.entity_type.clone(),
            entity_id: meta.entity_id,
            kind,
            client_timestamp: self.hlc.tick(now),
            base_version,
            changes: changes.into_iter().map(Into::into).collect(),
            signature: Default::default(),
        };
        self.key.sign_mutation(&mut m);
        m
    }

    /// Appends a signed envelope, or combines the change into the previous never-sent item for
    /// the same entity when both kinds allow it. Returns (mutation id, combined).
    fn enqueue(
        &mut self,
        tx: &Transaction<'_>,
        meta: &EntityMeta,
        kind: MutationKind,
        change: Vec<u8>,
        now: u64,
    ) -> Result<(Uuid, bool)> {
        if change.len() > MAX_MUTATION_CHANGE_BYTES {
            return Err(PeerError::refused(
                &meta.entity_type,
                meta.entity_id,
                format!(
                    "this write is a change of {} bytes, over the relay's limit of {MAX_MUTATION_CHANGE_BYTES} \
                     bytes per mutation; save it in smaller edits",
                    change.len()
                ),
            ));
        }
        if let Some((seq, mut last)) = outbox::last_unsent(tx)?
            && last.entity_id == meta.entity_id
            && rules::combinable(last.kind, kind)
            && last.changes.iter().map(|c| c.0.len()).sum::<usize>() + change.len() <= COMBINE_LIMIT_BYTES
        {
            last.changes.push(change.into());
            last.client_timestamp = self.hlc.tick(now);
            self.key.sign_mutation(&mut last);
            outbox::replace_envelope(tx, seq, &last)?;
            return Ok((last.mutation_id, true));
        }
        let base_version = match kind {
            MutationKind::Create => None,
            _ => Some(meta.relay_version + outbox::unconfirmed_for(tx, meta.entity_id)?),
        };
        let m = self.mutation(meta, kind, base_version, vec![change], now);
        outbox::append(tx, &m, now)?;
        Ok((m.mutation_id, false))
    }
}

fn not_found(entity_type: &str, id: Option<Uuid>) -> PeerError {
    PeerError::NotFound {
        entity_type: Some(entity_type.to_string()),
        id: id.unwrap_or_default(),
    }
}

/// Folds the HLC stamp persisted in `meta` into this process's clock, so stamps stay monotonic
/// when several processes (the CLI and a `sync --watch`) use one device directory.
pub(crate) fn fold_stored_hlc(hlc: &mut fieldsync_schema::HlcClock, tx: &rusqlite::Transaction<'_>) -> Result<()> {
    if let Some(stored) = db::meta_get_json::<fieldsync_schema::Hlc>(tx, keys::HLC)?
        && stored > hlc.last()
    {
        *hlc = fieldsync_schema::HlcClock::resume(stored.device, Some(stored));
    }
    Ok(())
}

#[cfg(test)]
mod property_tests;
#[cfg(test)]
mod storage_full_tests;
#[cfg(test)]
mod tests;
