//! How an entity lives in an Automerge document, shared by device and relay.
//!
//! Schema fields sit at the document root: `text` fields are Automerge text objects (so
//! concurrent edits merge character-wise), `counter` fields are Automerge counters (so
//! concurrent increments add up), everything else is a scalar register. Three reserved keys
//! carry state both sides must agree on: `_type` (set once at creation), `_deleted` (the
//! tombstone) and `_signature` (a signed note's signature, as JSON). Keeping them in the
//! document means a pull delivers them like any other change, and the relay can refuse a
//! mutation that touches them without permission by comparing before and after.

use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, Change, ChangeHash, ObjType, ROOT, ReadDoc, ScalarValue, Value as AmValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::registry::{EntityType, FieldKind};

pub const META_TYPE: &str = "_type";
pub const META_DELETED: &str = "_deleted";
pub const META_SIGNATURE: &str = "_signature";

/// The Automerge actor of a device: its UUID bytes, so changes name the device that made them
/// and the relay can check that a device only sends its own changes.
pub fn device_actor(device_id: Uuid) -> ActorId {
    ActorId::from(device_id.as_bytes())
}

/// The device a change came from, if its actor is a device actor (16 bytes).
pub fn actor_device(actor: &ActorId) -> Option<Uuid> {
    Uuid::from_slice(actor.to_bytes()).ok()
}

/// The relay's own actor for the few changes it writes itself (restoring an LWW winner).
/// 17 bytes, so it can never equal a device actor.
pub fn relay_actor(relay_id: Uuid) -> ActorId {
    let mut bytes = vec![0xFE];
    bytes.extend_from_slice(relay_id.as_bytes());
    ActorId::from(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("the stored document is corrupt: {0}")]
    Corrupt(String),
    #[error("change bytes are not a valid Automerge change: {0}")]
    BadChange(String),
    #[error("`{0}` is not a field of this type")]
    UnknownField(String),
    #[error("counter `{0}` changes only by increments")]
    CounterSet(String),
    #[error("counter `{0}` does not exist; counters are created with the entity")]
    CounterMissing(String),
    #[error("field `{field}` of type {kind} cannot hold {got}")]
    WrongType {
        field: String,
        kind: &'static str,
        got: &'static str,
    },
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// Automerge panicked on this input (see [`untrusted`]).
    #[error("automerge cannot process this {0}")]
    Unprocessable(&'static str),
}

/// Runs an Automerge call on bytes from outside (a device's change, a relay's snapshot).
/// Automerge 0.12 panics on some malformed input instead of returning an error — the relay's
/// fuzzer found a change that panics in `apply_changes` — and a malformed change must never
/// take the relay's core thread down, so the panic becomes an error. The document the call ran
/// on may be half changed afterwards: callers drop it (the relay its cached copy — the store
/// still holds the committed bytes; the device its transaction).
fn untrusted<T>(what: &'static str, f: impl FnOnce() -> T) -> Result<T, DocError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| DocError::Unprocessable(what))
}

/// A signed note's signature, stored as JSON under `_signature`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoteSignature {
    pub signer_user: Uuid,
    pub signer_device: Uuid,
    pub signed_at_ms: u64,
    /// SHA-256 (hex) of the note's fields at signing, see [`content_hash`].
    pub content_hash: String,
    /// ed25519 signature (hex) by the signer's device over [`crate::signing::note_signature_bytes`].
    pub signature: String,
}

/// SHA-256 of a canonical JSON rendering of fields (keys sorted at every level).
pub fn content_hash(fields: &Map<String, Value>) -> [u8; 32] {
    fn canonical(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, canonical(v))).collect();
                Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
            other => other.clone(),
        }
    }
    let sorted: BTreeMap<&String, Value> = fields.iter().map(|(k, v)| (k, canonical(v))).collect();
    let mut h = Sha256::new();
    // Serialising JSON values to a Vec cannot fail.
    for (k, v) in sorted {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        let s = v.to_string();
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    h.finalize().into()
}

