//! What the simulated users do (the reference applications' days): therapists creating
//! sessions with sets and notes, signing notes and locking intake forms; an athlete logging
//! check-ins, workouts and volume on a phone and a tablet; a coach editing the athlete's
//! workouts; a planning service writing plans. A few records are hot (edited by everyone).

use std::sync::LazyLock;

use fieldsync_peer::sync::SyncInput;
use fieldsync_peer::{Device, WriteReceipt};
use fieldsync_schema::{FieldKind, MutationKind, Role, Schema};
use rand_chacha::ChaCha20Rng;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::clock::MINUTE;
use crate::oracle::WriteRecord;
use crate::rng::Draw;
use crate::scenario::USERS;
use crate::world::{Event, World};

/// One user action.
#[derive(Debug, Clone)]
pub enum Action {
    Put {
        ty: &'static str,
        id: Option<Uuid>,
        fields: Value,
    },
    Delete {
        ty: &'static str,
        id: Uuid,
    },
    EditNote {
        id: Uuid,
        text: String,
    },
    Sign {
        id: Uuid,
    },
    Lock {
        ty: &'static str,
        id: Uuid,
    },
    Incr {
        ty: &'static str,
        id: Uuid,
        field: &'static str,
        by: i64,
    },
}

/// A per-user record every device of the user writes (LWW profile and settings).
fn well_known_id(user: &str, what: &str) -> Uuid {
    let h: [u8; 32] = Sha256::digest(format!("fieldsync-sim/{user}/{what}").as_bytes()).into();
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

fn ids(dev: &Device, ty: &str) -> Vec<Uuid> {
    dev.list(ty, &[], false)
        .map(|v| v.into_iter().map(|e| e.entity_id).collect())
        .unwrap_or_default()
}

/// Hot records: a couple of records (the lowest ids, the same on every device) get a share
/// `hot_skew` of the edits (70 % unless a swarm shape says otherwise), from every device that
/// has them.
fn pick_hot(rng: &mut ChaCha20Rng, hot_skew: f64, items: &[Uuid]) -> Option<Uuid> {
    if items.is_empty() {
        return None;
    }
    if rng.chance(hot_skew) {
        let hot = items.len().min(2);
        return rng.pick(&items[..hot]).copied();
    }
    rng.pick(items).copied()
}

/// The schema the workload writes against: field names and values come from it, not from a
/// copy that could drift.
static SCHEMA: LazyLock<Schema> = LazyLock::new(Schema::default_schema);

/// The counters of a `volume` (muscle groups).
fn muscles() -> Vec<&'static str> {
    SCHEMA
        .entity_type("volume")
        .map(|t| t.counter_fields().map(|f| f.name.as_str()).collect())
        .unwrap_or_default()
}

/// The values of a session's `status`.
fn statuses() -> Vec<&'static str> {
    match SCHEMA
        .entity_type("session")
        .and_then(|t| t.field("status"))
        .map(|f| &f.kind)
    {
        Some(FieldKind::Enum { values }) => values.iter().map(String::as_str).collect(),
        _ => Vec::new(),
    }
}
const EXERCISES: [&str; 5] = ["Squat", "Lunge", "Bridge", "Plank", "Row"];

fn date(now_ms: u64) -> String {
    fieldsync_schema::time_fmt::render_ms(now_ms)[..10].to_string()
}

fn stamp(now_ms: u64) -> String {
    let s = fieldsync_schema::time_fmt::render_ms(now_ms);
    format!("{}Z", &s[..19])
}

