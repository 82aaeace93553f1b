//! Pull: pages of each of the user's spaces — compacted documents for a space the device has
//! no position in, then the space's feed — and the switch to live delivery once the device has
//! caught up in every space.
//!
//! A page is read in one read transaction per shard it touches, so it is one consistent view
//! even while the workers commit in between pages. A space's feed is dense (1, 2, ...) and its
//! seqs commit in order (one writer per space at a time), so a position never skips a row.

use std::collections::{BTreeMap, BTreeSet};

use fieldsync_schema::EntityDoc;
use fieldsync_schema::document::{device_actor, parse_change, relay_actor};
use fieldsync_schema::wire::{FeedPayload, SnapshotCursor, SpaceCursor, entry_size};
use fieldsync_schema::{Bytes, FeedEntry, LwwLoss, Origin, Policy, PullCursor, RelayMessage};
use uuid::Uuid;

use super::{ConnState, Front};
use crate::core::{ConnId, Output};
use crate::store::{Directory, FeedRow, SpaceStore, StoreError};

/// Who a page is for: the device (its own changes are left out), the types it holds, for a
/// device that syncs by windows the time its windows are placed around, and whether it takes
/// reference data last (`priority_order`) or not at all for now (`metered`).
#[derive(Clone, Copy)]
pub(super) struct PageReader<'a> {
    device_id: Uuid,
    types: Option<&'a BTreeSet<String>>,
    windowed_at_ms: Option<u64>,
    priority_order: bool,
    metered: bool,
}

impl PageReader<'_> {
    /// Whether the device holds records of `entity_type` (selective sync).
    fn holds(&self, entity_type: &str) -> bool {
        self.types.is_none_or(|t| t.contains(entity_type))
    }
}

/// A page being filled.
struct Page {
    entries: Vec<FeedEntry>,
    room: usize,
    bytes: usize,
    budget: usize,
}

impl Page {
    fn full(&self) -> bool {
        self.room == 0 || self.bytes >= self.budget
    }

    fn push(&mut self, entry: FeedEntry) {
        self.bytes += entry_size(&entry);
        self.room = self.room.saturating_sub(1);
        self.entries.push(entry);
    }
}

impl<D: Directory, R: SpaceStore> Front<D, R> {
    pub(super) fn on_pull(
        &mut self,
        conn: ConnId,
        cursor: PullCursor,
        max_entries: u32,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        let Some(ConnState::Ready(s)) = self.conns.get(&conn) else {
            return Ok(());
        };
        let device_id = s.device_id;
        let types = s.types.clone();
        let windowed_at_ms = s.windowed.then_some(now_ms);
        let (priority_order, metered) = (s.priority_order, s.metered);
        let spaces: Vec<Uuid> = s.spaces.keys().copied().collect();
        let mut shards = BTreeMap::new();
        for space in &spaces {
            if let Some(shard) = self.shard(*space) {
                shards.insert(*space, shard);
            }
        }
        // One read transaction per shard the page may touch.
        let touched: BTreeSet<u32> = shards.values().copied().collect();
        let who = PageReader {
            device_id,
            types: types.as_ref(),
            windowed_at_ms,
            priority_order,
            metered,
        };
        self.in_read_transactions(&touched, |front, _| {
            front.pull_page(conn, who, &spaces, &shards, cursor, max_entries, out)
        })
    }

    /// Runs `read` inside one read transaction on each of `shards` (each one consistent view
    /// while the workers commit in between), given the shards it opened.
    pub(super) fn in_read_transactions<T>(
        &mut self,
        shards: &BTreeSet<u32>,
        read: impl FnOnce(&mut Self, &[u32]) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut opened = Vec::new();
        let mut began = Ok(());
        for shard in shards {
            match self.readers.get_mut(*shard as usize).map(|r| r.begin_read()) {
                Some(Ok(())) => opened.push(*shard),
                Some(Err(e)) => {
                    began = Err(e);
                    break;
                }
                None => {}
            }
        }
        let answer = began.and_then(|()| read(self, &opened));
        let mut ended = Ok(());
        for shard in opened {
            if let Some(r) = self.readers.get_mut(shard as usize)
                && let Err(e) = r.end_read()
                && ended.is_ok()
            {
                ended = Err(e);
            }
        }
        let answer = answer?;
        ended.map(|()| answer)
    }

