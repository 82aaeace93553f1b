use std::fs::File;
use std::path::PathBuf;

use fieldsync_schema::Role;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use rusqlite::Connection;
use uuid::Uuid;

use super::*;
use crate::admin;
use crate::store::sqlite::{SqliteBackend, shard_path};
use crate::store::{Backend, Directory};

/// A data dir with a relay store holding a space, a user and a token.
fn relay_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let backend = SqliteBackend::open(&data, Uuid::from_u128(7)).unwrap();
    let mut directory = backend.open_directory().unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    admin::add_space(&mut directory, "clinic", 1, &mut rng).unwrap();
    admin::add_user(&mut directory, "dana", "clinic", Role::Clinician, 2, &mut rng).unwrap();
    admin::create_enrollment_token(&mut directory, "dana", 1000, 3, &mut rng).unwrap();
    (dir, data)
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect()
}

#[test]
fn a_backup_of_a_live_store_passes_its_drill() {
    let (dir, data) = relay_dir();
    // The relay's own connections stay open (as while serving).
    let serving = SqliteBackend::open_existing(&data).unwrap();
    let _directory = serving.open_directory().unwrap();
    let _shard = serving.open_shard(0).unwrap();
    let out = dir.path().join("b/backup");
    let info = backup_store(&data, &out, false).unwrap();
    assert!(info.bytes > 0);
    assert_eq!(info.files, 1 + crate::store::sqlite::DEFAULT_SHARDS as usize);
    let report = restore_drill(&out);
    assert!(report.ok, "{}", report.verdict());
    assert!(
        report.verdict().starts_with("restore-drill: OK"),
        "{}",
        report.verdict()
    );
    assert_eq!(report.relay_id, Some(Uuid::from_u128(7)));
    assert_eq!(report.counts.as_ref().unwrap().users, 1);
    assert_eq!(report.counts.as_ref().unwrap().spaces, 1);
    // Self-contained files: no WAL beside them.
    assert!(!out.join("relay.db-wal").exists());
    assert!(!shard_path(&out, 0).with_extension("db-wal").exists());
    // An existing target is not overwritten unless told.
    assert!(matches!(backup_store(&data, &out, false), Err(BackupError::Exists(_))));
    backup_store(&data, &out, true).unwrap();
    assert!(restore_drill(&out).ok);
    // Nothing to back up where there is no store.
    assert!(matches!(
        backup_store(&dir.path().join("nothing"), &dir.path().join("x"), false),
        Err(BackupError::NoDatabase(_))
    ));
}

#[test]
fn drills_fail_loudly_on_garbage_truncation_missing_shards_and_foreign_databases() {
    let (dir, data) = relay_dir();
    let good = dir.path().join("backup");
    backup_store(&data, &good, false).unwrap();
    let copy_of_good = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(to.join("shards")).unwrap();
        std::fs::copy(good.join("relay.db"), to.join("relay.db")).unwrap();
        for n in 0..crate::store::sqlite::DEFAULT_SHARDS {
            std::fs::copy(shard_path(&good, n), shard_path(&to, n)).unwrap();
        }
        to
    };

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
    let r = restore_drill(&garbage);
    assert!(!r.ok);
    assert!(r.verdict().starts_with("restore-drill: FAILED: "), "{}", r.verdict());

    let truncated = copy_of_good("truncated");
    let bytes = std::fs::read(good.join("relay.db")).unwrap();
    std::fs::write(truncated.join("relay.db"), &bytes[..bytes.len() / 2]).unwrap();
    assert!(!restore_drill(&truncated).ok);

    let missing_shard = copy_of_good("missing-shard");
    std::fs::remove_file(shard_path(&missing_shard, 2)).unwrap();
    let r = restore_drill(&missing_shard);
    assert!(
        r.failure.as_deref().unwrap().contains("shards/shard-2.db is missing"),
        "{r:?}"
    );

    let foreign_shard = copy_of_good("foreign-shard");
    std::fs::remove_file(shard_path(&foreign_shard, 1)).unwrap();
    Connection::open(shard_path(&foreign_shard, 1))
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let r = restore_drill(&foreign_shard);
    assert!(r.failure.as_deref().unwrap().contains("not a relay database"), "{r:?}");

    let foreign = dir.path().join("foreign.db");
    Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let r = restore_drill(&foreign);
    assert!(r.failure.as_deref().unwrap().contains("not a relay database"), "{r:?}");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(restore_drill(&empty).failure.unwrap().contains("not a relay backup"));
    assert!(!restore_drill(&dir.path().join("missing")).ok);
    // The drill never changes the files it checks.
    assert_eq!(std::fs::read(good.join("relay.db")).unwrap(), bytes);
    assert!(restore_drill(&good).ok);
}

