//! Resolving a conflict: one new change on top of both sides, sent as a `Resolve` mutation on
//! the relay's current version.
//!
//! The document already holds both sides (the relay's changes were merged when the conflict
//! arrived), so the resolution is an ordinary change that writes the chosen value into every
//! field — also where that value is already shown, when the field still holds concurrent
//! values, so that it supersedes both — and an empty change when nothing differs, so there is
//! always a change on top of both sides.
//!
//! The relay never saw this device's refused change, and every change it accepts must have
//! known dependencies; so the mutation carries, in order, the changes of every unconfirmed item
//! of the entity (the conflicted one and those queued behind it) followed by the resolution
//! change. Those items become `superseded` by it and it takes the conflicted item's place in
//! the outbox, so it goes out before later writes to other records. They stay unsynced until
//! the relay confirms the resolution. If the relay answers the resolution with another
//! `Conflict` (someone wrote in between), the user resolves again, and the new resolution
//! carries everything once more.

use fieldsync_schema::document::META_DELETED;
use fieldsync_schema::registry::{DUPLICATE_OF, MERGED_INTO, put_refusal};
use fieldsync_schema::validate::{FieldError, Rule, ValidationErrors};
use fieldsync_schema::wire::MAX_MUTATION_CHANGE_BYTES;
use fieldsync_schema::{ConflictReason, EntityDoc, EntityType, FieldKind, MutationKind, Role};
use rusqlite::{Connection, TransactionBehavior};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::settlement::{Settlement, Unsettled};
use super::{RecordState, close_conflict};
use crate::device::Device;
use crate::entity::{self, EntityMeta, SyncState};
use crate::error::{PeerError, Result};
use crate::outbox::{self, OutboxState};
use crate::rules;
use crate::write::WriteReceipt;

/// The user's answer to a conflict.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Every field (and the tombstone) as this device had it.
    KeepMine,
    /// Every field (and the tombstone) as the relay has it.
    KeepTheirs,
    /// The relay's version with these fields replaced (`null` removes one); `_deleted: bool`
    /// chooses the tombstone. Validated like any write, all errors at once.
    Merged(Map<String, Value>),
}

impl Resolution {
    pub fn name(&self) -> &'static str {
        match self {
            Resolution::KeepMine => "keep_mine",
            Resolution::KeepTheirs => "keep_theirs",
            Resolution::Merged(_) => "merged",
        }
    }
}

impl Device {
    /// Resolves the open conflict of `entity_id`; returns the resolution's outbox item.
    pub fn resolve(&mut self, entity_id: Uuid, resolution: Resolution) -> Result<WriteReceipt> {
        let now = self.time.now_ms();
        let me = self.device_id;
        let (conn, mut w) = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        w.fold_clock(&tx)?;
        let Some(u) = Unsettled::of_entity(&tx, w.schema, entity_id, me, w.actor.clone())? else {
            return Err(no_conflict(&tx, entity_id));
        };
        let Unsettled {
            open,
            ty,
            loaded,
            own,
            sides,
            settlement,
            ..
        } = u;
        let ty = &ty;
        match settlement {
            Settlement::ByValues => {}
            Settlement::StaleSignature => {
                return Err(PeerError::Resolution(format!(
                    "the signature on {} {entity_id} was made on an older version of the note; it cannot be kept. \
                     Discard it (`resolve {} {entity_id} --discard`), review the note and sign again",
                    ty.name, ty.name
                )));
            }
            Settlement::Sealed { addendum } => {
                let addendum = if addendum {
                    " or turn it into an addendum (`--addendum`)"
                } else {
                    ""
                };
                return Err(PeerError::Resolution(format!(
                    "{} {entity_id} is signed or locked on the relay and can no longer change; discard this change \
                     (`resolve {} {entity_id} --discard`){addendum}",
                    ty.name, ty.name
                )));
            }
        }
        let Some(place) = own
            .items
            .iter()
            .find(|i| i.state == OutboxState::Blocked)
            .map(|i| i.place)
        else {
            return Err(PeerError::Corrupt(format!(
                "the conflict on {entity_id} has no blocked outbox item"
            )));
        };
        rules::check_role(ty, &loaded.meta, MutationKind::Resolve, w.enrollment)?;
        let target = target_of(ty, &resolution, &sides.mine, &sides.theirs)?;
        validate_target(&tx, ty, &loaded.meta, &sides.theirs.fields, &target)?;

        // A refused create cannot travel again (only a create may set the type); the resolution
        // then starts from the relay's document, and this device's values live on in the target.
        let (mut doc, carried) = if open.reason() == ConflictReason::AlreadyExists {
            (sides.theirs_doc, Vec::new())
        } else {
            (loaded.doc, own.changes.iter().map(|c| c.raw_bytes().to_vec()).collect())
        };
        let role = w.enrollment.and_then(|e| e.role_in(loaded.meta.space_id));
        apply_target(ty, role, &mut doc, &target)?;
        let change = doc.commit_always(now)?;
        let mut changes: Vec<Vec<u8>> = carried;
        changes.push(change.raw_bytes().to_vec());
        let size: usize = changes.iter().map(Vec::len).sum();
        if size > MAX_MUTATION_CHANGE_BYTES {
            return Err(PeerError::Resolution(format!(
                "the resolution of {entity_id} would carry {size} bytes of changes, over the relay's limit of \
                 {MAX_MUTATION_CHANGE_BYTES}"
            )));
        }
        let meta = EntityMeta {
            sync_state: SyncState::Pending,
            ..loaded.meta
        };
        let m = w
            .signer
            .mutation(&meta, MutationKind::Resolve, Some(meta.relay_version), changes, now);
        outbox::append_at(&tx, &m, now, place)?;
        outbox::supersede(
            &tx,
            &own.mutation_ids(),
            Some(m.mutation_id),
            &format!("carried by the resolution {}", m.mutation_id),
        )?;
        close_conflict(&tx, open.conflict_id, resolution.name(), Some(m.mutation_id), now)?;
        entity::store(&tx, w.schema, &meta, &mut doc, now)?;
        w.finish(&tx)?;
        tx.commit()?;
        Ok(WriteReceipt {
            entity_id,
            entity_type: meta.entity_type,
            kind: MutationKind::Resolve,
            mutation_id: Some(m.mutation_id),
            combined: false,
            change_hash: Some(change.hash().to_string()),
        })
    }
}

