//! Each space is its own ordering domain: its own dense feed, its own audit chain, its own shard;
//! batches never mix spaces; ids stay relay-wide across shards; a joined space arrives as
//! snapshots through `UserChanged` and a pull.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, TestDevice, TestRelay};
use fieldsync_relay::admin;
use fieldsync_relay::core::{Input, Output};
use fieldsync_relay::store::Backend;
use fieldsync_schema::{ClientMessage, FeedPayload, Mutation, Outcome, RelayMessage, Role};
use serde_json::json;
use uuid::Uuid;

/// A clinic and a gym (in different shards) and dana, a clinician in both.
fn two_spaces() -> (TestRelay, Uuid, Uuid) {
    two_spaces_on(TestRelay::new())
}

fn two_spaces_on<B: Backend>(mut r: TestRelay<B>) -> (TestRelay<B>, Uuid, Uuid) {
    let clinic = r.space("clinic");
    let gym = r.space("gym");
    r.user("dana", "clinic", Role::Clinician);
    r.user("dana", "gym", Role::Clinician);
    assert_ne!(
        r.space_row("clinic").shard,
        r.space_row("gym").shard,
        "a new space goes to the emptiest shard"
    );
    (r, clinic, gym)
}

fn create_in(dev: &mut TestDevice, space: Uuid, name: &str, now: u64) -> (Uuid, Mutation) {
    let home = dev.space_id;
    dev.space_id = space;
    let created = dev.create("patient", json!({ "name": name }), now);
    dev.space_id = home;
    created
}

fn applied_seq(o: &Outcome) -> u64 {
    o.applied().unwrap_or_else(|| panic!("expected applied, got {o:?}")).1
}

#[test]
fn each_space_numbers_its_own_feed_and_chains_its_own_audit() {
    let (mut r, clinic, gym) = two_spaces();
    let mut a = r.device("dana", 1);
    let mut seqs = Vec::new();
    for (i, space) in [clinic, gym, clinic, clinic, gym].into_iter().enumerate() {
        let (_, m) = create_in(&mut a, space, &format!("P{i}"), T0 + i as u64);
        seqs.push((space, applied_seq(&r.push_one(&mut a, m))));
    }
    assert_eq!(
        seqs,
        vec![(clinic, 1), (gym, 1), (clinic, 2), (clinic, 3), (gym, 2)],
        "each space counts 1, 2, ... on its own"
    );
    let report = r.verify_audit();
    assert!(report.ok(), "{report:?}");
    let chains: Vec<(Uuid, u64)> = report.spaces.iter().map(|c| (c.space_id, c.records)).collect();
    let mut expected = vec![(clinic, 3), (gym, 2)];
    expected.sort();
    assert_eq!(chains, expected);
    assert_eq!(r.counts().feed, 5);
    assert!(r.backend.consistency().unwrap().problems().is_empty());
}

#[test]
fn a_batch_that_mixes_spaces_stops_at_the_first_change_of_space() {
    let (mut r, clinic, gym) = two_spaces();
    let mut a = r.device("dana", 1);
    let (p1, m1) = create_in(&mut a, clinic, "one", T0);
    let (p2, m2) = create_in(&mut a, gym, "two", T0 + 1);
    let (p3, m3) = create_in(&mut a, clinic, "three", T0 + 2);
    let results = r.push(&mut a, vec![m1, m2.clone(), m3.clone()]);
    assert!(results[0].outcome.applied().is_some(), "{results:?}");
    assert!(matches!(results[1].outcome, Outcome::NotAttempted), "{results:?}");
    assert!(matches!(results[2].outcome, Outcome::NotAttempted), "{results:?}");
    assert_eq!(r.version_of(p1), 1);
    assert_eq!(
        (r.version_of(p2), r.version_of(p3)),
        (0, 0),
        "nothing after the cut is applied"
    );
    // Not attempted means retry: the same envelopes go through, one space per batch.
    assert_eq!(applied_seq(&r.push_one(&mut a, m2)), 1, "the gym's first");
    assert_eq!(applied_seq(&r.push_one(&mut a, m3)), 2, "the clinic's second");
}

#[test]
fn ids_are_relay_wide_across_shards() {
    ids_are_relay_wide(two_spaces());
}

/// On PostgreSQL, where every shard is one database and a worker looks only at its own.
#[test]
fn ids_are_relay_wide_on_postgres_too() {
    let Some(r) = TestRelay::postgres("ids_are_relay_wide_on_postgres_too") else {
        return;
    };
    ids_are_relay_wide(two_spaces_on(r));
}

