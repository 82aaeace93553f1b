//! What the relay holds, read from its data directory while it is down: every applied
//! mutation (from the per-space feeds) and whether every audit chain verifies.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use fieldsync_relay::audit;
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_relay::store::{Backend, Directory, SpaceStore};
use uuid::Uuid;

/// One applied mutation as the feed records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub entity_id: Uuid,
    pub origin_device: Uuid,
    /// How many feed entries carry this mutation id (anything but 1 is a duplicate).
    pub entries: u32,
}

#[derive(Debug, Default)]
pub struct RelayView {
    pub applied: HashMap<Uuid, Applied>,
    /// Spaces whose feed has a gap or a repeated sequence number.
    pub feeds_not_dense: u64,
    pub audit_records: u64,
    pub audit_ok: bool,
}

impl RelayView {
    /// Mutation ids the feed holds more than once.
    pub fn duplicates(&self) -> u64 {
        self.applied.values().filter(|a| a.entries > 1).count() as u64
    }
}

pub fn read(data: &Path) -> anyhow::Result<RelayView> {
    let backend =
        SqliteBackend::open_current(data).with_context(|| format!("opening the relay store {}", data.display()))?;
    let directory = backend.open_directory()?;
    let mut view = RelayView::default();
    for space in directory.spaces()? {
        let shard = backend.open_shard(space.shard)?;
        let max = shard.max_seq(space.space_id)?;
        let mut after = 0u64;
        loop {
            let rows = shard.feed_range(space.space_id, after, max, 1000)?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                if row.seq != after + 1 {
                    view.feeds_not_dense += 1;
                }
                after = row.seq;
                view.applied
                    .entry(row.mutation_id)
                    .and_modify(|a| a.entries += 1)
                    .or_insert(Applied {
                        entity_id: row.entity_id,
                        origin_device: row.origin_device,
                        entries: 1,
                    });
            }
        }
        if after != max {
            view.feeds_not_dense += 1;
        }
    }
    let chains = audit::verify(&backend)?;
    view.audit_records = chains.records;
    view.audit_ok = chains.ok();
    Ok(view)
}
