//! Encryption at rest of the device database: moving a device to a new key.
//!
//! A device opened with a key ([`Device::open_keyed`]) is encrypted page by page by SQLCipher;
//! so are its exports and the conflict archives inside it. This module changes the key:
//!
//! - an encrypted device is re-encrypted in place (`PRAGMA rekey`, one transaction: a crash
//!   leaves it under the old key or the new one);
//! - a plaintext device (one made before the app supplied a key) is copied into a new,
//!   encrypted file beside it, which is made durable and then renamed over the old one. The
//!   rename is the commit point; until then the plaintext file is untouched. It refuses while
//!   another process holds the database open: that process would go on writing to the
//!   replaced file and its writes would be lost.
//!
//! The plaintext file's blocks are only unlinked, not overwritten: on flash storage nothing a
//! program does can promise that. An app that handles clinical data supplies its key from the
//! first open, so no plaintext copy is ever written.

use fieldsync_schema::sqlite_key::DatabaseKey;
use rusqlite::Connection;
use serde::Serialize;

use crate::db;
use crate::device::Device;
use crate::error::{PeerError, Result, io_err};

/// What [`Device::rekey`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RekeyReport {
    /// `false`: the device was plaintext and is now encrypted; `true`: it changed keys.
    pub was_encrypted: bool,
    /// The database file's size afterwards.
    pub bytes: u64,
}

impl Device {
    /// Whether the database is encrypted at rest.
    pub fn is_encrypted(&self) -> bool {
        self.db_key.is_some()
    }

    /// Encrypts a plaintext device with `new`, or moves an encrypted one to `new`. Other
    /// handles on this device (another process) must be closed first; their next open needs
    /// the new key.
    pub fn rekey(&mut self, new: DatabaseKey) -> Result<RekeyReport> {
        let path = self.dir.join(db::DB_FILE);
        let was_encrypted = self.db_key.is_some();
        if was_encrypted {
            new.rekey(&self.conn)?;
        } else {
            self.encrypt_plaintext(&new)?;
        }
        self.db_key = Some(new);
        let bytes = std::fs::metadata(&path).map_err(|e| io_err(&path, e))?.len();
        Ok(RekeyReport { was_encrypted, bytes })
    }

    fn encrypt_plaintext(&mut self, new: &DatabaseKey) -> Result<()> {
        let path = self.dir.join(db::DB_FILE);
        let staged = self.dir.join(format!("{}.encrypting", db::DB_FILE));
        remove_if_present(&staged)?;
        if let Err(e) = export_encrypted(&self.conn, &staged, new) {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
        // Everything committed is in the main file; then this handle lets go of it.
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let old = std::mem::replace(&mut self.conn, Connection::open_in_memory()?);
        old.close().map_err(|(_, e)| e)?;
        // The last connection to close deletes the WAL; one still there means another
        // process has the database open.
        let wal = self.dir.join(format!("{}-wal", db::DB_FILE));
        if wal.exists() {
            let _ = std::fs::remove_file(&staged);
            self.conn = db::open(&path, None)?;
            return Err(PeerError::Key(
                "another process has this device open: close it, then encrypt the device again".into(),
            ));
        }
        if let Err(e) = std::fs::rename(&staged, &path) {
            // The plaintext file is untouched: this handle goes on with it.
            let _ = std::fs::remove_file(&staged);
            self.conn = db::open(&path, None)?;
            return Err(io_err(&path, e));
        }
        if let Ok(d) = std::fs::File::open(&self.dir) {
            // Makes the rename durable; not every platform can fsync a directory.
            let _ = d.sync_all();
        }
        // From here the file on disk is the encrypted one; if it cannot be opened now, this
        // handle is left on an empty in-memory database that holds no tables, so every call
        // fails until the device is opened again with the new key.
        self.conn = db::open(&path, Some(new))?;
        Ok(())
    }
}

/// Writes an encrypted copy of `conn`'s database to `into` and makes it durable.
fn export_encrypted(conn: &Connection, into: &std::path::Path, key: &DatabaseKey) -> Result<()> {
    let into_str = into
        .to_str()
        .ok_or_else(|| PeerError::Key(format!("{} is not a UTF-8 path", into.display())))?;
    let user_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    conn.execute(
        &format!("ATTACH DATABASE ?1 AS encrypted KEY {}", key.sql_literal()),
        [into_str],
    )?;
    let copied = conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; SELECT sqlcipher_export('encrypted'); PRAGMA encrypted.user_version = {user_version}; COMMIT;"
    ));
    if copied.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.execute_batch("DETACH DATABASE encrypted")?;
    copied?;
    let file = std::fs::File::open(into).map_err(|e| io_err(into, e))?;
    file.sync_all().map_err(|e| io_err(into, e))?;
    Ok(())
}

