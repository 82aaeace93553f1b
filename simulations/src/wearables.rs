//! The field-authority workload (SPEC §17, `--wearables`): the gym's service imports what the
//! watch measured into workouts people are editing, and imports runs people also log by hand;
//! people write how the run felt, correct a distance now and then, and merge or dismiss the
//! possible duplicates the relay flags. Its choices come from their own stream, so a run without
//! it is the run it always was.
//!
//! What must hold at the end (checked by [`World::check_authority`]): no change by one side
//! wrote a field the other owns; no workout holds concurrent values of a field (the service's
//! write over a person's provisional value was settled); every flagged duplicate was merged or
//! dismissed; a merged-away record's values are all in its survivor (unless a person resolved
//! a conflict on either since: the choice they made may drop a value).

use std::collections::BTreeMap;

use fieldsync_peer::Device;
use fieldsync_schema::document::{RootOps, actor_device};
use fieldsync_schema::registry::{Authority, DUPLICATE_OF, MERGED_INTO};
use fieldsync_schema::{Role, Schema};
use rand_chacha::ChaCha20Rng;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::checks::RelayDoc;
use crate::clock::MINUTE;
use crate::oracle::WriteRecord;
use crate::rng::Draw;
use crate::scenario::USERS;
use crate::workload::Action;
use crate::world::World;

const FEELINGS: [&str; 5] = ["great", "good", "ok", "tired", "bad"];

fn stamp(ms: u64) -> String {
    let s = fieldsync_schema::time_fmt::render_ms(ms);
    format!("{}Z", &s[..19])
}

/// The device's live workouts, the most recently touched first.
fn workouts(dev: &Device) -> Vec<Uuid> {
    let mut all = dev.list("workout", &[], false).unwrap_or_default();
    all.sort_by_key(|e| std::cmp::Reverse(e.updated_at_ms));
    all.into_iter().map(|e| e.entity_id).collect()
}

/// A workout to write to: most often one of the few touched last (the run that just ended,
/// which the watch and the person both write about — the race field authority settles).
fn pick_workout(rng: &mut ChaCha20Rng, existing: &[Uuid]) -> Option<Uuid> {
    let recent = &existing[..existing.len().min(3)];
    if rng.chance(0.6) {
        rng.pick(recent).copied()
    } else {
        rng.pick(existing).copied()
    }
}

/// What the watch measured.
fn measured(rng: &mut ChaCha20Rng) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("distance_m".into(), json!(rng.between(1_000, 21_000) as f64 + 0.5));
    m.insert("duration_min".into(), json!(rng.between(15, 120)));
    m.insert("avg_pace_s_per_km".into(), json!(rng.between(230, 420) as f64));
    m.insert("avg_hr".into(), json!(rng.between(110, 175)));
    m.insert("max_hr".into(), json!(rng.between(160, 200)));
    m.insert("source".into(), json!(if rng.chance(0.5) { "garmin" } else { "apple" }));
    m
}

