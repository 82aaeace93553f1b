//! A device built by hand, without a database: signed envelopes in exactly the peer's document
//! layout and signing bytes, for the relay's tests, the load generator, the benchmarks, the
//! attacker suite and the fuzzers (feature `testkit`). One copy, so a change to the envelope
//! or the layout cannot leave one of them behind.

use std::collections::BTreeMap;

use automerge::Change;
use rand_chacha::ChaCha20Rng;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::document::{self, DocError, NoteSignature, device_actor, parse_change};
use crate::signing::note_signature_bytes;
use crate::wire::{FeedEntry, FeedPayload, UserInfo};
use crate::{Bytes, ClientMessage, DeviceKey, EntityDoc, EntityType, HlcClock, Mutation, MutationKind, Schema, ids};

/// A JSON object literal as a field map: `obj(json!({"name": "Ada"}))`. For literals in tests,
/// benchmarks and the load generator — the one copy every crate's tests use. Panics on anything
/// but an object: a literal that is not one is a bug in the caller, not input to handle.
pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("obj() takes a JSON object literal, got {other}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandError {
    #[error("unknown entity type `{0}`")]
    UnknownType(String),
    #[error("no entity {0} on this device")]
    UnknownEntity(Uuid),
    #[error("the edit changed nothing")]
    NoChange,
    #[error(transparent)]
    Doc(#[from] DocError),
}

/// How the device predicts the relay version its next write builds on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// Only what the caller records ([`HandDevice::set_version`], applied feed entries): a test
    /// steers versions to provoke conflicts.
    Recorded,
    /// Every mutation built is assumed applied in order (a load generator's pre-built stream).
    Anticipated,
}

pub struct HandDevice {
    pub key: DeviceKey,
    pub device_id: Uuid,
    pub user_id: Uuid,
    /// The space new records go to.
    pub space_id: Uuid,
    pub docs: BTreeMap<Uuid, EntityDoc>,
    /// The relay version each entity's next write builds on.
    pub versions: BTreeMap<Uuid, u64>,
    pub hlc: HlcClock,
    pub rng: ChaCha20Rng,
    schema: Schema,
    types: BTreeMap<Uuid, String>,
    mode: Versions,
}

