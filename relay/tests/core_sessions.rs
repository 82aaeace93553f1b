//! Authentication, enrollment, pull, live fan-out, space isolation and last-seen times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{T0, TestRelay};
use fieldsync_relay::admin;
use fieldsync_relay::core::{Input, Output};
use fieldsync_relay::store::Backend;
use fieldsync_relay::store::Directory;
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_schema::signing::enroll_signing_bytes;
use fieldsync_schema::wire::{AuthFailure, PROTOCOL_VERSION};
use fieldsync_schema::{
    Bytes, ClientMessage, DeviceKey, FeedPayload, Outcome, PullCursor, RelayMessage, Role, Schema, SchemaHash, ids,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::json;

fn auth_failure(out: &[Output]) -> Option<AuthFailure> {
    out.iter().find_map(|o| match o {
        Output::Send(_, RelayMessage::AuthFailed { reason, .. }) => Some(*reason),
        _ => None,
    })
}

fn closed(out: &[Output]) -> bool {
    out.iter().any(|o| matches!(o, Output::Close(..)))
}

fn clinic() -> TestRelay {
    let mut r = TestRelay::new();
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    r
}

#[test]
fn unknown_and_revoked_devices_and_bad_signatures_are_refused() {
    let mut r = clinic();
    let dev = r.device("dana", 1);
    // A device id the relay never enrolled.
    let mut stranger = r.device("dana", 2);
    stranger.device_id = uuid::Uuid::from_bytes([9; 16]);
    let c = r.connect();
    let out = r.send(c, stranger.hello());
    assert_eq!(auth_failure(&out), Some(AuthFailure::UnknownDevice));
    assert!(closed(&out));

    // A wrong signature on the challenge.
    let (c, relay_id, _) = challenged(&mut r, &dev);
    let out = r.send(c, dev.auth(relay_id, &[0u8; 32]));
    assert_eq!(auth_failure(&out), Some(AuthFailure::BadSignature));

    // Revocation closes open sessions at the next tick and refuses new ones.
    admin::revoke_device(r.core.directory_mut(), dev.device_id, r.now).unwrap();
    let out = r.core.handle([Input::Tick], r.now + 500);
    assert!(
        out.iter().any(|o| matches!(o, Output::Close(c, _) if *c == dev.conn)),
        "{out:?}"
    );
    let c = r.connect();
    let out = r.send(c, dev.hello());
    assert_eq!(auth_failure(&out), Some(AuthFailure::Revoked));
}

#[test]
fn admin_changes_from_another_process_reach_open_sessions_at_the_next_tick() {
    let mut r = clinic();
    r.user("eve", "clinic", Role::Assistant);
    let mut dana = r.device("dana", 1);
    let eve = r.device("eve", 2);
    // The first tick looks at everything; the next one, with nothing written elsewhere, finds
    // nothing to do.
    r.core.handle([Input::Tick], r.now);
    assert!(r.core.handle([Input::Tick], r.now + 250).is_empty());

    // The admin CLI is another connection to the same file: it revokes Eve's device and takes
    // Dana out of the clinic, well within the full-refresh period.
    let mut other = SqliteBackend::open_existing(r.dir.path())
        .unwrap()
        .open_directory()
        .unwrap();
    admin::revoke_device(&mut other, eve.device_id, r.now + 300).unwrap();
    admin::remove_member(&mut other, "dana", "clinic").unwrap();
    drop(other);

    let out = r.core.handle([Input::Tick], r.now + 500);
    assert!(
        out.iter().any(|o| matches!(o, Output::Close(c, _) if *c == eve.conn)),
        "{out:?}"
    );
    // Dana's open session no longer writes into the clinic.
    let (_, m) = dana.create("patient", json!({"name": "Ada"}), T0);
    assert!(matches!(r.push_one(&mut dana, m), Outcome::Forbidden { .. }));
}

#[test]
fn a_nonce_is_single_use_and_expires() {
    let mut r = clinic();
    let dev = r.device("dana", 1);
    let c = r.connect();
    let out = r.send(c, dev.hello());
    let Output::Send(_, RelayMessage::Challenge { relay_id, nonce }) = &out[0] else {
        panic!("{out:?}")
    };
    let auth = dev.auth(*relay_id, &nonce.0);
    let out = r.send(c, auth.clone());
    assert!(matches!(out[0], Output::Send(_, RelayMessage::Welcome { .. })));
    // Replaying the same answer, on this or another connection, gets nowhere.
    let out = r.send(c, auth.clone());
    assert!(closed(&out), "{out:?}");
    let c2 = r.connect();
    let out = r.send(c2, auth);
    assert!(closed(&out), "{out:?}");

    // An unanswered challenge expires.
    let c3 = r.connect();
    let out = r.send(c3, dev.hello());
    let Output::Send(_, RelayMessage::Challenge { relay_id, nonce }) = &out[0] else {
        panic!("{out:?}")
    };
    r.now += 60_000;
    let out = r.send(c3, dev.auth(*relay_id, &nonce.0));
    assert_eq!(auth_failure(&out), Some(AuthFailure::NonceExpired));
}

#[test]
fn schema_and_protocol_mismatches_are_named() {
    let mut r = clinic();
    let dev = r.device("dana", 1);
    let c = r.connect();
    let out = r.send(
        c,
        ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            device_id: dev.device_id,
            schema_hash: SchemaHash([0; 32]),
            schema_version: 1,
            compression: false,
            types: None,
            windowed: false,
            priority: false,
            metered: false,
        },
    );
    assert_eq!(auth_failure(&out), Some(AuthFailure::SchemaMismatch));
    let c = r.connect();
    let out = r.send(
        c,
        ClientMessage::Hello {
            protocol_version: 99,
            device_id: dev.device_id,
            schema_hash: Schema::default_schema().hash(),
            schema_version: 1,
            compression: false,
            types: None,
            windowed: false,
            priority: false,
            metered: false,
        },
    );
    assert_eq!(auth_failure(&out), Some(AuthFailure::UnsupportedProtocol));
}

