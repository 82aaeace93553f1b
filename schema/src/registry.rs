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
use toml::{Table, Value};

/// The default domain schema, embedded so that a binary works without any file next to it.
pub const DEFAULT_SCHEMA_TOML: &str = include_str!("../entities.toml");

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
    #[serde(skip)]
    pub description: Option<String>,
}

impl EntityType {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.get(name)
    }

    pub fn may_write(&self, role: Role) -> bool {
        self.write_roles.contains(&role)
    }

    pub fn may_sign(&self, role: Role) -> bool {
        self.signable && self.sign_roles.contains(&role)
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
}

/// SHA-256 of the schema's canonical form: equal for equal schemas whatever the file's layout,
/// comments or key order, on every machine.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
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
    #[error("cannot read schema file {path}: {source}")]
    Io { path: String, source: std::io::Error },
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
                let text = std::fs::read_to_string(p).map_err(|source| SchemaError::Io {
                    path: p.display().to_string(),
                    source,
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
        Ok(Schema { version, types, hash })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn hash(&self) -> SchemaHash {
        self.hash
    }

    pub fn entity_type(&self, name: &str) -> Option<&EntityType> {
        self.types.get(name)
    }

    pub fn types(&self) -> impl Iterator<Item = &EntityType> {
        self.types.values()
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

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 64
}

fn parse_type(name: &str, def: &Value) -> Result<EntityType, SchemaError> {
    let loc = format!("type `{name}`");
    if !is_identifier(name) {
        return Err(invalid(
            &loc,
            "type names are lowercase identifiers (a-z, 0-9, _), starting with a letter",
        ));
    }
    let table = def
        .as_table()
        .ok_or_else(|| invalid(&loc, "must be a table with `policy` and `fields`"))?;
    let mut policy = None;
    let mut lockable = false;
    let mut signable = false;
    let mut write_roles = None;
    let mut sign_roles = BTreeSet::new();
    let mut fields = BTreeMap::new();
    let mut description = None;
    for (key, value) in table {
        match key.as_str() {
            "policy" => {
                let s = value
                    .as_str()
                    .ok_or_else(|| invalid(&loc, "`policy` must be a string"))?;
                policy = Some(Policy::from_str(s).map_err(|m| invalid(&loc, m))?);
            }
            "lockable" => lockable = as_bool(value, &loc, "lockable")?,
            "signable" => signable = as_bool(value, &loc, "signable")?,
            "write" => write_roles = Some(parse_roles(value, &loc, "write")?),
            "sign" => sign_roles = parse_roles(value, &loc, "sign")?,
            "description" => description = Some(as_string(value, &loc, "description")?),
            "fields" => {
                let ft = value
                    .as_table()
                    .ok_or_else(|| invalid(&loc, "`fields` must be a table of field definitions"))?;
                for (fname, fdef) in ft {
                    fields.insert(fname.clone(), parse_field(name, fname, fdef)?);
                }
            }
            other => {
                return Err(invalid(
                    &loc,
                    format!(
                        "unknown key `{other}` (expected policy, lockable, signable, write, sign, description, fields)"
                    ),
                ));
            }
        }
    }
    let policy = policy.ok_or_else(|| invalid(&loc, "missing `policy`"))?;
    let write_roles =
        write_roles.ok_or_else(|| invalid(&loc, "missing `write` (the roles that may write this type)"))?;
    if policy == Policy::ServerOwned
        && let Some(r) = write_roles.iter().find(|r| !matches!(r, Role::Admin | Role::Service))
    {
        return Err(invalid(
            &loc,
            format!("policy `server_owned` allows only `admin` and `service` to write, not `{r}`"),
        ));
    }
    if signable && sign_roles.is_empty() {
        return Err(invalid(&loc, "`signable` types need `sign` (the roles that may sign)"));
    }
    if !signable && !sign_roles.is_empty() {
        return Err(invalid(&loc, "`sign` roles are only meaningful with `signable = true`"));
    }
    if lockable {
        match fields.get("locked") {
            Some(Field {
                kind: FieldKind::Bool, ..
            }) => {}
            _ => return Err(invalid(&loc, "`lockable` types need a `locked` field of type `bool`")),
        }
    }
    let has_counter = fields
        .values()
        .any(|f: &Field| matches!(f.kind, FieldKind::Counter { .. }));
    if has_counter && policy != Policy::Counter {
        return Err(invalid(
            &loc,
            "counter fields are only allowed in types with policy `counter`",
        ));
    }
    if policy == Policy::Counter && !has_counter {
        return Err(invalid(
            &loc,
            "policy `counter` needs at least one field of type `counter`",
        ));
    }
    for f in fields.values() {
        if let Some(other) = &f.required_unless
            && !fields.contains_key(other)
        {
            return Err(invalid(
                format!("type `{name}`, field `{}`", f.name),
                format!("`required_unless` names `{other}`, which is not a field of `{name}`"),
            ));
        }
    }
    Ok(EntityType {
        name: name.to_string(),
        policy,
        lockable,
        signable,
        write_roles,
        sign_roles,
        fields,
        description,
    })
}

fn parse_field(type_name: &str, name: &str, def: &Value) -> Result<Field, SchemaError> {
    let loc = format!("type `{type_name}`, field `{name}`");
    if !is_identifier(name) {
        return Err(invalid(
            &loc,
            "field names are lowercase identifiers (a-z, 0-9, _) starting with a letter; names starting with `_` are reserved",
        ));
    }
    let table = def
        .as_table()
        .ok_or_else(|| invalid(&loc, "must be a table such as { type = \"string\", required = true }"))?;
    let type_name_value = table
        .get("type")
        .ok_or_else(|| invalid(&loc, "missing `type`"))?
        .as_str()
        .ok_or_else(|| invalid(&loc, "`type` must be a string"))?;
    let allowed: &[&str] = match type_name_value {
        "string" | "text" => &["max_length"],
        "int" | "float" => &["min", "max"],
        "counter" => &["min"],
        "enum" => &["values"],
        "ref" => &["to"],
        "bool" | "timestamp" | "date" => &[],
        other => {
            return Err(invalid(
                &loc,
                format!(
                    "unknown field type `{other}` (expected one of {})",
                    join_names(FIELD_TYPES)
                ),
            ));
        }
    };
    let mut required = false;
    let mut required_unless = None;
    let mut description = None;
    for (key, value) in table {
        match key.as_str() {
            "type" => {}
            "required" => required = as_bool(value, &loc, "required")?,
            "required_unless" => required_unless = Some(as_string(value, &loc, "required_unless")?),
            "description" => description = Some(as_string(value, &loc, "description")?),
            k if allowed.contains(&k) => {}
            other => {
                return Err(invalid(
                    &loc,
                    format!("key `{other}` is not valid for a field of type `{type_name_value}`"),
                ));
            }
        }
    }
    if required && required_unless.is_some() {
        return Err(invalid(&loc, "use either `required` or `required_unless`, not both"));
    }
    let kind = match type_name_value {
        "string" => FieldKind::String {
            max_length: opt_u64(table, &loc, "max_length")?,
        },
        "text" => FieldKind::Text {
            max_length: opt_u64(table, &loc, "max_length")?,
        },
        "int" => {
            let (min, max) = (opt_i64(table, &loc, "min")?, opt_i64(table, &loc, "max")?);
            if let (Some(a), Some(b)) = (min, max)
                && a > b
            {
                return Err(invalid(&loc, format!("`min` ({a}) is greater than `max` ({b})")));
            }
            FieldKind::Int { min, max }
        }
        "float" => {
            let (min, max) = (opt_f64(table, &loc, "min")?, opt_f64(table, &loc, "max")?);
            if let (Some(a), Some(b)) = (min, max)
                && a > b
            {
                return Err(invalid(&loc, format!("`min` ({a}) is greater than `max` ({b})")));
            }
            FieldKind::Float { min, max }
        }
        "counter" => FieldKind::Counter {
            min: opt_i64(table, &loc, "min")?,
        },
        "bool" => FieldKind::Bool,
        "timestamp" => FieldKind::Timestamp,
        "date" => FieldKind::Date,
        "enum" => {
            let values = table
                .get("values")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid(&loc, "`enum` fields need `values`, an array of strings"))?;
            let mut out = Vec::with_capacity(values.len());
            for v in values {
                let s = v
                    .as_str()
                    .ok_or_else(|| invalid(&loc, "`values` must contain only strings"))?;
                if out.iter().any(|o| o == s) {
                    return Err(invalid(&loc, format!("enum value `{s}` is listed twice")));
                }
                out.push(s.to_string());
            }
            if out.is_empty() {
                return Err(invalid(&loc, "`values` must not be empty"));
            }
            FieldKind::Enum { values: out }
        }
        "ref" => FieldKind::Ref {
            to: table
                .get("to")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(&loc, "`ref` fields need `to`, the referenced type"))?
                .to_string(),
        },
        _ => unreachable!("field type names are checked above"),
    };
    Ok(Field {
        name: name.to_string(),
        kind,
        required,
        required_unless,
        description,
    })
}

