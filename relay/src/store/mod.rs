//! The relay's storage, behind a trait.
//!
//! SQLite ([`sqlite::SqliteStore`]) is the embedded default. The trait is shaped so that a
//! PostgreSQL backend can implement it for several relay processes sharing one database
//! (SPEC §13): every decision the core makes reads the row it depends on inside the same
//! transaction that writes the result, and nothing assumes this process is the only writer.

pub mod sqlite;

use fieldsync_schema::{Hlc, Role};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpaceRow {
    pub space_id: Uuid,
    pub name: String,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRow {
    pub user_id: Uuid,
    pub name: String,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MembershipRow {
    pub space_id: Uuid,
    pub space_name: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRow {
    pub device_id: Uuid,
    pub user_id: Uuid,
    #[serde(with = "hex_bytes")]
    pub public_key: Vec<u8>,
    pub enrolled_ms: u64,
    pub revoked_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
}

/// A single-use enrollment token, stored by the SHA-256 of its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRow {
    #[serde(skip)]
    pub token_hash: [u8; 32],
    pub user_id: Uuid,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub used_ms: Option<u64>,
    pub used_by: Option<Uuid>,
}

/// What the relay knows about an entity, without its Automerge bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentRow {
    /// Dense local key: orders snapshots and links feed rows.
    pub doc_key: u64,
    pub entity_id: Uuid,
    pub space_id: Uuid,
    pub entity_type: String,
    pub version: u64,
    pub last_seq: u64,
    pub deleted: bool,
    pub signed: bool,
    pub locked: bool,
    /// LWW per-field stamps (JSON of `BTreeMap<String, LwwStamp>`); empty for other policies.
    pub lww_stamps: String,
}

/// Who last won an LWW field, and at which relay version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwwStamp {
    pub hlc: Hlc,
    pub device: Uuid,
    pub mutation: Uuid,
    pub version: u64,
    /// The winning mutation's last Automerge change (hex): a later write saw this winner
    /// exactly when its changes depend on it. Absent in stamps written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
}

/// The document state to write after a mutation. The Automerge bytes are not here: the changes
/// live in the feed row, and the snapshot is refreshed separately (see `save_snapshot`).
#[derive(Debug, Clone)]
pub struct DocumentUpdate {
    pub version: u64,
    pub deleted: bool,
    pub signed: bool,
    pub locked: bool,
    pub lww_stamps: String,
}

/// One applied mutation in the change feed.
#[derive(Debug, Clone)]
pub struct FeedRow {
    pub seq: u64,
    pub doc_key: u64,
    pub space_id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub version: u64,
    pub origin_device: Uuid,
    pub origin_user: Uuid,
    pub mutation_id: Uuid,
    pub hlc: Hlc,
    /// CBOR `Vec<Bytes>`: the Automerge changes the mutation added.
    pub changes: Vec<u8>,
    /// CBOR `Vec<LwwLoss>`.
    pub lww_losses: Vec<u8>,
}

/// A new feed row; the store assigns `seq`.
#[derive(Debug, Clone)]
pub struct NewFeedRow {
    pub doc_key: u64,
    pub space_id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub version: u64,
    pub origin_device: Uuid,
    pub origin_user: Uuid,
    pub mutation_id: Uuid,
    pub hlc: Hlc,
    pub changes: Vec<u8>,
    pub lww_losses: Vec<u8>,
}

/// The stored answer for a mutation id, bound to the envelope it answered: a receipt is
/// replayed only to a repeat of exactly that envelope (SPEC §18).
#[derive(Debug, Clone)]
pub struct ReceiptRow {
    pub mutation_id: Uuid,
    pub device_id: Uuid,
    pub entity_id: Option<Uuid>,
    pub space_id: Option<Uuid>,
    /// [`fieldsync_schema::signing::envelope_hash`] of the answered envelope. `None` only for
    /// receipts written before receipts were bound (see [`ReceiptRow::answers`]).
    pub envelope_hash: Option<[u8; 32]>,
    /// CBOR `Outcome`.
    pub outcome: Vec<u8>,
    pub created_ms: u64,
}

