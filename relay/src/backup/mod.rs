//! Backups of a relay's store, restore drills, restores and retention.
//!
//! A backup is a directory with the same layout as a data directory's store: `relay.db` (the
//! directory) and `shards/shard-N.db`. A round-1 backup (one `relay.db` file) is still accepted
//! by the drill and by restore, which migrate it like `serve` would.
//!
//! - [`backup_store`] uses SQLite's online backup API from connections of its own, so it runs
//!   while the relay serves: each file is copied in one step inside one read transaction (WAL
//!   readers never block the writers), so each file is one consistent snapshot holding every
//!   mutation acknowledged before its copy started. The shards are copied first and the
//!   directory last: every space, user and device a shard row names was created before that row
//!   was written, so it is in the later directory copy. Each copy goes to a temp directory next
//!   to the target, is switched to self-contained rollback-journal files, fsynced and renamed
//!   into place.
//! - [`restore_drill`] proves a backup restores (see [`drill`]).
//! - [`restore`] adopts a backup as a data directory's store, after a drill (see [`restore`]).
//! - [`scheduled_backup`] is what `serve --backup-dir` runs (see [`schedule`]).

mod drill;
mod restore;
mod schedule;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fieldsync_schema::sqlite_key::{self, DatabaseKey};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

pub use drill::{DrillReport, restore_drill, restore_drill_keyed};
pub use restore::{RestoreReport, restore, restore_keyed};
pub use schedule::{SCHEDULED_PREFIX, ScheduledBackup, prune, scheduled_backup, scheduled_backups};

use crate::store::StoreError;
use crate::store::sqlite::{DB_FILE, SHARDS_DIR, shard_path};

/// Held by a serving relay; `restore` needs it too.
pub const LOCK_FILE: &str = "relay.lock";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no relay database at {}", .0.display())]
    NoDatabase(PathBuf),
    #[error("{} already exists (pass --force to replace it)", .0.display())]
    Exists(PathBuf),
    #[error("a relay is serving {} (it holds {LOCK_FILE}); stop it before restoring", .0.display())]
    InUse(PathBuf),
    #[error("the backup did not pass its restore drill: {0}")]
    DrillFailed(String),
    #[error("the backup did not finish within {0:?}: the database stayed locked")]
    Timeout(Duration),
}

/// Opens one of a store's (or a backup's) files with its at-rest key.
pub(crate) fn open_keyed(path: &Path, flags: OpenFlags, key: Option<&DatabaseKey>) -> Result<Connection, BackupError> {
    Ok(sqlite_key::open(path, flags, key).map_err(StoreError::from)?)
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io { what, path, source }
}

/// What a finished backup wrote.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    /// The backup directory.
    pub file: PathBuf,
    /// Bytes over every file of the backup.
    pub bytes: u64,
    pub files: usize,
    pub duration_ms: u64,
}

/// fsyncs a directory so that a rename inside it survives power loss.
fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot sync directory", dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn sync_file(path: &Path) -> Result<(), BackupError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("cannot sync", path))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The shard count a store's directory file records (0 for a round-1 file, which has no
/// shards), read without changing the file.
fn recorded_shards(db: &Path, key: Option<&DatabaseKey>) -> Result<u32, BackupError> {
    let conn = open_keyed(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        key,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let shards: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'shards'", [], |r| r.get(0))
        .optional()?;
    Ok(shards.unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32)
}

/// The files of a store (or a backup of one): the directory, then each shard, as paths
/// relative to its root.
fn layout_files(shards: u32) -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from(DB_FILE)];
    files.extend((0..shards).map(|n| shard_path(Path::new(""), n)));
    files
}

/// Copies the store of the data directory `data_dir` into the backup directory `to` with
/// SQLite's online backup API; the relay may be serving.
pub fn backup_store(data_dir: &Path, to: &Path, overwrite: bool) -> Result<BackupInfo, BackupError> {
    backup_store_keyed(data_dir, to, overwrite, None)
}