/// What one change does at the document root, per key. The relay uses it for rules a JSON diff
/// cannot see: a counter must be incremented, never overwritten; a text field must be edited in
/// place, never replaced by a fresh text object (which would drop concurrent edits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootOps {
    pub puts: BTreeSet<String>,
    pub counter_puts: BTreeSet<String>,
    pub increments: BTreeMap<String, i64>,
    pub makes: BTreeMap<String, ObjType>,
    pub deletes: BTreeSet<String>,
}

impl RootOps {
    /// What `changes` do at the root; an error when Automerge cannot decode one of them.
    pub fn of(changes: &[Change]) -> Result<RootOps, DocError> {
        use automerge::legacy::{Key, ObjectId};
        let mut out = RootOps::default();
        for change in changes {
            let decoded = untrusted("change", || change.decode())?;
            for op in decoded.operations {
                let (ObjectId::Root, Key::Map(key)) = (&op.obj, &op.key) else {
                    continue;
                };
                let key = key.to_string();
                match op.action {
                    automerge::legacy::OpType::Put(ScalarValue::Counter(_)) => {
                        out.counter_puts.insert(key);
                    }
                    automerge::legacy::OpType::Put(_) => {
                        out.puts.insert(key);
                    }
                    automerge::legacy::OpType::Increment(n) => {
                        *out.increments.entry(key).or_insert(0) += n;
                    }
                    automerge::legacy::OpType::Make(t) => {
                        out.makes.insert(key, t);
                    }
                    automerge::legacy::OpType::Delete => {
                        out.deletes.insert(key);
                    }
                    automerge::legacy::OpType::MarkBegin(..) | automerge::legacy::OpType::MarkEnd(..) => {}
                }
            }
        }
        Ok(out)
    }

    /// Every root key this change writes in any way.
    pub fn touched(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self
            .puts
            .iter()
            .chain(&self.counter_puts)
            .chain(&self.deletes)
            .cloned()
            .collect();
        all.extend(self.increments.keys().cloned());
        all.extend(self.makes.keys().cloned());
        all
    }
}

/// Parses change bytes received from the network.
pub fn parse_change(bytes: &[u8]) -> Result<Change, DocError> {
    untrusted("change", || Change::from_bytes(bytes.to_vec()))?.map_err(|e| DocError::BadChange(e.to_string()))
}

/// One entity's Automerge document.
pub struct EntityDoc {
    doc: AutoCommit,
}

impl std::fmt::Debug for EntityDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntityDoc").field("fields", &self.fields()).finish()
    }
}

impl EntityDoc {
    /// An empty document; the first write should be [`EntityDoc::init_type`].
    pub fn new(actor: ActorId) -> Self {
        EntityDoc {
            doc: AutoCommit::new().with_actor(actor),
        }
    }

    /// Loads saved bytes (a full save, possibly followed by incremental saves or changes).
    pub fn load(bytes: &[u8], actor: ActorId) -> Result<Self, DocError> {
        let doc = untrusted("document", || AutoCommit::load(bytes))?.map_err(|e| DocError::Corrupt(e.to_string()))?;
        Ok(EntityDoc {
            doc: doc.with_actor(actor),
        })
    }

    pub fn set_actor(&mut self, actor: ActorId) {
        self.doc.set_actor(actor);
    }

