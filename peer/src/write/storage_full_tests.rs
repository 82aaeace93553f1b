//! The device's storage full (`SQLITE_FULL`, made with `max_page_count`): a write fails with
//! an error that says so, nothing of it is kept (no entity, no outbox item, no half document),
//! the queued changes are intact, and writing works again once there is room.

use serde_json::json;

use crate::error::PeerError;
use crate::testutil::{Fixture, obj};
use fieldsync_schema::Role;

fn cap_pages(f: &Fixture, extra: i64) {
    let conn = f.dev.connection();
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    let _: i64 = conn
        .query_row(&format!("PRAGMA max_page_count = {}", pages + extra), [], |r| r.get(0))
        .unwrap();
}

#[test]
fn a_write_on_a_full_disk_fails_clearly_keeps_nothing_and_the_outbox_is_intact() {
    let mut f = Fixture::new(1);
    crate::testutil::enroll(&mut f.dev, Role::Clinician);
    let kept = f.patient("Queued before the disk filled");
    let queued = f.dev.queue(false).unwrap();
    let entities = f.dev.status().unwrap().entities;

    cap_pages(&f, 0);
    let big = "y".repeat(190);
    let mut failure = None;
    for i in 0..500 {
        if let Err(e) = f.dev.put("patient", None, obj(json!({ "name": format!("{i} {big}") }))) {
            failure = Some(e);
            break;
        }
    }
    let failure = failure.expect("the capped database filled up");
    assert!(matches!(failure, PeerError::StorageFull(_)), "{failure:?}");
    let message = failure.to_string();
    assert!(
        message.contains("storage is full") && message.contains("nothing of this write was kept"),
        "{message}"
    );

    // Whatever the writes before the failure added is there whole; the failed one left nothing.
    let status = f.dev.status().unwrap();
    let items = f.dev.queue(false).unwrap();
    assert_eq!(items[0], queued[0], "the item queued before is intact");
    assert_eq!(status.unsynced as usize, items.len());
    assert_eq!(status.entities as usize, entities as usize + items.len() - queued.len());
    for item in &items {
        assert!(
            f.dev.get(item.entity_id).unwrap().is_some(),
            "every queued item has its entity"
        );
        assert!(f.dev.envelope(item.mutation_id).unwrap().is_some(), "and its envelope");
    }
    assert!(f.dev.get(kept).unwrap().is_some());

    cap_pages(&f, 1_000_000);
    f.patient("Written once there was room");
    assert_eq!(f.dev.queue(false).unwrap().len(), items.len() + 1);
}
