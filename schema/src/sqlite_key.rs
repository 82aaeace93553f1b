//! Encryption at rest: the key that opens a fieldsync SQLite file, and the one place that
//! applies it. Behind the `sqlite` feature, for the device and the relay.
//!
//! SQLite here is SQLCipher (bundled): a file opened with a key has every page encrypted
//! (AES-256, with an HMAC per page), so no record, index or conflict archive is readable without
//! it; a file opened without a key is plain SQLite, as before. The key is 32 random bytes an app
//! keeps in the platform keystore (an operator: in a file), given as 64 hex digits and used as
//! SQLCipher's raw key, so opening costs no key derivation.
//!
//! A wrong or missing key must never look like an empty database — SQLite would otherwise
//! answer "file is not a database" at the first statement, or, for a file that does not exist
//! yet, quietly create a new one. [`open`] reads the file's first bytes to say which it is.

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags};

/// The 16 bytes every plaintext SQLite file begins with; an encrypted file's first page is
/// random bytes from its first byte on.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// A 256-bit key for a database file. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseKey([u8; 32]);

impl std::fmt::Debug for DatabaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseKey(..)")
    }
}

/// Why a key or a keyed file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a database key is 64 hex digits (32 random bytes, e.g. `openssl rand -hex 32`); {0}")]
    Malformed(String),
    #[error("could not read the key file {path}: {error}")]
    File { path: String, error: String },
    #[error("{0} is encrypted: give its key (the app's key, or --db-key-file / the key variable)")]
    KeyNeeded(String),
    #[error("the key does not open {0} (a wrong key, or not a fieldsync database)")]
    WrongKey(String),
    #[error("{0} is not encrypted, but a key was given: encrypt it first (`rekey`), or open it without a key")]
    NotEncrypted(String),
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl DatabaseKey {
    pub fn from_bytes(bytes: [u8; 32]) -> DatabaseKey {
        DatabaseKey(bytes)
    }

    /// 64 hex digits; surrounding whitespace (a key file's newline) is ignored.
    pub fn from_hex(text: &str) -> Result<DatabaseKey, KeyError> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(KeyError::Malformed(format!("this one has {} characters", text.len())));
        }
        let bytes: [u8; 32] = hex::decode(text)
            .map_err(|_| KeyError::Malformed("this one has a character that is not a hex digit".into()))?
            .try_into()
            .map_err(|_| KeyError::Malformed("this one is not 32 bytes".into()))?;
        if bytes.iter().all(|b| *b == 0) {
            return Err(KeyError::Malformed("this one is all zeros".into()));
        }
        Ok(DatabaseKey(bytes))
    }

    /// Reads a key file (64 hex digits).
    pub fn from_file(path: &Path) -> Result<DatabaseKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::File {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        DatabaseKey::from_hex(&text)
    }

    /// SQLCipher's raw-key literal, `"x'…'"`, for `PRAGMA key`, `rekey` and `ATTACH … KEY`.
    pub fn sql_literal(&self) -> String {
        format!("\"x'{}'\"", hex::encode_upper(self.0))
    }

    /// Keys `conn` (before its first statement that reads the file).
    pub fn apply(&self, conn: &Connection) -> rusqlite::Result<()> {
        quiet(conn)?;
        conn.execute_batch(&format!("PRAGMA key = {};", self.sql_literal()))
    }

    /// Re-encrypts the open, keyed database in place under `self` (one transaction: a crash
    /// leaves the file under the old key or the new one).
    pub fn rekey(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(&format!("PRAGMA rekey = {};", self.sql_literal()))
    }
}

/// SQLCipher logs a failed decryption to stderr; the caller reports it as an error instead.
fn quiet(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("PRAGMA cipher_log_level = NONE;")
}

/// Whether `path` holds a plaintext SQLite file: `None` if it does not exist or is empty (a new
/// database, whichever way it is opened).
pub fn is_plaintext(path: &Path) -> std::io::Result<Option<bool>> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut head = [0u8; 16];
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(match read {
        0 => None,
        _ => Some(read == head.len() && &head == SQLITE_MAGIC),
    })
}

