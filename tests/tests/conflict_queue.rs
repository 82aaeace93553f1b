//! Writes queued behind a conflict (SPEC §9): twenty writes made while the outbox is blocked
//! all land, in order, after the user resolves the conflict — with the real relay binary and
//! the device library.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_peer::net;
use fieldsync_peer::sync::SyncMachine;
use fieldsync_peer::{Device, OutboxState, Resolution};
use fieldsync_tests::relay_files::RelayFiles;
use fieldsync_tests::{Relay, obj, open_device, quiet};
use serde_json::json;
use uuid::Uuid;

fn store(relay: &Relay) -> RelayFiles {
    RelayFiles::open(&relay.data)
}

fn sync(rt: &tokio::runtime::Runtime, dev: &mut Device) {
    let mut machine = SyncMachine::default();
    rt.block_on(net::sync_once(dev, &mut machine, &quiet())).unwrap();
}

#[test]
fn twenty_writes_queued_behind_a_conflict_all_land_in_order_after_the_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("gym", &[("alex", "patient")]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut phone = open_device(&dir.path().join("phone"), 1);
    let mut tablet = open_device(&dir.path().join("tablet"), 2);
    rt.block_on(net::enroll(&mut phone, &relay.url(), &relay.token("alex")))
        .unwrap();
    rt.block_on(net::enroll(&mut tablet, &relay.url(), &relay.token("alex")))
        .unwrap();
    let w = phone
        .put("workout", None, obj(json!({"name": "Push day"})))
        .unwrap()
        .entity_id;
    sync(&rt, &mut phone);
    sync(&rt, &mut tablet);
    phone.update("workout", w, obj(json!({"notes": "phone"}))).unwrap();
    tablet.update("workout", w, obj(json!({"notes": "tablet"}))).unwrap();
    sync(&rt, &mut phone);
    sync(&rt, &mut tablet);
    assert_eq!(tablet.conflicts().unwrap().len(), 1);

    // Twenty writes while blocked: ten edits of the conflicted workout between ten new ones.
    let mut created = Vec::new();
    for i in 0..10 {
        tablet
            .update("workout", w, obj(json!({"notes": format!("set {i}")})))
            .unwrap();
        let r = tablet
            .put("workout", None, obj(json!({"name": format!("W{i}")})))
            .unwrap();
        created.push(r.entity_id);
    }
    let status = tablet.status().unwrap();
    assert_eq!((status.unsynced, status.blocked.map(|b| b.entity_id)), (21, Some(w)));
    sync(&rt, &mut tablet);
    assert_eq!(
        tablet.status().unwrap().unsynced,
        21,
        "nothing goes out past the conflict"
    );

    let c = tablet.conflicts().unwrap().remove(0);
    assert_eq!(c.carried_mutations.len(), 11, "the refused edit and the ten behind it");
    tablet.resolve(w, Resolution::KeepMine).unwrap();
    sync(&rt, &mut tablet);
    let status = tablet.status().unwrap();
    assert_eq!((status.unsynced, status.blocked), (0, None));
    assert!(
        tablet
            .queue(true)
            .unwrap()
            .iter()
            .all(|i| matches!(i.state, OutboxState::Applied | OutboxState::Superseded))
    );

    // The relay: the resolution first, then the ten creates in the order they were made.
    let audit = store(&relay).audit();
    let tablet_id = tablet.device_id();
    let order: Vec<(Uuid, String)> = audit
        .iter()
        .filter(|a| a.device_id == tablet_id)
        .map(|a| (a.entity_id, a.kind.clone()))
        .collect();
    let mut expected = vec![(w, "resolve".to_string())];
    expected.extend(created.iter().map(|id| (*id, "create".to_string())));
    assert_eq!(order, expected);
    let files = store(&relay);
    assert_eq!(files.fields(w)["notes"], json!("set 9"));
    for (i, id) in created.iter().enumerate() {
        assert!(
            files.history_has(w, tablet_id, "notes", &json!(format!("set {i}"))),
            "edit {i} is in the relay's history"
        );
        assert_eq!(files.fields(*id)["name"], json!(format!("W{i}")));
    }
    sync(&rt, &mut phone);
    assert_eq!(phone.get(w).unwrap().unwrap().fields["notes"], json!("set 9"));
}
