//! The acceptance pipeline for one mutation, in the order of SPEC §10 (see ARCHITECTURE.md,
//! "Relay acceptance"). Everything runs inside the group's open transaction; the caller commits.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{Change, ChangeHash};
use fieldsync_schema::document::{RootOps, device_actor, parse_change, relay_actor};
use fieldsync_schema::registry::{MERGED_INTO, merges_without_prompt, ownership_refusal};
use fieldsync_schema::signing::envelope_hash;
use fieldsync_schema::wire::MAX_MUTATION_CHANGE_BYTES;
use fieldsync_schema::{
    Bytes, ConflictReason, EntityDoc, EntityType, FieldError, Mutation, MutationKind, Origin, Outcome, Policy, Role,
    Rule,
};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::checks::{kind_errors, ref_errors, sender_refusal, signature_errors, structural_errors};
use super::lww::{self, LwwInput};
use super::write::WriteApplied;
use super::{Group, Sender, SpaceWorker};
use crate::store::{DocumentRow, LwwStamp, ReceiptMatch, ReceiptRow, SpaceStore, StoreError};

fn invalid(field: &str, message: impl Into<String>) -> Outcome {
    Outcome::Invalid {
        errors: vec![FieldError::new(field, Rule::NotAllowed, message)],
    }
}

fn forbidden(reason: impl Into<String>) -> Outcome {
    Outcome::Forbidden { reason: reason.into() }
}

pub(super) fn to_bytes(changes: &[Change]) -> Vec<Bytes> {
    changes.iter().map(|c| Bytes(c.raw_bytes().to_vec())).collect()
}

pub(super) fn cbor<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| StoreError::Corrupt(format!("encoding: {e}")))?;
    Ok(out)
}

impl<S: SpaceStore> SpaceWorker<S> {
    /// Decides one mutation and, if it is applied, writes it. Returns the outcome to report.
    pub(super) fn accept(
        &mut self,
        sender: &Sender,
        m: &Mutation,
        prechecked: Option<([u8; 32], bool)>,
        now_ms: u64,
        group: &mut Group,
    ) -> Result<Outcome, StoreError> {
        let span = tracing::debug_span!("mutation", mutation_id = %m.mutation_id, device_id = %m.device_id,
            user_id = %m.user_id, entity = %m.entity_id, kind = %m.kind);
        let _enter = span.enter();

        // 1-2. The sender's own envelope, correctly signed (no receipt for a failure here).
        if let Some(refusal) = sender_refusal(sender, m, prechecked) {
            return Ok(refusal);
        }
        // The space's head first, inside the turn's transaction: on a store shared by several
        // relays this locks the space until the commit, so the receipt and the document read
        // below are the ones the last commit of any relay left (a retry that reached another
        // relay meanwhile finds its receipt). Only a member's space: a stranger's mutation
        // locks and creates nothing.
        if sender.role_in(m.space_id).is_some() && !group.heads.contains_key(&m.space_id) {
            let head = self.store.space_head(m.space_id)?;
            group.read_heads.insert(m.space_id, head.clone());
            group.heads.insert(m.space_id, head);
        }
        // 3. Idempotency: a receipt answers only the envelope it was written for, and only
        //    with what the sender may still see.
        let existing_receipt = self.store.receipt(m.mutation_id)?;
        if let Some(receipt) = &existing_receipt
            && !self.faults.ignore_receipts
        {
            return self.replay(sender, receipt, m);
        }
        // A mutation id is one change relay-wide: one already answered in another shard's
        // space is not applied again here (the replay refuses it as a different change).
        if existing_receipt.is_none()
            && !self.faults.ignore_receipts
            && let Some(elsewhere) = self.receipt_elsewhere(m.mutation_id)?
        {
            return self.replay(sender, &elsewhere, m);
        }
        let outcome = self.decide(sender, m, now_ms, group)?;
        if existing_receipt.is_none() {
            let stored = match &outcome {
                // Server changes are recomputed on replay; storing them would duplicate history.
                Outcome::Conflict {
                    server_version, reason, ..
                } => Outcome::Conflict {
                    server_version: *server_version,
                    server_changes: Vec::new(),
                    reason: *reason,
                    authors: Vec::new(),
                },
                other => other.clone(),
            };
            self.store.put_receipt(&ReceiptRow {
                mutation_id: m.mutation_id,
                device_id: m.device_id,
                entity_id: Some(m.entity_id),
                space_id: Some(m.space_id),
                envelope_hash: Some(envelope_hash(m)),
                outcome: cbor(&stored)?,
                created_ms: now_ms,
            })?;
        }
        tracing::debug!(outcome = outcome.name(), "mutation decided");
        Ok(outcome)
    }

