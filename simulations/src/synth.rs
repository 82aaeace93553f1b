//! Synthetic devices for load generation and benchmarks: they build and sign mutations ahead
//! of time with the same document layout, signing bytes and envelopes as the peer, but without
//! a local database, so that a measurement is the relay's and not the client's.

use std::collections::BTreeMap;

use fieldsync_schema::document::device_actor;
use fieldsync_schema::signing::{connect_signing_bytes, enroll_signing_bytes};
use fieldsync_schema::wire::PROTOCOL_VERSION;
use fieldsync_schema::{Bytes, ClientMessage, DeviceKey, EntityDoc, HlcClock, Mutation, MutationKind, Schema, ids};
use rand_chacha::ChaCha20Rng;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::rng::stream;

pub struct SynthDevice {
    pub key: DeviceKey,
    pub device_id: Uuid,
    pub user_id: Uuid,
    pub space_id: Uuid,
    schema: Schema,
    docs: BTreeMap<Uuid, (EntityDoc, String)>,
    /// The relay version each entity will be at once every mutation built so far is applied.
    versions: BTreeMap<Uuid, u64>,
    hlc: HlcClock,
    rng: ChaCha20Rng,
}

impl SynthDevice {
    pub fn new(seed: u64, index: u64) -> Self {
        let mut rng = stream(seed, &format!("synth/{index}"));
        let key = DeviceKey::generate(&mut rng);
        let device_id = ids::new_uuid(&mut rng);
        SynthDevice {
            key,
            device_id,
            user_id: Uuid::nil(),
            space_id: Uuid::nil(),
            schema: Schema::default_schema(),
            docs: BTreeMap::new(),
            versions: BTreeMap::new(),
            hlc: HlcClock::new(device_id),
            rng,
        }
    }

    pub fn enroll_message(&self, token: &str) -> ClientMessage {
        let proof = self
            .key
            .sign(&enroll_signing_bytes(token, &self.device_id, &self.key.public_key()));
        ClientMessage::Enroll {
            protocol_version: PROTOCOL_VERSION,
            token: token.to_string(),
            device_id: self.device_id,
            public_key: Bytes(self.key.public_key().to_vec()),
            schema_hash: self.schema.hash(),
            proof: Bytes(proof.to_vec()),
        }
    }

    pub fn hello(&self) -> ClientMessage {
        ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            device_id: self.device_id,
            schema_hash: self.schema.hash(),
        }
    }

    pub fn auth(&self, relay_id: Uuid, nonce: &[u8]) -> ClientMessage {
        let sig = self.key.sign(&connect_signing_bytes(
            PROTOCOL_VERSION,
            &relay_id,
            nonce,
            &self.device_id,
            &self.key.public_key(),
        ));
        ClientMessage::Auth {
            signature: Bytes(sig.to_vec()),
        }
    }

    fn envelope(
        &mut self,
        entity_type: &str,
        entity_id: Uuid,
        kind: MutationKind,
        change: Vec<u8>,
        now: u64,
    ) -> Mutation {
        let base_version = (kind != MutationKind::Create).then(|| self.versions.get(&entity_id).copied().unwrap_or(0));
        *self.versions.entry(entity_id).or_insert(0) += 1;
        let mut m = Mutation {
            mutation_id: ids::new_uuid(&mut self.rng),
            device_id: self.device_id,
            user_id: self.user_id,
            space_id: self.space_id,
            entity_type: entity_type.to_string(),
            entity_id,
            kind,
            client_timestamp: self.hlc.tick(now),
            base_version,
            changes: vec![Bytes(change)],
            signature: Bytes::default(),
        };
        self.key.sign_mutation(&mut m);
        m
    }

    /// A create of a new entity; later updates of it build on the versions this device expects.
    pub fn create(&mut self, entity_type: &str, fields: &Map<String, Value>, now: u64) -> Option<Mutation> {
        let id = ids::new_uuid(&mut self.rng);
        let ty = self.schema.entity_type(entity_type)?.clone();
        let mut doc = EntityDoc::new(device_actor(self.device_id));
        doc.init_type(entity_type).ok()?;
        doc.write_fields(&ty, fields).ok()?;
        doc.init_counters(&ty).ok()?;
        let change = doc.commit(now)?.raw_bytes().to_vec();
        self.docs.insert(id, (doc, entity_type.to_string()));
        Some(self.envelope(entity_type, id, MutationKind::Create, change, now))
    }

    /// An update of an entity this device created.
    pub fn update(&mut self, id: Uuid, patch: &Map<String, Value>, now: u64) -> Option<Mutation> {
        let (doc, ty_name) = self.docs.get_mut(&id)?;
        let ty = self.schema.entity_type(ty_name)?.clone();
        doc.write_fields(&ty, patch).ok()?;
        let change = doc.commit(now)?.raw_bytes().to_vec();
        let ty_name = ty_name.clone();
        Some(self.envelope(&ty_name, id, MutationKind::Update, change, now))
    }

    pub fn entities(&self) -> Vec<Uuid> {
        self.docs.keys().copied().collect()
    }
}
