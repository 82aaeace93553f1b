//! SyncMachine tests with hand-built relay messages (no relay needed).

use fieldsync_schema::document::device_actor;
use fieldsync_schema::envelope::ConflictReason;
use fieldsync_schema::signing::{self, connect_signing_bytes};
use fieldsync_schema::wire::{AuthFailure, FeedEntry, FeedPayload, MutationResult, PROTOCOL_VERSION, PullCursor};
use fieldsync_schema::{
    Bytes, ClientMessage, EntityDoc, Hlc, LwwLoss, Origin, Outcome, RelayMessage, Role, Rule, Schema,
};
use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::testutil::{Fixture, T0, enroll, obj, relay_id, space, user};
use crate::{OutboxState, SyncState, SyncStatus};

const OTHER: Uuid = Uuid::from_bytes([0xbb; 16]);

fn enrolled(seed: u64) -> Fixture {
    let mut f = Fixture::new(seed);
    enroll(&mut f.dev, Role::Clinician);
    f
}

fn welcome(max_batch: u32) -> RelayMessage {
    RelayMessage::Welcome {
        relay_id: relay_id(),
        user: user(Role::Clinician),
        server_time_ms: T0,
        max_batch,
        schema_version: 1,
        compression: true,
        fetch: true,
        priority: true,
    }
}

/// Connects and answers the relay's challenge: the machine then awaits `Welcome`.
fn answer_challenge(m: &mut SyncMachine, f: &mut Fixture) {
    let hello = m.handle(&mut f.dev, SyncInput::Connected).unwrap();
    assert!(matches!(hello[..], [ClientMessage::Hello { .. }]));
    let challenge = RelayMessage::Challenge {
        relay_id: relay_id(),
        nonce: Bytes(vec![7; 32]),
    };
    let auth = m.handle(&mut f.dev, SyncInput::Message(challenge)).unwrap();
    assert!(matches!(auth[..], [ClientMessage::Auth { .. }]));
}

/// Runs the handshake and returns what the machine sends after `Welcome`.
fn connect(m: &mut SyncMachine, f: &mut Fixture, max_batch: u32) -> Vec<ClientMessage> {
    answer_challenge(m, f);
    m.handle(&mut f.dev, SyncInput::Message(welcome(max_batch))).unwrap()
}

fn push_of(msgs: &[ClientMessage]) -> (u64, Vec<Uuid>) {
    match msgs {
        [ClientMessage::Push { batch_id, mutations }] => (*batch_id, mutations.iter().map(|m| m.mutation_id).collect()),
        other => panic!("expected one push, got {other:?}"),
    }
}

fn applied(id: Uuid, version: u64) -> MutationResult {
    MutationResult {
        mutation_id: id,
        outcome: Outcome::Applied {
            version,
            seq: version,
            duplicate_of: None,
            lww_lost: vec![],
        },
    }
}

/// The test user with a second space, `gym`.
fn with_gym(f: &mut Fixture) -> Uuid {
    let gym = Uuid::from_bytes([0x6b; 16]);
    let mut u = user(Role::Clinician);
    u.spaces.push(fieldsync_schema::wire::SpaceGrant {
        space_id: gym,
        name: "gym".into(),
        role: Role::Clinician,
    });
    f.dev.refresh_user(u).unwrap();
    gym
}

#[test]
fn a_batch_holds_one_space_and_the_next_space_goes_in_the_next_batch() {
    let mut f = enrolled(21);
    let gym = with_gym(&mut f);
    let a = f.patient("clinic 1");
    let b = f.patient("clinic 2");
    let g = f
        .dev
        .put_in_space(Some(gym), "patient", None, obj(json!({"name": "gym 1"})))
        .unwrap()
        .entity_id;
    let c = f.patient("clinic 3");
    let ids = queue_ids(&f);
    let mut m = SyncMachine::default();
    let (batch, sent) = push_of(&connect(&mut m, &mut f, 10));
    assert_eq!(sent, ids[..2].to_vec(), "the batch stops where the space changes");
    let out = m
        .handle(
            &mut f.dev,
            SyncInput::Message(RelayMessage::PushResult {
                batch_id: batch,
                results: vec![applied(sent[0], 1), applied(sent[1], 1)],
            }),
        )
        .unwrap();
    let (_, sent) = push_of(&out);
    assert_eq!(sent, vec![ids[2]]);
    let _ = (a, b, g, c);
}