    #[allow(clippy::too_many_arguments)]
    fn pull_page(
        &mut self,
        conn: ConnId,
        who: PageReader<'_>,
        spaces: &[Uuid],
        shards: &BTreeMap<Uuid, u32>,
        cursor: PullCursor,
        max_entries: u32,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        self.stats.pull_pages += 1;
        let mut page = Page {
            entries: Vec::new(),
            room: (max_entries as usize).clamp(1, self.config.pull_page_entries),
            bytes: 0,
            budget: self.config.pull_page_bytes,
        };
        // Positions in the spaces the user may see; a round-1 cursor converted once.
        let mut next = PullCursor::default();
        for space in spaces {
            let Some(shard) = shards.get(space) else { continue };
            let reader = &self.readers[*shard as usize];
            let position = match (cursor.spaces.get(space), cursor.legacy_seq) {
                (Some(c), _) => *c,
                (None, Some(legacy)) => SpaceCursor {
                    seq: reader.seq_at_legacy(*space, legacy)?,
                    snapshot: None,
                },
                (None, None) => SpaceCursor::default(),
            };
            next.spaces.insert(*space, position);
        }
        let mut caught_up = true;
        for space in spaces {
            let Some(shard) = shards.get(space) else { continue };
            let Some(position) = next.spaces.get(space).copied() else {
                continue;
            };
            if page.full() {
                caught_up = false;
                break;
            }
            let (position, exhausted) = self.fill_from_space(*shard, *space, position, who, &mut page)?;
            next.spaces.insert(*space, position);
            if !exhausted {
                caught_up = false;
                break;
            }
        }
        if caught_up && let Some(ConnState::Ready(s)) = self.conns.get_mut(&conn) {
            let live: BTreeMap<Uuid, u64> = next.spaces.iter().map(|(k, c)| (*k, c.seq)).collect();
            for (space, seq) in &live {
                // The first live session of a space: fan-out continues from what it saw.
                self.fanned.entry(*space).or_insert(*seq);
            }
            s.live = Some(live);
        }
        out.push(Output::Send(
            conn,
            RelayMessage::Changes {
                entries: page.entries,
                next,
                caught_up,
            },
        ));
        Ok(())
    }

    /// Adds what `space` has after `position` to the page; returns the new position and
    /// whether the space is exhausted.
    fn fill_from_space(
        &self,
        shard: u32,
        space: Uuid,
        mut position: SpaceCursor,
        who: PageReader<'_>,
        page: &mut Page,
    ) -> Result<(SpaceCursor, bool), StoreError> {
        let reader = &self.readers[shard as usize];
        // A device with no position in the space starts from its compacted documents.
        if position.seq == 0 && position.snapshot.is_none() {
            let upto = reader.max_seq(space)?;
            if upto == 0 {
                return Ok((position, true));
            }
            position.snapshot = Some(SnapshotCursor {
                upto_seq: upto,
                after_key: 0,
                low_pass: false,
            });
        }
        while let Some(snap) = position.snapshot {
            if page.full() {
                return Ok((position, false));
            }
            let want = page.room;
            let docs = reader.documents_after(space, snap.after_key, want)?;
            let got = docs.len();
            let mut taken = 0;
            let mut last_key = snap.after_key;
            for d in docs {
                last_key = d.doc_key;
                taken += 1;
                if !self.sends(who, &d.entity_type) {
                    continue;
                }
                // In priority order, the first walk leaves reference data for the second.
                if who.priority_order && self.is_low_priority(&d.entity_type) != snap.low_pass {
                    continue;
                }
                if let Some(now_ms) = who.windowed_at_ms
                    && let Some(day) = d.window_day
                    && !self.in_window_day(&d.entity_type, day, now_ms)
                {
                    continue;
                }
                let bytes = reader.document_bytes(d.doc_key)?;
                if let Some(now_ms) = who.windowed_at_ms
                    && d.window_day.is_none()
                    && !self.in_window(&d.entity_type, &bytes, now_ms)
                {
                    continue;
                }
                page.push(FeedEntry {
                    seq: d.last_seq,
                    space_id: d.space_id,
                    entity_type: d.entity_type,
                    entity_id: d.entity_id,
                    version: d.version,
                    payload: FeedPayload::Snapshot(Bytes(bytes)),
                    origin: None,
                    lww_losses: Vec::new(),
                });
                if page.full() {
                    break;
                }
            }
            // Done when every document there was fitted; otherwise the next page goes on.
            if !(taken == got && got < want) {
                position.snapshot = Some(SnapshotCursor {
                    after_key: last_key,
                    ..snap
                });
                return Ok((position, false));
            }
            if who.priority_order && !snap.low_pass && !who.metered {
                // The second walk: the low-priority types (a metered device defers them).
                position.snapshot = Some(SnapshotCursor {
                    upto_seq: snap.upto_seq,
                    after_key: 0,
                    low_pass: true,
                });
            } else {
                // A document saved after `upto_seq` also comes again through the feed; applying
                // a change twice is a no-op.
                position = SpaceCursor {
                    seq: snap.upto_seq,
                    snapshot: None,
                };
            }
        }
        if page.full() {
            return Ok((position, false));
        }
        let want = page.room;
        let rows = reader.feed_range(space, position.seq, u64::MAX, want)?;
        let got = rows.len();
        let mut taken = 0;
        for row in rows {
            position.seq = row.seq;
            taken += 1;
            if !self.sends(who, &row.entity_type) {
                continue;
            }
            let relay_writes = relay_may_add_changes(&self.schema, &row.entity_type);
            page.push(feed_entry(row, who.device_id, relay_writes)?);
            if page.full() {
                break;
            }
        }
        Ok((position, taken == got && got < want))
    }
}

