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
    pub fn of(changes: &[Change]) -> RootOps {
        use automerge::legacy::{Key, ObjectId};
        let mut out = RootOps::default();
        for change in changes {
            for op in change.decode().operations {
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
        out
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
    Change::from_bytes(bytes.to_vec()).map_err(|e| DocError::BadChange(e.to_string()))
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
        let doc = AutoCommit::load(bytes).map_err(|e| DocError::Corrupt(e.to_string()))?;
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

    /// Applies changes from elsewhere (idempotent: known changes are skipped).
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<(), DocError> {
        self.doc.apply_changes(changes)?;
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
                continue;
            }
            let wrong = |kind: &'static str| DocError::WrongType {
                field: name.clone(),
                kind,
                got: crate::validate::json_type_name(value),
            };
            match &field.kind {
                FieldKind::Text { .. } => {
                    let s = value.as_str().ok_or_else(|| wrong("text"))?;
                    self.set_text(name, s)?;
                }
                FieldKind::Counter { .. } => {
                    if current.contains_key(name) {
                        return Err(DocError::CounterSet(name.clone()));
                    }
                    let n = value.as_i64().ok_or_else(|| wrong("counter"))?;
                    self.doc.put(ROOT, name.as_str(), ScalarValue::counter(n))?;
                }
                FieldKind::Int { .. } => {
                    let n = value.as_i64().ok_or_else(|| wrong("int"))?;
                    self.doc.put(ROOT, name.as_str(), n)?;
                }
                FieldKind::Float { .. } => {
                    let x = value.as_f64().ok_or_else(|| wrong("float"))?;
                    self.doc.put(ROOT, name.as_str(), x)?;
                }
                FieldKind::Bool => {
                    let b = value.as_bool().ok_or_else(|| wrong("bool"))?;
                    self.doc.put(ROOT, name.as_str(), b)?;
                }
                FieldKind::String { .. }
                | FieldKind::Timestamp
                | FieldKind::Date
                | FieldKind::Enum { .. }
                | FieldKind::Ref { .. } => {
                    let s = value.as_str().ok_or_else(|| wrong(field.kind.type_name()))?;
                    self.doc.put(ROOT, name.as_str(), s)?;
                }
            }
        }
        Ok(())
    }

    /// Whether a root key holds several concurrent values (writes no one has superseded yet).
    pub fn has_concurrent_values(&self, key: &str) -> bool {
        self.doc.get_all(ROOT, key).map(|v| v.len() > 1).unwrap_or(false)
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::registry::Schema;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn dev(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    #[test]
    fn fields_round_trip_through_save_and_load() {
        let schema = Schema::default_schema();
        let set = schema.entity_type("set").unwrap();
        let mut d = EntityDoc::new(device_actor(dev(1)));
        d.init_type("set").unwrap();
        let fields =
            obj(json!({"session_id": dev(2).to_string(), "exercise_name": "Squat", "reps": 8, "weight_kg": 60.5}));
        d.write_fields(set, &fields).unwrap();
        let change = d.commit(1_000_000).unwrap();
        assert_eq!(change.timestamp(), 1_000);
        assert_eq!(actor_device(change.actor_id()), Some(dev(1)));
        let bytes = d.save();
        let loaded = EntityDoc::load(&bytes, device_actor(dev(1))).unwrap();
        assert_eq!(loaded.fields(), fields);
        assert_eq!(loaded.entity_type().as_deref(), Some("set"));
        assert!(!loaded.is_deleted());
    }

    #[test]
    fn concurrent_text_edits_both_survive() {
        let schema = Schema::default_schema();
        let note = schema.entity_type("note").unwrap();
        let mut a = EntityDoc::new(device_actor(dev(1)));
        a.init_type("note").unwrap();
        a.write_fields(
            note,
            &obj(json!({"patient_id": dev(9).to_string(), "body": "Knee stable. Continue plan."})),
        )
        .unwrap();
        a.commit(1).unwrap();
        let mut b = EntityDoc::load(&a.save(), device_actor(dev(2))).unwrap();
        a.set_text("body", "Knee stable, swelling down. Continue plan.")
            .unwrap();
        let ca = a.commit(2).unwrap();
        b.set_text("body", "Knee stable. Continue plan; add balance work.")
            .unwrap();
        let cb = b.commit(3).unwrap();
        a.apply(vec![cb]).unwrap();
        b.apply(vec![ca]).unwrap();
        assert_eq!(a.fields(), b.fields());
        let body = a.fields()["body"].as_str().unwrap().to_string();
        assert!(
            body.contains("swelling down") && body.contains("balance work"),
            "{body}"
        );
    }

    #[test]
    fn concurrent_increments_add_and_counters_refuse_overwrites() {
        let schema = Schema::default_schema();
        let vol = schema.entity_type("volume").unwrap();
        let mut a = EntityDoc::new(device_actor(dev(1)));
        a.init_type("volume").unwrap();
        a.write_fields(vol, &obj(json!({"week": "2026-11-16", "legs_sets": 0})))
            .unwrap();
        a.commit(1).unwrap();
        let mut b = EntityDoc::load(&a.save(), device_actor(dev(2))).unwrap();
        a.increment("legs_sets", 3).unwrap();
        let ca = a.commit(2).unwrap();
        b.increment("legs_sets", 4).unwrap();
        let cb = b.commit(2).unwrap();
        let ops = RootOps::of(std::slice::from_ref(&cb));
        assert_eq!(ops.increments.get("legs_sets"), Some(&4));
        assert!(ops.counter_puts.is_empty());
        a.apply(vec![cb]).unwrap();
        b.apply(vec![ca]).unwrap();
        assert_eq!(a.fields()["legs_sets"], json!(7));
        assert_eq!(b.fields()["legs_sets"], json!(7));
        let err = a.write_fields(vol, &obj(json!({"legs_sets": 0}))).unwrap_err();
        assert!(matches!(err, DocError::CounterSet(_)));
        // Increments never create a counter: two devices would create two counter objects.
        assert!(matches!(a.increment("core_sets", 2), Err(DocError::CounterMissing(_))));
        a.init_counters(vol).unwrap();
        assert_eq!(a.fields()["core_sets"], json!(0));
        assert_eq!(a.fields()["legs_sets"], json!(7), "existing counters are left alone");
    }

    #[test]
    fn history_keeps_earlier_values_readable() {
        let schema = Schema::default_schema();
        let p = schema.entity_type("patient").unwrap();
        let mut d = EntityDoc::new(device_actor(dev(1)));
        d.init_type("patient").unwrap();
        d.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
        d.commit(1).unwrap();
        let before = d.heads();
        d.write_fields(p, &obj(json!({"name": "Ada L.", "mrn": null}))).unwrap();
        d.commit(2).unwrap();
        assert_eq!(d.fields_at(&before)["name"], json!("Ada"));
        assert_eq!(d.fields()["name"], json!("Ada L."));
    }

    #[test]
    fn unchanged_values_produce_no_operations() {
        let schema = Schema::default_schema();
        let p = schema.entity_type("patient").unwrap();
        let mut d = EntityDoc::new(device_actor(dev(1)));
        d.init_type("patient").unwrap();
        d.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
        d.commit(1).unwrap();
        d.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
        assert!(d.commit(2).is_none());
    }

    #[test]
    fn rewriting_the_shown_value_of_a_concurrently_written_field_supersedes_both() {
        let schema = Schema::default_schema();
        let p = schema.entity_type("patient").unwrap();
        let mut a = EntityDoc::new(device_actor(dev(1)));
        a.init_type("patient").unwrap();
        a.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
        a.commit(1).unwrap();
        let mut b = EntityDoc::load(&a.save(), device_actor(dev(2))).unwrap();
        a.write_fields(p, &obj(json!({"name": "A"}))).unwrap();
        let ca = a.commit(2).unwrap();
        b.write_fields(p, &obj(json!({"name": "B"}))).unwrap();
        b.commit(2).unwrap();
        b.apply(vec![ca]).unwrap();
        assert!(b.has_concurrent_values("name"));
        let shown = b.fields()["name"].clone();
        b.write_fields(p, &obj(json!({"name": shown}))).unwrap();
        assert!(b.commit(3).is_some(), "resolving to the shown value must still write");
        assert!(!b.has_concurrent_values("name"));
    }

    #[test]
    fn values_at_names_the_writer_of_each_concurrent_value_and_commit_always_commits() {
        let schema = Schema::default_schema();
        let p = schema.entity_type("patient").unwrap();
        let mut a = EntityDoc::new(device_actor(dev(1)));
        a.init_type("patient").unwrap();
        a.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
        a.commit(1).unwrap();
        let base = a.heads();
        let mut b = EntityDoc::load(&a.save(), device_actor(dev(2))).unwrap();
        a.write_fields(p, &obj(json!({"name": "A"}))).unwrap();
        let ca = a.commit(2_000).unwrap();
        b.write_fields(p, &obj(json!({"name": "B"}))).unwrap();
        b.commit(2_000).unwrap();
        b.apply(vec![ca]).unwrap();
        let heads = b.heads();
        let mut values = b.values_at("name", &heads);
        values.sort_by_key(|(_, d)| *d);
        assert_eq!(values, vec![(json!("A"), Some(dev(1))), (json!("B"), Some(dev(2)))]);
        assert_eq!(b.values_at("name", &base), vec![(json!("Ada"), Some(dev(1)))]);
        assert!(b.values_at("mrn", &heads).is_empty());
        // Nothing to commit: still a change, on top of both sides.
        let empty = b.commit_always(3_000).unwrap();
        assert_eq!(empty.len(), 0);
        assert_eq!(b.heads(), vec![empty.hash()]);
        assert_eq!(empty.deps().len(), 2);
        assert_eq!(empty.timestamp(), 3);
    }

    #[test]
    fn tombstone_signature_and_lock_are_visible() {
        let schema = Schema::default_schema();
        let form = schema.entity_type("intake_form").unwrap();
        let mut d = EntityDoc::new(device_actor(dev(1)));
        d.init_type("intake_form").unwrap();
        d.write_fields(form, &obj(json!({"patient_id": dev(3).to_string(), "locked": true})))
            .unwrap();
        d.set_deleted(true).unwrap();
        let sig = NoteSignature {
            signer_user: dev(4),
            signer_device: dev(1),
            signed_at_ms: 5,
            content_hash: "ab".into(),
            signature: "cd".into(),
        };
        d.set_signature(&sig).unwrap();
        d.commit(1).unwrap();
        assert!(d.is_locked() && d.is_deleted() && d.is_signed());
        assert_eq!(d.signature(), Some(sig));
        assert!(!d.fields().contains_key(META_DELETED));
    }

    #[test]
    fn content_hash_ignores_key_order_but_not_values() {
        let a = obj(json!({"a": 1, "b": "x"}));
        let mut b = Map::new();
        b.insert("b".into(), json!("x"));
        b.insert("a".into(), json!(1));
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_ne!(content_hash(&a), content_hash(&obj(json!({"a": 2, "b": "x"}))));
    }

    #[test]
    fn relay_actor_never_collides_with_a_device_actor() {
        let id = dev(7);
        assert_ne!(relay_actor(id), device_actor(id));
        assert_eq!(actor_device(&relay_actor(id)), None);
    }
}
