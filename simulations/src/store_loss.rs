//! A relay losing its store connection (`store_loss`, with `--relays`): the relay's handles on
//! the shared store fail every call while the connection is down, as a PostgreSQL relay's do
//! when its database restarts or fails over, and work again once it is back (the production
//! store reconnects by itself: `postgres::Conn`).
//!
//! [`LossyBackend`] wraps the SQLite store and hands the core handles that check one switch per
//! relay before each call. What a lost connection does to a transaction is kept: the
//! statements fail, `COMMIT` fails, and the transaction is rolled back underneath whatever the
//! caller does (the database does that for a dropped connection), so nothing of it is kept and
//! no other relay waits on its locks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fieldsync_relay::store::sqlite::{SqliteBackend, SqliteDirectory, SqliteShard};
use fieldsync_relay::store::*;
use fieldsync_schema::Role;
use uuid::Uuid;

/// Whether one relay's store connection is down; shared by all of that relay's handles.
#[derive(Debug, Clone, Default)]
pub struct StoreLink(Arc<AtomicBool>);

impl StoreLink {
    pub fn set_lost(&self, lost: bool) {
        self.0.store(lost, Ordering::Relaxed);
    }

    pub fn is_lost(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn check(&self) -> StoreResult<()> {
        if self.is_lost() { Err(lost()) } else { Ok(()) }
    }
}

/// The shared SQLite store as one relay reaches it, through its [`StoreLink`].
pub struct LossyBackend {
    pub inner: SqliteBackend,
    pub link: StoreLink,
}

pub struct LossyDirectory {
    inner: SqliteDirectory,
    link: StoreLink,
    in_tx: bool,
}

pub struct LossyShard {
    inner: SqliteShard,
    link: StoreLink,
    in_tx: bool,
}

impl Backend for LossyBackend {
    type Directory = LossyDirectory;
    type Shard = LossyShard;

    fn open_directory(&self) -> StoreResult<LossyDirectory> {
        Ok(LossyDirectory {
            inner: self.inner.open_directory()?,
            link: self.link.clone(),
            in_tx: false,
        })
    }

    fn open_shard(&self, shard: u32) -> StoreResult<LossyShard> {
        Ok(LossyShard {
            inner: self.inner.open_shard(shard)?,
            link: self.link.clone(),
            in_tx: false,
        })
    }

    fn shard_count(&self) -> u32 {
        self.inner.shard_count()
    }

