//! The schemas a relay has served, and which of them its devices may still connect with.
//!
//! Devices update over days or weeks, so a relay keeps the text of every schema it served
//! (`served_schemas` in the directory). At start the new schema is compared with each
//! ([`fieldsync_schema::compat`]): devices on a version it stays compatible with keep syncing;
//! a breaking change stops the start unless the operator allows it, and then devices on the
//! versions it breaks are refused with a message that names their version, not a generic
//! schema mismatch.

use std::collections::BTreeMap;

use fieldsync_schema::compat::{self, CompatReport};
use fieldsync_schema::{Schema, SchemaHash};

use crate::store::{Directory, ServedSchema, StoreError, StoreResult};

/// What the relay accepts at connect, besides its current schema.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaAcceptance {
    /// Older schemas the current one is compatible with: their devices connect as usual.
    pub compatible: BTreeMap<SchemaHash, u64>,
    /// Older schemas the current one breaks (the operator allowed it): their devices are
    /// refused, told which version they hold and which the relay serves.
    pub retired: BTreeMap<SchemaHash, u64>,
}

/// The verdict on serving `current` to the devices of every schema in `history`.
#[derive(Debug, Clone)]
pub struct SchemaPlan {
    pub acceptance: SchemaAcceptance,
    /// One report per served schema the current one breaks.
    pub breaking: Vec<CompatReport>,
    /// The hashes (hex) of the schemas in `breaking`, to retire when the operator allows it.
    pub to_retire: Vec<String>,
}

impl SchemaPlan {
    /// Every breaking change, as lines for people (the refusal at start).
    pub fn describe_breaking(&self) -> String {
        self.breaking
            .iter()
            .flat_map(|r| {
                r.breaking()
                    .map(move |c| format!("v{} → v{}: {}: {}", r.from_version, r.to_version, c.location, c.change))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn hash_of(row: &ServedSchema) -> StoreResult<SchemaHash> {
    let bytes: [u8; 32] = hex::decode(&row.hash)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "served schema v{}: hash `{}` is malformed",
                row.version, row.hash
            ))
        })?;
    Ok(SchemaHash(bytes))
}

/// Compares `current` with every schema the relay served before.
pub fn plan(history: &[ServedSchema], current: &Schema) -> StoreResult<SchemaPlan> {
    let mut plan = SchemaPlan {
        acceptance: SchemaAcceptance::default(),
        breaking: Vec::new(),
        to_retire: Vec::new(),
    };
    for row in history {
        let hash = hash_of(row)?;
        if hash == current.hash() {
            continue;
        }
        if row.retired_ms.is_some() {
            // Broken on purpose before: refused, and not weighed again.
            plan.acceptance.retired.insert(hash, row.version);
            continue;
        }
        let old = Schema::from_toml_str(&row.toml)
            .map_err(|e| StoreError::Corrupt(format!("served schema v{} no longer parses: {e}", row.version)))?;
        let report = compat::compare(&old, current);
        if report.is_compatible() {
            plan.acceptance.compatible.insert(hash, row.version);
        } else {
            plan.acceptance.retired.insert(hash, row.version);
            plan.breaking.push(report);
            plan.to_retire.push(row.hash.clone());
        }
    }
    Ok(plan)
}

/// What starting on a schema came to.
#[derive(Debug, Clone)]
pub enum Adoption {
    /// The schema is served: devices on the plan's older versions connect (or are told why
    /// not). Its `breaking` is non-empty only when the operator allowed a breaking schema.
    Served(SchemaPlan),
    /// The schema breaks versions devices may hold and the operator did not allow it: nothing
    /// was recorded.
    Refused(SchemaPlan),
}

/// Starting on `current`: weighs it against every schema served before and every one in
/// `also_known` (versions devices may run that this relay never served: an app released while
/// the relay still ran an older version, then the relay upgraded past it), and — unless it
/// breaks one and `allow_breaking` is off — records the newly known ones, retires the versions
/// it breaks and records `current` as served. The server runs this at start, and the simulator
/// at every relay boot.
pub fn adopt(
    directory: &mut dyn Directory,
    current: &Schema,
    also_known: &[&Schema],
    allow_breaking: bool,
    now_ms: u64,
) -> StoreResult<Adoption> {
    let mut history = directory.served_schemas()?;
    let mut newly_known = Vec::new();
    for schema in also_known {
        let hash = schema.hash().to_hex();
        if schema.hash() != current.hash() && !history.iter().any(|h| h.hash == hash) {
            let row = served_row(schema, now_ms);
            history.push(row.clone());
            newly_known.push(row);
        }
    }
    let plan = plan(&history, current)?;
    if !plan.breaking.is_empty() && !allow_breaking {
        return Ok(Adoption::Refused(plan));
    }
    for row in &newly_known {
        directory.record_served_schema(row)?;
    }
    for hash in &plan.to_retire {
        directory.retire_served_schema(hash, now_ms)?;
    }
    record_served(directory, current, now_ms)?;
    Ok(Adoption::Served(plan))
}

