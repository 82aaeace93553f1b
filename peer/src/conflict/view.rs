//! The three sides of a conflict, computed from the one merged document the device holds.
//!
//! After a `Conflict` the local document contains everything: the history both sides share,
//! this device's unconfirmed changes and the relay's changes it lacked. The sides are views of
//! that history, never stored copies, so they stay right when more relay changes arrive by pull
//! before the user decides:
//!
//! - **base**: the fields at the heads the device built on (the dependencies of the first
//!   change of the conflicted mutation);
//! - **theirs**: the relay's state as far as this device knows it — every change it holds
//!   except its own unconfirmed ones;
//! - **mine**: the fields at base + this device's unconfirmed changes; where a field holds
//!   concurrent values there (a write made after the merge), this device's value.

use std::collections::BTreeSet;

use automerge::{Change, ChangeHash};
use fieldsync_schema::document::{META_DELETED, RootOps, parse_change};
use fieldsync_schema::{EntityDoc, EntityType, Mutation};
use rusqlite::Connection;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{Author, RecordState};
use crate::error::Result;
use crate::outbox::{self, QueuedItem};

/// This device's changes to one entity that the relay has not applied, with their items.
pub(crate) struct OwnChanges {
    pub items: Vec<QueuedItem>,
    /// Every change of those items, in push order, each once.
    pub changes: Vec<Change>,
    pub hashes: BTreeSet<ChangeHash>,
}

impl OwnChanges {
    pub fn mutation_ids(&self) -> Vec<Uuid> {
        self.items.iter().map(|i| i.envelope.mutation_id).collect()
    }
}

/// The pending and blocked items of an entity (up to `upto_seq`) and their changes.
pub(crate) fn own_changes(conn: &Connection, entity_id: Uuid, upto_seq: Option<u64>) -> Result<OwnChanges> {
    let items = outbox::unconfirmed_items(conn, entity_id, upto_seq)?;
    let mut changes = Vec::new();
    let mut hashes = BTreeSet::new();
    for item in &items {
        for bytes in &item.envelope.changes {
            let change = parse_change(&bytes.0)?;
            if hashes.insert(change.hash()) {
                changes.push(change);
            }
        }
    }
    Ok(OwnChanges { items, changes, hashes })
}

/// The heads a mutation was built on: the dependencies of its first change.
pub(crate) fn base_heads(m: &Mutation) -> Result<Vec<ChangeHash>> {
    match m.changes.first() {
        Some(bytes) => Ok(parse_change(&bytes.0)?.deps().to_vec()),
        None => Ok(Vec::new()),
    }
}

/// The entity as the relay has it, as far as this device knows: every change it holds except
/// `own` (its unconfirmed ones). A rejected edit leaves the local document this way.
pub(crate) fn relay_view(
    doc: &mut EntityDoc,
    own: &BTreeSet<ChangeHash>,
    actor: automerge::ActorId,
) -> Result<EntityDoc> {
    let changes: Vec<Change> = doc
        .all_changes()
        .into_iter()
        .filter(|c| !own.contains(&c.hash()))
        .collect();
    let mut out = EntityDoc::new(actor);
    out.apply(changes)?;
    Ok(out)
}

pub(crate) struct Sides {
    pub base: RecordState,
    pub mine: RecordState,
    pub theirs: RecordState,
    /// The relay's document, for a resolution that must start from it.
    pub theirs_doc: EntityDoc,
    /// The relay's changes since the base, oldest first (who wrote "theirs").
    pub relay_changes: Vec<Change>,
}

