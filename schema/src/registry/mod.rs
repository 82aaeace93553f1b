//! The entity registry: which entity types exist, how the relay treats their changes, and
//! which fields they carry.
//!
//! The schema is data (`schema/entities.toml`) so that a device and its relay can check at
//! connect time that they agree (see [`Schema::hash`]) and so that operators can ship their own
//! domain without recompiling. The file is parsed by hand from a generic TOML table rather than
//! through serde derive, because a schema author needs errors that name the type and field at
//! fault, not a serde path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use sha2::{Digest, Sha256};
use toml::Table;

mod authority;
pub mod compat;
mod describe;
mod parse;
#[cfg(test)]
mod tests;
mod window;

pub use authority::{
    Authority, DUPLICATE_OF, DuplicateKey, MERGED_INTO, SUPERSEDED_AT, SUPERSEDED_BY_VERSION, SUPERSEDED_FIELDS,
    SUPERSEDED_NOTICE, duplicate_key, is_service_record, merged_fields, merges_without_prompt, ownership_refusal,
    put_refusal,
};
use parse::{check_cross_references, parse_type};
pub use window::SyncWindow;

/// The default domain schema, embedded so that a binary works without any file next to it.
pub const DEFAULT_SCHEMA_TOML: &str = include_str!("../../entities.toml");

/// What the relay does with a change to an entity of a type (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Optimistic concurrency: accepted only on the relay's current version, else a conflict.
    Gated,
    /// CRDT merge of text and fields; immutable once signed.
    Notes,
    /// Counter fields merge by adding concurrent increments.
    Counter,
    /// Last writer wins per field by (HLC, device id); losers archived.
    Lww,
    /// Create only; the content never changes afterwards.
    AppendOnly,
    /// Devices read; only `admin` and `service` write.
    ServerOwned,
}

impl Policy {
    pub const ALL: [Policy; 6] = [
        Policy::Gated,
        Policy::Notes,
        Policy::Counter,
        Policy::Lww,
        Policy::AppendOnly,
        Policy::ServerOwned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Gated => "gated",
            Policy::Notes => "notes",
            Policy::Counter => "counter",
            Policy::Lww => "lww",
            Policy::AppendOnly => "append_only",
            Policy::ServerOwned => "server_owned",
        }
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
            format!(
                "unknown policy `{s}` (expected one of {})",
                join_names(Policy::ALL.map(Policy::as_str))
            )
        })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user's role in a space (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Clinician,
    Assistant,
    Patient,
    /// A backend process that writes computed data (training plans, exercise library).
    Service,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Clinician,
        Role::Assistant,
        Role::Patient,
        Role::Service,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Clinician => "clinician",
            Role::Assistant => "assistant",
            Role::Patient => "patient",
            Role::Service => "service",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            format!(
                "unknown role `{s}` (expected one of {})",
                join_names(Role::ALL.map(Role::as_str))
            )
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value type of a field, with the constraints that belong to that type.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FieldKind {
    /// A short string, replaced as a whole on write.
    String {
        max_length: Option<u64>,
    },
    /// Long text stored as an Automerge text object, so concurrent edits merge character-wise.
    Text {
        max_length: Option<u64>,
    },
    Int {
        min: Option<i64>,
        max: Option<i64>,
    },
    Float {
        min: Option<f64>,
        max: Option<f64>,
    },
    Bool,
    /// RFC 3339 date-time with an offset, e.g. `2026-11-22T09:30:00Z`.
    Timestamp,
    /// Calendar date, `YYYY-MM-DD`.
    Date,
    Enum {
        values: Vec<String>,
    },
    /// The id (UUID) of an entity of type `to` in the same space.
    Ref {
        to: String,
    },
    /// An Automerge counter: changed only by increments, which add up across devices.
    Counter {
        min: Option<i64>,
    },
}

impl FieldKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldKind::String { .. } => "string",
            FieldKind::Text { .. } => "text",
            FieldKind::Int { .. } => "int",
            FieldKind::Float { .. } => "float",
            FieldKind::Bool => "bool",
            FieldKind::Timestamp => "timestamp",
            FieldKind::Date => "date",
            FieldKind::Enum { .. } => "enum",
            FieldKind::Ref { .. } => "ref",
            FieldKind::Counter { .. } => "counter",
        }
    }
}

