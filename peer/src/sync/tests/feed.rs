//! Pull pages, live entries and snapshots.

use super::*;

fn remote_patient(name: &str) -> (Uuid, Vec<u8>) {
    let schema = Schema::default_schema();
    let mut d = EntityDoc::new(device_actor(OTHER));
    d.init_type("patient").unwrap();
    d.write_fields(schema.entity_type("patient").unwrap(), &obj(json!({ "name": name })))
        .unwrap();
    let id = Uuid::from_bytes([name.len() as u8; 16]);
    (id, d.commit(T0).unwrap().raw_bytes().to_vec())
}

fn entry(seq: u64, id: Uuid, payload: FeedPayload, hlc_ms: u64) -> FeedEntry {
    FeedEntry {
        seq,
        space_id: space(),
        entity_type: "patient".into(),
        entity_id: id,
        version: 1,
        payload,
        origin: Some(Origin {
            device_id: OTHER,
            user_id: Uuid::from_bytes([0x22; 16]),
            mutation_id: Uuid::from_bytes([seq as u8; 16]),
            hlc: Hlc {
                physical_ms: hlc_ms,
                counter: 0,
                device: OTHER,
            },
        }),
        lww_losses: vec![],
    }
}

#[test]
fn pulled_pages_apply_atomically_move_the_cursor_and_end_caught_up() {
    let mut f = enrolled(7);
    let mut m = SyncMachine::default();
    let out = connect(&mut m, &mut f, 10);
    assert!(matches!(out[..], [ClientMessage::Pull { .. }]));
    let (a, ca) = remote_patient("Ann");
    let (b, cb) = remote_patient("Bobby");
    let page = RelayMessage::Changes {
        entries: vec![
            entry(1, a, FeedPayload::Changes(vec![Bytes(ca)]), T0),
            entry(2, b, FeedPayload::Changes(vec![Bytes(cb)]), T0 + 86_400_000),
        ],
        next: PullCursor::at(space(), 2),
        caught_up: false,
    };
    let out = m.handle(&mut f.dev, SyncInput::Message(page)).unwrap();
    assert_eq!(
        out,
        vec![ClientMessage::Pull {
            cursor: PullCursor::at(space(), 2),
            max_entries: 500
        }]
    );
    assert_eq!(f.dev.cursor().unwrap().seq(&space()), 2);
    let ann = f.dev.get(a).unwrap().unwrap();
    assert_eq!(
        (ann.fields["name"].clone(), ann.sync_state, ann.relay_version),
        (json!("Ann"), SyncState::Synced, 1)
    );
    assert_eq!(ann.space_id, space());
    // An app's listener hears of both records, once, after the page committed.
    let changed = |id| crate::Notice::Changed {
        entity_type: "patient".into(),
        entity_id: id,
    };
    assert_eq!(f.dev.take_notices(), vec![changed(a), changed(b)]);
    assert!(f.dev.take_notices().is_empty());

    // A page with one bad entry changes nothing, not even the good entry or the cursor.
    let (c, cc) = remote_patient("Cecilia");
    let bad = RelayMessage::Changes {
        entries: vec![
            entry(3, c, FeedPayload::Changes(vec![Bytes(cc)]), T0),
            entry(4, a, FeedPayload::Changes(vec![Bytes(vec![1, 2, 3])]), T0),
        ],
        next: PullCursor::at(space(), 4),
        caught_up: true,
    };
    assert!(m.handle(&mut f.dev, SyncInput::Message(bad)).is_err());
    assert!(f.dev.get(c).unwrap().is_none());
    assert!(f.dev.take_notices().is_empty(), "nothing committed, nothing heard");
    assert_eq!(f.dev.cursor().unwrap().seq(&space()), 2);

    // The HLC observed the remote stamp a day ahead: the next local write sorts after it.
    let p = f.patient("local");
    let q = f.dev.queue(false).unwrap();
    let h = f.dev.envelope(q[0].mutation_id).unwrap().unwrap().client_timestamp;
    assert!(h.physical_ms >= T0 + 86_400_000, "{h}");
    assert!(f.dev.get(p).unwrap().is_some());
}

