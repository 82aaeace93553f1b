//! Export, import and sign-out.
//!
//! An export is a consistent single-file copy of the whole database (`VACUUM INTO`; an
//! encrypted device's export is encrypted with the same key), written
//! next to its destination and renamed into place, so a crash never leaves a half backup under
//! the final name. Import adopts such a file into an empty dir only after SQLite's integrity
//! check and a check that it is a device database. Sign-out wipes the device and is refused
//! while the relay has not confirmed everything, unless an export was made after the last write
//! (the data then survives in the file) or the user forces it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fieldsync_schema::sqlite_key::{self, DatabaseKey, KeyError};
use fieldsync_schema::{Schema, TimeSource};
use rusqlite::OpenFlags;
use serde::Serialize;

use crate::db::{self, keys};
use crate::device::{Device, DeviceRng};
use crate::error::{PeerError, Result, io_err};
use crate::outbox;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportReport {
    pub file: PathBuf,
    pub bytes: u64,
    pub entities: u64,
    pub outbox_items: u64,
    pub exported_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SignOutReport {
    pub device_id: uuid::Uuid,
    /// Unsynced items that existed at sign-out (only non-zero when exported first or forced).
    pub unsynced_at_sign_out: u64,
    pub forced: bool,
    pub removed: Vec<PathBuf>,
}

fn sync_file(path: &Path) -> Result<u64> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))?;
    Ok(f.metadata().map_err(|e| io_err(path, e))?.len())
}

impl Device {
    /// Writes a complete backup of this device to `file` (which must not exist yet).
    pub fn export(&mut self, file: &Path) -> Result<ExportReport> {
        if file.exists() {
            return Err(PeerError::Backup(format!(
                "{} already exists; choose a new file name",
                file.display()
            )));
        }
        let name = file
            .file_name()
            .ok_or_else(|| PeerError::Backup(format!("{} is not a file path", file.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{:016x}.tmp", self.random_u64()));
        let tmp = file.with_file_name(tmp_name);
        let tmp_str = tmp
            .to_str()
            .ok_or_else(|| PeerError::Backup(format!("{} is not a UTF-8 path", tmp.display())))?;
        let result = (|| -> Result<u64> {
            self.conn.execute("VACUUM INTO ?1", [tmp_str])?;
            let bytes = sync_file(&tmp)?;
            std::fs::rename(&tmp, file).map_err(|e| io_err(file, e))?;
            if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty())
                && let Ok(d) = std::fs::File::open(parent)
            {
                // Makes the rename itself durable; not every platform can fsync a directory.
                let _ = d.sync_all();
            }
            Ok(bytes)
        })();
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let now = self.time.now_ms();
        let counter = db::meta_get_u64(&self.conn, keys::WRITE_COUNTER)?.unwrap_or(0);
        let tx = self.conn.transaction()?;
        db::meta_set(&tx, keys::EXPORTED_AT, &now.to_string())?;
        db::meta_set(&tx, keys::EXPORTED_WRITE_COUNTER, &counter.to_string())?;
        tx.commit()?;
        let entities = crate::entity::count(&self.conn)?;
        let outbox_items = outbox::list(&self.conn, true)?.len() as u64;
        Ok(ExportReport {
            file: file.to_path_buf(),
            bytes,
            entities,
            outbox_items,
            exported_at_ms: now,
        })
    }

    /// Restores a backup into `dir`, which must not hold a device yet, and opens it.
    pub fn import(
        dir: &Path,
        file: &Path,
        time: Arc<dyn TimeSource>,
        rng: DeviceRng,
        schema: Arc<Schema>,
    ) -> Result<Device> {
        Device::import_keyed(dir, file, time, rng, schema, None)
    }

    /// Restores a backup made by an encrypted device (an export is encrypted with the
    /// device's key): the same key opens it, and the imported device stays encrypted with it.
    pub fn import_keyed(
        dir: &Path,
        file: &Path,
        time: Arc<dyn TimeSource>,
        rng: DeviceRng,
        schema: Arc<Schema>,
        db_key: Option<DatabaseKey>,
    ) -> Result<Device> {
        if Device::exists(dir) {
            return Err(PeerError::Backup(format!(
                "{} already holds a device; import only into a new, empty data dir",
                dir.display()
            )));
        }
        if !file.is_file() {
            return Err(PeerError::Backup(format!("{} is not a file", file.display())));
        }
        check_backup(file, db_key.as_ref())?;
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let target = dir.join(db::DB_FILE);
        let tmp = dir.join(format!("{}.importing", db::DB_FILE));
        std::fs::copy(file, &tmp).map_err(|e| io_err(&tmp, e))?;
        sync_file(&tmp)?;
        std::fs::rename(&tmp, &target).map_err(|e| io_err(&target, e))?;
        Device::open_keyed(dir, time, rng, schema, db_key)
    }

    /// Wipes this device. Refused while anything is unsynced, unless exported after the last
    /// write or `force`d.
    pub fn sign_out(self, force: bool) -> Result<SignOutReport> {
        let (unsynced, oldest) = outbox::unsynced(&self.conn)?;
        let writes = db::meta_get_u64(&self.conn, keys::WRITE_COUNTER)?.unwrap_or(0);
        let exported = db::meta_get_u64(&self.conn, keys::EXPORTED_WRITE_COUNTER)?;
        let exported_after_last_write = exported == Some(writes);
        if unsynced > 0 && !force && !exported_after_last_write {
            let since = oldest
                .map(|o| format!(" (oldest from {})", fieldsync_schema::time_fmt::render_ms(o)))
                .unwrap_or_default();
            return Err(PeerError::SignOutRefused(format!(
                "{unsynced} change(s) are not confirmed by the relay{since}; export a backup first \
                 (`export FILE`) or force it (`sign-out --force`, which loses them)"
            )));
        }
        let device_id = self.device_id;
        let dir = self.dir.clone();
        self.conn
            .close()
            .map_err(|(_, e)| PeerError::Backup(format!("could not close the database: {e}")))?;
        let mut removed = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let p = dir.join(format!("{}{suffix}", db::DB_FILE));
            match std::fs::remove_file(&p) {
                Ok(()) => removed.push(p),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p, e)),
            }
        }
        Ok(SignOutReport {
            device_id,
            unsynced_at_sign_out: unsynced,
            forced: force && !exported_after_last_write && unsynced > 0,
            removed,
        })
    }
}

/// Opens a candidate backup read-only and checks it before anything is copied.
fn check_backup(file: &Path, db_key: Option<&DatabaseKey>) -> Result<()> {
    let conn = sqlite_key::open(file, OpenFlags::SQLITE_OPEN_READ_ONLY, db_key).map_err(|e| match e {
        KeyError::Sqlite(e) => PeerError::Backup(format!("{} is not a readable database: {e}", file.display())),
        other => PeerError::Key(other.to_string()),
    })?;
    db::check_integrity(&conn).map_err(|e| PeerError::Backup(format!("{}: {e}", file.display())))?;
    let has_identity = db::meta_get(&conn, keys::DEVICE_ID)
        .ok()
        .flatten()
        .is_some_and(|s| uuid::Uuid::parse_str(&s).is_ok());
    if !has_identity {
        return Err(PeerError::Backup(format!(
            "{}: not a fieldsync device backup (no device identity)",
            file.display()
        )));
    }
    Ok(())
}
