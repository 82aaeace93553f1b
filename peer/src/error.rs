//! The library's error type. Every variant carries enough for a person to act on it: which
//! entity, which field, which rule; the CLI prints `Display` as is.

use fieldsync_schema::ValidationErrors;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("database error: {0}")]
    Db(rusqlite::Error),
    /// SQLite could not grow the device's files (`SQLITE_FULL`). The write's transaction was
    /// rolled back whole: nothing of it was kept, and every queued change is intact.
    #[error(
        "the device's storage is full ({0}): nothing of this write was kept and queued changes are intact; free some space and try again"
    )]
    StorageFull(rusqlite::Error),
    #[error("i/o error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("schema: {0}")]
    Schema(#[from] fieldsync_schema::SchemaError),
    /// `hint` names the closest type and every type of the schema.
    #[error("unknown entity type `{name}`: {hint} (`fieldsync-peer schema` shows their fields)")]
    UnknownType { name: String, hint: String },
    #[error("no entity {id}{}", .entity_type.as_ref().map(|t| format!(" of type `{t}`")).unwrap_or_default())]
    NotFound { entity_type: Option<String>, id: Uuid },
    #[error("entity {id} is a `{actual}`, not a `{expected}`")]
    WrongType { id: Uuid, expected: String, actual: String },
    #[error("{entity_type} {id} already exists")]
    AlreadyExists { entity_type: String, id: Uuid },
    /// Every field error of the write at once; nothing was written.
    #[error("{entity_type} not saved, {errors}")]
    Invalid {
        entity_type: String,
        errors: ValidationErrors,
    },
    /// A write the entity's state or policy forbids locally (signed, locked, deleted,
    /// append-only, server-owned, role); nothing was written.
    #[error("{entity_type} {id} refused: {reason}")]
    Refused {
        entity_type: String,
        id: Uuid,
        reason: String,
    },
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// Not a relay address (`ws://host:port` or `wss://host[:port]`, optionally with a path).
    #[error("`{0}` is not a relay address (expected ws://host:port or wss://host)")]
    BadRelayAddress(String),
    #[error("the stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("document: {0}")]
    Doc(#[from] fieldsync_schema::document::DocError),
    #[error("no outbox item with mutation id {0}")]
    NoSuchMutation(Uuid),
    #[error("{0}")]
    Backup(String),
    /// The database key is missing, wrong, malformed, or given for a file that is not
    /// encrypted (encryption at rest): nothing was opened or changed.
    #[error("{0}")]
    Key(String),
    #[error("sign-out refused: {0}")]
    SignOutRefused(String),
    /// A conflict, rejection or LWW loss cannot be resolved as asked; says what can be done.
    #[error("{0}")]
    Resolution(String),
    /// The relay ordered this device's data erased (a remote wipe, SPEC §16): it holds nothing
    /// and takes no writes.
    #[error(
        "this device's data was erased at its relay's request ({discarded} unsynced changes discarded): it takes no more writes; to use it again, give the app a new data directory and enroll it with a new token"
    )]
    Wiped { at_ms: u64, discarded: u64 },
}

pub type Result<T, E = PeerError> = std::result::Result<T, E>;

impl From<rusqlite::Error> for PeerError {
    fn from(e: rusqlite::Error) -> Self {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            PeerError::StorageFull(e)
        } else {
            PeerError::Db(e)
        }
    }
}

impl From<fieldsync_schema::sqlite_key::KeyError> for PeerError {
    fn from(e: fieldsync_schema::sqlite_key::KeyError) -> Self {
        match e {
            fieldsync_schema::sqlite_key::KeyError::Sqlite(e) => e.into(),
            other => PeerError::Key(other.to_string()),
        }
    }
}

impl PeerError {
    /// A type name the schema does not have, with what it does have.
    pub(crate) fn unknown_type(schema: &fieldsync_schema::Schema, name: &str) -> Self {
        PeerError::UnknownType {
            name: name.to_string(),
            hint: schema.unknown_type_hint(name),
        }
    }

    /// A write the rules refuse for this entity (signed, locked, deleted, wrong kind...).
    pub(crate) fn refused(entity_type: &str, id: Uuid, reason: impl Into<String>) -> Self {
        PeerError::Refused {
            entity_type: entity_type.to_string(),
            id,
            reason: reason.into(),
        }
    }
}

pub(crate) fn io_err(path: &std::path::Path, source: std::io::Error) -> PeerError {
    PeerError::Io {
        path: path.display().to_string(),
        source,
    }
}