fn patients(f: &mut Fixture, n: usize) -> Vec<Uuid> {
    (0..n).map(|i| f.patient(&format!("p{i}"))).collect()
}

fn queue_ids(f: &Fixture) -> Vec<Uuid> {
    f.dev.queue(true).unwrap().iter().map(|i| i.mutation_id).collect()
}

use fieldsync_schema::TimeSource;

mod feed;
mod relays;
mod retries;

#[test]
fn the_handshake_signs_the_challenge_with_the_device_key() {
    let mut f = enrolled(1);
    let mut m = SyncMachine::default();
    let hello = m.handle(&mut f.dev, SyncInput::Connected).unwrap();
    assert_eq!(
        hello,
        vec![ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            device_id: f.dev.device_id(),
            schema_hash: Schema::default_schema().hash(),
            schema_version: 1,
            compression: true,
            types: None,
            windowed: false,
            priority: true,
            metered: false,
        }]
    );
    let nonce = vec![3u8; 32];
    let out = m
        .handle(
            &mut f.dev,
            SyncInput::Message(RelayMessage::Challenge {
                relay_id: relay_id(),
                nonce: Bytes(nonce.clone()),
            }),
        )
        .unwrap();
    let [ClientMessage::Auth { signature }] = &out[..] else {
        panic!("{out:?}")
    };
    let bytes = connect_signing_bytes(
        PROTOCOL_VERSION,
        &relay_id(),
        &nonce,
        &f.dev.device_id(),
        &f.dev.public_key(),
    );
    signing::verify(&f.dev.public_key(), &bytes, &signature.0).unwrap();
    let wrong = connect_signing_bytes(
        PROTOCOL_VERSION,
        &relay_id(),
        &[4; 32],
        &f.dev.device_id(),
        &f.dev.public_key(),
    );
    assert!(signing::verify(&f.dev.public_key(), &wrong, &signature.0).is_err());
    // Nothing queued: the first thing after Welcome is a pull from cursor 0.
    let out = m.handle(&mut f.dev, SyncInput::Message(welcome(10))).unwrap();
    assert_eq!(
        out,
        vec![ClientMessage::Pull {
            cursor: PullCursor::default(),
            max_entries: 500
        }]
    );

    let mut g = enrolled(2);
    let mut m = SyncMachine::default();
    m.handle(&mut g.dev, SyncInput::Connected).unwrap();
    let err = m
        .handle(
            &mut g.dev,
            SyncInput::Message(RelayMessage::Challenge {
                relay_id: Uuid::from_bytes([1; 16]),
                nonce: Bytes(nonce),
            }),
        )
        .unwrap_err();
    assert!(matches!(err, SyncError::WrongRelay { .. }), "{err}");
}

