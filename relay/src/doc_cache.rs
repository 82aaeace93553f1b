//! A bounded least-recently-used cache of loaded Automerge documents.
//!
//! Loading a document means parsing its snapshot and replaying the changes since; for a hot
//! record edited by many devices that dominates the cost of a mutation. The cache keeps the
//! parsed document together with the version it reflects; a caller must compare that version
//! with the row it just read inside its transaction and reload on mismatch, so a second relay
//! process writing the same database (SPEC §13) can never make this one apply to a stale copy.

use std::collections::{BTreeMap, HashMap};

use fieldsync_schema::EntityDoc;

struct Entry {
    version: u64,
    doc: EntityDoc,
    generation: u64,
}

pub struct DocCache {
    capacity: usize,
    entries: HashMap<u64, Entry>,
    /// generation → doc key; the smallest generation is the least recently used.
    order: BTreeMap<u64, u64>,
    next_generation: u64,
}

impl DocCache {
    pub fn new(capacity: usize) -> Self {
        DocCache {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_generation: 0,
        }
    }

    /// Takes the document out if it is cached at exactly `version`.
    pub fn take(&mut self, doc_key: u64, version: u64) -> Option<EntityDoc> {
        let entry = self.entries.remove(&doc_key)?;
        self.order.remove(&entry.generation);
        (entry.version == version).then_some(entry.doc)
    }

    /// Puts a document back, as of `version`.
    pub fn put(&mut self, doc_key: u64, version: u64, doc: EntityDoc) {
        if let Some(old) = self.entries.remove(&doc_key) {
            self.order.remove(&old.generation);
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.order.insert(generation, doc_key);
        self.entries.insert(
            doc_key,
            Entry {
                version,
                doc,
                generation,
            },
        );
        while self.entries.len() > self.capacity {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&victim);
        }
    }

    pub fn invalidate(&mut self, doc_key: u64) {
        if let Some(old) = self.entries.remove(&doc_key) {
            self.order.remove(&old.generation);
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use fieldsync_schema::document::device_actor;
    use uuid::Uuid;

    use super::*;

    fn doc() -> EntityDoc {
        EntityDoc::new(device_actor(Uuid::nil()))
    }

    #[test]
    fn returns_only_the_cached_version_and_evicts_the_least_recently_used() {
        let mut c = DocCache::new(2);
        c.put(1, 5, doc());
        c.put(2, 1, doc());
        assert!(c.take(1, 4).is_none(), "stale version must not be served");
        c.put(1, 6, doc());
        c.put(3, 1, doc()); // evicts 2, the least recently used
        assert!(c.take(2, 1).is_none());
        assert!(c.take(1, 6).is_some());
        assert!(c.take(3, 1).is_some());
        assert!(c.is_empty());
    }
}