#[test]
fn enrollment_tokens_are_single_use_and_expire() {
    let mut r = clinic();
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let (token, _) = admin::create_enrollment_token(r.core.directory_mut(), "dana", 1_000, r.now, &mut r.rng).unwrap();
    let enroll = |rng: &mut ChaCha20Rng, token: &str| {
        let key = DeviceKey::generate(rng);
        let device_id = ids::new_uuid(rng);
        ClientMessage::Enroll {
            protocol_version: PROTOCOL_VERSION,
            token: token.to_string(),
            device_id,
            public_key: Bytes(key.public_key().to_vec()),
            schema_hash: Schema::default_schema().hash(),
            schema_version: 1,
            proof: Bytes(
                key.sign(&enroll_signing_bytes(token, &device_id, &key.public_key()))
                    .to_vec(),
            ),
            replaces: None,
        }
    };
    let c = r.connect();
    let out = r.send(c, enroll(&mut rng, &token));
    assert!(
        matches!(out[0], Output::Send(_, RelayMessage::Enrolled { .. })),
        "{out:?}"
    );
    let c = r.connect();
    assert_eq!(
        auth_failure(&r.send(c, enroll(&mut rng, &token))),
        Some(AuthFailure::TokenUsed)
    );
    let (token2, _) = admin::create_enrollment_token(r.core.directory_mut(), "dana", 1_000, r.now, &mut r.rng).unwrap();
    r.now += 2_000;
    let c = r.connect();
    assert_eq!(
        auth_failure(&r.send(c, enroll(&mut rng, &token2))),
        Some(AuthFailure::TokenExpired)
    );
    let c = r.connect();
    assert_eq!(
        auth_failure(&r.send(c, enroll(&mut rng, "fse_nope"))),
        Some(AuthFailure::InvalidToken)
    );
    // A proof by another key than the one presented is refused.
    let (token3, _) =
        admin::create_enrollment_token(r.core.directory_mut(), "dana", 60_000, r.now, &mut r.rng).unwrap();
    let mut msg = enroll(&mut rng, &token3);
    if let ClientMessage::Enroll { public_key, .. } = &mut msg {
        public_key.0 = DeviceKey::generate(&mut rng).public_key().to_vec();
    }
    let c = r.connect();
    assert_eq!(auth_failure(&r.send(c, msg)), Some(AuthFailure::BadSignature));
    assert_eq!(
        r.core.directory().devices().unwrap().len(),
        1,
        "only the first enrollment registered a device"
    );
}