    /// Answers a repeated mutation id from its receipt. Nothing stored is revealed unless the
    /// repeat is the very envelope the receipt answered and its user may still see the space:
    /// a different envelope under a known id is refused, and a user who left the space gets
    /// no document changes and no LWW values.
    fn replay(&mut self, sender: &Sender, receipt: &ReceiptRow, m: &Mutation) -> Result<Outcome, StoreError> {
        // A change the revoked device pushed before it was cut off, its answer lost, repeated
        // by the new identity carrying it: the envelope differs in who signed it, so it is
        // answered as an unbound receipt (the outcome, nothing the first answer disclosed).
        let carried = receipt.device_id != m.device_id && sender.speaks_for(receipt.device_id);
        if receipt.device_id != m.device_id && !carried {
            return Ok(forbidden("this mutation id was already used by another device"));
        }
        let binding = if !carried {
            receipt.answers(m)
        } else if receipt.entity_id == Some(m.entity_id) && receipt.space_id == Some(m.space_id) {
            ReceiptMatch::Unbound
        } else {
            ReceiptMatch::Different
        };
        if binding == ReceiptMatch::Different {
            return Ok(forbidden(
                "this mutation id was already used for a different change; nothing was applied",
            ));
        }
        let member = sender.role_in(m.space_id).is_some();
        let stored: Outcome = ciborium::from_reader(receipt.outcome.as_slice())
            .map_err(|e| StoreError::Corrupt(format!("receipt {}: {e}", m.mutation_id)))?;
        Ok(match stored {
            Outcome::Applied {
                version,
                seq,
                lww_lost,
                duplicate_of,
            } => {
                // Loss records carry the winner's value, a flag names another record: only for
                // a current member, and only for the envelope the receipt was written for.
                let disclose = member && binding == ReceiptMatch::Exact;
                Outcome::AlreadyApplied {
                    original: Box::new(Outcome::Applied {
                        version,
                        seq,
                        lww_lost: if disclose { lww_lost } else { Vec::new() },
                        duplicate_of: duplicate_of.filter(|_| disclose),
                    }),
                }
            }
            Outcome::AlreadyApplied { .. } => stored,
            Outcome::Conflict { .. } if !member => forbidden("the user is not a member of this space"),
            Outcome::Conflict {
                server_version, reason, ..
            } => {
                let without_data = Outcome::Conflict {
                    server_version,
                    server_changes: Vec::new(),
                    reason,
                    authors: Vec::new(),
                };
                if binding != ReceiptMatch::Exact {
                    return Ok(without_data);
                }
                // Recompute what the device lacks, from the same base as the first answer.
                let Some(row) = self.store.document(m.entity_id)? else {
                    return Ok(without_data);
                };
                if row.space_id != m.space_id || row.entity_type != m.entity_type {
                    return Ok(forbidden("no such entity in this space"));
                }
                let deps = match m.changes.first().map(|c| parse_change(&c.0)) {
                    Some(Ok(c)) => c.deps().to_vec(),
                    _ => Vec::new(),
                };
                let mut doc = self.load_doc(&row)?;
                let conflict = self.conflict(&mut doc, &row, &deps, m.base_version, reason)?;
                self.docs.put(row.doc_key, row.version, doc);
                conflict
            }
            other => other,
        })
    }

