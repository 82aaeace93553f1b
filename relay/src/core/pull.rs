//! Pull: pages of the change feed for the user's spaces only, compacted documents for a device
//! starting from zero, and the switch to live delivery once a device has caught up.

use fieldsync_schema::document::{device_actor, parse_change};
use fieldsync_schema::wire::{FeedPayload, SnapshotCursor};
use fieldsync_schema::{Bytes, FeedEntry, LwwLoss, Origin, PullCursor, RelayMessage};

use super::{ConnId, ConnState, Output, RelayCore};
use crate::store::{FeedRow, Store, StoreError};

/// Rough wire size of an entry beyond its payload (ids, numbers, framing).
const ENTRY_OVERHEAD: usize = 160;

impl<S: Store> RelayCore<S> {
    pub(super) fn on_pull(
        &mut self,
        conn: ConnId,
        cursor: PullCursor,
        max_entries: u32,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        self.store.begin_read()?;
        let result = self.pull_page(conn, cursor, max_entries, now_ms, out);
        let ended = self.store.end_read();
        result.and(ended)
    }

    fn pull_page(
        &mut self,
        conn: ConnId,
        cursor: PullCursor,
        max_entries: u32,
        _now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        let Some(ConnState::Ready(s)) = self.conns.get(&conn) else {
            return Ok(());
        };
        let device_id = s.device_id;
        let spaces = s.space_list();
        let limit = (max_entries as usize).clamp(1, self.config.pull_page_entries);
        let budget = self.config.pull_page_bytes;
        self.stats.pull_pages += 1;

        let snapshot = match cursor.snapshot {
            Some(snap) => Some(snap),
            None if cursor.seq == 0 => {
                let upto = self.store.max_seq()?;
                (upto > 0).then_some(SnapshotCursor {
                    upto_seq: upto,
                    after_key: 0,
                })
            }
            None => None,
        };
        if let Some(snap) = snapshot {
            let docs = self.store.documents_after(&spaces, snap.after_key, limit)?;
            let exhausted = docs.len() < limit;
            let mut entries = Vec::with_capacity(docs.len());
            let mut size = 0usize;
            let mut last_key = snap.after_key;
            let mut cut = false;
            for d in docs {
                let bytes = self.store.document_bytes(d.doc_key)?;
                size += bytes.len() + ENTRY_OVERHEAD;
                entries.push(FeedEntry {
                    seq: d.last_seq,
                    space_id: d.space_id,
                    entity_type: d.entity_type,
                    entity_id: d.entity_id,
                    version: d.version,
                    payload: FeedPayload::Snapshot(Bytes(bytes)),
                    origin: None,
                    lww_losses: Vec::new(),
                });
                last_key = d.doc_key;
                if size >= budget {
                    cut = true;
                    break;
                }
            }
            let next = if exhausted && !cut {
                PullCursor {
                    seq: snap.upto_seq,
                    snapshot: None,
                }
            } else {
                PullCursor {
                    seq: 0,
                    snapshot: Some(SnapshotCursor {
                        upto_seq: snap.upto_seq,
                        after_key: last_key,
                    }),
                }
            };
            out.push(Output::Send(
                conn,
                RelayMessage::Changes {
                    entries,
                    next,
                    caught_up: false,
                },
            ));
            return Ok(());
        }

        let rows = self.store.feed_after(&spaces, cursor.seq, limit)?;
        let full_page = rows.len() >= limit;
        let mut entries = Vec::with_capacity(rows.len());
        let mut size = 0usize;
        let mut last_seq = cursor.seq;
        let mut cut = false;
        for row in rows {
            size += row.changes.len() + ENTRY_OVERHEAD;
            last_seq = row.seq;
            let lww = self
                .schema
                .entity_type(&row.entity_type)
                .is_some_and(|t| t.policy == fieldsync_schema::Policy::Lww);
            entries.push(feed_entry(row, device_id, lww)?);
            if size >= budget {
                cut = true;
                break;
            }
        }
        let caught_up = !full_page && !cut;
        let next_seq = if caught_up {
            // Nothing visible to this user lies between the last entry and the feed's end.
            last_seq.max(self.store.max_seq()?)
        } else {
            last_seq
        };
        if caught_up && let Some(ConnState::Ready(s)) = self.conns.get_mut(&conn) {
            s.live_cursor = Some(next_seq);
        }
        out.push(Output::Send(
            conn,
            RelayMessage::Changes {
                entries,
                next: PullCursor {
                    seq: next_seq,
                    snapshot: None,
                },
                caught_up,
            },
        ));
        Ok(())
    }
}

/// A stored feed row as `device` receives it.
/// `lww`: whether the entity's type is last-writer-wins, the only policy where the relay adds
/// changes of its own to a mutation (its settlement), which the origin device still needs.
pub(crate) fn feed_entry(row: FeedRow, device: uuid::Uuid, lww: bool) -> Result<FeedEntry, StoreError> {
    let origin_is_device = row.origin_device == device;
    let changes: Vec<Bytes> = if origin_is_device && !lww {
        Vec::new()
    } else {
        ciborium::from_reader(row.changes.as_slice())
            .map_err(|e| StoreError::Corrupt(format!("feed row {}: {e}", row.seq)))?
    };
    let payload = if origin_is_device {
        // The origin has its own changes; it still needs any the relay added (LWW settlement).
        let own = device_actor(device);
        let relay_added: Vec<Bytes> = changes
            .into_iter()
            .filter(|c| parse_change(&c.0).map(|c| c.actor_id() != &own).unwrap_or(true))
            .collect();
        if relay_added.is_empty() {
            FeedPayload::Own
        } else {
            FeedPayload::Changes(relay_added)
        }
    } else {
        FeedPayload::Changes(changes)
    };
    let lww_losses: Vec<LwwLoss> = ciborium::from_reader(row.lww_losses.as_slice())
        .map_err(|e| StoreError::Corrupt(format!("feed row {} losses: {e}", row.seq)))?;
    Ok(FeedEntry {
        seq: row.seq,
        space_id: row.space_id,
        entity_type: row.entity_type,
        entity_id: row.entity_id,
        version: row.version,
        payload,
        origin: Some(Origin {
            device_id: row.origin_device,
            user_id: row.origin_user,
            mutation_id: row.mutation_id,
            hlc: row.hlc,
        }),
        lww_losses,
    })
}
