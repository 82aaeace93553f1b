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

/// Records that the relay serves `current` (once per hash).
pub fn record_served(directory: &mut dyn Directory, current: &Schema, now_ms: u64) -> StoreResult<()> {
    directory.record_served_schema(&ServedSchema {
        hash: current.hash().to_hex(),
        version: current.version(),
        toml: current.source_toml().to_string(),
        first_served_ms: now_ms,
        retired_ms: None,
    })
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
}
