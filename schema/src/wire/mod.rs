//! The sync protocol's messages (SPEC §7) and their CBOR framing.
//!
//! Each WebSocket binary frame holds one CBOR array `[protocol_version, message]` (or that
//! array compressed, between peers that both read compressed frames: [`compress`]), so every
//! frame, not only the first, says which protocol it speaks, and a relay can refuse a device
//! from the future with a clear reason instead of a parse error. Decoding takes bytes from the
//! network: it bounds the input size before parsing, never panics, and never allocates more
//! than the input could describe.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod compress;

use crate::envelope::{Bytes, LwwLoss, Mutation, Origin, Outcome};
use crate::registry::{Role, SchemaHash};

/// 2: one order per space (per-space cursors and feed sequences; `UserChanged`).
pub const PROTOCOL_VERSION: u16 = 2;

/// Largest frame either side accepts. Far below tungstenite's 64 MiB default: a pull page or
/// push batch is cut to fit.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Most mutations in one `Push`.
pub const MAX_BATCH: usize = 256;
/// Largest change payload of one mutation.
pub const MAX_MUTATION_CHANGE_BYTES: usize = 1024 * 1024;
/// Requests of one kind a device may have sent and not yet had answered. A device that pipelines
/// more is cut off: each answer can be megabytes, and the relay holds what it has not sent.
pub const MAX_PULLS_IN_FLIGHT: usize = 2;
pub const MAX_PUSHES_IN_FLIGHT: usize = 2;
pub const MAX_PINGS_IN_FLIGHT: usize = 8;
pub const MAX_FETCHES_IN_FLIGHT: usize = 2;
/// Ids per [`ClientMessage::Fetch`].
pub const MAX_FETCH: usize = 64;
/// CBOR nesting the decoder follows before giving up (our messages nest a handful deep; JSON
/// values inside LWW losses a little more).
const MAX_NESTING: usize = 64;

/// A space the authenticated user belongs to, with the user's role there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceGrant {
    pub space_id: Uuid,
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub user_id: Uuid,
    pub name: String,
    pub spaces: Vec<SpaceGrant>,
}

/// Where a pull continues: one position per space, because each space is its own ordering
/// domain. Opaque to the device: it stores the cursor the relay last gave it (and advances a
/// space's position with each contiguous live entry) and sends it back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullCursor {
    /// The position in each space; a space missing here starts from its compacted documents.
    #[serde(default)]
    pub spaces: BTreeMap<Uuid, SpaceCursor>,
    /// A cursor of the round-1 global feed (a device database written before per-space order):
    /// the relay converts it into per-space positions once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_seq: Option<u64>,
}

impl PullCursor {
    /// A cursor with one position: every entry of `space` up to `seq` delivered.
    pub fn at(space: Uuid, seq: u64) -> Self {
        PullCursor {
            spaces: BTreeMap::from([(space, SpaceCursor { seq, snapshot: None })]),
            legacy_seq: None,
        }
    }

    /// The device's position in `space` (zero: nothing yet).
    pub fn seq(&self, space: &Uuid) -> u64 {
        self.spaces.get(space).map_or(0, |c| c.seq)
    }
}

/// The position in one space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceCursor {
    /// Every entry of the space up to this sequence number has been delivered.
    pub seq: u64,
    /// Set while a new device receives the space's compacted documents instead of its feed.
    pub snapshot: Option<SnapshotCursor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCursor {
    /// The space's feed position the snapshot started at; the feed resumes from here afterwards.
    pub upto_seq: u64,
    /// The last document key delivered.
    pub after_key: u64,
    /// The second walk over the documents, for low-priority types (reference data), which a
    /// device that asked for `priority` order gets after every other type. Absent: the first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub low_pass: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedPayload {
    /// The Automerge changes one applied mutation added (the device's, plus any the relay wrote).
    Changes(Vec<Bytes>),
    /// The whole document, compacted: what a new device gets instead of every change.
    Snapshot(Bytes),
    /// Left out because the receiving device made this change itself.
    Own,
    /// Left out because the receiving device does not hold this entry's type (selective sync,
    /// `Hello.types`): only its place in the space's feed, so live delivery stays contiguous.
    /// The entry's type and id are blank. Sent only to devices that selected types.
    NotSelected,
}