const FIELD_TYPES: [&str; 10] = [
    "string",
    "text",
    "int",
    "float",
    "bool",
    "timestamp",
    "date",
    "enum",
    "ref",
    "counter",
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Field {
    pub name: String,
    #[serde(flatten)]
    pub kind: FieldKind,
    pub required: bool,
    /// Required unless this other field is present (e.g. `exercise_name` unless `exercise_id`).
    pub required_unless: Option<String>,
    /// Names this field had in earlier schema versions (a declared rename, oldest last). Devices
    /// still on those versions write the old name; the relay keeps every name holding the same
    /// value (see [`crate::document::EntityDoc::align_renamed`]) and readers on this version see
    /// only `name` (see [`EntityType::view`]). Left out of the hash when empty, so a schema
    /// without migrations hashes as it did before they existed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub renamed_from: Vec<String>,
    /// The value readers see while a record does not hold the field: how a new required field
    /// is added without touching records written before it existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    /// The class of writer that owns the field (SPEC §17); `None` when not declared. Left out of
    /// the hash when absent, like every later addition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<Authority>,
    /// A service-owned field people may write too: their value stands until the service writes
    /// it (a manual log's distance until the watch's import arrives).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub provisional: bool,
    #[serde(skip)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityType {
    pub name: String,
    pub policy: Policy,
    /// A `locked: true` record rejects every later change.
    pub lockable: bool,
    /// A signed record rejects every later change.
    pub signable: bool,
    /// Roles that may create, update and delete entities of this type.
    pub write_roles: BTreeSet<Role>,
    /// Roles that may sign (only for `signable` types).
    pub sign_roles: BTreeSet<Role>,
    pub fields: BTreeMap<String, Field>,
    /// How possible duplicates are recognised (SPEC §17); the relay flags them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<DuplicateKey>,
    /// A user's request against records of this (server-owned) type, which the service may
    /// mark superseded (e.g. a reschedule against a plan).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_for: Option<String>,
    /// Which records a device that syncs by windows downloads first (SPEC §16). Not hashed:
    /// see [`SyncWindow`].
    #[serde(skip)]
    pub window: Option<SyncWindow>,
    /// Reference data (`priority = "low"`, e.g. an exercise library): a new device's snapshot
    /// brings it after every other type, and a device on a metered link defers it (SPEC §16).
    /// Not hashed, like the window: it orders delivery, not what a record holds.
    #[serde(skip)]
    pub low_priority: bool,
    #[serde(skip)]
    pub description: Option<String>,
}

impl EntityType {
    /// Whether any field declares an owner; only then does [`EntityType::owner_of`] divide the
    /// fields between people and services.
    pub fn has_authority(&self) -> bool {
        self.fields.values().any(|f| f.authority.is_some())
    }

    /// Who owns a field: its declared authority, `user` for an undeclared field of a type that
    /// declares any, `shared` in a type that declares none (everything gated, as before §17).
    pub fn owner_of(&self, field: &str) -> Authority {
        match self.field(field).and_then(|f| f.authority) {
            Some(a) => a,
            None if self.has_authority() => Authority::User,
            None => Authority::Shared,
        }
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.get(name)
    }

    pub fn may_write(&self, role: Role) -> bool {
        self.write_roles.contains(&role)
    }

    pub fn may_sign(&self, role: Role) -> bool {
        self.signable && self.sign_roles.contains(&role)
    }

    /// The field an earlier version's name now stands for (a declared rename).
    pub fn renamed_field(&self, old_name: &str) -> Option<&Field> {
        self.fields
            .values()
            .find(|f| f.renamed_from.iter().any(|o| o == old_name))
    }

    /// Whether a document key is one of this type's fields, or an earlier name of one.
    pub fn knows_key(&self, key: &str) -> bool {
        self.field(key).is_some() || self.renamed_field(key).is_some()
    }

    /// A record's stored fields as this schema version names them: a renamed field read from
    /// its earliest present name when the record does not hold the new one yet (written
    /// before the rename and never touched since), earlier names dropped, and each declared
    /// default filled in for a field the record does not hold. Device and relay both read
    /// through this, so validation, lists and conflict views agree on every replica; fields
    /// this version does not know are kept as they are.
    pub fn view(
        &self,
        mut stored: serde_json::Map<String, serde_json::Value>,
    ) -> serde_json::Map<String, serde_json::Value> {
        for field in self.fields.values() {
            for old in &field.renamed_from {
                if let Some(value) = stored.remove(old)
                    && !stored.contains_key(&field.name)
                {
                    stored.insert(field.name.clone(), value);
                }
            }
            if let Some(default) = &field.default
                && !stored.contains_key(&field.name)
            {
                stored.insert(field.name.clone(), default.clone());
            }
        }
        stored
    }

    /// [`EntityType::view`] without a copy when the type declares no migration (the common
    /// case on every write).
    pub fn view_of<'a>(
        &self,
        stored: &'a serde_json::Map<String, serde_json::Value>,
    ) -> std::borrow::Cow<'a, serde_json::Map<String, serde_json::Value>> {
        if self.has_migrations() {
            std::borrow::Cow::Owned(self.view(stored.clone()))
        } else {
            std::borrow::Cow::Borrowed(stored)
        }
    }

    /// Whether [`EntityType::view`] can differ from the stored fields.
    pub fn has_migrations(&self) -> bool {
        self.fields
            .values()
            .any(|f| !f.renamed_from.is_empty() || f.default.is_some())
    }

    /// Fields holding Automerge counters.
    pub fn counter_fields(&self) -> impl Iterator<Item = &Field> {
        self.fields
            .values()
            .filter(|f| matches!(f.kind, FieldKind::Counter { .. }))
    }

    /// Fields holding references to other entities, with their target type.
    pub fn ref_fields(&self) -> impl Iterator<Item = (&Field, &str)> {
        self.fields.values().filter_map(|f| match &f.kind {
            FieldKind::Ref { to } => Some((f, to.as_str())),
            _ => None,
        })
    }
}