fn ids_are_relay_wide<B: Backend>((mut r, clinic, gym): (TestRelay<B>, Uuid, Uuid)) {
    r.user("gus", "gym", Role::Clinician);
    let mut a = r.device("dana", 1);
    let mut g = r.device("gus", 2);
    let (p, m) = create_in(&mut a, clinic, "Ada", T0);
    r.push_one(&mut a, m.clone());
    // The same mutation id for a record in the gym, validly signed: a different change.
    let (_, mut again) = create_in(&mut a, gym, "Other", T0 + 1);
    again.mutation_id = m.mutation_id;
    a.key.sign_mutation(&mut again);
    let o = r.push_one(&mut a, again);
    assert!(
        matches!(&o, Outcome::Forbidden { reason } if reason.contains("different")),
        "{o:?}"
    );
    // The clinic's entity id, created or updated in the gym by a gym member: the same answer
    // as for another space of the same shard, and nothing of the record.
    let mut clash = g.update("patient", p, json!({"name": "Hijack"}), T0 + 2);
    clash.space_id = gym;
    g.key.sign_mutation(&mut clash);
    let o = r.push_one(&mut g, clash);
    assert!(
        matches!(&o, Outcome::Forbidden { reason } if reason.contains("no such entity in this space")),
        "{o:?}"
    );
    let home = g.space_id;
    assert_eq!(home, gym);
    let mut create = g.create("patient", json!({"name": "Hijack"}), T0 + 3).1;
    create.entity_id = p;
    g.key.sign_mutation(&mut create);
    let o = r.push_one(&mut g, create);
    assert!(matches!(o, Outcome::Forbidden { .. }), "{o:?}");
    assert_eq!(r.fields_of(p)["name"], json!("Ada"));
    assert_eq!(r.counts().feed, 1);
}

#[test]
fn a_space_joined_while_live_arrives_as_snapshots_after_user_changed() {
    let mut r = TestRelay::new();
    let clinic = r.space("clinic");
    let gym = r.space("gym");
    r.user("dana", "clinic", Role::Clinician);
    r.user("gus", "gym", Role::Clinician);
    let mut a = r.device("dana", 1);
    let mut g = r.device("gus", 2);
    let (_, m) = a.create("patient", json!({"name": "Clinic 1"}), T0);
    r.push_one(&mut a, m);
    let (w, m) = g.create("patient", json!({"name": "Gym 1"}), T0);
    r.push_one(&mut g, m);
    r.pull(&mut a);
    assert_eq!(a.cursor.seq(&clinic), 1);
    assert!(!a.cursor.spaces.contains_key(&gym));

    // An admin adds dana to the gym; the next tick tells her open session.
    admin::add_user(
        r.core.directory_mut(),
        "dana",
        "gym",
        Role::Assistant,
        r.now,
        &mut r.rng,
    )
    .unwrap();
    r.now += 20_000;
    let out = r.core.handle([Input::Tick], r.now);
    let changed = out.iter().find_map(|o| match o {
        Output::Send(c, RelayMessage::UserChanged { user }) if *c == a.conn => Some(user.clone()),
        _ => None,
    });
    let user = changed.expect("UserChanged for dana's session");
    assert!(
        user.spaces
            .iter()
            .any(|s| s.space_id == gym && s.role == Role::Assistant)
    );

    // Her pull from the same cursor brings the gym's record as a snapshot, nothing old of the
    // clinic, and her positions in both.
    let entries = r.pull(&mut a);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].entity_id, w);
    assert!(matches!(entries[0].payload, FeedPayload::Snapshot(_)));
    assert_eq!((a.cursor.seq(&clinic), a.cursor.seq(&gym)), (1, 1));
    // She is live in the gym now.
    let u = g.update("patient", w, json!({"name": "Gym 1b"}), T0 + 5);
    let out = r.send(
        g.conn,
        ClientMessage::Push {
            batch_id: 9,
            mutations: vec![u],
        },
    );
    let live: Vec<(u64, Uuid)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Send(c, RelayMessage::Live { entries }) if *c == a.conn => {
                Some(entries.iter().map(|e| (e.seq, e.space_id)).collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(live, vec![(2, gym)]);

    // Removed again: the next tick says so, and pulls and live stop at once.
    admin::remove_member(r.core.directory_mut(), "dana", "gym").unwrap();
    r.now += 20_000;
    r.core.handle([Input::Tick], r.now);
    let u = g.update("patient", w, json!({"name": "Gym 1c"}), T0 + 6);
    let out = r.send(
        g.conn,
        ClientMessage::Push {
            batch_id: 10,
            mutations: vec![u],
        },
    );
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::Send(c, RelayMessage::Live { .. }) if *c == a.conn)),
        "{out:?}"
    );
    let mut from_zero = a.cursor.clone();
    from_zero.spaces.clear();
    a.cursor = from_zero;
    assert!(r.pull(&mut a).iter().all(|e| e.space_id == clinic));
}
