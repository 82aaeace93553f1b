//! Receipts across restarts, the audit chain, and a property test over random interleavings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, TestDevice, TestRelay, applied_version, settings_on_two_devices};
use fieldsync_relay::audit;
use fieldsync_relay::backup;
use fieldsync_relay::core::FaultSwitches;
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_schema::{Outcome, Role};
use proptest::prelude::*;
use serde_json::json;

#[test]
fn a_replayed_mutation_after_reopening_returns_the_original_outcome() {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    let mut a = r.device("dana", 1);
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    let first = r.push_one(&mut a, m.clone());
    let u = a.update("patient", p, json!({"mrn": "7"}), T0 + 1);
    r.push_one(&mut a, u.clone());
    let audit_before = r.counts().audit;

    r.restart();
    a.conn = r.login(&a);
    let again = r.push_one(&mut a, m);
    assert_eq!(
        again,
        Outcome::AlreadyApplied {
            original: Box::new(first)
        }
    );
    let again = r.push_one(&mut a, u);
    assert!(matches!(again, Outcome::AlreadyApplied { .. }));
    assert_eq!(r.version_of(p), 2, "the version does not move");
    assert_eq!(r.counts().audit, audit_before, "nothing applied twice");
}

#[test]
fn a_replayed_rejection_gets_the_same_answer() {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    let mut a = r.device("dana", 1);
    let (_, bad) = a.create("patient", json!({"mrn": "no name"}), T0);
    let first = r.push_one(&mut a, bad.clone());
    assert!(matches!(first, Outcome::Invalid { .. }));
    r.restart();
    a.conn = r.login(&a);
    assert_eq!(r.push_one(&mut a, bad), first);
}

/// dana's tablet's stale edit of a patient dana's phone edited first: returns the relay, the
/// tablet, the stale mutation and the conflict it got.
fn a_conflict() -> (TestRelay, TestDevice, fieldsync_schema::Mutation, Outcome) {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    let mut phone = r.device("dana", 1);
    let mut tablet = r.device("dana", 2);
    let (p, m) = phone.create("patient", json!({"name": "Ada"}), T0);
    r.push_one(&mut phone, m);
    r.pull(&mut tablet);
    let first = phone.update("patient", p, json!({"mrn": "7"}), T0 + 1);
    r.push_one(&mut phone, first);
    let stale = tablet.update("patient", p, json!({"mrn": "8"}), T0 + 2);
    let conflict = r.push_one(&mut tablet, stale.clone());
    assert!(
        matches!(&conflict, Outcome::Conflict { server_changes, .. } if server_changes.len() == 1),
        "{conflict:?}"
    );
    (r, tablet, stale, conflict)
}

