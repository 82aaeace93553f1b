//! `Device`: one device's store, identity and enrollment.
//!
//! Its database may be encrypted at rest with a key the app supplies ([`Device::open_keyed`];
//! `at_rest.rs` changes the key).
//!
//! A device works before it is enrolled and without any network: its identity (a UUID and an
//! ed25519 key) is created from the injected RNG on first open and kept in the database, and
//! every timestamp comes from the injected clock, so a simulation seed reproduces a device bit
//! for bit. Writes live in `write.rs`, sync bookkeeping in `sync/store.rs`, backups in
//! `backup.rs`; this file holds what they share.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fieldsync_schema::document::device_actor;
use fieldsync_schema::sqlite_key::DatabaseKey;
use fieldsync_schema::wire::UserInfo;
use fieldsync_schema::{DeviceKey, FieldKind, HlcClock, Role, Schema, TimeSource, ids};
use rusqlite::{Connection, TransactionBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::db::{self, keys};
use crate::entity::{self, Entity, FieldFilter};
use crate::error::{PeerError, Result, io_err};
use crate::outbox::{self, OutboxItem, OutboxState};

/// The injected randomness: device id, keys, mutation ids and jitter all come from it.
/// Production passes an OS-seeded ChaCha; tests and the simulator a seeded one.
pub type DeviceRng = Box<dyn rand_core::CryptoRng + Send>;

/// What the device knows about its enrollment (the store half of the enrollment handshake).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The relay enrolled with, or the first of the list the app set ([`Device::set_relays`]):
    /// its refusal of the device is final.
    pub relay_url: String,
    /// More relays of the same cluster to fail over to, in order. A refusal from one of these
    /// before it has named its cluster (an address of another relay by mistake) only means
    /// "not here": the device tries the next, and is not marked refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_relays: Vec<String>,
    pub relay_id: Uuid,
    pub user: UserInfo,
    /// Where writes go unless the caller names another of the user's spaces.
    pub default_space: Uuid,
    pub enrolled_at_ms: u64,
}

impl Enrollment {
    pub fn role_in(&self, space: Uuid) -> Option<Role> {
        self.user.spaces.iter().find(|s| s.space_id == space).map(|s| s.role)
    }
}

/// The connection as the sync machine last reported it (not persisted: a fresh process is
/// offline until a machine says otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Link {
    pub online: bool,
    pub caught_up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    Synced,
    Syncing,
    Offline,
    Blocked,
    AuthFailed,
    /// The relay serves an older schema than this device's: changes wait for its upgrade.
    WaitingForRelay,
}

impl SyncStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Synced => "synced",
            SyncStatus::Syncing => "syncing",
            SyncStatus::Offline => "offline",
            SyncStatus::Blocked => "blocked",
            SyncStatus::AuthFailed => "auth_failed",
            SyncStatus::WaitingForRelay => "waiting_for_relay",
        }
    }
}

/// The first blocked outbox item: what halts the outbox until the user resolves it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockedOn {
    pub mutation_id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    /// The relay's answer: `conflict`, `rejected_immutable`, `rejected_locked`, `invalid`,
    /// `forbidden`.
    pub outcome: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnrolledAs {
    pub user_id: Uuid,
    pub user_name: String,
    pub relay_url: String,
    pub relay_id: Uuid,
    pub default_space: Uuid,
}

/// Always available, offline too (SPEC §8).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub device_id: Uuid,
    /// `None`: not enrolled.
    pub enrolled: Option<EnrolledAs>,
    pub state: SyncStatus,
    /// Outbox items the relay has not confirmed (pending + blocked).
    pub unsynced: u64,
    pub oldest_pending_ms: Option<u64>,
    pub last_sync_ms: Option<u64>,
    pub blocked: Option<BlockedOn>,
    pub auth_failure: Option<String>,
    pub entities: u64,
    pub exported_at_ms: Option<u64>,
    /// The version of this device's schema, and of the relay's at the last connect (they may
    /// differ while a fleet updates: the relay accepts older compatible versions).
    pub schema_version: u64,
    pub relay_schema_version: Option<u64>,
    /// Why the relay cannot take this device's changes yet (it serves an older schema).
    pub relay_behind: Option<String>,
    /// Records the relay flagged as possible duplicates, not yet merged or dismissed (SPEC §17;
    /// [`Device::possible_duplicates`] lists them).
    pub possible_duplicates: u64,
    /// Requests a service marked superseded ([`Device::superseded_requests`]).
    pub superseded_requests: u64,
    /// The relay had this device's data erased (a remote wipe): when, and what was discarded.
    pub wiped: Option<crate::wipe::WipeRecord>,
    /// Whether the database is encrypted at rest ([`Device::open_keyed`]).
    pub encrypted: bool,
    /// The entity types this device holds (selective sync); `None`: every type.
    pub synced_types: Option<Vec<String>>,
    /// The device syncs by windows ([`crate::windows`]).
    pub windowed: bool,
    /// Records waiting to be fetched at the next sync.
    pub fetch_queued: u64,
    /// The app said the device is on a metered link; the types that wait for another.
    pub metered: bool,
    pub deferred_types: Vec<String>,
}

