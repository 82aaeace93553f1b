//! A relay's store, read beside the running relay (WAL allows it): the directory and every
//! shard, with the lookups end-to-end tests make across them.

use std::path::Path;

use fieldsync_relay::audit::{self, VerifyReport};
use fieldsync_relay::store::sqlite::{SqliteBackend, SqliteShard};
use fieldsync_relay::store::{ArchiveRow, AuditRow, Backend, Counts, Directory, DocumentRow, SpaceStore};
use fieldsync_schema::EntityDoc;
use fieldsync_schema::document::device_actor;
use serde_json::{Map, Value};
use uuid::Uuid;

pub struct RelayFiles {
    pub backend: SqliteBackend,
    pub shards: Vec<SqliteShard>,
}

impl RelayFiles {
    pub fn open(data: &Path) -> Self {
        let backend = SqliteBackend::open_current(data).expect("a relay store");
        let shards = (0..backend.shard_count())
            .map(|n| backend.open_shard(n).expect("a shard"))
            .collect();
        RelayFiles { backend, shards }
    }

    /// An entity's row and the shard that holds it.
    pub fn document(&self, entity: Uuid) -> Option<(DocumentRow, &SqliteShard)> {
        self.shards
            .iter()
            .find_map(|s| s.document(entity).expect("readable").map(|row| (row, s)))
    }

    /// An entity's document, version and deletion mark.
    pub fn doc(&self, entity: Uuid) -> (EntityDoc, u64, bool) {
        let (row, shard) = self.document(entity).expect("on the relay");
        let bytes = shard.document_bytes(row.doc_key).expect("readable");
        let doc = EntityDoc::load(&bytes, device_actor(Uuid::nil())).expect("a document");
        (doc, row.version, row.deleted)
    }

    pub fn fields(&self, entity: Uuid) -> Map<String, Value> {
        self.doc(entity).0.fields()
    }

    /// Whether the relay's history holds a change by `device` after which `field` read `value`.
    pub fn history_has(&self, entity: Uuid, device: Uuid, field: &str, value: &Value) -> bool {
        let (mut doc, _, _) = self.doc(entity);
        doc.all_changes()
            .iter()
            .filter(|c| fieldsync_schema::document::actor_device(c.actor_id()) == Some(device))
            .any(|c| doc.fields_at(&[c.hash()]).get(field) == Some(value))
    }

    /// The conflict archive over every shard.
    pub fn archive(&self) -> Vec<ArchiveRow> {
        self.shards
            .iter()
            .flat_map(|s| s.archive_rows(100_000).expect("readable"))
            .collect()
    }

    /// Every audit record: space by space (in space-id order), each in chain order.
    pub fn audit(&self) -> Vec<AuditRow> {
        let directory = self.backend.open_directory().expect("the directory");
        let mut spaces = directory.spaces().expect("readable");
        spaces.sort_by_key(|s| s.space_id);
        let mut out = Vec::new();
        for s in spaces {
            let shard = &self.shards[s.shard as usize];
            out.extend(shard.audit_after(s.space_id, 0, 100_000).expect("readable"));
        }
        out
    }

    pub fn counts(&self) -> Counts {
        self.backend.counts().expect("countable")
    }

    pub fn verify(&self) -> VerifyReport {
        audit::verify(&self.backend).expect("verifiable")
    }
}