#[test]
fn batches_follow_outbox_order_within_max_batch_and_applied_marks_synced() {
    let mut f = enrolled(3);
    let ids = patients(&mut f, 5);
    let queue = queue_ids(&f);
    let mut m = SyncMachine::default();
    let mut sent = Vec::new();
    let mut out = connect(&mut m, &mut f, 2);
    let mut version = 0;
    while let [ClientMessage::Push { .. }] = &out[..] {
        let (batch, muts) = push_of(&out);
        assert!(muts.len() <= 2);
        assert!(m.summary().batch_in_flight);
        sent.extend(muts.clone());
        let results = muts
            .iter()
            .map(|id| {
                version += 1;
                applied(*id, 1)
            })
            .collect();
        out = m
            .handle(
                &mut f.dev,
                SyncInput::Message(RelayMessage::PushResult {
                    batch_id: batch,
                    results,
                }),
            )
            .unwrap();
    }
    assert_eq!(sent, queue);
    assert!(matches!(out[..], [ClientMessage::Pull { .. }]), "{out:?}");
    for id in &ids {
        let e = f.dev.get(*id).unwrap().unwrap();
        assert_eq!((e.sync_state, e.relay_version), (SyncState::Synced, 1));
    }
    assert!(
        f.dev
            .queue(true)
            .unwrap()
            .iter()
            .all(|i| i.state == OutboxState::Applied)
    );
    assert_eq!(f.dev.status().unwrap().unsynced, 0);
    assert_eq!(m.summary().applied, 5);
}

#[test]
fn a_blocking_outcome_halts_the_outbox_and_not_attempted_stays_pending_with_its_id() {
    let mut f = enrolled(4);
    patients(&mut f, 3);
    let queue = queue_ids(&f);
    let mut m = SyncMachine::default();
    let (batch, muts) = push_of(&connect(&mut m, &mut f, 10));
    assert_eq!(muts, queue);
    let results = vec![
        applied(queue[0], 1),
        MutationResult {
            mutation_id: queue[1],
            outcome: Outcome::Invalid {
                errors: vec![fieldsync_schema::FieldError::new("name", Rule::Required, "is required")],
            },
        },
        MutationResult {
            mutation_id: queue[2],
            outcome: Outcome::NotAttempted,
        },
    ];
    let out = m
        .handle(
            &mut f.dev,
            SyncInput::Message(RelayMessage::PushResult {
                batch_id: batch,
                results,
            }),
        )
        .unwrap();
    // Nothing more is pushed; the machine pulls instead.
    assert!(matches!(out[..], [ClientMessage::Pull { .. }]), "{out:?}");
    let items = f.dev.queue(true).unwrap();
    let states: Vec<_> = items.iter().map(|i| i.state).collect();
    assert_eq!(
        states,
        [OutboxState::Applied, OutboxState::Blocked, OutboxState::Pending]
    );
    assert_eq!(items[2].mutation_id, queue[2]);
    let status = f.dev.status().unwrap();
    assert_eq!(status.state, SyncStatus::Blocked);
    let blocked = status.blocked.unwrap();
    assert_eq!(
        (blocked.mutation_id, blocked.entity_type.as_str()),
        (queue[1], "patient")
    );
    assert!(blocked.reason.contains("name"), "{}", blocked.reason);
    assert_eq!(
        f.dev.get(items[1].entity_id).unwrap().unwrap().sync_state,
        SyncState::Rejected
    );
    // A local write while halted is kept but not pushed; retry does not unblock.
    f.patient("later");
    assert!(m.handle(&mut f.dev, SyncInput::LocalWrite).unwrap().is_empty());
    let r = f.dev.retry(Some(queue[1])).unwrap();
    assert!(r.message.contains("stays blocked"), "{}", r.message);
    assert_eq!(f.dev.status().unwrap().unsynced, 3);
}

