//! Fetch (SPEC §16): records a device asks for by id — one its windows left out of its first
//! download, one a held record references, one it evicted — each whole, as its compacted
//! document.
//!
//! The same disclosure rule as a pull page: only a document of a space the device's user is a
//! member of is sent. An id that is not found and one that is not the user's to see get the
//! same answer (`unknown`), so a fetch cannot probe other spaces for ids.

use std::collections::BTreeSet;

use fieldsync_schema::wire::{FeedPayload, MAX_FETCH, entry_size};
use fieldsync_schema::{Bytes, FeedEntry, RelayMessage};
use uuid::Uuid;

use super::{ConnState, Front};
use crate::core::{ConnId, Output};
use crate::store::{Directory, SpaceStore, StoreError};

impl<D: Directory, R: SpaceStore> Front<D, R> {
    pub(super) fn on_fetch(&mut self, conn: ConnId, ids: Vec<Uuid>, out: &mut Vec<Output>) -> Result<(), StoreError> {
        let Some(ConnState::Ready(s)) = self.conns.get(&conn) else {
            return Ok(());
        };
        if ids.len() > MAX_FETCH {
            let reason = format!("a fetch asks for at most {MAX_FETCH} records, not {}", ids.len());
            self.protocol_close(conn, &reason, out);
            return Ok(());
        }
        let spaces: BTreeSet<Uuid> = s.spaces.keys().copied().collect();
        // Every shard holding one of the user's spaces, each read in one transaction.
        let shards: BTreeSet<u32> = spaces.iter().filter_map(|space| self.shard(*space)).collect();
        let answer =
            self.in_read_transactions(&shards, |front, opened| front.fetch_documents(&ids, &spaces, opened))?;
        self.stats.fetches += 1;
        out.push(Output::Send(conn, answer));
        Ok(())
    }

    /// The answer to a fetch of `ids` by a member of `spaces`, read from `shards`.
    fn fetch_documents(
        &self,
        ids: &[Uuid],
        spaces: &BTreeSet<Uuid>,
        shards: &[u32],
    ) -> Result<RelayMessage, StoreError> {
        let budget = self.config.pull_page_bytes;
        let mut entries = Vec::new();
        let mut unknown = Vec::new();
        let mut later = Vec::new();
        let mut bytes_so_far = 0;
        let mut seen = BTreeSet::new();
        for id in ids {
            if !seen.insert(*id) {
                continue;
            }
            if bytes_so_far >= budget {
                later.push(*id);
                continue;
            }
            let mut found = None;
            for shard in shards {
                let reader = &self.readers[*shard as usize];
                if let Some(d) = reader.document(*id)?
                    && spaces.contains(&d.space_id)
                {
                    let bytes = reader.document_bytes(d.doc_key)?;
                    found = Some((d, bytes));
                    break;
                }
            }
            let Some((d, bytes)) = found else {
                unknown.push(*id);
                continue;
            };
            let entry = FeedEntry {
                seq: d.last_seq,
                space_id: d.space_id,
                entity_type: d.entity_type,
                entity_id: d.entity_id,
                version: d.version,
                payload: FeedPayload::Snapshot(Bytes(bytes)),
                origin: None,
                lww_losses: Vec::new(),
            };
            bytes_so_far += entry_size(&entry);
            entries.push(entry);
        }
        Ok(RelayMessage::Fetched {
            entries,
            unknown,
            later,
        })
    }
}