impl HandDevice {
    /// A new device whose key and id come from `rng`, on the default schema.
    pub fn new(mut rng: ChaCha20Rng, mode: Versions) -> Self {
        let key = DeviceKey::generate(&mut rng);
        let device_id = ids::new_uuid(&mut rng);
        HandDevice {
            key,
            device_id,
            user_id: Uuid::nil(),
            space_id: Uuid::nil(),
            docs: BTreeMap::new(),
            versions: BTreeMap::new(),
            hlc: HlcClock::new(device_id),
            rng,
            schema: Schema::default_schema(),
            types: BTreeMap::new(),
            mode,
        }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Takes the user and default space the relay named at enrollment or login.
    pub fn adopt_user(&mut self, user: &UserInfo) {
        self.user_id = user.user_id;
        if let Some(first) = user.spaces.first() {
            self.space_id = first.space_id;
        }
    }

    pub fn hello(&self) -> ClientMessage {
        ClientMessage::hello(self.device_id, &self.schema)
    }

    pub fn auth(&self, relay_id: Uuid, nonce: &[u8]) -> ClientMessage {
        ClientMessage::auth(&self.key, &relay_id, nonce, &self.device_id)
    }

    pub fn enroll(&self, token: &str) -> ClientMessage {
        ClientMessage::enroll(&self.key, token, self.device_id, &self.schema)
    }

    /// Wraps changes as this device's signed mutation on `entity_id`.
    pub fn envelope(
        &mut self,
        entity_type: &str,
        entity_id: Uuid,
        kind: MutationKind,
        changes: Vec<Bytes>,
        now_ms: u64,
    ) -> Mutation {
        let base_version = (kind != MutationKind::Create).then(|| self.versions.get(&entity_id).copied().unwrap_or(0));
        if self.mode == Versions::Anticipated {
            *self.versions.entry(entity_id).or_insert(0) += 1;
        }
        let mut m = Mutation {
            mutation_id: ids::new_uuid(&mut self.rng),
            device_id: self.device_id,
            user_id: self.user_id,
            space_id: self.space_id,
            entity_type: entity_type.to_string(),
            entity_id,
            kind,
            client_timestamp: self.hlc.tick(now_ms),
            base_version,
            changes,
            signature: Bytes::default(),
        };
        self.key.sign_mutation(&mut m);
        m
    }

    /// Edits the local document of `entity_id` with `edit` and wraps the change as a mutation.
    pub fn write(
        &mut self,
        entity_type: &str,
        entity_id: Uuid,
        kind: MutationKind,
        now_ms: u64,
        edit: impl FnOnce(&mut EntityDoc, &EntityType) -> Result<(), DocError>,
    ) -> Result<Mutation, HandError> {
        let ty = self
            .schema
            .entity_type(entity_type)
            .ok_or_else(|| HandError::UnknownType(entity_type.to_string()))?
            .clone();
        let actor = device_actor(self.device_id);
        let doc = self.docs.entry(entity_id).or_insert_with(|| EntityDoc::new(actor));
        if kind == MutationKind::Create {
            doc.init_type(entity_type)?;
        }
        edit(doc, &ty)?;
        let change = doc.commit(now_ms).ok_or(HandError::NoChange)?;
        self.types.insert(entity_id, entity_type.to_string());
        Ok(self.envelope(
            entity_type,
            entity_id,
            kind,
            vec![Bytes(change.raw_bytes().to_vec())],
            now_ms,
        ))
    }

    /// A create of a new record with these fields (and its counters at 0).
    pub fn create(
        &mut self,
        entity_type: &str,
        fields: &Map<String, Value>,
        now_ms: u64,
    ) -> Result<(Uuid, Mutation), HandError> {
        let id = ids::new_uuid(&mut self.rng);
        let m = self.write(entity_type, id, MutationKind::Create, now_ms, |d, ty| {
            d.write_fields(ty, fields)?;
            d.init_counters(ty)
        })?;
        Ok((id, m))
    }

    fn type_of(&self, id: Uuid) -> Result<String, HandError> {
        self.types.get(&id).cloned().ok_or(HandError::UnknownEntity(id))
    }

    pub fn update(&mut self, id: Uuid, patch: &Map<String, Value>, now_ms: u64) -> Result<Mutation, HandError> {
        let ty = self.type_of(id)?;
        self.write(&ty, id, MutationKind::Update, now_ms, |d, ty| d.write_fields(ty, patch))
    }

    pub fn delete(&mut self, id: Uuid, now_ms: u64) -> Result<Mutation, HandError> {
        let ty = self.type_of(id)?;
        self.write(&ty, id, MutationKind::Delete, now_ms, |d, _| d.set_deleted(true))
    }

    pub fn increment(&mut self, id: Uuid, field: &str, by: i64, now_ms: u64) -> Result<Mutation, HandError> {
        let ty = self.type_of(id)?;
        self.write(&ty, id, MutationKind::Increment, now_ms, |d, _| d.increment(field, by))
    }

    pub fn lock(&mut self, id: Uuid, now_ms: u64) -> Result<Mutation, HandError> {
        let ty = self.type_of(id)?;
        let locked: Map<String, Value> = [("locked".to_string(), Value::Bool(true))].into_iter().collect();
        self.write(&ty, id, MutationKind::Lock, now_ms, |d, ty| d.write_fields(ty, &locked))
    }

    /// Signs a note as this device's user, over the content this device holds.
    pub fn sign_note(&mut self, id: Uuid, now_ms: u64) -> Result<Mutation, HandError> {
        let (user, device, key) = (self.user_id, self.device_id, self.key.clone());
        self.write("note", id, MutationKind::Sign, now_ms, |d, _| {
            let hash = document::content_hash(&d.fields());
            let sig = key.sign(&note_signature_bytes(&id, &hash, &user, &device, now_ms));
            d.set_signature(&NoteSignature {
                signer_user: user,
                signer_device: device,
                signed_at_ms: now_ms,
                content_hash: hex::encode(hash),
                signature: hex::encode(sig),
            })
        })
    }

    /// Records the relay version `id`'s next write builds on.
    pub fn set_version(&mut self, id: Uuid, version: u64) {
        self.versions.insert(id, version);
    }

    /// Applies a feed entry from the relay to the local documents and versions.
    pub fn apply_entry(&mut self, e: &FeedEntry) -> Result<(), HandError> {
        if matches!(e.payload, FeedPayload::NotSelected) {
            return Ok(());
        }
        let actor = device_actor(self.device_id);
        match &e.payload {
            FeedPayload::Changes(changes) => {
                let parsed = changes
                    .iter()
                    .map(|c| parse_change(&c.0))
                    .collect::<Result<Vec<Change>, _>>()?;
                let doc = self.docs.entry(e.entity_id).or_insert_with(|| EntityDoc::new(actor));
                doc.apply(parsed)?;
            }
            FeedPayload::Snapshot(bytes) => {
                let mut loaded = EntityDoc::load(&bytes.0, actor)?;
                match self.docs.get_mut(&e.entity_id) {
                    Some(doc) => doc.apply(loaded.all_changes())?,
                    None => {
                        self.docs.insert(e.entity_id, loaded);
                    }
                }
            }
            FeedPayload::Own | FeedPayload::NotSelected => {}
        }
        self.types.insert(e.entity_id, e.entity_type.clone());
        let v = self.versions.entry(e.entity_id).or_insert(0);
        *v = (*v).max(e.version);
        Ok(())
    }

    /// The fields this device holds for `id`.
    pub fn fields(&self, id: Uuid) -> Option<Map<String, Value>> {
        self.docs.get(&id).map(EntityDoc::fields)
    }

    /// The records this device created or received.
    pub fn entities(&self) -> Vec<Uuid> {
        self.docs.keys().copied().collect()
    }

    /// Forgets a record (a create the relay refused, say).
    pub fn forget(&mut self, id: Uuid) {
        self.docs.remove(&id);
        self.types.remove(&id);
        self.versions.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use rand_core::SeedableRng;

    use super::*;
    use crate::signing::Verifier;

    #[test]
    fn a_hand_device_builds_signed_envelopes_in_the_peers_layout() {
        let mut d = HandDevice::new(ChaCha20Rng::seed_from_u64(1), Versions::Anticipated);
        let (id, create) = d
            .create("patient", &obj(serde_json::json!({"name": "Ada"})), 1_000)
            .unwrap();
        assert_eq!((create.kind, create.base_version), (MutationKind::Create, None));
        Verifier::new(&d.key.public_key())
            .unwrap()
            .verify_mutation(&create)
            .unwrap();
        let update = d
            .update(id, &obj(serde_json::json!({"name": "Ada L."})), 2_000)
            .unwrap();
        assert_eq!(
            update.base_version,
            Some(1),
            "anticipated: the create is assumed applied"
        );
        assert!(update.client_timestamp > create.client_timestamp);
        let change = parse_change(&update.changes[0].0).unwrap();
        assert_eq!(change.actor_id(), &device_actor(d.device_id));
        assert_eq!(d.fields(id).unwrap()["name"], Value::from("Ada L."));
        assert!(matches!(
            d.update(Uuid::nil(), &Map::new(), 3_000),
            Err(HandError::UnknownEntity(_))
        ));
        let mut r = HandDevice::new(ChaCha20Rng::seed_from_u64(2), Versions::Recorded);
        let (id, _) = r
            .create("workout", &obj(serde_json::json!({"name": "Legs"})), 1_000)
            .unwrap();
        let u = r.update(id, &obj(serde_json::json!({"name": "Arms"})), 1_001).unwrap();
        assert_eq!(u.base_version, Some(0), "recorded: nothing applied yet");
    }
}