/// Whether a stored receipt answers a repeated envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptMatch {
    /// The very envelope the receipt was written for.
    Exact,
    /// A receipt from before receipts were bound, whose entity and space (when known) agree:
    /// it may be answered, but with nothing read from the stored document.
    Unbound,
    /// Anything else: a different envelope reusing the mutation id.
    Different,
}

impl ReceiptRow {
    pub fn answers(&self, m: &fieldsync_schema::Mutation) -> ReceiptMatch {
        match self.envelope_hash {
            Some(hash) if hash == fieldsync_schema::signing::envelope_hash(m) => ReceiptMatch::Exact,
            Some(_) => ReceiptMatch::Different,
            None if self.entity_id.is_some_and(|e| e != m.entity_id)
                || self.space_id.is_some_and(|s| s != m.space_id) =>
            {
                ReceiptMatch::Different
            }
            None => ReceiptMatch::Unbound,
        }
    }
}

/// An audit record as stored (see [`crate::audit`] for the hash chain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub audit_id: u64,
    pub seq: u64,
    pub mutation_id: Uuid,
    pub actor_id: Uuid,
    pub device_id: Uuid,
    pub space_id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub kind: String,
    pub version: u64,
    pub before_json: String,
    pub after_json: String,
    pub client_ts: String,
    pub server_ts_ms: u64,
    pub prev_hash: String,
    pub hash: String,
}

/// A losing version kept for operators (LWW loser, conflict-resolution loser).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchiveRow {
    pub archive_id: u64,
    pub kind: String,
    pub space_id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub field: Option<String>,
    pub losing_json: String,
    pub winning_json: String,
    pub loser_device: Option<Uuid>,
    pub loser_mutation: Option<Uuid>,
    pub winner_device: Option<Uuid>,
    pub winner_mutation: Option<Uuid>,
    pub version: u64,
    pub created_ms: u64,
}

/// Everything the relay core and the admin tools need from storage.
///
/// Writes happen between [`Store::begin`] and [`Store::commit`]; the core commits once per
/// group of mutations and releases their outcomes only afterwards.
pub trait Store {
    fn begin(&mut self) -> StoreResult<()>;
    fn commit(&mut self) -> StoreResult<()>;
    fn rollback(&mut self) -> StoreResult<()>;
    /// A read-only transaction: one consistent view and one lock for a run of reads (a pull
    /// page reads two rows per document; without it each read locks and unlocks the file).
    fn begin_read(&mut self) -> StoreResult<()>;
    fn end_read(&mut self) -> StoreResult<()>;

    /// The relay's identity, created on first open.
    fn relay_id(&self) -> Uuid;

    // --- tenants and identities
    fn create_space(&mut self, space_id: Uuid, name: &str, now_ms: u64) -> StoreResult<()>;
    fn space_by_name(&self, name: &str) -> StoreResult<Option<SpaceRow>>;
    fn spaces(&self) -> StoreResult<Vec<SpaceRow>>;
    fn create_user(&mut self, user_id: Uuid, name: &str, now_ms: u64) -> StoreResult<()>;
    fn user(&self, user_id: Uuid) -> StoreResult<Option<UserRow>>;
    fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRow>>;
    fn users(&self) -> StoreResult<Vec<UserRow>>;
    /// Adds or changes the user's role in a space.
    fn set_membership(&mut self, user_id: Uuid, space_id: Uuid, role: Role) -> StoreResult<()>;
    fn remove_membership(&mut self, user_id: Uuid, space_id: Uuid) -> StoreResult<bool>;
    fn memberships(&self, user_id: Uuid) -> StoreResult<Vec<MembershipRow>>;