/// One applied mutation, or one compacted document, as a device receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedEntry {
    /// The position in its space's feed (dense: 1, 2, ...; a snapshot's is its document's last).
    pub seq: u64,
    pub space_id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    /// The entity's relay version after this entry.
    pub version: u64,
    pub payload: FeedPayload,
    /// `None` for snapshots.
    pub origin: Option<Origin>,
    /// LWW values this entry overrode; a device finding itself as the loser lists them.
    #[serde(default)]
    pub lww_losses: Vec<LwwLoss>,
}

/// The answer for one mutation of a push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MutationResult {
    pub mutation_id: Uuid,
    pub outcome: Outcome,
}

/// Why a connection was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFailure {
    UnknownDevice,
    Revoked,
    BadSignature,
    NonceExpired,
    UnsupportedProtocol,
    SchemaMismatch,
    InvalidToken,
    TokenExpired,
    TokenUsed,
    AlreadyEnrolled,
    /// The presented public key is not a strict ed25519 key (small order, or not canonically
    /// encoded): nobody can be proven to hold its private half.
    BadKey,
    /// The device's schema is newer than the relay's: not a verdict on the device, which keeps
    /// its changes and connects again once the relay is upgraded.
    SchemaAhead,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::UnknownDevice => "unknown_device",
            AuthFailure::Revoked => "revoked",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::NonceExpired => "nonce_expired",
            AuthFailure::UnsupportedProtocol => "unsupported_protocol",
            AuthFailure::SchemaMismatch => "schema_mismatch",
            AuthFailure::InvalidToken => "invalid_token",
            AuthFailure::TokenExpired => "token_expired",
            AuthFailure::TokenUsed => "token_used",
            AuthFailure::AlreadyEnrolled => "already_enrolled",
            AuthFailure::BadKey => "bad_key",
            AuthFailure::SchemaAhead => "schema_ahead",
        }
    }
}

/// Errors about the session rather than one mutation; the relay closes after sending one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not a valid message.
    Malformed,
    /// A message arrived that the session's state does not allow (e.g. push before auth).
    UnexpectedMessage,
    /// A limit was exceeded (frame size, batch size, rate).
    LimitExceeded,
    /// The relay is shutting down or overloaded; reconnect later.
    Unavailable,
    /// The relay failed internally; nothing was acknowledged that is not durable.
    Internal,
}

/// The revoked device a new identity takes over from, with the old key's consent: a signature
/// over [`crate::signing::replace_signing_bytes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    pub device_id: Uuid,
    pub signature: Bytes,
}

