//! The relay core on PostgreSQL (a throwaway server the tests start): what it does on SQLite,
//! and what several relays on one database need — a retry that reaches another relay gets the
//! first answer, a gated record edited through two relays gives one `Applied` and one
//! conflict, and relays writing one space at the same time keep its feed dense and its audit
//! chain whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestDevice, TestRelay};
use fieldsync_relay::core::{Input, Output};
use fieldsync_relay::store::postgres::PgBackend;
use fieldsync_relay::store::{Backend, SpaceStore};
use fieldsync_schema::{ClientMessage, Mutation, Outcome, RelayMessage, Role};
use serde_json::json;
use uuid::Uuid;

fn clinic(test: &str) -> Option<TestRelay<PgBackend>> {
    let mut r = TestRelay::postgres(test)?;
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    r.user("cody", "clinic", Role::Clinician);
    Some(r)
}

/// Pushes `m` from `dev` through `relay` on the connection `conn` (its session there).
fn push_via(relay: &mut TestRelay<PgBackend>, dev: &mut TestDevice, conn: u64, m: Mutation) -> Outcome {
    let home = std::mem::replace(&mut dev.conn, conn);
    let outcome = relay.push_one(dev, m);
    dev.conn = home;
    outcome
}

fn seqs(relay: &TestRelay<PgBackend>, space: Uuid) -> Vec<u64> {
    let shard = relay.space_row("clinic").shard;
    let store = relay.backend.open_shard(shard).unwrap();
    store
        .feed_range(space, 0, u64::MAX, 10_000)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

#[test]
fn a_relay_on_postgres_applies_prompts_a_conflict_serves_pulls_and_keeps_its_chain() {
    let Some(mut r) = clinic("a_relay_on_postgres_applies") else {
        return;
    };
    let mut tablet = r.device("dana", 1);
    let mut phone = r.device("cody", 2);
    let (patient, create) = tablet.create("patient", json!({"name": "Ada", "phone": "1"}), r.now);
    assert!(matches!(
        r.push_one(&mut tablet, create),
        Outcome::Applied { version: 1, .. }
    ));
    assert_eq!(r.pull(&mut phone).len(), 1);

    let mine = tablet.update("patient", patient, json!({"phone": "2"}), r.now);
    let theirs = phone.update("patient", patient, json!({"phone": "3"}), r.now);
    assert!(matches!(
        r.push_one(&mut tablet, mine),
        Outcome::Applied { version: 2, .. }
    ));
    assert!(matches!(
        r.push_one(&mut phone, theirs),
        Outcome::Conflict { server_version: 2, .. }
    ));
    assert_eq!(r.fields_of(patient)["phone"], "2");

    let counts = r.counts();
    assert_eq!(
        (counts.documents, counts.feed, counts.receipts, counts.audit),
        (1, 2, 3, 2)
    );
    let report = r.verify_audit();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 2);
}

#[test]
fn a_retry_through_another_relay_is_answered_once_and_a_gated_edit_through_two_relays_conflicts() {
    let Some(mut a) = clinic("a_retry_through_another_relay") else {
        return;
    };
    let mut b = a.another_relay(2);
    let mut tablet = a.device("dana", 1);
    let mut phone = a.device("cody", 2);
    let tablet_on_b = b.login(&tablet);
    let phone_on_b = b.login(&phone);

    let (patient, create) = tablet.create("patient", json!({"name": "Ada"}), a.now);
    assert!(matches!(
        a.push_one(&mut tablet, create.clone()),
        Outcome::Applied { version: 1, .. }
    ));
    // The answer was lost; the device retries and its load balancer picks the other relay.
    b.now = a.now;
    match push_via(&mut b, &mut tablet, tablet_on_b, create) {
        Outcome::AlreadyApplied { original } => assert!(matches!(*original, Outcome::Applied { version: 1, .. })),
        other => panic!("a retry on another relay was answered {other:?}"),
    }
    a.pull(&mut phone);

    let mine = tablet.update("patient", patient, json!({"phone": "2"}), a.now);
    let theirs = phone.update("patient", patient, json!({"phone": "3"}), a.now);
    assert!(matches!(
        a.push_one(&mut tablet, mine),
        Outcome::Applied { version: 2, .. }
    ));
    assert!(matches!(
        push_via(&mut b, &mut phone, phone_on_b, theirs),
        Outcome::Conflict { server_version: 2, .. }
    ));

    let space = a.space_row("clinic").space_id;
    assert_eq!(
        seqs(&a, space),
        [1, 2],
        "one feed row per applied mutation, whichever relay applied it"
    );
    assert_eq!(a.counts().receipts, 3);
    assert!(a.verify_audit().ok());
}

