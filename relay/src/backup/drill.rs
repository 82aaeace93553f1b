//! Restore drills: proof that a backup restores, without touching it. The backup is copied
//! into a scratch directory; every file passes SQLite's integrity check and carries its tables;
//! the copy opens as a relay store (a round-1 backup is migrated on the way, as `serve` would);
//! every audit chain is recomputed; the tables are counted and their cross-checks hold. A drill
//! never returns an error: every failure is a failed report with the first failing check.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fieldsync_schema::sqlite_file::FileProblem;
use fieldsync_schema::sqlite_key::DatabaseKey;
use rusqlite::OpenFlags;
use serde::Serialize;
use uuid::Uuid;

use super::{layout_files, recorded_shards};
use crate::audit::{self, VerifyReport};
use crate::store::Counts;
use crate::store::sqlite::{Consistency, DB_FILE, SHARDS_DIR, SqliteBackend};

/// The result of a restore drill.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub file: PathBuf,
    pub ok: bool,
    /// Why the drill failed (the first failing check).
    pub failure: Option<String>,
    /// Bytes over every file of the backup.
    pub bytes: u64,
    /// The backup is a round-1 single file (the drill migrated it).
    pub round_one: bool,
    pub relay_id: Option<Uuid>,
    /// SQLite's integrity findings (`["ok"]` when every file is sound).
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
                "restore-drill: OK: {} restores (relay {}): integrity ok, audit chains verified ({} records in {} spaces), \
                 {} documents, {} applied mutations, {} receipts, {} spaces, {} users, {} devices, {} archived losers",
                self.file.display(),
                self.relay_id.map(|r| r.to_string()).unwrap_or_default(),
                c.audit,
                self.audit.as_ref().map_or(0, |a| a.spaces.len()),
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