#[test]
fn a_conflict_merges_the_relay_changes_and_marks_the_entity() {
    let mut f = enrolled(5);
    let p = f.patient("Ada");
    let mut m = SyncMachine::default();
    let (b, muts) = push_of(&connect(&mut m, &mut f, 10));
    f.dev.on_push_for_test(&mut m, b, vec![applied(muts[0], 1)]);
    // Someone else renamed the patient on the relay (version 2); our edit was based on 1.
    let mut theirs = EntityDoc::load(&f.dev.document_bytes(p).unwrap(), device_actor(OTHER)).unwrap();
    let ty = Schema::default_schema();
    theirs
        .write_fields(ty.entity_type("patient").unwrap(), &obj(json!({"mrn": "THEIRS"})))
        .unwrap();
    let their_change = theirs.commit(T0 + 1).unwrap();
    let r = f.dev.update("patient", p, obj(json!({"name": "Ada (mine)"}))).unwrap();
    let out = m.handle(&mut f.dev, SyncInput::LocalWrite).unwrap();
    let (b, muts) = push_of(&out);
    assert_eq!(muts, vec![r.mutation_id.unwrap()]);
    let conflict = Outcome::Conflict {
        server_version: 2,
        server_changes: vec![Bytes(their_change.raw_bytes().to_vec())],
        reason: ConflictReason::StaleBase,
        authors: vec![],
    };
    f.dev.on_push_for_test(
        &mut m,
        b,
        vec![MutationResult {
            mutation_id: muts[0],
            outcome: conflict.clone(),
        }],
    );
    let e = f.dev.get(p).unwrap().unwrap();
    assert_eq!(e.sync_state, SyncState::Conflict);
    assert_eq!(e.fields["mrn"], json!("THEIRS"));
    assert_eq!(e.fields["name"], json!("Ada (mine)"));
    assert_eq!(e.relay_version, 2);
    let item = f.dev.outbox_item(muts[0]).unwrap().unwrap();
    assert_eq!((item.state, item.outcome), (OutboxState::Blocked, Some(conflict)));
    let n: i64 = f
        .dev
        .connection()
        .query_row("SELECT COUNT(*) FROM conflicts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(m.summary().conflicts, 1);
}

impl crate::Device {
    fn on_push_for_test(&mut self, m: &mut SyncMachine, batch_id: u64, results: Vec<MutationResult>) {
        m.handle(self, SyncInput::Message(RelayMessage::PushResult { batch_id, results }))
            .unwrap();
    }
}

#[test]
fn a_disconnect_mid_batch_resends_the_same_ids_after_reconnecting() {
    let mut f = enrolled(6);
    patients(&mut f, 3);
    let mut m = SyncMachine::default();
    let first = connect(&mut m, &mut f, 10);
    let (_, ids) = push_of(&first);
    m.handle(&mut f.dev, SyncInput::Disconnected).unwrap();
    assert_eq!(m.phase(), Phase::Disconnected);
    assert_eq!(f.dev.status().unwrap().state, SyncStatus::Offline);
    let at = m.reconnect_at().unwrap().ms();
    assert!(at <= T0 + 500);
    if at > T0 {
        f.time.set(at - 1);
        assert!(!m.should_connect(&f.dev));
    }
    f.time.set(at);
    assert!(m.should_connect(&f.dev));
    let again = connect(&mut m, &mut f, 10);
    let (_, ids_again) = push_of(&again);
    assert_eq!(ids_again, ids);
    let (ClientMessage::Push { mutations: a, .. }, ClientMessage::Push { mutations: b, .. }) = (&first[0], &again[0])
    else {
        unreachable!()
    };
    assert_eq!(a, b, "the very same signed envelopes are resent");
    assert!(f.dev.queue(false).unwrap().iter().all(|i| i.attempts == 2));
}

#[test]
fn an_auth_failure_blocks_and_is_persisted_in_status() {
    let mut f = enrolled(14);
    let mut m = SyncMachine::default();
    m.handle(&mut f.dev, SyncInput::Connected).unwrap();
    let err = m
        .handle(
            &mut f.dev,
            SyncInput::Message(RelayMessage::AuthFailed {
                reason: AuthFailure::Revoked,
                message: "device revoked".into(),
            }),
        )
        .unwrap_err();
    assert!(err.to_string().contains("revoked"));
    m.handle(&mut f.dev, SyncInput::Disconnected).unwrap();
    f.time.set(T0 + 1_000_000);
    assert!(!m.should_connect(&f.dev));
    let f = f.reopen(1);
    let s = f.dev.status().unwrap();
    assert_eq!(s.state, SyncStatus::AuthFailed);
    assert!(s.auth_failure.unwrap().contains("revoked"));
    // Local writes keep working without a valid credential.
    let mut f = f;
    f.patient("still works");
}

#[test]
fn a_revocation_while_connected_is_an_auth_failure_not_a_protocol_error() {
    let mut f = enrolled(17);
    let mut m = SyncMachine::default();
    connect(&mut m, &mut f, 10);
    assert_eq!(m.phase(), Phase::Ready);
    let err = m
        .handle(
            &mut f.dev,
            SyncInput::Message(RelayMessage::AuthFailed {
                reason: AuthFailure::Revoked,
                message: "this device was revoked".into(),
            }),
        )
        .unwrap_err();
    assert!(matches!(err, SyncError::AuthFailed { reason: "revoked", .. }), "{err}");
    assert_eq!(m.phase(), Phase::AuthFailed);
    m.handle(&mut f.dev, SyncInput::Disconnected).unwrap();
    f.time.set(T0 + 3_600_000);
    assert!(!m.should_connect(&f.dev), "a revoked device does not keep reconnecting");
    assert_eq!(f.dev.status().unwrap().state, SyncStatus::AuthFailed);
}

#[test]
fn a_relay_behind_the_devices_schema_is_waited_for_not_a_refusal() {
    let mut f = enrolled(18);
    f.patient("queued");
    let mut m = SyncMachine::default();
    m.handle(&mut f.dev, SyncInput::Connected).unwrap();
    let err = m
        .handle(
            &mut f.dev,
            SyncInput::Message(RelayMessage::AuthFailed {
                reason: AuthFailure::SchemaAhead,
                message: "the relay has not been upgraded to schema v2 yet (it serves v1)".into(),
            }),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::AuthFailed {
                reason: "schema_ahead",
                ..
            }
        ),
        "{err}"
    );
    m.handle(&mut f.dev, SyncInput::Disconnected).unwrap();
    let status = f.dev.status().unwrap();
    assert_eq!(status.state, SyncStatus::WaitingForRelay);
    assert!(status.auth_failure.is_none() && status.relay_behind.as_deref().unwrap_or("").contains("v2"));
    assert_eq!(status.unsynced, 1, "the write stays queued");
    // It connects again, but not before the longer wait; the next Welcome clears the state.
    let wait = SyncConfig::default().relay_behind_wait_ms;
    assert!(m.reconnect_at().unwrap().ms() >= T0 + wait);
    f.time.set(T0 + wait - 1);
    assert!(!m.should_connect(&f.dev));
    f.time.set(T0 + wait + 1);
    assert!(m.should_connect(&f.dev));
    connect(&mut m, &mut f, 10);
    assert!(f.dev.status().unwrap().relay_behind.is_none());
}