#[test]
fn messages_before_authentication_close_the_connection() {
    let mut r = clinic();
    let c = r.connect();
    let out = r.send(
        c,
        ClientMessage::Pull {
            cursor: PullCursor::default(),
            max_entries: 10,
        },
    );
    assert!(closed(&out));
    let c = r.connect();
    let out = r.send(
        c,
        ClientMessage::Push {
            batch_id: 1,
            mutations: vec![],
        },
    );
    assert!(closed(&out));
}

#[test]
fn a_fresh_device_gets_compacted_documents_then_the_feed_then_live_entries() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    r.push_one(&mut a, m);
    for i in 0..5 {
        let u = a.update("patient", p, json!({"mrn": format!("M{i}")}), T0 + i);
        assert!(r.push_one(&mut a, u).applied().is_some());
    }
    let mut b = r.device("dana", 2);
    let entries = r.pull(&mut b);
    assert_eq!(entries.len(), 1, "one compacted document, not six changes");
    assert!(matches!(entries[0].payload, FeedPayload::Snapshot(_)));
    assert_eq!(entries[0].version, 6);
    assert_eq!(b.fields(p)["mrn"], json!("M4"));

    // B is caught up: A's next write reaches B live, without polling; A gets no echo.
    let u = a.update("patient", p, json!({"name": "Ada L."}), T0 + 10);
    let out = r.send(
        a.conn,
        ClientMessage::Push {
            batch_id: 7,
            mutations: vec![u],
        },
    );
    let live: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Send(c, RelayMessage::Live { entries, .. }) => Some((*c, entries.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(live.len(), 1, "{out:?}");
    assert_eq!(live[0].0, b.conn);
    for e in &live[0].1 {
        b.apply_entry(e);
    }
    assert_eq!(b.fields(p)["name"], json!("Ada L."));
}

#[test]
fn space_isolation_for_reads_and_writes() {
    let mut r = clinic();
    r.space("gym");
    r.user("gus", "gym", Role::Clinician);
    let mut a = r.device("dana", 1);
    let mut g = r.device("gus", 2);
    let (p, m) = a.create("patient", json!({"name": "Ada"}), T0);
    r.push_one(&mut a, m);
    // Gus pulls: nothing of the clinic arrives.
    assert!(r.pull(&mut g).is_empty());
    // Gus writes into the clinic's space: refused.
    let mut m = g.update("patient", p, json!({"name": "Hacked"}), T0);
    m.space_id = a.space_id;
    g.key.sign_mutation(&mut m);
    let o = r.push_one(&mut g, m);
    assert!(matches!(o, Outcome::Forbidden { .. }), "{o:?}");
    // Gus edits a clinic entity while claiming his own space: refused too.
    let m = g.update("patient", p, json!({"name": "Hacked again"}), T0);
    let o = r.push_one(&mut g, m);
    assert!(matches!(o, Outcome::Forbidden { .. }), "{o:?}");
    // Live fan-out skips other spaces.
    let u = a.update("patient", p, json!({"mrn": "1"}), T0 + 1);
    let out = r.send(
        a.conn,
        ClientMessage::Push {
            batch_id: 2,
            mutations: vec![u],
        },
    );
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::Send(c, RelayMessage::Live { .. }) if *c == g.conn))
    );
    assert_eq!(r.fields_of(p)["name"], json!("Ada"));
}

#[test]
fn envelope_and_signature_checks_come_first() {
    let mut r = clinic();
    r.user("sam", "clinic", Role::Clinician);
    let mut a = r.device("dana", 1);
    let b = r.device("sam", 2);
    // A forged signature.
    let (_, mut m) = a.create("patient", json!({"name": "Ada"}), T0);
    m.signature.0[0] ^= 1;
    assert!(matches!(r.push_one(&mut a, m), Outcome::Forbidden { .. }));
    // An envelope naming another device, even correctly signed by that device's key.
    let (_, mut m) = a.create("patient", json!({"name": "Ada"}), T0);
    m.device_id = b.device_id;
    b.key.sign_mutation(&mut m);
    assert!(matches!(r.push_one(&mut a, m.clone()), Outcome::Forbidden { .. }));
    // None of these left a receipt: the rightful owner can still send that mutation id.
    assert!(r.receipt(m.mutation_id).is_none());
}