impl<D: Directory, R: SpaceStore> Front<D, R> {
    /// Whether records of `entity_type` go to this reader at all: a type it holds (selective
    /// sync), and not reference data while it is on a metered link.
    fn sends(&self, who: PageReader<'_>, entity_type: &str) -> bool {
        who.holds(entity_type) && !(who.metered && self.is_low_priority(entity_type))
    }

    /// Reference data (`priority = "low"` in the schema).
    pub(super) fn is_low_priority(&self, entity_type: &str) -> bool {
        self.schema.entity_type(entity_type).is_some_and(|t| t.low_priority)
    }

    /// Whether a document of `entity_type` the store dated at `day` lies inside its type's
    /// sync window at `now_ms` (always, for a type without one).
    fn in_window_day(&self, entity_type: &str, day: i64, now_ms: u64) -> bool {
        self.schema
            .entity_type(entity_type)
            .and_then(|t| t.window.as_ref())
            .is_none_or(|w| w.contains_day(day, now_ms))
    }

    /// The same for a document the store has no day for (undated, or written before days were
    /// kept): read from the document itself. A document that does not decode is sent: the
    /// window leaves out only what it can date.
    fn in_window(&self, entity_type: &str, bytes: &[u8], now_ms: u64) -> bool {
        let Some(ty) = self.schema.entity_type(entity_type) else {
            return true;
        };
        let Some(window) = &ty.window else { return true };
        match EntityDoc::load(bytes, relay_actor(self.relay_id)) {
            Ok(doc) => window.contains(&ty.view(doc.fields()), now_ms),
            Err(_) => true,
        }
    }
}

/// Whether the relay may add changes of its own to a mutation of `entity_type`, which the
/// origin device then still needs: the settlement of a last-writer-wins type, the copy of a
/// renamed field to its other names, the settlement of a field-authority merge and the flag on
/// a possible duplicate (SPEC §17). (A type whose rename was later dropped from the schema
/// keeps its old rows: their origins received those changes when they were new.)
pub(crate) fn relay_may_add_changes(schema: &fieldsync_schema::Schema, entity_type: &str) -> bool {
    schema.entity_type(entity_type).is_some_and(|t| {
        t.policy == Policy::Lww
            || t.has_authority()
            || t.duplicates.is_some()
            || t.fields.values().any(|f| !f.renamed_from.is_empty())
    })
}

/// A stored feed row as `device` receives it. `relay_writes`: see [`relay_may_add_changes`];
/// without it the origin's entry is `Own` without decoding the row.
pub(crate) fn feed_entry(row: FeedRow, device: uuid::Uuid, relay_writes: bool) -> Result<FeedEntry, StoreError> {
    let origin_is_device = row.origin_device == device;
    let changes: Vec<Bytes> = if origin_is_device && !relay_writes {
        Vec::new()
    } else {
        ciborium::from_reader(row.changes.as_slice())
            .map_err(|e| StoreError::Corrupt(format!("feed row {}: {e}", row.seq)))?
    };
    let payload = if origin_is_device {
        // The origin has its own changes; it still needs any the relay added.
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