/// The error for an entity without an open conflict, saying what it has instead.
pub(super) fn no_conflict(conn: &Connection, entity_id: Uuid) -> PeerError {
    let rejected: bool = conn
        .query_row(
            "SELECT COUNT(*) FROM rejected_edits WHERE entity_id = ?1 AND resolved_at_ms IS NULL",
            [entity_id.to_string()],
            |r| r.get::<_, i64>(0),
        )
        .is_ok_and(|n| n > 0);
    if rejected {
        PeerError::Resolution(format!(
            "{entity_id} has no conflict but a rejected change: discard it (`--discard`), or for a signed note \
             turn it into an addendum (`--addendum`)"
        ))
    } else {
        PeerError::Resolution(format!("{entity_id} has no unresolved conflict"))
    }
}

/// The state the resolution writes: fields (without counters, which merge by adding) and the
/// tombstone.
struct Target {
    fields: Map<String, Value>,
    deleted: bool,
}

fn is_counter(ty: &EntityType, key: &str) -> bool {
    matches!(ty.field(key).map(|f| &f.kind), Some(FieldKind::Counter { .. }))
}

fn target_of(ty: &EntityType, resolution: &Resolution, mine: &RecordState, theirs: &RecordState) -> Result<Target> {
    let (mut fields, mut deleted) = match resolution {
        Resolution::KeepMine => (mine.fields.clone(), mine.deleted),
        Resolution::KeepTheirs | Resolution::Merged(_) => (theirs.fields.clone(), theirs.deleted),
    };
    if let Resolution::Merged(chosen) = resolution {
        let mut errors = Vec::new();
        for (key, value) in chosen {
            if key == META_DELETED {
                match value.as_bool() {
                    Some(d) => deleted = d,
                    None => errors.push(FieldError::new(key, Rule::Type, "`_deleted` takes true or false")),
                }
            } else if ty.field(key).is_none() {
                errors.push(FieldError::new(
                    key,
                    Rule::UnknownField,
                    format!("`{key}` is not a field of `{}`", ty.name),
                ));
            } else if is_counter(ty, key) {
                errors.push(FieldError::new(
                    key,
                    Rule::NotAllowed,
                    "is a counter: concurrent increments add up, there is nothing to choose",
                ));
            } else if value.is_null() {
                fields.remove(key);
            } else {
                fields.insert(key.clone(), value.clone());
            }
        }
        if !errors.is_empty() {
            return Err(PeerError::Invalid {
                entity_type: ty.name.clone(),
                errors: ValidationErrors(errors),
            });
        }
    }
    fields.retain(|k, _| !k.starts_with('_') && !is_counter(ty, k));
    Ok(Target { fields, deleted })
}

/// The schema's rules on the resolved record, every error at once. References are checked for
/// existence where the resolution differs from the relay's (the relay vouches for its own).
fn validate_target(
    conn: &Connection,
    ty: &EntityType,
    meta: &EntityMeta,
    theirs: &Map<String, Value>,
    target: &Target,
) -> Result<()> {
    // The relay vouches for its own values and references; only what the target changes is
    // checked (the relay's may come from a newer schema than this device's).
    let changes = |name: &str| theirs.get(name) != target.fields.get(name);
    let mut errors = rules::schema_errors(ty, &target.fields, changes);
    errors.extend(rules::ref_errors(conn, ty, meta.space_id, &target.fields, changes)?);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PeerError::Invalid {
            entity_type: ty.name.clone(),
            errors: ValidationErrors(errors),
        })
    }
}

/// Writes the target into the document: every field either holds or should hold, and the
/// tombstone when it differs or is contested. A field `role` may not write (another side's,
/// SPEC §17, or the relay's duplicate flag) keeps the value it holds: a resolution decides
/// between what its writer may write, and the relay would refuse the rest.
fn apply_target(ty: &EntityType, role: Option<Role>, doc: &mut EntityDoc, target: &Target) -> Result<()> {
    let current = doc.fields();
    let mut patch = Map::new();
    for key in current.keys().chain(target.fields.keys()) {
        if key.starts_with('_') || ty.field(key).is_none() || is_counter(ty, key) {
            continue;
        }
        let clears_flag = (key == DUPLICATE_OF || key == MERGED_INTO) && !target.fields.contains_key(key);
        // Two merges of one record into different survivors (made offline on two devices):
        // the resolution says which stands, as the delete that merged it did (the relay takes
        // `merged_into` from a resolution only on a tombstone). Left alone, the two values
        // would stay concurrent and Automerge's tie-break would pick.
        let settles_merge = key == MERGED_INTO && target.deleted;
        if let Some(role) = role
            && !clears_flag
            && !settles_merge
            && put_refusal(ty, role, key).is_some()
        {
            continue;
        }
        patch.insert(key.clone(), target.fields.get(key).cloned().unwrap_or(Value::Null));
    }
    doc.write_fields(ty, &patch)?;
    if doc.is_deleted() != target.deleted || doc.has_concurrent_values(META_DELETED) {
        doc.set_deleted(target.deleted)?;
    }
    Ok(())
}