#[test]
fn one_group_commit_serves_several_connections_and_outcomes_follow_the_commit() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let mut b = r.device("dana", 2);
    let (pa, ma) = a.create("patient", json!({"name": "A"}), T0);
    let (_, mb) = b.create("patient", json!({"name": "B"}), T0);
    let commits = r.core.stats().commits;
    let out = r.core.handle(
        [
            Input::message(
                a.conn,
                ClientMessage::Push {
                    batch_id: 1,
                    mutations: vec![ma],
                },
            ),
            Input::message(
                b.conn,
                ClientMessage::Push {
                    batch_id: 1,
                    mutations: vec![mb],
                },
            ),
        ],
        r.now + 1,
    );
    assert_eq!(
        r.core.stats().commits,
        commits + 1,
        "one transaction for the whole group"
    );
    let applied = out
        .iter()
        .filter(|o| matches!(o, Output::Send(_, RelayMessage::PushResult { results, .. }) if results[0].outcome.applied().is_some()))
        .count();
    assert_eq!(applied, 2);
    assert_eq!(r.version_of(pa), 1);
}

#[test]
fn pulls_come_in_pages_and_resume_from_the_cursor() {
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let mut ids = Vec::new();
    for i in 0..250 {
        let (p, m) = a.create("patient", json!({"name": format!("P{i}")}), T0 + i);
        ids.push(p);
        r.push_one(&mut a, m);
    }
    let mut b = r.device("dana", 2);
    // One page is at most what was asked for, and says there is more.
    let first = r.send(
        b.conn,
        ClientMessage::Pull {
            cursor: Default::default(),
            max_entries: 100,
        },
    );
    match &first[0] {
        Output::Send(_, RelayMessage::Changes { entries, caught_up, .. }) => {
            assert_eq!(entries.len(), 100);
            assert!(!caught_up);
        }
        other => panic!("expected a page, got {other:?}"),
    }
    let entries = r.pull(&mut b); // the helper asks for 100 per page
    assert_eq!(entries.len(), 250);
    for p in &ids {
        assert!(b.docs.contains_key(p));
    }
    // Later writes arrive through the feed from the stored cursor.
    let u = a.update("patient", ids[0], json!({"mrn": "x"}), T0 + 999);
    r.push_one(&mut a, u);
    let b_conn = r.login(&b);
    b.conn = b_conn;
    let more = r.pull(&mut b);
    assert_eq!(more.len(), 1);
    assert_eq!(b.fields(ids[0])["mrn"], json!("x"));
}

#[test]
fn a_device_over_its_rate_is_told_to_retry_later() {
    let mut r = TestRelay::with_config(fieldsync_relay::core::RelayConfig {
        rate_per_sec: 100.0,
        rate_burst: 300.0,
        ..Default::default()
    });
    r.space("clinic");
    r.user("dana", "clinic", Role::Clinician);
    let mut a = r.device("dana", 1);
    let mut sent = 0;
    let mut deferred = false;
    for round in 0..10u64 {
        let batch: Vec<_> = (0..100)
            .map(|i| a.create("patient", json!({"name": format!("{round}-{i}")}), T0).1)
            .collect();
        sent += batch.len();
        let out = r.core.handle(
            [Input::message(
                a.conn,
                ClientMessage::Push {
                    batch_id: round,
                    mutations: batch,
                },
            )],
            r.now,
        );
        if out
            .iter()
            .any(|o| matches!(o, Output::Send(_, RelayMessage::PushDeferred { .. })))
        {
            deferred = true;
            break;
        }
    }
    assert!(deferred, "{sent} mutations in the same millisecond were all accepted");
    assert!(sent > 300, "deferred within the burst allowance ({sent})");
}

