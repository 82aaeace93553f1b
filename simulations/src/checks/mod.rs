//! The invariants of SPEC §11, checked against the relay's files and the devices' databases:
//! at checkpoints during the run (safety) and after healing and draining (liveness too).

use std::collections::BTreeMap;

use automerge::ChangeHash;
use fieldsync_peer::OutboxState;
use fieldsync_relay::store::SpaceStore;
use fieldsync_schema::document::device_actor;
use fieldsync_schema::{EntityDoc, Outcome};
use rusqlite::Connection;
use serde_json::Value;
use uuid::Uuid;

use crate::world::World;

mod lww;

/// One relay document as the checks see it.
pub struct RelayDoc {
    pub entity_type: String,
    pub space_id: Uuid,
    pub version: u64,
    pub doc: EntityDoc,
}

fn uuid_of(bytes: Vec<u8>) -> Uuid {
    Uuid::from_slice(&bytes).unwrap_or_default()
}

impl World {
    /// A connection to each of the store's shard files (empty while every relay is down).
    fn relay_conns(&self) -> Vec<&Connection> {
        if !self.any_relay_up() {
            return Vec::new();
        }
        self.store.readers.iter().map(|r| r.connection()).collect()
    }

    pub(crate) fn fail(&mut self, invariant: &str, detail: String, entity: Option<Uuid>) {
        let v = self.violation(invariant, detail, entity.map(|e| e.to_string()));
        self.oracle.violations.push(v);
    }

    /// Safety checks on the relay's files; cheap enough to run every few simulated hours.
    pub fn checkpoint(&mut self) {
        if !self.any_relay_up() {
            return;
        }
        self.stats.checkpoints += 1;
        self.check_durability();
        self.check_feed_and_audit_shape();
        self.check_sealed();
    }

    /// Invariant 2: every `Applied` the relay ever answered is in its files, with that answer.
    fn check_durability(&mut self) {
        let applied: Vec<(Uuid, (u64, u64))> = self.oracle.applied.iter().map(|(k, v)| (*k, *v)).collect();
        let mut failures = Vec::new();
        if self.any_relay_up() {
            for (mid, (version, seq)) in applied {
                self.stats.invariant_checks += 1;
                let stored = self.store.readers.iter().find_map(|r| r.receipt(mid).ok().flatten());
                let outcome: Option<Outcome> = stored.and_then(|r| ciborium::from_reader(r.outcome.as_slice()).ok());
                match outcome {
                    Some(o) if o.applied() == Some((version, seq)) => {}
                    other => failures.push((mid, version, seq, other.map(|o| o.name()))),
                }
            }
        }
        for (mid, version, seq, found) in failures {
            self.fail(
                "durability",
                format!(
                    "mutation {mid} was acknowledged as version {version} seq {seq}, the relay's files say {found:?}"
                ),
                None,
            );
        }
    }

    /// Invariants 4 and 10: each mutation applied once, versions 1..n without gaps, one audit
    /// record per applied mutation.
    fn check_feed_and_audit_shape(&mut self) {
        let problems = self.feed_and_audit_problems();
        self.stats.invariant_checks += 3;
        for (inv, detail, entity) in problems {
            self.fail(&inv, detail, entity);
        }
    }

