//! Checks on a mutation's changes that no JSON diff can make, and on the merged result.
//!
//! These guard the reserved keys (`_type`, `_deleted`, `_signature`), keep counters and text
//! objects mergeable, and make a kind (`Delete`, `Sign`, `Lock`, ...) do only what it says.

use std::collections::BTreeSet;

use automerge::ObjType;
use fieldsync_schema::document::{META_DELETED, META_SIGNATURE, META_TYPE, NoteSignature, RootOps, content_hash};
use fieldsync_schema::registry::MERGED_INTO;
use fieldsync_schema::signing::{self, note_signature_bytes};
use fieldsync_schema::{EntityType, FieldError, FieldKind, Mutation, MutationKind, Outcome, Policy, Rule};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::Sender;
use crate::store::{SpaceStore, StoreResult};

fn err(field: &str, rule: Rule, message: impl Into<String>) -> FieldError {
    FieldError::new(field, rule, message)
}

/// What the changes may touch at the document root, given the kind and the type.
/// `before` is the document's fields before the mutation (empty for a create).
/// SPEC §10's first two checks: the envelope is the authenticated device's own, and its
/// signature verifies with the session's key (a check made off the core counts only if made
/// with the current key). A refusal here writes no receipt: the sender has not proven the
/// mutation is theirs.
pub(crate) fn sender_refusal(sender: &Sender, m: &Mutation, prechecked: Option<([u8; 32], bool)>) -> Option<Outcome> {
    let refuse = |reason: &str| Some(Outcome::Forbidden { reason: reason.into() });
    if m.device_id != sender.device_id || m.user_id != sender.user_id {
        return refuse("the envelope's device or user does not match the authenticated connection");
    }
    if m.client_timestamp.device != m.device_id {
        return refuse("the HLC timestamp names another device");
    }
    let signature_ok = match prechecked {
        Some((key, ok)) if key == sender.verifier.public_key() => ok,
        _ => sender.verifier.verify_mutation(m).is_ok(),
    };
    if !signature_ok {
        return refuse("the mutation signature does not verify with the device's key");
    }
    None
}

pub(crate) fn structural_errors(
    ty: &EntityType,
    kind: MutationKind,
    ops: &RootOps,
    before: &Map<String, Value>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let touched = ops.touched();
    for key in &touched {
        match key.as_str() {
            META_TYPE if kind != MutationKind::Create => {
                errors.push(err(
                    META_TYPE,
                    Rule::NotAllowed,
                    "the entity type is set once, at creation",
                ));
            }
            META_DELETED if !matches!(kind, MutationKind::Delete | MutationKind::Resolve) => {
                errors.push(err(
                    META_DELETED,
                    Rule::NotAllowed,
                    "only a delete or a resolution sets the tombstone",
                ));
            }
            META_SIGNATURE if kind != MutationKind::Sign => {
                errors.push(err(
                    META_SIGNATURE,
                    Rule::NotAllowed,
                    "only a sign mutation writes the signature",
                ));
            }
            META_TYPE | META_DELETED | META_SIGNATURE => {}
            k if k.starts_with('_') => {
                errors.push(err(k, Rule::NotAllowed, "keys starting with `_` are reserved"));
            }
            k if !ty.knows_key(k) => {
                errors.push(err(
                    k,
                    Rule::UnknownField,
                    format!("`{k}` is not a field of `{}`", ty.name),
                ));
            }
            _ => {}
        }
    }
    for (key, obj) in &ops.makes {
        let Some(field) = ty.field(key) else { continue };
        match (&field.kind, obj) {
            (FieldKind::Text { .. }, ObjType::Text) => {
                if kind != MutationKind::Create && before.contains_key(key) {
                    errors.push(err(
                        key,
                        Rule::NotAllowed,
                        "a text field is edited in place; replacing it would drop concurrent edits",
                    ));
                }
            }
            _ => errors.push(err(
                key,
                Rule::Type,
                format!("`{key}` cannot hold a nested {obj} object"),
            )),
        }
    }
    for key in ops.increments.keys() {
        if !matches!(ty.field(key).map(|f| &f.kind), Some(FieldKind::Counter { .. })) {
            errors.push(err(key, Rule::NotAllowed, "only counter fields can be incremented"));
        }
    }
    for field in ty.counter_fields() {
        let name = field.name.as_str();
        let put = ops.puts.contains(name) || ops.deletes.contains(name);
        let reset = ops.counter_puts.contains(name);
        if put || (reset && kind != MutationKind::Create) {
            errors.push(err(name, Rule::NotAllowed, "a counter changes only by increments"));
        }
    }
    let only = |allowed: &[&str]| -> BTreeSet<String> {
        touched
            .iter()
            .filter(|k| !allowed.contains(&k.as_str()))
            .cloned()
            .collect()
    };
    let extra = match kind {
        // A merge's delete names the survivor (SPEC §17).
        MutationKind::Delete if ty.duplicates.is_some() => only(&[META_DELETED, MERGED_INTO]),
        MutationKind::Delete => only(&[META_DELETED]),
        MutationKind::Sign => only(&[META_SIGNATURE]),
        MutationKind::Lock => only(&["locked"]),
        MutationKind::Increment => {
            let counters: Vec<&str> = ty.counter_fields().map(|f| f.name.as_str()).collect();
            only(&counters)
        }
        _ => BTreeSet::new(),
    };
    for key in extra {
        errors.push(err(
            &key,
            Rule::NotAllowed,
            format!("a {kind} mutation may not change `{key}`"),
        ));
    }
    errors
}