#[test]
fn a_shard_holding_a_space_the_directory_puts_elsewhere_fails_the_drill() {
    let (dir, data) = relay_dir();
    let backend = SqliteBackend::open_existing(&data).unwrap();
    let space = backend
        .open_directory()
        .unwrap()
        .space_by_name("clinic")
        .unwrap()
        .unwrap();
    let elsewhere = (space.shard + 1) % backend.shard_count();
    let mut shard = backend.open_shard(elsewhere).unwrap();
    use crate::store::SpaceStore;
    shard.begin().unwrap();
    shard
        .insert_document(Uuid::from_u128(99), space.space_id, "patient", 5)
        .unwrap();
    shard.commit().unwrap();
    drop(shard);
    let out = dir.path().join("backup");
    backup_store(&data, &out, false).unwrap();
    let r = restore_drill(&out);
    assert!(
        r.failure
            .as_deref()
            .unwrap()
            .contains("in a shard the directory does not assign"),
        "{r:?}"
    );
}

#[test]
fn retention_keeps_the_newest_backups_and_ignores_other_files() {
    let dir = tempfile::tempdir().unwrap();
    for ms in [1_000u64, 2_000, 3_000, 4_000] {
        let b = dir.path().join(format!("relay-{}", file_stamp(ms)));
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("relay.db"), b"x").unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), b"keep me").unwrap();
    std::fs::write(
        dir.path().join("relay-20200101T000000.000Z.db"),
        b"a round-1 backup: keep me",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("relay-x.failed")).unwrap();
    std::fs::write(dir.path().join("relay-x.failed/relay.db"), b"keep me").unwrap();
    let removed = prune(dir.path(), 2).unwrap();
    assert_eq!(removed.len(), 2);
    let left = scheduled_backups(dir.path()).unwrap();
    assert_eq!(
        names(&left),
        vec![
            format!("relay-{}", file_stamp(3_000)),
            format!("relay-{}", file_stamp(4_000))
        ]
    );
    assert!(dir.path().join("notes.txt").exists());
    assert!(dir.path().join("relay-20200101T000000.000Z.db").exists());
    assert!(dir.path().join("relay-x.failed/relay.db").exists());
    // Never fewer than one.
    prune(dir.path(), 0).unwrap();
    assert_eq!(scheduled_backups(dir.path()).unwrap().len(), 1);
}

#[test]
fn scheduled_backups_are_verified_and_pruned() {
    let (dir, data) = relay_dir();
    let backups = dir.path().join("backups");
    for ms in [10_000u64, 20_000, 30_000] {
        let b = scheduled_backup(&data, &backups, 2, ms, None).unwrap();
        assert!(b.drill.ok);
    }
    let left = scheduled_backups(&backups).unwrap();
    assert_eq!(
        names(&left),
        vec![
            format!("relay-{}", file_stamp(20_000)),
            format!("relay-{}", file_stamp(30_000))
        ]
    );
}

#[test]
fn restore_refuses_to_replace_a_store_unless_forced_and_never_while_served() {
    let (dir, data) = relay_dir();
    let backup = dir.path().join("backup");
    backup_store(&data, &backup, false).unwrap();
    // A fresh directory: restored, and it is the same relay.
    let fresh = dir.path().join("fresh");
    let r = restore(&backup, &fresh, false, 5).unwrap();
    assert!(r.replaced.is_empty());
    let backend = SqliteBackend::open_existing(&fresh).unwrap();
    assert_eq!(backend.relay_id(), Uuid::from_u128(7));
    assert!(
        backend
            .open_directory()
            .unwrap()
            .user_by_name("dana")
            .unwrap()
            .is_some()
    );
    drop(backend);
    // No scratch left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&fresh)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".restoring"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // An existing store: refused, then moved aside with --force.
    assert!(matches!(
        restore(&backup, &fresh, false, 6),
        Err(BackupError::Exists(_))
    ));
    let r = restore(&backup, &fresh, true, 7).unwrap();
    assert!(!r.replaced.is_empty());
    assert!(r.replaced.iter().all(|p| p.exists()));
    assert!(r.replaced.iter().any(|p| p.ends_with("shards")));
    assert!(SqliteBackend::open_existing(&fresh).is_ok());
    // A relay serving the directory holds the lock.
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(fresh.join(LOCK_FILE))
        .unwrap();
    lock.lock_shared().unwrap();
    assert!(matches!(restore(&backup, &fresh, true, 8), Err(BackupError::InUse(_))));
    // A backup that fails its drill is never adopted, and the target is left alone.
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"not a database").unwrap();
    let other = dir.path().join("other");
    assert!(matches!(
        restore(&garbage, &other, false, 9),
        Err(BackupError::DrillFailed(_))
    ));
    assert!(!other.join("relay.db").exists());
    assert!(!other.join("shards").exists());
}

#[test]
fn shard_files_without_their_directory_are_not_adopted_as_a_new_store() {
    let (_dir, data) = relay_dir();
    std::fs::remove_file(data.join("relay.db")).unwrap();
    let _ = std::fs::remove_file(data.join("relay.db-wal"));
    let _ = std::fs::remove_file(data.join("relay.db-shm"));
    let err = SqliteBackend::open(&data, Uuid::from_u128(8)).unwrap_err();
    assert!(err.to_string().contains("shard files without their directory"), "{err}");
}
