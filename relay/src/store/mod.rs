//! The relay's storage, behind traits.
//!
//! Two kinds of store, because they are written by different parts of the relay:
//! - the [`Directory`] — spaces (and the shard each lives in), users, memberships, enrollment
//!   tokens, devices — read and written by the session front (handshakes, enrollment, admin);
//! - the [`SpaceStore`]s — one per shard: the documents, feeds, receipts, audit chains and
//!   conflict archive of the spaces assigned to it — each written by one apply worker, so
//!   different spaces commit in parallel.
//!
//! Each space is its own ordering domain (SPEC §7, §10): a dense feed sequence and a
//! hash-chained audit log, read ([`SpaceStore::space_head`]) and advanced inside the
//! transaction that writes the space's next mutation. Nothing assumes this process is the only
//! writer: a PostgreSQL backend (several relays, SPEC §13) implements the same traits with the
//! space's head row locked for the commit.
//!
//! SQLite ([`sqlite::SqliteBackend`]) is the embedded default: `DIR/relay.db` is the directory,
//! `DIR/shards/shard-N.db` the shards.

pub mod consistency;
pub mod postgres;
mod rows;
pub mod sqlite;

pub use rows::*;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    /// SQLite could not grow a file (`SQLITE_FULL`): the disk, or a size limit. Nothing of the
    /// failed transaction was kept; it works again once there is space.
    #[error("the relay's disk is full ({0}); nothing of this write was kept, and writes resume once space is freed")]
    StorageFull(rusqlite::Error),
    /// A PostgreSQL store's error (connection, statement, constraint), as text: the client's
    /// error type is not `Clone` and carries nothing the callers branch on.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The store's at-rest key is missing, wrong or malformed: nothing was opened or changed.
    #[error("{0}")]
    Key(String),
}