/// Forgets which envelope a receipt answered (what a receipt written before receipts were
/// bound looks like).
fn unbind_receipt(r: &TestRelay, space: uuid::Uuid, mutation: uuid::Uuid) {
    let conn = rusqlite::Connection::open(r.shard_file(space)).unwrap();
    let n = conn
        .execute(
            "UPDATE receipts SET envelope_hash = NULL WHERE mutation_id = ?1",
            [mutation.as_bytes().to_vec()],
        )
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn a_replayed_conflict_carries_exactly_what_the_first_answer_carried() {
    let (mut r, mut tablet, stale, first) = a_conflict();
    r.restart();
    tablet.conn = r.login(&tablet);
    let again = r.push_one(&mut tablet, stale);
    assert_eq!(
        again, first,
        "the same changes (only those the device lacks) and authors"
    );
}

#[test]
fn a_replay_answered_from_an_unbound_receipt_reads_nothing_stored() {
    let (mut r, mut tablet, stale, _) = a_conflict();
    unbind_receipt(&r, stale.space_id, stale.mutation_id);
    r.restart();
    tablet.conn = r.login(&tablet);
    match r.push_one(&mut tablet, stale) {
        Outcome::Conflict {
            server_changes,
            authors,
            ..
        } => assert!(server_changes.is_empty() && authors.is_empty()),
        other => panic!("{other:?}"),
    }

    // An LWW loss replayed: the loss (which carries the winner's value) only for the very
    // envelope it answered.
    let (mut r, mut phone, mut tablet, s) = settings_on_two_devices(json!({"units": "kg"}));
    let newer = tablet.update("settings", s, json!({"units": "lb"}), T0 + 86_400_000);
    r.push_one(&mut tablet, newer);
    let older = phone.update("settings", s, json!({"units": "st"}), T0 + 1_000);
    let lost = |o: &Outcome| match o {
        Outcome::Applied { lww_lost, .. } => lww_lost.len(),
        Outcome::AlreadyApplied { original } => match original.as_ref() {
            Outcome::Applied { lww_lost, .. } => lww_lost.len(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    assert_eq!(lost(&r.push_one(&mut phone, older.clone())), 1);
    assert_eq!(
        lost(&r.push_one(&mut phone, older.clone())),
        1,
        "an exact replay keeps its loss"
    );
    unbind_receipt(&r, older.space_id, older.mutation_id);
    r.restart();
    phone.conn = r.login(&phone);
    assert_eq!(lost(&r.push_one(&mut phone, older)), 0, "an unbound one does not");
}

#[test]
fn a_space_worker_refuses_a_replay_to_a_sender_without_a_role_on_its_own() {
    // The front refuses non-members before any worker sees their batch; the worker's own check
    // stands behind it, should the front ever hand it such a job.
    let (mut r, tablet, stale, _) = a_conflict();
    let shard = r.space_row("clinic").shard as usize;
    let job = fieldsync_relay::core::Job {
        conn: tablet.conn,
        batch_id: 9,
        sender: fieldsync_relay::core::worker::Sender {
            device_id: tablet.device_id,
            user_id: tablet.user_id,
            space_id: stale.space_id,
            role: None,
            verifier: fieldsync_schema::signing::Verifier::new(&tablet.key.public_key()).unwrap(),
            replaces: None,
        },
        mutations: vec![stale],
        prechecked: None,
        not_attempted: Vec::new(),
    };
    let now = r.now + 1;
    let report = r.core.workers_mut()[shard].handle(vec![job], now);
    match &report.results[..] {
        [fieldsync_relay::core::JobResult::Decided { results, .. }] => {
            assert!(
                matches!(&results[0].outcome, Outcome::Forbidden { reason } if reason.contains("member")),
                "{results:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A relay whose one space holds a five-record audit chain.
fn relay_with_five_audit_records() -> (TestRelay, uuid::Uuid) {
    let mut r = TestRelay::new();
    let space = r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    let mut a = r.device("dana", 1);
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    r.push_one(&mut a, m);
    for i in 0..4 {
        let u = a.update("patient", p, json!({"mrn": format!("{i}")}), T0 + i);
        r.push_one(&mut a, u);
    }
    (r, space)
}

/// Verifies a backup copy of `r` after running `sql` on the copy's shard of `space`, with the
/// audit triggers dropped (what someone editing the file by hand can do).
fn verify_after_tampering(r: &TestRelay, space: uuid::Uuid, name: &str, sql: &str) -> audit::VerifyReport {
    let copy = r.dir.path().join(name);
    backup::backup_store(r.dir.path(), &copy, false).unwrap();
    let shard = r.shard_file(space);
    let tampered = rusqlite::Connection::open(copy.join("shards").join(shard.file_name().unwrap())).unwrap();
    tampered
        .execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
        .unwrap();
    tampered.execute_batch(sql).unwrap();
    drop(tampered);
    audit::verify(&SqliteBackend::open_existing(&copy).unwrap()).unwrap()
}

#[test]
fn the_audit_triggers_refuse_edits_and_deletions_in_place() {
    let (r, space) = relay_with_five_audit_records();
    let report = r.verify_audit();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 5);
    let conn = rusqlite::Connection::open(r.shard_file(space)).unwrap();
    assert!(
        conn.execute("UPDATE audit SET after_json = '{}' WHERE audit_seq = 3", [])
            .is_err()
    );
    assert!(conn.execute("DELETE FROM audit WHERE audit_seq = 3", []).is_err());
}

#[test]
fn every_kind_of_tampering_with_the_audit_chain_is_caught_and_named() {
    let (r, space) = relay_with_five_audit_records();
    let cases: [(&str, &str, &str, u64); 6] = [
        (
            "content",
            "UPDATE audit SET after_json = replace(after_json, '\"2\"', '\"20\"') WHERE audit_seq = 4;",
            "content changed",
            4,
        ),
        (
            "link",
            "UPDATE audit SET prev_hash = (SELECT prev_hash FROM audit WHERE audit_seq = 2) WHERE audit_seq = 3;",
            "link broken",
            3,
        ),
        ("removed", "DELETE FROM audit WHERE audit_seq = 3;", "place broken", 3),
        (
            // Deleted and put back with its hash but other content: it keeps its place, not its hash.
            "reinserted",
            "CREATE TEMP TABLE saved AS SELECT * FROM audit WHERE audit_seq = 2;
             DELETE FROM audit WHERE audit_seq = 2;
             UPDATE saved SET before_json = '{}';
             INSERT INTO audit SELECT * FROM saved;",
            "content changed",
            2,
        ),
        (
            "tail",
            "DELETE FROM audit WHERE audit_seq = 5;",
            "the chain ends at record 4",
            4,
        ),
        ("all", "DELETE FROM audit;", "the chain ends at record 0", 0),
    ];
    for (name, sql, reason, records_read) in cases {
        let report = verify_after_tampering(&r, space, name, sql);
        assert!(!report.ok(), "{name}: {report:?}");
        let bad = report.bad();
        assert_eq!(bad.len(), 1, "{name}: {report:?}");
        assert_eq!(bad[0].0, space, "{name}");
        assert!(bad[0].1.reason.contains(reason), "{name}: {bad:?}");
        assert_eq!(report.spaces[0].records, records_read, "{name}: where the chain breaks");
    }

    // A head that moved without its record (its hash changed, its place kept) is caught too.
    let copy = r.dir.path().join("head");
    backup::backup_store(r.dir.path(), &copy, false).unwrap();
    let shard = r.shard_file(space);
    rusqlite::Connection::open(copy.join("shards").join(shard.file_name().unwrap()))
        .unwrap()
        .execute("UPDATE space_heads SET audit_hash = ?1", [audit::GENESIS_HASH])
        .unwrap();
    let report = audit::verify(&SqliteBackend::open_existing(&copy).unwrap()).unwrap();
    assert!(!report.ok(), "{report:?}");
    assert!(
        report.bad()[0].1.reason.contains("the space's head says 5"),
        "{report:?}"
    );
}

#[test]
fn the_ack_before_commit_switch_loses_acknowledged_writes() {
    // The deliberate defect the simulator must catch really does break durability.
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    let mut a = r.device("dana", 1);
    r.core.set_fault_switches(FaultSwitches {
        ack_before_commit: true,
        ..FaultSwitches::default()
    });
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    assert!(r.push_one(&mut a, m).applied().is_some());
    r.restart();
    assert_eq!(r.version_of(p), 0);
}

#[derive(Debug, Clone)]
enum Step {
    Create { dev: usize },
    Update { dev: usize, entity: usize, stale: bool },
    Pull { dev: usize },
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0usize..3).prop_map(|dev| Step::Create { dev }),
        (0usize..3, 0usize..6, any::<bool>()).prop_map(|(dev, entity, stale)| Step::Update { dev, entity, stale }),
        (0usize..3).prop_map(|dev| Step::Pull { dev }),
        Just(Step::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random interleavings of devices writing several entities: every `Applied` moves the
    /// entity's version by exactly one, nothing else moves it, and the audit chain verifies.
    #[test]
    fn versions_advance_by_one_per_applied_and_the_chain_verifies(steps in proptest::collection::vec(step(), 1..40)) {
        let mut r = TestRelay::new();
        r.space("clinic");
        r.user("dana", "clinic", Role::Clinician);
        let mut devs: Vec<_> = (0..3).map(|i| r.device("dana", 10 + i)).collect();
        let mut entities: Vec<uuid::Uuid> = Vec::new();
        let mut expected: std::collections::BTreeMap<uuid::Uuid, u64> = Default::default();
        let mut applied = 0u64;
        let mut t = T0;
        for s in steps {
            t += 1_000;
            match s {
                Step::Create { dev } => {
                    let (id, m) = devs[dev].create("workout", json!({"name": format!("w{t}")}), t);
                    let o = r.push_one(&mut devs[dev], m);
                    prop_assert_eq!(applied_version(&o), 1);
                    entities.push(id);
                    expected.insert(id, 1);
                    applied += 1;
                }
                Step::Update { dev, entity, stale } => {
                    if entities.is_empty() { continue; }
                    let id = entities[entity % entities.len()];
                    if !devs[dev].docs.contains_key(&id) { continue; }
                    if stale { devs[dev].set_version(id, 0); }
                    let m = devs[dev].update("workout", id, json!({"notes": format!("n{t}")}), t);
                    match r.push_one(&mut devs[dev], m) {
                        Outcome::Applied { version, .. } => {
                            let e = expected.get_mut(&id).unwrap();
                            prop_assert_eq!(version, *e + 1);
                            *e = version;
                            applied += 1;
                        }
                        Outcome::Conflict { server_version, .. } => {
                            prop_assert_eq!(server_version, expected[&id]);
                            // Drop the rejected local change and adopt the relay's state.
                            r.adopt(&mut devs[dev], id);
                        }
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
                Step::Pull { dev } => { r.pull(&mut devs[dev]); }
                Step::Restart => {
                    r.restart();
                    for d in devs.iter_mut() { d.conn = r.login(d); d.cursor = Default::default(); }
                }
            }
        }
        for (id, v) in &expected {
            prop_assert_eq!(r.version_of(*id), *v);
        }
        let report = r.verify_audit();
        prop_assert!(report.ok(), "{:?}", report);
        prop_assert_eq!(report.records, applied);
    }
}