/// What `retry` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryReport {
    pub made_due: usize,
    pub still_blocked: usize,
    pub message: String,
}

pub struct Device {
    pub(crate) conn: Connection,
    pub(crate) dir: PathBuf,
    /// The key the database is encrypted with at rest (`None`: a plaintext file).
    pub(crate) db_key: Option<DatabaseKey>,
    pub(crate) schema: Arc<Schema>,
    pub(crate) time: Arc<dyn TimeSource>,
    pub(crate) rng: DeviceRng,
    pub(crate) device_id: Uuid,
    pub(crate) key: DeviceKey,
    pub(crate) hlc: HlcClock,
    pub(crate) enrollment: Option<Enrollment>,
    pub(crate) link: Link,
    /// What sync committed since the last [`Device::take_notices`], for an app's listener.
    pub(crate) notices: Vec<Notice>,
}

/// Something sync changed on this device, reported after its transaction committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// A pull or live entry changed a record (created, edited, deleted, moved).
    Changed { entity_type: String, entity_id: Uuid },
    /// The relay answered one of this device's writes with a conflict: a prompt waits.
    Conflict { entity_type: String, entity_id: Uuid },
    /// The relay refused one of this device's writes: a rejected edit waits.
    Rejected { entity_type: String, entity_id: Uuid },
    /// A last-writer-wins value of this device's was overridden by a later write.
    LwwLoss {
        entity_type: String,
        entity_id: Uuid,
        field: String,
    },
    /// The relay flagged a record this device created as possibly the same as another
    /// (SPEC §17): [`Device::possible_duplicates`] lists it to merge or dismiss.
    PossibleDuplicate {
        entity_type: String,
        entity_id: Uuid,
        duplicate_of: Uuid,
    },
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("dir", &self.dir)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens the device in `dir` with the default schema, creating it on first use.
    pub fn open(dir: &Path, time: Arc<dyn TimeSource>, rng: DeviceRng) -> Result<Device> {
        Device::open_with_schema(dir, time, rng, Arc::new(Schema::default_schema()))
    }

    /// Opens with another schema (the CLI's `--schema FILE`). Reads only the `meta` table: no
    /// document is loaded, whatever the number of entities — except once, when the schema
    /// changed to one that declares migrations (see [`entity::refresh_fields`]).
    pub fn open_with_schema(
        dir: &Path,
        time: Arc<dyn TimeSource>,
        rng: DeviceRng,
        schema: Arc<Schema>,
    ) -> Result<Device> {
        Device::open_keyed(dir, time, rng, schema, None)
    }

    /// Opens a device whose database is encrypted at rest with `key` (from the platform
    /// keystore); a new device is created encrypted. A wrong key, or none for an encrypted
    /// device, is [`PeerError::Key`] and opens nothing. `None` is [`Device::open_with_schema`].
    pub fn open_keyed(
        dir: &Path,
        time: Arc<dyn TimeSource>,
        mut rng: DeviceRng,
        schema: Arc<Schema>,
        db_key: Option<DatabaseKey>,
    ) -> Result<Device> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut conn = db::open(&dir.join(db::DB_FILE), db_key.as_ref())?;
        let now = time.now_ms();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (device_id, key) = match (
            db::meta_get(&tx, keys::DEVICE_ID)?,
            db::meta_get(&tx, keys::SECRET_KEY)?,
        ) {
            (Some(id), Some(secret)) => {
                let id = entity::parse_uuid(&id)?;
                let bytes: [u8; 32] = hex::decode(&secret)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| PeerError::Corrupt("the stored device key is malformed".into()))?;
                (id, DeviceKey::from_secret(&bytes))
            }
            (None, None) => {
                let id = ids::new_uuid(&mut rng);
                let key = DeviceKey::generate(&mut rng);
                db::meta_set(&tx, keys::DEVICE_ID, &id.to_string())?;
                db::meta_set(&tx, keys::SECRET_KEY, &hex::encode(key.secret_bytes()))?;
                db::meta_set(&tx, keys::CREATED_AT, &now.to_string())?;
                (id, key)
            }
            _ => return Err(PeerError::Corrupt("device identity is half written".into())),
        };
        let stored_hash = db::meta_get(&tx, keys::SCHEMA_HASH)?;
        if stored_hash.is_some_and(|h| h != schema.hash().to_hex()) && schema.has_migrations() {
            // The app moved to a schema with declared renames or defaults: every record is
            // re-read as the new version names it, once, in this transaction.
            entity::refresh_fields(&tx, &schema, device_actor(device_id))?;
        }
        db::meta_set(&tx, keys::SCHEMA_HASH, &schema.hash().to_hex())?;
        let hlc = HlcClock::resume(device_id, db::meta_get_json(&tx, keys::HLC)?);
        let enrollment = db::meta_get_json(&tx, keys::ENROLLMENT)?;
        tx.commit()?;
        Ok(Device {
            conn,
            dir: dir.to_path_buf(),
            db_key,
            schema,
            time,
            rng,
            device_id,
            key,
            hlc,
            enrollment,
            link: Link::default(),
            notices: Vec::new(),
        })
    }

    /// What sync changed since the last call, oldest first (each notice once).
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Whether `dir` already holds a device (import refuses such a dir).
    pub fn exists(dir: &Path) -> bool {
        dir.join(db::DB_FILE).exists()
    }

    pub fn device_id(&self) -> Uuid {
        self.device_id
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    pub fn key(&self) -> &DeviceKey {
        &self.key
    }

    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn enrollment(&self) -> Option<&Enrollment> {
        self.enrollment.as_ref()
    }

    /// The relays this device syncs with, in the order it tries them: the one whose refusal
    /// is final first, then the others of its cluster (empty before enrollment).
    pub fn relay_urls(&self) -> Vec<String> {
        self.enrollment.as_ref().map_or_else(Vec::new, |e| {
            std::iter::once(e.relay_url.clone())
                .chain(e.other_relays.iter().cloned())
                .collect()
        })
    }

    /// Sets the relays of the device's cluster, in order (the app's configuration: several
    /// relays of one cluster, or one load balancer's address). The first becomes the relay
    /// whose refusal is final. Every address is checked before anything is stored; duplicates
    /// are dropped. The cluster stays the one enrolled with: a relay of another answers with
    /// another identity and is never synced with.
    pub fn set_relays(&mut self, urls: &[String]) -> Result<()> {
        let Some(enrollment) = self.enrollment.as_ref() else {
            return Err(PeerError::NotAllowed(
                "this device is not enrolled; enroll with one relay first".into(),
            ));
        };
        let mut list: Vec<String> = Vec::new();
        for url in urls {
            let url = url.trim().trim_end_matches('/').to_string();
            if crate::net::endpoint(&url).is_err() {
                return Err(PeerError::BadRelayAddress(url));
            }
            if !list.contains(&url) {
                list.push(url);
            }
        }
        let Some((first, others)) = list.split_first() else {
            return Err(PeerError::NotAllowed(
                "a device needs at least one relay address".into(),
            ));
        };
        let mut updated = enrollment.clone();
        updated.relay_url = first.clone();
        updated.other_relays = others.to_vec();
        db::meta_set_json(&self.conn, keys::ENROLLMENT, &updated)?;
        self.enrollment = Some(updated);
        Ok(())
    }

    pub fn now_ms(&self) -> u64 {
        self.time.now_ms()
    }

    /// Read-only access for checks and tools (tests, the simulator's invariant checks).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn actor(&self) -> automerge::ActorId {
        device_actor(self.device_id)
    }

    pub(crate) fn user_id(&self) -> Uuid {
        self.enrollment.as_ref().map_or(Uuid::nil(), |e| e.user.user_id)
    }

    /// A uniformly random `u64` from the injected RNG (jitter).
    pub fn random_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Records enrollment and adopts everything written before it: never-sent envelopes and
    /// entities of the nil space move to `default_space` under the user, re-signed with their
    /// mutation ids unchanged (they were never sent, so no relay has seen the old ones).
    pub fn enroll_complete(
        &mut self,
        relay_url: &str,
        relay_id: Uuid,
        user: UserInfo,
        default_space: Uuid,
    ) -> Result<()> {
        if !user.spaces.iter().any(|s| s.space_id == default_space) {
            return Err(PeerError::NotAllowed(format!(
                "user {} is not a member of the default space {default_space}",
                user.name
            )));
        }
        if let Some(e) = &self.enrollment
            && e.user.user_id != user.user_id
        {
            return Err(PeerError::NotAllowed(format!(
                "this device is enrolled as {} ({}); sign out before enrolling another user",
                e.user.name, e.user.user_id
            )));
        }
        let enrollment = Enrollment {
            relay_url: relay_url.to_string(),
            other_relays: Vec::new(),
            relay_id,
            user,
            default_space,
            enrolled_at_ms: self.time.now_ms(),
        };
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        db::meta_set_json(&tx, keys::ENROLLMENT, &enrollment)?;
        db::meta_delete(&tx, keys::AUTH_FAILED)?;
        for (seq, mut m) in outbox::unsent(&tx)? {
            let mut changed = false;
            if m.user_id.is_nil() {
                m.user_id = enrollment.user.user_id;
                changed = true;
            }
            if m.space_id.is_nil() {
                m.space_id = default_space;
                changed = true;
            }
            if changed {
                self.key.sign_mutation(&mut m);
                outbox::replace_envelope(&tx, seq, &m)?;
            }
        }
        entity::move_space(&tx, Uuid::nil(), default_space)?;
        tx.commit()?;
        self.enrollment = Some(enrollment);
        Ok(())
    }

    /// Replaces the user's details (name, spaces, roles) as the relay reported them.
    pub(crate) fn refresh_user(&mut self, user: UserInfo) -> Result<()> {
        if let Some(e) = &mut self.enrollment {
            e.user = user;
            db::meta_set_json(&self.conn, keys::ENROLLMENT, e)?;
        }
        Ok(())
    }

    pub fn get(&self, id: Uuid) -> Result<Option<Entity>> {
        let Some(mut e) = entity::get(&self.conn, id)? else {
            return Ok(None);
        };
        if e.signed
            && let Some(loaded) = entity::load(&self.conn, id, self.actor())?
        {
            e.signature = loaded.doc.signature();
        }
        Ok(Some(e))
    }

    /// Like `get`, but the entity must exist and be of `entity_type`.
    pub fn get_typed(&self, entity_type: &str, id: Uuid) -> Result<Entity> {
        let e = self.get(id)?.ok_or_else(|| PeerError::NotFound {
            entity_type: Some(entity_type.to_string()),
            id,
        })?;
        if e.entity_type != entity_type {
            return Err(PeerError::WrongType {
                id,
                expected: entity_type.to_string(),
                actual: e.entity_type,
            });
        }
        Ok(e)
    }

    /// The entity's Automerge document in the standard binary format.
    pub fn document_bytes(&self, id: Uuid) -> Result<Vec<u8>> {
        let mut loaded =
            entity::load(&self.conn, id, self.actor())?.ok_or(PeerError::NotFound { entity_type: None, id })?;
        Ok(loaded.doc.save())
    }

    /// Live (non-deleted unless asked) entities of a type matching every filter.
    pub fn list(&self, entity_type: &str, filters: &[FieldFilter], include_deleted: bool) -> Result<Vec<Entity>> {
        let ty = self
            .schema
            .entity_type(entity_type)
            .ok_or_else(|| PeerError::unknown_type(&self.schema, entity_type))?;
        let mut typed = Vec::with_capacity(filters.len());
        for f in filters {
            let Some(field) = ty.field(&f.field) else {
                return Err(PeerError::NotAllowed(format!(
                    "cannot filter on `{}`: not a field of `{entity_type}`",
                    f.field
                )));
            };
            // `--where phone=555` parses 555 as a number; a string-valued field holds text.
            let stringly = !matches!(
                field.kind,
                FieldKind::Int { .. } | FieldKind::Float { .. } | FieldKind::Bool | FieldKind::Counter { .. }
            );
            let value = match &f.value {
                Value::Number(_) | Value::Bool(_) if stringly => Value::String(f.value.to_string()),
                other => other.clone(),
            };
            typed.push(FieldFilter {
                field: f.field.clone(),
                value,
            });
        }
        entity::list(&self.conn, entity_type, &typed, include_deleted)
    }

    /// The outbox in order; `include_applied` adds confirmed items.
    pub fn queue(&self, include_applied: bool) -> Result<Vec<OutboxItem>> {
        outbox::list(&self.conn, include_applied)
    }

    pub fn outbox_item(&self, mutation_id: Uuid) -> Result<Option<OutboxItem>> {
        outbox::get(&self.conn, mutation_id)
    }

    /// The stored, signed envelope of an outbox item.
    pub fn envelope(&self, mutation_id: Uuid) -> Result<Option<fieldsync_schema::Mutation>> {
        outbox::envelope(&self.conn, mutation_id)
    }

    /// Makes backing-off items due now (one, or all). Blocked items stay blocked: only a
    /// resolution clears them, and the report says so.
    pub fn retry(&mut self, mutation_id: Option<Uuid>) -> Result<RetryReport> {
        let blocked: Vec<OutboxItem> = outbox::list(&self.conn, false)?
            .into_iter()
            .filter(|i| i.state == OutboxState::Blocked)
            .collect();
        if let Some(id) = mutation_id {
            let item = outbox::get(&self.conn, id)?.ok_or(PeerError::NoSuchMutation(id))?;
            match item.state {
                OutboxState::Blocked => {
                    return Ok(RetryReport {
                        made_due: 0,
                        still_blocked: blocked.len(),
                        message: format!(
                            "{id} stays blocked ({}): a blocked change is cleared only by resolving it",
                            item.error.unwrap_or_default()
                        ),
                    });
                }
                OutboxState::Applied | OutboxState::Superseded => {
                    return Ok(RetryReport {
                        made_due: 0,
                        still_blocked: blocked.len(),
                        message: format!("{id} is already {}; nothing to retry", item.state),
                    });
                }
                OutboxState::Pending => {}
            }
        }
        let made_due = outbox::make_due(&self.conn, mutation_id)?;
        let mut message = format!("{made_due} item(s) will be sent at the next sync");
        if let Some(b) = blocked.first() {
            message.push_str(&format!(
                "; the outbox is halted by {} ({} {}): {} — it stays blocked until resolved",
                b.mutation_id,
                b.entity_type,
                b.entity_id,
                b.error.clone().unwrap_or_default()
            ));
        }
        Ok(RetryReport {
            made_due,
            still_blocked: blocked.len(),
            message,
        })
    }

    pub fn status(&self) -> Result<Status> {
        let (unsynced, oldest) = outbox::unsynced(&self.conn)?;
        let blocked = outbox::first_blocked(&self.conn)?.map(|b| BlockedOn {
            mutation_id: b.mutation_id,
            entity_type: b.entity_type,
            entity_id: b.entity_id,
            outcome: b.outcome.as_ref().map_or("blocked", |o| o.name()).to_string(),
            reason: b.error.unwrap_or_default(),
        });
        let auth_failure = db::meta_get(&self.conn, keys::AUTH_FAILED)?;
        let relay_behind = db::meta_get(&self.conn, keys::RELAY_BEHIND)?;
        let state = if auth_failure.is_some() {
            SyncStatus::AuthFailed
        } else if blocked.is_some() {
            SyncStatus::Blocked
        } else if relay_behind.is_some() && !self.link.online {
            SyncStatus::WaitingForRelay
        } else if self.link.online {
            if unsynced > 0 || !self.link.caught_up {
                SyncStatus::Syncing
            } else {
                SyncStatus::Synced
            }
        } else if unsynced > 0 {
            SyncStatus::Offline
        } else {
            SyncStatus::Synced
        };
        Ok(Status {
            device_id: self.device_id,
            enrolled: self.enrollment.as_ref().map(|e| EnrolledAs {
                user_id: e.user.user_id,
                user_name: e.user.name.clone(),
                relay_url: e.relay_url.clone(),
                relay_id: e.relay_id,
                default_space: e.default_space,
            }),
            state,
            unsynced,
            oldest_pending_ms: oldest,
            last_sync_ms: db::meta_get_u64(&self.conn, keys::LAST_SYNC)?,
            blocked,
            auth_failure,
            entities: entity::count(&self.conn)?,
            exported_at_ms: db::meta_get_u64(&self.conn, keys::EXPORTED_AT)?,
            schema_version: self.schema.version(),
            relay_schema_version: db::meta_get_u64(&self.conn, keys::RELAY_SCHEMA_VERSION)?,
            relay_behind,
            possible_duplicates: entity::count_open_duplicates(
                &self.conn,
                &self.types_where(|t| t.duplicates.is_some()),
            )?,
            superseded_requests: entity::count_with_field(
                &self.conn,
                &self.types_where(|t| t.request_for.is_some()),
                fieldsync_schema::registry::SUPERSEDED_AT,
            )?,
            wiped: self.wiped()?,
            encrypted: self.is_encrypted(),
            synced_types: self.synced_types()?,
            windowed: self.windowed()?,
            fetch_queued: self.fetch_queue()?.len() as u64,
            metered: self.metered()?,
            deferred_types: self.deferred_types()?,
        })
    }

    fn types_where(&self, keep: impl Fn(&fieldsync_schema::EntityType) -> bool) -> Vec<&str> {
        self.schema
            .types()
            .filter(|t| keep(t))
            .map(|t| t.name.as_str())
            .collect()
    }
}