    // --- devices and enrollment
    fn create_token(&mut self, token_hash: [u8; 32], user_id: Uuid, now_ms: u64, expires_ms: u64) -> StoreResult<()>;
    fn token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<TokenRow>>;
    fn tokens(&self) -> StoreResult<Vec<TokenRow>>;
    fn use_token(&mut self, token_hash: &[u8; 32], device_id: Uuid, now_ms: u64) -> StoreResult<()>;
    fn expire_token(&mut self, token_hash: &[u8; 32], now_ms: u64) -> StoreResult<bool>;
    fn register_device(&mut self, device_id: Uuid, user_id: Uuid, public_key: &[u8], now_ms: u64) -> StoreResult<()>;
    fn device(&self, device_id: Uuid) -> StoreResult<Option<DeviceRow>>;
    fn devices(&self) -> StoreResult<Vec<DeviceRow>>;
    fn revoke_device(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<bool>;
    fn set_device_key(&mut self, device_id: Uuid, public_key: &[u8]) -> StoreResult<()>;
    fn touch_device(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<()>;

    // --- documents and the feed
    fn document(&self, entity_id: Uuid) -> StoreResult<Option<DocumentRow>>;
    /// The document's Automerge bytes: its snapshot followed by every change applied since.
    fn document_bytes(&self, doc_key: u64) -> StoreResult<Vec<u8>>;
    /// Creates the row of a new entity at version 0; returns its doc key.
    fn insert_document(&mut self, entity_id: Uuid, space_id: Uuid, entity_type: &str, now_ms: u64) -> StoreResult<u64>;
    /// Records the state after the mutation that wrote feed row `seq`.
    fn update_document(&mut self, doc_key: u64, update: &DocumentUpdate, seq: u64, now_ms: u64) -> StoreResult<()>;
    /// Replaces the stored snapshot (compaction): `bytes` covers every change up to `upto_seq`.
    fn save_snapshot(&mut self, doc_key: u64, bytes: &[u8], upto_seq: u64) -> StoreResult<()>;
    /// How many feed rows of this document were applied since its snapshot.
    fn changes_since_snapshot(&self, doc_key: u64) -> StoreResult<u64>;
    fn append_feed(&mut self, row: &NewFeedRow) -> StoreResult<u64>;
    fn max_seq(&self) -> StoreResult<u64>;
    /// Feed rows after `after_seq` in these spaces, oldest first.
    fn feed_after(&self, spaces: &[Uuid], after_seq: u64, limit: usize) -> StoreResult<Vec<FeedRow>>;
    /// Feed rows of every space with `after_seq < seq <= upto_seq`, oldest first, at most
    /// `limit`: what other writers of the store committed, for live fan-out.
    fn feed_range(&self, after_seq: u64, upto_seq: u64, limit: usize) -> StoreResult<Vec<FeedRow>>;
    /// Feed rows of one document with a version above `version`, oldest first.
    fn feed_for_document(&self, doc_key: u64, after_version: u64) -> StoreResult<Vec<FeedRow>>;
    /// Documents in these spaces with a key above `after_key`, in key order.
    fn documents_after(&self, spaces: &[Uuid], after_key: u64, limit: usize) -> StoreResult<Vec<DocumentRow>>;

    // --- receipts, audit, archive
    fn receipt(&self, mutation_id: Uuid) -> StoreResult<Option<ReceiptRow>>;
    fn put_receipt(&mut self, row: &ReceiptRow) -> StoreResult<()>;
    fn last_audit_hash(&self) -> StoreResult<Option<String>>;
    fn append_audit(&mut self, row: &AuditRow) -> StoreResult<u64>;
    /// Audit rows with an id above `after_id`, in chain order.
    fn audit_after(&self, after_id: u64, limit: usize) -> StoreResult<Vec<AuditRow>>;
    fn archive(&mut self, row: &ArchiveRow) -> StoreResult<u64>;
    fn archive_rows(&self, limit: usize) -> StoreResult<Vec<ArchiveRow>>;

    /// Devices revoked after `since_ms` (the server closes their connections).
    fn revoked_since(&self, since_ms: u64) -> StoreResult<Vec<(Uuid, u64)>>;
    /// A number that changes whenever memberships or revocations may have changed: another
    /// connection (the admin CLI, another process) committed, or this handle wrote them. The
    /// core's tick re-reads them only when it moves.
    fn outside_writes_marker(&self) -> StoreResult<u64>;
    /// Counts for stats and restore drills.
    fn counts(&self) -> StoreResult<Counts>;
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub spaces: u64,
    pub users: u64,
    pub devices: u64,
    pub documents: u64,
    pub feed: u64,
    pub receipts: u64,
    pub audit: u64,
    pub archive: u64,
}
