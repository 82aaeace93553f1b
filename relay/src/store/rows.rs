//! The rows the relay stores, as the core and the admin tools see them.

use fieldsync_schema::{Hlc, Role};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpaceRow {
    pub space_id: Uuid,
    pub name: String,
    pub created_ms: u64,
    /// The shard holding the space's data, fixed at creation.
    pub shard: u32,
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
    /// A name for people ("Dana's iPad"), set by the operator.
    pub label: Option<String>,
    /// When the operator asked for the device's local data to be erased at its next contact
    /// (`admin device revoke --wipe`).
    pub wipe_requested_ms: Option<u64>,
    /// When the device reported that it erased its data, and how many unsynced changes it
    /// discarded doing so.
    pub wiped_ms: Option<u64>,
    pub wipe_discarded: Option<u64>,
    /// The revoked device whose unsynced changes this one carries (`enroll --new-identity`):
    /// changes authored by that device's actor are accepted from this one.
    pub replaces: Option<Uuid>,
}

impl DeviceRow {
    /// Revoked with a wipe the device has not yet reported done: it is let through the
    /// challenge only to be told to erase its data.
    pub fn wipe_pending(&self) -> bool {
        self.revoked_ms.is_some() && self.wipe_requested_ms.is_some() && self.wiped_ms.is_none()
    }
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
    /// The label the enrolled device gets.
    pub label: Option<String>,
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
    /// See [`DocumentUpdate::window_day`].
    pub window_day: Option<i64>,
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
    /// The day (since 1970-01-01, UTC) the record's sync-window field names, when its type has
    /// a window and the record a date (SPEC §16); `None` also for documents written before
    /// the column existed (a windowed pull then reads the document itself).
    pub window_day: Option<i64>,
}

/// One applied mutation in a space's change feed.
#[derive(Debug, Clone)]
pub struct FeedRow {
    /// Dense per space: 1, 2, ...
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
    /// The row's place in its shard (export paging); not part of the hash.
    pub audit_id: u64,
    /// Dense per space: the record's place in its space's chain.
    pub audit_seq: u64,
    /// The feed seq of the mutation (per space).
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

/// Where a space's feed and audit chain stand, read and advanced inside the transaction that
/// writes the space's next mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceHead {
    /// The last feed seq (0: empty).
    pub seq: u64,
    /// The last audit record's place in the chain, and its hash ([`crate::audit::GENESIS_HASH`]
    /// when there is none).
    pub audit_seq: u64,
    pub audit_hash: String,
}

/// A schema the relay has served: its text, so that a later start can tell whether a new schema
/// still suits the devices that hold this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServedSchema {
    pub hash: String,
    pub version: u64,
    pub toml: String,
    pub first_served_ms: u64,
    /// Set once a schema that breaks this one was served on purpose.
    pub retired_ms: Option<u64>,
}

/// A record's entry in the possible-duplicate index (SPEC §17). `key: None` removes it (the
/// record was deleted, or no longer has every field of its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKeyRow {
    pub entity_id: Uuid,
    pub space_id: Uuid,
    pub entity_type: String,
    pub key: Option<String>,
    pub at_ms: i64,
}
