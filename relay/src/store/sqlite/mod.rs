//! The embedded SQLite store: `DIR/relay.db` (the directory) and `DIR/shards/shard-N.db` (the
//! spaces' data, spread over a fixed number of shards so that different spaces commit in
//! parallel: SQLite takes one writer per file). Every file is WAL with `synchronous=FULL`, so a
//! committed transaction survives power loss, and writes use `BEGIN IMMEDIATE`, so a group
//! commit takes the write lock up front instead of failing half way when an admin command
//! writes at the same time.

mod columns;
mod directory;
pub mod extra;
pub mod health;
mod migrate;
mod shard;

use std::path::{Path, PathBuf};

use fieldsync_schema::sqlite_key::{self, DatabaseKey};
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

pub use super::consistency::Consistency;
pub use directory::SqliteDirectory;
pub use shard::SqliteShard;

use super::{Backend, StoreError, StoreResult};

/// The directory database of a data directory.
pub const DB_FILE: &str = "relay.db";
/// Where the shard files live, inside the data directory.
pub const SHARDS_DIR: &str = "shards";
/// Shards of a new data directory: enough for the workers of a small machine, few enough that
/// a group touching every shard pays for few fsyncs.
pub const DEFAULT_SHARDS: u32 = 4;
/// The layout version this build writes (`meta.layout` of the directory): 2 = directory +
/// shards with per-space order. A round-1 `relay.db` (one file, one global order) has none and
/// is migrated on open.
pub const LAYOUT: u64 = 2;

/// The file of shard `n`.
pub fn shard_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(SHARDS_DIR).join(format!("shard-{n}.db"))
}

/// Every file of a data directory's store, the directory first.
pub fn store_files(dir: &Path, shards: u32) -> Vec<PathBuf> {
    let mut files = vec![dir.join(DB_FILE)];
    files.extend((0..shards).map(|n| shard_path(dir, n)));
    files
}

/// Opens a SQLite file with the relay's settings (WAL, `synchronous=FULL`, a busy timeout, a
/// prepared-statement cache that holds every statement the store uses), encrypted at rest with
/// `key` if given (a wrong or missing key is [`StoreError::Key`], never a new empty file).
pub(crate) fn connect(path: &Path, key: Option<&DatabaseKey>) -> StoreResult<Connection> {
    let conn = sqlite_key::open_rw(path, key)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!(
            "could not enable WAL on {} (journal_mode={mode})",
            path.display()
        )));
    }
    conn.execute_batch(
        "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000; PRAGMA cache_size=-8192;",
    )?;
    // Every hot statement stays prepared: rusqlite's default cache (16) is smaller than the
    // store's set of statements, and re-parsing SQL showed up in profiles.
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

pub(crate) fn meta_u64(conn: &Connection, key: &str) -> StoreResult<Option<u64>> {
    let v: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?;
    Ok(v.map(|v| v as u64))
}

pub(crate) fn set_meta_u64(conn: &Connection, key: &str, value: u64) -> StoreResult<()> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value as i64],
    )?;
    Ok(())
}

/// Whether opening may migrate a round-1 store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Migrate {
    Yes,
    No,
}

/// A relay data directory on SQLite: creates the layout on first open, migrates a round-1
/// directory in place, and opens connections to its files.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    dir: PathBuf,
    relay_id: Uuid,
    shards: u32,
    /// The key every file of the store is encrypted with at rest (`None`: plaintext files).
    key: Option<DatabaseKey>,
}

impl SqliteBackend {
    /// Opens (creating if needed, migrating a round-1 store) the store in `dir`. `new_relay_id`
    /// names a relay created now; an existing store keeps its own id. For `serve`, which holds
    /// the directory's lock.
    pub fn open(dir: &Path, new_relay_id: Uuid) -> StoreResult<Self> {
        Self::open_with(dir, new_relay_id, DEFAULT_SHARDS)
    }

