//! Remote wipe (SPEC §16): a device revoked with `admin device revoke --wipe` erases its local
//! data when the relay tells it to, at its next contact, and reports how many changes it had
//! not synced.
//!
//! What stays is what the report needs: the device's identity (to prove it is the device the
//! relay asked), its enrollment without the user's spaces (to find the relay again if the first
//! report was lost) and the record of the wipe itself (status shows it; writes are refused).
//! Deleted rows are overwritten (`secure_delete`), the file is rebuilt (`VACUUM`) and the WAL
//! truncated, so no record's text is left in the device's files.

use rusqlite::TransactionBehavior;
use serde::{Deserialize, Serialize};

use crate::db::{self, keys};
use crate::device::Device;
use crate::error::{PeerError, Result, io_err};
use crate::{conflict, entity, outbox};

/// What a remote wipe erased, kept in the emptied database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WipeRecord {
    /// Device time of the wipe (ms).
    pub wiped_at_ms: u64,
    /// Changes in the outbox the relay had not confirmed (pending or blocked), now gone.
    pub discarded: u64,
}

/// Meta entries a wiped device keeps: its identity, its relay, its schema and clock. The rest
/// (cursor, sync times, export marks, refusals) describes data that is gone.
const KEPT_META: [&str; 6] = [
    keys::DEVICE_ID,
    keys::SECRET_KEY,
    keys::CREATED_AT,
    keys::ENROLLMENT,
    keys::SCHEMA_HASH,
    keys::HLC,
];

impl Device {
    /// Erases every record, queued change, conflict and sync position, and returns what was
    /// discarded. A second call (the relay asks again because the first report was lost) erases
    /// nothing more and returns the first record.
    pub fn wipe(&mut self) -> Result<WipeRecord> {
        let record = match self.wiped()? {
            Some(done) => done,
            None => self.erase()?,
        };
        // Also after an earlier wipe whose scrub failed (another process held the file).
        self.scrub()?;
        Ok(record)
    }

    /// The wipe this device went through, if any.
    pub fn wiped(&self) -> Result<Option<WipeRecord>> {
        db::meta_get_json(&self.conn, keys::WIPED)
    }

    /// Deletes the data in one transaction and records the wipe.
    fn erase(&mut self) -> Result<WipeRecord> {
        let now = self.now_ms();
        // Freed pages are zeroed, not left for a file reader to find.
        self.conn.pragma_update(None, "secure_delete", "ON")?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (discarded, _) = outbox::unsynced(&tx)?;
        // Children first (foreign keys): what was done to records, the outbox, the records.
        conflict::erase_all(&tx)?;
        outbox::erase_all(&tx)?;
        entity::erase_all(&tx)?;
        db::meta_retain(&tx, &KEPT_META)?;
        // The relay's address stays (a lost report is made again); the spaces the user could
        // see do not.
        let enrollment = self.enrollment.clone().map(|mut e| {
            e.user.spaces.clear();
            e
        });
        if let Some(e) = &enrollment {
            db::meta_set_json(&tx, keys::ENROLLMENT, e)?;
        }
        let record = WipeRecord {
            wiped_at_ms: now,
            discarded,
        };
        db::meta_set_json(&tx, keys::WIPED, &record)?;
        tx.commit()?;
        self.enrollment = enrollment;
        self.notices.clear();
        Ok(record)
    }

    /// Leaves nothing of the deleted rows in the files: the database rebuilt, the WAL (which
    /// held their last versions) copied back and emptied.
    fn scrub(&mut self) -> Result<()> {
        self.conn.execute_batch("VACUUM")?;
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            // A reader in another process holds the WAL: the wipe is reported again (and the
            // scrub retried) at the next contact rather than called done.
            return Err(io_err(
                &self.dir.join(db::DB_FILE),
                std::io::Error::other(
                    "the wipe could not empty the write-ahead log: another process holds the database open",
                ),
            ));
        }
        Ok(())
    }
}

/// Refuses a write on a wiped device (inside the write's transaction, so another process's
/// wipe is seen too).
pub(crate) fn refuse_if_wiped(conn: &rusqlite::Connection) -> Result<()> {
    match db::meta_get_json::<WipeRecord>(conn, keys::WIPED)? {
        Some(w) => Err(PeerError::Wiped {
            at_ms: w.wiped_at_ms,
            discarded: w.discarded,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::{Fixture, dir_holds_text, enroll, obj};
    use fieldsync_schema::Role;

    #[test]
    fn a_wipe_leaves_no_record_text_in_the_devices_files_and_keeps_the_identity() {
        let mut f = Fixture::new(3);
        enroll(&mut f.dev, Role::Clinician);
        let id = f.patient("Quillon Verbatimsky");
        f.dev
            .update("patient", id, obj(serde_json::json!({"mrn": "XYLO-4471-TENDON"})))
            .unwrap();
        let device_id = f.dev.device_id();
        assert!(
            dir_holds_text(f.dir.path(), "Quillon Verbatimsky"),
            "the check must see plaintext"
        );

        let record = f.dev.wipe().unwrap();
        assert_eq!(
            record.discarded, 1,
            "a create and its update combine into one queued change"
        );
        for needle in ["Quillon Verbatimsky", "XYLO-4471-TENDON"] {
            assert!(
                !dir_holds_text(f.dir.path(), needle),
                "`{needle}` left in the device's files"
            );
        }

        let f = f.reopen(4);
        assert_eq!(f.dev.device_id(), device_id);
        assert_eq!(f.dev.wiped().unwrap(), Some(record));
        let s = f.dev.status().unwrap();
        assert_eq!((s.entities, s.unsynced, s.last_sync_ms), (0, 0, None));
        assert!(s.enrolled.is_some(), "the relay's address stays for a lost report");
        assert!(f.dev.enrollment().unwrap().user.spaces.is_empty());
    }
}
