//! The schema-upgrade workload (issue 18): apps update over days, so a fleet runs mixed
//! schema versions. The relay moves v1 → v2 → v3 at random steps of the run's first half;
//! each device updates its app at random steps to a random final version (about a third stay
//! on v1, some update before the relay does and wait for it). Upgraded devices write what only
//! their version has; older devices keep editing the same records under the names they know.
//!
//! The ladder, on top of the default schema:
//! - v2: `patient.preferred_name` and `workout.location` (new optional fields), `session.status`
//!   gains `no_show` (a new enum value);
//! - v3: `patient.mrn` renamed to `record_number` (`renamed_from`), `session.room` a new
//!   required field with a default.
//!
//! What must hold besides every other invariant: a value written to a tracked field is never
//! lost — the relay's record holds one of the values written to it, whichever version wrote
//! it and whichever versions edited the record since — and a renamed field's names never
//! disagree on the relay ([`World::check_no_field_lost`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use fieldsync_schema::Schema;
use rand_chacha::ChaCha20Rng;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::checks::RelayDoc;
use crate::clock::{MINUTE, SECOND};
use crate::rng::{Draw, stream};
use crate::workload::Action;
use crate::world::{Event, World};

/// The fields whose values are followed through the run: (type, name in the newest version).
pub const TRACKED: [(&str, &str); 3] = [
    ("patient", "preferred_name"),
    ("patient", "record_number"),
    ("workout", "location"),
];

/// The schemas of the run, oldest first; a level is an index into it.
pub fn ladder() -> anyhow::Result<Vec<Arc<Schema>>> {
    let v1 = Schema::default_schema();
    let edit = |text: &str, from: &str, to: &str| -> anyhow::Result<String> {
        anyhow::ensure!(text.contains(from), "the default schema no longer has `{from}`");
        Ok(text.replacen(from, to, 1))
    };
    let mut v2 = edit(v1.source_toml(), "schema_version = 1", "schema_version = 2")?;
    v2 = edit(
        &v2,
        "fields.phone = { type = \"string\", max_length = 40 }",
        "fields.phone = { type = \"string\", max_length = 40 }\n\
         fields.preferred_name = { type = \"string\", max_length = 100 }",
    )?;
    v2 = edit(
        &v2,
        "\"completed\", \"cancelled\"]",
        "\"completed\", \"cancelled\", \"no_show\"]",
    )?;
    v2 = edit(
        &v2,
        "[types.workout]\n",
        "[types.workout]\nfields.location = { type = \"string\", max_length = 100 }\n",
    )?;
    let mut v3 = edit(&v2, "schema_version = 2", "schema_version = 3")?;
    v3 = edit(
        &v3,
        "fields.mrn = { type = \"string\", max_length = 64, description = \"Medical record number\" }",
        "fields.record_number = { type = \"string\", max_length = 64, renamed_from = \"mrn\" }",
    )?;
    v3 = edit(
        &v3,
        "fields.location = { type = \"string\", max_length = 200 }",
        "fields.location = { type = \"string\", max_length = 200 }\n\
         fields.room = { type = \"string\", max_length = 40, required = true, default = \"main\" }",
    )?;
    Ok(vec![
        Arc::new(v1),
        Arc::new(Schema::from_toml_str(&v2)?),
        Arc::new(Schema::from_toml_str(&v3)?),
    ])
}

/// When the relay and each device move up a level, in workload steps (a run's simulated
/// length is not known in advance; its number of steps is).
#[derive(Debug, Clone, Default)]
pub struct UpgradePlan {
    /// The step at which the relay moves to level `k + 1`, ascending.
    pub relay_at: Vec<u64>,
    /// Per device, the steps at which it moves up one level, ascending.
    pub device_at: Vec<Vec<u64>>,
}

impl UpgradePlan {
    pub fn draw(seed: u64, devices: usize, steps: u64, levels: usize) -> UpgradePlan {
        let mut rng = stream(seed, "upgrades/plan");
        let top = levels.saturating_sub(1) as u64;
        let mut relay_at: Vec<u64> = (0..top)
            .map(|_| rng.between(steps / 10, (6 * steps / 10).max(steps / 10 + 1)))
            .collect();
        relay_at.sort_unstable();
        let device_at = (0..devices)
            .map(|_| {
                let target = rng.below(top + 1);
                let mut at: Vec<u64> = (0..target).map(|_| rng.between(1, steps.max(2))).collect();
                at.sort_unstable();
                at
            })
            .collect();
        UpgradePlan { relay_at, device_at }
    }
}

