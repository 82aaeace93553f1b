//! Live fan-out: every committed feed row reaches every caught-up session of its space once, in
//! the space's seq order — the rows this relay's workers committed, and the rows other writers
//! of the same store committed (another relay on a shared store), found by the gap they leave
//! in the space's dense sequence.
//!
//! A session's live position in a space says it holds everything of the space up to there.
//! Sending it only this relay's own rows would move it past rows another writer committed, and
//! the device would never receive them. So before a report's rows go out, the rows between the
//! space's last fanned-out seq and the report's first are read back from the store, and the
//! periodic tick does the same for spaces no worker is busy with.

use fieldsync_schema::{FeedEntry, RelayMessage};
use uuid::Uuid;

use super::pull::{feed_entry, relay_may_add_changes};
use super::{ConnState, Front};
use crate::core::{AppliedEntry, CloseReason, Output};
use crate::store::{Directory, FeedRow, SpaceStore, StoreError};

/// Most rows of other writers read back for one space at once. Further behind than this, the
/// space's live sessions are closed instead: they reconnect and catch up by pulling.
pub(super) const MAX_OUTSIDE_ROWS: usize = 2048;

impl<D: Directory, R: SpaceStore> Front<D, R> {
    /// After a worker's commit: per space, the rows other writers committed before the
    /// report's, then the report's.
    pub(super) fn fan_out_committed(&mut self, applied: Vec<AppliedEntry>, out: &mut Vec<Output>) {
        let mut entries = Vec::with_capacity(applied.len());
        for a in applied {
            let space = a.entry.space_id;
            if let Some(&upto) = self.fanned.get(&space) {
                if a.entry.seq <= upto {
                    continue; // already delivered (read back by a tick)
                }
                if a.entry.seq > upto + 1 {
                    match self.read_rows(space, upto, a.entry.seq - 1) {
                        Ok(rows) => entries.extend(rows),
                        Err(e) => {
                            tracing::error!(error = %e, %space, "cannot read other writers' rows");
                            self.restart_live_sessions(space, out);
                        }
                    }
                }
            }
            self.fanned.insert(space, a.entry.seq);
            entries.push(a);
        }
        self.deliver(&entries, out);
    }

    /// On a tick or a store notification: rows other writers committed in spaces with live
    /// sessions (of `only`, when given) and no job with a worker (whose rows come with its
    /// report, after its answer).
    pub(super) fn fan_out_outside(&mut self, only: Option<&std::collections::BTreeSet<Uuid>>, out: &mut Vec<Output>) {
        let spaces: Vec<(Uuid, u64)> = self
            .fanned
            .iter()
            .filter(|(s, _)| only.is_none_or(|only| only.contains(*s)))
            .map(|(s, u)| (*s, *u))
            .collect();
        if self.ignore_other_relays {
            return;
        }
        let mut entries = Vec::new();
        for (space, upto) in spaces {
            if self.busy(space) || !self.has_live_session(space) {
                continue;
            }
            let Some(shard) = self.shard(space) else { continue };
            let end = match self.readers.get(shard as usize).map(|r| r.max_seq(space)) {
                Some(Ok(end)) => end,
                Some(Err(e)) => {
                    tracing::error!(error = %e, %space, "cannot read the feed's end for live fan-out");
                    continue;
                }
                None => continue,
            };
            if end <= upto {
                continue;
            }
            match self.read_rows(space, upto, end) {
                Ok(rows) => {
                    self.fanned.insert(space, end);
                    entries.extend(rows);
                }
                Err(e) => {
                    tracing::error!(error = %e, %space, "cannot read other writers' rows");
                    self.restart_live_sessions(space, out);
                }
            }
        }
        self.deliver(&entries, out);
    }

    fn has_live_session(&self, space: Uuid) -> bool {
        self.conns.values().any(|c| match c {
            ConnState::Ready(s) => s.live.as_ref().is_some_and(|l| l.contains_key(&space)),
            _ => false,
        })
    }