/// The gym's action under the workload, or `None` to let the usual workload act this step.
pub fn action(rng: &mut ChaCha20Rng, dev: &Device, role: Role, n: u64, now: u64) -> Option<Action> {
    if !rng.chance(0.6) {
        return None;
    }
    let existing = workouts(dev);
    let started = stamp(now.saturating_sub(rng.between(0, 12) * MINUTE));
    if role == Role::Service {
        let mut fields = measured(rng);
        return Some(match pick_workout(rng, &existing) {
            // The watch synced a workout a person started in the app.
            Some(id) if rng.chance(0.45) => Action::Put {
                ty: "workout",
                id: Some(id),
                fields: Value::Object(fields),
            },
            // A run the watch recorded; the person may log it by hand too.
            _ => {
                fields.insert("name".into(), json!(format!("Watch run {n}")));
                fields.insert("activity_type".into(), json!("run"));
                fields.insert("started_at".into(), json!(started));
                Action::Put {
                    ty: "workout",
                    id: None,
                    fields: Value::Object(fields),
                }
            }
        });
    }
    let feeling = *rng.pick(&FEELINGS)?;
    Some(match rng.below(10) {
        0..=3 => Action::Put {
            ty: "workout",
            id: None,
            fields: json!({"name": format!("Run {n}"), "activity_type": "run", "started_at": started,
                "rpe": rng.between(3, 10), "feeling": feeling, "notes": format!("Logged by hand {n}"),
                "distance_m": rng.between(1_000, 21_000) as f64}),
        },
        4..=7 => Action::Put {
            ty: "workout",
            id: Some(pick_workout(rng, &existing)?),
            fields: json!({"rpe": rng.between(1, 10), "feeling": feeling, "notes": format!("How it felt {n}")}),
        },
        // A person's provisional correction: it stands until the watch's value arrives.
        _ => Action::Put {
            ty: "workout",
            id: Some(pick_workout(rng, &existing)?),
            fields: json!({"distance_m": rng.between(1_000, 21_000) as f64, "duration_min": rng.between(15, 120)}),
        },
    })
}

impl World {
    /// A person settles the possible duplicates their device shows: merges most, keeps both
    /// for the rest (and when a merge is refused, e.g. two watch imports whose measurements a
    /// person may not copy).
    pub(crate) fn settle_duplicates(&mut self, i: usize) {
        let now = self.now();
        let Some(dev) = self.devices[i].dev.as_mut() else {
            return;
        };
        let Ok(found) = dev.possible_duplicates() else { return };
        let mut written = Vec::new();
        let mut notes = Vec::new();
        for d in found {
            let merged = if self.rng.wearables.chance(0.7) {
                match dev.merge_duplicate(d.entity_id) {
                    Ok(report) => {
                        notes.push(format!("merged {} into {}", report.merged, report.survivor));
                        written.extend(report.survivor_write);
                        written.push(report.tombstone_write);
                        self.stats.duplicates_merged += 1;
                        true
                    }
                    Err(e) => {
                        notes.push(format!("merge of {} refused: {e}", d.entity_id));
                        false
                    }
                }
            } else {
                false
            };
            if !merged {
                match dev.dismiss_duplicate(d.entity_id) {
                    Ok(r) => {
                        notes.push(format!("kept both {} and {}", d.entity_id, d.duplicate_of));
                        written.push(r);
                        self.stats.duplicates_dismissed += 1;
                    }
                    Err(e) => notes.push(format!("dismissal of {} failed: {e}", d.entity_id)),
                }
            }
        }
        for note in notes {
            self.trace.record(now, &format!("dev{i} user: {note}"));
        }
        for r in written {
            self.oracle.writes.extend(WriteRecord::of(i, &r, Vec::new()));
        }
    }

    /// Whether device `i`, whose status is `status`, belongs to a person with possible
    /// duplicates to settle.
    pub(crate) fn has_open_duplicates(&self, i: usize, status: &fieldsync_peer::Status) -> bool {
        self.opts.wearables && USERS[self.devices[i].user].role != Role::Service && status.possible_duplicates > 0
    }