fn check_cross_references(types: &BTreeMap<String, EntityType>) -> Result<(), SchemaError> {
    for t in types.values() {
        for (f, to) in t.ref_fields() {
            if !types.contains_key(to) {
                return Err(invalid(
                    format!("type `{}`, field `{}`", t.name, f.name),
                    format!("`ref` to unknown type `{to}`"),
                ));
            }
        }
    }
    Ok(())
}

fn as_bool(v: &Value, loc: &str, key: &str) -> Result<bool, SchemaError> {
    v.as_bool()
        .ok_or_else(|| invalid(loc, format!("`{key}` must be true or false")))
}

fn as_string(v: &Value, loc: &str, key: &str) -> Result<String, SchemaError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| invalid(loc, format!("`{key}` must be a string")))
}

fn parse_roles(v: &Value, loc: &str, key: &str) -> Result<BTreeSet<Role>, SchemaError> {
    let arr = v
        .as_array()
        .ok_or_else(|| invalid(loc, format!("`{key}` must be an array of roles")))?;
    arr.iter()
        .map(|r| {
            let s = r
                .as_str()
                .ok_or_else(|| invalid(loc, format!("`{key}` must contain only role names")))?;
            Role::from_str(s).map_err(|m| invalid(loc, format!("in `{key}`: {m}")))
        })
        .collect()
}