#[test]
fn caught_up_with_nothing_in_flight_is_idle_and_records_the_last_sync() {
    let mut f = enrolled(8);
    let mut m = SyncMachine::default();
    connect(&mut m, &mut f, 10);
    assert_eq!(f.dev.status().unwrap().state, SyncStatus::Syncing);
    f.time.set(T0 + 5);
    let done = RelayMessage::Changes {
        entries: vec![],
        next: PullCursor::at(space(), 9),
        caught_up: true,
    };
    assert!(
        {
            f.time.set(T0 + 5);
            m.handle(&mut f.dev, SyncInput::Message(done))
        }
        .unwrap()
        .is_empty()
    );
    assert!(m.summary().idle && m.summary().caught_up);
    let s = f.dev.status().unwrap();
    assert_eq!((s.state, s.last_sync_ms), (SyncStatus::Synced, Some(T0 + 5)));
    // Live entries apply the same way and move the cursor.
    let (a, ca) = remote_patient("Live");
    let live = RelayMessage::Live {
        entries: vec![entry(10, a, FeedPayload::Changes(vec![Bytes(ca)]), T0)],
    };
    {
        f.time.set(T0 + 6);
        m.handle(&mut f.dev, SyncInput::Message(live))
    }
    .unwrap();
    assert_eq!(f.dev.cursor().unwrap().seq(&space()), 10);
    assert_eq!(m.summary().pulled, 1);
    // A write while connected is pushed at once.
    f.patient("now");
    let out = {
        f.time.set(T0 + 7);
        m.handle(&mut f.dev, SyncInput::LocalWrite)
    }
    .unwrap();
    push_of(&out);
    assert!(!m.summary().idle);
}

#[test]
fn a_snapshot_merges_without_losing_unsent_local_changes_and_lww_losses_are_listed() {
    let mut f = enrolled(9);
    let p = f.patient("Ada");
    let base = f.dev.document_bytes(p).unwrap();
    f.dev.update("patient", p, obj(json!({"mrn": "LOCAL"}))).unwrap();
    let mut relay = EntityDoc::load(&base, device_actor(OTHER)).unwrap();
    let schema = Schema::default_schema();
    relay
        .write_fields(schema.entity_type("patient").unwrap(), &obj(json!({"phone": "555"})))
        .unwrap();
    relay.commit(T0).unwrap();
    // The snapshot arrives in a pull page while the local write is still unsent.
    let mut snap = entry(5, p, FeedPayload::Snapshot(Bytes(relay.save())), T0);
    snap.origin = None;
    snap.version = 3;
    snap.lww_losses = vec![LwwLoss {
        entity_type: "patient".into(),
        entity_id: p,
        field: "mrn".into(),
        loser_device: f.dev.device_id(),
        loser_mutation: Uuid::from_bytes([1; 16]),
        loser_hlc: Hlc {
            physical_ms: T0,
            counter: 0,
            device: f.dev.device_id(),
        },
        loser_value: json!("LOCAL"),
        winner_device: OTHER,
        winner_mutation: Uuid::from_bytes([2; 16]),
        winner_hlc: Hlc {
            physical_ms: T0 + 1,
            counter: 0,
            device: OTHER,
        },
        winner_value: json!("X"),
    }];
    f.dev.apply_feed(&[snap], PullCursor::at(space(), 5), T0).unwrap();
    let e = f.dev.get(p).unwrap().unwrap();
    assert_eq!(
        (e.fields["mrn"].clone(), e.fields["phone"].clone()),
        (json!("LOCAL"), json!("555"))
    );
    assert_eq!((e.relay_version, e.sync_state), (3, SyncState::Pending));
    assert_eq!(f.dev.lww_losses().unwrap().len(), 1);
}

/// Connects and catches up at `seq` in the default space.
fn caught_up_at(f: &mut Fixture, seq: u64) -> SyncMachine {
    let mut m = SyncMachine::default();
    connect(&mut m, f, 10);
    let done = RelayMessage::Changes {
        entries: vec![],
        next: PullCursor::at(space(), seq),
        caught_up: true,
    };
    assert!(m.handle(&mut f.dev, SyncInput::Message(done)).unwrap().is_empty());
    m
}