/// A field name of `ty` as `schema` calls it: the name itself, or the newer name a rename gave
/// it, or the older name a rename in `top` (the newest version) replaced (`None`: that version
/// has no such field).
fn name_in(top: &Schema, schema: &Schema, ty: &str, name: &str) -> Option<String> {
    let t = schema.entity_type(ty)?;
    if t.field(name).is_some() {
        return Some(name.to_string());
    }
    if let Some(f) = t.renamed_field(name) {
        return Some(f.name.clone());
    }
    let renamed = top.entity_type(ty)?.field(name)?;
    renamed.renamed_from.iter().find(|old| t.field(old).is_some()).cloned()
}

impl World {
    /// Moves the relay and devices whose upgrade step has come.
    pub fn upgrades_due(&mut self, step: u64) {
        while self.upgrades.relay_at.first().is_some_and(|s| *s <= step) {
            self.upgrades.relay_at.remove(0);
            self.relay_upgrade();
        }
        for i in 0..self.devices.len() {
            while self.upgrades.device_at[i].first().is_some_and(|s| *s <= step) {
                self.upgrades.device_at[i].remove(0);
                self.device_upgrade(i);
            }
        }
    }

    /// The operator deploys the next schema: the relay restarts on it — with several, one
    /// after the other (a rolling upgrade: for a while relays of two versions share the store).
    fn relay_upgrade(&mut self) {
        self.relay_level = (self.relay_level + 1).min(self.schemas.len() - 1);
        self.stats.relay_upgrades += 1;
        self.relay_upgrade_one(0);
        for r in 1..self.relays.len() {
            let delay = self.rng.upgrades.between(SECOND, 10 * MINUTE) * r as u64;
            self.schedule_in(delay, Event::RelayUpgrade(r));
        }
    }

    /// The user updates the app on device `i`: it restarts on the next schema.
    fn device_upgrade(&mut self, i: usize) {
        let level = (self.devices[i].level + 1).min(self.schemas.len() - 1);
        self.devices[i].level = level;
        self.stats.device_upgrades += 1;
        let now = self.now();
        self.trace
            .record(now, &format!("dev{i} upgrade to v{}", self.schemas[level].version()));
        if self.device_stop(i, "app updated") {
            let delay = self.rng.upgrades.between(SECOND, 10 * MINUTE);
            self.schedule_in(delay, Event::DeviceRestart(i));
        }
    }

    /// What a user of device `i` does with `action` on their app version: field names as the
    /// version calls them, and now and then a value only newer versions have.
    pub fn adapt_to_version(&mut self, i: usize, action: Action, n: u64) -> Action {
        let schema = self.schemas[self.devices[i].level].clone();
        let Some(top) = self.schemas.last().cloned() else {
            return action;
        };
        let Action::Put { ty, id, fields } = action else {
            return action;
        };
        let rng: &mut ChaCha20Rng = &mut self.rng.upgrades;
        let mut out = Map::new();
        for (k, v) in fields.as_object().cloned().unwrap_or_default() {
            if let Some(name) = name_in(&top, &schema, ty, &k) {
                out.insert(name, v);
            }
        }
        let knows = |field: &str| schema.entity_type(ty).is_some_and(|t| t.field(field).is_some());
        if id.is_some() && knows("preferred_name") && rng.chance(0.5) {
            out.insert("preferred_name".into(), Value::String(format!("Pref {n}")));
        }
        if id.is_some() && knows("location") && ty == "workout" && rng.chance(0.5) {
            out.insert("location".into(), Value::String(format!("Gym {n}")));
        }
        let no_show = schema
            .entity_type("session")
            .and_then(|t| t.field("status"))
            .is_some_and(|f| matches!(&f.kind, fieldsync_schema::FieldKind::Enum { values } if values.iter().any(|v| v == "no_show")));
        if ty == "session" && out.contains_key("status") && no_show && rng.chance(0.25) {
            out.insert("status".into(), Value::String("no_show".into()));
        }
        Action::Put {
            ty,
            id,
            fields: Value::Object(out),
        }
    }

    /// Notes the values a local write gave the tracked fields (by their newest name).
    pub fn track_field_values(&mut self, entity_id: Uuid, ty: &str, action: &Action, mutation_id: Uuid) {
        let Action::Put { fields, .. } = action else { return };
        let Some(top) = self.schemas.last().cloned() else {
            return;
        };
        for (k, v) in fields.as_object().into_iter().flatten() {
            let Some(name) = name_in(&top, &top, ty, k) else {
                continue;
            };
            if TRACKED.contains(&(ty, name.as_str())) {
                let v1_knows = name_in(&top, &self.schemas[0], ty, &name).is_some();
                self.stats.newer_field_writes += u64::from(!v1_knows);
                self.oracle
                    .field_values
                    .entry((entity_id, name))
                    .or_default()
                    .push((v.clone(), mutation_id));
            }
        }
    }

