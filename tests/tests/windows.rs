//! Sync windows, fetch and eviction (issue 19) over the real binaries: a watch that syncs by
//! windows joins two years of a runner's data and downloads only the last 90 days of journal
//! entries and workouts, the plans of the coming weeks and every plan a held workout
//! references; `fetch` brings older records (offline: at the next sync) with what they
//! reference; `evict` removes what left the window and never a record with unsynced changes,
//! a conflict, or a held record pointing at it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use fieldsync_peer::net;
use fieldsync_peer::sync::SyncMachine;
use fieldsync_peer::{Device, FetchState};
use fieldsync_schema::time_fmt::render_ms;
use fieldsync_schema::{ManualTime, SystemTimeSource, TimeSource};
use fieldsync_tests::{Peer, Relay, open_device, quiet, runtime};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use uuid::Uuid;

const DAY_MS: u64 = 86_400_000;

/// The UTC date `offset` days before now (negative: after).
fn day(offset: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let at = now.saturating_add_signed(-offset * DAY_MS as i64);
    render_ms(at)[..10].to_string()
}

fn fields(value: Value) -> Map<String, Value> {
    serde_json::from_value(value).unwrap()
}

fn writer(dir: &Path, seed: u64, relay: &Relay, user: &str) -> Device {
    let mut dev = open_device(dir, seed);
    runtime()
        .block_on(net::enroll(&mut dev, &relay.url(), &relay.token(user)))
        .unwrap();
    dev
}

fn sync(dev: &mut Device) {
    runtime()
        .block_on(net::sync_once(dev, &mut SyncMachine::default(), &quiet()))
        .unwrap();
}

fn count(peer: &Peer, entity_type: &str) -> usize {
    peer.json(&["list", entity_type]).as_array().unwrap().len()
}

fn holds(peer: &Peer, entity_type: &str, id: Uuid) -> bool {
    peer.run(&["get", entity_type, &id.to_string()]).status.success()
}

/// Two years of a runner's data. Nothing lies within three days of a window's edge, so a test
/// running across midnight counts the same.
struct Dataset {
    /// Week `k`'s plan (week starting `7k` days ago; negative: weeks ahead).
    plans: BTreeMap<i64, Uuid>,
    /// Journal entries by how many days ago.
    journal: BTreeMap<i64, Uuid>,
    /// Week `k`'s workout (`7k + 1` days ago), on that week's plan.
    workouts: BTreeMap<i64, Uuid>,
    /// Two days ago, on a plan from 60 weeks back.
    recent_on_old_plan: Uuid,
}

fn two_years(coach: &mut Device, phone: &mut Device) -> Dataset {
    let mut plans = BTreeMap::new();
    for k in (-2..=104).filter(|k| *k != 1) {
        let receipt = coach
            .put(
                "plan",
                None,
                fields(json!({"name": format!("week {k}"), "week_start": day(7 * k), "details": "easy miles"})),
            )
            .unwrap();
        plans.insert(k, receipt.entity_id);
    }
    // The phone holds the plans its workouts name (a device checks a reference it writes).
    sync(coach);
    sync(phone);
    let mut journal = BTreeMap::new();
    for offset in (0..730).filter(|o| !(86..=94).contains(o)) {
        let receipt = phone
            .put(
                "journal_entry",
                None,
                fields(json!({"date": day(offset), "pain_level": offset % 10, "body": format!("day -{offset}")})),
            )
            .unwrap();
        journal.insert(offset, receipt.entity_id);
    }
    let mut workouts = BTreeMap::new();
    for k in (0..104).filter(|k| ![12, 13].contains(k)) {
        let mut w = json!({"name": format!("run {k}"), "started_at": format!("{}T07:00:00Z", day(7 * k + 1))});
        if let Some(plan) = plans.get(&k) {
            w["plan_id"] = json!(plan.to_string());
        }
        workouts.insert(k, phone.put("workout", None, fields(w)).unwrap().entity_id);
    }
    let recent =
        json!({"name": "tempo", "started_at": format!("{}T07:00:00Z", day(2)), "plan_id": plans[&60].to_string()});
    let recent_on_old_plan = phone.put("workout", None, fields(recent)).unwrap().entity_id;
    Dataset {
        plans,
        journal,
        workouts,
        recent_on_old_plan,
    }
}

