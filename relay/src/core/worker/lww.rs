//! Last-writer-wins per field, by (HLC, device id) — SPEC §5 and §9.
//!
//! Automerge alone would settle concurrent writes by its own operation order, not by the
//! writers' clocks; so the relay keeps, per field, the stamp of the write that currently wins
//! and decides each contested field itself. A write whose changes depend on the winner's change
//! saw the winner and simply replaces it. A concurrent write wins only with a greater (HLC,
//! device); the other side is recorded as a loss. Delete versus edit is decided the same way
//! through the `_deleted` key, as the IronFlow requirements ask: the later of the two stands
//! and the earlier is archived and reported to its device.
//!
//! "Saw" is decided by Automerge causality, not by `base_version`: a device's base counts its
//! own queued writes, so a second write queued offline has a base that may equal the version
//! another device's write got meanwhile, without having seen it.

use std::collections::BTreeMap;

use fieldsync_schema::document::META_DELETED;
use fieldsync_schema::{LwwLoss, Mutation, MutationKind};
use serde_json::{Map, Value};

use crate::store::{LwwStamp, StoreError};

/// The decision for one LWW mutation.
pub(crate) struct LwwPlan {
    /// The value each contested field must end with (`Null` = absent). `_deleted` is a bool.
    pub targets: BTreeMap<String, Value>,
    /// Stamps after this mutation, serialised for the document row.
    pub stamps_json: String,
    /// Fields this mutation lost (reported on its `Applied` outcome).
    pub lost: Vec<LwwLoss>,
    /// Values of earlier writers this mutation overrode (reported on its feed entry).
    pub overridden: Vec<LwwLoss>,
}

pub(crate) struct LwwInput<'a> {
    pub mutation: &'a Mutation,
    /// The document's current version (0 for a new entity) and its stamps.
    pub version: u64,
    pub stamps_json: &'a str,
    /// Keys the mutation's changes write (schema fields and reserved keys).
    pub touched: Vec<String>,
    pub before: &'a Map<String, Value>,
    pub before_deleted: bool,
    /// The fields as the writer left them (the document at the mutation's own heads).
    pub mine: &'a Map<String, Value>,
    pub mine_deleted: bool,
    /// The mutation's last change (hex), recorded in the stamps it wins.
    pub head: Option<String>,
    /// Whether the writer had the stamp's write when it wrote.
    pub saw: &'a mut dyn FnMut(&LwwStamp) -> bool,
}

fn beats(m: &Mutation, s: &LwwStamp) -> bool {
    (m.client_timestamp, m.device_id) > (s.hlc, s.device)
}

pub(crate) fn parse_stamps(json: &str) -> Result<BTreeMap<String, LwwStamp>, StoreError> {
    if json.is_empty() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("LWW stamps: {e}")))
}

