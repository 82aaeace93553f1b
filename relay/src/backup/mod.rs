//! Backups of a relay database, restore drills, restores and retention.
//!
//! - [`backup_database`] uses SQLite's online backup API from a separate connection, so it runs
//!   while the relay serves: one backup step copies every page inside a single read
//!   transaction (WAL readers never block the writer, and the copy is one consistent snapshot:
//!   every mutation acknowledged before the backup started is in it). The copy goes to a temp
//!   file next to the target, is switched to a self-contained rollback-journal file, fsynced and
//!   renamed into place.
//! - [`restore_drill`] proves a backup restores: copy into a scratch directory, `PRAGMA
//!   integrity_check`, open it as a relay store, recompute the audit chain, count, and check the
//!   cross-table invariants. It never returns an error: every failure is a failed report.
//! - [`restore`] adopts a backup as a data directory's database, after a drill, refusing to
//!   replace an existing database unless told to and refusing while a relay serves the directory.
//! - [`scheduled_backup`] is what `serve --backup-dir` runs: a timestamped backup, its drill, and
//!   retention of the newest N verified backups.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fieldsync_schema::sqlite_file::FileProblem;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use uuid::Uuid;

use crate::audit::{self, VerifyReport};
use crate::store::sqlite::{Consistency, DB_FILE, SqliteStore};
use crate::store::{Counts, Store, StoreError};

/// Held (shared) by a serving relay; `restore` needs it exclusively.
pub const LOCK_FILE: &str = "relay.lock";
/// Scheduled backups are named `relay-<UTC timestamp>.db`.
pub const SCHEDULED_PREFIX: &str = "relay-";
pub const SCHEDULED_SUFFIX: &str = ".db";

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

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io { what, path, source }
}

