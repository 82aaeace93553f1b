//! One exception type for every language, with the same field errors and reasons the CLI
//! prints: an app shows `message`, and branches on the variant and its fields.

use fieldsync_peer::PeerError;
use fieldsync_peer::net::NetError;

/// A rule one field broke (`rule` is a stable snake_case name: `required`, `enum`, `max`, ...).
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct FieldError {
    pub field: String,
    pub rule: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum FieldsyncError {
    /// The write broke the schema: every field error at once; nothing was written.
    #[error("{message}")]
    Invalid {
        message: String,
        entity_type: String,
        field_errors: Vec<FieldError>,
    },
    /// The record's state or policy forbids the write (signed, locked, deleted, role, ...).
    #[error("{message}")]
    Refused { message: String, reason: String },
    /// No such record, type, outbox item, conflict or loss.
    #[error("{message}")]
    NotFound { message: String },
    /// Not now: not enrolled, sync already running, the client closed, a sign-out refused.
    #[error("{message}")]
    NotAllowed { message: String },
    /// A conflict, rejection or LWW loss cannot be resolved as asked; says what can be done.
    #[error("{message}")]
    Resolution { message: String },
    /// The device's storage is full: nothing of the write was kept, queued changes are intact.
    #[error("{message}")]
    StorageFull { message: String },
    /// The relay could not be reached or refused (enrollment); `retryable` says whether
    /// trying again later can help.
    #[error("{message}")]
    Network { message: String, retryable: bool },
    /// An argument the library could not read: an id that is not a UUID, fields that are not
    /// a JSON object.
    #[error("{message}")]
    BadArgument { message: String },
    /// The store failed (database, file, corrupt data, backup).
    #[error("{message}")]
    Storage { message: String },
    /// The database key is missing, wrong or malformed (encryption at rest): nothing was
    /// opened or changed.
    #[error("{message}")]
    Key { message: String },
}

pub type Result<T, E = FieldsyncError> = std::result::Result<T, E>;

impl From<PeerError> for FieldsyncError {
    fn from(e: PeerError) -> Self {
        let message = e.to_string();
        match e {
            PeerError::Invalid { entity_type, errors } => FieldsyncError::Invalid {
                message,
                entity_type,
                field_errors: errors
                    .0
                    .into_iter()
                    .map(|f| FieldError {
                        field: f.field,
                        rule: f.rule.as_str().to_string(),
                        message: f.message,
                    })
                    .collect(),
            },
            PeerError::Refused { reason, .. } => FieldsyncError::Refused { message, reason },
            PeerError::UnknownType { .. } | PeerError::NotFound { .. } | PeerError::NoSuchMutation(_) => {
                FieldsyncError::NotFound { message }
            }
            PeerError::WrongType { .. } | PeerError::AlreadyExists { .. } | PeerError::BadRelayAddress(_) => {
                FieldsyncError::BadArgument { message }
            }
            PeerError::NotAllowed(_) | PeerError::SignOutRefused(_) | PeerError::Wiped { .. } => {
                FieldsyncError::NotAllowed { message }
            }
            PeerError::Resolution(_) => FieldsyncError::Resolution { message },
            PeerError::StorageFull(_) => FieldsyncError::StorageFull { message },
            PeerError::Key(_) => FieldsyncError::Key { message },
            PeerError::Db(_)
            | PeerError::Io { .. }
            | PeerError::Schema(_)
            | PeerError::Corrupt(_)
            | PeerError::Doc(_)
            | PeerError::Backup(_) => FieldsyncError::Storage { message },
        }
    }
}

impl From<NetError> for FieldsyncError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Store(store) => store.into(),
            other => FieldsyncError::Network {
                retryable: other.is_retryable(),
                message: other.to_string(),
            },
        }
    }
}

pub(crate) fn bad_argument(message: impl Into<String>) -> FieldsyncError {
    FieldsyncError::BadArgument {
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldsync_schema::{FieldError as SchemaFieldError, Rule, ValidationErrors};

    #[test]
    fn an_invalid_write_keeps_every_field_error_with_its_rule() {
        let e = PeerError::Invalid {
            entity_type: "patient".into(),
            errors: ValidationErrors(vec![
                SchemaFieldError::new("name", Rule::Required, "is required"),
                SchemaFieldError::new("sex", Rule::Enum, "must be one of f, m"),
            ]),
        };
        let FieldsyncError::Invalid {
            entity_type,
            field_errors,
            message,
        } = FieldsyncError::from(e)
        else {
            panic!("not Invalid");
        };
        assert_eq!(entity_type, "patient");
        assert_eq!(
            field_errors
                .iter()
                .map(|f| (f.field.as_str(), f.rule.as_str()))
                .collect::<Vec<_>>(),
            [("name", "required"), ("sex", "enum")]
        );
        assert!(message.contains("name") && message.contains("sex"), "{message}");
    }

    #[test]
    fn network_errors_say_whether_to_retry_and_store_errors_stay_store_errors() {
        let unreachable = NetError::Unreachable {
            url: "ws://x".into(),
            reason: "refused".into(),
        };
        assert!(matches!(
            FieldsyncError::from(unreachable),
            FieldsyncError::Network { retryable: true, .. }
        ));
        let refused = NetError::EnrollRefused {
            reason: "token_used",
            message: "used".into(),
        };
        assert!(matches!(
            FieldsyncError::from(refused),
            FieldsyncError::Network { retryable: false, .. }
        ));
        let store = NetError::Store(PeerError::NotAllowed("no".into()));
        assert!(matches!(FieldsyncError::from(store), FieldsyncError::NotAllowed { .. }));
    }
}
