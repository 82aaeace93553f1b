//! The start-up check of a data directory's files: SQLite's `quick_check` on the directory
//! and every shard, so a damaged page is found when the relay starts — with the command that
//! restores it — rather than when a device's push or pull first reads it.

use std::path::{Path, PathBuf};

use fieldsync_schema::sqlite_file::{self, Depth, FileProblem};
use fieldsync_schema::sqlite_key::{self, DatabaseKey, KeyError};
use rusqlite::{Connection, OpenFlags};

use super::{DB_FILE, SHARDS_DIR};
use crate::store::StoreResult;

/// One damaged file and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub file: PathBuf,
    pub problem: FileProblem,
}

/// The store files present in `dir`: `relay.db` and every `shards/shard-N.db`.
fn present_files(dir: &Path) -> StoreResult<Vec<PathBuf>> {
    let mut files = Vec::new();
    let directory = dir.join(DB_FILE);
    if directory.exists() {
        files.push(directory);
    }
    let shards = dir.join(SHARDS_DIR);
    if shards.is_dir() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&shards)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "db"))
            .collect();
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// Runs `PRAGMA quick_check` on every store file in `dir`. Empty: every file is sound. A file
/// SQLite does not recognise as a database, or whose pages are broken, is damaged; a file that
/// cannot be read at all (a full disk, no permission, an I/O error) is an error, not damage —
/// restoring a backup over it would not help and must not be suggested. Opens read-write, like
/// the relay will, so a WAL left by a killed relay is recovered first rather than reported.
pub fn quick_check(dir: &Path) -> StoreResult<Vec<Damage>> {
    quick_check_keyed(dir, None)
}

/// [`quick_check`] of a store encrypted at rest with `key`. A missing key for an encrypted
/// store, or a key that does not open its directory file, is an error, never damage: restoring
/// a backup would not help.
pub fn quick_check_keyed(dir: &Path, key: Option<&DatabaseKey>) -> StoreResult<Vec<Damage>> {
    let directory = dir.join(DB_FILE);
    let files = present_files(dir)?;
    // Without a key, a store none of whose files is plaintext SQLite is an encrypted one (one
    // unreadable file among plaintext ones is damage).
    if key.is_none() && !files.is_empty() {
        let mut plaintext = false;
        for file in &files {
            plaintext |= sqlite_key::is_plaintext(file)? != Some(false);
        }
        if !plaintext {
            return Err(KeyError::KeyNeeded(directory.display().to_string()).into());
        }
    }
    let mut damaged = Vec::new();
    sqlite_key::ready();
    for file in files {
        let conn = Connection::open_with_flags(
            &file,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        if let Some(key) = key {
            key.apply(&conn)?;
        }
        // The header and schema: damage if they are not a database, an error if unreadable.
        if let Err(e) = conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)) {
            match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) if key.is_some() && file == directory => {
                    return Err(KeyError::WrongKey(file.display().to_string()).into());
                }
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                    damaged.push(Damage {
                        file,
                        problem: FileProblem::Unreadable(e.to_string()),
                    });
                    continue;
                }
                _ => return Err(e.into()),
            }
        }
        match sqlite_file::check_pages(&conn, Depth::Quick) {
            Ok(()) => {}
            Err(problem @ FileProblem::Damaged(_)) => damaged.push(Damage { file, problem }),
            Err(other) => {
                return Err(crate::store::StoreError::Corrupt(format!(
                    "could not check {}: {other}",
                    file.display()
                )));
            }
        }
    }
    Ok(damaged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::{SqliteBackend, shard_path};
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn a_sound_store_passes_and_a_damaged_page_is_named_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteBackend::open(dir.path(), uuid::Uuid::from_bytes([1; 16])).unwrap();
        drop(backend);
        assert_eq!(quick_check(dir.path()).unwrap(), vec![]);

        // Overwrite the second page of shard 1 (a b-tree page after the header page).
        let shard = shard_path(dir.path(), 1);
        let mut f = std::fs::OpenOptions::new().write(true).open(&shard).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&[0xA5; 4096]).unwrap();
        drop(f);
        let damaged = quick_check(dir.path()).unwrap();
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert_eq!(damaged[0].file, shard);
        assert!(matches!(
            damaged[0].problem,
            FileProblem::Damaged(_) | FileProblem::Unreadable(_)
        ));
    }

    #[test]
    fn a_file_that_is_not_a_database_counts_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteBackend::open(dir.path(), uuid::Uuid::from_bytes([1; 16])).unwrap());
        std::fs::write(dir.path().join(DB_FILE), vec![0x42; 8192]).unwrap();
        let damaged = quick_check(dir.path()).unwrap();
        assert_eq!(damaged.len(), 1);
        assert!(damaged[0].problem.to_string().contains("not a database"), "{damaged:?}");
    }

    #[test]
    fn an_encrypted_store_is_checked_with_its_key_and_without_it_is_not_called_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let key = DatabaseKey::from_bytes([9; 32]);
        drop(SqliteBackend::open_keyed(dir.path(), uuid::Uuid::from_bytes([1; 16]), 2, Some(key.clone())).unwrap());
        assert_eq!(quick_check_keyed(dir.path(), Some(&key)).unwrap(), vec![]);
        let missing = quick_check(dir.path()).unwrap_err().to_string();
        assert!(missing.contains("is encrypted"), "{missing}");
        let wrong = quick_check_keyed(dir.path(), Some(&DatabaseKey::from_bytes([8; 32])))
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("does not open"), "{wrong}");
    }
}
