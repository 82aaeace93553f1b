//! Invariant 8's reference model: per-field last-writer-wins replayed over the relay's applied
//! mutations, space by space in feed order.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;
use fieldsync_relay::store::SpaceStore;
use fieldsync_schema::document::{RootOps, device_actor, parse_change};
use fieldsync_schema::{Bytes, Hlc, Policy};
use uuid::Uuid;

use super::{RelayDoc, uuid_of};
use crate::world::World;

impl World {
    pub(super) fn lww_problems(&self, docs: &mut BTreeMap<Uuid, RelayDoc>) -> (Vec<(Uuid, String)>, u64) {
        let mut checks = 0;
        if !self.any_relay_up() {
            return (Vec::new(), 0);
        }
        let lww_types: BTreeSet<String> = self
            .oracle
            .schema
            .types()
            .filter(|t| t.policy == Policy::Lww)
            .map(|t| t.name.clone())
            .collect();
        // Every applied mutation, each space in its own order (an entity lives in one space).
        type Row = (Uuid, String, u64, Uuid, Uuid, String, Vec<u8>);
        let mut rows: Vec<Row> = Vec::new();
        let mut archived: BTreeSet<(Uuid, String)> = BTreeSet::new();
        for shard in &self.store.readers {
            let Ok(mut st) = shard.connection().prepare(
                "SELECT entity_id, entity_type, version, origin_device, mutation_id, hlc, changes FROM feed
                 ORDER BY space_id, seq",
            ) else {
                return (Vec::new(), 0);
            };
            rows.extend(
                st.query_map([], |r| {
                    Ok((
                        uuid_of(r.get(0)?),
                        r.get(1)?,
                        r.get::<_, i64>(2)? as u64,
                        uuid_of(r.get(3)?),
                        uuid_of(r.get(4)?),
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })
                .map(|rows| rows.flatten().collect::<Vec<Row>>())
                .unwrap_or_default(),
            );
            archived.extend(
                shard
                    .archive_rows(1_000_000)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|a| Some((a.loser_mutation?, a.field?))),
            );
        }
        // Entities touched by deletes follow the delete-versus-edit rule; the model skips them.
        let deleted: BTreeSet<Uuid> = self
            .oracle
            .envelopes
            .values()
            .filter(|m| m.kind == fieldsync_schema::MutationKind::Delete)
            .map(|m| m.entity_id)
            .collect();
        struct Stamp {
            hlc: Hlc,
            mutation: Uuid,
            version: u64,
            heads: Vec<ChangeHash>,
        }
        let mut stamps: BTreeMap<(Uuid, String), Stamp> = BTreeMap::new();
        // The largest (HLC, device) among every applied write of each field (SPEC §11.8).
        let mut max_writer: BTreeMap<(Uuid, String), (Hlc, Uuid)> = BTreeMap::new();
        let mut problems = Vec::new();
        for (entity, ty, version, device, mutation, hlc, changes) in rows {
            if !lww_types.contains(&ty) || deleted.contains(&entity) {
                continue;
            }
            let Ok(hlc) = hlc.parse::<Hlc>() else { continue };
            let base = self
                .oracle
                .envelopes
                .get(&mutation)
                .and_then(|m| m.base_version)
                .unwrap_or(0);
            let Ok(all): Result<Vec<Bytes>, _> = ciborium::from_reader(changes.as_slice()) else {
                continue;
            };
            let own: Vec<_> = all
                .iter()
                .filter_map(|b| parse_change(&b.0).ok())
                .filter(|c| c.actor_id() == &device_actor(device))
                .collect();
            let dep_set: BTreeSet<ChangeHash> = own.iter().flat_map(|c| c.deps().to_vec()).collect();
            let heads: Vec<ChangeHash> = own.iter().map(|c| c.hash()).filter(|h| !dep_set.contains(h)).collect();
            // What the writer did not have when it wrote: everything not behind its own deps.
            // (`base_version` alone cannot say: it counts the device's own queued writes.)
            let own_set: BTreeSet<ChangeHash> = own.iter().map(|c| c.hash()).collect();
            let writer_deps: Vec<ChangeHash> = dep_set.difference(&own_set).copied().collect();
            let unseen: BTreeSet<ChangeHash> = docs
                .get_mut(&entity)
                .map(|d| d.doc.changes_since(&writer_deps).iter().map(|c| c.hash()).collect())
                .unwrap_or_default();
            let Some(ty_def) = self.oracle.schema.entity_type(&ty) else {
                continue;
            };
            for field in RootOps::of(&own)
                .unwrap_or_default()
                .touched()
                .into_iter()
                .filter(|f| ty_def.field(f).is_some())
            {
                let key = (entity, field.clone());
                let top = max_writer.entry(key.clone()).or_insert((hlc, mutation));
                if hlc > top.0 {
                    *top = (hlc, mutation);
                }
                let new = Stamp {
                    hlc,
                    mutation,
                    version,
                    heads: heads.clone(),
                };
                match stamps.get(&key) {
                    Some(s) if s.version > base || s.heads.iter().any(|h| unseen.contains(h)) => {
                        // Concurrent: the greater (HLC, device) wins, the other is archived.
                        if hlc > s.hlc {
                            if !archived.contains(&(s.mutation, field.clone())) {
                                problems.push((
                                    entity,
                                    format!("overridden value of {field} by {} not archived", s.mutation),
                                ));
                            }
                            stamps.insert(key, new);
                        } else if !archived.contains(&(mutation, field.clone())) {
                            problems.push((entity, format!("losing value of {field} by {mutation} not archived")));
                        }
                    }
                    _ => {
                        stamps.insert(key, new);
                    }
                }
            }
        }
        for ((entity, field), stamp) in &stamps {
            checks += 1;
            if let Some((top, by)) = max_writer.get(&(*entity, field.clone()))
                && *top > stamp.hlc
            {
                problems.push((
                    *entity,
                    format!(
                        "{field} is held by {} ({}) but {by} wrote it later by the clock ({top})",
                        stamp.mutation, stamp.hlc
                    ),
                ));
            }
            let Some(d) = docs.get_mut(entity) else { continue };
            let current = d.doc.fields().get(field).cloned();
            let winner = d.doc.fields_at(&stamp.heads).get(field).cloned();
            if current != winner {
                problems.push((
                    *entity,
                    format!(
                        "{field} is {current:?} but the winning write ({}, {}) wrote {winner:?}",
                        stamp.mutation, stamp.hlc
                    ),
                ));
            }
        }
        (problems, checks)
    }
}