/// Messages from a device to the relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientMessage {
    /// Opens an authenticated session.
    Hello {
        protocol_version: u16,
        device_id: Uuid,
        schema_hash: SchemaHash,
        /// The version of the device's schema: a relay that does not know the hash tells a
        /// device on a newer version to wait for its upgrade. Absent from older devices: 0.
        #[serde(default)]
        schema_version: u64,
        /// The device reads compressed frames ([`compress`]). Absent from older devices.
        #[serde(default)]
        compression: bool,
        /// The entity types the device holds (selective sync); absent: every type. The relay
        /// sends nothing of another type, in pull pages or live.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        types: Option<Vec<String>>,
        /// The device syncs by windows (SPEC §16): a space's first download leaves out records
        /// of a windowed type dated outside the relay's schema's window. Absent: everything.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        windowed: bool,
        /// The device takes snapshot pages in priority order: every other type first, then the
        /// low-priority ones (`SnapshotCursor::low_pass`). Absent: one walk in key order.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        priority: bool,
        /// The device is on a metered link: the relay sends nothing of a low-priority type
        /// (as if it did not hold those types) until a connection without it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        metered: bool,
    },
    /// Registers this device's key with a single-use enrollment token.
    Enroll {
        protocol_version: u16,
        token: String,
        device_id: Uuid,
        public_key: Bytes,
        schema_hash: SchemaHash,
        /// As in `Hello`: a device on a newer version than the relay's is told to wait, not
        /// refused as unknown. Absent from older devices: 0.
        #[serde(default)]
        schema_version: u64,
        /// Signature over [`crate::signing::enroll_signing_bytes`].
        proof: Bytes,
        /// A revoked device enrolling a fresh identity to carry its unsynced changes
        /// (`enroll --new-identity`). Absent from ordinary enrollments and older devices.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replaces: Option<Box<Replacement>>,
    },
    /// Answers the challenge: signature over [`crate::signing::connect_signing_bytes`].
    Auth {
        signature: Bytes,
    },
    Push {
        batch_id: u64,
        mutations: Vec<Mutation>,
    },
    Pull {
        cursor: PullCursor,
        max_entries: u32,
    },
    /// Asks for records by id, whole (a record a window left out, or one evicted): answered by
    /// [`RelayMessage::Fetched`]. At most [`MAX_FETCH`] ids.
    Fetch {
        ids: Vec<Uuid>,
    },
    /// Replaces the device key; `signature` is by the old key over
    /// [`crate::signing::rotate_signing_bytes`].
    RotateKey {
        new_public_key: Bytes,
        signature: Bytes,
    },
    Ping {
        nonce: u64,
    },
    /// Answers [`RelayMessage::Wipe`]: the device erased its local data, discarding
    /// `discarded` changes it had not synced (the relay records both in its directory).
    Wiped {
        discarded: u64,
    },
}

/// Messages from the relay to a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayMessage {
    Challenge {
        relay_id: Uuid,
        nonce: Bytes,
    },
    Welcome {
        relay_id: Uuid,
        user: UserInfo,
        server_time_ms: u64,
        max_batch: u32,
        /// The version of the schema the relay serves (it may accept devices on older,
        /// compatible versions). Absent from relays before schema versions: 0.
        #[serde(default)]
        schema_version: u64,
        /// The relay reads compressed frames ([`compress`]): the device may send them.
        /// Absent from older relays.
        #[serde(default)]
        compression: bool,
        /// The relay answers [`ClientMessage::Fetch`]; a device sends none to an older relay
        /// (it would close the connection as malformed) and keeps its queue for a newer one.
        #[serde(default)]
        fetch: bool,
        /// The relay walks snapshots in priority order when asked (`Hello.priority`). A device
        /// whose unfinished snapshot came from such a relay starts it again on one that does
        /// not: that relay would not know the cursor skipped reference data.
        #[serde(default)]
        priority: bool,
    },
    AuthFailed {
        reason: AuthFailure,
        message: String,
    },
    Enrolled {
        relay_id: Uuid,
        user: UserInfo,
    },
    PushResult {
        batch_id: u64,
        results: Vec<MutationResult>,
    },
    /// The batch was not processed (overload, internal error); resend it later, same ids.
    PushDeferred {
        batch_id: u64,
        retry_after_ms: u64,
        reason: String,
    },
    /// One page of a pull.
    Changes {
        entries: Vec<FeedEntry>,
        next: PullCursor,
        caught_up: bool,
    },
    /// Answers [`ClientMessage::Fetch`]: each record found in the user's spaces as its compacted
    /// document, in `entries`; the ids not found there (or not the user's to see: the answer
    /// is the same) in `unknown`; ids left for another request (the page was full) in `later`.
    Fetched {
        entries: Vec<FeedEntry>,
        unknown: Vec<Uuid>,
        later: Vec<Uuid>,
    },
    /// Entries applied after the device caught up, pushed as they commit, in each space's seq
    /// order. A device advances a space's position only by exactly one per entry; an entry
    /// further ahead means it missed one, and it pulls instead.
    Live {
        entries: Vec<FeedEntry>,
    },
    /// The user's spaces or roles changed while connected: the device takes the new user info
    /// and pulls (a space it has no position in starts from its compacted documents).
    UserChanged {
        user: UserInfo,
    },
    KeyRotated,
    /// The device was revoked with a wipe (`admin device revoke --wipe`) and has just proven its
    /// key: it erases its local data and answers [`ClientMessage::Wiped`]. Sent only after the
    /// challenge is answered, so nobody but the device can make the relay record a wipe.
    Wipe,
    Pong {
        nonce: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    #[error("malformed message: {0}")]
    Malformed(String),
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    // Writing into a Vec cannot fail, and every message type serialises (no maps with non-string
    // keys, no custom serialisers that error).
    #[allow(clippy::expect_used)]
    ciborium::into_writer(&(PROTOCOL_VERSION, msg), &mut out).expect("protocol messages serialise");
    out
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let inflated = compress::inflate(bytes)?;
    let bytes: &[u8] = &inflated;
    match ciborium::de::from_reader_with_recursion_limit::<(u16, T), _>(bytes, MAX_NESTING) {
        Ok((PROTOCOL_VERSION, msg)) => Ok(msg),
        Ok((v, _)) => Err(WireError::UnsupportedVersion(v)),
        Err(e) => {
            // A frame from another protocol version may not parse as our messages at all; say
            // so rather than "malformed" when its version number is readable.
            if let Ok((v, _)) =
                ciborium::de::from_reader_with_recursion_limit::<(u16, serde::de::IgnoredAny), _>(bytes, MAX_NESTING)
                && v != PROTOCOL_VERSION
            {
                return Err(WireError::UnsupportedVersion(v));
            }
            Err(WireError::Malformed(e.to_string()))
        }
    }
}