/// A loaded, checked schema. Cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Schema {
    version: u64,
    types: BTreeMap<String, EntityType>,
    hash: SchemaHash,
    /// The TOML it was read from (a relay keeps the text of every schema it served).
    source: std::sync::Arc<str>,
}

/// SHA-256 of the schema's canonical form: equal for equal schemas whatever the file's layout,
/// comments or key order, on every machine.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
pub struct SchemaHash(pub [u8; 32]);

impl SchemaHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for SchemaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SchemaHash({})", self.to_hex())
    }
}

impl fmt::Display for SchemaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why a schema file was refused. `location` names the type and field at fault when there is one.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// (`reason` rather than `source`: the message already says it, and an error chain would
    /// repeat it.)
    #[error("cannot read schema file {path}: {reason}")]
    Io { path: String, reason: std::io::Error },
    #[error("schema is not valid TOML: {0}")]
    Toml(String),
    #[error("schema error in {location}: {message}")]
    Invalid { location: String, message: String },
}

fn invalid(location: impl Into<String>, message: impl Into<String>) -> SchemaError {
    SchemaError::Invalid {
        location: location.into(),
        message: message.into(),
    }
}

fn join_names<const N: usize>(names: [&str; N]) -> String {
    names.map(|n| format!("`{n}`")).join(", ")
}

#[derive(Serialize)]
struct CanonicalSchema<'a> {
    version: u64,
    types: &'a BTreeMap<String, EntityType>,
}

impl Schema {
    /// The embedded default domain schema (`schema/entities.toml`).
    pub fn default_schema() -> Schema {
        // The embedded file is checked by this crate's tests; failing here is a build defect.
        #[allow(clippy::expect_used)]
        Schema::from_toml_str(DEFAULT_SCHEMA_TOML).expect("embedded default schema is valid")
    }

    /// Loads a schema file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Schema, SchemaError> {
        match path {
            None => Ok(Schema::default_schema()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|reason| SchemaError::Io {
                    path: p.display().to_string(),
                    reason,
                })?;
                Schema::from_toml_str(&text)
            }
        }
    }

    pub fn from_toml_str(text: &str) -> Result<Schema, SchemaError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| SchemaError::Toml(e.to_string()))?;
        let mut version = 1;
        let mut types = BTreeMap::new();
        for (key, value) in &table {
            match key.as_str() {
                "schema_version" => {
                    version = value
                        .as_integer()
                        .and_then(|v| u64::try_from(v).ok())
                        .ok_or_else(|| invalid("`schema_version`", "must be a non-negative integer"))?;
                }
                "types" => {
                    let t = value
                        .as_table()
                        .ok_or_else(|| invalid("`types`", "must be a table of entity types"))?;
                    for (name, def) in t {
                        types.insert(name.clone(), parse_type(name, def)?);
                    }
                }
                other => {
                    return Err(invalid(
                        "the top level",
                        format!("unknown key `{other}` (expected `schema_version` or `types`)"),
                    ));
                }
            }
        }
        if types.is_empty() {
            return Err(invalid("`types`", "the schema declares no entity types"));
        }
        check_cross_references(&types)?;
        let hash = compute_hash(version, &types);
        Ok(Schema {
            version,
            types,
            hash,
            source: text.into(),
        })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn hash(&self) -> SchemaHash {
        self.hash
    }

    /// The TOML text this schema was read from.
    pub fn source_toml(&self) -> &str {
        &self.source
    }

    pub fn entity_type(&self, name: &str) -> Option<&EntityType> {
        self.types.get(name)
    }

    pub fn types(&self) -> impl Iterator<Item = &EntityType> {
        self.types.values()
    }

    /// Whether any type declares a rename or a default (devices then re-read their records
    /// through [`EntityType::view`] when they move to this schema).
    pub fn has_migrations(&self) -> bool {
        self.types.values().any(EntityType::has_migrations)
    }

    pub fn type_names(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }
}

fn compute_hash(version: u64, types: &BTreeMap<String, EntityType>) -> SchemaHash {
    let canonical = CanonicalSchema { version, types };
    // Serialising plain structs, BTreeMaps and BTreeSets to JSON cannot fail.
    #[allow(clippy::expect_used)]
    let bytes = serde_json::to_vec(&canonical).expect("schema serialises");
    let mut h = Sha256::new();
    h.update(b"fieldsync/schema/v1\0");
    h.update(&bytes);
    SchemaHash(h.finalize().into())
}