    fn decide(&mut self, sender: &Sender, m: &Mutation, now_ms: u64, group: &mut Group) -> Result<Outcome, StoreError> {
        let schema = self.schema.clone();
        // 4. Type, membership, role, kind.
        let Some(ty) = schema.entity_type(&m.entity_type) else {
            return Ok(Outcome::Invalid {
                errors: vec![FieldError::new(
                    "entity_type",
                    Rule::UnknownField,
                    format!("unknown entity type `{}`", m.entity_type),
                )],
            });
        };
        let Some(role) = sender.role_in(m.space_id) else {
            return Ok(forbidden("the user is not a member of this space"));
        };
        if let Some(e) = kind_errors(ty, m.kind) {
            return Ok(Outcome::Invalid { errors: vec![e] });
        }
        let allowed = if m.kind == MutationKind::Sign {
            ty.may_sign(role)
        } else {
            ty.may_write(role)
        };
        if !allowed || (ty.policy == Policy::ServerOwned && !matches!(role, Role::Admin | Role::Service)) {
            let verb = if m.kind == MutationKind::Sign { "sign" } else { "write" };
            return Ok(forbidden(format!("role `{role}` may not {verb} `{}`", ty.name)));
        }
        let row = self.store.document(m.entity_id)?;
        if let Some(r) = &row {
            if r.entity_type != m.entity_type || r.space_id != m.space_id || r.version == 0 {
                return Ok(forbidden("no such entity in this space"));
            }
        } else if self.held_elsewhere(m.entity_id)? {
            // A record of a space in another shard: the same answer as for another space of
            // this shard, whatever the kind (nothing about it is told).
            return Ok(forbidden("no such entity in this space"));
        } else if m.kind != MutationKind::Create {
            return Ok(invalid(
                "entity_id",
                "no such entity on the relay; it must be created first",
            ));
        }
        // 5. Signed and locked records never change.
        if let Some(r) = &row {
            if r.signed {
                return Ok(Outcome::RejectedImmutable {
                    reason: format!("{} {} is signed and can no longer change", ty.name, m.entity_id),
                });
            }
            if r.locked {
                return Ok(Outcome::RejectedLocked {
                    reason: format!("{} {} is locked and can no longer change", ty.name, m.entity_id),
                });
            }
        }
        // Changes must be well formed before anything reads them.
        let changes = match self.parse_changes(sender, m) {
            Ok(c) => c,
            Err(outcome) => return Ok(outcome),
        };
        let mut doc = match &row {
            Some(r) => self.load_doc(r)?,
            None => EntityDoc::new(relay_actor(self.relay_id)),
        };
        if let Some(outcome) = missing_dependency(&mut doc, &changes) {
            self.put_back(&row, doc);
            return Ok(outcome);
        }
        let base_deps: Vec<ChangeHash> = changes.first().map(|c| c.deps().to_vec()).unwrap_or_default();
        // Fields this write settles over concurrent values (a service overriding a provisional
        // value written meanwhile).
        let mut overrides = BTreeSet::new();
        if let Some(r) = &row {
            // 6. Delete versus edit is a conflict (LWW types decide it by clock instead).
            if r.deleted && !matches!(m.kind, MutationKind::Resolve | MutationKind::Delete) && ty.policy != Policy::Lww
            {
                let c = self.conflict(&mut doc, r, &base_deps, m.base_version, ConflictReason::Deleted)?;
                self.put_back(&row, doc);
                return Ok(c);
            }
            // 7. Policy gate.
            let gate = match (ty.policy, m.kind) {
                // Two devices may create the same LWW record (a user's settings) offline: the
                // clock settles it like any concurrent write, without a prompt (SPEC §9).
                (Policy::Lww, MutationKind::Create) => None,
                (_, MutationKind::Create) => Some(ConflictReason::AlreadyExists),
                (Policy::Gated, _) | (Policy::Notes, MutationKind::Sign)
                    if m.base_version != Some(r.version) && !self.faults.skip_version_gate =>
                {
                    Some(ConflictReason::StaleBase)
                }
                _ => None,
            };
            // Field authority (SPEC §17): a write touching only its writer's fields merges with
            // unseen versions that touched only the other side's, without a prompt.
            let gate = match gate {
                Some(ConflictReason::StaleBase) if ty.has_authority() && m.kind == MutationKind::Update => {
                    match self.authority_merge(ty, role, &mut doc, &changes, &base_deps) {
                        Some(over) => {
                            overrides = over;
                            None
                        }
                        None => gate,
                    }
                }
                other => other,
            };
            if let Some(reason) = gate {
                let deps = if reason == ConflictReason::AlreadyExists {
                    Vec::new()
                } else {
                    base_deps
                };
                let c = self.conflict(&mut doc, r, &deps, m.base_version, reason)?;
                self.put_back(&row, doc);
                return Ok(c);
            }
        }
        if ty.policy == Policy::AppendOnly && !matches!(m.kind, MutationKind::Create | MutationKind::Delete) {
            self.put_back(&row, doc);
            return Ok(forbidden(format!(
                "`{}` is append-only: entries are never edited",
                ty.name
            )));
        }
        // 8. Structural checks on what the changes touch.
        let ops = match RootOps::of(&changes) {
            Ok(ops) => ops,
            Err(e) => {
                self.put_back(&row, doc);
                return Ok(invalid("changes", e.to_string()));
            }
        };
        let before = doc.fields();
        let (before_deleted, before_signed) = (doc.is_deleted(), doc.is_signed());
        let before_heads = doc.heads();
        let errors = structural_errors(ty, m.kind, &ops, &before);
        if !errors.is_empty() {
            self.put_back(&row, doc);
            return Ok(Outcome::Invalid { errors });
        }
        if let Some(reason) = ownership_refusal(ty, role, &ops, m.kind.may_merge()) {
            self.put_back(&row, doc);
            return Ok(forbidden(reason));
        }
        // 9. Apply, settle LWW, validate the merged result. From here on a rejection must drop
        //    the cached copy: the document in memory already holds the changes.
        let applied = self.apply_and_validate(
            sender,
            ty,
            m,
            &row,
            &mut doc,
            &changes,
            &ops,
            (&before, before_deleted),
            &overrides,
            now_ms,
        );
        let Validated {
            extra_changes,
            lww_plan,
            after,
            duplicate_of,
        } = match applied {
            Ok(ok) => ok,
            Err(ApplyError::Rejected(outcome)) => {
                if let Some(r) = &row {
                    self.docs.invalidate(r.doc_key);
                }
                return Ok(outcome);
            }
            Err(ApplyError::BuiltOnUnseen) => {
                let Some(r) = &row else {
                    return Ok(invalid("changes", "a new record cannot be built on unseen versions"));
                };
                self.docs.invalidate(r.doc_key);
                let mut doc = self.load_doc(r)?;
                let c = self.conflict(&mut doc, r, &base_deps, m.base_version, ConflictReason::StaleBase)?;
                self.put_back(&row, doc);
                return Ok(c);
            }
            Err(ApplyError::Store(e)) => return Err(e),
        };
        // 10. Write everything in the group's transaction.
        self.write_applied(WriteApplied {
            m,
            row: row.as_ref(),
            doc,
            changes: &changes,
            extra_changes,
            lww_plan,
            before: &ty.view_of(&before),
            before_deleted,
            before_signed,
            before_heads: &before_heads,
            after,
            duplicate_of,
            now_ms,
            group,
        })
    }

