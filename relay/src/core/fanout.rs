//! Live fan-out: every committed feed row reaches every caught-up session of its space once,
//! in seq order — the rows this core committed, and the rows other writers of the same store
//! committed (a second relay on a shared store), found by the gap they leave in the sequence.
//!
//! A session's `live_cursor` says it holds everything visible to it up to that seq. Sending it
//! only this core's own rows would move its cursor past rows another writer committed, and the
//! device would never receive them (two relays on one SQLite directory did exactly this). So
//! before the group's own rows go out, the rows between the last fanned-out seq and the
//! group's first are read back from the store, and the periodic tick does the same when this
//! core committed nothing.

use fieldsync_schema::{FeedEntry, Policy, RelayMessage};
use uuid::Uuid;

use super::pull::feed_entry;
use super::{AppliedEntry, CloseReason, ConnState, Output, RelayCore};
use crate::store::{FeedRow, Store, StoreError};

/// Most rows of other writers read back for one fan-out. Further behind than this, the live
/// sessions are closed instead: they reconnect and catch up by pulling.
pub(super) const MAX_OUTSIDE_ROWS: usize = 2048;

#[derive(Debug)]
pub(crate) struct FanOutState {
    /// Every feed row up to this seq has been fanned out (or was there before this core).
    upto: u64,
}

impl FanOutState {
    pub(super) fn starting_at(store: &impl Store) -> Self {
        let upto = store.max_seq().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the feed's end; live fan-out starts from 0");
            0
        });
        FanOutState { upto }
    }
}

impl<S: Store> RelayCore<S> {
    /// After a commit: the rows other writers committed before this group's, then the group's.
    pub(super) fn fan_out_committed(&mut self, applied: &[AppliedEntry], out: &mut Vec<Output>) {
        if applied.is_empty() {
            return;
        }
        let mut entries = Vec::with_capacity(applied.len());
        let mut expected = self.fanned.upto + 1;
        for a in applied {
            if a.entry.seq > expected && !self.read_outside(expected - 1, a.entry.seq - 1, &mut entries, out) {
                return;
            }
            expected = a.entry.seq + 1;
            entries.push(a.clone());
        }
        self.fanned.upto = self.fanned.upto.max(expected - 1);
        self.fan_out(&entries, out);
    }

    /// On a tick: rows other writers committed while this core committed nothing.
    pub(super) fn fan_out_outside(&mut self, out: &mut Vec<Output>) {
        let end = match self.store.max_seq() {
            Ok(end) => end,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the feed's end for live fan-out");
                return;
            }
        };
        if end <= self.fanned.upto {
            return;
        }
        let mut entries = Vec::new();
        if self.read_outside(self.fanned.upto, end, &mut entries, out) {
            self.fanned.upto = end;
            self.fan_out(&entries, out);
        }
    }

    /// Appends the rows in `(after, upto]` to `entries` (a seq without a row was never
    /// committed: nothing to deliver). Returns false if live delivery cannot continue — too far
    /// behind, or the store failed: then every live session is closed to catch up by pulling,
    /// and the fan-out position moves to `upto`.
    fn read_outside(&mut self, after: u64, upto: u64, entries: &mut Vec<AppliedEntry>, out: &mut Vec<Output>) -> bool {
        let rows = match self.store.feed_range(after, upto, MAX_OUTSIDE_ROWS + 1) {
            Ok(rows) if rows.len() <= MAX_OUTSIDE_ROWS => rows,
            Ok(_) => {
                tracing::warn!(after, upto, "other writers are too far ahead for live delivery");
                self.restart_live_sessions(upto, out);
                return false;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read other writers' feed rows");
                self.restart_live_sessions(upto, out);
                return false;
            }
        };
        for row in rows {
            match self.applied_entry(row) {
                Ok(a) => entries.push(a),
                Err(e) => {
                    tracing::error!(error = %e, "a feed row of another writer is unreadable");
                    self.restart_live_sessions(upto, out);
                    return false;
                }
            }
        }
        true
    }

    fn restart_live_sessions(&mut self, upto: u64, out: &mut Vec<Output>) {
        self.fanned.upto = self.fanned.upto.max(upto);
        let live: Vec<_> = self
            .conns
            .iter()
            .filter_map(|(id, st)| match st {
                ConnState::Ready(s) if s.live_cursor.is_some() => Some(*id),
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
    /// the changes the relay added (LWW settlement).
    fn applied_entry(&self, row: FeedRow) -> Result<AppliedEntry, StoreError> {
        let lww = self
            .schema
            .entity_type(&row.entity_type)
            .is_some_and(|t| t.policy == Policy::Lww);
        let origin_device = row.origin_device;
        let origin_payload = feed_entry(row.clone(), origin_device, lww)?.payload;
        Ok(AppliedEntry {
            entry: feed_entry(row, Uuid::nil(), lww)?,
            origin_device,
            origin_payload,
        })
    }
    /// Releases applied entries to every caught-up connection of their space, in seq order, in
    /// messages of at most a pull page's bytes (a large group never becomes one huge frame).
    fn fan_out(&mut self, applied: &[AppliedEntry], out: &mut Vec<Output>) {
        if applied.is_empty() {
            return;
        }
        let budget = self.config.pull_page_bytes;
        for (conn, state) in self.conns.iter_mut() {
            let ConnState::Ready(s) = state else { continue };
            let Some(mut cursor) = s.live_cursor else { continue };
            let mut entries: Vec<FeedEntry> = Vec::new();
            let mut size = 0usize;
            let mut release = |entries: &mut Vec<FeedEntry>, cursor: u64, out: &mut Vec<Output>| {
                self.stats.live_entries_sent += entries.len() as u64;
                out.push(Output::Send(
                    *conn,
                    RelayMessage::Live {
                        entries: std::mem::take(entries),
                        cursor: fieldsync_schema::PullCursor {
                            seq: cursor,
                            snapshot: None,
                        },
                    },
                ));
            };
            for a in applied {
                if a.entry.seq <= cursor || !s.spaces.contains_key(&a.entry.space_id) {
                    continue;
                }
                let entry = a.entry_for(s.device_id);
                let entry_size = fieldsync_schema::wire::entry_size(&entry);
                if !entries.is_empty() && size + entry_size > budget {
                    release(&mut entries, cursor, out);
                    size = 0;
                }
                size += entry_size;
                entries.push(entry);
                cursor = a.entry.seq;
            }
            if !entries.is_empty() {
                release(&mut entries, cursor, out);
            }
            s.live_cursor = Some(cursor);
        }
    }
}