    /// No value written to a tracked field is lost, and a renamed field's names agree: once a
    /// write of the field was applied, the relay's record holds one of the values written to
    /// it — unless a user resolved a conflict on the record (choosing a side may drop it; the
    /// prompt showed it), and then it holds a written value or none, never another.
    pub fn check_no_field_lost(&mut self, docs: &mut BTreeMap<Uuid, RelayDoc>) {
        let Some(top) = self.schemas.last().cloned() else {
            return;
        };
        let tracked = std::mem::take(&mut self.oracle.field_values);
        let mut problems = Vec::new();
        for ((id, field), writes) in &tracked {
            let Some(rd) = docs.get_mut(id) else { continue };
            self.stats.invariant_checks += 1;
            let applied = writes.iter().any(|(_, m)| self.oracle.applied.contains_key(m));
            let resolved = self.oracle.resolved.contains(id);
            let Some(ty) = top.entity_type(&rd.entity_type) else {
                continue;
            };
            let stored = rd.doc.fields();
            let view = ty.view(stored.clone());
            let holds = view.get(field);
            let written = |v: &Value| writes.iter().any(|(w, _)| w == v);
            let lost = match holds {
                Some(v) => !written(v),
                None => applied && !resolved,
            };
            if lost {
                problems.push((
                    "field_lost",
                    format!(
                        "{}.{field} holds {holds:?} on the relay; written: {:?}",
                        rd.entity_type,
                        writes.iter().map(|(v, _)| v).collect::<Vec<_>>()
                    ),
                    *id,
                ));
            }
            let old_names = ty.field(field).map(|f| f.renamed_from.as_slice()).unwrap_or_default();
            for old in old_names {
                let (Some(a), Some(b)) = (stored.get(old), stored.get(field.as_str())) else {
                    continue;
                };
                if a == b {
                    continue;
                }
                problems.push((
                    "rename_diverged",
                    format!(
                        "{}.{field} is {b} on the relay but its old name `{old}` holds {a}",
                        rd.entity_type
                    ),
                    *id,
                ));
            }
        }
        self.oracle.field_values = tracked;
        for (inv, detail, id) in problems {
            self.fail(inv, detail, Some(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use fieldsync_schema::compat;

    use super::*;

    #[test]
    fn each_step_of_the_ladder_is_compatible_and_declares_what_the_workload_writes() {
        let ladder = ladder().unwrap();
        assert_eq!(ladder.iter().map(|s| s.version()).collect::<Vec<_>>(), vec![1, 2, 3]);
        for pair in ladder.windows(2) {
            let report = compat::compare(&pair[0], &pair[1]);
            assert!(report.is_compatible(), "{}", report.render());
        }
        let v3 = &ladder[2];
        for (ty, field) in TRACKED {
            assert!(
                v3.entity_type(ty).and_then(|t| t.field(field)).is_some(),
                "{ty}.{field}"
            );
        }
        let top = &ladder[2];
        assert_eq!(
            name_in(top, &ladder[0], "patient", "record_number").as_deref(),
            Some("mrn")
        );
        assert_eq!(name_in(top, top, "patient", "mrn").as_deref(), Some("record_number"));
        assert_eq!(name_in(top, &ladder[0], "patient", "preferred_name"), None);
    }

    #[test]
    fn a_plan_moves_the_relay_in_the_first_half_and_devices_anywhere() {
        let plan = UpgradePlan::draw(7, 12, 300, 3);
        assert_eq!(plan.relay_at.len(), 2);
        assert!(plan.relay_at.iter().all(|s| (30..=180).contains(s)), "{plan:?}");
        assert!(plan.relay_at.windows(2).all(|w| w[0] <= w[1]));
        assert!(
            plan.device_at
                .iter()
                .all(|a| a.len() <= 2 && a.iter().all(|s| (1..300).contains(s)))
        );
        let finals: std::collections::BTreeSet<usize> = (0..200)
            .flat_map(|seed| UpgradePlan::draw(seed, 6, 300, 3).device_at)
            .map(|a| a.len())
            .collect();
        assert_eq!(finals, [0, 1, 2].into_iter().collect(), "devices end on every version");
    }
}
