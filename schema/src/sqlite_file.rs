//! The check every fieldsync SQLite file passes before it is trusted — a device backup being
//! imported, a relay backup being drilled or restored: SQLite's own integrity check, then the
//! tables its owner expects (opening a stranger's file as a store would otherwise just create
//! them). Behind the `sqlite` feature, for the device and the relay.

use rusqlite::Connection;

/// What is wrong with a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileProblem {
    #[error("not a readable SQLite database: {0}")]
    Unreadable(String),
    /// `PRAGMA integrity_check` found these (at most the first few are shown).
    #[error("integrity check failed: {}", .0.iter().take(3).cloned().collect::<Vec<_>>().join("; "))]
    Damaged(Vec<String>),
    #[error("table `{0}` is missing")]
    MissingTable(String),
}

/// How deep SQLite looks at the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// `PRAGMA integrity_check`: also that every index matches its table. For files about to
    /// be trusted (imports, drills, restores).
    Full,
    /// `PRAGMA quick_check`: page and record structure, in about linear time. For every start.
    Quick,
}

/// Findings kept from a damaged file: the first ones name the damage; a broken page can
/// yield thousands.
const FINDINGS_KEPT: usize = 20;

/// SQLite's own check of every page of the file.
pub fn check_pages(conn: &Connection, depth: Depth) -> Result<(), FileProblem> {
    let pragma = match depth {
        Depth::Full => "PRAGMA integrity_check",
        Depth::Quick => "PRAGMA quick_check",
    };
    let findings: Vec<String> = conn
        .prepare(pragma)
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.take(FINDINGS_KEPT).collect())
        .map_err(|e| match e.sqlite_error_code() {
            // SQLite stopped the check on a page it could not parse: that is a finding.
            Some(rusqlite::ErrorCode::DatabaseCorrupt) => FileProblem::Damaged(vec![e.to_string()]),
            _ => FileProblem::Unreadable(e.to_string()),
        })?;
    if findings != ["ok"] {
        return Err(FileProblem::Damaged(findings));
    }
    Ok(())
}

/// `PRAGMA integrity_check`, then every table of `required`.
pub fn check(conn: &Connection, required: &[&str]) -> Result<(), FileProblem> {
    check_pages(conn, Depth::Full)?;
    for table in required {
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .map_err(|e| FileProblem::Unreadable(e.to_string()))?;
        if n == 0 {
            return Err(FileProblem::MissingTable(table.to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sound_file_passes_and_a_missing_table_is_named() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE meta (k TEXT); CREATE TABLE feed (s INTEGER);")
            .unwrap();
        assert_eq!(check(&conn, &["meta", "feed"]), Ok(()));
        assert_eq!(
            check(&conn, &["meta", "audit"]),
            Err(FileProblem::MissingTable("audit".into()))
        );
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_unreadable() {
        let dir = tempfile_dir();
        let path = dir.join("garbage.db");
        std::fs::write(&path, vec![0x42; 8192]).unwrap();
        let conn = Connection::open(&path).unwrap();
        assert!(matches!(check(&conn, &[]), Err(FileProblem::Unreadable(_))));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fieldsync-sqlite-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