impl ClientMessage {
    /// Opens a session for an enrolled device.
    pub fn hello(device_id: Uuid, schema: &crate::Schema) -> Self {
        ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            device_id,
            schema_hash: schema.hash(),
            schema_version: schema.version(),
            compression: true,
            types: None,
            windowed: false,
            priority: true,
            metered: false,
        }
    }

    /// Answers a `Challenge` with `key` (see [`crate::DeviceKey::answer_challenge`]).
    pub fn auth(key: &crate::DeviceKey, relay_id: &Uuid, nonce: &[u8], device_id: &Uuid) -> Self {
        ClientMessage::Auth {
            signature: Bytes(key.answer_challenge(relay_id, nonce, device_id).to_vec()),
        }
    }

    /// Registers `key` for `device_id` with an enrollment token, with the proof of holding it.
    pub fn enroll(key: &crate::DeviceKey, token: &str, device_id: Uuid, schema: &crate::Schema) -> Self {
        ClientMessage::Enroll {
            protocol_version: PROTOCOL_VERSION,
            token: token.to_string(),
            device_id,
            public_key: Bytes(key.public_key().to_vec()),
            schema_hash: schema.hash(),
            schema_version: schema.version(),
            proof: Bytes(key.enrollment_proof(token, &device_id).to_vec()),
            replaces: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    /// [`ClientMessage::encode`], compressed when that pays (for a relay that reads it).
    pub fn encode_compressed(&self) -> Vec<u8> {
        compress::compress(encode(self))
    }
    /// Either form of frame.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode(bytes)
    }
    pub fn name(&self) -> &'static str {
        match self {
            ClientMessage::Hello { .. } => "hello",
            ClientMessage::Enroll { .. } => "enroll",
            ClientMessage::Auth { .. } => "auth",
            ClientMessage::Push { .. } => "push",
            ClientMessage::Pull { .. } => "pull",
            ClientMessage::RotateKey { .. } => "rotate_key",
            ClientMessage::Ping { .. } => "ping",
            ClientMessage::Wiped { .. } => "wiped",
            ClientMessage::Fetch { .. } => "fetch",
        }
    }
}

/// Upper-bound estimate of a JSON value's CBOR size (for memory accounting, not framing).
fn json_size(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    match v {
        Value::Null | Value::Bool(_) => 1,
        Value::Number(_) => 9,
        Value::String(s) => s.len() + 9,
        Value::Array(a) => 9 + a.iter().map(json_size).sum::<usize>(),
        Value::Object(o) => 9 + o.iter().map(|(k, v)| k.len() + 9 + json_size(v)).sum::<usize>(),
    }
}

fn loss_size(l: &LwwLoss) -> usize {
    512 + l.entity_type.len() + l.field.len() + json_size(&l.loser_value) + json_size(&l.winner_value)
}