pub(crate) fn plan(input: LwwInput<'_>) -> Result<LwwPlan, StoreError> {
    let m = input.mutation;
    let mut stamps = parse_stamps(input.stamps_json)?;
    let new_version = input.version + 1;
    let saw = input.saw;
    let my_stamp = LwwStamp {
        hlc: m.client_timestamp,
        device: m.device_id,
        mutation: m.mutation_id,
        version: new_version,
        change: input.head.clone(),
    };
    let value_of = |map: &Map<String, Value>, deleted: bool, f: &str| -> Value {
        if f == META_DELETED {
            Value::Bool(deleted)
        } else {
            map.get(f).cloned().unwrap_or(Value::Null)
        }
    };
    let loss = |f: &str, loser: &LwwStamp, loser_value: Value, winner: &LwwStamp, winner_value: Value| LwwLoss {
        entity_type: m.entity_type.clone(),
        entity_id: m.entity_id,
        field: f.to_string(),
        loser_device: loser.device,
        loser_mutation: loser.mutation,
        loser_hlc: loser.hlc,
        loser_value,
        winner_device: winner.device,
        winner_mutation: winner.mutation,
        winner_hlc: winner.hlc,
        winner_value,
    };

    // What this mutation wants for `_deleted`, if it contests it at all.
    let wants_deleted = match m.kind {
        MutationKind::Delete => Some(true),
        MutationKind::Resolve if input.touched.iter().any(|k| k == META_DELETED) => Some(input.mine_deleted),
        _ if input.before_deleted => Some(false), // an edit of a deleted entity contests the delete
        _ => None,
    };
    let mut targets = BTreeMap::new();
    let mut lost = Vec::new();
    let mut overridden = Vec::new();
    let mut lost_the_tombstone = false;

    if let Some(wanted) = wants_deleted {
        // A delete competes with the newest concurrent write to any field; an edit of a deleted
        // entity competes with the delete.
        let rival = if m.kind == MutationKind::Delete {
            stamps
                .iter()
                .filter(|(_, s)| !saw(s))
                .max_by(|a, b| (a.1.hlc, a.1.device).cmp(&(b.1.hlc, b.1.device)))
                .map(|(f, s)| (f.clone(), s.clone()))
        } else {
            stamps
                .get(META_DELETED)
                .filter(|s| !saw(s))
                .map(|s| (META_DELETED.to_string(), s.clone()))
        };
        match rival {
            Some((_, rival)) if !beats(m, &rival) => {
                lost_the_tombstone = true;
                lost.push(loss(
                    META_DELETED,
                    &my_stamp,
                    Value::Bool(wanted),
                    &rival,
                    Value::Bool(input.before_deleted),
                ));
                targets.insert(META_DELETED.to_string(), Value::Bool(input.before_deleted));
            }
            Some((field, rival)) => {
                overridden.push(loss(
                    &field,
                    &rival,
                    value_of(input.before, input.before_deleted, &field),
                    &my_stamp,
                    Value::Bool(wanted),
                ));
                stamps.insert(META_DELETED.to_string(), my_stamp.clone());
                targets.insert(META_DELETED.to_string(), Value::Bool(wanted));
            }
            None => {
                stamps.insert(META_DELETED.to_string(), my_stamp.clone());
                targets.insert(META_DELETED.to_string(), Value::Bool(wanted));
            }
        }
    }

    for f in input.touched.iter().filter(|f| !f.starts_with('_')) {
        let mine = value_of(input.mine, input.mine_deleted, f);
        let before = value_of(input.before, input.before_deleted, f);
        let existing = stamps.get(f).filter(|s| !saw(s)).cloned();
        let wins = !lost_the_tombstone && existing.as_ref().is_none_or(|s| beats(m, s));
        if wins {
            if let Some(s) = &existing {
                overridden.push(loss(f, s, before, &my_stamp, mine.clone()));
            }
            stamps.insert(f.clone(), my_stamp.clone());
            targets.insert(f.clone(), mine);
        } else {
            let winner = existing.unwrap_or_else(|| stamps.get(META_DELETED).cloned().unwrap_or(my_stamp.clone()));
            lost.push(loss(f, &my_stamp, mine, &winner, before.clone()));
            targets.insert(f.clone(), before);
        }
    }
    let stamps_json = serde_json::to_string(&stamps).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(LwwPlan {
        targets,
        stamps_json,
        lost,
        overridden,
    })
}

#[cfg(test)]
mod tests {
    use fieldsync_schema::testkit::obj;
    use fieldsync_schema::{Bytes, Hlc};
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    const A: Uuid = Uuid::from_bytes([0xA; 16]);
    const B: Uuid = Uuid::from_bytes([0xB; 16]);

    fn hlc(ms: u64, device: Uuid) -> Hlc {
        Hlc {
            physical_ms: ms,
            counter: 0,
            device,
        }
    }

    fn mutation(kind: MutationKind, ms: u64) -> Mutation {
        Mutation {
            mutation_id: Uuid::from_u128(u128::from(ms)),
            device_id: A,
            user_id: A,
            space_id: A,
            entity_type: "settings".into(),
            entity_id: Uuid::from_bytes([1; 16]),
            kind,
            client_timestamp: hlc(ms, A),
            base_version: Some(3),
            changes: vec![Bytes(vec![1])],
            signature: Bytes(Vec::new()),
        }
    }

    /// Stamps where device B last wrote `field` at `ms`, at relay version 3.
    fn stamped_by_b(field: &str, ms: u64) -> String {
        let stamp = LwwStamp {
            hlc: hlc(ms, B),
            device: B,
            mutation: Uuid::from_u128(999),
            version: 3,
            change: None,
        };
        serde_json::to_string(&BTreeMap::from([(field.to_string(), stamp)])).unwrap()
    }