fn served_row(schema: &Schema, now_ms: u64) -> ServedSchema {
    ServedSchema {
        hash: schema.hash().to_hex(),
        version: schema.version(),
        toml: schema.source_toml().to_string(),
        first_served_ms: now_ms,
        retired_ms: None,
    }
}

/// Records that the relay serves `current` (once per hash).
pub fn record_served(directory: &mut dyn Directory, current: &Schema, now_ms: u64) -> StoreResult<()> {
    directory.record_served_schema(&served_row(current, now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(version: u64, extra_field: &str) -> Schema {
        Schema::from_toml_str(&format!(
            "schema_version = {version}\n[types.patient]\npolicy = \"gated\"\nwrite = [\"clinician\"]\n\
             fields.name = {{ type = \"string\", max_length = 200 }}\n{extra_field}"
        ))
        .unwrap()
    }

    fn served(s: &Schema) -> ServedSchema {
        ServedSchema {
            hash: s.hash().to_hex(),
            version: s.version(),
            toml: s.source_toml().to_string(),
            first_served_ms: 1,
            retired_ms: None,
        }
    }

    #[test]
    fn compatible_versions_are_accepted_and_broken_ones_retired_with_their_reasons() {
        let v1 = schema(1, "");
        let v2 = schema(2, "fields.phone = { type = \"string\" }");
        let v3 = schema(3, "fields.phone = { type = \"int\" }");
        let plan = plan(&[served(&v1), served(&v2), served(&v3)], &v3).unwrap();
        assert_eq!(plan.acceptance.compatible, BTreeMap::from([(v1.hash(), 1)]));
        assert_eq!(plan.acceptance.retired, BTreeMap::from([(v2.hash(), 2)]));
        assert_eq!(plan.describe_breaking(), "v2 → v3: patient.phone: type string → int");
        assert_eq!(plan.to_retire, [v2.hash().to_hex()]);
    }

    #[test]
    fn a_schema_retired_on_purpose_is_refused_but_no_longer_stops_a_start() {
        let v2 = schema(2, "fields.phone = { type = \"string\" }");
        let v3 = schema(3, "fields.phone = { type = \"int\" }");
        let mut retired = served(&v2);
        retired.retired_ms = Some(5);
        let plan = plan(&[retired, served(&v3)], &v3).unwrap();
        assert!(plan.breaking.is_empty(), "{:?}", plan.breaking);
        assert_eq!(plan.acceptance.retired, BTreeMap::from([(v2.hash(), 2)]));
    }

    #[test]
    fn a_served_schema_whose_record_is_damaged_is_reported_not_ignored() {
        let v1 = schema(1, "");
        let mut row = served(&v1);
        row.toml = "not toml [".into();
        row.hash = hex::encode([7u8; 32]);
        assert!(matches!(plan(&[row], &v1), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn a_version_the_relay_never_served_is_accepted_once_the_operator_names_it() {
        use crate::store::Backend;
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::store::sqlite::SqliteBackend::open(dir.path(), uuid::Uuid::from_u128(9)).unwrap();
        let mut directory = backend.open_directory().unwrap();
        let v1 = schema(1, "");
        let v2 = schema(2, "fields.phone = { type = \"string\" }");
        let v3 = schema(
            3,
            "fields.phone = { type = \"string\" }\nfields.email = { type = \"string\" }",
        );
        assert!(matches!(
            adopt(&mut directory, &v1, &[], false, 1).unwrap(),
            Adoption::Served(_)
        ));
        // The relay skips v2 (apps shipped it while the relay still ran v1).
        let Adoption::Served(plan) = adopt(&mut directory, &v3, &[&v1, &v2], false, 2).unwrap() else {
            panic!("v3 is compatible with both");
        };
        assert_eq!(
            plan.acceptance.compatible,
            BTreeMap::from([(v1.hash(), 1), (v2.hash(), 2)])
        );
        let versions: Vec<u64> = directory.served_schemas().unwrap().iter().map(|s| s.version).collect();
        assert_eq!(versions, [1, 2, 3], "v2 is remembered for later starts");
        // A named version the current one breaks stops the start, and nothing is recorded.
        let v4 = schema(4, "fields.email = { type = \"string\" }");
        let v3b = schema(3, "fields.phone = { type = \"int\" }");
        assert!(matches!(
            adopt(&mut directory, &v4, &[&v3b], false, 3).unwrap(),
            Adoption::Refused(_)
        ));
        assert_eq!(directory.served_schemas().unwrap().len(), 3);
    }
}