/// [`backup_store`] of a store encrypted at rest with `key`: the backup's files are encrypted
/// with the same key.
pub fn backup_store_keyed(
    data_dir: &Path,
    to: &Path,
    overwrite: bool,
    key: Option<&DatabaseKey>,
) -> Result<BackupInfo, BackupError> {
    let started = Instant::now();
    let db = data_dir.join(DB_FILE);
    if !db.is_file() {
        return Err(BackupError::NoDatabase(db));
    }
    if to.exists() && !overwrite {
        return Err(BackupError::Exists(to.to_path_buf()));
    }
    let parent = parent_of(to);
    std::fs::create_dir_all(&parent).map_err(io("cannot create directory", &parent))?;
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = copy_store(data_dir, &db, &tmp, key).and_then(|files| {
        if to.exists() {
            // Only with `overwrite`: the old backup goes once the new one is complete.
            if to.is_dir() {
                std::fs::remove_dir_all(to).map_err(io("cannot replace", to))?;
            } else {
                std::fs::remove_file(to).map_err(io("cannot replace", to))?;
            }
        }
        std::fs::rename(&tmp, to).map_err(io("cannot rename the backup to", to))?;
        sync_dir(&parent)?;
        Ok(files)
    });
    let files = match written {
        Ok(files) => files,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let mut bytes = 0;
    for f in &files {
        let path = to.join(f);
        bytes += std::fs::metadata(&path).map_err(io("cannot read", &path))?.len();
    }
    Ok(BackupInfo {
        file: to.to_path_buf(),
        bytes,
        files: files.len(),
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Writes every file of the store into `tmp`: the shards first, the directory last.
fn copy_store(data_dir: &Path, db: &Path, tmp: &Path, key: Option<&DatabaseKey>) -> Result<Vec<PathBuf>, BackupError> {
    std::fs::create_dir_all(tmp.join(SHARDS_DIR)).map_err(io("cannot create directory", tmp))?;
    let files = layout_files(recorded_shards(db, key)?);
    for file in files.iter().rev() {
        let (from, into) = (data_dir.join(file), tmp.join(file));
        if !from.is_file() {
            return Err(BackupError::NoDatabase(from));
        }
        copy_online(&from, &into, key)?;
        sync_file(&into)?;
    }
    sync_dir(&tmp.join(SHARDS_DIR))?;
    sync_dir(tmp)?;
    Ok(files)
}

/// Copies one SQLite file while its writer may be committing.
fn copy_online(from: &Path, into: &Path, key: Option<&DatabaseKey>) -> Result<(), BackupError> {
    // A connection of its own, never the relay's: it only reads.
    let src = open_keyed(
        from,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        key,
    )?;
    src.busy_timeout(Duration::from_secs(10))?;
    // The copy is keyed like its source: SQLCipher copies pages between files of one key.
    let mut dst = open_keyed(into, OpenFlags::default(), key)?;
    let limit = Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    {
        let backup = Backup::new(&src, &mut dst)?;
        // -1: every page in one step, inside one read transaction. Smaller steps would restart
        // from scratch whenever the relay commits in between, which under load is always.
        loop {
            match backup.step(-1)? {
                StepResult::Done => break,
                StepResult::More | StepResult::Busy | StepResult::Locked => {
                    if Instant::now() > deadline {
                        return Err(BackupError::Timeout(limit));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    // The copy carries the source's WAL flag; make it one self-contained file.
    let _: String = dst.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
    dst.close().map_err(|(_, e)| BackupError::Sqlite(e))?;
    Ok(())
}

/// `20261122T093000.123Z`: sorts by time, safe in file names.
pub fn file_stamp(ms: u64) -> String {
    fieldsync_schema::time_fmt::render_ms(ms).replace(['-', ':'], "")
}

#[cfg(test)]
mod tests;