/// What a finished backup wrote.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    pub file: PathBuf,
    pub bytes: u64,
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

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Copies the relay database at `db` to `to` with SQLite's online backup API.
pub fn backup_database(db: &Path, to: &Path, overwrite: bool) -> Result<BackupInfo, BackupError> {
    let started = Instant::now();
    if !db.is_file() {
        return Err(BackupError::NoDatabase(db.to_path_buf()));
    }
    if to.exists() && !overwrite {
        return Err(BackupError::Exists(to.to_path_buf()));
    }
    let dir = parent_of(to);
    std::fs::create_dir_all(&dir).map_err(io("cannot create directory", &dir))?;
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = copy_online(db, &tmp).and_then(|()| {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot sync", &tmp))?;
        std::fs::rename(&tmp, to).map_err(io("cannot rename the backup to", to))?;
        sync_dir(&dir)
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let bytes = std::fs::metadata(to).map_err(io("cannot read", to))?.len();
    Ok(BackupInfo {
        file: to.to_path_buf(),
        bytes,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

fn copy_online(db: &Path, tmp: &Path) -> Result<(), BackupError> {
    // A connection of its own, never the relay's: it only reads.
    let src = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    src.busy_timeout(Duration::from_secs(10))?;
    let mut dst = Connection::open(tmp)?;
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

/// The result of a restore drill.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub file: PathBuf,
    pub ok: bool,
    /// Why the drill failed (the first failing check).
    pub failure: Option<String>,
    pub bytes: u64,
    pub relay_id: Option<Uuid>,
    pub integrity: Vec<String>,
    pub audit: Option<VerifyReport>,
    pub counts: Option<Counts>,
    pub consistency: Option<Consistency>,
    pub duration_ms: u64,
}

impl DrillReport {
    /// One line for humans and log scrapers: `restore-drill: OK ...` or `restore-drill: FAILED: ...`.
    pub fn verdict(&self) -> String {
        match (&self.failure, &self.counts) {
            (None, Some(c)) => format!(
                "restore-drill: OK: {} restores (relay {}): integrity ok, audit chain verified ({} records), \
                 {} documents, {} applied mutations, {} receipts, {} spaces, {} users, {} devices, {} archived losers",
                self.file.display(),
                self.relay_id.map(|r| r.to_string()).unwrap_or_default(),
                c.audit,
                c.documents,
                c.feed,
                c.receipts,
                c.spaces,
                c.users,
                c.devices,
                c.archive
            ),
            (Some(f), _) => format!("restore-drill: FAILED: {}: {f}", self.file.display()),
            (None, None) => format!("restore-drill: FAILED: {}: no counts", self.file.display()),
        }
    }
}

const REQUIRED_TABLES: &[&str] = &[
    "meta",
    "spaces",
    "users",
    "memberships",
    "devices",
    "documents",
    "feed",
    "receipts",
    "audit",
    "conflict_archive",
];

/// Restores `file` into a scratch directory and verifies it. Never touches `file` itself.
pub fn restore_drill(file: &Path) -> DrillReport {
    let started = Instant::now();
    let mut report = DrillReport {
        file: file.to_path_buf(),
        ok: false,
        failure: None,
        bytes: 0,
        relay_id: None,
        integrity: Vec::new(),
        audit: None,
        counts: None,
        consistency: None,
        duration_ms: 0,
    };
    if let Err(reason) = drill_steps(file, &mut report) {
        report.failure = Some(reason);
    } else {
        report.ok = true;
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    report
}

fn drill_steps(file: &Path, report: &mut DrillReport) -> Result<(), String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot read the backup: {e}"))?;
    if !meta.is_file() {
        return Err("not a file".into());
    }
    report.bytes = meta.len();
    let scratch = tempfile::Builder::new()
        .prefix("fieldsync-restore-drill-")
        .tempdir()
        .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    let db = scratch.path().join(DB_FILE);
    std::fs::copy(file, &db).map_err(|e| format!("cannot copy into the scratch directory: {e}"))?;

    // 1. The file is a sound SQLite database.
    {
        let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| format!("cannot open as SQLite: {e}"))?;
        // 2. It is a relay database (opening it as a store would otherwise create the tables).
        match fieldsync_schema::sqlite_file::check(&conn, REQUIRED_TABLES) {
            Ok(()) => report.integrity = vec!["ok".into()],
            Err(FileProblem::Damaged(findings)) => {
                report.integrity = findings.clone();
                return Err(FileProblem::Damaged(findings).to_string());
            }
            Err(FileProblem::MissingTable(table)) => {
                return Err(format!("not a relay database: table `{table}` is missing"));
            }
            Err(other) => return Err(other.to_string()),
        }
        let id: Vec<u8> = conn
            .query_row("SELECT value FROM meta WHERE key = 'relay_id'", [], |r| r.get(0))
            .map_err(|e| format!("no relay id: {e}"))?;
        report.relay_id = Some(Uuid::from_slice(&id).map_err(|e| format!("bad relay id: {e}"))?);
    }

    // 3. It opens as a relay store, the audit chain verifies and the tables agree.
    let store = SqliteStore::open(&db, Uuid::nil()).map_err(|e| format!("does not open as a relay store: {e}"))?;
    let chain = audit::verify(&store).map_err(|e| format!("audit chain unreadable: {e}"))?;
    report.audit = Some(chain.clone());
    if let Some(bad) = &chain.first_bad {
        return Err(format!(
            "audit chain broken at record {} (mutation {}): {}",
            bad.audit_id, bad.mutation_id, bad.reason
        ));
    }
    let counts = store.counts().map_err(|e| format!("cannot count: {e}"))?;
    report.counts = Some(counts.clone());
    if chain.records != counts.audit {
        return Err(format!(
            "verified {} audit records but the table holds {}",
            chain.records, counts.audit
        ));
    }
    let consistency = store
        .consistency()
        .map_err(|e| format!("cannot check consistency: {e}"))?;
    report.consistency = Some(consistency.clone());
    let problems = consistency.problems();
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(())
}

/// What `restore` did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub database: PathBuf,
    /// Where the replaced database (and its WAL) were moved, if there was one.
    pub replaced: Vec<PathBuf>,
    pub drill: DrillReport,
}

/// Makes `from` the database of `data_dir`, after a restore drill. An existing database is moved
/// aside (never deleted), and only with `force`.
pub fn restore(from: &Path, data_dir: &Path, force: bool, now_ms: u64) -> Result<RestoreReport, BackupError> {
    let drill = restore_drill(from);
    if !drill.ok {
        return Err(BackupError::DrillFailed(drill.verdict()));
    }
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
    let target = data_dir.join(DB_FILE);
    let mut replaced = Vec::new();
    if target.exists() && !force {
        return Err(BackupError::Exists(target));
    }
    let stamp = file_stamp(now_ms);
    // The WAL and SHM files belong to the old database: left in place, SQLite would replay the
    // old WAL into the restored file.
    for suffix in ["", "-wal", "-shm"] {
        let old = data_dir.join(format!("{DB_FILE}{suffix}"));
        if old.exists() {
            let aside = data_dir.join(format!("{DB_FILE}{suffix}.before-restore-{stamp}"));
            std::fs::rename(&old, &aside).map_err(io("cannot move aside", &old))?;
            replaced.push(aside);
        }
    }
    let tmp = data_dir.join(format!(".{DB_FILE}.restoring"));
    std::fs::copy(from, &tmp).map_err(io("cannot copy the backup to", &tmp))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io("cannot sync", &tmp))?;
    std::fs::rename(&tmp, &target).map_err(io("cannot rename into", &target))?;
    sync_dir(data_dir)?;
    // The adopted file must open as a store and carry the same chain the drill verified.
    let store = SqliteStore::open(&target, Uuid::nil())?;
    let chain = audit::verify(&store)?;
    let expected = drill.audit.as_ref().map_or(0, |a| a.records);
    if !chain.ok() || chain.records != expected {
        return Err(BackupError::DrillFailed(format!(
            "the restored database does not match the verified backup ({} of {expected} audit records)",
            chain.records
        )));
    }
    drop(lock);
    Ok(RestoreReport {
        database: target,
        replaced,
        drill,
    })
}

/// `20261122T093000.123Z`: sorts by time, safe in file names.
pub fn file_stamp(ms: u64) -> String {
    fieldsync_schema::time_fmt::render_ms(ms).replace(['-', ':'], "")
}

/// The outcome of one scheduled backup.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduledBackup {
    pub backup: BackupInfo,
    pub drill: DrillReport,
    /// Older backups deleted by retention.
    pub pruned: Vec<PathBuf>,
}

/// Takes `DIR/relay-<stamp>.db`, drills it, and keeps the newest `keep` verified backups. A
/// backup that fails its drill is renamed `*.db.failed` (kept for inspection, outside retention)
/// and reported as an error.
pub fn scheduled_backup(db: &Path, dir: &Path, keep: usize, now_ms: u64) -> Result<ScheduledBackup, BackupError> {
    let file = dir.join(format!("{SCHEDULED_PREFIX}{}{SCHEDULED_SUFFIX}", file_stamp(now_ms)));
    let backup = backup_database(db, &file, false)?;
    let drill = restore_drill(&file);
    if !drill.ok {
        let failed = file.with_extension("db.failed");
        let _ = std::fs::rename(&file, &failed);
        return Err(BackupError::DrillFailed(drill.verdict()));
    }
    let pruned = prune(dir, keep)?;
    Ok(ScheduledBackup { backup, drill, pruned })
}

/// The scheduled backups in `dir`, oldest first.
pub fn scheduled_backups(dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("cannot list", dir))? {
        let entry = entry.map_err(io("cannot list", dir))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(SCHEDULED_PREFIX) && name.ends_with(SCHEDULED_SUFFIX) && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Deletes all but the newest `keep` scheduled backups (never fewer than one is kept).
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>, BackupError> {
    let files = scheduled_backups(dir)?;
    let keep = keep.max(1);
    let excess = files.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for f in files.into_iter().take(excess) {
        std::fs::remove_file(&f).map_err(io("cannot delete old backup", &f))?;
        removed.push(f);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
