use fieldsync_schema::Role;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::*;
use crate::admin;

/// A data dir with a relay database holding a space, a user and a token.
fn relay_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open_dir(dir.path(), Uuid::from_u128(7)).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    admin::add_space(&mut store, "clinic", 1, &mut rng).unwrap();
    admin::add_user(&mut store, "dana", "clinic", Role::Clinician, 2, &mut rng).unwrap();
    admin::create_enrollment_token(&mut store, "dana", 1000, 3, &mut rng).unwrap();
    let db = dir.path().join(DB_FILE);
    (dir, db)
}

#[test]
fn a_backup_of_a_live_database_passes_its_drill() {
    let (dir, db) = relay_dir();
    // The relay's own connection stays open (as while serving).
    let _serving = SqliteStore::open_dir(dir.path(), Uuid::nil()).unwrap();
    let out = dir.path().join("b/backup.db");
    let info = backup_database(&db, &out, false).unwrap();
    assert!(info.bytes > 0);
    let report = restore_drill(&out);
    assert!(report.ok, "{}", report.verdict());
    assert!(
        report.verdict().starts_with("restore-drill: OK"),
        "{}",
        report.verdict()
    );
    assert_eq!(report.relay_id, Some(Uuid::from_u128(7)));
    assert_eq!(report.counts.as_ref().unwrap().users, 1);
    // The backup is one self-contained file.
    assert!(!dir.path().join("b/backup.db-wal").exists());
    // An existing target is not overwritten unless told.
    assert!(matches!(backup_database(&db, &out, false), Err(BackupError::Exists(_))));
    backup_database(&db, &out, true).unwrap();
}

#[test]
fn drills_fail_loudly_on_garbage_truncation_and_foreign_databases() {
    let (dir, db) = relay_dir();
    let out = dir.path().join("backup.db");
    backup_database(&db, &out, false).unwrap();

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
    let r = restore_drill(&garbage);
    assert!(!r.ok);
    assert!(r.verdict().starts_with("restore-drill: FAILED: "), "{}", r.verdict());

    let bytes = std::fs::read(&out).unwrap();
    let truncated = dir.path().join("truncated.db");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(!restore_drill(&truncated).ok);

    let foreign = dir.path().join("foreign.db");
    Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let r = restore_drill(&foreign);
    assert!(r.failure.as_deref().unwrap().contains("not a relay database"), "{r:?}");

    assert!(!restore_drill(&dir.path().join("missing.db")).ok);
    // The drill never changes the file it checks.
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}

#[test]
fn retention_keeps_the_newest_backups_and_ignores_other_files() {
    let dir = tempfile::tempdir().unwrap();
    for ms in [1_000u64, 2_000, 3_000, 4_000] {
        std::fs::write(dir.path().join(format!("relay-{}.db", file_stamp(ms))), b"x").unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), b"keep me").unwrap();
    std::fs::write(dir.path().join("relay-x.db.failed"), b"keep me").unwrap();
    let removed = prune(dir.path(), 2).unwrap();
    assert_eq!(removed.len(), 2);
    let left = scheduled_backups(dir.path()).unwrap();
    let names: Vec<String> = left
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        vec![
            format!("relay-{}.db", file_stamp(3_000)),
            format!("relay-{}.db", file_stamp(4_000))
        ]
    );
    assert!(dir.path().join("notes.txt").exists());
    assert!(dir.path().join("relay-x.db.failed").exists());
}

#[test]
fn scheduled_backups_are_verified_and_pruned() {
    let (dir, db) = relay_dir();
    let backups = dir.path().join("backups");
    for ms in [10_000u64, 20_000, 30_000] {
        let b = scheduled_backup(&db, &backups, 2, ms).unwrap();
        assert!(b.drill.ok);
    }
    assert_eq!(scheduled_backups(&backups).unwrap().len(), 2);
}

#[test]
fn restore_refuses_to_replace_a_database_unless_forced_and_never_while_served() {
    let (dir, db) = relay_dir();
    let backup = dir.path().join("backup.db");
    backup_database(&db, &backup, false).unwrap();
    // A fresh directory: restored, and it is the same relay.
    let fresh = dir.path().join("fresh");
    let r = restore(&backup, &fresh, false, 5).unwrap();
    assert!(r.replaced.is_empty());
    let store = SqliteStore::open_dir(&fresh, Uuid::nil()).unwrap();
    assert_eq!(store.relay_id(), Uuid::from_u128(7));
    drop(store);
    // An existing database: refused, then moved aside with --force.
    assert!(matches!(
        restore(&backup, &fresh, false, 6),
        Err(BackupError::Exists(_))
    ));
    let r = restore(&backup, &fresh, true, 7).unwrap();
    assert!(!r.replaced.is_empty());
    assert!(r.replaced.iter().all(|p| p.exists()));
    // A relay serving the directory holds the lock.
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(fresh.join(LOCK_FILE))
        .unwrap();
    lock.lock_shared().unwrap();
    assert!(matches!(restore(&backup, &fresh, true, 8), Err(BackupError::InUse(_))));
    // A backup that fails its drill is never adopted.
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"not a database").unwrap();
    assert!(matches!(
        restore(&garbage, &dir.path().join("other"), false, 9),
        Err(BackupError::DrillFailed(_))
    ));
}