#[test]
fn a_live_entry_past_a_gap_waits_for_a_pull_and_a_repeat_is_dropped() {
    let mut f = enrolled(11);
    let mut m = caught_up_at(&mut f, 2);
    let (a, ca) = remote_patient("Gap");
    let (b, cb) = remote_patient("Next");
    // Seq 3 fits; seq 3 again is a repeat; seq 5 skips 4: it and the rest wait.
    let live = RelayMessage::Live {
        entries: vec![
            entry(3, a, FeedPayload::Changes(vec![Bytes(ca.clone())]), T0),
            entry(3, a, FeedPayload::Changes(vec![Bytes(ca)]), T0),
            entry(5, b, FeedPayload::Changes(vec![Bytes(cb)]), T0),
        ],
    };
    let out = m.handle(&mut f.dev, SyncInput::Message(live)).unwrap();
    assert_eq!(f.dev.cursor().unwrap().seq(&space()), 3);
    assert!(f.dev.get(a).unwrap().is_some());
    assert!(f.dev.get(b).unwrap().is_none(), "nothing past the gap is applied");
    assert_eq!(
        out,
        vec![ClientMessage::Pull {
            cursor: PullCursor::at(space(), 3),
            max_entries: 500
        }],
        "the gap is filled by a pull from the cursor"
    );
    assert!(!m.summary().caught_up);
}

#[test]
fn a_cursor_stored_before_per_space_order_is_handed_back_as_a_legacy_position() {
    let mut f = enrolled(12);
    crate::db::meta_set(&f.dev.conn, crate::db::keys::CURSOR, r#"{"seq":17,"snapshot":null}"#).unwrap();
    assert_eq!(
        f.dev.cursor().unwrap(),
        PullCursor {
            spaces: Default::default(),
            legacy_seq: Some(17)
        }
    );
    // A snapshot under way restarts (applying it again is harmless).
    crate::db::meta_set(
        &f.dev.conn,
        crate::db::keys::CURSOR,
        r#"{"seq":0,"snapshot":{"upto_seq":9,"after_key":4}}"#,
    )
    .unwrap();
    assert_eq!(f.dev.cursor().unwrap(), PullCursor::default());
    // The relay's per-space answer replaces it.
    let mut m = SyncMachine::default();
    let out = connect(&mut m, &mut f, 10);
    assert!(matches!(&out[..], [ClientMessage::Pull { cursor, .. }] if *cursor == PullCursor::default()));
    let page = RelayMessage::Changes {
        entries: vec![],
        next: PullCursor::at(space(), 9),
        caught_up: true,
    };
    m.handle(&mut f.dev, SyncInput::Message(page)).unwrap();
    assert_eq!(f.dev.cursor().unwrap(), PullCursor::at(space(), 9));
    // Garbage is an error, not a silent restart.
    crate::db::meta_set(&f.dev.conn, crate::db::keys::CURSOR, r#"{"spaces": 7}"#).unwrap();
    assert!(f.dev.cursor().is_err());
}

#[test]
fn a_membership_change_refreshes_the_users_spaces_and_pulls() {
    let mut f = enrolled(13);
    let mut m = caught_up_at(&mut f, 4);
    let gym = Uuid::from_bytes([0x6b; 16]);
    let mut changed = user(Role::Clinician);
    changed.spaces.push(fieldsync_schema::wire::SpaceGrant {
        space_id: gym,
        name: "gym".into(),
        role: Role::Assistant,
    });
    let out = m
        .handle(
            &mut f.dev,
            SyncInput::Message(RelayMessage::UserChanged { user: changed }),
        )
        .unwrap();
    assert_eq!(
        out,
        vec![ClientMessage::Pull {
            cursor: PullCursor::at(space(), 4),
            max_entries: 500
        }]
    );
    assert_eq!(f.dev.enrollment().unwrap().role_in(gym), Some(Role::Assistant));
}
