//! A relay on a temporary SQLite store (directory and shards), and minimal devices that build signed mutations the way
//! the peer does, so the core can be exercised message by message.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::Arc;

use fieldsync_relay::admin;
use fieldsync_relay::audit::{self, VerifyReport};
use fieldsync_relay::core::{ConnId, Input, Output, RelayConfig, RelayCore};
use fieldsync_relay::store::postgres::PgBackend;
use fieldsync_relay::store::postgres::throwaway::Throwaway;
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_relay::store::{ArchiveRow, Backend, Counts, Directory, DocumentRow, ReceiptRow, SpaceRow, SpaceStore};
use fieldsync_schema::document::device_actor;
use fieldsync_schema::testkit::{HandDevice, Versions};
use fieldsync_schema::wire::MutationResult;
use fieldsync_schema::{
    ClientMessage, EntityDoc, FeedEntry, Hlc, Mutation, MutationKind, Outcome, PullCursor, RelayMessage, Role, Schema,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::{Map, Value};
use uuid::Uuid;

pub const T0: u64 = 1_795_000_000_000;

/// A relay core on a store: SQLite in a temporary directory ([`TestRelay::new`]), or a
/// throwaway PostgreSQL server ([`TestRelay::postgres`]).
pub struct TestRelay<B: Backend = SqliteBackend> {
    pub dir: tempfile::TempDir,
    pub backend: B,
    pub core: RelayCore<B>,
    pub rng: ChaCha20Rng,
    pub now: u64,
    next_conn: ConnId,
    /// The PostgreSQL server of a `postgres` relay, stopped when the relay is dropped.
    pub server: Option<Arc<Throwaway>>,
}

pub use fieldsync_schema::testkit::obj;

impl TestRelay<SqliteBackend> {
    pub fn new() -> Self {
        Self::with_config(RelayConfig::default())
    }

    pub fn with_config(config: RelayConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let core = Self::open_core(dir.path().to_path_buf(), 1, config);
        TestRelay {
            backend: SqliteBackend::open_existing(dir.path()).unwrap(),
            dir,
            core,
            rng: ChaCha20Rng::seed_from_u64(99),
            now: T0,
            next_conn: 1,
            server: None,
        }
    }

    fn open_core(dir: PathBuf, seed: u64, config: RelayConfig) -> RelayCore<SqliteBackend> {
        let backend = SqliteBackend::open(&dir, Uuid::from_bytes([0xAA; 16])).unwrap();
        RelayCore::new(
            &backend,
            Arc::new(Schema::default_schema()),
            config,
            Box::new(ChaCha20Rng::seed_from_u64(seed)),
        )
        .unwrap()
    }

    /// A second relay core on the same store file: another relay process sharing the store.
    pub fn second_core(&self) -> RelayCore<SqliteBackend> {
        Self::open_core(self.dir.path().to_path_buf(), 3, RelayConfig::default())
    }

    /// Drops the core (all memory) and reopens the same files, like a relay restart.
    pub fn restart(&mut self) {
        let dir = self.dir.path().to_path_buf();
        self.core = Self::open_core(dir, 2, RelayConfig::default());
    }

    /// The shard file that holds a space's data.
    pub fn shard_file(&self, space: Uuid) -> PathBuf {
        let row = self.core.directory().space(space).unwrap().expect("space exists");
        fieldsync_relay::store::sqlite::shard_path(self.dir.path(), row.shard)
    }
}

impl TestRelay<PgBackend> {
    /// A relay on a new throwaway PostgreSQL server (`None`, after a notice, where there is no
    /// PostgreSQL and CI does not demand one).
    pub fn postgres(test: &str) -> Option<Self> {
        let server = Throwaway::start_or_skip(test)?;
        let url = server.database("relay");
        Some(Self::on_postgres(Arc::new(server), &url, 1))
    }

    /// Another relay process of the same cluster: its own core on the same database.
    pub fn another_relay(&self, seed: u64) -> Self {
        let server = self.server.clone().expect("a postgres relay");
        let mut relay = Self::on_postgres(server, self.backend.url(), seed);
        relay.now = self.now;
        relay.next_conn = 1_000 * seed;
        relay
    }

    fn on_postgres(server: Arc<Throwaway>, url: &str, seed: u64) -> Self {
        let backend = PgBackend::open(url, Uuid::from_bytes([0xAA; 16]), 2).unwrap();
        let core = RelayCore::new(
            &backend,
            Arc::new(Schema::default_schema()),
            RelayConfig::default(),
            Box::new(ChaCha20Rng::seed_from_u64(seed)),
        )
        .unwrap();
        TestRelay {
            dir: tempfile::tempdir().unwrap(),
            backend,
            core,
            rng: ChaCha20Rng::seed_from_u64(99 + seed),
            now: T0,
            next_conn: 1,
            server: Some(server),
        }
    }
}

impl<B: Backend> TestRelay<B> {
    pub fn space(&mut self, name: &str) -> Uuid {
        admin::add_space(self.core.directory_mut(), name, self.now, &mut self.rng)
            .unwrap()
            .space_id
    }

    pub fn user(&mut self, name: &str, space: &str, role: Role) -> Uuid {
        admin::add_user(self.core.directory_mut(), name, space, role, self.now, &mut self.rng)
            .unwrap()
            .user_id
    }

    /// Enrolls a new device for `user` through the protocol and authenticates it.
    pub fn device(&mut self, user: &str, seed: u64) -> TestDevice {
        let mut hand = HandDevice::new(ChaCha20Rng::seed_from_u64(seed), Versions::Recorded);
        let (token, _) = admin::create_enrollment_token(
            self.core.directory_mut(),
            user,
            admin::DEFAULT_TOKEN_TTL_MS,
            self.now,
            &mut self.rng,
        )
        .unwrap();
        let conn = self.connect();
        let out = self.send(conn, hand.enroll(&token));
        let user_info = match &out[0] {
            Output::Send(_, RelayMessage::Enrolled { user, .. }) => user.clone(),
            other => panic!("enrollment failed: {other:?}"),
        };
        self.core.handle([Input::Closed(conn)], self.now);
        hand.adopt_user(&user_info);
        let mut dev = TestDevice {
            hand,
            conn: 0,
            cursor: PullCursor::default(),
        };
        dev.conn = self.login(&dev);
        dev
    }

    pub fn connect(&mut self) -> ConnId {
        let c = self.next_conn;
        self.next_conn += 1;
        self.core.handle([Input::Opened(c)], 0);
        c
    }

    /// Runs the handshake for an enrolled device; returns the authenticated connection.
    pub fn login(&mut self, dev: &TestDevice) -> ConnId {
        self.login_with(dev, |_| {})
    }

    /// [`TestRelay::login`] with the device's `Hello` changed by `edit` (the types it holds,
    /// windows, priority order, a metered link).
    pub fn login_with(&mut self, dev: &TestDevice, edit: impl FnOnce(&mut ClientMessage)) -> ConnId {
        let conn = self.connect();
        let mut hello = dev.hello();
        edit(&mut hello);
        let out = self.send(conn, hello);
        let (relay_id, nonce) = match &out[0] {
            Output::Send(_, RelayMessage::Challenge { relay_id, nonce }) => (*relay_id, nonce.clone()),
            other => panic!("expected a challenge, got {other:?}"),
        };
        let out = self.send(conn, dev.auth(relay_id, &nonce.0));
        assert!(
            matches!(&out[0], Output::Send(_, RelayMessage::Welcome { .. })),
            "login failed: {out:?}"
        );
        conn
    }

    pub fn send(&mut self, conn: ConnId, msg: ClientMessage) -> Vec<Output> {
        self.now += 1;
        self.core.handle([Input::message(conn, msg)], self.now)
    }

    /// Pushes mutations from `dev` as one batch and returns the results.
    pub fn push(&mut self, dev: &mut TestDevice, mutations: Vec<Mutation>) -> Vec<MutationResult> {
        let conn = dev.conn;
        let entities: BTreeMap<Uuid, Uuid> = mutations.iter().map(|m| (m.mutation_id, m.entity_id)).collect();
        let out = self.send(conn, ClientMessage::Push { batch_id: 1, mutations });
        let results = out
            .into_iter()
            .find_map(|o| match o {
                Output::Send(c, RelayMessage::PushResult { results, .. }) if c == conn => Some(results),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no push result"));
        for r in &results {
            if let Some((version, _)) = r.outcome.applied() {
                dev.set_version(entities[&r.mutation_id], version);
            }
        }
        results
    }

    /// Pushes one mutation and returns its outcome.
    pub fn push_one(&mut self, dev: &mut TestDevice, m: Mutation) -> Outcome {
        self.push(dev, vec![m]).remove(0).outcome
    }

    /// Pulls until caught up, applying what arrives; returns every entry received.
    pub fn pull(&mut self, dev: &mut TestDevice) -> Vec<FeedEntry> {
        let mut all = Vec::new();
        loop {
            let out = self.send(
                dev.conn,
                ClientMessage::Pull {
                    cursor: dev.cursor.clone(),
                    max_entries: 100,
                },
            );
            let (entries, next, caught_up) = out
                .into_iter()
                .find_map(|o| match o {
                    Output::Send(
                        _,
                        RelayMessage::Changes {
                            entries,
                            next,
                            caught_up,
                        },
                    ) => Some((entries, next, caught_up)),
                    _ => None,
                })
                .expect("a changes page");
            for e in &entries {
                dev.apply_entry(e);
            }
            all.extend(entries);
            dev.cursor = next;
            if caught_up {
                return all;
            }
        }
    }

    /// Everything the store holds, counted over every shard.
    pub fn counts(&self) -> Counts {
        Counts::of_store(&self.backend).unwrap()
    }

    /// Every space's audit chain, recomputed.
    pub fn verify_audit(&self) -> VerifyReport {
        audit::verify(&self.backend).unwrap()
    }

    /// The stored row of an entity.
    pub fn document_row(&self, entity: Uuid) -> DocumentRow {
        self.core.document(entity).unwrap().expect("entity exists").0
    }

    /// The conflict archive over every shard.
    pub fn archive_rows(&self) -> Vec<ArchiveRow> {
        let mut rows = Vec::new();
        for n in 0..self.backend.shard_count() {
            rows.extend(self.backend.open_shard(n).unwrap().archive_rows(1000).unwrap());
        }
        rows
    }

    /// Every audit record of every space, in each space's chain order.
    pub fn audit_rows(&self) -> Vec<fieldsync_relay::store::AuditRow> {
        let mut rows = Vec::new();
        for n in 0..self.backend.shard_count() {
            let shard = self.backend.open_shard(n).unwrap();
            for space in shard.spaces_held().unwrap() {
                rows.extend(shard.audit_after(space, 0, 100_000).unwrap());
            }
        }
        rows
    }

    /// A mutation's receipt, wherever its space's shard is.
    pub fn receipt(&self, mutation_id: Uuid) -> Option<ReceiptRow> {
        (0..self.backend.shard_count()).find_map(|n| self.backend.open_shard(n).unwrap().receipt(mutation_id).unwrap())
    }

    /// A space's row in the directory, by name.
    pub fn space_row(&self, name: &str) -> SpaceRow {
        self.core
            .directory()
            .space_by_name(name)
            .unwrap()
            .expect("space exists")
    }

    pub fn version_of(&self, entity: Uuid) -> u64 {
        self.core.document(entity).unwrap().map_or(0, |(d, _)| d.version)
    }

    /// The relay's stored Automerge bytes of an entity.
    pub fn stored_bytes(&self, entity: Uuid) -> Vec<u8> {
        let (row, shard) = self.core.document(entity).unwrap().expect("entity exists");
        shard.document_bytes(row.doc_key).unwrap()
    }

    /// The relay's current fields of an entity.
    pub fn fields_of(&self, entity: Uuid) -> Map<String, Value> {
        EntityDoc::load(&self.stored_bytes(entity), device_actor(Uuid::nil()))
            .unwrap()
            .fields()
    }

    /// Makes `dev` drop its local changes to `entity` and take the relay's copy and version.
    pub fn adopt(&self, dev: &mut TestDevice, entity: Uuid) {
        let doc = EntityDoc::load(&self.doc_bytes(entity), device_actor(dev.device_id)).unwrap();
        dev.docs.insert(entity, doc);
        dev.set_version(entity, self.version_of(entity));
    }

    pub fn doc_bytes(&self, entity: Uuid) -> Vec<u8> {
        let mut doc = EntityDoc::load(&self.stored_bytes(entity), device_actor(Uuid::nil())).unwrap();
        doc.save()
    }
}

/// A stand-in for a peer on a core connection: the hand-built device of
/// `fieldsync_schema::testkit` (signed envelopes in the peer's layout, versions as recorded
/// from the relay's answers), with panicking shorthands for tests.
pub struct TestDevice {
    pub hand: HandDevice,
    pub conn: ConnId,
    pub cursor: PullCursor,
}

impl Deref for TestDevice {
    type Target = HandDevice;
    fn deref(&self) -> &HandDevice {
        &self.hand
    }
}

impl DerefMut for TestDevice {
    fn deref_mut(&mut self) -> &mut HandDevice {
        &mut self.hand
    }
}

impl TestDevice {
    /// Edits the local document with `edit` and wraps the resulting change as a mutation.
    pub fn write(
        &mut self,
        entity_type: &str,
        entity_id: Uuid,
        kind: MutationKind,
        now: u64,
        edit: impl FnOnce(&mut EntityDoc, &fieldsync_schema::EntityType),
    ) -> Mutation {
        self.hand
            .write(entity_type, entity_id, kind, now, |d, ty| {
                edit(d, ty);
                Ok(())
            })
            .expect("the edit changed something")
    }

    pub fn create(&mut self, entity_type: &str, fields: Value, now: u64) -> (Uuid, Mutation) {
        self.hand
            .create(entity_type, &obj(fields), now)
            .expect("a valid create")
    }

    pub fn update(&mut self, entity_type: &str, id: Uuid, patch: Value, now: u64) -> Mutation {
        let patch = obj(patch);
        self.write(entity_type, id, MutationKind::Update, now, |d, ty| {
            d.write_fields(ty, &patch).unwrap()
        })
    }

    pub fn delete(&mut self, entity_type: &str, id: Uuid, now: u64) -> Mutation {
        self.write(entity_type, id, MutationKind::Delete, now, |d, _| {
            d.set_deleted(true).unwrap()
        })
    }

    pub fn increment(&mut self, entity_type: &str, id: Uuid, field: &str, by: i64, now: u64) -> Mutation {
        self.write(entity_type, id, MutationKind::Increment, now, |d, _| {
            d.increment(field, by).unwrap()
        })
    }

    pub fn lock(&mut self, entity_type: &str, id: Uuid, now: u64) -> Mutation {
        self.write(entity_type, id, MutationKind::Lock, now, |d, ty| {
            d.write_fields(ty, &obj(serde_json::json!({"locked": true}))).unwrap()
        })
    }

    pub fn sign_note(&mut self, id: Uuid, now: u64) -> Mutation {
        self.hand.sign_note(id, now).expect("a signable note")
    }

    pub fn apply_entry(&mut self, e: &FeedEntry) {
        self.hand.apply_entry(e).expect("a well-formed entry");
    }

    pub fn fields(&self, id: Uuid) -> Map<String, Value> {
        self.hand.fields(id).expect("a record this device holds")
    }
}

/// Shorthand: a device's HLC at a chosen wall time, for LWW tests with skewed clocks.
pub fn hlc_at(dev: &TestDevice, ms: u64) -> Hlc {
    Hlc {
        physical_ms: ms,
        counter: 0,
        device: dev.device_id,
    }
}

pub fn applied_version(o: &Outcome) -> u64 {
    o.applied().unwrap_or_else(|| panic!("expected applied, got {o:?}")).0
}

/// A clinic with one user of every role: dana and sam (clinicians), pat (patient), ava
/// (assistant) and svc (service).
pub fn clinic() -> TestRelay {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    r.user("sam", "clinic", Role::Clinician);
    r.user("pat", "clinic", Role::Patient);
    r.user("ava", "clinic", Role::Assistant);
    r.user("svc", "clinic", Role::Service);
    r
}

/// One patient's phone and tablet in [`clinic`], both holding a settings record (LWW) the
/// phone created with `fields`.
pub fn settings_on_two_devices(fields: Value) -> (TestRelay, TestDevice, TestDevice, Uuid) {
    let mut r = clinic();
    let mut phone = r.device("pat", 1);
    let mut tablet = r.device("pat", 2);
    let (s, m) = phone.create("settings", fields, T0);
    r.push_one(&mut phone, m);
    r.pull(&mut tablet);
    r.pull(&mut phone);
    (r, phone, tablet, s)
}

/// The live entries `out` sends to `conn`, in order.
pub fn live_entries(out: &[Output], conn: ConnId) -> Vec<fieldsync_schema::FeedEntry> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(c, fieldsync_schema::RelayMessage::Live { entries, .. }) if *c == conn => {
                Some(entries.clone())
            }
            _ => None,
        })
        .flatten()
        .collect()
}