#[test]
fn a_windowed_device_holds_its_window_and_what_it_references_fetches_the_rest_and_evicts_safely() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("home", &[("rui", "patient"), ("coach", "service")]);
    let mut coach = writer(&dir.path().join("coach"), 1, &relay, "coach");
    let mut phone = writer(&dir.path().join("phone"), 2, &relay, "rui");
    let data = two_years(&mut coach, &mut phone);
    sync(&mut phone);

    let watch = Peer::init(&dir.path().join("watch"));
    watch.ok(&[
        "enroll",
        "--relay",
        &relay.url(),
        "--token",
        &relay.token("rui"),
        "--windows",
    ]);
    assert_eq!(watch.status()["windowed"], json!(true));
    watch.ok(&["sync"]);

    // The last 90 days: journal entries 0..=85 days old, workouts of weeks 0..=11 and the
    // recent one; plans: the coming weeks' (-2, -1, 0) and those the held workouts name.
    assert_eq!(count(&watch, "journal_entry"), 86);
    assert!(holds(&watch, "journal_entry", data.journal[&85]));
    assert!(!holds(&watch, "journal_entry", data.journal[&95]));
    assert_eq!(count(&watch, "workout"), 12 + 1);
    let mut plans_held: Vec<i64> = vec![-2, -1, 0];
    plans_held.extend((2..=11).chain([60]));
    for (k, id) in &data.plans {
        assert_eq!(holds(&watch, "plan", *id), plans_held.contains(k), "plan of week {k}");
    }
    assert!(holds(&watch, "workout", data.recent_on_old_plan));
    assert_eq!(watch.status()["fetch_queued"], json!(0));

    // Fetch: an old journal entry; an old workout comes with its plan.
    let old_entry = watch.json(&["fetch", "journal_entry", &data.journal[&400].to_string()]);
    assert_eq!(old_entry["fields"]["body"], json!("day -400"));
    watch.json(&["fetch", "workout", &data.workouts[&50].to_string()]);
    assert!(
        holds(&watch, "plan", data.plans[&50]),
        "a fetched record's references come with it"
    );
    let nowhere = watch.fails(&["fetch", "journal_entry", &Uuid::from_u128(7).to_string()]);
    assert!(nowhere.contains("not found") || nowhere.contains("no "), "{nowhere}");

    // Offline: queued, fetched at the next sync.
    relay.stop();
    let queued = watch.ok(&["fetch", "journal_entry", &data.journal[&500].to_string()]);
    assert!(queued.contains("queued"), "{queued}");
    assert_eq!(watch.status()["fetch_queued"], json!(1));
    relay.restart();
    watch.ok(&["sync"]);
    assert!(holds(&watch, "journal_entry", data.journal[&500]));
    assert_eq!(watch.status()["fetch_queued"], json!(0));

    // A conflict on an old workout: the watch edits it, the phone edited it first.
    watch.json(&["fetch", "workout", &data.workouts[&40].to_string()]);
    let w40 = data.workouts[&40].to_string();
    watch.ok(&["put", "workout", &w40, "--json", r#"{"name": "watch says"}"#]);
    phone
        .update("workout", data.workouts[&40], fields(json!({"name": "phone says"})))
        .unwrap();
    sync(&mut phone);
    watch.ok(&["sync"]);
    assert_eq!(watch.get("workout", &w40)["sync_state"], json!("conflict"));
    // An unsynced edit of an old journal entry.
    let j400 = data.journal[&400].to_string();
    watch.ok(&["put", "journal_entry", &j400, "--json", r#"{"body": "UNSYNCED"}"#]);

    let report = watch.json(&["evict"]);
    // Gone: entry 500 and workout 50, then plan 50 that only workout 50 named.
    assert_eq!(report["evicted"], json!(3), "{report}");
    assert!(!holds(&watch, "journal_entry", data.journal[&500]));
    assert!(!holds(&watch, "workout", data.workouts[&50]));
    assert!(!holds(&watch, "plan", data.plans[&50]));
    // Kept: the unsynced edit, the conflict, the plan the conflicted workout names, and the
    // plans held workouts name.
    assert_eq!(watch.get("journal_entry", &j400)["fields"]["body"], json!("UNSYNCED"));
    assert_eq!(watch.get("workout", &w40)["sync_state"], json!("conflict"));
    assert!(holds(&watch, "plan", data.plans[&40]));
    assert!(holds(&watch, "plan", data.plans[&60]));
    assert!(holds(&watch, "plan", data.plans[&5]));
    assert_eq!(count(&watch, "journal_entry"), 86 + 1);

    // An evicted record comes back with fetch; once the conflict is settled, the unsynced edit
    // queued behind it goes out (the outbox keeps its order).
    watch.json(&["fetch", "workout", &data.workouts[&50].to_string()]);
    assert!(holds(&watch, "plan", data.plans[&50]));
    watch.ok(&["resolve", "workout", &w40, "--keep", "theirs"]);
    watch.ok(&["sync"]);
    sync(&mut phone);
    assert_eq!(
        phone.get(data.journal[&400]).unwrap().unwrap().fields["body"],
        json!("UNSYNCED")
    );

    // The library says the same about a record it holds.
    let mut dev = open_device(&watch.data, 9);
    assert_eq!(
        dev.fetch("journal_entry", data.journal[&400]).unwrap(),
        FetchState::Held
    );
    drop(dev);

    // Eviction at a bound: after a sync, what left its window, is settled and arrived more than
    // a day ago goes (the library, with the watch's clock two days on).
    watch.ok(&["windows", "--evict-above", "10"]);
    watch.ok(&["sync"]);
    assert!(
        holds(&watch, "workout", data.workouts[&50]),
        "fetched today: kept for now"
    );
    let later = ManualTime::new(SystemTimeSource.now_ms() + 2 * DAY_MS);
    let mut dev = Device::open(&watch.data, Arc::new(later), Box::new(ChaCha20Rng::seed_from_u64(9))).unwrap();
    sync(&mut dev);
    drop(dev);
    assert!(!holds(&watch, "workout", data.workouts[&50]));
    assert!(
        !holds(&watch, "journal_entry", data.journal[&400]),
        "synced now, so evicted"
    );
    assert!(
        holds(&watch, "workout", data.workouts[&40]),
        "a conflict on record keeps it"
    );
    assert_eq!(count(&watch, "journal_entry"), 86);
}

/// A device that does not sync by windows refuses to evict (it would receive changes to
/// evicted records it could not apply).
#[test]
fn only_a_windowed_device_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::init(&dir.path().join("d"));
    let refused = peer.fails(&["evict"]);
    assert!(refused.contains("windows"), "{refused}");
    let refused = peer.fails(&["windows", "--evict-above", "5"]);
    assert!(refused.contains("windows"), "{refused}");
    peer.ok(&["windows", "--on"]);
    assert_eq!(peer.json(&["windows", "--evict-above", "5"])["evict_above"], json!(5));
    assert_eq!(peer.json(&["evict"])["evicted"], json!(0));
}

/// Priority on a metered link: a phone told it is metered syncs the runner's own records and
/// defers the exercise library (`priority = "low"`), says so in `status`, and gets the library
/// once told the link is not metered any more.
#[test]
fn a_metered_device_defers_reference_data_until_an_unmetered_link() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("home", &[("rui", "patient"), ("coach", "service")]);
    let mut coach = writer(&dir.path().join("coach"), 1, &relay, "coach");
    for name in ["squat", "deadlift"] {
        coach.put("exercise", None, fields(json!({ "name": name }))).unwrap();
    }
    sync(&mut coach);
    let mut watch = writer(&dir.path().join("watch"), 2, &relay, "rui");
    watch
        .put(
            "journal_entry",
            None,
            fields(json!({"date": day(0), "body": "knee ok"})),
        )
        .unwrap();
    sync(&mut watch);

    let phone = Peer::init(&dir.path().join("phone"));
    phone.ok(&["metered", "--on"]);
    phone.enroll(&relay, "rui");
    phone.ok(&["sync"]);
    assert_eq!(count(&phone, "journal_entry"), 1);
    assert_eq!(count(&phone, "exercise"), 0);
    let status = phone.status();
    assert_eq!(status["deferred_types"], json!(["exercise", "vocab"]), "{status}");

    let off = phone.json(&["metered", "--off"]);
    assert_eq!(off["deferred_types"], json!([]));
    phone.ok(&["sync"]);
    assert_eq!(count(&phone, "exercise"), 2);
    assert_eq!(count(&phone, "journal_entry"), 1);
}
