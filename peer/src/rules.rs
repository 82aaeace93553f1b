//! The local checks a write must pass before anything is written: the entity's state (signed,
//! locked, deleted), its policy (append-only, server-owned), the user's role, and the schema
//! (including that references point at existing records). The relay checks all of this again;
//! checking here too gives the user a clear error at once instead of a blocked outbox later.

use fieldsync_schema::registry::Policy;
use fieldsync_schema::validate::{FieldError, Rule, ValidationErrors};
use fieldsync_schema::{EntityDoc, EntityType, FieldKind, MutationKind};
use rusqlite::Connection;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::device::Enrollment;
use crate::entity::{self, EntityMeta};
use crate::error::{PeerError, Result};

/// The operation of one write, after the caller's arguments were parsed.
pub(crate) enum Op {
    Put(Map<String, Value>),
    Delete,
    /// The delete that merges a possible duplicate into its survivor (SPEC §17).
    MergeInto(Uuid),
    Text {
        field: String,
        text: String,
    },
    Sign,
    Lock,
    Increment {
        field: String,
        by: i64,
    },
}

pub(crate) fn kind_of(op: &Op, create: bool) -> MutationKind {
    match op {
        Op::Put(_) if create => MutationKind::Create,
        Op::Put(_) | Op::Text { .. } => MutationKind::Update,
        Op::Delete | Op::MergeInto(_) => MutationKind::Delete,
        Op::Sign => MutationKind::Sign,
        Op::Lock => MutationKind::Lock,
        Op::Increment { .. } => MutationKind::Increment,
    }
}

/// Whether a write of kind `next` may join the never-sent item of kind `first` for the same
/// entity. Never across a delete, sign, lock or resolve; and not an update after an increment,
/// because the combined item keeps the first kind and an `increment` must carry increments only.
pub(crate) fn combinable(first: MutationKind, next: MutationKind) -> bool {
    use MutationKind::*;
    matches!(
        (first, next),
        (Create, Update) | (Create, Increment) | (Update, Update) | (Update, Increment) | (Increment, Increment)
    )
}

/// The space a new entity goes to: the nil space before enrollment, else the named space (one
/// of the user's) or the default one.
pub(crate) fn space_for_create(enrollment: Option<&Enrollment>, space: Option<Uuid>) -> Result<Uuid> {
    match enrollment {
        None => match space {
            Some(s) if !s.is_nil() => Err(PeerError::NotAllowed(format!(
                "this device is not enrolled, so it cannot write into space {s}; new records stay local until \
                 enrollment moves them to the user's default space"
            ))),
            _ => Ok(Uuid::nil()),
        },
        Some(e) => {
            let s = space.unwrap_or(e.default_space);
            if e.role_in(s).is_none() {
                return Err(PeerError::NotAllowed(format!(
                    "user {} is not a member of space {s}",
                    e.user.name
                )));
            }
            Ok(s)
        }
    }
}

/// Refuses writes the entity's state, policy or the user's role forbid.
pub(crate) fn check_allowed(
    ty: &EntityType,
    doc: &EntityDoc,
    meta: &EntityMeta,
    kind: MutationKind,
    enrollment: Option<&Enrollment>,
) -> Result<()> {
    let refuse = |reason: String| Err(PeerError::refused(&meta.entity_type, meta.entity_id, reason));
    if kind != MutationKind::Create {
        if doc.is_signed() {
            return refuse("it is signed and read-only (write an addendum as a new note)".into());
        }
        if doc.is_locked() {
            return refuse("it is locked and read-only".into());
        }
        if doc.is_deleted() {
            return refuse("it is deleted".into());
        }
    }
    if ty.policy == Policy::AppendOnly && !matches!(kind, MutationKind::Create | MutationKind::Delete) {
        return refuse(format!(
            "`{}` is append-only: records cannot be changed after creation (only deleted)",
            ty.name
        ));
    }
    match kind {
        MutationKind::Sign if !ty.signable => return refuse(format!("`{}` records cannot be signed", ty.name)),
        MutationKind::Lock if !ty.lockable => return refuse(format!("`{}` records cannot be locked", ty.name)),
        _ => {}
    }
    check_role(ty, meta, kind, enrollment)
}