#[test]
fn signature_checks_made_outside_the_core_count_only_with_the_current_key() {
    use fieldsync_relay::core::Prechecked;
    use fieldsync_schema::signing::Verifier;
    let mut r = clinic();
    let mut a = r.device("dana", 1);
    let verifier = Verifier::new(&a.key.public_key()).unwrap();
    // A forged mutation that an outside check (wrongly) marked valid, but with another key:
    // the core verifies it itself and refuses it.
    let (_, mut forged) = a.create("patient", json!({"name": "Forged"}), T0);
    forged.signature.0[3] ^= 1;
    let stale = Prechecked {
        key: [7; 32],
        valid: vec![true],
    };
    let out = r.core.handle(
        [Input::Message {
            conn: a.conn,
            msg: ClientMessage::Push {
                batch_id: 1,
                mutations: vec![forged],
            },
            prechecked: Some(stale),
        }],
        r.now + 1,
    );
    let outcome = |out: &[Output]| {
        out.iter()
            .find_map(|o| match o {
                Output::Send(_, RelayMessage::PushResult { results, .. }) => Some(results[0].outcome.clone()),
                _ => None,
            })
            .unwrap()
    };
    assert!(matches!(outcome(&out), Outcome::Forbidden { .. }));
    // A correct check with the session's key is used as is (the core does not verify again):
    // marking a valid mutation invalid makes the core refuse it.
    let (_, good) = a.create("patient", json!({"name": "Real"}), T0);
    let mut said_bad = Prechecked::check(&verifier, std::slice::from_ref(&good));
    assert_eq!(said_bad.valid, vec![true]);
    said_bad.valid = vec![false];
    let out = r.core.handle(
        [Input::Message {
            conn: a.conn,
            msg: ClientMessage::Push {
                batch_id: 2,
                mutations: vec![good.clone()],
            },
            prechecked: Some(said_bad),
        }],
        r.now + 2,
    );
    assert!(matches!(outcome(&out), Outcome::Forbidden { .. }));
    let checked = Prechecked::check(&verifier, std::slice::from_ref(&good));
    let mut other = good;
    other.mutation_id = uuid::Uuid::from_bytes([5; 16]);
    a.key.sign_mutation(&mut other);
    let out = r.core.handle(
        [Input::Message {
            conn: a.conn,
            msg: ClientMessage::Push {
                batch_id: 3,
                mutations: vec![other],
            },
            prechecked: Some(checked),
        }],
        r.now + 3,
    );
    assert!(outcome(&out).applied().is_some());
    assert_eq!(r.core.front().session_key(a.conn), Some(a.key.public_key()));
}

#[test]
fn rotating_to_a_key_that_is_not_a_curve_point_is_refused_and_nothing_is_stored() {
    let mut r = clinic();
    let a = r.device("dana", 1);
    // 0x02 followed by zeros does not decompress to a point on the curve.
    let mut bad = [0u8; 32];
    bad[0] = 2;
    bad[31] = 0x80;
    let sig = a.key.sign(&fieldsync_schema::signing::rotate_signing_bytes(
        &a.device_id,
        &a.key.public_key(),
        &bad,
    ));
    let out = r.send(
        a.conn,
        ClientMessage::RotateKey {
            new_public_key: Bytes(bad.to_vec()),
            signature: Bytes(sig.to_vec()),
        },
    );
    assert!(closed(&out), "{out:?}");
    let stored = r.core.directory().device(a.device_id).unwrap().unwrap().public_key;
    assert_eq!(stored, a.key.public_key().to_vec());
}

/// `device list` shows when each device was last seen: written at sign-in and refreshed by
/// the tick while the session lasts, not on every message.
#[test]
fn a_long_session_keeps_the_device_last_seen_time_current() {
    use fieldsync_relay::core::Input;
    use fieldsync_relay::store::{Backend, Directory};

    let mut relay = TestRelay::new();
    relay.space("clinic");
    relay.user("dana", "clinic", Role::Clinician);
    let dev = relay.device("dana", 1);
    let seen = |relay: &TestRelay| {
        let directory = relay.backend.open_directory().unwrap();
        directory.device(dev.device_id).unwrap().unwrap().last_seen_ms.unwrap()
    };
    let signed_in = seen(&relay);
    relay.now += 30_000;
    relay.core.handle([Input::Tick], relay.now);
    assert_eq!(seen(&relay), signed_in, "not rewritten on every tick");
    relay.now += 31_000;
    relay.core.handle([Input::Tick], relay.now);
    assert_eq!(seen(&relay), relay.now, "refreshed a minute into the session");
}

/// Opens a connection for `dev` and says hello: the connection, the relay id and the nonce.
fn challenged(r: &mut TestRelay, dev: &common::TestDevice) -> (u64, uuid::Uuid, Vec<u8>) {
    let c = r.connect();
    let out = r.send(c, dev.hello());
    let Output::Send(_, RelayMessage::Challenge { relay_id, nonce }) = &out[0] else {
        panic!("expected a challenge, got {out:?}")
    };
    (c, *relay_id, nonce.0.clone())
}