    /// The space's rows with `after < seq <= upto`, as fan-out sends them. Too many: an error,
    /// and the caller restarts the space's live sessions.
    fn read_rows(&mut self, space: Uuid, after: u64, upto: u64) -> Result<Vec<AppliedEntry>, StoreError> {
        let shard = self
            .shard(space)
            .ok_or_else(|| StoreError::NotFound(format!("the shard of space {space}")))?;
        let reader = self
            .readers
            .get(shard as usize)
            .ok_or_else(|| StoreError::NotFound(format!("shard {shard}")))?;
        let rows = reader.feed_range(space, after, upto, MAX_OUTSIDE_ROWS + 1)?;
        if rows.len() > MAX_OUTSIDE_ROWS {
            return Err(StoreError::Conflict(format!(
                "other writers are more than {MAX_OUTSIDE_ROWS} rows ahead in space {space}"
            )));
        }
        rows.into_iter().map(|row| self.applied_entry(row)).collect()
    }

    /// Closes the space's live sessions: they reconnect and catch up by pulling.
    fn restart_live_sessions(&mut self, space: Uuid, out: &mut Vec<Output>) {
        let live: Vec<_> = self
            .conns
            .iter()
            .filter_map(|(id, st)| match st {
                ConnState::Ready(s) if s.live.as_ref().is_some_and(|l| l.contains_key(&space)) => Some(*id),
                _ => None,
            })
            .collect();
        for conn in live {
            self.close(
                conn,
                CloseReason::try_later("other relays wrote more than live delivery carries; reconnect to catch up"),
                out,
            );
        }
    }

    /// A stored feed row as fan-out sends it: everything to other devices; to its origin, only
    /// the changes the relay added (LWW settlement, a declared rename).
    fn applied_entry(&self, row: FeedRow) -> Result<AppliedEntry, StoreError> {
        let relay_writes = relay_may_add_changes(&self.schema, &row.entity_type);
        let origin_device = row.origin_device;
        let origin_payload = feed_entry(row.clone(), origin_device, relay_writes)?.payload;
        Ok(AppliedEntry {
            entry: feed_entry(row, Uuid::nil(), relay_writes)?,
            origin_device,
            origin_payload,
        })
    }

    /// Sends `entries` (each space's in seq order) to every session live in their space, past
    /// its position there, in messages of at most a pull page's bytes.
    fn deliver(&mut self, entries: &[AppliedEntry], out: &mut Vec<Output>) {
        if entries.is_empty() {
            return;
        }
        let budget = self.config.pull_page_bytes;
        let schema = self.schema.clone();
        let low_priority = |t: &str| schema.entity_type(t).is_some_and(|t| t.low_priority);
        for (conn, state) in self.conns.iter_mut() {
            let ConnState::Ready(s) = state else { continue };
            let Some(live) = &mut s.live else { continue };
            let mut batch: Vec<FeedEntry> = Vec::new();
            let mut size = 0usize;
            for a in entries {
                let Some(position) = live.get_mut(&a.entry.space_id) else {
                    continue;
                };
                if a.entry.seq <= *position {
                    continue;
                }
                // A type the device does not hold, or reference data on a metered link: only the
                // entry's place, so its live run stays contiguous (selective sync, SPEC §16).
                let deferred = s.metered && low_priority(&a.entry.entity_type);
                let entry = match &s.types {
                    Some(types) if !types.contains(&a.entry.entity_type) => not_selected(&a.entry),
                    _ if deferred => not_selected(&a.entry),
                    _ => a.entry_for(s.device_id),
                };
                let entry_size = fieldsync_schema::wire::entry_size(&entry);
                if !batch.is_empty() && size + entry_size > budget {
                    self.stats.live_entries_sent += batch.len() as u64;
                    out.push(Output::Send(
                        *conn,
                        RelayMessage::Live {
                            entries: std::mem::take(&mut batch),
                        },
                    ));
                    size = 0;
                }
                size += entry_size;
                *position = a.entry.seq;
                batch.push(entry);
            }
            if !batch.is_empty() {
                self.stats.live_entries_sent += batch.len() as u64;
                out.push(Output::Send(*conn, RelayMessage::Live { entries: batch }));
            }
        }
    }
}

/// What a device that does not hold `entry`'s type is sent in its place: the space and the
/// position, nothing of the record.
fn not_selected(entry: &FeedEntry) -> FeedEntry {
    FeedEntry {
        seq: entry.seq,
        space_id: entry.space_id,
        entity_type: String::new(),
        entity_id: Uuid::nil(),
        version: 0,
        payload: fieldsync_schema::FeedPayload::NotSelected,
        origin: None,
        lww_losses: Vec::new(),
    }
}