    struct Case<'a> {
        m: &'a Mutation,
        stamps: &'a str,
        touched: &'a [&'a str],
        before: Map<String, Value>,
        before_deleted: bool,
        mine: Map<String, Value>,
        mine_deleted: bool,
        /// Whether the writer had every stamped write when it wrote.
        saw: bool,
    }

    fn run(c: Case<'_>) -> LwwPlan {
        let mut saw = |_: &LwwStamp| c.saw;
        plan(LwwInput {
            mutation: c.m,
            version: 3,
            stamps_json: c.stamps,
            touched: c.touched.iter().map(|s| s.to_string()).collect(),
            before: &c.before,
            before_deleted: c.before_deleted,
            mine: &c.mine,
            mine_deleted: c.mine_deleted,
            head: Some("ab".into()),
            saw: &mut saw,
        })
        .unwrap()
    }

    #[test]
    fn a_stale_delete_does_not_wipe_a_newer_edit() {
        let m = mutation(MutationKind::Delete, 100);
        let p = run(Case {
            m: &m,
            stamps: &stamped_by_b("units", 200),
            touched: &[META_DELETED],
            before: obj(json!({"units": "st"})),
            before_deleted: false,
            mine: obj(json!({"units": "st"})),
            mine_deleted: true,
            saw: false,
        });
        assert_eq!(p.targets[META_DELETED], json!(false), "the record stays");
        assert_eq!(p.lost.len(), 1);
        assert_eq!((p.lost[0].field.as_str(), p.lost[0].winner_device), (META_DELETED, B));
        assert!(p.overridden.is_empty());
    }

    #[test]
    fn a_stale_edit_does_not_resurrect_a_newer_delete() {
        let m = mutation(MutationKind::Update, 100);
        let p = run(Case {
            m: &m,
            stamps: &stamped_by_b(META_DELETED, 200),
            touched: &["units"],
            before: obj(json!({"units": "kg"})),
            before_deleted: true,
            mine: obj(json!({"units": "lb"})),
            mine_deleted: false,
            saw: false,
        });
        assert_eq!(p.targets[META_DELETED], json!(true), "the record stays deleted");
        assert_eq!(p.targets["units"], json!("kg"), "and keeps its value");
        let fields: Vec<&str> = p.lost.iter().map(|l| l.field.as_str()).collect();
        assert_eq!(fields, [META_DELETED, "units"]);
    }

    #[test]
    fn a_newer_delete_beats_an_older_edit_and_the_winner_is_stamped_at_the_next_version() {
        let m = mutation(MutationKind::Delete, 300);
        let p = run(Case {
            m: &m,
            stamps: &stamped_by_b("units", 200),
            touched: &[META_DELETED],
            before: obj(json!({"units": "st"})),
            before_deleted: false,
            mine: obj(json!({"units": "st"})),
            mine_deleted: true,
            saw: false,
        });
        assert_eq!(p.targets[META_DELETED], json!(true));
        assert!(p.lost.is_empty());
        assert_eq!(p.overridden.len(), 1);
        assert_eq!(
            (p.overridden[0].loser_device, p.overridden[0].field.as_str()),
            (B, "units")
        );
        let stamps = parse_stamps(&p.stamps_json).unwrap();
        assert_eq!(stamps[META_DELETED].version, 4, "version after this mutation");
        assert_eq!(stamps[META_DELETED].mutation, m.mutation_id);
        assert_eq!(stamps[META_DELETED].change.as_deref(), Some("ab"));
    }

    #[test]
    fn a_resolution_that_deletes_contests_the_tombstone() {
        let m = mutation(MutationKind::Resolve, 300);
        let p = run(Case {
            m: &m,
            stamps: "",
            touched: &[META_DELETED],
            before: obj(json!({"units": "st"})),
            before_deleted: false,
            mine: obj(json!({"units": "st"})),
            mine_deleted: true,
            saw: false,
        });
        assert_eq!(
            p.targets[META_DELETED],
            json!(true),
            "the resolution deletes the record"
        );
        assert_eq!(
            parse_stamps(&p.stamps_json).unwrap()[META_DELETED].mutation,
            m.mutation_id
        );
    }

    #[test]
    fn a_resolution_that_edits_a_field_leaves_the_tombstone_alone() {
        let m = mutation(MutationKind::Resolve, 300);
        let p = run(Case {
            m: &m,
            stamps: &stamped_by_b("units", 200),
            touched: &["units"],
            before: obj(json!({"units": "st"})),
            before_deleted: false,
            mine: obj(json!({"units": "kg"})),
            mine_deleted: false,
            saw: false,
        });
        assert_eq!(p.targets.keys().collect::<Vec<_>>(), ["units"], "{:?}", p.targets);
        assert_eq!(p.targets["units"], json!("kg"));
        assert!(!parse_stamps(&p.stamps_json).unwrap().contains_key(META_DELETED));
    }

    #[test]
    fn a_write_that_saw_the_winner_replaces_it_without_a_loss() {
        let m = mutation(MutationKind::Update, 100);
        let p = run(Case {
            m: &m,
            stamps: &stamped_by_b("units", 200),
            touched: &["units"],
            before: obj(json!({"units": "st"})),
            before_deleted: false,
            mine: obj(json!({"units": "lb"})),
            mine_deleted: false,
            saw: true,
        });
        assert_eq!(p.targets["units"], json!("lb"));
        assert!(p.lost.is_empty() && p.overridden.is_empty());
    }
}