const DIRECTORY_TABLES: &[&str] = &["meta", "spaces", "users", "memberships", "tokens", "devices"];
const SHARD_TABLES: &[&str] = &[
    "meta",
    "space_heads",
    "documents",
    "feed",
    "receipts",
    "audit",
    "conflict_archive",
];
const ROUND_ONE_TABLES: &[&str] = &[
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

impl DrillReport {
    /// A drill of `from` that has not run yet: nothing verified, not ok.
    pub(crate) fn pending(from: &Path) -> Self {
        DrillReport {
            file: from.to_path_buf(),
            ok: false,
            failure: None,
            bytes: 0,
            round_one: false,
            relay_id: None,
            integrity: Vec::new(),
            audit: None,
            counts: None,
            consistency: None,
            duration_ms: 0,
        }
    }
}

/// Restores the backup at `from` (a backup directory, or a round-1 backup file) into a scratch
/// directory and verifies it. Never touches `from` itself.
pub fn restore_drill(from: &Path) -> DrillReport {
    restore_drill_keyed(from, None)
}

/// [`restore_drill`] of a backup of a store encrypted at rest with `key`.
pub fn restore_drill_keyed(from: &Path, key: Option<&DatabaseKey>) -> DrillReport {
    let started = Instant::now();
    let mut report = DrillReport::pending(from);
    let scratch = tempfile::Builder::new().prefix("fieldsync-restore-drill-").tempdir();
    let result = match &scratch {
        Ok(scratch) => drill_into(from, scratch.path(), &mut report, key),
        Err(e) => Err(format!("cannot create a scratch directory: {e}")),
    };
    match result {
        Ok(()) => report.ok = true,
        Err(reason) => report.failure = Some(reason),
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    report
}

/// Copies the backup into `scratch` and runs every check there; the drill of [`restore`]
/// (super::restore) keeps the scratch copy to adopt it.
pub(super) fn drill_into(
    from: &Path,
    scratch: &Path,
    report: &mut DrillReport,
    key: Option<&DatabaseKey>,
) -> Result<(), String> {
    let files = copy_backup(from, scratch, report, key)?;
    // 1. Every file is a sound SQLite database with the tables of its kind.
    for (file, tables) in &files {
        check_file(&scratch.join(file), tables, report, key).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    report.integrity = vec!["ok".into()];
    // 2. It opens as a relay store (migrating a round-1 file), 3. every chain verifies,
    // 4. the counts agree with the chains and the tables with each other.
    let backend = SqliteBackend::open_existing_keyed(scratch, key.cloned())
        .map_err(|e| format!("does not open as a relay store: {e}"))?;
    report.relay_id = Some(backend.relay_id());
    let chains = audit::verify(&backend).map_err(|e| format!("audit chain unreadable: {e}"))?;
    report.audit = Some(chains.clone());
    if let Some((space, bad)) = chains.bad().first() {
        return Err(format!(
            "audit chain broken at record {} of space {space} (mutation {}): {}",
            bad.audit_id, bad.mutation_id, bad.reason
        ));
    }
    let counts = backend.counts().map_err(|e| format!("cannot count: {e}"))?;
    report.counts = Some(counts.clone());
    let per_space: u64 = chains.spaces.iter().map(|c| c.records).sum();
    if per_space != counts.audit {
        return Err(format!(
            "verified {per_space} audit records but the shards hold {}",
            counts.audit
        ));
    }
    let consistency = backend
        .consistency()
        .map_err(|e| format!("cannot check consistency: {e}"))?;
    report.consistency = Some(consistency.clone());
    let problems = consistency.problems();
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(())
}

/// Copies the backup's files into `scratch`; returns each with the tables it must hold.
fn copy_backup(
    from: &Path,
    scratch: &Path,
    report: &mut DrillReport,
    key: Option<&DatabaseKey>,
) -> Result<Vec<(PathBuf, &'static [&'static str])>, String> {
    let meta = std::fs::metadata(from).map_err(|e| format!("cannot read the backup: {e}"))?;
    let copy = |src: &Path, rel: &Path, report: &mut DrillReport| -> Result<(), String> {
        let into = scratch.join(rel);
        report.bytes += std::fs::copy(src, &into)
            .map_err(|e| format!("cannot copy {} into the scratch directory: {e}", src.display()))?;
        Ok(())
    };
    if meta.is_file() {
        // A round-1 backup: one file.
        report.round_one = true;
        copy(from, Path::new(DB_FILE), report)?;
        return Ok(vec![(PathBuf::from(DB_FILE), ROUND_ONE_TABLES)]);
    }
    let db = from.join(DB_FILE);
    if !db.is_file() {
        return Err(format!("not a relay backup: no {DB_FILE} in the directory"));
    }
    let shards = recorded_shards(&db, key).map_err(|e| format!("{DB_FILE}: not a relay directory database: {e}"))?;
    if shards == 0 {
        return Err(format!(
            "{DB_FILE}: not a relay directory database: it records no shards"
        ));
    }
    std::fs::create_dir_all(scratch.join(SHARDS_DIR)).map_err(|e| format!("cannot create the scratch shards: {e}"))?;
    let mut files = Vec::new();
    for rel in layout_files(shards) {
        let src = from.join(&rel);
        if !src.is_file() {
            return Err(format!("the backup is incomplete: {} is missing", rel.display()));
        }
        copy(&src, &rel, report)?;
        let tables = if rel == Path::new(DB_FILE) {
            DIRECTORY_TABLES
        } else {
            SHARD_TABLES
        };
        files.push((rel, tables));
    }
    Ok(files)
}

fn check_file(path: &Path, tables: &[&str], report: &mut DrillReport, key: Option<&DatabaseKey>) -> Result<(), String> {
    let conn = super::open_keyed(path, OpenFlags::SQLITE_OPEN_READ_WRITE, key)
        .map_err(|e| format!("cannot open as SQLite: {e}"))?;
    match fieldsync_schema::sqlite_file::check(&conn, tables) {
        Ok(()) => Ok(()),
        Err(FileProblem::Damaged(findings)) => {
            report.integrity = findings.clone();
            Err(FileProblem::Damaged(findings).to_string())
        }
        Err(FileProblem::MissingTable(table)) => Err(format!("not a relay database: table `{table}` is missing")),
        Err(other) => Err(other.to_string()),
    }
}