/// Every `ref` field must name an existing entity of the target type in the same space; a
/// reference the mutation sets or changes must not point at a deleted entity.
pub(crate) fn ref_errors(
    store: &dyn SpaceStore,
    ty: &EntityType,
    space_id: Uuid,
    before: &Map<String, Value>,
    after: &Map<String, Value>,
) -> StoreResult<Vec<FieldError>> {
    let mut errors = Vec::new();
    for (field, target) in ty.ref_fields() {
        let Some(Value::String(s)) = after.get(&field.name) else {
            continue;
        };
        let Ok(id) = Uuid::parse_str(s) else { continue }; // format errors come from validation
        let changed = before.get(&field.name) != after.get(&field.name);
        match store.document(id)? {
            Some(row) if row.entity_type == target && row.space_id == space_id && row.version > 0 => {
                if changed && row.deleted {
                    errors.push(err(&field.name, Rule::Ref, format!("refers to a deleted {target}")));
                }
            }
            _ => errors.push(err(&field.name, Rule::Ref, format!("no {target} {s} in this space"))),
        }
    }
    Ok(errors)
}

/// A signature must be the sender's, over the content the relay holds, by a key that verifies.
pub(crate) fn signature_errors(
    m: &Mutation,
    verifier: &signing::Verifier,
    signature: Option<NoteSignature>,
    fields: &Map<String, Value>,
) -> Vec<FieldError> {
    let Some(sig) = signature else {
        return vec![err(
            META_SIGNATURE,
            Rule::Format,
            "the signature is missing or malformed",
        )];
    };
    if sig.signer_device != m.device_id || sig.signer_user != m.user_id {
        return vec![err(
            META_SIGNATURE,
            Rule::NotAllowed,
            "a note is signed by the user and device sending the signature",
        )];
    }
    let hash = content_hash(fields);
    if sig.content_hash != hex::encode(hash) {
        return vec![err(
            META_SIGNATURE,
            Rule::NotAllowed,
            "the signature covers different content than the note holds",
        )];
    }
    let bytes = note_signature_bytes(
        &m.entity_id,
        &hash,
        &sig.signer_user,
        &sig.signer_device,
        sig.signed_at_ms,
    );
    let valid = hex::decode(&sig.signature)
        .ok()
        .is_some_and(|s| verifier.verify(&bytes, &s).is_ok());
    if valid {
        Vec::new()
    } else {
        vec![err(
            META_SIGNATURE,
            Rule::NotAllowed,
            "the signature does not verify with the signer's key",
        )]
    }
}

/// Kind and type must fit together before anything else is looked at.
pub(crate) fn kind_errors(ty: &EntityType, kind: MutationKind) -> Option<FieldError> {
    match kind {
        MutationKind::Sign if !ty.signable => {
            Some(err("kind", Rule::NotAllowed, format!("`{}` cannot be signed", ty.name)))
        }
        MutationKind::Lock if !ty.lockable => {
            Some(err("kind", Rule::NotAllowed, format!("`{}` cannot be locked", ty.name)))
        }
        MutationKind::Increment if ty.policy != Policy::Counter => Some(err(
            "kind",
            Rule::NotAllowed,
            format!("`{}` has no counters to increment", ty.name),
        )),
        _ => None,
    }
}