    /// Whether a stale update merges by field authority; if so, the fields it settles over
    /// concurrent values. `None`: gated as usual (a conflict).
    fn authority_merge(
        &self,
        ty: &EntityType,
        role: Role,
        doc: &mut EntityDoc,
        changes: &[Change],
        base_deps: &[ChangeHash],
    ) -> Option<BTreeSet<String>> {
        let touched = RootOps::of(changes).ok()?.touched();
        let known: Vec<ChangeHash> = base_deps.iter().copied().filter(|h| doc.has_change(h)).collect();
        if known.len() != base_deps.len() {
            return None; // built on changes the relay never had: let the gate answer
        }
        let concurrent = RootOps::of(&doc.changes_since(&known)).ok()?.touched();
        merges_without_prompt(ty, role, &touched, &concurrent)
            .then(|| touched.intersection(&concurrent).cloned().collect())
    }

    fn put_back(&mut self, row: &Option<DocumentRow>, doc: EntityDoc) {
        if let Some(r) = row {
            self.docs.put(r.doc_key, r.version, doc);
        }
    }

    fn parse_changes(&self, sender: &Sender, m: &Mutation) -> Result<Vec<Change>, Outcome> {
        if m.changes.is_empty() {
            return Err(invalid("changes", "a mutation must carry at least one change"));
        }
        let total: usize = m.changes.iter().map(|c| c.0.len()).sum();
        if total > MAX_MUTATION_CHANGE_BYTES {
            return Err(invalid(
                "changes",
                format!("{total} bytes of changes exceed the limit of {MAX_MUTATION_CHANGE_BYTES}"),
            ));
        }
        let actor = device_actor(m.device_id);
        // A new identity of a revoked device carries changes that device authored offline.
        let predecessor = sender
            .replaces
            .filter(|_| sender.device_id == m.device_id)
            .map(device_actor);
        let mut out = Vec::with_capacity(m.changes.len());
        for (i, bytes) in m.changes.iter().enumerate() {
            let change = parse_change(&bytes.0).map_err(|e| invalid("changes", format!("change {i}: {e}")))?;
            if change.actor_id() != &actor && predecessor.as_ref() != Some(change.actor_id()) {
                return Err(Outcome::Forbidden {
                    reason: format!("change {i} was not authored by the sending device"),
                });
            }
            out.push(change);
        }
        Ok(out)
    }