#[test]
fn unexpected_messages_are_errors_not_panics() {
    let mut f = enrolled(15);
    let mut m = SyncMachine::default();
    let stray = RelayMessage::PushResult {
        batch_id: 1,
        results: vec![],
    };
    assert!(m.handle(&mut f.dev, SyncInput::Message(stray.clone())).is_err());
    connect(&mut m, &mut f, 10);
    assert!(matches!(
        m.handle(&mut f.dev, SyncInput::Message(stray)),
        Err(SyncError::WrongBatch { .. })
    ));
    assert!(m.handle(&mut f.dev, SyncInput::Message(welcome(1))).is_err());
    let page = RelayMessage::Changes {
        entries: vec![],
        next: PullCursor::default(),
        caught_up: true,
    };
    m.handle(&mut f.dev, SyncInput::Message(page.clone())).unwrap();
    assert!(
        m.handle(&mut f.dev, SyncInput::Message(page)).is_err(),
        "no pull in flight"
    );
    assert!(
        m.handle(&mut f.dev, SyncInput::Message(RelayMessage::KeyRotated))
            .is_err()
    );
    assert!(matches!(
        m.handle(
            &mut f.dev,
            SyncInput::Message(RelayMessage::Error {
                code: fieldsync_schema::wire::ErrorCode::LimitExceeded,
                message: "too big".into()
            })
        ),
        Err(SyncError::Relay { .. })
    ));
}

