//! Restores: a backup becomes a data directory's store. The backup is drilled in a scratch
//! directory inside the data directory (same file system, so adopting it is a rename), and
//! only a copy that passed is adopted. An existing store is moved aside into
//! `before-restore-<stamp>/` (never deleted), and only with `force`; nothing happens while a
//! relay serves the directory. The shards move in first and the directory file last: a crash
//! in between leaves shard files without a directory, which the next open refuses to adopt.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fieldsync_schema::sqlite_key::DatabaseKey;
use rusqlite::OpenFlags;
use serde::Serialize;

use super::drill::{DrillReport, drill_into};
use super::{BackupError, LOCK_FILE, file_stamp, io, sync_dir};
use crate::audit;
use crate::store::sqlite::{DB_FILE, SHARDS_DIR, SqliteBackend};

/// What `restore` did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The data directory that now holds the restored store.
    pub database: PathBuf,
    /// Where the replaced store's files were moved, if there was one.
    pub replaced: Vec<PathBuf>,
    pub drill: DrillReport,
}

/// The files of a store in a data directory that a restore replaces.
fn store_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| dir.join(format!("{DB_FILE}{suffix}")))
        .collect();
    entries.push(dir.join(SHARDS_DIR));
    entries.into_iter().filter(|p| p.exists()).collect()
}

/// Makes the backup at `from` the store of `data_dir`, after a restore drill.
pub fn restore(from: &Path, data_dir: &Path, force: bool, now_ms: u64) -> Result<RestoreReport, BackupError> {
    restore_keyed(from, data_dir, force, now_ms, None)
}

/// [`restore`] of a backup encrypted at rest with `key` (the restored store keeps it).
pub fn restore_keyed(
    from: &Path,
    data_dir: &Path,
    force: bool,
    now_ms: u64,
    key: Option<&DatabaseKey>,
) -> Result<RestoreReport, BackupError> {
    std::fs::create_dir_all(data_dir).map_err(io("cannot create", data_dir))?;
    let lock_path = data_dir.join(LOCK_FILE);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io("cannot open", &lock_path))?;
    if lock.try_lock().is_err() {
        return Err(BackupError::InUse(data_dir.to_path_buf()));
    }
    if !force && let Some(existing) = store_entries(data_dir).first() {
        return Err(BackupError::Exists(existing.clone()));
    }
    let stamp = file_stamp(now_ms);
    let scratch = data_dir.join(format!(".restoring-{stamp}"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(io("cannot create", &scratch))?;
    let result = drill_and_adopt(from, data_dir, &scratch, &stamp, key);
    let _ = std::fs::remove_dir_all(&scratch);
    drop(lock);
    result
}

fn drill_and_adopt(
    from: &Path,
    data_dir: &Path,
    scratch: &Path,
    stamp: &str,
    key: Option<&DatabaseKey>,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let mut drill = DrillReport::pending(from);
    let outcome = drill_into(from, scratch, &mut drill, key);
    drill.duration_ms = started.elapsed().as_millis() as u64;
    if let Err(reason) = outcome {
        drill.failure = Some(reason);
        return Err(BackupError::DrillFailed(drill.verdict()));
    }
    drill.ok = true;
    let shards = SqliteBackend::open_existing_keyed(scratch, key.cloned())?.files();
    // Self-contained files (no WAL beside them) so that a rename moves everything.
    for file in &shards {
        let conn = super::open_keyed(file, OpenFlags::default(), key)?;
        let _: String = conn.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
    }

    let mut replaced = Vec::new();
    let existing = store_entries(data_dir);
    if !existing.is_empty() {
        let aside = data_dir.join(format!("before-restore-{stamp}"));
        std::fs::create_dir_all(&aside).map_err(io("cannot create", &aside))?;
        for old in existing {
            let to = aside.join(old.file_name().unwrap_or_default());
            std::fs::rename(&old, &to).map_err(io("cannot move aside", &old))?;
            replaced.push(to);
        }
        sync_dir(&aside)?;
    }
    for name in [SHARDS_DIR, DB_FILE] {
        let (src, dst) = (scratch.join(name), data_dir.join(name));
        std::fs::rename(&src, &dst).map_err(io("cannot move into place", &dst))?;
        sync_dir(data_dir)?;
    }
    // The adopted store must open and carry the chains the drill verified.
    let backend = SqliteBackend::open_existing_keyed(data_dir, key.cloned())?;
    let chains = audit::verify(&backend)?;
    let expected = drill.audit.as_ref().map_or(0, |a| a.records);
    if !chains.ok() || chains.records != expected {
        return Err(BackupError::DrillFailed(format!(
            "the restored store does not match the verified backup ({} of {expected} audit records)",
            chains.records
        )));
    }
    Ok(RestoreReport {
        database: data_dir.to_path_buf(),
        replaced,
        drill,
    })
}
