//! Simulated users dealing with what their device shows them: conflicts to resolve (keep
//! mine, keep theirs, or a per-field merge), rejected edits to turn into an addendum or to
//! discard, and now and then an LWW loss they undo.

use fieldsync_peer::conflict::{FieldStatus, Resolution};
use fieldsync_peer::sync::SyncInput;
use fieldsync_peer::{Device, PeerError, WriteReceipt};
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

        let mut refused = Vec::new();
        if let Ok(conflicts) = dev.conflicts() {
            for c in conflicts {
                let offered = |o: &str| c.options.contains(&o);
                let choice = if offered("keep_mine") {
                    match self.rng.users.below(10) {
                        0..=3 => Choice::Resolve(Resolution::KeepMine),
                        4..=7 if offered("keep_theirs") => Choice::Resolve(Resolution::KeepTheirs),
                        _ if offered("merged") => {
                            Choice::Resolve(Resolution::Merged(merged_choice(&mut self.rng.users, &c)))
                        }
                        _ => Choice::Resolve(Resolution::KeepMine),
                    }
                } else if offered("addendum") && self.rng.users.chance(0.6) {
                    Choice::Addendum
                } else {
                    Choice::Discard
                };
                let label = choice.name();
                let result = match choice {
                    Choice::Resolve(r) => {
                        let name = r.name();
                        dev.resolve(c.entity_id, r).map(|w| Some((w, name)))
                    }
                    Choice::Addendum => dev.make_addendum(c.entity_id).map(|w| Some((w, "addendum"))),
                    Choice::Discard => dev.discard_rejection(c.entity_id).map(|_| None),
                };
                match result {
                    Ok(Some(r)) => receipts.push(r),
                    Ok(None) => notes.push(format!("discarded conflict on {}", c.entity_id)),
                    Err(e) => {
                        if refuses_an_offered_option(&e) {
                            refused.push((
                                c.entity_id,
                                format!("conflict offered {:?}; {label} refused: {e}", c.options),
                            ));
                        }
                        notes.push(format!("{label} on {} failed: {e}", c.entity_id));
                    }
                }
            }
        }
        if let Ok(rejections) = dev.rejections() {
            for r in rejections {
                let addendum = r.options.contains(&"addendum") && self.rng.users.chance(0.6);
                let (label, result) = if addendum {
                    (
                        "addendum",
                        dev.make_addendum(r.entity_id).map(|w| Some((w, "addendum"))),
                    )
                } else {
                    ("discard", dev.discard_rejection(r.entity_id).map(|_| None))
                };
                match result {
                    Ok(Some(w)) => receipts.push(w),
                    Ok(None) => notes.push(format!("discarded {} on {}", r.outcome.name(), r.entity_id)),
                    Err(e) => {
                        if refuses_an_offered_option(&e) {
                            refused.push((
                                r.entity_id,
                                format!("rejection offered {:?}; {label} refused: {e}", r.options),
                            ));
                        }
                        notes.push(format!("{label} on {} failed: {e}", r.entity_id));
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
        for (entity, detail) in refused {
            let v = self.violation("offered_options", format!("dev{i}: {detail}"), Some(entity.to_string()));
            self.oracle.violations.push(v);
        }
        for (r, how) in receipts {
            self.stats.resolutions += 1;
            self.oracle.resolved.insert(r.entity_id);
            self.trace.record(
                now,
                &format!(
                    "dev{i} user {how} {} {} -> {:?}",
                    r.entity_type, r.entity_id, r.mutation_id
                ),
            );
            self.oracle.writes.extend(WriteRecord::of(i, &r, Vec::new()));
        }
        if self.opts.wearables {
            self.settle_duplicates(i);
        }
        let d = &mut self.devices[i];
        if d.conn.is_some()
            && let Some(dev) = d.dev.as_mut()
            && let Ok(out) = d.machine.handle(dev, SyncInput::LocalWrite)
        {
            self.device_send(i, out);
        }
        self.after_device_activity(i);
        self.reschedule_device(i);
    }
}

/// What a simulated user picks from the options a record offers.
enum Choice {
    Resolve(Resolution),
    Addendum,
    Discard,
}

impl Choice {
    fn name(&self) -> &'static str {
        match self {
            Choice::Resolve(r) => r.name(),
            Choice::Addendum => "addendum",
            Choice::Discard => "discard",
        }
    }
}

/// Whether an error means the product refused an option it offered (SPEC §11: every offered
/// option is accepted when chosen). A merge the user typed may be invalid, and a kept value
/// may point at a record deleted meanwhile: those are told field by field and the other
/// options remain, so they are not refusals; storage errors are faults, not decisions.
fn refuses_an_offered_option(e: &PeerError) -> bool {
    !matches!(
        e,
        PeerError::Invalid { .. } | PeerError::Db(_) | PeerError::StorageFull(_) | PeerError::Io { .. }
    )
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