    fn shards_share_tables(&self) -> bool {
        self.inner.shards_share_tables()
    }
}

/// Calls that fail while the link is down and otherwise go to the SQLite handle: `ref` ones
/// take `&self`, `mut` ones `&mut self`.
macro_rules! through_link {
    ($($kind:ident fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $( through_link!(@one $kind $name($($arg: $ty),*) -> $ret); )*
    };
    (@one ref $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        fn $name(&self, $($arg: $ty),*) -> StoreResult<$ret> {
            self.link.check()?;
            self.inner.$name($($arg),*)
        }
    };
    (@one mut $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        fn $name(&mut self, $($arg: $ty),*) -> StoreResult<$ret> {
            self.link.check()?;
            self.inner.$name($($arg),*)
        }
    };
}

/// The trait's `begin`, `commit` and `rollback` on a lost link: no transaction starts; one
/// under way fails to commit and is rolled back underneath (as the database does when the
/// connection drops), whatever the caller asks.
macro_rules! transactions {
    () => {
        fn begin(&mut self) -> StoreResult<()> {
            self.link.check()?;
            self.inner.begin()?;
            self.in_tx = true;
            Ok(())
        }

        fn commit(&mut self) -> StoreResult<()> {
            self.end_transaction()?;
            self.inner.commit()
        }

        fn rollback(&mut self) -> StoreResult<()> {
            self.end_transaction()?;
            self.inner.rollback()
        }
    };
}

/// Ends the handle's transaction on a lost link: rolled back underneath, and the caller told.
macro_rules! end_transaction {
    () => {
        fn end_transaction(&mut self) -> StoreResult<()> {
            if std::mem::take(&mut self.in_tx) && self.link.is_lost() {
                self.inner.rollback()?;
                return Err(lost());
            }
            Ok(())
        }
    };
}

fn lost() -> StoreError {
    StoreError::Postgres("connection to the store lost (simulated)".into())
}

impl LossyDirectory {
    end_transaction!();
}

impl LossyShard {
    end_transaction!();
}

impl Directory for LossyDirectory {
    fn relay_id(&self) -> Uuid {
        self.inner.relay_id()
    }

    fn shard_count(&self) -> u32 {
        self.inner.shard_count()
    }

    transactions!();

    through_link! {
        mut fn create_space(space_id: Uuid, name: &str, now_ms: u64) -> SpaceRow;
        ref fn space(space_id: Uuid) -> Option<SpaceRow>;
        ref fn space_by_name(name: &str) -> Option<SpaceRow>;
        ref fn spaces() -> Vec<SpaceRow>;
        mut fn create_user(user_id: Uuid, name: &str, now_ms: u64) -> ();
        ref fn user(user_id: Uuid) -> Option<UserRow>;
        ref fn user_by_name(name: &str) -> Option<UserRow>;
        ref fn users() -> Vec<UserRow>;
        mut fn set_membership(user_id: Uuid, space_id: Uuid, role: Role) -> ();
        mut fn remove_membership(user_id: Uuid, space_id: Uuid) -> bool;
        ref fn memberships(user_id: Uuid) -> Vec<MembershipRow>;
        mut fn create_token(token_hash: [u8; 32], user_id: Uuid, now_ms: u64, expires_ms: u64) -> ();
        ref fn token(token_hash: &[u8; 32]) -> Option<TokenRow>;
        ref fn tokens() -> Vec<TokenRow>;
        mut fn use_token(token_hash: &[u8; 32], device_id: Uuid, now_ms: u64) -> ();
        mut fn expire_token(token_hash: &[u8; 32], now_ms: u64) -> bool;
        mut fn set_token_label(token_hash: &[u8; 32], label: &str) -> ();
        mut fn set_device_label(device_id: Uuid, label: &str) -> bool;
        mut fn register_device(device_id: Uuid, user_id: Uuid, public_key: &[u8], now_ms: u64) -> ();
        ref fn device(device_id: Uuid) -> Option<DeviceRow>;
        ref fn devices() -> Vec<DeviceRow>;
        mut fn revoke_device(device_id: Uuid, now_ms: u64) -> bool;
        mut fn request_wipe(device_id: Uuid, now_ms: u64) -> bool;
        mut fn record_wipe(device_id: Uuid, now_ms: u64, discarded: u64) -> bool;
        mut fn set_device_replaces(device_id: Uuid, replaces: Uuid) -> ();
        ref fn replaced_by(device_id: Uuid) -> Option<Uuid>;
        mut fn set_device_key(device_id: Uuid, public_key: &[u8]) -> ();
        mut fn touch_device(device_id: Uuid, now_ms: u64) -> ();
        ref fn revoked_since(since_ms: u64) -> Vec<(Uuid, u64)>;
        ref fn outside_writes_marker() -> u64;
        ref fn counts() -> DirectoryCounts;
        ref fn round_one_audit_after(after_id: u64, limit: usize) -> Vec<AuditRow>;
        ref fn served_schemas() -> Vec<ServedSchema>;
        mut fn record_served_schema(schema: &ServedSchema) -> ();
        mut fn retire_served_schema(hash: &str, now_ms: u64) -> ();
    }
}

impl SpaceStore for LossyShard {
    transactions!();

    fn begin_read(&mut self) -> StoreResult<()> {
        self.link.check()?;
        self.inner.begin_read()?;
        self.in_tx = true;
        Ok(())
    }

    fn end_read(&mut self) -> StoreResult<()> {
        self.in_tx = false;
        self.inner.end_read()?;
        self.link.check()
    }

    through_link! {
        ref fn space_head(space_id: Uuid) -> SpaceHead;
        mut fn set_space_head(space_id: Uuid, head: &SpaceHead) -> ();
        ref fn document(entity_id: Uuid) -> Option<DocumentRow>;
        ref fn document_bytes(doc_key: u64) -> Vec<u8>;
        mut fn insert_document(entity_id: Uuid, space_id: Uuid, entity_type: &str, now_ms: u64) -> u64;
        mut fn update_document(doc_key: u64, update: &DocumentUpdate, seq: u64, now_ms: u64) -> ();
        mut fn save_snapshot(doc_key: u64, bytes: &[u8], upto_seq: u64) -> ();
        ref fn changes_since_snapshot(doc_key: u64) -> u64;
        mut fn append_feed(row: &FeedRow) -> ();
        ref fn max_seq(space_id: Uuid) -> u64;
        ref fn feed_range(space_id: Uuid, after: u64, upto: u64, limit: usize) -> Vec<FeedRow>;
        ref fn feed_for_document(doc_key: u64, after_version: u64) -> Vec<FeedRow>;
        ref fn documents_after(space_id: Uuid, after_key: u64, limit: usize) -> Vec<DocumentRow>;
        ref fn seq_at_legacy(space_id: Uuid, legacy_seq: u64) -> u64;
        ref fn receipt(mutation_id: Uuid) -> Option<ReceiptRow>;
        mut fn put_receipt(row: &ReceiptRow) -> ();
        mut fn put_duplicate_key(row: &DuplicateKeyRow) -> ();
        ref fn duplicate_candidates(space_id: Uuid, entity_type: &str, key: &str, from_ms: i64, to_ms: i64) -> Vec<Uuid>;
        mut fn append_audit(row: &AuditRow) -> u64;
        ref fn audit_after(space_id: Uuid, after: u64, limit: usize) -> Vec<AuditRow>;
        mut fn archive(row: &ArchiveRow) -> u64;
        ref fn archive_rows(limit: usize) -> Vec<ArchiveRow>;
        ref fn spaces_held() -> Vec<Uuid>;
        ref fn counts() -> ShardCounts;
    }
}
