//! A device identity that builds signed mutations the way an honest device does, so a test
//! can change exactly one thing about them.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};

use fieldsync_schema::testkit::{HandDevice, Versions};
use fieldsync_schema::wire::{MutationResult, UserInfo};
use fieldsync_schema::{
    Bytes, ClientMessage, DeviceKey, EntityDoc, EntityType, FeedEntry, Mutation, MutationKind, Outcome, PullCursor,
    RelayMessage, ids,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::Value;
use uuid::Uuid;

use super::{RawConn, Recorder, now_ms, obj};
use crate::Relay;

/// A device identity speaking raw frames: the hand-built device of `fieldsync_schema::testkit`
/// (its key, ids and Automerge documents, so it builds correctly signed mutations and can then
/// tamper with them), its user, and a recording of every frame it received.
pub struct Dev {
    pub hand: HandDevice,
    pub user: UserInfo,
    pub recorder: Recorder,
    next_batch: u64,
}

impl Deref for Dev {
    type Target = HandDevice;
    fn deref(&self) -> &HandDevice {
        &self.hand
    }
}

impl DerefMut for Dev {
    fn deref_mut(&mut self) -> &mut HandDevice {
        &mut self.hand
    }
}

impl Dev {
    /// A fresh key and device id from `seed`.
    pub fn identity(seed: u64) -> (DeviceKey, Uuid, ChaCha20Rng) {
        let rng = ChaCha20Rng::seed_from_u64(seed);
        let hand = HandDevice::new(rng.clone(), Versions::Recorded);
        (hand.key.clone(), hand.device_id, hand.rng)
    }

    /// Enrolls a new device for `user` with a fresh token, over a raw connection.
    pub async fn enroll(relay: &Relay, user: &str, seed: u64) -> Dev {
        let mut hand = HandDevice::new(ChaCha20Rng::seed_from_u64(seed), Versions::Recorded);
        let token = relay.token(user);
        let recorder = Recorder::new();
        let mut conn = RawConn::open_recorded(relay, &recorder).await;
        conn.send(&hand.enroll(&token)).await;
        let user = match conn.recv().await {
            RelayMessage::Enrolled { user, .. } => user,
            other => panic!("enrollment failed: {other:?}"),
        };
        let (_, end) = conn.until_end().await;
        assert_eq!(end.code(), Some(1000), "{end:?}");
        hand.adopt_user(&user);
        Dev {
            hand,
            user,
            recorder,
            next_batch: 1,
        }
    }

    pub fn space(&self, name: &str) -> Uuid {
        self.user
            .spaces
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{} is not in {name}", self.user.name))
            .space_id
    }

    /// A fresh id from this device's randomness.
    pub fn new_id(&mut self) -> Uuid {
        ids::new_uuid(&mut self.hand.rng)
    }

    /// Hello, Challenge, Auth, Welcome on a new connection.
    pub async fn connect(&self, relay: &Relay) -> RawConn {
        let mut conn = RawConn::open_recorded(relay, &self.recorder).await;
        conn.send(&self.hello()).await;
        let (relay_id, nonce) = match conn.recv().await {
            RelayMessage::Challenge { relay_id, nonce } => (relay_id, nonce),
            other => panic!("expected a challenge, got {other:?}"),
        };
        conn.send(&self.auth(relay_id, &nonce.0)).await;
        match conn.recv().await {
            RelayMessage::Welcome { .. } => {}
            other => panic!("login failed: {other:?}"),
        }
        conn
    }

    /// A signed envelope around `changes`, in [`HandDevice::space_id`], based on the known version.
    pub fn envelope(
        &mut self,
        entity_type: &str,
        entity_id: Uuid,
        kind: MutationKind,
        changes: Vec<Bytes>,
    ) -> Mutation {
        self.hand.envelope(entity_type, entity_id, kind, changes, now_ms())
    }

    /// Edits the local document of `entity_id` with `edit` and wraps the change as a mutation.
    pub fn write(
        &mut self,
        entity_type: &str,
        entity_id: Uuid,
        kind: MutationKind,
        edit: impl FnOnce(&mut EntityDoc, &EntityType),
    ) -> Mutation {
        self.hand
            .write(entity_type, entity_id, kind, now_ms(), |d, ty| {
                edit(d, ty);
                Ok(())
            })
            .expect("the edit changed something")
    }

    pub fn create(&mut self, entity_type: &str, fields: Value) -> (Uuid, Mutation) {
        let id = self.new_id();
        let m = self.create_with_id(entity_type, id, fields);
        (id, m)
    }

    pub fn create_with_id(&mut self, entity_type: &str, id: Uuid, fields: Value) -> Mutation {
        let fields = obj(fields);
        self.write(entity_type, id, MutationKind::Create, |d, ty| {
            d.write_fields(ty, &fields).unwrap();
            d.init_counters(ty).unwrap();
        })
    }

    pub fn update(&mut self, entity_type: &str, id: Uuid, patch: Value) -> Mutation {
        let patch = obj(patch);
        self.write(entity_type, id, MutationKind::Update, |d, ty| {
            d.write_fields(ty, &patch).unwrap()
        })
    }

    pub fn delete(&mut self, entity_type: &str, id: Uuid) -> Mutation {
        self.write(entity_type, id, MutationKind::Delete, |d, _| {
            d.set_deleted(true).unwrap()
        })
    }

    pub fn lock(&mut self, entity_type: &str, id: Uuid) -> Mutation {
        self.write(entity_type, id, MutationKind::Lock, |d, ty| {
            d.write_fields(ty, &obj(serde_json::json!({"locked": true}))).unwrap()
        })
    }

    /// A `Sign` mutation for a note, with a valid signature by this device over its content.
    pub fn sign_note(&mut self, id: Uuid) -> Mutation {
        self.hand.sign_note(id, now_ms()).expect("a signable note")
    }

    /// The note signature write under any `kind` (to try it as an `Update`).
    pub fn sign_note_as(&mut self, id: Uuid, kind: MutationKind) -> Mutation {
        let mut m = self.sign_note(id);
        m.kind = kind;
        self.resign(m)
    }

    /// Signs `m` again with this device's key (after a deliberate change).
    pub fn resign(&self, mut m: Mutation) -> Mutation {
        self.key.sign_mutation(&mut m);
        m
    }

    /// Pushes a batch and reads its result (skipping live entries that arrive first).
    pub async fn push(&mut self, conn: &mut RawConn, mutations: Vec<Mutation>) -> Vec<MutationResult> {
        let batch_id = self.next_batch;
        self.next_batch += 1;
        let entities: BTreeMap<Uuid, Uuid> = mutations.iter().map(|m| (m.mutation_id, m.entity_id)).collect();
        conn.send(&ClientMessage::Push { batch_id, mutations }).await;
        loop {
            match conn.recv().await {
                RelayMessage::PushResult { batch_id: b, results } if b == batch_id => {
                    for r in &results {
                        if let Some((version, _)) = r.outcome.applied() {
                            let e = entities[&r.mutation_id];
                            let v = self.versions.entry(e).or_insert(0);
                            *v = (*v).max(version);
                        }
                    }
                    return results;
                }
                RelayMessage::Live { .. } | RelayMessage::Pong { .. } | RelayMessage::UserChanged { .. } => {}
                other => panic!("expected the push result, got {other:?}"),
            }
        }
    }

    pub async fn push_one(&mut self, conn: &mut RawConn, m: Mutation) -> Outcome {
        self.push(conn, vec![m]).await.remove(0).outcome
    }

    /// Pulls from `cursor` until caught up, applying what arrives; returns every entry.
    pub async fn pull_from(&mut self, conn: &mut RawConn, mut cursor: PullCursor) -> (Vec<FeedEntry>, PullCursor) {
        let mut all = Vec::new();
        for _ in 0..10_000 {
            conn.send(&ClientMessage::Pull {
                cursor,
                max_entries: 1000,
            })
            .await;
            let (entries, next, caught_up) = loop {
                match conn.recv().await {
                    RelayMessage::Changes {
                        entries,
                        next,
                        caught_up,
                    } => break (entries, next, caught_up),
                    RelayMessage::Live { .. } | RelayMessage::UserChanged { .. } => {}
                    other => panic!("expected a changes page, got {other:?}"),
                }
            };
            for e in &entries {
                self.apply_entry(e);
            }
            all.extend(entries);
            cursor = next;
            if caught_up {
                return (all, cursor);
            }
        }
        panic!("the pull never caught up");
    }

    pub async fn pull_all(&mut self, conn: &mut RawConn) -> Vec<FeedEntry> {
        self.pull_from(conn, PullCursor::default()).await.0
    }

    pub fn apply_entry(&mut self, e: &FeedEntry) {
        self.hand.apply_entry(e).expect("a well-formed entry");
    }
}