/// Waits until SQLCipher has finished initialising the process's SQLite; call it before opening
/// any connection.
///
/// SQLite marks itself initialised *before* it runs SQLCipher's extra initialisation, outside
/// its mutexes, so a thread opening its first connection while another thread initialises can
/// get a connection without SQLCipher's additions — `sqlcipher_export`, which encrypting a
/// plaintext device needs, was missing on such a connection in CI. Once a fresh connection
/// knows `sqlcipher_export`, the extra initialisation is over and every later connection has it.
pub fn ready() {
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| {
        for _ in 0..10_000 {
            let known = Connection::open_in_memory().and_then(|conn| {
                conn.query_row(
                    "SELECT COUNT(*) FROM pragma_function_list WHERE name = 'sqlcipher_export'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            });
            match known {
                Ok(0) => std::thread::yield_now(),
                // Known, or SQLite cannot even open memory: either way, waiting will not help.
                _ => return,
            }
        }
    });
}

/// Opens `path` with `flags`, keyed with `key` if given, and proves the key by reading the
/// schema: a wrong key, a missing key and a key for a plaintext file are each their own error.
pub fn open(path: &Path, flags: OpenFlags, key: Option<&DatabaseKey>) -> Result<Connection, KeyError> {
    ready();
    let name = path.display().to_string();
    let plaintext = is_plaintext(path).map_err(|e| KeyError::File {
        path: name.clone(),
        error: e.to_string(),
    })?;
    match (plaintext, key) {
        (Some(false), None) => return Err(KeyError::KeyNeeded(name)),
        (Some(true), Some(_)) => return Err(KeyError::NotEncrypted(name)),
        _ => {}
    }
    let conn = Connection::open_with_flags(path, flags)?;
    match key {
        Some(key) => key.apply(&conn)?,
        None => quiet(&conn)?,
    }
    match conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)) {
        Ok(_) => Ok(conn),
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) && key.is_some() => {
            Err(KeyError::WrongKey(name))
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens read-write, creating the file if it does not exist.
pub fn open_rw(path: &Path, key: Option<&DatabaseKey>) -> Result<Connection, KeyError> {
    open(path, OpenFlags::default(), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> DatabaseKey {
        DatabaseKey::from_bytes([byte; 32])
    }

    fn write_marker(path: &Path, key: Option<&DatabaseKey>) {
        let conn = open_rw(path, key).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('MARKER-0123456789');",
        )
        .unwrap();
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    }

    fn file_has_marker(path: &Path) -> bool {
        std::fs::read(path)
            .unwrap()
            .windows(17)
            .any(|w| w == b"MARKER-0123456789")
    }

    #[test]
    fn a_keyed_file_holds_no_plaintext_and_opens_only_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        write_marker(&path, Some(&key(7)));
        assert!(!file_has_marker(&path));
        assert_eq!(is_plaintext(&path).unwrap(), Some(false));
        let conn = open_rw(&path, Some(&key(7))).unwrap();
        let x: String = conn.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(x, "MARKER-0123456789");
        assert!(matches!(open_rw(&path, Some(&key(8))), Err(KeyError::WrongKey(_))));
        assert!(matches!(open_rw(&path, None), Err(KeyError::KeyNeeded(_))));
    }

    #[test]
    fn a_plaintext_file_refuses_a_key_and_a_missing_file_is_new_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        assert_eq!(is_plaintext(&path).unwrap(), None);
        write_marker(&path, None);
        assert!(file_has_marker(&path));
        assert!(matches!(open_rw(&path, Some(&key(7))), Err(KeyError::NotEncrypted(_))));
        open_rw(&path, None).unwrap();
    }

    #[test]
    fn rekey_moves_the_file_to_the_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        write_marker(&path, Some(&key(1)));
        let conn = open_rw(&path, Some(&key(1))).unwrap();
        key(2).rekey(&conn).unwrap();
        drop(conn);
        assert!(matches!(open_rw(&path, Some(&key(1))), Err(KeyError::WrongKey(_))));
        open_rw(&path, Some(&key(2))).unwrap();
    }

    #[test]
    fn a_key_is_64_hex_digits_and_never_printed() {
        let good = "ab".repeat(32);
        let k = DatabaseKey::from_hex(&format!("{good}\n")).unwrap();
        assert!(!format!("{k:?}").contains("abab"));
        for bad in ["", "abc", &"zz".repeat(32), &"00".repeat(32), &"ab".repeat(33)] {
            assert!(
                matches!(DatabaseKey::from_hex(bad), Err(KeyError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