    /// The workload's invariants, on the relay's documents after healing and draining.
    pub(crate) fn check_authority(&mut self, docs: &mut BTreeMap<Uuid, RelayDoc>) {
        let schema = Schema::default_schema();
        let roles: BTreeMap<Uuid, Role> = self
            .devices
            .iter()
            .filter_map(|d| Some((d.dev.as_ref()?.device_id(), USERS[d.user].role)))
            .collect();
        let mut problems = Vec::new();
        let live: BTreeMap<Uuid, bool> = docs.iter().map(|(id, d)| (*id, !d.doc.is_deleted())).collect();
        for (id, rd) in docs.iter_mut() {
            let Some(ty) = schema.entity_type(&rd.entity_type).filter(|t| t.has_authority()) else {
                continue;
            };
            self.stats.invariant_checks += 1;
            // No change by one side wrote a field the other side owns.
            for change in rd.doc.all_changes() {
                let Some(role) = actor_device(change.actor_id()).and_then(|d| roles.get(&d).copied()) else {
                    continue; // the relay's own (settlements, flags), or a device that never booted
                };
                let Some(class) = Authority::of_role(role) else {
                    continue;
                };
                let Ok(ops) = RootOps::of(std::slice::from_ref(&change)) else {
                    continue;
                };
                for key in ops.puts.iter().chain(ops.makes.keys()) {
                    let Some(field) = ty.field(key) else { continue };
                    let owner = ty.owner_of(key);
                    let allowed = class.may_write(owner, field.provisional) || key == MERGED_INTO;
                    if !allowed || key == DUPLICATE_OF {
                        problems.push((
                            "authority",
                            format!("a {role} device wrote `{key}` ({owner}'s) in change {}", change.hash()),
                            *id,
                        ));
                    }
                }
            }
            // Every merge decided whose value stands: no field left holding differing concurrent
            // values (two devices merging one record into the same survivor agree).
            let heads = rd.doc.heads();
            for field in ty.fields.keys() {
                if rd.doc.has_differing_values(field) {
                    problems.push((
                        "authority",
                        format!(
                            "{} `{field}` holds concurrent values {:?}: a merge left it to Automerge's tie-break",
                            rd.entity_type,
                            rd.doc.values_at(field, &heads)
                        ),
                        *id,
                    ));
                }
            }
            let fields = rd.doc.fields();
            let target = |key: &str| {
                fields
                    .get(key)
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<Uuid>().ok())
            };
            if rd.doc.is_deleted() {
                continue;
            }
            // Every flagged duplicate was merged or dismissed.
            if let Some(other) = target(DUPLICATE_OF)
                && live.get(&other).copied().unwrap_or(false)
            {
                problems.push((
                    "duplicates_settled",
                    format!("flagged as a possible duplicate of {other}, never merged or dismissed"),
                    *id,
                ));
            }
        }
        // A merged-away record's values are all in the live record its chain of merges ends at.
        let snapshot: BTreeMap<Uuid, (bool, serde_json::Map<String, Value>)> = docs
            .iter()
            .map(|(id, d)| (*id, (d.doc.is_deleted(), d.doc.fields())))
            .collect();
        for (id, (deleted, fields)) in &snapshot {
            let merged_into = fields
                .get(MERGED_INTO)
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<Uuid>().ok());
            let (true, Some(mut survivor)) = (*deleted, merged_into) else {
                continue;
            };
            self.stats.invariant_checks += 1;
            let mut hops = 0;
            while let Some((true, f)) = snapshot.get(&survivor) {
                match f.get(MERGED_INTO).and_then(Value::as_str).and_then(|s| s.parse().ok()) {
                    Some(next) if hops < 64 => {
                        survivor = next;
                        hops += 1;
                    }
                    _ => break,
                }
            }
            if self.oracle.resolved.contains(&survivor) || self.oracle.resolved.contains(id) {
                // A person resolved a conflict on the survivor, or an edit that met the merge's
                // tombstone (delete versus edit): the choice they made may drop a value.
                continue;
            }
            let Some((false, kept)) = snapshot.get(&survivor) else {
                problems.push((
                    "no_value_lost",
                    format!("merged into {survivor}, which is not a live record"),
                    *id,
                ));
                continue;
            };
            for (key, value) in fields {
                if key == MERGED_INTO || key == DUPLICATE_OF || value.is_null() {
                    continue;
                }
                if kept.get(key).is_none_or(Value::is_null) {
                    problems.push((
                        "no_value_lost",
                        format!("merged into {survivor}, which lost `{key}` = {value}"),
                        *id,
                    ));
                }
            }
        }
        for (inv, detail, id) in problems {
            self.fail(inv, detail, Some(id));
        }
    }
}