#[test]
fn lww_values_lost_on_arrival_are_listed_on_this_device() {
    let mut f = enrolled(16);
    let s = f.dev.put("settings", None, obj(json!({"units": "lb"}))).unwrap();
    let mut m = SyncMachine::default();
    let (batch, ids) = push_of(&connect(&mut m, &mut f, 10));
    let stamp = |ms, device| Hlc {
        physical_ms: ms,
        counter: 0,
        device,
    };
    let loss = LwwLoss {
        entity_type: "settings".into(),
        entity_id: s.entity_id,
        field: "units".into(),
        loser_device: f.dev.device_id(),
        loser_mutation: ids[0],
        loser_hlc: stamp(T0, f.dev.device_id()),
        loser_value: json!("lb"),
        winner_device: OTHER,
        winner_mutation: Uuid::from_bytes([2; 16]),
        winner_hlc: stamp(T0 + 1, OTHER),
        winner_value: json!("kg"),
    };
    let result = MutationResult {
        mutation_id: ids[0],
        outcome: Outcome::AlreadyApplied {
            original: Box::new(Outcome::Applied {
                version: 4,
                seq: 9,
                duplicate_of: None,
                lww_lost: vec![loss.clone()],
            }),
        },
    };
    f.dev.on_push_for_test(&mut m, batch, vec![result]);
    assert_eq!(f.dev.lww_losses().unwrap(), vec![loss]);
    let e = f.dev.get(s.entity_id).unwrap().unwrap();
    assert_eq!((e.relay_version, e.sync_state), (4, SyncState::Synced));
    assert_eq!(f.dev.outbox_item(ids[0]).unwrap().unwrap().applied_version, Some(4));
}

/// The relay's answer names the older record a new one may duplicate: the app hears of it as
/// a notice, also when the answer comes from a receipt (a retry).
#[test]
fn an_applied_answer_naming_a_possible_duplicate_becomes_a_notice() {
    let mut f = enrolled(41);
    let p = f.patient("logged twice");
    let ids = queue_ids(&f);
    let mut m = SyncMachine::default();
    let (batch, sent) = push_of(&connect(&mut m, &mut f, 10));
    assert_eq!(sent, ids);
    let flagged = Outcome::Applied {
        version: 1,
        seq: 1,
        lww_lost: vec![],
        duplicate_of: Some(OTHER),
    };
    let _ = f.dev.take_notices();
    m.handle(
        &mut f.dev,
        SyncInput::Message(RelayMessage::PushResult {
            batch_id: batch,
            results: vec![MutationResult {
                mutation_id: sent[0],
                outcome: Outcome::AlreadyApplied {
                    original: Box::new(flagged),
                },
            }],
        }),
    )
    .unwrap();
    let notices = f.dev.take_notices();
    assert!(
        notices.iter().any(|n| matches!(n,
            crate::Notice::PossibleDuplicate { entity_type, entity_id, duplicate_of }
                if entity_type == "patient" && *entity_id == p && *duplicate_of == OTHER)),
        "{notices:?}"
    );
}