#[test]
fn relays_writing_one_space_at_once_keep_its_feed_dense_and_its_chain_whole() {
    let Some(mut a) = clinic("relays_writing_one_space_at_once") else {
        return;
    };
    let mut b = a.another_relay(2);
    let mut tablet = a.device("dana", 1);
    let mut phone = a.device("cody", 2);
    phone.conn = b.login(&phone);
    const EACH: usize = 15;
    let write_all = |relay: &mut TestRelay<PgBackend>, dev: &mut TestDevice, who: &str| {
        for n in 0..EACH {
            let (_, m) = dev.create("patient", json!({"name": format!("{who} {n}")}), relay.now);
            let outcome = relay.push_one(dev, m);
            assert!(matches!(outcome, Outcome::Applied { .. }), "{who} {n}: {outcome:?}");
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| write_all(&mut a, &mut tablet, "tablet"));
        s.spawn(|| write_all(&mut b, &mut phone, "phone"));
    });
    let space = a.space_row("clinic").space_id;
    assert_eq!(seqs(&a, space), (1..=2 * EACH as u64).collect::<Vec<_>>());
    let report = a.verify_audit();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 2 * EACH as u64);
}

/// The outcome of the one mutation a push on `conn` carried.
fn pushed(relay: &mut TestRelay<PgBackend>, conn: u64, m: Mutation) -> Outcome {
    let out = relay.send(
        conn,
        ClientMessage::Push {
            batch_id: 1,
            mutations: vec![m],
        },
    );
    out.into_iter()
        .find_map(|o| match o {
            Output::Send(c, RelayMessage::PushResult { mut results, .. }) if c == conn => {
                Some(results.remove(0).outcome)
            }
            _ => None,
        })
        .expect("a push result")
}

#[test]
fn the_same_mutation_in_flight_on_two_relays_at_once_is_applied_once_and_replayed_once() {
    let Some(mut a) = clinic("the_same_mutation_in_flight_on_two_relays") else {
        return;
    };
    let mut b = a.another_relay(2);
    let mut tablet = a.device("dana", 1);
    let on_a = tablet.conn;
    let on_b = b.login(&tablet);
    let (patient, create) = tablet.create("patient", json!({"name": "Ada", "phone": "0"}), a.now);
    assert!(matches!(a.push_one(&mut tablet, create), Outcome::Applied { .. }));
    for round in 1..=8u64 {
        let edit = tablet.update("patient", patient, json!({"phone": round.to_string()}), a.now);
        let barrier = std::sync::Barrier::new(2);
        let (first, second) = std::thread::scope(|s| {
            let first = s.spawn(|| {
                barrier.wait();
                pushed(&mut a, on_a, edit.clone())
            });
            let second = s.spawn(|| {
                barrier.wait();
                pushed(&mut b, on_b, edit.clone())
            });
            (first.join().unwrap(), second.join().unwrap())
        });
        let applied = [&first, &second]
            .iter()
            .filter(|o| matches!(o, Outcome::Applied { .. }))
            .count();
        let replayed = [&first, &second]
            .iter()
            .filter(|o| matches!(o, Outcome::AlreadyApplied { .. }))
            .count();
        assert_eq!((applied, replayed), (1, 1), "round {round}: {first:?} / {second:?}");
        tablet.set_version(patient, round + 1);
    }
    assert_eq!(a.version_of(patient), 9);
    assert!(a.verify_audit().ok());
}

/// A store notification (what the server turns PostgreSQL's `NOTIFY` into) makes a relay look
/// at once, without a tick: another relay's row reaches its live session, only the notified
/// spaces are read, and an access change closes a revoked device's session.
#[test]
fn a_store_notification_fans_out_another_relays_rows_and_revocations_without_a_tick() {
    let Some(mut a) = clinic("a_store_notification_fans_out") else {
        return;
    };
    let mut b = a.another_relay(2);
    let mut watcher = a.device("dana", 1);
    let mut writer = a.device("cody", 2);
    writer.conn = b.login(&writer);
    assert!(
        a.pull(&mut watcher).is_empty(),
        "caught up: the watcher is live on relay A"
    );
    let space = a.space_row("clinic").space_id;

    let (patient, create) = writer.create("patient", json!({"name": "Through relay B"}), b.now);
    assert!(matches!(b.push_one(&mut writer, create), Outcome::Applied { .. }));
    let live = |out: &[Output], conn: u64| -> Vec<Uuid> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(c, RelayMessage::Live { entries, .. }) if *c == conn => Some(entries.clone()),
                _ => None,
            })
            .flatten()
            .map(|e| e.entity_id)
            .collect()
    };
    let elsewhere = Input::StoreChanged {
        spaces: Some(vec![Uuid::from_u128(1)]),
        access: false,
    };
    assert!(
        live(&a.core.handle([elsewhere], a.now), watcher.conn).is_empty(),
        "another space was notified"
    );
    let here = Input::StoreChanged {
        spaces: Some(vec![space]),
        access: false,
    };
    assert_eq!(live(&a.core.handle([here.clone()], a.now), watcher.conn), [patient]);
    assert!(
        live(&a.core.handle([here], a.now), watcher.conn).is_empty(),
        "each row once"
    );

    // The watcher is revoked through relay B's store handle; relay A hears of it by notification.
    fieldsync_relay::admin::revoke_device(b.core.directory_mut(), watcher.device_id, b.now).unwrap();
    let out = a.core.handle(
        [Input::StoreChanged {
            spaces: Some(Vec::new()),
            access: true,
        }],
        a.now + 1,
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Close(c, _) if *c == watcher.conn)),
        "the revoked device's session closes: {out:?}"
    );
}
