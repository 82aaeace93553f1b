//! Simulated users dealing with what their device shows them: conflicts to resolve (keep
//! mine, keep theirs, or a per-field merge), rejected edits to turn into an addendum or to
//! discard, and now and then an LWW loss they undo.

use fieldsync_peer::conflict::{FieldStatus, Resolution};
use fieldsync_peer::{Device, WriteReceipt};
use serde_json::{Map, Value};

use crate::oracle::WriteRecord;
use crate::rng::Draw;
use crate::world::World;

/// A merge a person would type: for each contested field, one side's value or the other's.
fn merged_choice(
    rng: &mut rand_chacha::ChaCha20Rng,
    c: &fieldsync_peer::conflict::ConflictRecord,
) -> Map<String, Value> {
    let mut m = Map::new();
    for f in &c.fields {
        if f.field.starts_with('_') || f.status == FieldStatus::Merged {
            continue;
        }
        if matches!(
            f.status,
            FieldStatus::Contested | FieldStatus::Mine | FieldStatus::Theirs
        ) {
            let v = if rng.chance(0.5) {
                &f.mine.value
            } else {
                &f.theirs.value
            };
            m.insert(f.field.clone(), v.clone());
        }
    }
    m
}

impl World {
    pub fn on_user_resolves(&mut self, i: usize) {
        self.devices[i].resolve_scheduled = false;
        let now = self.now();
        let Some(dev) = self.devices[i].dev.as_mut() else {
            return;
        };
        let mut receipts: Vec<(WriteReceipt, &'static str)> = Vec::new();
        let mut notes = Vec::new();

        if let Ok(conflicts) = dev.conflicts() {
            for c in conflicts {
                let choice = match self.rng.users.below(10) {
                    _ if c.options == ["discard"] => None,
                    0..=3 if c.options.contains(&"keep_mine") => Some(Resolution::KeepMine),
                    4..=7 if c.options.contains(&"keep_theirs") => Some(Resolution::KeepTheirs),
                    _ if c.options.contains(&"merged") => {
                        Some(Resolution::Merged(merged_choice(&mut self.rng.users, &c)))
                    }
                    _ => Some(Resolution::KeepTheirs),
                };
                let result = match choice {
                    Some(r) => {
                        let name = r.name();
                        dev.resolve(c.entity_id, r).map(|w| Some((w, name)))
                    }
                    None => dev.discard_rejection(c.entity_id).map(|_| None),
                };
                match result {
                    Ok(Some(r)) => receipts.push(r),
                    Ok(None) => notes.push(format!("discarded conflict on {}", c.entity_id)),
                    Err(e) => notes.push(format!("resolve {} failed: {e}", c.entity_id)),
                }
            }
        }
        if let Ok(rejections) = dev.rejections() {
            for r in rejections {
                let addendum = r.options.contains(&"addendum") && self.rng.users.chance(0.6);
                if addendum {
                    match dev.make_addendum(r.entity_id) {
                        Ok(w) => receipts.push((w, "addendum")),
                        Err(e) => notes.push(format!("addendum to {} failed: {e}", r.entity_id)),
                    }
                } else {
                    match dev.discard_rejection(r.entity_id) {
                        Ok(_) => notes.push(format!("discarded {} on {}", r.outcome.name(), r.entity_id)),
                        Err(e) => notes.push(format!("discard on {} failed: {e}", r.entity_id)),
                    }
                }
            }
        }
        if !self.healing && self.rng.users.chance(0.2) {
            undo_one_loss(dev, &mut receipts, &mut notes);
        }

        for note in notes {
            self.trace.record(now, &format!("dev{i} user: {note}"));
        }
        for (r, how) in receipts {
            self.stats.resolutions += 1;
            self.trace.record(
                now,
                &format!(
                    "dev{i} user {how} {} {} -> {:?}",
                    r.entity_type, r.entity_id, r.mutation_id
                ),
            );
            if let (Some(mid), Some(hash)) = (r.mutation_id, r.change_hash.clone()) {
                self.oracle.writes.push(WriteRecord {
                    device: i,
                    entity_id: r.entity_id,
                    entity_type: r.entity_type.clone(),
                    kind: r.kind,
                    mutation_id: mid,
                    change_hash: hash,
                    counter: Vec::new(),
                });
            }
        }
        let d = &mut self.devices[i];
        if d.conn.is_some() {
            let dn = d.device_now();
            if let Some(dev) = d.dev.as_mut()
                && let Ok(out) = d.machine.notify_local_write(dev, dn)
            {
                self.device_send(i, out);
            }
        }
        self.after_device_activity(i);
        self.reschedule_device(i);
    }
}

/// The user takes back one value they lost to another device's later write.
fn undo_one_loss(dev: &mut Device, receipts: &mut Vec<(WriteReceipt, &'static str)>, notes: &mut Vec<String>) {
    let Ok(losses) = dev.lww_loss_records() else { return };
    let now = dev.now_ms();
    if let Some(l) = losses
        .iter()
        .find(|l| l.undone_at_ms.is_none() && now <= l.undo_until_ms)
    {
        match dev.undo_lww_loss(l.loss_id) {
            Ok(w) => receipts.push((w, "undo")),
            Err(e) => notes.push(format!("undo of loss {} refused: {e}", l.loss_id)),
        }
    }
}