fn remove_if_present(path: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use fieldsync_schema::sqlite_key::DatabaseKey;
    use fieldsync_schema::{ManualTime, Schema};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;
    use uuid::Uuid;

    use crate::Device;
    use crate::testutil::{T0, dir_holds_text, obj};

    fn key(byte: u8) -> DatabaseKey {
        DatabaseKey::from_bytes([byte; 32])
    }

    fn open(dir: &Path, db_key: Option<DatabaseKey>) -> crate::Result<Device> {
        Device::open_keyed(
            dir,
            Arc::new(ManualTime::new(T0)),
            Box::new(ChaCha20Rng::seed_from_u64(1)),
            Arc::new(Schema::default_schema()),
            db_key,
        )
    }

    fn import(dir: &Path, file: &Path, db_key: Option<DatabaseKey>) -> crate::Result<Device> {
        Device::import_keyed(
            dir,
            file,
            Arc::new(ManualTime::new(T0)),
            Box::new(ChaCha20Rng::seed_from_u64(2)),
            Arc::new(Schema::default_schema()),
            db_key,
        )
    }

    fn patient(dev: &mut Device, id: Option<Uuid>, name: &str) -> Uuid {
        dev.put("patient", id, obj(serde_json::json!({ "name": name })))
            .unwrap()
            .entity_id
    }

    fn name_of(dev: &Device, id: Uuid) -> serde_json::Value {
        dev.get(id).unwrap().unwrap().fields["name"].clone()
    }

    #[test]
    fn an_encrypted_device_holds_no_record_text_and_opens_only_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = open(dir.path(), Some(key(3))).unwrap();
        assert!(dev.is_encrypted());
        let id = patient(&mut dev, None, "Zelda Quartermain");
        drop(dev);
        assert!(!dir_holds_text(dir.path(), "Quartermain"));
        let wrong = open(dir.path(), Some(key(4))).unwrap_err().to_string();
        assert!(wrong.contains("does not open"), "{wrong}");
        let missing = open(dir.path(), None).unwrap_err().to_string();
        assert!(missing.contains("is encrypted"), "{missing}");
        let dev = open(dir.path(), Some(key(3))).unwrap();
        assert_eq!(name_of(&dev, id), "Zelda Quartermain");
    }

    #[test]
    fn a_plaintext_device_is_encrypted_in_place_and_then_rekeyed() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = open(dir.path(), None).unwrap();
        let id = patient(&mut dev, None, "Yusuf Brightwater");
        let queued = dev.queue(false).unwrap().len();
        let report = dev.rekey(key(5)).unwrap();
        assert!(!report.was_encrypted);
        // The same handle goes on working, and writes after the swap are kept.
        patient(&mut dev, Some(id), "Yusuf Brightwater-Lee");
        let twin = patient(&mut dev, None, "Yara Brightwater");
        drop(dev);
        assert!(!dir_holds_text(dir.path(), "Brightwater"));
        let plain = open(dir.path(), None).unwrap_err().to_string();
        assert!(plain.contains("is encrypted"), "{plain}");

        let mut dev = open(dir.path(), Some(key(5))).unwrap();
        assert_eq!(name_of(&dev, id), "Yusuf Brightwater-Lee");
        assert_eq!(name_of(&dev, twin), "Yara Brightwater");
        assert_eq!(dev.queue(false).unwrap().len(), queued + 1);
        assert!(dev.rekey(key(6)).unwrap().was_encrypted);
        drop(dev);
        assert!(open(dir.path(), Some(key(5))).is_err());
        let dev = open(dir.path(), Some(key(6))).unwrap();
        assert_eq!(name_of(&dev, id), "Yusuf Brightwater-Lee");
    }

    #[test]
    fn a_plaintext_device_another_handle_holds_is_not_swapped_underneath_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = open(dir.path(), None).unwrap();
        patient(&mut dev, None, "Xavier Holt");
        let other = open(dir.path(), None).unwrap();
        let err = dev.rekey(key(7)).unwrap_err().to_string();
        assert!(err.contains("another process"), "{err}");
        assert!(!dev.is_encrypted());
        // Both handles still work on the untouched plaintext file.
        patient(&mut dev, None, "Wanda Holt");
        assert_eq!(other.list("patient", &[], false).unwrap().len(), 2);
    }

    #[test]
    fn an_encrypted_export_imports_only_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = open(&dir.path().join("device"), Some(key(9))).unwrap();
        patient(&mut dev, None, "Violet Okonkwo");
        let backup = dir.path().join("backup.db");
        dev.export(&backup).unwrap();
        let bytes = std::fs::read(&backup).unwrap();
        assert!(!bytes.windows(7).any(|w| w == b"Okonkwo"));
        let target = dir.path().join("restored");
        let err = import(&target, &backup, None).unwrap_err().to_string();
        assert!(err.contains("is encrypted"), "{err}");
        let err = import(&target, &backup, Some(key(1))).unwrap_err().to_string();
        assert!(err.contains("does not open"), "{err}");
        let imported = import(&target, &backup, Some(key(9))).unwrap();
        assert!(imported.is_encrypted());
        assert_eq!(imported.list("patient", &[], false).unwrap().len(), 1);
    }
}