impl From<fieldsync_schema::sqlite_key::KeyError> for StoreError {
    fn from(e: fieldsync_schema::sqlite_key::KeyError) -> Self {
        match e {
            fieldsync_schema::sqlite_key::KeyError::Sqlite(e) => e.into(),
            other => StoreError::Key(other.to_string()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Appends the Automerge changes of a feed row (`FeedRow::changes`, CBOR) to `out`: a stored
/// document is its snapshot followed by these.
pub(crate) fn append_feed_changes(blob: &[u8], out: &mut Vec<u8>) -> StoreResult<()> {
    let changes: Vec<fieldsync_schema::Bytes> =
        ciborium::from_reader(blob).map_err(|e| StoreError::Corrupt(format!("feed changes: {e}")))?;
    for c in changes {
        out.extend_from_slice(&c.0);
    }
    Ok(())
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            StoreError::StorageFull(e)
        } else {
            StoreError::Sqlite(e)
        }
    }
}

/// Opens the stores of one relay: its directory and a handle on each shard. Every call opens a
/// new handle (a connection of its own), so the front, each worker and the admin tools each
/// hold theirs.
pub trait Backend {
    type Directory: Directory;
    type Shard: SpaceStore;
    fn open_directory(&self) -> StoreResult<Self::Directory>;
    fn open_shard(&self, shard: u32) -> StoreResult<Self::Shard>;
    /// How many shards the data is spread over (fixed when the store was created).
    fn shard_count(&self) -> u32;

    /// Whether every shard's handle reads the same tables (one database): then a shard's own
    /// receipt and document lookups already see every space's, and a worker needs no handles
    /// on the other shards to keep ids relay-wide.
    fn shards_share_tables(&self) -> bool {
        false
    }
}

/// Who may do what. Written by enrollment, key rotation, `touch_device` and the admin tools.
pub trait Directory {
    /// The relay's identity, created on first open.
    fn relay_id(&self) -> Uuid;
    fn shard_count(&self) -> u32;

    fn begin(&mut self) -> StoreResult<()>;
    fn commit(&mut self) -> StoreResult<()>;
    fn rollback(&mut self) -> StoreResult<()>;

    // --- tenants and identities
    /// Creates a space in the shard that holds the fewest spaces.
    fn create_space(&mut self, space_id: Uuid, name: &str, now_ms: u64) -> StoreResult<SpaceRow>;
    fn space(&self, space_id: Uuid) -> StoreResult<Option<SpaceRow>>;
    fn space_by_name(&self, name: &str) -> StoreResult<Option<SpaceRow>>;
    fn spaces(&self) -> StoreResult<Vec<SpaceRow>>;
    fn create_user(&mut self, user_id: Uuid, name: &str, now_ms: u64) -> StoreResult<()>;
    fn user(&self, user_id: Uuid) -> StoreResult<Option<UserRow>>;
    fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRow>>;
    fn users(&self) -> StoreResult<Vec<UserRow>>;
    /// Adds or changes the user's role in a space.
    fn set_membership(&mut self, user_id: Uuid, space_id: Uuid, role: fieldsync_schema::Role) -> StoreResult<()>;
    fn remove_membership(&mut self, user_id: Uuid, space_id: Uuid) -> StoreResult<bool>;
    fn memberships(&self, user_id: Uuid) -> StoreResult<Vec<MembershipRow>>;

    // --- devices and enrollment
    fn create_token(&mut self, token_hash: [u8; 32], user_id: Uuid, now_ms: u64, expires_ms: u64) -> StoreResult<()>;
    fn token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<TokenRow>>;
    fn tokens(&self) -> StoreResult<Vec<TokenRow>>;
    fn use_token(&mut self, token_hash: &[u8; 32], device_id: Uuid, now_ms: u64) -> StoreResult<()>;
    fn expire_token(&mut self, token_hash: &[u8; 32], now_ms: u64) -> StoreResult<bool>;
    /// The label a device enrolled with this token gets.
    fn set_token_label(&mut self, token_hash: &[u8; 32], label: &str) -> StoreResult<()>;
    /// Names a device for people; `false` when there is no such device.
    fn set_device_label(&mut self, device_id: Uuid, label: &str) -> StoreResult<bool>;
    fn register_device(&mut self, device_id: Uuid, user_id: Uuid, public_key: &[u8], now_ms: u64) -> StoreResult<()>;
    fn device(&self, device_id: Uuid) -> StoreResult<Option<DeviceRow>>;
    fn devices(&self) -> StoreResult<Vec<DeviceRow>>;
    fn revoke_device(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<bool>;
    /// Asks for a revoked device's local data to be erased at its next contact; `false` when
    /// there is no such revoked device or a wipe was already asked for.
    fn request_wipe(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<bool>;
    /// Records the device's report that it erased its data; `false` when no wipe was pending.
    fn record_wipe(&mut self, device_id: Uuid, now_ms: u64, discarded: u64) -> StoreResult<bool>;
    /// Records that `device_id` is the new identity of the revoked device `replaces`.
    fn set_device_replaces(&mut self, device_id: Uuid, replaces: Uuid) -> StoreResult<()>;
    /// The device that took over from `device_id`, if one did.
    fn replaced_by(&self, device_id: Uuid) -> StoreResult<Option<Uuid>>;
    fn set_device_key(&mut self, device_id: Uuid, public_key: &[u8]) -> StoreResult<()>;
    fn touch_device(&mut self, device_id: Uuid, now_ms: u64) -> StoreResult<()>;

    /// Devices revoked after `since_ms` (the front closes their connections).
    fn revoked_since(&self, since_ms: u64) -> StoreResult<Vec<(Uuid, u64)>>;
    /// A number that changes whenever memberships or revocations may have changed: another
    /// connection (the admin CLI, another process) committed, or this handle wrote them. The
    /// front's tick re-reads them only when it moves.
    fn outside_writes_marker(&self) -> StoreResult<u64>;
    fn counts(&self) -> StoreResult<DirectoryCounts>;
    /// The round-1 global audit chain a migrated store keeps (`v1_audit`), by row id; empty for
    /// a store created in the per-space layout.
    fn round_one_audit_after(&self, after_id: u64, limit: usize) -> StoreResult<Vec<AuditRow>>;

    /// The schemas this relay has served, in the order it first served them.
    fn served_schemas(&self) -> StoreResult<Vec<ServedSchema>>;
    /// Records that the relay serves a schema (kept once per hash; serving it again is a no-op).
    fn record_served_schema(&mut self, schema: &ServedSchema) -> StoreResult<()>;
    /// Marks a served schema retired: a later schema broke it with the operator's consent.
    fn retire_served_schema(&mut self, hash: &str, now_ms: u64) -> StoreResult<()>;
}

/// The data of the spaces in one shard. One writer per shard at a time in this process (its
/// apply worker); the front and the admin tools read through handles of their own.
///
/// Writes happen between [`SpaceStore::begin`] and [`SpaceStore::commit`]; the worker commits
/// once per group and releases outcomes only afterwards.
pub trait SpaceStore {
    fn begin(&mut self) -> StoreResult<()>;
    fn commit(&mut self) -> StoreResult<()>;
    fn rollback(&mut self) -> StoreResult<()>;
    /// A read-only transaction: one consistent view for a run of reads (a pull page).
    fn begin_read(&mut self) -> StoreResult<()>;
    fn end_read(&mut self) -> StoreResult<()>;

    /// Where the space's feed and audit chain stand (zero and genesis for a new space). Read
    /// inside the writing transaction, it is the head the next mutation builds on.
    fn space_head(&self, space_id: Uuid) -> StoreResult<SpaceHead>;
    fn set_space_head(&mut self, space_id: Uuid, head: &SpaceHead) -> StoreResult<()>;

    // --- documents and the feed
    /// The entity, if this shard holds it (whatever its space: the caller checks).
    fn document(&self, entity_id: Uuid) -> StoreResult<Option<DocumentRow>>;
    /// The document's Automerge bytes: its snapshot followed by every change applied since.
    fn document_bytes(&self, doc_key: u64) -> StoreResult<Vec<u8>>;
    /// Creates the row of a new entity at version 0; returns its doc key.
    fn insert_document(&mut self, entity_id: Uuid, space_id: Uuid, entity_type: &str, now_ms: u64) -> StoreResult<u64>;
    /// Records the state after the mutation that wrote feed row `seq`.
    fn update_document(&mut self, doc_key: u64, update: &DocumentUpdate, seq: u64, now_ms: u64) -> StoreResult<()>;
    /// Replaces the stored snapshot (compaction): `bytes` covers every change up to `upto_seq`.
    fn save_snapshot(&mut self, doc_key: u64, bytes: &[u8], upto_seq: u64) -> StoreResult<()>;
    /// How many feed rows of this document were applied since its snapshot.
    fn changes_since_snapshot(&self, doc_key: u64) -> StoreResult<u64>;
    /// Appends `row` at `row.seq`, which must be the space head's next seq.
    fn append_feed(&mut self, row: &FeedRow) -> StoreResult<()>;
    /// The space's last committed seq (0: none).
    fn max_seq(&self, space_id: Uuid) -> StoreResult<u64>;
    /// The space's feed rows with `after < seq <= upto`, oldest first, at most `limit`.
    fn feed_range(&self, space_id: Uuid, after: u64, upto: u64, limit: usize) -> StoreResult<Vec<FeedRow>>;
    /// Feed rows of one document with a version above `after_version`, oldest first.
    fn feed_for_document(&self, doc_key: u64, after_version: u64) -> StoreResult<Vec<FeedRow>>;
    /// The space's documents with a key above `after_key`, in key order.
    fn documents_after(&self, space_id: Uuid, after_key: u64, limit: usize) -> StoreResult<Vec<DocumentRow>>;
    /// The per-space seq a cursor at `legacy_seq` of the round-1 global feed had reached: the
    /// last migrated row of the space at or below it.
    fn seq_at_legacy(&self, space_id: Uuid, legacy_seq: u64) -> StoreResult<u64>;

    // --- receipts, audit, archive
    /// Records (or, with `key = None`, forgets) a record's possible-duplicate key (SPEC §17):
    /// the values of its type's `same` fields and its `near` time.
    fn put_duplicate_key(&mut self, row: &DuplicateKeyRow) -> StoreResult<()>;
    /// Live records of `entity_type` in `space_id` with the same key and a time within
    /// `from_ms..=to_ms`, oldest first.
    fn duplicate_candidates(
        &self,
        space_id: Uuid,
        entity_type: &str,
        key: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<Uuid>>;
    fn receipt(&self, mutation_id: Uuid) -> StoreResult<Option<ReceiptRow>>;
    fn put_receipt(&mut self, row: &ReceiptRow) -> StoreResult<()>;
    fn append_audit(&mut self, row: &AuditRow) -> StoreResult<u64>;
    /// The space's audit records with `audit_seq > after`, in chain order.
    fn audit_after(&self, space_id: Uuid, after: u64, limit: usize) -> StoreResult<Vec<AuditRow>>;
    fn archive(&mut self, row: &ArchiveRow) -> StoreResult<u64>;
    fn archive_rows(&self, limit: usize) -> StoreResult<Vec<ArchiveRow>>;
    /// Every space this shard holds data of.
    fn spaces_held(&self) -> StoreResult<Vec<Uuid>>;
    fn counts(&self) -> StoreResult<ShardCounts>;

    /// Lost connections to the store replaced since the last call (the server's metric; a
    /// store of local files has none to lose).
    fn take_reconnects(&mut self) -> u64 {
        0
    }
    /// How long each commit took since the last call (the server's commit-latency metric;
    /// never read by the core).
    fn take_commit_times(&mut self) -> Vec<std::time::Duration> {
        Vec::new()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DirectoryCounts {
    pub spaces: u64,
    pub users: u64,
    pub devices: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardCounts {
    pub documents: u64,
    pub feed: u64,
    pub receipts: u64,
    pub audit: u64,
    pub archive: u64,
}

impl std::ops::AddAssign for ShardCounts {
    fn add_assign(&mut self, o: ShardCounts) {
        self.documents += o.documents;
        self.feed += o.feed;
        self.receipts += o.receipts;
        self.audit += o.audit;
        self.archive += o.archive;
    }
}

/// Everything a relay holds, counted (stats, restore drills).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub spaces: u64,
    pub users: u64,
    pub devices: u64,
    pub documents: u64,
    pub feed: u64,
    pub receipts: u64,
    pub audit: u64,
    pub archive: u64,
}

impl Counts {
    /// Everything `backend` holds, counted over its directory and every shard.
    pub fn of_store<B: Backend>(backend: &B) -> StoreResult<Counts> {
        let directory = backend.open_directory()?.counts()?;
        let mut shards = ShardCounts::default();
        for n in 0..backend.shard_count() {
            shards += backend.open_shard(n)?.counts()?;
        }
        Ok(Counts::of(directory, shards))
    }

    pub fn of(directory: DirectoryCounts, shards: ShardCounts) -> Self {
        Counts {
            spaces: directory.spaces,
            users: directory.users,
            devices: directory.devices,
            documents: shards.documents,
            feed: shards.feed,
            receipts: shards.receipts,
            audit: shards.audit,
            archive: shards.archive,
        }
    }
}
