//! The mutation envelope a device queues for every local write, and the outcomes the relay
//! answers with (SPEC §6).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::hlc::Hlc;
use crate::validate::FieldError;

/// Opaque bytes, encoded as a CBOR byte string (not an array of integers).
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bytes(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() <= 32 {
            write!(f, "Bytes({})", hex::encode(&self.0))
        } else {
            write!(f, "Bytes({}…; {} bytes)", hex::encode(&self.0[..16]), self.0.len())
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What a mutation does. The relay checks that the changes match the kind (a `Delete` only
/// sets the tombstone, a `Sign` only adds the signature, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MutationKind {
    Create,
    Update,
    Delete,
    Sign,
    Lock,
    Increment,
    /// The user's answer to a conflict: a change on top of both sides, based on the relay's
    /// current version. It may also undo a tombstone (keep-mine after a delete).
    Resolve,
}

impl MutationKind {
    pub const ALL: [MutationKind; 7] = [
        MutationKind::Create,
        MutationKind::Update,
        MutationKind::Delete,
        MutationKind::Sign,
        MutationKind::Lock,
        MutationKind::Increment,
        MutationKind::Resolve,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MutationKind::Create => "create",
            MutationKind::Update => "update",
            MutationKind::Delete => "delete",
            MutationKind::Sign => "sign",
            MutationKind::Lock => "lock",
            MutationKind::Increment => "increment",
            MutationKind::Resolve => "resolve",
        }
    }

    /// Whether this kind may name the record a merged-away record went into (`merged_into`):
    /// the delete that merges it, or a resolution carrying such a delete made offline.
    pub fn may_merge(self) -> bool {
        matches!(self, MutationKind::Delete | MutationKind::Resolve)
    }

    /// Stable one-byte code used in the signing bytes.
    pub fn code(self) -> u8 {
        match self {
            MutationKind::Create => 1,
            MutationKind::Update => 2,
            MutationKind::Delete => 3,
            MutationKind::Sign => 4,
            MutationKind::Lock => 5,
            MutationKind::Increment => 6,
            MutationKind::Resolve => 7,
        }
    }
}

impl fmt::Display for MutationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One local write, as queued in the outbox and pushed to the relay. Everything but
/// `signature` is covered by the device's signature (see [`crate::signing`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mutation {
    /// Fixed at creation and reused on every retry: the relay's idempotency key.
    pub mutation_id: Uuid,
    pub device_id: Uuid,
    pub user_id: Uuid,
    pub space_id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub kind: MutationKind,
    pub client_timestamp: Hlc,
    /// The relay version this write was built on; `None` for a create.
    pub base_version: Option<u64>,
    /// Automerge change bytes, in causal order.
    pub changes: Vec<Bytes>,
    pub signature: Bytes,
}

/// Who made a change the relay applied: the device, its user, the mutation and its HLC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub device_id: Uuid,
    pub user_id: Uuid,
    pub mutation_id: Uuid,
    pub hlc: Hlc,
}

/// The value a last-writer-wins field lost, and to whom (SPEC §9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LwwLoss {
    pub entity_type: String,
    pub entity_id: Uuid,
    pub field: String,
    pub loser_device: Uuid,
    pub loser_mutation: Uuid,
    pub loser_hlc: Hlc,
    pub loser_value: Value,
    pub winner_device: Uuid,
    pub winner_mutation: Uuid,
    pub winner_hlc: Hlc,
    pub winner_value: Value,
}

/// Why the relay answered `Conflict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictReason {
    /// The write was built on an older version than the relay's (a gated type).
    StaleBase,
    /// The entity was deleted on the relay; the write would edit a tombstone.
    Deleted,
    /// A create for an id that already exists.
    AlreadyExists,
}

/// The relay's answer for one mutation. Persisted as a receipt (except `NotAttempted`), so a
/// retry with the same `mutation_id` gets the same answer after any crash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied {
        version: u64,
        seq: u64,
        /// LWW fields this write lost to a later writer: it was applied to history, but the
        /// current value stayed the winner's.
        #[serde(default)]
        lww_lost: Vec<LwwLoss>,
        /// A new record the relay flagged as possibly the same as this older live one (SPEC
        /// §17); the flag is also in the record's `duplicate_of`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duplicate_of: Option<Uuid>,
    },
    /// A retry of a mutation the relay already applied; carries the original answer.
    AlreadyApplied {
        original: Box<Outcome>,
    },
    /// The relay's version moved on (or the entity was deleted). `server_changes` are the
    /// changes the device lacks, so it can show both sides.
    Conflict {
        server_version: u64,
        server_changes: Vec<Bytes>,
        reason: ConflictReason,
        /// Who wrote the versions the device lacks, oldest first (for the "theirs" side).
        #[serde(default)]
        authors: Vec<Origin>,
    },
    RejectedImmutable {
        reason: String,
    },
    RejectedLocked {
        reason: String,
    },
    Invalid {
        errors: Vec<FieldError>,
    },
    Forbidden {
        reason: String,
    },
    /// Not looked at: an earlier mutation in the same batch failed with a blocking error.
    NotAttempted,
}

/// What the device's outbox does after an answer or a transport failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Confirmed by the relay: the item leaves the unsynced set.
    Done,
    /// Stops the outbox and is shown to the user until resolved.
    Blocking,
    /// Sent again later with backoff and jitter, under the same mutation id.
    Retry,
}