fn bytes_size(b: &[Bytes]) -> usize {
    b.iter().map(|c| c.0.len() + 9).sum()
}

fn outcome_size(o: &Outcome) -> usize {
    64 + match o {
        Outcome::Applied {
            lww_lost, duplicate_of, ..
        } => lww_lost.iter().map(loss_size).sum::<usize>() + duplicate_of.map_or(0, |_| 64),
        Outcome::AlreadyApplied { original } => outcome_size(original),
        Outcome::Conflict {
            server_changes,
            authors,
            ..
        } => bytes_size(server_changes) + authors.len() * 128,
        Outcome::RejectedImmutable { reason } | Outcome::RejectedLocked { reason } | Outcome::Forbidden { reason } => {
            reason.len()
        }
        Outcome::Invalid { errors } => errors.iter().map(|e| 64 + e.field.len() + e.message.len()).sum(),
        Outcome::NotAttempted => 0,
    }
}

fn user_size(user: &UserInfo) -> usize {
    user.name.len() + user.spaces.iter().map(|s| 64 + s.name.len()).sum::<usize>()
}

/// Upper-bound estimate of an entry's encoded size.
pub fn entry_size(e: &FeedEntry) -> usize {
    let payload = match &e.payload {
        FeedPayload::Changes(c) => bytes_size(c),
        FeedPayload::Snapshot(b) => b.0.len() + 9,
        FeedPayload::Own | FeedPayload::NotSelected => 0,
    };
    320 + e.entity_type.len() + payload + e.lww_losses.iter().map(loss_size).sum::<usize>()
}

impl RelayMessage {
    /// A cheap upper-bound estimate of [`RelayMessage::encode`]'s length, so the relay can
    /// account for what it holds per connection without encoding twice.
    pub fn size_hint(&self) -> usize {
        let body = match self {
            // Welcome's flags and numbers besides the user: names, values and map overhead.
            RelayMessage::Welcome { user, .. } => 128 + user_size(user),
            RelayMessage::Enrolled { user, .. } | RelayMessage::UserChanged { user } => user_size(user),
            RelayMessage::AuthFailed { message, .. } | RelayMessage::Error { message, .. } => message.len(),
            RelayMessage::PushDeferred { reason, .. } => reason.len(),
            RelayMessage::PushResult { results, .. } => results.iter().map(|r| 24 + outcome_size(&r.outcome)).sum(),
            RelayMessage::Changes { entries, .. } | RelayMessage::Live { entries, .. } => {
                entries.iter().map(entry_size).sum()
            }
            RelayMessage::Fetched {
                entries,
                unknown,
                later,
            } => entries.iter().map(entry_size).sum::<usize>() + 17 * (unknown.len() + later.len()),
            RelayMessage::Challenge { nonce, .. } => nonce.0.len(),
            RelayMessage::KeyRotated | RelayMessage::Wipe | RelayMessage::Pong { .. } => 0,
        };
        128 + body
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    /// [`RelayMessage::encode`], compressed when that pays (for a device that reads it).
    pub fn encode_compressed(&self) -> Vec<u8> {
        compress::compress(encode(self))
    }
    /// Either form of frame.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        decode(bytes)
    }
    pub fn name(&self) -> &'static str {
        match self {
            RelayMessage::Challenge { .. } => "challenge",
            RelayMessage::Welcome { .. } => "welcome",
            RelayMessage::AuthFailed { .. } => "auth_failed",
            RelayMessage::Enrolled { .. } => "enrolled",
            RelayMessage::PushResult { .. } => "push_result",
            RelayMessage::PushDeferred { .. } => "push_deferred",
            RelayMessage::Changes { .. } => "changes",
            RelayMessage::Fetched { .. } => "fetched",
            RelayMessage::Live { .. } => "live",
            RelayMessage::UserChanged { .. } => "user_changed",
            RelayMessage::KeyRotated => "key_rotated",
            RelayMessage::Wipe => "wipe",
            RelayMessage::Pong { .. } => "pong",
            RelayMessage::Error { .. } => "error",
        }
    }
}

#[cfg(test)]
mod tests;