    /// Escape hatch for callers that need an Automerge API this wrapper does not cover.
    pub fn automerge(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }

    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// Bytes of everything since the last `save`/`save_incremental`; appending them to the last
    /// saved bytes gives a loadable document.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        self.doc.save_incremental()
    }

    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    pub fn has_change(&mut self, hash: &ChangeHash) -> bool {
        self.doc.get_change_meta_by_hash(hash).is_some()
    }

    /// Every change not in the causal past of `heads`: what a peer at `heads` lacks.
    pub fn changes_since(&mut self, heads: &[ChangeHash]) -> Vec<Change> {
        self.doc.get_changes(heads)
    }

    pub fn all_changes(&mut self) -> Vec<Change> {
        self.doc.get_changes(&[])
    }

    /// Applies changes from elsewhere (idempotent: known changes are skipped). After an error
    /// the document may be half changed: drop it.
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<(), DocError> {
        untrusted("change", || self.doc.apply_changes(changes))??;
        Ok(())
    }

    /// Hashes this document depends on but does not have (changes applied out of order wait in
    /// a queue until their dependencies arrive).
    pub fn missing_deps(&mut self) -> Vec<ChangeHash> {
        self.doc.get_missing_deps(&[])
    }

    /// Commits pending operations as one change stamped with the injected time; returns it.
    pub fn commit(&mut self, now_ms: u64) -> Option<Change> {
        let secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        self.doc
            .commit_with(automerge::transaction::CommitOptions::default().with_time(secs))?;
        self.doc.get_last_local_change()
    }

    /// Commits pending operations as one change, or an empty change when there are none: a
    /// decision (a conflict resolution) must leave a change on top of everything the document
    /// holds, even when it changes no value.
    pub fn commit_always(&mut self, now_ms: u64) -> Result<Change, DocError> {
        if let Some(change) = self.commit(now_ms) {
            return Ok(change);
        }
        let secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        let hash = self
            .doc
            .empty_change(automerge::transaction::CommitOptions::default().with_time(secs));
        self.doc
            .get_change_by_hash(&hash)
            .ok_or_else(|| DocError::Corrupt("the empty change just made is missing".into()))
    }

    /// Discards uncommitted operations (a write that failed validation half way).
    pub fn rollback(&mut self) {
        self.doc.rollback();
    }

    pub fn init_type(&mut self, type_name: &str) -> Result<(), DocError> {
        self.doc.put(ROOT, META_TYPE, type_name)?;
        Ok(())
    }

    pub fn entity_type(&self) -> Option<String> {
        match self.doc.get(ROOT, META_TYPE) {
            Ok(Some((AmValue::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Str(t) => Some(t.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn is_deleted(&self) -> bool {
        matches!(
            self.doc.get(ROOT, META_DELETED),
            Ok(Some((AmValue::Scalar(s), _))) if matches!(s.as_ref(), ScalarValue::Boolean(true))
        )
    }

    pub fn is_locked(&self) -> bool {
        matches!(
            self.doc.get(ROOT, "locked"),
            Ok(Some((AmValue::Scalar(s), _))) if matches!(s.as_ref(), ScalarValue::Boolean(true))
        )
    }

    pub fn signature(&self) -> Option<NoteSignature> {
        match self.doc.get(ROOT, META_SIGNATURE) {
            Ok(Some((AmValue::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Str(json) => serde_json::from_str(json).ok(),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn is_signed(&self) -> bool {
        self.doc.get(ROOT, META_SIGNATURE).ok().flatten().is_some()
    }

    pub fn set_deleted(&mut self, deleted: bool) -> Result<(), DocError> {
        self.doc.put(ROOT, META_DELETED, deleted)?;
        Ok(())
    }

    pub fn set_signature(&mut self, sig: &NoteSignature) -> Result<(), DocError> {
        let json = serde_json::to_string(sig).map_err(|e| DocError::Corrupt(e.to_string()))?;
        self.doc.put(ROOT, META_SIGNATURE, json)?;
        Ok(())
    }

    /// The entity's schema fields as JSON (reserved `_` keys excluded).
    pub fn fields(&self) -> Map<String, Value> {
        self.read_fields(None)
    }

    /// The fields as they were at `heads` (for the base / mine / theirs of a conflict).
    pub fn fields_at(&self, heads: &[ChangeHash]) -> Map<String, Value> {
        self.read_fields(Some(heads))
    }

    /// Whether the document held `_deleted: true` at `heads`.
    pub fn is_deleted_at(&self, heads: &[ChangeHash]) -> bool {
        matches!(
            self.doc.get_at(ROOT, META_DELETED, heads),
            Ok(Some((AmValue::Scalar(s), _))) if matches!(s.as_ref(), ScalarValue::Boolean(true))
        )
    }

    /// Every value a root key holds at `heads` — several while concurrent writes are unresolved
    /// — each with the device whose operation wrote it (`None`: the relay's actor). A text field
    /// gives its text, attributed to the device that created the text object. A conflict's
    /// "mine" side picks this device's value out of them; the relay names who lost a field.
    pub fn values_at(&self, key: &str, heads: &[ChangeHash]) -> Vec<(Value, Option<Uuid>)> {
        let Ok(values) = self.doc.get_all_at(ROOT, key, heads) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(values.len());
        for (value, id) in values {
            let json = match value {
                AmValue::Object(ObjType::Text) => match self.doc.text_at(&id, heads) {
                    Ok(t) => Value::String(t),
                    Err(_) => continue,
                },
                AmValue::Object(_) => continue,
                AmValue::Scalar(s) => scalar_to_json(s.as_ref()),
            };
            let writer = match &id {
                automerge::ObjId::Id(_, actor, _) => actor_device(actor),
                automerge::ObjId::Root => None,
            };
            out.push((json, writer));
        }
        out
    }

    fn read_fields(&self, heads: Option<&[ChangeHash]>) -> Map<String, Value> {
        let keys: Vec<String> = match heads {
            None => self.doc.keys(ROOT).collect(),
            Some(h) => self.doc.keys_at(ROOT, h).collect(),
        };
        let mut out = Map::new();
        for key in keys {
            if key.starts_with('_') {
                continue;
            }
            let got = match heads {
                None => self.doc.get(ROOT, key.as_str()),
                Some(h) => self.doc.get_at(ROOT, key.as_str(), h),
            };
            let Ok(Some((value, id))) = got else { continue };
            let json = match value {
                AmValue::Object(ObjType::Text) => {
                    let text = match heads {
                        None => self.doc.text(&id),
                        Some(h) => self.doc.text_at(&id, h),
                    };
                    match text {
                        Ok(t) => Value::String(t),
                        Err(_) => continue,
                    }
                }
                AmValue::Object(_) => continue,
                AmValue::Scalar(s) => scalar_to_json(s.as_ref()),
            };
            out.insert(key, json);
        }
        out
    }

    /// Writes a patch of fields (JSON `null` removes an optional field). Values equal to the
    /// current ones are not rewritten, so an unchanged field never shows up as a conflicting edit.
    /// Counters may only be given a value when they do not exist yet; use [`EntityDoc::increment`].
    pub fn write_fields(&mut self, ty: &EntityType, patch: &Map<String, Value>) -> Result<(), DocError> {
        let current = self.fields();
        for (name, value) in patch {
            let field = ty.field(name).ok_or_else(|| DocError::UnknownField(name.clone()))?;
            // Skip only a settled equal value: a field holding concurrent values (an unresolved
            // merge) is rewritten, so the write supersedes every one of them.
            if current.get(name) == Some(value) && !self.has_concurrent_values(name) {
                continue;
            }
            if value.is_null() {
                if current.contains_key(name) {
                    if matches!(field.kind, FieldKind::Counter { .. }) {
                        return Err(DocError::CounterSet(name.clone()));
                    }
                    self.doc.delete(ROOT, name.as_str())?;
                }
                // A record written before a rename holds the value under the old name: removing
                // the field removes it there too, or readers would still see it.
                for old in field.renamed_from.iter().filter(|o| current.contains_key(o.as_str())) {
                    self.doc.delete(ROOT, old.as_str())?;
                }
                continue;
            }
            if let FieldKind::Counter { .. } = field.kind
                && current.contains_key(name)
            {
                return Err(DocError::CounterSet(name.clone()));
            }
            self.put_value(name, field, value)?;
        }
        Ok(())
    }

    /// Writes `value` under `key` as `field`'s kind stores it (`key` is the field's name, or
    /// one of its earlier names when the relay aligns a rename).
    fn put_value(&mut self, key: &str, field: &crate::registry::Field, value: &Value) -> Result<(), DocError> {
        let wrong = |kind: &'static str| DocError::WrongType {
            field: key.to_string(),
            kind,
            got: crate::validate::json_type_name(value),
        };
        match &field.kind {
            FieldKind::Text { .. } => {
                let s = value.as_str().ok_or_else(|| wrong("text"))?;
                self.set_text(key, s)?;
            }
            FieldKind::Counter { .. } => {
                let n = value.as_i64().ok_or_else(|| wrong("counter"))?;
                self.doc.put(ROOT, key, ScalarValue::counter(n))?;
            }
            FieldKind::Int { .. } => {
                let n = value.as_i64().ok_or_else(|| wrong("int"))?;
                self.doc.put(ROOT, key, n)?;
            }
            FieldKind::Float { .. } => {
                let x = value.as_f64().ok_or_else(|| wrong("float"))?;
                self.doc.put(ROOT, key, x)?;
            }
            FieldKind::Bool => {
                let b = value.as_bool().ok_or_else(|| wrong("bool"))?;
                self.doc.put(ROOT, key, b)?;
            }
            FieldKind::String { .. }
            | FieldKind::Timestamp
            | FieldKind::Date
            | FieldKind::Enum { .. }
            | FieldKind::Ref { .. } => {
                let s = value.as_str().ok_or_else(|| wrong(field.kind.type_name()))?;
                self.doc.put(ROOT, key, s)?;
            }
        }
        Ok(())
    }

    /// Whether a root key holds several concurrent values (writes no one has superseded yet).
    pub fn has_concurrent_values(&self, key: &str) -> bool {
        self.doc.get_all(ROOT, key).map(|v| v.len() > 1).unwrap_or(false)
    }

    /// Whether a root key holds concurrent values that differ: two writes of the same value
    /// (two devices merging one record into the same survivor) are no disagreement.
    pub fn has_differing_values(&mut self, key: &str) -> bool {
        if !self.has_concurrent_values(key) {
            return false;
        }
        let heads = self.heads();
        let values = self.values_at(key, &heads);
        values
            .iter()
            .skip(1)
            .any(|(v, _)| Some(v) != values.first().map(|(first, _)| first))
    }

    /// Replaces a text field's content by editing the existing text object in place (a minimal
    /// splice), so an edit made concurrently elsewhere in the text survives the merge.
    pub fn set_text(&mut self, field: &str, new_text: &str) -> Result<(), DocError> {
        let existing = match self.doc.get(ROOT, field)? {
            Some((AmValue::Object(ObjType::Text), id)) => Some(id),
            _ => None,
        };
        let id = match existing {
            Some(id) => id,
            None => self.doc.put_object(ROOT, field, ObjType::Text)?,
        };
        self.doc.update_text(&id, new_text)?;
        Ok(())
    }

    /// Creates every counter field of the type that the document does not hold yet, at zero.
    ///
    /// Counters must exist from the entity's creation on: if two devices each created a missing
    /// counter, the merge would keep one counter object and silently drop the increments made
    /// to the other. So a create initialises them all, and increments never create one.
    pub fn init_counters(&mut self, ty: &EntityType) -> Result<(), DocError> {
        for field in ty.counter_fields() {
            if self.doc.get(ROOT, field.name.as_str())?.is_none() {
                self.doc.put(ROOT, field.name.as_str(), ScalarValue::counter(0))?;
            }
        }
        Ok(())
    }

    /// Adds `by` to a counter field; the counter must exist (see [`EntityDoc::init_counters`]).
    pub fn increment(&mut self, field: &str, by: i64) -> Result<(), DocError> {
        let exists = matches!(
            self.doc.get(ROOT, field)?,
            Some((AmValue::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_))
        );
        if !exists {
            return Err(DocError::CounterMissing(field.to_string()));
        }
        self.doc.increment(ROOT, field, by)?;
        Ok(())
    }
}

fn scalar_to_json(s: &ScalarValue) -> Value {
    match s {
        ScalarValue::Str(s) => Value::String(s.to_string()),
        ScalarValue::Int(i) => Value::Number((*i).into()),
        ScalarValue::Uint(u) => Value::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        ScalarValue::Counter(c) => Value::Number(i64::from(c).into()),
        ScalarValue::Timestamp(t) => Value::Number((*t).into()),
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Null => Value::Null,
        ScalarValue::Bytes(b) => Value::String(hex::encode(b)),
        ScalarValue::Unknown { bytes, .. } => Value::String(hex::encode(bytes)),
    }
}

mod renames;
#[cfg(test)]
mod tests;