fn clinic_action(rng: &mut ChaCha20Rng, hot_skew: f64, dev: &Device, role: Role, n: u64, now: u64) -> Option<Action> {
    let patients = ids(dev, "patient");
    let sessions = ids(dev, "session");
    let notes = ids(dev, "note");
    let forms = ids(dev, "intake_form");
    let sets = ids(dev, "set");
    let roll = rng.below(100);
    let action = match roll {
        0..=7 => Action::Put {
            ty: "patient",
            id: None,
            fields: json!({"name": format!("Patient {n}"), "date_of_birth": "1980-05-17"}),
        },
        8..=19 => Action::Put {
            ty: "session",
            id: None,
            fields: json!({"patient_id": rng.pick(&patients)?.to_string(), "started_at": stamp(now), "status": "planned"}),
        },
        20..=31 => Action::Put {
            ty: "set",
            id: None,
            fields: json!({"session_id": pick_hot(rng, hot_skew, &sessions)?.to_string(), "exercise_name": rng.pick(&EXERCISES)?,
                "reps": rng.between(1, 15), "weight_kg": rng.between(0, 80) as f64 / 2.0, "rpe": rng.between(1, 10)}),
        },
        32..=49 => Action::Put {
            ty: "session",
            id: Some(pick_hot(rng, hot_skew, &sessions)?),
            fields: json!({"status": rng.pick(&statuses())?, "pain_after": rng.below(11)}),
        },
        50..=57 => Action::Put {
            ty: "note",
            id: None,
            fields: json!({"patient_id": rng.pick(&patients)?.to_string(), "body": format!("Note {n}: knee flexion improving.")}),
        },
        58..=69 => {
            let id = pick_hot(rng, hot_skew, &notes)?;
            let body = dev.get(id).ok()??.fields.get("body")?.as_str()?.to_string();
            let chars: Vec<char> = body.chars().collect();
            let at = rng.below(chars.len() as u64 + 1) as usize;
            let mut text: String = chars[..at].iter().collect();
            text.push_str(&format!(" [edit {n}]"));
            text.extend(&chars[at..]);
            Action::EditNote { id, text }
        }
        70..=73 if role == Role::Clinician => Action::Sign { id: *rng.pick(&notes)? },
        70..=74 => Action::Put {
            ty: "intake_form",
            id: None,
            fields: json!({"patient_id": rng.pick(&patients)?.to_string(), "answers": format!("Answers v{n}")}),
        },
        75..=78 => Action::Put {
            ty: "intake_form",
            id: Some(pick_hot(rng, hot_skew, &forms)?),
            fields: json!({"answers": format!("Answers v{n}")}),
        },
        79..=81 => Action::Lock {
            ty: "intake_form",
            id: *rng.pick(&forms)?,
        },
        82..=84 => Action::Delete {
            ty: "session",
            id: pick_hot(rng, hot_skew, &sessions)?,
        },
        85..=92 => Action::Put {
            ty: "patient",
            id: Some(pick_hot(rng, hot_skew, &patients)?),
            fields: json!({"mrn": format!("M-{n}")}),
        },
        _ => Action::Put {
            ty: "set",
            id: Some(*rng.pick(&sets)?),
            fields: json!({"reps": rng.between(1, 20)}),
        },
    };
    Some(action)
}

fn gym_action(
    rng: &mut ChaCha20Rng,
    hot_skew: f64,
    dev: &Device,
    user: &str,
    role: Role,
    n: u64,
    now: u64,
) -> Option<Action> {
    let workouts = ids(dev, "workout");
    let volumes = ids(dev, "volume");
    let checkins = ids(dev, "checkin");
    let plans = ids(dev, "plan");
    let roll = rng.below(100);
    if role == Role::Service {
        return Some(match roll {
            0..=49 => Action::Put {
                ty: "plan",
                id: None,
                fields: json!({"name": format!("Block {n}"), "week_start": date(now)}),
            },
            50..=79 => Action::Put {
                ty: "plan",
                id: Some(*rng.pick(&plans)?),
                fields: json!({"details": format!("Adapted {n}")}),
            },
            _ => Action::Put {
                ty: "exercise",
                id: None,
                fields: json!({"name": format!("Exercise {n}"), "muscle_group": "legs"}),
            },
        });
    }
    if role == Role::Clinician {
        return Some(match roll {
            0..=39 => Action::Put {
                ty: "workout",
                id: Some(pick_hot(rng, hot_skew, &workouts)?),
                fields: json!({"notes": format!("Coach note {n}"), "rpe": rng.between(1, 10)}),
            },
            40..=59 => Action::Put {
                ty: "progression",
                id: None,
                fields: json!({"exercise_name": rng.pick(&EXERCISES)?, "target_reps": rng.between(3, 12)}),
            },
            60..=79 => Action::Incr {
                ty: "volume",
                id: *rng.pick(&volumes)?,
                field: rng.pick(&muscles())?,
                by: rng.between(1, 4) as i64,
            },
            _ => Action::Put {
                ty: "workout",
                id: None,
                fields: json!({"name": format!("Session {n}"), "started_at": stamp(now)}),
            },
        });
    }
    Some(match roll {
        0..=19 => Action::Put {
            ty: "checkin",
            id: None,
            fields: json!({"date": date(now), "sleep_hours": rng.between(4, 9), "soreness": rng.below(11), "recovery": rng.below(11)}),
        },
        20..=31 => Action::Put {
            ty: "profile",
            id: Some(well_known_id(user, "profile")),
            fields: json!({"display_name": format!("Pat {n}")}),
        },
        32..=43 => Action::Put {
            ty: "settings",
            id: Some(well_known_id(user, "settings")),
            fields: json!({"units": if rng.chance(0.5) { "kg" } else { "lb" }, "notifications": rng.chance(0.5)}),
        },
        44..=58 => match rng.pick(&volumes) {
            Some(id) if rng.chance(0.85) => Action::Incr {
                ty: "volume",
                id: *id,
                field: rng.pick(&muscles())?,
                by: rng.between(1, 5) as i64,
            },
            _ => Action::Put {
                ty: "volume",
                id: None,
                fields: json!({"week": date(now), "legs_sets": 0, "chest_sets": 0}),
            },
        },
        59..=68 => Action::Put {
            ty: "workout",
            id: None,
            fields: json!({"name": format!("Workout {n}"), "started_at": stamp(now)}),
        },
        69..=80 => Action::Put {
            ty: "workout",
            id: Some(pick_hot(rng, hot_skew, &workouts)?),
            fields: json!({"notes": format!("Felt good {n}"), "duration_min": rng.between(20, 90)}),
        },
        81..=89 => Action::Put {
            ty: "journal_entry",
            id: Some(well_known_id(user, &format!("journal/{}", date(now)))),
            fields: json!({"date": date(now), "pain_level": rng.below(11), "body": format!("Day {n}")}),
        },
        90..=94 => Action::Put {
            ty: "recovery",
            id: Some(well_known_id(user, &format!("recovery/{}", date(now)))),
            fields: json!({"date": date(now), "score": rng.below(101)}),
        },
        _ => Action::Delete {
            ty: "checkin",
            id: *rng.pick(&checkins)?,
        },
    })
}