/// Every side is read as `ty` names it ([`EntityType::view`]), so a field renamed since the
/// base is one field in the prompt, not a removed one beside a new one.
pub(crate) fn three_way(
    ty: &EntityType,
    doc: &mut EntityDoc,
    base_heads: &[ChangeHash],
    own: &OwnChanges,
    me: Uuid,
    actor: automerge::ActorId,
) -> Result<Sides> {
    let base = if base_heads.is_empty() {
        RecordState::default()
    } else {
        RecordState {
            fields: ty.view(doc.fields_at(base_heads)),
            deleted: doc.is_deleted_at(base_heads),
        }
    };
    let mut mine_heads: Vec<ChangeHash> = base_heads.to_vec();
    mine_heads.extend(own.hashes.iter().copied());
    let mut mine_fields = doc.fields_at(&mine_heads);
    for (key, value) in mine_fields.iter_mut() {
        if let Some(v) = preferring(doc, key, &mine_heads, me) {
            *value = v;
        }
    }
    let mine = RecordState {
        fields: ty.view(mine_fields),
        deleted: preferring(doc, META_DELETED, &mine_heads, me) == Some(Value::Bool(true)),
    };
    let mut theirs_doc = relay_view(doc, &own.hashes, actor)?;
    let theirs = RecordState {
        fields: ty.view(theirs_doc.fields()),
        deleted: theirs_doc.is_deleted(),
    };
    let relay_changes = theirs_doc.changes_since(base_heads);
    Ok(Sides {
        base,
        mine,
        theirs,
        theirs_doc,
        relay_changes,
    })
}

/// The value of `key` at `heads`, and where concurrent values remain, the one `me` wrote.
fn preferring(doc: &EntityDoc, key: &str, heads: &[ChangeHash], me: Uuid) -> Option<Value> {
    let values = doc.values_at(key, heads);
    if values.len() > 1
        && let Some((v, _)) = values.iter().find(|(_, d)| *d == Some(me))
    {
        return Some(v.clone());
    }
    values.into_iter().next().map(|(v, _)| v)
}

/// The last of `changes` that wrote `field` at the document root; if none did (a text field is
/// edited inside its text object), the last change with operations at all.
fn last_writer<'c>(changes: impl DoubleEndedIterator<Item = &'c Change> + Clone, field: &str) -> Option<&'c Change> {
    changes
        .clone()
        .rev()
        .find(|c| RootOps::of(std::slice::from_ref(*c)).is_ok_and(|ops| ops.touched().contains(field)))
        .or_else(|| changes.rev().find(|c| !c.is_empty()))
}

/// Who wrote `field` on the relay's side: the device of the change (its user, mutation and
/// time from the conflict's authors when that device is among them).
pub(crate) fn theirs_author(sides: &Sides, authors: &[fieldsync_schema::Origin], field: &str) -> Option<Author> {
    let change = last_writer(sides.relay_changes.iter(), field)?;
    let device = fieldsync_schema::document::actor_device(change.actor_id());
    let origin = authors.iter().rev().find(|o| Some(o.device_id) == device);
    Some(Author {
        device_id: device,
        user_id: origin.map(|o| o.user_id),
        mutation_id: origin.map(|o| o.mutation_id),
        at_ms: origin.map_or_else(
            || u64::try_from(change.timestamp()).unwrap_or(0).saturating_mul(1000),
            |o| o.hlc.physical_ms,
        ),
    })
}

/// Who wrote `field` on this device's side: the last unconfirmed item that changed it.
pub(crate) fn mine_author(own: &OwnChanges, field: &str) -> Option<Author> {
    let touches = |item: &&QueuedItem| {
        item.envelope.changes.iter().any(|b| {
            parse_change(&b.0)
                .is_ok_and(|c| RootOps::of(std::slice::from_ref(&c)).is_ok_and(|ops| ops.touched().contains(field)))
        })
    };
    let item = own.items.iter().rev().find(touches).or_else(|| own.items.last())?;
    let m = &item.envelope;
    Some(Author {
        device_id: Some(m.device_id),
        user_id: Some(m.user_id),
        mutation_id: Some(m.mutation_id),
        at_ms: m.client_timestamp.physical_ms,
    })
}

/// Every key either side holds, in order (reserved keys excluded).
pub(crate) fn all_keys(versions: &[&Map<String, Value>]) -> BTreeSet<String> {
    versions
        .iter()
        .flat_map(|m| m.keys())
        .filter(|k| !k.starts_with('_'))
        .cloned()
        .collect()
}
