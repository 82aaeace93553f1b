//! Selective sync (issue 19): a device that said in `Hello` which types it holds gets nothing
//! of another type — not in a snapshot page, not in a feed page, not live (where such an entry
//! is only its place: no type, no id, no payload).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestDevice, TestRelay, live_entries};
use fieldsync_relay::core::ConnId;
use fieldsync_schema::{ClientMessage, FeedEntry, FeedPayload, Mutation, Role};
use serde_json::json;

fn clinic() -> TestRelay {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    r
}

/// Logs `dev` in again, holding only `types`.
fn login_holding(r: &mut TestRelay, dev: &mut TestDevice, types: &[&str]) {
    dev.conn = r.login_with(dev, |hello| {
        if let ClientMessage::Hello { types: held, .. } = hello {
            *held = Some(types.iter().map(|t| t.to_string()).collect());
        }
    });
}

/// `m` pushed by `from` as batch `batch_id`; the one live entry `listener` hears of it.
fn pushed_and_heard(
    r: &mut TestRelay,
    from: &TestDevice,
    batch_id: u64,
    m: Mutation,
    listener: ConnId,
) -> Vec<FeedEntry> {
    let out = r.send(
        from.conn,
        ClientMessage::Push {
            batch_id,
            mutations: vec![m],
        },
    );
    let live = live_entries(&out, listener);
    assert_eq!(live.len(), 1, "{out:?}");
    live
}

#[test]
fn a_device_holding_some_types_gets_nothing_of_another_in_pages_or_live() {
    let mut r = clinic();
    let mut phone = r.device("dana", 1);
    let (patient, m) = phone.create("patient", json!({"name": "Selma Ortega"}), r.now);
    r.push_one(&mut phone, m);
    let (journal, m) = phone.create("journal_entry", json!({"date": "2026-12-01", "body": "private"}), r.now);
    r.push_one(&mut phone, m);

    // A new device: its snapshot pages hold the patient only.
    let mut tablet = r.device("dana", 2);
    login_holding(&mut r, &mut tablet, &["patient", "session"]);
    let snapshot = r.pull(&mut tablet);
    assert_eq!(snapshot.iter().map(|e| e.entity_id).collect::<Vec<_>>(), vec![patient]);

    // Feed pages after the snapshot: the journal entry's edit is skipped, the patient's comes.
    let m = phone.update("journal_entry", journal, json!({"body": "still private"}), r.now);
    r.push_one(&mut phone, m);
    let m = phone.update("patient", patient, json!({"mrn": "M-1"}), r.now);
    r.push_one(&mut phone, m);
    let mut reader = r.device("dana", 3);
    reader.cursor = tablet.cursor.clone();
    login_holding(&mut r, &mut reader, &["patient"]);
    let page = r.pull(&mut reader);
    assert!(page.iter().all(|e| e.entity_type == "patient"), "{page:?}");
    assert_eq!(page.len(), 1, "{page:?}");

    // Live: the tablet caught up; a journal entry arrives as a bare place, a patient whole.
    r.pull(&mut tablet);
    let m = phone.update("journal_entry", journal, json!({"body": "live and private"}), r.now);
    let live = pushed_and_heard(&mut r, &phone, 90, m, tablet.conn);
    assert_eq!(live[0].payload, FeedPayload::NotSelected);
    assert_eq!(
        (live[0].entity_type.as_str(), live[0].entity_id),
        ("", uuid::Uuid::nil())
    );
    assert!(live[0].origin.is_none() && live[0].lww_losses.is_empty());
    let m = phone.update("patient", patient, json!({"mrn": "M-2"}), r.now);
    let live = pushed_and_heard(&mut r, &phone, 91, m, tablet.conn);
    assert_eq!((live[0].entity_id, live[0].entity_type.as_str()), (patient, "patient"));
    assert!(matches!(live[0].payload, FeedPayload::Changes(_)));
}