    fn feed_and_audit_problems(&self) -> Vec<(String, String, Option<Uuid>)> {
        let mut problems: Vec<(String, String, Option<Uuid>)> = Vec::new();
        let conns = self.relay_conns();
        if conns.is_empty() {
            return problems;
        }
        // One audit record per mutation id, across every shard.
        let mut audited: BTreeMap<Uuid, u64> = BTreeMap::new();
        for conn in &conns {
            if let Ok(mut st) = conn.prepare("SELECT mutation_id FROM audit") {
                let ids: Vec<Uuid> = st
                    .query_map([], |r| r.get::<_, Vec<u8>>(0))
                    .map(|rows| rows.flatten().map(uuid_of).collect())
                    .unwrap_or_default();
                for id in ids {
                    *audited.entry(id).or_insert(0) += 1;
                }
            }
        }
        if let Some((m, n)) = audited.iter().find(|(_, n)| **n > 1) {
            problems.push((
                "at_most_once".into(),
                format!("mutation {m} has {n} audit records"),
                None,
            ));
        }
        let (mut audit, mut feed) = (0i64, 0i64);
        for conn in &conns {
            let shape = conn.prepare(
                "SELECT d.entity_id, d.version, COUNT(f.seq), MIN(f.version), MAX(f.version)
                 FROM documents d LEFT JOIN feed f ON f.doc_key = d.doc_key GROUP BY d.doc_key",
            );
            if let Ok(mut st) = shape {
                let rows = st.query_map([], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                    ))
                });
                if let Ok(rows) = rows {
                    for (id, version, count, min, max) in rows.flatten() {
                        let ok = version == count && (count == 0 || (min == Some(1) && max == Some(version)));
                        if !ok {
                            problems.push((
                                "at_most_once".into(),
                                format!("versions are not 1..={version}: {count} feed rows, min {min:?}, max {max:?}"),
                                Some(uuid_of(id)),
                            ));
                        }
                    }
                }
            }
            let counts: rusqlite::Result<(i64, i64)> = conn.query_row(
                "SELECT (SELECT COUNT(*) FROM audit), (SELECT COUNT(*) FROM feed)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            );
            if let Ok((a, f)) = counts {
                audit += a;
                feed += f;
            }
        }
        if audit != feed {
            problems.push((
                "audit".into(),
                format!("{audit} audit records for {feed} applied mutations"),
                None,
            ));
        }
        // Each space's feed is 1, 2, ..., n up to its head, and lives in its own shard.
        if let Some(backend) = &self.store.backend {
            match backend.consistency() {
                Ok(c) => {
                    for p in c.problems() {
                        problems.push(("order".into(), p, None));
                    }
                }
                Err(e) => problems.push(("order".into(), format!("consistency unreadable: {e}"), None)),
            }
        }
        problems
    }

    /// Invariant 7: a signed note or locked form keeps the version it was sealed at.
    fn check_sealed(&mut self) {
        let sealed: Vec<(Uuid, u64)> = self.oracle.sealed.iter().map(|(k, v)| (*k, *v)).collect();
        let mut problems = Vec::new();
        if self.any_relay_up() {
            for (entity, at) in sealed {
                self.stats.invariant_checks += 1;
                // The store's own handles: a relay's may be cut off (`store_loss`).
                let found = self
                    .store
                    .readers
                    .iter()
                    .map(|r| r.document(entity))
                    .find(|d| !matches!(d, Ok(None)));
                match found.unwrap_or(Ok(None)) {
                    Ok(Some(d)) if d.version == at && (d.signed || d.locked) => {}
                    Ok(Some(d)) => {
                        problems.push((entity, format!("sealed at version {at}, now version {}", d.version)))
                    }
                    _ => problems.push((entity, "sealed record missing".to_string())),
                }
            }
        }
        for (entity, detail) in problems {
            self.fail("sealed", detail, Some(entity));
        }
    }

    /// Invariant 3 through crashes: every write a device reported as committed is still in its
    /// outbox (in any state) after the device restarts.
    pub fn check_outbox_survived(&mut self, i: usize) {
        let Some(dev) = self.devices[i].dev.as_ref() else {
            return;
        };
        let missing: Vec<(Uuid, Uuid)> = self
            .oracle
            .writes
            .iter()
            .filter(|w| w.device == i)
            .filter(|w| !matches!(dev.outbox_item(w.mutation_id), Ok(Some(_))))
            .map(|w| (w.entity_id, w.mutation_id))
            .collect();
        self.stats.invariant_checks += 1;
        for (entity, mid) in missing {
            self.fail(
                "no_silent_loss",
                format!("dev{i} restarted without its committed write {mid}"),
                Some(entity),
            );
        }
    }

    /// Every relay document, loaded.
    pub fn relay_docs(&self) -> BTreeMap<Uuid, RelayDoc> {
        let mut out = BTreeMap::new();
        if !self.any_relay_up() {
            return out;
        }
        for shard in &self.store.readers {
            let Ok(mut st) = shard
                .connection()
                .prepare("SELECT entity_id FROM documents WHERE version > 0 ORDER BY doc_key")
            else {
                continue;
            };
            let ids: Vec<Uuid> = st
                .query_map([], |r| r.get::<_, Vec<u8>>(0))
                .map(|rows| rows.flatten().map(uuid_of).collect())
                .unwrap_or_default();
            for id in ids {
                let Ok(Some(row)) = shard.document(id) else {
                    continue;
                };
                let Ok(bytes) = shard.document_bytes(row.doc_key) else {
                    continue;
                };
                let Ok(doc) = EntityDoc::load(&bytes, device_actor(Uuid::nil())) else {
                    continue;
                };
                out.insert(
                    id,
                    RelayDoc {
                        entity_type: row.entity_type,
                        space_id: row.space_id,
                        version: row.version,
                        doc,
                    },
                );
            }
        }
        out
    }

    /// After healing and draining: every invariant, including convergence.
    pub fn final_checks(&mut self, converged: bool) {
        self.checkpoint();
        let mut docs = self.relay_docs();
        if !converged {
            let unsettled: Vec<usize> = (0..self.devices.len()).filter(|i| !self.device_settled(*i)).collect();
            let why: Vec<String> = unsettled
                .iter()
                .map(|i| {
                    let st = self.devices[*i].dev.as_ref().and_then(|d| d.status().ok());
                    match st {
                        Some(s) => format!(
                            "dev{i}: {} unsynced, {}",
                            s.unsynced,
                            s.blocked
                                .map(|b| format!("blocked on {} ({})", b.entity_id, b.reason))
                                .unwrap_or_else(|| s.state.as_str().into())
                        ),
                        None => format!("dev{i}: down"),
                    }
                })
                .collect();
            self.fail(
                "liveness",
                format!("no convergence after healing and draining: {}", why.join("; ")),
                None,
            );
        }
        self.check_audit_chain();
        self.check_convergence(&docs);
        self.check_no_silent_loss(&mut docs);
        self.check_device_order();
        self.check_counters(&mut docs);
        self.check_lww(&mut docs);
        if self.opts.upgrades {
            self.check_no_field_lost(&mut docs);
        }
        if self.opts.wearables {
            self.check_authority(&mut docs);
        }
    }

    fn check_audit_chain(&mut self) {
        if !self.any_relay_up() {
            return;
        }
        let Some(backend) = &self.store.backend else { return };
        let report = fieldsync_relay::audit::verify(backend);
        let feed = backend.counts().map(|c| c.feed).unwrap_or(0);
        let applied = self.oracle.applied.len() as u64;
        self.stats.invariant_checks += 2;
        match report {
            Ok(r) if r.ok() => {}
            Ok(r) => self.fail("audit", format!("audit chain broken: {:?}", r.bad()), None),
            Err(e) => self.fail("audit", format!("audit chain unreadable: {e}"), None),
        }
        if feed != applied {
            self.fail(
                "at_most_once",
                format!("{feed} mutations applied, {applied} acknowledged"),
                None,
            );
        }
    }

    /// Invariants 1 and 11: every device equals the relay on every entity it can see, and holds
    /// nothing from a space its user is not in.
    fn check_convergence(&mut self, docs: &BTreeMap<Uuid, RelayDoc>) {
        let mut problems = Vec::new();
        for i in 0..self.devices.len() {
            let Some(dev) = self.devices[i].dev.as_ref() else {
                continue;
            };
            let spaces = &self.oracle.device_spaces[i];
            for (id, rd) in docs {
                if !spaces.contains(&rd.space_id) {
                    if dev.get(*id).ok().flatten().is_some() {
                        problems.push((
                            "space_isolation",
                            format!("dev{i} holds an entity of space {}", rd.space_id),
                            *id,
                        ));
                    }
                    continue;
                }
                self.stats.invariant_checks += 1;
                match dev.get(*id) {
                    Ok(Some(e)) => {
                        // As this device's schema version reads the relay's record (a renamed
                        // field under the name it knows, declared defaults filled in).
                        let relay_fields = match dev.schema().entity_type(&rd.entity_type) {
                            Some(ty) => ty.view(rd.doc.fields()),
                            None => rd.doc.fields(),
                        };
                        if e.fields != relay_fields
                            || e.deleted != rd.doc.is_deleted()
                            || e.signed != rd.doc.is_signed()
                        {
                            problems.push((
                                "convergence",
                                format!(
                                    "dev{i} has {} {:?} (deleted {}, version {}), the relay {:?} (deleted {}, version {})",
                                    rd.entity_type,
                                    Value::Object(e.fields),
                                    e.deleted,
                                    e.relay_version,
                                    Value::Object(relay_fields),
                                    rd.doc.is_deleted(),
                                    rd.version
                                ),
                                *id,
                            ));
                        } else if e.relay_version != rd.version {
                            problems.push((
                                "convergence",
                                format!(
                                    "dev{i} knows relay version {}, the relay is at {}",
                                    e.relay_version, rd.version
                                ),
                                *id,
                            ));
                        }
                    }
                    _ => problems.push((
                        "convergence",
                        format!("dev{i} lacks {} the relay has", rd.entity_type),
                        *id,
                    )),
                }
            }
        }
        for (inv, detail, id) in problems {
            self.fail(inv, detail, Some(id));
        }
    }

    /// Invariant 3: every local write is applied (its change is in the relay's document), still
    /// queued, or shown to its user as a conflict or rejection.
    fn check_no_silent_loss(&mut self, docs: &mut BTreeMap<Uuid, RelayDoc>) {
        let writes = self.oracle.writes.clone();
        let mut problems = Vec::new();
        for w in &writes {
            self.stats.invariant_checks += 1;
            let Ok(hash) = w.change_hash.parse::<ChangeHash>() else {
                continue;
            };
            if docs.get_mut(&w.entity_id).is_some_and(|d| d.doc.has_change(&hash)) {
                continue;
            }
            let Some(dev) = self.devices[w.device].dev.as_ref() else {
                continue;
            };
            let item = dev.outbox_item(w.mutation_id).ok().flatten();
            match item.map(|i| i.state) {
                // Still queued, or carried by a resolution (its change travels in the
                // resolution's mutation), or discarded by the user after seeing the rejection.
                Some(OutboxState::Pending | OutboxState::Blocked | OutboxState::Superseded) => {}
                state => problems.push((
                    w.entity_id,
                    format!(
                        "dev{}'s {} of {} ({}) is neither on the relay nor queued (outbox state {state:?})",
                        w.device, w.kind, w.entity_type, w.mutation_id
                    ),
                )),
            }
        }
        for (id, detail) in problems {
            self.fail("no_silent_loss", detail, Some(id));
        }
    }

    /// Invariant 5: each device's mutations were applied in the order it made them, within each
    /// space (each space is its own order; seqs of different spaces do not compare).
    fn check_device_order(&mut self) {
        let mut problems = Vec::new();
        for i in 0..self.devices.len() {
            let Some(dev) = self.devices[i].dev.as_ref() else {
                continue;
            };
            let Ok(items) = dev.queue(true) else { continue };
            let mut last: BTreeMap<Uuid, (u64, Uuid)> = BTreeMap::new();
            for item in items.iter().filter(|it| it.state == OutboxState::Applied) {
                self.stats.invariant_checks += 1;
                let Some((_, seq)) = self.oracle.applied.get(&item.mutation_id).copied() else {
                    continue;
                };
                let Some(space) = self.oracle.envelopes.get(&item.mutation_id).map(|m| m.space_id) else {
                    continue;
                };
                if let Some((prev, prev_id)) = last.get(&space).copied()
                    && seq <= prev
                {
                    problems.push(format!(
                        "dev{i}: {} (seq {seq}) was queued after {prev_id} (seq {prev}) but applied before it",
                        item.mutation_id
                    ));
                }
                last.insert(space, (seq, item.mutation_id));
            }
        }
        for p in problems {
            self.fail("order", p, None);
        }
    }

    /// Invariant 9: a counter equals its initial value plus every applied increment.
    fn check_counters(&mut self, docs: &mut BTreeMap<Uuid, RelayDoc>) {
        let mut expected: BTreeMap<(Uuid, String), i64> = BTreeMap::new();
        for w in self.oracle.writes.clone() {
            if w.counter.is_empty() {
                continue;
            }
            let Ok(hash) = w.change_hash.parse::<ChangeHash>() else {
                continue;
            };
            if !docs.get_mut(&w.entity_id).is_some_and(|d| d.doc.has_change(&hash)) {
                continue;
            }
            for (field, by) in &w.counter {
                *expected.entry((w.entity_id, field.clone())).or_insert(0) += by;
            }
        }
        let mut problems = Vec::new();
        for ((id, field), want) in expected {
            self.stats.invariant_checks += 1;
            let got = docs
                .get(&id)
                .and_then(|d| d.doc.fields().get(&field).and_then(Value::as_i64))
                .unwrap_or(0);
            if got != want {
                problems.push((
                    id,
                    format!("counter {field} is {got}, applied increments sum to {want}"),
                ));
            }
        }
        for (id, detail) in problems {
            self.fail("counters", detail, Some(id));
        }
    }

    /// Invariant 8, by a reference model of per-field last-writer-wins: replaying the relay's
    /// applied LWW mutations in order, the winner of each field is the max (HLC, device) among
    /// writers that did not build on it, the document holds the winner's value, and every
    /// loser is in the conflict archive.
    fn check_lww(&mut self, docs: &mut BTreeMap<Uuid, RelayDoc>) {
        let (problems, checks) = self.lww_problems(docs);
        self.stats.invariant_checks += checks;
        for (id, detail) in problems {
            self.fail("lww", detail, Some(id));
        }
    }
}
