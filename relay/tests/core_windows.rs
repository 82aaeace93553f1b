//! Sync windows (issue 19): a device that syncs by windows gets, in a space's first download,
//! only records of a windowed type dated inside the window (every record of another type);
//! `Fetch` brings any record of the user's spaces whole — and nothing of a space the user is
//! not a member of, which is answered exactly like an id that does not exist.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, TestDevice, TestRelay};
use fieldsync_relay::core::Output;
use fieldsync_schema::document::relay_actor;
use fieldsync_schema::wire::MAX_FETCH;
use fieldsync_schema::{ClientMessage, EntityDoc, FeedPayload, RelayMessage, Role};
use serde_json::json;
use uuid::Uuid;

// T0 is 2026-11-18: journal entries 90 days back reach 2026-08-20.
const INSIDE: &str = "2026-10-01";
const OUTSIDE: &str = "2025-03-01";

fn two_spaces() -> TestRelay {
    let mut r = TestRelay::new();
    r.space("home");
    r.space("other");
    r.user("rui", "home", Role::Patient);
    r.user("eve", "other", Role::Patient);
    r
}

/// Logs `dev` in again, syncing by windows.
fn login_windowed(r: &mut TestRelay, dev: &mut TestDevice) {
    dev.conn = r.login_with(dev, |hello| {
        if let ClientMessage::Hello { windowed, .. } = hello {
            *windowed = true;
        }
    });
}

fn fetch(r: &mut TestRelay, dev: &TestDevice, ids: Vec<Uuid>) -> (Vec<Uuid>, Vec<Uuid>, Vec<FeedPayload>) {
    let out = r.send(dev.conn, ClientMessage::Fetch { ids });
    match out.into_iter().next() {
        Some(Output::Send(
            _,
            RelayMessage::Fetched {
                entries,
                unknown,
                later,
            },
        )) => {
            assert!(later.is_empty());
            let ids = entries.iter().map(|e| e.entity_id).collect();
            (ids, unknown, entries.into_iter().map(|e| e.payload).collect())
        }
        other => panic!("expected fetched, got {other:?}"),
    }
}

#[test]
fn a_windowed_first_download_leaves_out_old_records_of_windowed_types_only() {
    let mut r = two_spaces();
    let mut phone = r.device("rui", 1);
    let (recent, m) = phone.create("journal_entry", json!({"date": INSIDE, "pain_level": 4}), r.now);
    r.push_one(&mut phone, m);
    let (old, m) = phone.create("journal_entry", json!({"date": OUTSIDE, "pain_level": 2}), r.now);
    r.push_one(&mut phone, m);
    let (undated, m) = phone.create("settings", json!({"units": "metric"}), r.now);
    r.push_one(&mut phone, m);
    assert!(r.now < T0 + 60_000);

    let mut watch = r.device("rui", 2);
    login_windowed(&mut r, &mut watch);
    let mut got: Vec<Uuid> = r.pull(&mut watch).iter().map(|e| e.entity_id).collect();
    got.sort();
    let mut want = vec![recent, undated];
    want.sort();
    assert_eq!(got, want, "the old entry stays on the relay");

    // A device that does not sync by windows gets everything.
    let mut laptop = r.device("rui", 3);
    assert_eq!(r.pull(&mut laptop).len(), 3);

    // Documents stored before the relay kept their day are dated from the document itself.
    let home = r.space_row("home").space_id;
    let conn = rusqlite::Connection::open(r.shard_file(home)).unwrap();
    let dated: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM documents WHERE window_day IS NOT NULL",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(
        dated, 2,
        "both journal entries carry their day; the settings have no window"
    );
    conn.execute("UPDATE documents SET window_day = NULL", []).unwrap();
    drop(conn);
    let mut tablet = r.device("rui", 5);
    login_windowed(&mut r, &mut tablet);
    assert_eq!(
        r.pull(&mut tablet).len(),
        2,
        "the old entry stays out without its stored day too"
    );

    // After the first download the feed brings every change, old records' too: the device
    // skips what it cannot apply.
    let m = phone.update("journal_entry", old, json!({"pain_level": 3}), r.now);
    r.push_one(&mut phone, m);
    let feed = r.pull(&mut watch);
    assert_eq!(feed.iter().map(|e| e.entity_id).collect::<Vec<_>>(), vec![old]);
}