/// Refuses writes the user's role in the entity's space forbids (the relay's step 4), or that
/// need an enrolled user.
pub(crate) fn check_role(
    ty: &EntityType,
    meta: &EntityMeta,
    kind: MutationKind,
    enrollment: Option<&Enrollment>,
) -> Result<()> {
    let refuse = |reason: String| Err(PeerError::refused(&meta.entity_type, meta.entity_id, reason));
    match enrollment {
        None if kind == MutationKind::Sign => {
            refuse("signing needs an enrolled user (the signer); this device is not enrolled".into())
        }
        None if ty.policy == Policy::ServerOwned => refuse(format!(
            "`{}` is server-owned: only an admin or service user may write it, and this device is not enrolled",
            ty.name
        )),
        None => Ok(()),
        Some(e) => {
            let Some(role) = e.role_in(meta.space_id) else {
                return refuse(format!(
                    "user {} is not a member of space {}",
                    e.user.name, meta.space_id
                ));
            };
            if kind == MutationKind::Sign {
                if !ty.may_sign(role) {
                    return refuse(format!("the role `{role}` may not sign `{}` records", ty.name));
                }
            } else if !ty.may_write(role) {
                let extra = if ty.policy == Policy::ServerOwned {
                    " (server-owned: only admin or service)"
                } else {
                    ""
                };
                return refuse(format!("the role `{role}` may not write `{}` records{extra}", ty.name));
            }
            Ok(())
        }
    }
}

/// Validates current fields + patch (`null` removes) and reports every error at once: schema
/// rules, counters set instead of incremented, and references to records this device does not
/// hold (or holds deleted) in the same space. Only references the write sets are checked for
/// existence, so an old reference to a since-deleted record does not lock its referrer.
pub(crate) fn validate_patch(
    conn: &Connection,
    ty: &EntityType,
    meta: &EntityMeta,
    current: &Map<String, Value>,
    patch: &Map<String, Value>,
    is_create: bool,
) -> Result<()> {
    let mut merged = current.clone();
    for (k, v) in patch {
        if v.is_null() {
            merged.remove(k);
        } else {
            merged.insert(k.clone(), v.clone());
        }
    }
    let mut errors = schema_errors(ty, &merged, |name| is_create || patch.contains_key(name));
    for (name, value) in patch {
        let Some(field) = ty.field(name) else { continue };
        if !is_create && matches!(field.kind, FieldKind::Counter { .. }) && current.get(name) != Some(value) {
            errors.push(FieldError::new(
                name,
                Rule::NotAllowed,
                "is a counter: it changes only by increments (use incr)",
            ));
        }
    }
    let sets = |name: &str| is_create || patch.get(name).is_some_and(|v| current.get(name) != Some(v));
    errors.extend(ref_errors(conn, ty, meta.space_id, &merged, sets)?);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PeerError::Invalid {
            entity_type: ty.name.clone(),
            errors: ValidationErrors(errors),
        })
    }
}

/// The schema's errors in `fields` that concern what this write sets (`sets`), plus every
/// requirement. Values the write leaves alone came from the relay, which validated them —
/// possibly under a newer schema than this device's (a field or enum value this app version does
/// not know yet): they are not this write's to refuse, and must survive it untouched.
pub(crate) fn schema_errors(
    ty: &EntityType,
    fields: &Map<String, Value>,
    sets: impl Fn(&str) -> bool,
) -> Vec<FieldError> {
    let mut errors = ty.validate(fields).err().map(|e| e.0).unwrap_or_default();
    errors.retain(|e| sets(&e.field) || matches!(e.rule, Rule::Required | Rule::RequiredUnless));
    errors
}

/// Every reference in `fields` that `checked` says this write sets must name a live record of
/// the target type in `space` on this device. References a write leaves alone are not
/// re-checked, so an old reference to a since-deleted record does not lock its referrer.
pub(crate) fn ref_errors(
    conn: &Connection,
    ty: &EntityType,
    space: Uuid,
    fields: &Map<String, Value>,
    checked: impl Fn(&str) -> bool,
) -> Result<Vec<FieldError>> {
    let mut errors = Vec::new();
    for (field, to) in ty.ref_fields() {
        let Some(Value::String(target)) = fields.get(&field.name) else {
            continue;
        };
        let Ok(target_id) = Uuid::parse_str(target) else {
            continue; // reported as a format error by validation
        };
        if checked(&field.name) && !entity::exists_live(conn, target_id, to, space)? {
            errors.push(FieldError::new(
                &field.name,
                Rule::Ref,
                format!("no `{to}` with id {target_id} in this space on this device (or it is deleted)"),
            ));
        }
    }
    Ok(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combining_never_crosses_delete_sign_lock_or_resolve() {
        use MutationKind::*;
        for first in MutationKind::ALL {
            for next in MutationKind::ALL {
                let ok = combinable(first, next);
                if matches!(first, Delete | Sign | Lock | Resolve)
                    || matches!(next, Create | Delete | Sign | Lock | Resolve)
                {
                    assert!(!ok, "{first} then {next}");
                }
            }
        }
        assert!(combinable(Create, Update) && combinable(Update, Increment));
        assert!(!combinable(Increment, Update));
    }
}