fn perform(dev: &mut Device, action: &Action) -> fieldsync_peer::Result<WriteReceipt> {
    match action {
        Action::Put { ty, id, fields } => {
            let map: Map<String, Value> = fields.as_object().cloned().unwrap_or_default();
            dev.put(ty, *id, map)
        }
        Action::Delete { ty, id } => dev.delete(ty, *id),
        Action::EditNote { id, text } => dev.edit_note(*id, text),
        Action::Sign { id } => dev.sign_note(*id),
        Action::Lock { ty, id } => dev.lock(ty, *id),
        Action::Incr { ty, id, field, by } => dev.increment(ty, *id, field, *by),
    }
}

fn counter_effect(action: &Action, kind: MutationKind) -> Vec<(String, i64)> {
    match action {
        Action::Incr { field, by, .. } => vec![(field.to_string(), *by)],
        Action::Put {
            ty: "volume", fields, ..
        } if kind == MutationKind::Create => fields
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.ends_with("_sets"))
                    .filter_map(|(k, v)| v.as_i64().map(|n| (k.clone(), n)))
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

impl World {
    pub fn workload_step(&mut self) {
        self.stats.steps += 1;
        let step = self.stats.steps;
        let alive: Vec<usize> = (0..self.devices.len())
            .filter(|i| self.devices[*i].dev.is_some())
            .collect();
        if let Some(&i) = self.rng.workload.pick(&alive) {
            self.user_acts(i, step);
        }
        if self.opts.upgrades {
            self.upgrades_due(step);
        }
        if self.stats.steps < self.opts.steps {
            // Users act every few minutes on average (a few hundred steps span days), and now
            // and then several act within seconds of each other (a busy moment at the clinic).
            let gap = if self.rng.workload.chance(self.opts.shape.burst) {
                self.rng.workload.between(100, 5_000)
            } else {
                self.rng.workload.between(MINUTE, 40 * MINUTE)
            };
            self.schedule_in(gap, Event::Workload);
        }
    }

    fn user_acts(&mut self, i: usize, n: u64) {
        let user = &USERS[self.devices[i].user];
        let (role, name, space) = (user.role, user.name, user.space);
        let hot_skew = self.opts.shape.hot_skew;
        let d = &mut self.devices[i];
        let device_now = d.device_now();
        let Some(dev) = d.dev.as_mut() else { return };
        let wearable = if self.opts.wearables && space == "gym" {
            crate::wearables::action(&mut self.rng.wearables, dev, role, n, device_now)
        } else {
            None
        };
        if wearable.is_some() && role == Role::Service {
            self.stats.imports += 1;
        }
        let action = if wearable.is_some() {
            wearable
        } else if space == "clinic" {
            clinic_action(&mut self.rng.workload, hot_skew, dev, role, n, device_now)
        } else {
            gym_action(&mut self.rng.workload, hot_skew, dev, name, role, n, device_now)
        };
        let Some(mut action) = action else {
            self.stats.idle_steps += 1;
            return;
        };
        if self.opts.upgrades {
            action = self.adapt_to_version(i, action, n);
        }
        let Some(dev) = self.devices[i].dev.as_mut() else {
            return;
        };
        let result = perform(dev, &action);
        let now = self.now();
        match result {
            Ok(r) => {
                self.stats.local_writes += 1;
                let line = format!(
                    "dev{i} {:?} {} {} -> {:?}",
                    r.kind, r.entity_type, r.entity_id, r.mutation_id
                );
                self.trace.record(now, &line);
                if self.opts.upgrades
                    && let Some(mid) = r.mutation_id
                {
                    self.track_field_values(r.entity_id, &r.entity_type, &action, mid);
                }
                self.oracle
                    .writes
                    .extend(WriteRecord::of(i, &r, counter_effect(&action, r.kind)));
                let d = &mut self.devices[i];
                if d.conn.is_some()
                    && let Some(dev) = d.dev.as_mut()
                {
                    match d.machine.handle(dev, SyncInput::LocalWrite) {
                        Ok(out) => self.device_send(i, out),
                        Err(e) => self.trace.record(now, &format!("dev{i} notify failed: {e}")),
                    }
                }
            }
            Err(e) => {
                self.stats.local_refusals += 1;
                self.trace.record(now, &format!("dev{i} refused locally: {e}"));
            }
        }
        self.after_device_activity(i);
        self.reschedule_device(i);
    }
}