/// The JSON stored as an audit record's before / after state.
pub(crate) fn state_json(fields: &Map<String, Value>, deleted: bool, signed: bool) -> String {
    let mut state = Map::new();
    state.insert("fields".into(), Value::Object(fields.clone()));
    state.insert("deleted".into(), Value::Bool(deleted));
    state.insert("signed".into(), Value::Bool(signed));
    Value::Object(state).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use fieldsync_schema::Schema;
    use fieldsync_schema::testkit::obj;
    use serde_json::json;

    use super::*;

    fn ty(name: &str) -> EntityType {
        Schema::default_schema().entity_type(name).unwrap().clone()
    }

    fn puts(keys: &[&str]) -> RootOps {
        RootOps {
            puts: keys.iter().map(|k| k.to_string()).collect(),
            ..RootOps::default()
        }
    }

    /// (field, rule name) of every error, sorted.
    fn refused(errors: Vec<FieldError>) -> Vec<(String, &'static str)> {
        let mut v: Vec<_> = errors.into_iter().map(|e| (e.field, e.rule.as_str())).collect();
        v.sort();
        v
    }

    fn one(field: &str, rule: Rule) -> Vec<(String, &'static str)> {
        vec![(field.to_string(), rule.as_str())]
    }

    #[test]
    fn a_delete_sign_lock_or_increment_changes_only_its_own_key() {
        let before = obj(json!({"name": "Ada", "body": "x", "answers": "y"}));
        let cases = [
            ("patient", MutationKind::Delete, META_DELETED, "name"),
            ("note", MutationKind::Sign, META_SIGNATURE, "body"),
            ("intake_form", MutationKind::Lock, "locked", "answers"),
        ];
        for (t, kind, own, other) in cases {
            let ty = ty(t);
            assert!(
                structural_errors(&ty, kind, &puts(&[own]), &before).is_empty(),
                "{kind} may write {own}"
            );
            assert_eq!(
                refused(structural_errors(&ty, kind, &puts(&[own, other]), &before)),
                one(other, Rule::NotAllowed),
                "a {kind} that also writes {other}"
            );
        }
        let volume = ty("volume");
        let increment = RootOps {
            increments: BTreeMap::from([("chest_sets".to_string(), 2)]),
            ..RootOps::default()
        };
        assert!(structural_errors(&volume, MutationKind::Increment, &increment, &Map::new()).is_empty());
        let with_week = RootOps {
            puts: BTreeSet::from(["week".to_string()]),
            ..increment
        };
        assert_eq!(
            refused(structural_errors(
                &volume,
                MutationKind::Increment,
                &with_week,
                &Map::new()
            )),
            one("week", Rule::NotAllowed)
        );
    }

    #[test]
    fn an_update_may_not_write_a_reserved_key_or_replace_a_text_object() {
        let note = ty("note");
        let before = obj(json!({"body": "x"}));
        for key in [META_TYPE, META_SIGNATURE, META_DELETED, "_anything"] {
            assert_eq!(
                refused(structural_errors(&note, MutationKind::Update, &puts(&[key]), &before)),
                one(key, Rule::NotAllowed),
                "{key}"
            );
        }
        assert!(structural_errors(&note, MutationKind::Create, &puts(&[META_TYPE]), &Map::new()).is_empty());
        let replace = RootOps {
            makes: BTreeMap::from([("body".to_string(), ObjType::Text)]),
            ..RootOps::default()
        };
        assert_eq!(
            refused(structural_errors(&note, MutationKind::Update, &replace, &before)),
            one("body", Rule::NotAllowed)
        );
        assert!(structural_errors(&note, MutationKind::Create, &replace, &Map::new()).is_empty());
        // A text field the record does not have yet may be made on update.
        assert!(structural_errors(&note, MutationKind::Update, &replace, &Map::new()).is_empty());
    }

    #[test]
    fn a_key_the_type_does_not_have_is_an_unknown_field() {
        let patient = ty("patient");
        assert_eq!(
            refused(structural_errors(
                &patient,
                MutationKind::Update,
                &puts(&["colour", "name"]),
                &Map::new()
            )),
            one("colour", Rule::UnknownField)
        );
    }

    #[test]
    fn a_kind_must_fit_its_type() {
        for (t, kind, refused_here) in [
            ("patient", MutationKind::Sign, true),
            ("note", MutationKind::Sign, false),
            ("patient", MutationKind::Lock, true),
            ("intake_form", MutationKind::Lock, false),
            ("patient", MutationKind::Increment, true),
            ("volume", MutationKind::Increment, false),
            ("patient", MutationKind::Update, false),
        ] {
            let e = kind_errors(&ty(t), kind);
            assert_eq!(e.is_some(), refused_here, "{kind} on {t}: {e:?}");
            if let Some(e) = e {
                assert_eq!((e.field.as_str(), e.rule), ("kind", Rule::NotAllowed));
                assert!(e.message.contains(t), "{}", e.message);
            }
        }
    }
}