/// Logs `dev` in on a new connection up to the relay's answer to its proven key.
fn answer_to_proof(r: &mut TestRelay, dev: &common::TestDevice) -> (u64, Vec<Output>) {
    let (c, relay_id, nonce) = challenged(r, dev);
    (c, r.send(c, dev.auth(relay_id, &nonce)))
}

/// A device revoked with a wipe still answers the challenge (only the device may report the
/// wipe done), is told to erase its data and nothing else, and its report is recorded before
/// it is refused; afterwards it is refused as any revoked device.
#[test]
fn a_device_revoked_with_a_wipe_is_told_to_wipe_once_it_proves_its_key_and_its_report_is_recorded() {
    let mut r = clinic();
    let dev = r.device("dana", 1);
    let bystander = r.device("dana", 2);
    // A session nobody told to wipe cannot report a wipe.
    let out = r.send(bystander.conn, ClientMessage::Wiped { discarded: 1 });
    assert!(closed(&out), "{out:?}");

    let asked = admin::revoke_and_wipe(r.core.directory_mut(), dev.device_id, r.now).unwrap();
    assert_eq!(asked, admin::WipeRequest::RevokedWithWipe);
    // The open session is told at the next tick, not refused.
    let out = r.core.handle([Input::Tick], r.now + 500);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Send(c, RelayMessage::Wipe) if *c == dev.conn)),
        "{out:?}"
    );
    assert_eq!(auth_failure(&out), None);

    // Someone with the device id but not its key learns nothing of the wipe.
    let (c, relay_id, _) = challenged(&mut r, &dev);
    let out = r.send(c, dev.auth(relay_id, &[0u8; 32]));
    assert_eq!(auth_failure(&out), Some(AuthFailure::BadSignature));
    assert!(!out.iter().any(|o| matches!(o, Output::Send(_, RelayMessage::Wipe))));

    // The device itself: told to wipe, never welcomed, and it may not pull.
    let (c, out) = answer_to_proof(&mut r, &dev);
    assert!(matches!(&out[..], [Output::Send(_, RelayMessage::Wipe)]), "{out:?}");
    let row = r.core.directory_mut().device(dev.device_id).unwrap().unwrap();
    assert_eq!((row.wiped_ms, row.wipe_discarded), (None, None), "{row:?}");
    let out = r.send(c, ClientMessage::Wiped { discarded: 3 });
    assert_eq!(auth_failure(&out), Some(AuthFailure::Revoked));
    assert!(closed(&out));
    let row = r.core.directory_mut().device(dev.device_id).unwrap().unwrap();
    assert!(row.wiped_ms.is_some(), "{row:?}");
    assert_eq!(row.wipe_discarded, Some(3));

    // Done: refused at the door like any revoked device, and no second wipe is asked.
    let c = r.connect();
    let out = r.send(c, dev.hello());
    assert_eq!(auth_failure(&out), Some(AuthFailure::Revoked));
    assert!(admin::revoke_and_wipe(r.core.directory_mut(), dev.device_id, r.now).is_err());

    // A device revoked earlier without a wipe gets one added: it is let through again.
    let lost = r.device("dana", 3);
    admin::revoke_device(r.core.directory_mut(), lost.device_id, r.now).unwrap();
    let c = r.connect();
    assert_eq!(auth_failure(&r.send(c, lost.hello())), Some(AuthFailure::Revoked));
    let asked = admin::revoke_and_wipe(r.core.directory_mut(), lost.device_id, r.now).unwrap();
    assert_eq!(asked, admin::WipeRequest::WipeAdded);
    let (c, out) = answer_to_proof(&mut r, &lost);
    assert!(matches!(&out[..], [Output::Send(_, RelayMessage::Wipe)]), "{out:?}");
    let out = r.send(
        c,
        ClientMessage::Pull {
            cursor: PullCursor::default(),
            max_entries: 10,
        },
    );
    assert!(closed(&out), "a device being wiped pulled: {out:?}");
    let row = r.core.directory_mut().device(lost.device_id).unwrap().unwrap();
    assert!(row.wipe_pending(), "{row:?}");
}