#[test]
fn fetch_answers_records_of_the_users_spaces_and_nothing_else() {
    let mut r = two_spaces();
    let mut phone = r.device("rui", 1);
    let (old, m) = phone.create("journal_entry", json!({"date": OUTSIDE, "pain_level": 2}), r.now);
    r.push_one(&mut phone, m);
    let mut eves = r.device("eve", 4);
    let (secret, m) = eves.create("journal_entry", json!({"date": INSIDE, "body": "eve's own"}), r.now);
    r.push_one(&mut eves, m);

    let mut watch = r.device("rui", 2);
    login_windowed(&mut r, &mut watch);
    r.pull(&mut watch);
    let nowhere = Uuid::from_u128(7);
    let (found, unknown, payloads) = fetch(&mut r, &watch, vec![old, secret, nowhere, old]);
    assert_eq!(found, vec![old], "asked twice, sent once");
    assert_eq!(
        unknown,
        vec![secret, nowhere],
        "another space's record reads as not there"
    );
    let FeedPayload::Snapshot(bytes) = &payloads[0] else {
        panic!("a fetched record comes whole: {payloads:?}")
    };
    let doc = EntityDoc::load(&bytes.0, relay_actor(Uuid::nil())).unwrap();
    assert_eq!(doc.fields(), r.fields_of(old));
    assert_eq!(doc.fields()["pain_level"], json!(2));
}

#[test]
fn fetch_is_for_authenticated_devices_and_bounded() {
    let mut r = two_spaces();
    let watch = r.device("rui", 2);
    let stranger = r.connect();
    let out = r.send(
        stranger,
        ClientMessage::Fetch {
            ids: vec![Uuid::from_u128(1)],
        },
    );
    assert!(
        out.iter()
            .all(|o| !matches!(o, Output::Send(_, RelayMessage::Fetched { .. }))),
        "{out:?}"
    );
    assert!(out.iter().any(|o| matches!(o, Output::Close(..))), "{out:?}");

    let too_many: Vec<Uuid> = (0..=MAX_FETCH as u128).map(Uuid::from_u128).collect();
    let out = r.send(watch.conn, ClientMessage::Fetch { ids: too_many });
    assert!(out.iter().any(|o| matches!(o, Output::Close(..))), "{out:?}");
}

/// Logs `dev` in again with `Hello`'s delivery fields set.
fn login_with(r: &mut TestRelay, dev: &mut TestDevice, priority: bool, metered: bool) {
    dev.conn = r.login_with(dev, |hello| {
        if let ClientMessage::Hello {
            priority: p,
            metered: m,
            ..
        } = hello
        {
            (*p, *m) = (priority, metered);
        }
    });
}

fn types_of(entries: &[fieldsync_schema::FeedEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.entity_type.as_str()).collect()
}

/// Reference data (`priority = "low"`) comes after every other type in a new device's
/// snapshot, even where it was stored first; a device on a metered link gets none of it —
/// not in the snapshot, not live — until it connects without.
#[test]
fn reference_data_comes_last_and_waits_for_an_unmetered_link() {
    let mut r = TestRelay::new();
    r.space("gym");
    r.user("coach", "gym", Role::Service);
    r.user("rui", "gym", Role::Patient);
    let mut coach = r.device("coach", 1);
    for name in ["squat", "deadlift", "plank"] {
        let (_, m) = coach.create("exercise", json!({ "name": name }), r.now);
        r.push_one(&mut coach, m);
    }
    let mut phone = r.device("rui", 2);
    for date in [INSIDE, OUTSIDE] {
        let (_, m) = phone.create("journal_entry", json!({ "date": date, "pain_level": 1 }), r.now);
        r.push_one(&mut phone, m);
    }

    let mut ordered = r.device("rui", 3);
    login_with(&mut r, &mut ordered, true, false);
    let got = r.pull(&mut ordered);
    assert_eq!(
        types_of(&got),
        ["journal_entry", "journal_entry", "exercise", "exercise", "exercise"]
    );
    // In key order (a device that did not ask for priority order) the library comes first.
    let mut older = r.device("rui", 4);
    login_with(&mut r, &mut older, false, false);
    assert_eq!(types_of(&r.pull(&mut older))[0], "exercise");

    let mut metered = r.device("rui", 5);
    login_with(&mut r, &mut metered, true, true);
    assert_eq!(types_of(&r.pull(&mut metered)), ["journal_entry", "journal_entry"]);
    let (_, m) = coach.create("exercise", json!({ "name": "lunge" }), r.now);
    let out = r.send(
        coach.conn,
        ClientMessage::Push {
            batch_id: 77,
            mutations: vec![m],
        },
    );
    let live = common::live_entries(&out, metered.conn);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].payload, FeedPayload::NotSelected, "only its place, live");
    // Unmetered again, from the snapshots: the library arrives.
    metered.cursor = Default::default();
    login_with(&mut r, &mut metered, true, false);
    let again = r.pull(&mut metered);
    assert_eq!(types_of(&again).iter().filter(|t| **t == "exercise").count(), 4);
}