/// The relay's order to wipe (sent only after the device proved its key): the device erases
/// everything, reports how many unsynced changes went with it, sends nothing else, takes no
/// more writes; asked again on a later connection (its first report lost), it reports the
/// same count without erasing anything more.
#[test]
fn a_wipe_order_erases_the_device_and_reports_the_unsynced_changes_it_discarded() {
    let mut f = enrolled(19);
    let kept = f.patient("Zelda Quixotic");
    f.patient("Ygritte Marrow");
    let mut m = SyncMachine::default();
    answer_challenge(&mut m, &mut f);
    let out = m.handle(&mut f.dev, SyncInput::Message(RelayMessage::Wipe)).unwrap();
    assert_eq!(out, vec![ClientMessage::Wiped { discarded: 2 }]);
    assert_eq!(m.phase(), Phase::Wiping);
    f.time.set(T0 + 3_600_000);
    assert!(m.handle(&mut f.dev, SyncInput::Tick).unwrap().is_empty());
    assert!(m.handle(&mut f.dev, SyncInput::LocalWrite).unwrap().is_empty());

    let s = f.dev.status().unwrap();
    assert_eq!((s.entities, s.unsynced), (0, 0));
    assert_eq!(s.wiped.map(|w| w.discarded), Some(2));
    assert!(f.dev.get(kept).unwrap().is_none());
    let refused = f.dev.put("patient", None, obj(json!({"name": "after"}))).unwrap_err();
    assert!(matches!(refused, PeerError::Wiped { discarded: 2, .. }), "{refused}");

    let err = m
        .handle(
            &mut f.dev,
            SyncInput::Message(RelayMessage::AuthFailed {
                reason: AuthFailure::Revoked,
                message: "device was revoked and has erased its local data".into(),
            }),
        )
        .unwrap_err();
    assert!(matches!(err, SyncError::AuthFailed { reason: "revoked", .. }), "{err}");
    assert_eq!(m.phase(), Phase::AuthFailed);

    let mut f = f.reopen(2);
    let mut m = SyncMachine::default();
    answer_challenge(&mut m, &mut f);
    let out = m.handle(&mut f.dev, SyncInput::Message(RelayMessage::Wipe)).unwrap();
    assert_eq!(out, vec![ClientMessage::Wiped { discarded: 2 }]);
}

/// A wipe order before the device answered the challenge is a protocol error, not a wipe.
#[test]
fn a_wipe_order_before_the_challenge_is_answered_erases_nothing() {
    let mut f = enrolled(20);
    f.patient("Zelda Quixotic");
    let mut m = SyncMachine::default();
    m.handle(&mut f.dev, SyncInput::Connected).unwrap();
    let err = m
        .handle(&mut f.dev, SyncInput::Message(RelayMessage::Wipe))
        .unwrap_err();
    assert!(matches!(err, SyncError::Unexpected { got: "wipe", .. }), "{err}");
    let s = f.dev.status().unwrap();
    assert_eq!((s.entities, s.unsynced, s.wiped), (1, 1, None));
}

/// A queued fetch goes out once the pull caught up, one at a time; its answer is applied,
/// answered ids leave the queue, ids left for later go in the next fetch, and only then is
/// the sync idle. A `fetched` nobody asked for is an error.
#[test]
fn a_queued_fetch_goes_out_after_the_pull_and_the_sync_is_idle_once_answered() {
    let mut f = enrolled(21);
    let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
    for id in [a, b, c] {
        f.dev.fetch("patient", id).unwrap();
    }
    let mut m = SyncMachine::default();
    let sent = connect(&mut m, &mut f, 10);
    assert!(
        matches!(sent[..], [ClientMessage::Pull { .. }]),
        "the pull first: {sent:?}"
    );
    let page = RelayMessage::Changes {
        entries: vec![],
        next: PullCursor::default(),
        caught_up: true,
    };
    let sent = m.handle(&mut f.dev, SyncInput::Message(page)).unwrap();
    assert_eq!(sent, vec![ClientMessage::Fetch { ids: vec![a, b, c] }]);
    assert!(!m.summary().idle);
    let answer = RelayMessage::Fetched {
        entries: vec![],
        unknown: vec![a, b],
        later: vec![c],
    };
    let sent = m.handle(&mut f.dev, SyncInput::Message(answer)).unwrap();
    assert_eq!(sent, vec![ClientMessage::Fetch { ids: vec![c] }]);
    let answer = RelayMessage::Fetched {
        entries: vec![],
        unknown: vec![c],
        later: vec![],
    };
    assert!(
        m.handle(&mut f.dev, SyncInput::Message(answer.clone()))
            .unwrap()
            .is_empty()
    );
    assert!(m.summary().idle);
    assert!(f.dev.fetch_queue().unwrap().is_empty());
    assert!(
        m.handle(&mut f.dev, SyncInput::Message(answer)).is_err(),
        "no fetch in flight"
    );
}

