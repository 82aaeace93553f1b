//! What the simulator knows independently of the system under test: every local write it asked
//! for, every envelope pushed, every answer the relay gave. Invariants are checked against this
//! record, on the fly (each message) and at checkpoints (the relay's files).

use std::collections::{BTreeMap, BTreeSet};

use fieldsync_schema::document::{RootOps, parse_change};
use fieldsync_schema::registry::merges_without_prompt;
use fieldsync_schema::{ClientMessage, Mutation, MutationKind, Outcome, Policy, RelayMessage, Schema};
use uuid::Uuid;

use crate::scenario::USERS;
use crate::world::World;

/// A broken invariant: what, where, and when.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Violation {
    pub invariant: String,
    pub detail: String,
    pub entity: Option<String>,
    pub at_ms: u64,
    pub event: u64,
}

/// One write a simulated user made on a device.
#[derive(Debug, Clone)]
pub struct WriteRecord {
    pub device: usize,
    pub entity_id: Uuid,
    pub entity_type: String,
    pub kind: MutationKind,
    pub mutation_id: Uuid,
    pub change_hash: String,
    /// For counters: the field and amount (create: initial values as increments).
    pub counter: Vec<(String, i64)>,
}

impl WriteRecord {
    /// The record of a write the device made, or `None` when it queued nothing (no mutation).
    pub fn of(device: usize, r: &fieldsync_peer::WriteReceipt, counter: Vec<(String, i64)>) -> Option<WriteRecord> {
        Some(WriteRecord {
            device,
            entity_id: r.entity_id,
            entity_type: r.entity_type.clone(),
            kind: r.kind,
            mutation_id: r.mutation_id?,
            change_hash: r.change_hash.clone()?,
            counter,
        })
    }
}

pub struct Oracle {
    pub schema: Schema,
    /// Every envelope a device pushed, by mutation id (the latest signed form).
    pub envelopes: BTreeMap<Uuid, Mutation>,
    /// The first `Applied` answer for each mutation: (version, seq).
    pub applied: BTreeMap<Uuid, (u64, u64)>,
    pub writes: Vec<WriteRecord>,
    /// Entities signed or locked, with the version that sealed them.
    pub sealed: BTreeMap<Uuid, u64>,
    /// The spaces each device's user belongs to.
    pub device_spaces: Vec<BTreeSet<Uuid>>,
    pub violations: Vec<Violation>,
    pub conflicts_prompted: u64,
    pub rejections: u64,
    /// The upgrade workload's tracked fields: every value written, with its mutation.
    pub field_values: BTreeMap<(Uuid, String), Vec<(serde_json::Value, Uuid)>>,
    /// Entities a user resolved a conflict or rejection on (a resolution may drop a value).
    pub resolved: BTreeSet<Uuid>,
    /// The device and the fields of each applied version of a record of a type with field
    /// authority, by (entity, version): what a stale write on it merged with.
    pub touched: BTreeMap<(Uuid, u64), (usize, BTreeSet<String>)>,
}

impl Default for Oracle {
    fn default() -> Self {
        Oracle {
            schema: Schema::default_schema(),
            envelopes: BTreeMap::new(),
            applied: BTreeMap::new(),
            writes: Vec::new(),
            sealed: BTreeMap::new(),
            device_spaces: Vec::new(),
            violations: Vec::new(),
            conflicts_prompted: 0,
            rejections: 0,
            field_values: BTreeMap::new(),
            resolved: BTreeSet::new(),
            touched: BTreeMap::new(),
        }
    }
}

impl World {
    pub fn oracle_client_message(&mut self, _device: usize, msg: &ClientMessage) {
        if let ClientMessage::Push { mutations, .. } = msg {
            for m in mutations {
                self.oracle.envelopes.insert(m.mutation_id, m.clone());
            }
        }
    }

    /// Checks each answer as the relay gives it, before the network can lose it.
    pub fn oracle_relay_output(&mut self, device: usize, msg: &RelayMessage) {
        let RelayMessage::PushResult { results, .. } = msg else {
            return;
        };
        for r in results {
            let entity = self
                .oracle
                .envelopes
                .get(&r.mutation_id)
                .map(|m| m.entity_id.to_string());
            match &r.outcome {
                Outcome::Applied { version, seq, .. } => {
                    if let Some((v0, s0)) = self.oracle.applied.get(&r.mutation_id).copied() {
                        let v = self.violation(
                            "at_most_once",
                            format!(
                                "mutation {} applied twice: version {v0} seq {s0}, then version {version} seq {seq}",
                                r.mutation_id
                            ),
                            entity.clone(),
                        );
                        self.oracle.violations.push(v);
                        continue;
                    }
                    self.oracle.applied.insert(r.mutation_id, (*version, *seq));
                    self.check_gate_and_seal(device, r.mutation_id, *version);
                }
                Outcome::AlreadyApplied { original } => {
                    let known = self.oracle.applied.get(&r.mutation_id).copied();
                    if let (None, Some(o)) = (known, original.applied()) {
                        // Applied, and its first answer never left the relay (it stopped between
                        // the commit and the answer): the replay is the acknowledgement.
                        self.oracle.applied.insert(r.mutation_id, o);
                    }
                    if let (Some(k), Some(o)) = (known, original.applied())
                        && k != o
                    {
                        let v = self.violation(
                            "at_most_once",
                            format!("replay of {} answered {o:?}, first answer was {k:?}", r.mutation_id),
                            entity,
                        );
                        self.oracle.violations.push(v);
                    }
                }
                Outcome::Conflict { .. } => self.oracle.conflicts_prompted += 1,
                Outcome::NotAttempted => {}
                _ => self.oracle.rejections += 1,
            }
        }
    }

