//! Synthetic devices for load generation and benchmarks: the hand-built device of
//! `fieldsync_schema::testkit` (the peer's document layout, signing bytes and envelopes, no
//! local database), so that a measurement is the relay's and not the client's. Mutations are
//! built ahead of time, each assuming the ones before it are applied.

use std::ops::{Deref, DerefMut};

use fieldsync_schema::testkit::{HandDevice, Versions};
use fieldsync_schema::{ClientMessage, Mutation};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::rng::stream;

pub struct SynthDevice(HandDevice);

impl SynthDevice {
    /// Device `index` of a run seeded with `seed`.
    pub fn new(seed: u64, index: u64) -> Self {
        SynthDevice(HandDevice::new(
            stream(seed, &format!("synth/{index}")),
            Versions::Anticipated,
        ))
    }

    pub fn enroll_message(&self, token: &str) -> ClientMessage {
        self.0.enroll(token)
    }

    /// A create of a new entity; later updates of it build on the versions this device expects.
    pub fn create(&mut self, entity_type: &str, fields: &Map<String, Value>, now: u64) -> Option<Mutation> {
        self.0.create(entity_type, fields, now).ok().map(|(_, m)| m)
    }

    /// An update of an entity this device created.
    pub fn update(&mut self, id: Uuid, patch: &Map<String, Value>, now: u64) -> Option<Mutation> {
        self.0.update(id, patch, now).ok()
    }
}

impl Deref for SynthDevice {
    type Target = HandDevice;
    fn deref(&self) -> &HandDevice {
        &self.0
    }
}

impl DerefMut for SynthDevice {
    fn deref_mut(&mut self) -> &mut HandDevice {
        &mut self.0
    }
}