/// An older relay (no `fetch` in its `Welcome`) is never sent a fetch (it would close the
/// connection as malformed): the queue waits, and the sync still ends idle.
#[test]
fn a_relay_that_does_not_fetch_gets_no_fetch_and_the_queue_waits() {
    let mut f = enrolled(22);
    f.dev.fetch("patient", Uuid::from_u128(1)).unwrap();
    let mut m = SyncMachine::default();
    answer_challenge(&mut m, &mut f);
    let mut old = welcome(10);
    if let RelayMessage::Welcome { fetch, priority, .. } = &mut old {
        (*fetch, *priority) = (false, false);
    }
    m.handle(&mut f.dev, SyncInput::Message(old)).unwrap();
    let page = RelayMessage::Changes {
        entries: vec![],
        next: PullCursor::default(),
        caught_up: true,
    };
    assert!(m.handle(&mut f.dev, SyncInput::Message(page)).unwrap().is_empty());
    assert!(m.summary().idle);
    assert_eq!(f.dev.fetch_queue().unwrap().len(), 1);
}

/// A snapshot begun on a relay that walks reference data last is started again on one that
/// does not (it would resume past reference data the first walk skipped); a finished space's
/// position stays.
#[test]
fn an_unfinished_priority_snapshot_starts_again_on_a_relay_without_priority() {
    let mut f = enrolled(23);
    let mut m = SyncMachine::default();
    connect(&mut m, &mut f, 10);
    let (done, midway) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let mut cursor = PullCursor::at(done, 40);
    cursor.spaces.insert(
        midway,
        fieldsync_schema::wire::SpaceCursor {
            seq: 0,
            snapshot: Some(fieldsync_schema::wire::SnapshotCursor {
                upto_seq: 90,
                after_key: 17,
                low_pass: false,
            }),
        },
    );
    let page = RelayMessage::Changes {
        entries: vec![],
        next: cursor,
        caught_up: false,
    };
    m.handle(&mut f.dev, SyncInput::Message(page)).unwrap();
    m.handle(&mut f.dev, SyncInput::Disconnected).unwrap();
    answer_challenge(&mut m, &mut f);
    let mut old = welcome(10);
    if let RelayMessage::Welcome { priority, .. } = &mut old {
        *priority = false;
    }
    let sent = m.handle(&mut f.dev, SyncInput::Message(old)).unwrap();
    let [ClientMessage::Pull { cursor, .. }] = &sent[..] else {
        panic!("expected a pull, got {sent:?}")
    };
    assert_eq!(cursor.seq(&done), 40);
    assert!(!cursor.spaces.contains_key(&midway), "{cursor:?}");
}

/// The app changes what the device holds while connected: the machine reconnects before it
/// applies anything more, so no page filtered by the old choice moves the cursor.
#[test]
fn a_delivery_change_while_connected_reconnects_before_applying_more() {
    let mut f = enrolled(24);
    let mut m = SyncMachine::default();
    connect(&mut m, &mut f, 10);
    f.dev.set_metered(true).unwrap();
    let page = RelayMessage::Changes {
        entries: vec![],
        next: PullCursor::at(space(), 5),
        caught_up: true,
    };
    assert!(matches!(
        m.handle(&mut f.dev, SyncInput::Message(page)),
        Err(SyncError::DeliveryChanged)
    ));
    assert_eq!(
        f.dev.cursor().unwrap(),
        PullCursor::default(),
        "the page was not applied"
    );
    m.handle(&mut f.dev, SyncInput::Disconnected).unwrap();
    let hello = m.handle(&mut f.dev, SyncInput::Connected).unwrap();
    assert!(
        matches!(hello[..], [ClientMessage::Hello { metered: true, .. }]),
        "{hello:?}"
    );
}