    pub(super) fn load_doc(&mut self, row: &DocumentRow) -> Result<EntityDoc, StoreError> {
        if let Some(doc) = self.docs.take(row.doc_key, row.version) {
            return Ok(doc);
        }
        let bytes = self.store.document_bytes(row.doc_key)?;
        EntityDoc::load(&bytes, relay_actor(self.relay_id))
            .map_err(|e| StoreError::Corrupt(format!("document {}: {e}", row.entity_id)))
    }

    /// A `Conflict` carrying what the device lacks (everything not in the causal past of the
    /// heads it built on) and who wrote the versions after its base.
    fn conflict(
        &mut self,
        doc: &mut EntityDoc,
        row: &DocumentRow,
        base_deps: &[ChangeHash],
        base_version: Option<u64>,
        reason: ConflictReason,
    ) -> Result<Outcome, StoreError> {
        let known: Vec<ChangeHash> = base_deps.iter().copied().filter(|h| doc.has_change(h)).collect();
        let server_changes = to_bytes(&doc.changes_since(&known));
        let authors = self
            .store
            .feed_for_document(row.doc_key, base_version.unwrap_or(0))?
            .into_iter()
            .map(|f| Origin {
                device_id: f.origin_device,
                user_id: f.origin_user,
                mutation_id: f.mutation_id,
                hlc: f.hlc,
            })
            .collect();
        Ok(Outcome::Conflict {
            server_version: row.version,
            server_changes,
            reason,
            authors,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_and_validate(
        &mut self,
        sender: &Sender,
        ty: &EntityType,
        m: &Mutation,
        row: &Option<DocumentRow>,
        doc: &mut EntityDoc,
        changes: &[Change],
        ops: &RootOps,
        (before, before_deleted): (&Map<String, Value>, bool),
        overrides: &BTreeSet<String>,
        now_ms: u64,
    ) -> Result<Validated, ApplyError> {
        // A gated record holds one value per field: keys already holding different ones (from
        // before this rule) are left as they are, any other must not gain one below.
        // A resolution is judged by the gate alone: it is the person's answer on top of both
        // sides, and it puts only the values that differ from what the record shows.
        let gated = ty.policy == Policy::Gated && row.is_some() && m.kind != MutationKind::Resolve;
        let touched = ops.touched();
        let split_before: BTreeSet<&String> = if gated {
            touched.iter().filter(|k| doc.has_differing_values(k)).collect()
        } else {
            BTreeSet::new()
        };
        doc.apply(changes.to_vec())
            .map_err(|e| ApplyError::Rejected(invalid("changes", format!("cannot apply: {e}"))))?;
        let mut extra = Vec::new();
        let mut plan = None;
        if !overrides.is_empty() && !self.faults.skip_authority_settle {
            // The owner's value stands over a concurrent provisional one, whichever Automerge's
            // own tie-break would show.
            let mine = doc.fields_at(&own_heads(changes));
            let targets: BTreeMap<String, Value> = overrides
                .iter()
                .map(|k| (k.clone(), mine.get(k).cloned().unwrap_or(Value::Null)))
                .collect();
            if let Some(change) = settle(ty, doc, &targets, now_ms).map_err(ApplyError::Rejected)? {
                extra.push(change);
            }
        }
        // The version gate trusts the envelope's base; the changes themselves must agree. A
        // write that leaves a field with differing concurrent values carries changes made without seeing
        // what the relay holds (a device's refused edit still in its document, or a client
        // claiming a base it never had): that is a stale write, whatever its base says.
        // The fields an authority merge settles are the settle's to answer for (above).
        if gated
            && touched
                .iter()
                .any(|k| !split_before.contains(k) && !overrides.contains(k) && doc.has_differing_values(k))
        {
            return Err(ApplyError::BuiltOnUnseen);
        }
        if ty.policy == Policy::Lww {
            let heads = own_heads(changes);
            let mine = doc.fields_at(&heads);
            let mine_deleted = doc.is_deleted_at(&heads);
            let writer_deps = writer_deps(changes);
            let base = m.base_version.unwrap_or(0);
            // Changes the writer did not have; computed only if a stamp needs it.
            let mut unseen: Option<BTreeSet<ChangeHash>> = None;
            let mut saw = |s: &LwwStamp| -> bool {
                // A write the device knew of has a version within what it built on; beyond
                // that, it cannot have seen it.
                if s.version > base {
                    return false;
                }
                match s.change.as_deref().and_then(|h| h.parse::<ChangeHash>().ok()) {
                    Some(h) => !unseen
                        .get_or_insert_with(|| doc.changes_since(&writer_deps).iter().map(Change::hash).collect())
                        .contains(&h),
                    None => true, // a stamp from before changes were recorded: trust the base
                }
            };
            let p = lww::plan(LwwInput {
                mutation: m,
                version: row.as_ref().map_or(0, |r| r.version),
                stamps_json: row.as_ref().map_or("", |r| r.lww_stamps.as_str()),
                touched: ops.touched().into_iter().collect(),
                before,
                before_deleted,
                mine: &mine,
                mine_deleted,
                head: heads.first().map(|h| h.to_string()),
                saw: &mut saw,
            })
            .map_err(ApplyError::Store)?;
            if let Some(change) = settle(ty, doc, &p.targets, now_ms).map_err(ApplyError::Rejected)? {
                extra.push(change);
            }
            plan = Some(p);
        }
        // A declared rename: the value this write gave, under whichever name, goes to every
        // other name of the field, as the relay's change in this write's feed entry.
        let aligned = doc
            .align_renamed(ty, &ops.touched())
            .map_err(|e| ApplyError::Rejected(invalid("changes", e.to_string())))?;
        if aligned && let Some(change) = doc.commit(now_ms) {
            extra.push(change);
        }
        // Validation sees the record as the current schema names it (old names read as new,
        // defaults filled in); the signature covers what the document stores.
        let after = ty.view(doc.fields());
        let mut errors = match ty.validate(&after) {
            Ok(()) => Vec::new(),
            Err(e) => e.0,
        };
        errors.extend(ref_errors(&self.store, ty, m.space_id, &ty.view_of(before), &after).map_err(ApplyError::Store)?);
        match m.kind {
            MutationKind::Create if doc.entity_type().as_deref() != Some(m.entity_type.as_str()) => {
                errors.push(FieldError::new(
                    "_type",
                    Rule::Required,
                    "a create must record the entity type",
                ));
            }
            MutationKind::Create => {
                // Counters exist from creation on, so every device increments the same ones.
                for f in ty.counter_fields().filter(|f| !after.contains_key(&f.name)) {
                    errors.push(FieldError::new(
                        &f.name,
                        Rule::Required,
                        "counters are created with the entity",
                    ));
                }
            }
            MutationKind::Delete if !doc.is_deleted() && ty.policy != Policy::Lww => {
                errors.push(FieldError::new(
                    "_deleted",
                    Rule::Required,
                    "a delete must set the tombstone",
                ));
            }
            MutationKind::Delete
                if after.get(MERGED_INTO).and_then(Value::as_str) == Some(&m.entity_id.to_string()) =>
            {
                errors.push(FieldError::new(
                    MERGED_INTO,
                    Rule::Ref,
                    "a record cannot be merged into itself",
                ));
            }
            MutationKind::Resolve if !doc.is_deleted() && after.get(MERGED_INTO).is_some_and(|v| !v.is_null()) => {
                errors.push(FieldError::new(
                    MERGED_INTO,
                    Rule::Ref,
                    "only a merged (deleted) record names the record it was merged into",
                ));
            }
            MutationKind::Lock if !doc.is_locked() => {
                errors.push(FieldError::new(
                    "locked",
                    Rule::Required,
                    "a lock must set `locked: true`",
                ));
            }
            MutationKind::Sign => {
                errors.extend(signature_errors(m, &sender.verifier, doc.signature(), &doc.fields()));
            }
            _ => {}
        }
        if !errors.is_empty() {
            return Err(ApplyError::Rejected(Outcome::Invalid { errors }));
        }
        let mut after = after;
        let duplicate_of = self
            .index_duplicates(ty, m, doc, &mut after, &mut extra, now_ms)
            .map_err(ApplyError::Store)?;
        Ok(Validated {
            duplicate_of,
            extra_changes: extra,
            lww_plan: plan,
            after,
        })
    }
}

enum ApplyError {
    Rejected(Outcome),
    /// The changes were made concurrently with versions the relay holds: a conflict.
    BuiltOnUnseen,
    Store(StoreError),
}

/// A mutation applied to the document and found valid, ready to be written.
struct Validated {
    /// Changes the relay wrote itself (LWW settlement).
    extra_changes: Vec<Change>,
    lww_plan: Option<lww::LwwPlan>,
    /// The entity's fields after the mutation.
    after: Map<String, Value>,
    /// The older record a new one was flagged as possibly duplicating.
    duplicate_of: Option<Uuid>,
}

/// What the writer built on: the dependencies of its changes outside the mutation itself.
fn writer_deps(changes: &[Change]) -> Vec<ChangeHash> {
    let own: BTreeSet<ChangeHash> = changes.iter().map(Change::hash).collect();
    let deps: BTreeSet<ChangeHash> = changes
        .iter()
        .flat_map(|c| c.deps().iter().copied())
        .filter(|h| !own.contains(h))
        .collect();
    deps.into_iter().collect()
}

/// The heads of a mutation's own changes: those no other change of the mutation depends on.
fn own_heads(changes: &[Change]) -> Vec<ChangeHash> {
    let deps: BTreeSet<ChangeHash> = changes.iter().flat_map(|c| c.deps().iter().copied()).collect();
    changes.iter().map(Change::hash).filter(|h| !deps.contains(h)).collect()
}

/// Returns `Invalid` if a change depends on something neither the relay nor the mutation has.
fn missing_dependency(doc: &mut EntityDoc, changes: &[Change]) -> Option<Outcome> {
    let mut seen: BTreeSet<ChangeHash> = BTreeSet::new();
    for (i, c) in changes.iter().enumerate() {
        for dep in c.deps() {
            if !seen.contains(dep) && !doc.has_change(dep) {
                return Some(invalid(
                    "changes",
                    format!("change {i} depends on {dep}, which the relay does not have; push earlier changes first"),
                ));
            }
        }
        seen.insert(c.hash());
    }
    None
}

/// Writes, as the relay, whatever makes each contested LWW field hold its winning value and
/// nothing else.
fn settle(
    ty: &EntityType,
    doc: &mut EntityDoc,
    targets: &BTreeMap<String, Value>,
    now_ms: u64,
) -> Result<Option<Change>, Outcome> {
    let current = doc.fields();
    let mut patch = Map::new();
    for (field, target) in targets {
        if field == fieldsync_schema::document::META_DELETED {
            let want = target.as_bool().unwrap_or(false);
            if doc.is_deleted() != want {
                doc.set_deleted(want).map_err(|e| invalid("_deleted", e.to_string()))?;
            }
        } else if current.get(field).unwrap_or(&Value::Null) != target || doc.has_concurrent_values(field) {
            // Also when Automerge's own tie-break already shows the winner: the relay's decision
            // is written down, so the document alone says which value stands.
            patch.insert(field.clone(), target.clone());
        }
    }
    if !patch.is_empty() {
        doc.write_fields(ty, &patch)
            .map_err(|e| invalid("changes", e.to_string()))?;
    }
    Ok(doc.commit(now_ms))
}