fn opt_u64(t: &Table, loc: &str, key: &str) -> Result<Option<u64>, SchemaError> {
    t.get(key)
        .map(|v| {
            v.as_integer()
                .and_then(|i| u64::try_from(i).ok())
                .ok_or_else(|| invalid(loc, format!("`{key}` must be a non-negative integer")))
        })
        .transpose()
}

fn opt_i64(t: &Table, loc: &str, key: &str) -> Result<Option<i64>, SchemaError> {
    t.get(key)
        .map(|v| {
            v.as_integer()
                .ok_or_else(|| invalid(loc, format!("`{key}` must be an integer")))
        })
        .transpose()
}

fn opt_f64(t: &Table, loc: &str, key: &str) -> Result<Option<f64>, SchemaError> {
    t.get(key)
        .map(|v| {
            v.as_float()
                .or_else(|| v.as_integer().map(|i| i as f64))
                .filter(|f| f.is_finite())
                .ok_or_else(|| invalid(loc, format!("`{key}` must be a finite number")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schema_has_every_type_the_references_name_with_spec_policies() {
        let s = Schema::default_schema();
        let expect = [
            ("patient", Policy::Gated),
            ("session", Policy::Gated),
            ("set", Policy::Gated),
            ("assignment", Policy::Gated),
            ("intake_form", Policy::Gated),
            ("workout", Policy::Gated),
            ("progression", Policy::Gated),
            ("note", Policy::Notes),
            ("volume", Policy::Counter),
            ("profile", Policy::Lww),
            ("settings", Policy::Lww),
            ("recovery", Policy::Lww),
            ("journal_entry", Policy::Lww),
            ("activity", Policy::AppendOnly),
            ("checkin", Policy::AppendOnly),
            ("exercise", Policy::ServerOwned),
            ("vocab", Policy::ServerOwned),
            ("plan", Policy::ServerOwned),
            ("role", Policy::ServerOwned),
        ];
        for (name, policy) in expect {
            let t = s.entity_type(name).unwrap_or_else(|| panic!("missing type {name}"));
            assert_eq!(t.policy, policy, "policy of {name}");
        }
        assert_eq!(s.types().count(), expect.len());
        assert!(s.entity_type("intake_form").unwrap().lockable);
        assert!(s.entity_type("note").unwrap().signable);
    }

    #[test]
    fn default_schema_has_the_public_field_names_of_the_spec() {
        let s = Schema::default_schema();
        let expect: &[(&str, &[&str])] = &[
            ("patient", &["name", "date_of_birth"]),
            ("session", &["patient_id", "started_at", "status"]),
            (
                "set",
                &["session_id", "exercise_id", "exercise_name", "reps", "weight_kg", "rpe"],
            ),
            ("note", &["patient_id", "session_id", "body", "addendum_to"]),
            ("intake_form", &["patient_id", "answers", "locked"]),
            ("workout", &["name", "started_at", "notes"]),
            ("settings", &["units", "goal_race_date"]),
            ("profile", &["display_name"]),
            (
                "volume",
                &[
                    "week",
                    "chest_sets",
                    "back_sets",
                    "legs_sets",
                    "shoulders_sets",
                    "arms_sets",
                    "core_sets",
                ],
            ),
            ("checkin", &["date", "sleep_hours", "soreness", "recovery"]),
        ];
        for (ty, fields) in expect {
            let t = s.entity_type(ty).unwrap();
            for f in *fields {
                assert!(t.field(f).is_some(), "{ty}.{f} missing");
            }
        }
        let note_body = s.entity_type("note").unwrap().field("body").unwrap();
        assert!(matches!(note_body.kind, FieldKind::Text { .. }) && note_body.required);
        let vol = s.entity_type("volume").unwrap();
        assert_eq!(vol.counter_fields().count(), 6);
    }

    #[test]
    fn hash_ignores_layout_and_comments_but_not_content() {
        let a = Schema::from_toml_str(
            r#"
            [types.thing]
            policy = "gated"
            write = ["admin"]
            fields.a = { type = "string", required = true }
            fields.b = { type = "int", min = 0 }
            "#,
        )
        .unwrap();
        let b = Schema::from_toml_str(
            r#"
            # same schema, other order and layout
            [types.thing]
            write = ["admin"]
            policy = "gated"
            [types.thing.fields]
            b = { min = 0, type = "int" }
            a = { required = true, type = "string" }
            "#,
        )
        .unwrap();
        assert_eq!(a.hash(), b.hash());
        let c = Schema::from_toml_str(
            r#"
            [types.thing]
            policy = "gated"
            write = ["admin"]
            fields.a = { type = "string", required = true }
            fields.b = { type = "int", min = 1 }
            "#,
        )
        .unwrap();
        assert_ne!(a.hash(), c.hash());
    }

    #[test]
    fn hash_is_pinned_so_that_it_is_the_same_on_every_machine() {
        // A golden value: if this moves, devices and relays built from different commits or on
        // different machines would refuse each other. Change it only with the schema format.
        let s = Schema::from_toml_str(
            r#"
            [types.thing]
            policy = "lww"
            write = ["admin", "patient"]
            fields.a = { type = "string", required = true, max_length = 5 }
            fields.b = { type = "float", min = 0, max = 2.5 }
            fields.c = { type = "enum", values = ["x", "y"] }
            "#,
        )
        .unwrap();
        assert_eq!(
            s.hash().to_hex(),
            "78378f694545ac59c6c6220ed5aad6d9c76feda3db6a723378f14ece52fceb24"
        );
    }

    fn err(text: &str) -> String {
        Schema::from_toml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn malformed_schemas_name_the_type_and_field() {
        let e = err(r#"
            [types.set]
            policy = "gated"
            write = ["admin"]
            fields.reps = { type = "integer" }
        "#);
        assert!(
            e.contains("type `set`, field `reps`") && e.contains("unknown field type `integer`"),
            "{e}"
        );

        let e = err(r#"
            [types.set]
            policy = "gated"
            write = ["admin"]
            fields.reps = { type = "int", minn = 0 }
        "#);
        assert!(e.contains("type `set`, field `reps`") && e.contains("`minn`"), "{e}");

        let e = err(r#"
            [types.session]
            policy = "gated"
            write = ["admin"]
            fields.patient_id = { type = "ref", to = "patinet" }
        "#);
        assert!(
            e.contains("type `session`, field `patient_id`") && e.contains("patinet"),
            "{e}"
        );

        let e = err(r#"
            [types.set]
            policy = "gated"
            write = ["admin"]
            fields.exercise_name = { type = "string", required_unless = "exercise" }
        "#);
        assert!(e.contains("field `exercise_name`") && e.contains("`exercise`"), "{e}");

        let e = err(r#"
            [types.session]
            policy = "gatd"
            write = ["admin"]
        "#);
        assert!(
            e.contains("type `session`") && e.contains("unknown policy `gatd`"),
            "{e}"
        );

        let e = err(r#"
            [types.plan]
            policy = "server_owned"
            write = ["patient"]
        "#);
        assert!(e.contains("type `plan`") && e.contains("patient"), "{e}");

        let e = err(r#"
            [types.thing]
            policy = "gated"
            write = ["admin"]
            fields.status = { type = "enum", values = [] }
        "#);
        assert!(e.contains("field `status`") && e.contains("empty"), "{e}");

        let e = err(r#"
            [types.form]
            policy = "gated"
            write = ["admin"]
            lockable = true
        "#);
        assert!(e.contains("type `form`") && e.contains("locked"), "{e}");

        let e = err("this is = = not toml");
        assert!(e.contains("not valid TOML"), "{e}");

        let e = err(r#"
            [types.thing]
            policy = "gated"
            write = ["admin"]
            fields._secret = { type = "string" }
        "#);
        assert!(e.contains("field `_secret`") && e.contains("reserved"), "{e}");
    }

    #[test]
    fn loading_a_missing_file_names_it() {
        let e = Schema::load(Some(Path::new("/nonexistent/entities.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/entities.toml"));
    }
}