    fn check_gate_and_seal(&mut self, device: usize, mutation_id: Uuid, version: u64) {
        let Some(m) = self.oracle.envelopes.get(&mutation_id).cloned() else {
            return;
        };
        let policy = self.oracle.schema.entity_type(&m.entity_type).map(|t| t.policy);
        let entity = Some(m.entity_id.to_string());
        // Only types with field authority are judged by what their versions touched.
        let authority = self
            .oracle
            .schema
            .entity_type(&m.entity_type)
            .is_some_and(|t| t.has_authority());
        let touched = if authority {
            let touched = m
                .changes
                .iter()
                .map(|b| parse_change(b.as_ref()))
                .collect::<Result<Vec<_>, _>>()
                .ok()
                .and_then(|changes| RootOps::of(&changes).ok())
                .map(|ops| ops.touched())
                .unwrap_or_default();
            self.oracle
                .touched
                .insert((m.entity_id, version), (device, touched.clone()));
            touched
        } else {
            BTreeSet::new()
        };
        // Invariant 6: a gated write is applied only on the version it was built on — or, on
        // a type with field authority, on a stale base whose unseen versions it merges with
        // without a prompt (SPEC §17), judged here from the versions' own envelopes.
        let stale = m.base_version != Some(version - 1);
        let merges = || {
            let ty = self.oracle.schema.entity_type(&m.entity_type)?;
            let base = m.base_version?;
            let mut concurrent = BTreeSet::new();
            for v in base + 1..version {
                // The device's own earlier write (its answer lost, say) is history it built on.
                let (by, fields) = self.oracle.touched.get(&(m.entity_id, v))?;
                if *by != device {
                    concurrent.extend(fields.iter().cloned());
                }
            }
            let role = USERS[self.devices.get(device)?.user].role;
            let merges = merges_without_prompt(ty, role, &touched, &concurrent);
            Some((
                merges,
                format!(" (a {role} write of {touched:?} over versions that wrote {concurrent:?})"),
            ))
        };
        // (A version the oracle never saw applied, its answer lost with a relay, cannot be judged.)
        let judged = if authority {
            merges()
        } else {
            Some((false, String::new()))
        };
        if policy == Some(Policy::Gated)
            && m.kind != MutationKind::Create
            && stale
            && let Some((false, why)) = judged
        {
            let v = self.violation(
                "gate",
                format!(
                    "{} {} applied as version {version} but built on {:?}{why}",
                    m.kind, m.mutation_id, m.base_version
                ),
                entity.clone(),
            );
            self.oracle.violations.push(v);
        }
        // Invariant 4: versions advance by exactly one (a create is version 1; only an LWW
        // record can be created on two devices, the later create then being a concurrent write).
        if m.kind == MutationKind::Create && version != 1 && policy != Some(Policy::Lww) {
            let v = self.violation(
                "at_most_once",
                format!("create applied as version {version}"),
                entity.clone(),
            );
            self.oracle.violations.push(v);
        }
        // Invariant 7: nothing changes a signed or locked record.
        if let Some(sealed_at) = self.oracle.sealed.get(&m.entity_id).copied() {
            let v = self.violation(
                "sealed",
                format!(
                    "{} applied as version {version} after the record was sealed at {sealed_at}",
                    m.kind
                ),
                entity.clone(),
            );
            self.oracle.violations.push(v);
        }
        if matches!(m.kind, MutationKind::Sign | MutationKind::Lock) {
            self.oracle.sealed.insert(m.entity_id, version);
        }
    }

    /// Invariant 11: a device never receives data of a space its user does not belong to.
    pub fn oracle_delivered(&mut self, device: usize, msg: &RelayMessage) {
        let entries = match msg {
            RelayMessage::Changes { entries, .. } | RelayMessage::Live { entries, .. } => entries,
            _ => return,
        };
        for e in entries {
            if !self.oracle.device_spaces[device].contains(&e.space_id) {
                let v = self.violation(
                    "space_isolation",
                    format!("dev{device} received an entry of space {}", e.space_id),
                    Some(e.entity_id.to_string()),
                );
                self.oracle.violations.push(v);
            }
        }
    }
}

impl World {
    pub fn violation(&self, invariant: &str, detail: String, entity: Option<String>) -> Violation {
        Violation {
            invariant: invariant.to_string(),
            detail,
            entity,
            at_ms: self.now(),
            event: self.stats.events,
        }
    }
}