    /// [`SqliteBackend::open`], with the number of shards a new store is created with.
    pub fn open_with(dir: &Path, new_relay_id: Uuid, new_shards: u32) -> StoreResult<Self> {
        Self::open_inner(dir, new_relay_id, new_shards, Migrate::Yes, None)
    }

    /// [`SqliteBackend::open_with`] for a store encrypted at rest with `key` (a new store is
    /// created encrypted; `None` is a plaintext store).
    pub fn open_keyed(dir: &Path, new_relay_id: Uuid, new_shards: u32, key: Option<DatabaseKey>) -> StoreResult<Self> {
        Self::open_inner(dir, new_relay_id, new_shards, Migrate::Yes, key)
    }

    /// Opens an existing store, migrating a round-1 one (restore drills and restores, on their
    /// own copies). Refuses a directory without one: an operator's typo must not create an
    /// empty relay.
    pub fn open_existing(dir: &Path) -> StoreResult<Self> {
        Self::open_existing_keyed(dir, None)
    }

    /// [`SqliteBackend::open_existing`] for a store encrypted with `key`.
    pub fn open_existing_keyed(dir: &Path, key: Option<DatabaseKey>) -> StoreResult<Self> {
        Self::require_store(dir)?;
        Self::open_inner(dir, Uuid::nil(), DEFAULT_SHARDS, Migrate::Yes, key)
    }

    /// Opens an existing store that is already in this build's layout (the admin tools: they
    /// run beside a serving relay, so they never migrate a store that relay may be writing).
    pub fn open_current(dir: &Path) -> StoreResult<Self> {
        Self::open_current_keyed(dir, None)
    }

    /// [`SqliteBackend::open_current`] for a store encrypted with `key`.
    pub fn open_current_keyed(dir: &Path, key: Option<DatabaseKey>) -> StoreResult<Self> {
        Self::require_store(dir)?;
        Self::open_inner(dir, Uuid::nil(), DEFAULT_SHARDS, Migrate::No, key)
    }

    fn require_store(dir: &Path) -> StoreResult<()> {
        if dir.join(DB_FILE).exists() {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!("no relay database in {}", dir.display())))
        }
    }

    fn open_inner(
        dir: &Path,
        new_relay_id: Uuid,
        new_shards: u32,
        migrate: Migrate,
        key: Option<DatabaseKey>,
    ) -> StoreResult<Self> {
        std::fs::create_dir_all(dir.join(SHARDS_DIR))?;
        let conn = connect(&dir.join(DB_FILE), key.as_ref())?;
        let (relay_id, shards) = migrate::prepare(&conn, dir, new_relay_id, new_shards.max(1), migrate, key.as_ref())?;
        Ok(SqliteBackend {
            dir: dir.to_path_buf(),
            relay_id,
            shards,
            key,
        })
    }

    /// The key the store's files are encrypted with, if any.
    pub fn key(&self) -> Option<&DatabaseKey> {
        self.key.as_ref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn relay_id(&self) -> Uuid {
        self.relay_id
    }

    /// Every file of the store, the directory first.
    pub fn files(&self) -> Vec<PathBuf> {
        store_files(&self.dir, self.shards)
    }
}

impl Backend for SqliteBackend {
    type Directory = SqliteDirectory;
    type Shard = SqliteShard;

    fn open_directory(&self) -> StoreResult<SqliteDirectory> {
        SqliteDirectory::open(&self.dir.join(DB_FILE), self.key.as_ref())
    }

    fn open_shard(&self, shard: u32) -> StoreResult<SqliteShard> {
        if shard >= self.shards {
            return Err(StoreError::NotFound(format!(
                "shard {shard} (the store has {})",
                self.shards
            )));
        }
        SqliteShard::open(&shard_path(&self.dir, shard), self.key.as_ref())
    }

    fn shard_count(&self) -> u32 {
        self.shards
    }
}