impl Outcome {
    pub fn disposition(&self) -> Disposition {
        match self {
            Outcome::Applied { .. } | Outcome::AlreadyApplied { .. } => Disposition::Done,
            Outcome::Conflict { .. }
            | Outcome::RejectedImmutable { .. }
            | Outcome::RejectedLocked { .. }
            | Outcome::Invalid { .. }
            | Outcome::Forbidden { .. } => Disposition::Blocking,
            Outcome::NotAttempted => Disposition::Retry,
        }
    }

    /// A short stable name for logs, metrics and JSON output.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::AlreadyApplied { .. } => "already_applied",
            Outcome::Conflict { .. } => "conflict",
            Outcome::RejectedImmutable { .. } => "rejected_immutable",
            Outcome::RejectedLocked { .. } => "rejected_locked",
            Outcome::Invalid { .. } => "invalid",
            Outcome::Forbidden { .. } => "forbidden",
            Outcome::NotAttempted => "not_attempted",
        }
    }

    /// The applied version and sequence number, looking through `AlreadyApplied`.
    pub fn applied(&self) -> Option<(u64, u64)> {
        match self {
            Outcome::Applied { version, seq, .. } => Some((*version, *seq)),
            Outcome::AlreadyApplied { original } => original.applied(),
            _ => None,
        }
    }

    /// A one-line human description, for CLI output and the outbox's error column.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Applied { version, .. } => format!("applied as version {version}"),
            Outcome::AlreadyApplied { original } => format!("already applied ({})", original.describe()),
            Outcome::Conflict {
                server_version, reason, ..
            } => match reason {
                ConflictReason::StaleBase => {
                    format!("conflict: the record changed on the relay (now version {server_version})")
                }
                ConflictReason::Deleted => "conflict: the record was deleted on the relay".to_string(),
                ConflictReason::AlreadyExists => "conflict: a record with this id already exists".to_string(),
            },
            Outcome::RejectedImmutable { reason } => format!("rejected, record is signed: {reason}"),
            Outcome::RejectedLocked { reason } => format!("rejected, record is locked: {reason}"),
            Outcome::Invalid { errors } => {
                let parts: Vec<String> = errors.iter().map(ToString::to_string).collect();
                format!("invalid: {}", parts.join("; "))
            }
            Outcome::Forbidden { reason } => format!("forbidden: {reason}"),
            Outcome::NotAttempted => "not attempted (an earlier change in the batch failed)".to_string(),
        }
    }
}

/// Failures that are not an answer about one mutation: the connection or the relay itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum TransportError {
    #[error("timed out waiting for the relay")]
    Timeout,
    #[error("connection lost")]
    ConnectionLost,
    #[error("relay overloaded, retry later")]
    Overloaded,
    #[error("relay internal error: {0}")]
    Internal(String),
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error("schema mismatch: device and relay use different schemas")]
    SchemaMismatch,
    #[error("protocol mismatch: {0}")]
    ProtocolMismatch(String),
}

impl TransportError {
    pub fn disposition(&self) -> Disposition {
        match self {
            TransportError::Timeout
            | TransportError::ConnectionLost
            | TransportError::Overloaded
            | TransportError::Internal(_) => Disposition::Retry,
            TransportError::AuthFailed(_) | TransportError::SchemaMismatch | TransportError::ProtocolMismatch(_) => {
                Disposition::Blocking
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::Rule;

    #[test]
    fn taxonomy_matches_the_spec() {
        let blocking = [
            Outcome::Conflict {
                server_version: 2,
                server_changes: vec![],
                reason: ConflictReason::StaleBase,
                authors: vec![],
            },
            Outcome::RejectedImmutable {
                reason: "signed".into(),
            },
            Outcome::RejectedLocked {
                reason: "locked".into(),
            },
            Outcome::Invalid {
                errors: vec![FieldError::new("name", Rule::Required, "is required")],
            },
            Outcome::Forbidden { reason: "role".into() },
        ];
        for o in &blocking {
            assert_eq!(o.disposition(), Disposition::Blocking, "{o:?}");
        }
        let applied = Outcome::Applied {
            version: 1,
            seq: 9,
            duplicate_of: None,
            lww_lost: vec![],
        };
        assert_eq!(applied.disposition(), Disposition::Done);
        let again = Outcome::AlreadyApplied {
            original: Box::new(applied.clone()),
        };
        assert_eq!(again.disposition(), Disposition::Done);
        assert_eq!(again.applied(), Some((1, 9)));
        assert_eq!(Outcome::NotAttempted.disposition(), Disposition::Retry);

        for e in [
            TransportError::Timeout,
            TransportError::ConnectionLost,
            TransportError::Overloaded,
            TransportError::Internal("db".into()),
        ] {
            assert_eq!(e.disposition(), Disposition::Retry);
        }
        for e in [
            TransportError::AuthFailed("revoked".into()),
            TransportError::SchemaMismatch,
            TransportError::ProtocolMismatch("v9".into()),
        ] {
            assert_eq!(e.disposition(), Disposition::Blocking);
        }
    }

    #[test]
    fn kind_codes_are_distinct() {
        let mut codes: Vec<u8> = MutationKind::ALL.iter().map(|k| k.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), MutationKind::ALL.len());
    }
}
