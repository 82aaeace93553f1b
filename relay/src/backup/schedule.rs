//! Scheduled backups (`serve --backup-dir`): `DIR/relay-<UTC stamp>/`, each drilled, keeping
//! the newest N that passed. A backup that fails its drill is renamed `relay-<stamp>.failed`
//! (kept for inspection, outside retention) and reported as an error.

use std::path::{Path, PathBuf};

use serde::Serialize;

use fieldsync_schema::sqlite_key::DatabaseKey;

use super::{BackupError, BackupInfo, DrillReport, backup_store_keyed, file_stamp, io, restore_drill_keyed};
use crate::store::sqlite::DB_FILE;

/// Scheduled backups are directories named `relay-<UTC timestamp>`.
pub const SCHEDULED_PREFIX: &str = "relay-";
const FAILED_SUFFIX: &str = ".failed";

/// The outcome of one scheduled backup.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduledBackup {
    pub backup: BackupInfo,
    pub drill: DrillReport,
    /// Older backups deleted by retention.
    pub pruned: Vec<PathBuf>,
}

/// Backs up the store of `data_dir` into `DIR/relay-<stamp>/`, drills it, and keeps the newest
/// `keep` verified backups.
pub fn scheduled_backup(
    data_dir: &Path,
    dir: &Path,
    keep: usize,
    now_ms: u64,
    key: Option<&DatabaseKey>,
) -> Result<ScheduledBackup, BackupError> {
    let target = dir.join(format!("{SCHEDULED_PREFIX}{}", file_stamp(now_ms)));
    let backup = backup_store_keyed(data_dir, &target, false, key)?;
    let drill = restore_drill_keyed(&target, key);
    if !drill.ok {
        let failed = dir.join(format!("{SCHEDULED_PREFIX}{}{FAILED_SUFFIX}", file_stamp(now_ms)));
        let _ = std::fs::rename(&target, &failed);
        return Err(BackupError::DrillFailed(drill.verdict()));
    }
    let pruned = prune(dir, keep)?;
    Ok(ScheduledBackup { backup, drill, pruned })
}

/// The scheduled backups in `dir`, oldest first: `relay-*` directories holding a store (round-1
/// `relay-*.db` files and failed backups are not counted).
pub fn scheduled_backups(dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("cannot list", dir))? {
        let entry = entry.map_err(io("cannot list", dir))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        if name.starts_with(SCHEDULED_PREFIX) && !name.ends_with(FAILED_SUFFIX) && path.join(DB_FILE).is_file() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes all but the newest `keep` scheduled backups (never fewer than one is kept).
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>, BackupError> {
    let backups = scheduled_backups(dir)?;
    let keep = keep.max(1);
    let excess = backups.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for b in backups.into_iter().take(excess) {
        std::fs::remove_dir_all(&b).map_err(io("cannot delete old backup", &b))?;
        removed.push(b);
    }
    Ok(removed)
}
