//! The fuzz targets' bodies, as ordinary functions: `fuzz/` (cargo fuzz, nightly) calls them
//! with generated inputs, and `tests/tests/fuzz_corpus.rs` replays the kept corpus through them
//! on stable, so a crash the fuzzer once found stays fixed.
//!
//! Each target decodes what an attacker controls and asserts what must always hold: no panic,
//! decoders round-trip what they accept, the relay core keeps its audit chain and cross-table
//! counts and never shows one space's data to another, the device's sync machine turns any
//! relay message into a result, never a panic.

use std::path::Path;
use std::sync::Arc;

use fieldsync_peer::sync::{SyncInput, SyncMachine};
use fieldsync_peer::{Device, DeviceRng};
use fieldsync_relay::admin;
use fieldsync_relay::core::{ConnId, Input, Output, RelayConfig, RelayCore};
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_schema::document::{RootOps, device_actor, parse_change};
use fieldsync_schema::signing::{Verifier, envelope_hash};
use fieldsync_schema::testkit::{HandDevice, Versions};
use fieldsync_schema::wire::{SpaceGrant, UserInfo};
use fieldsync_schema::{
    Bytes, ClientMessage, DeviceKey, EntityDoc, FeedPayload, ManualTime, Mutation, MutationKind, Outcome, RelayMessage,
    Role, Schema, ids,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use uuid::Uuid;

/// The gym record's name (the harness checks structurally that nothing of the gym reaches the
/// clinic; the marker makes a leak easy to spot by eye in a failing input's output).
pub const GYM_MARKER: &str = "GYM-ONLY-7c1f0e";
const T0: u64 = 1_795_000_000_000;
const NESTING: usize = 64;

/// Lets a panic inside Automerge unwind to the relay's and the device's own guard
/// (`fieldsync_schema::document`, which turns it into an error) instead of ending the process.
/// libFuzzer's panic hook aborts on every panic, caught or not; any other panic still does.
fn tolerate_guarded_library_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_automerge = info.location().is_some_and(|l| l.file().contains("/automerge-"));
            if !in_automerge {
                abort(info);
            }
        }));
    });
}

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs where there is one: a store per input, fsyncs cost nothing there.
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("a temporary directory")
}

/// Target `frame_decoder`: any bytes through both frame decoders; what decodes re-encodes to
/// an equal message, and the relay's size estimate bounds the encoding.
pub fn frame_decoder(data: &[u8]) {
    tolerate_guarded_library_panics();
    if let Ok(m) = ClientMessage::decode(data) {
        let again = ClientMessage::decode(&m.encode()).expect("a decoded client message re-decodes");
        assert_eq!(again, m);
    }
    if let Ok(m) = RelayMessage::decode(data) {
        let bytes = m.encode();
        assert!(m.size_hint() >= bytes.len(), "size hint below the encoding");
        let again = RelayMessage::decode(&bytes).expect("a decoded relay message re-decodes");
        assert_eq!(again, m);
    }
}

/// Target `envelope_decoders`: the envelope, outcome and Automerge decoders behind the frames.
pub fn envelope_decoders(data: &[u8]) {
    tolerate_guarded_library_panics();
    if let Ok(m) = ciborium::de::from_reader_with_recursion_limit::<Mutation, _>(data, NESTING) {
        let _ = envelope_hash(&m);
        let key = DeviceKey::from_secret(&[7; 32]);
        let verifier = Verifier::new(&key.public_key()).expect("an honest key");
        let _ = verifier.verify_mutation(&m);
        let parsed: Vec<_> = m.changes.iter().filter_map(|c| parse_change(&c.0).ok()).collect();
        let _ = RootOps::of(&parsed);
    }
    if let Ok(o) = ciborium::de::from_reader_with_recursion_limit::<Outcome, _>(data, NESTING) {
        let _ = (o.disposition(), o.name());
    }
    if let Ok(c) = parse_change(data) {
        let _ = RootOps::of(std::slice::from_ref(&c));
    }
    if let Ok(mut doc) = EntityDoc::load(data, device_actor(Uuid::nil())) {
        let _ = (doc.fields(), doc.is_deleted(), doc.signature(), doc.heads());
        let _ = doc.save();
    }
    let _ = Verifier::new(data);
}

/// The gym's record, under an id the seeds name so the fuzzer tries to reach it.
const GYM_RECORD: Uuid = Uuid::from_bytes([0x44; 16]);

/// The clinic's device: its id is fixed, because the seeds' Automerge changes name it as author.
const CLINIC_DEVICE: Uuid = Uuid::from_bytes([0x11; 16]);

fn clinic_device() -> HandDevice {
    let mut d = HandDevice::new(ChaCha20Rng::seed_from_u64(11), Versions::Recorded);
    d.device_id = CLINIC_DEVICE;
    d.hlc = fieldsync_schema::HlcClock::new(CLINIC_DEVICE);
    d
}

/// An authenticated session on a fresh relay: the clinic's device, and a gym record it must
/// never see.
struct RelayUnderTest {
    _dir: tempfile::TempDir,
    backend: SqliteBackend,
    core: RelayCore<SqliteBackend>,
    conn: ConnId,
    clinic: HandDevice,
    /// The gym's only device: every change of gym data is authored by it.
    gym_device: Uuid,
    gym_space: Uuid,
    now: u64,
}

impl RelayUnderTest {
    fn new() -> Self {
        let dir = scratch_dir();
        let backend = SqliteBackend::open(dir.path(), Uuid::from_bytes([0xAA; 16])).expect("open the store");
        let mut core = RelayCore::new(
            &backend,
            Arc::new(Schema::default_schema()),
            RelayConfig::default(),
            Box::new(ChaCha20Rng::seed_from_u64(1)),
        )
        .expect("open the core");
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let store = core.directory_mut();
        admin::add_space(store, "clinic", T0, &mut rng).expect("space");
        admin::add_space(store, "gym", T0, &mut rng).expect("space");
        admin::add_user(store, "dana", "clinic", Role::Clinician, T0, &mut rng).expect("user");
        admin::add_user(store, "gus", "gym", Role::Admin, T0, &mut rng).expect("user");
        let mut r = RelayUnderTest {
            _dir: dir,
            backend,
            core,
            conn: 1,
            clinic: clinic_device(),
            gym_device: Uuid::nil(),
            gym_space: Uuid::nil(),
            now: T0,
        };
        // The gym's record, written through the protocol by the gym's own device.
        let mut gym = HandDevice::new(ChaCha20Rng::seed_from_u64(12), Versions::Recorded);
        r.enroll_and_login(100, "gus", &mut gym);
        (r.gym_device, r.gym_space) = (gym.device_id, gym.space_id);
        let fields = serde_json::json!({"name": GYM_MARKER});
        let fields = fields.as_object().expect("object").clone();
        let m = gym
            .write("patient", GYM_RECORD, MutationKind::Create, T0, |d, ty| {
                d.write_fields(ty, &fields)
            })
            .expect("a create");
        r.send(
            100,
            ClientMessage::Push {
                batch_id: 1,
                mutations: vec![m],
            },
        );
        // The clinic's device leaves the struct while it logs in (that borrows the relay).
        let mut clinic = std::mem::replace(&mut r.clinic, gym);
        r.enroll_and_login(1, "dana", &mut clinic);
        r.clinic = clinic;
        r
    }

    fn send(&mut self, conn: ConnId, msg: ClientMessage) -> Vec<Output> {
        self.now += 1;
        self.core.handle([Input::message(conn, msg)], self.now)
    }

    /// Enrolls `device` for `user` and logs it in on `conn`.
    fn enroll_and_login(&mut self, conn: ConnId, user: &str, device: &mut HandDevice) {
        let mut rng = ChaCha20Rng::seed_from_u64(conn);
        let (token, _) = admin::create_enrollment_token(
            self.core.directory_mut(),
            user,
            admin::DEFAULT_TOKEN_TTL_MS,
            self.now,
            &mut rng,
        )
        .expect("token");
        let enroll = conn + 1000;
        self.core.handle([Input::Opened(enroll)], self.now);
        self.send(enroll, device.enroll(&token));
        self.core.handle([Input::Closed(enroll), Input::Opened(conn)], self.now);
        let out = self.send(conn, device.hello());
        let Some(Output::Send(_, RelayMessage::Challenge { relay_id, nonce })) = out.first() else {
            panic!("no challenge: {out:?}");
        };
        let out = self.send(conn, device.auth(*relay_id, &nonce.0));
        match out.first() {
            Some(Output::Send(_, RelayMessage::Welcome { user, .. })) => device.adopt_user(user),
            other => panic!("login failed: {other:?}"),
        }
    }

    /// Whether a reply carries anything of the gym: a gym entry, a change the gym's device
    /// wrote (directly or inside a compacted document), the gym device as an author or LWW
    /// winner, the gym space in user info. Structural rather than a byte search, since the
    /// client may put any bytes it likes in its own ids and values.
    fn reveals_gym(&self, msg: &RelayMessage) -> bool {
        let gym_actor = device_actor(self.gym_device);
        let by_gym = |changes: &[Bytes]| {
            changes
                .iter()
                .any(|c| parse_change(&c.0).is_ok_and(|c| c.actor_id() == &gym_actor))
        };
        let outcome_reveals = |o: &Outcome| match o {
            Outcome::Conflict {
                server_changes,
                authors,
                ..
            } => by_gym(server_changes) || authors.iter().any(|a| a.device_id == self.gym_device),
            Outcome::Applied { lww_lost, .. } => lww_lost.iter().any(|l| l.winner_device == self.gym_device),
            _ => false,
        };
        match msg {
            RelayMessage::Changes { entries, .. } | RelayMessage::Live { entries, .. } => entries.iter().any(|e| {
                e.space_id == self.gym_space
                    || match &e.payload {
                        FeedPayload::Changes(changes) => by_gym(changes),
                        FeedPayload::Snapshot(bytes) => EntityDoc::load(&bytes.0, device_actor(Uuid::nil()))
                            .is_ok_and(|mut d| d.all_changes().iter().any(|c| c.actor_id() == &gym_actor)),
                        FeedPayload::Own | FeedPayload::NotSelected => false,
                    }
            }),
            RelayMessage::PushResult { results, .. } => results.iter().any(|r| match &r.outcome {
                Outcome::AlreadyApplied { original } => outcome_reveals(original),
                other => outcome_reveals(other),
            }),
            RelayMessage::Welcome { user, .. } | RelayMessage::Enrolled { user, .. } => {
                user.spaces.iter().any(|s| s.space_id == self.gym_space)
            }
            _ => false,
        }
    }

    /// Makes a fuzzed mutation the session's own (ids, clock, signature), so inputs reach the
    /// policies instead of stopping at the signature check. A nil space means the session's.
    fn adopt(&self, m: &mut Mutation) {
        let me = &self.clinic;
        m.device_id = me.device_id;
        m.user_id = me.user_id;
        m.client_timestamp.device = me.device_id;
        if m.space_id.is_nil() {
            m.space_id = me.space_id;
        }
        me.key.sign_mutation(m);
    }
}

/// Target `relay_core`: a sequence of client messages from an authenticated clinic device.
pub fn relay_core(data: &[u8]) {
    let _ = relay_core_outcomes(data);
}

/// [`relay_core`], returning the names of the outcomes the relay gave (`None`: not decodable),
/// so a test can tell that an input reached the acceptance pipeline.
pub fn relay_core_outcomes(data: &[u8]) -> Option<Vec<&'static str>> {
    tolerate_guarded_library_panics();
    let messages = ciborium::de::from_reader_with_recursion_limit::<Vec<ClientMessage>, _>(data, NESTING).ok()?;
    if messages.len() > 64 {
        return None;
    }
    let mut outcomes = Vec::new();
    let mut r = RelayUnderTest::new();
    for mut msg in messages {
        if let ClientMessage::Push { mutations, .. } = &mut msg {
            for m in mutations.iter_mut() {
                r.adopt(m);
            }
        }
        let mut out = r.send(r.conn, msg);
        r.now += 300;
        out.extend(r.core.handle([Input::Tick], r.now));
        for o in &out {
            if let Output::Send(_, RelayMessage::PushResult { results, .. }) = o {
                outcomes.extend(results.iter().map(|r| r.outcome.name()));
            }
            if let Output::Send(_, m) = o {
                assert!(!r.reveals_gym(m), "the clinic's device received the gym's data: {m:?}");
            }
        }
    }
    let report = fieldsync_relay::audit::verify(&r.backend).expect("audit verify runs");
    assert!(report.ok(), "audit chain broken: {report:?}");
    let consistency = r.backend.consistency().expect("consistency runs");
    assert!(consistency.problems().is_empty(), "{:?}", consistency.problems());
    Some(outcomes)
}

/// Target `peer_machine`: relay messages after a handshake, as a device in the clinic receives
/// them, with writes of its own queued.
pub fn peer_machine(data: &[u8]) {
    tolerate_guarded_library_panics();
    let Ok(messages) = ciborium::de::from_reader_with_recursion_limit::<Vec<RelayMessage>, _>(data, NESTING) else {
        return;
    };
    if messages.len() > 64 {
        return;
    }
    let dir = scratch_dir();
    let time = Arc::new(ManualTime::new(T0));
    let rng: DeviceRng = Box::new(ChaCha20Rng::seed_from_u64(3));
    let mut dev = Device::open(dir.path(), time.clone(), rng).expect("open the device");
    let user = peer_user();
    let space = user.spaces[0].space_id;
    dev.enroll_complete("ws://fuzz", Uuid::from_bytes([0xAA; 16]), user.clone(), space)
        .expect("enroll");
    let fields = serde_json::json!({"name": "Ada"});
    let _ = dev.put("patient", None, fields.as_object().expect("object").clone());
    let mut machine = SyncMachine::default();
    let _ = machine.handle(&mut dev, SyncInput::Connected);
    let handshake = [
        RelayMessage::Challenge {
            relay_id: Uuid::from_bytes([0xAA; 16]),
            nonce: Bytes(vec![5; 32]),
        },
        RelayMessage::Welcome {
            relay_id: Uuid::from_bytes([0xAA; 16]),
            user,
            server_time_ms: T0,
            max_batch: 256,
            schema_version: 1,
            compression: true,
            fetch: true,
            priority: true,
        },
    ];
    for msg in handshake.into_iter().chain(messages) {
        time.advance(50);
        let _ = machine.handle(&mut dev, SyncInput::Message(msg));
        let _ = machine.handle(&mut dev, SyncInput::Tick);
    }
    dev.status().expect("status stays readable");
}

fn peer_user() -> UserInfo {
    UserInfo {
        user_id: Uuid::from_bytes([0x55; 16]),
        name: "dana".into(),
        spaces: vec![SpaceGrant {
            space_id: Uuid::from_bytes([0x66; 16]),
            name: "clinic".into(),
            role: Role::Clinician,
        }],
    }
}

/// Starting points for the fuzzers: well-formed inputs each target should get past its
/// decoders with, written to `fuzz/corpus/<target>/seed-*` by `fuzz_corpus::write_seeds`.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let dev = CLINIC_DEVICE;
    let mut doc = EntityDoc::new(device_actor(dev));
    let schema = Schema::default_schema();
    let ty = schema.entity_type("patient").expect("patient").clone();
    doc.init_type("patient").expect("type");
    let fields = serde_json::json!({"name": "Ada", "date_of_birth": "1815-12-10"});
    doc.write_fields(&ty, fields.as_object().expect("object"))
        .expect("fields");
    let create = doc.commit(T0).expect("change");
    let update_fields = serde_json::json!({"name": "Ada L."});
    doc.write_fields(&ty, update_fields.as_object().expect("object"))
        .expect("fields");
    let update = doc.commit(T0 + 1).expect("change");
    let entity = ids::new_uuid(&mut rng);
    let mutation = |kind, base, change: &automerge::Change, id: u8| Mutation {
        mutation_id: Uuid::from_bytes([id; 16]),
        device_id: dev,
        user_id: Uuid::nil(),
        space_id: Uuid::nil(),
        entity_type: "patient".into(),
        entity_id: entity,
        kind,
        client_timestamp: fieldsync_schema::Hlc {
            physical_ms: T0,
            counter: id as u32,
            device: dev,
        },
        base_version: base,
        changes: vec![Bytes(change.raw_bytes().to_vec())],
        signature: Bytes(vec![0; 64]),
    };
    let created = mutation(fieldsync_schema::MutationKind::Create, None, &create, 1);
    let updated = mutation(fieldsync_schema::MutationKind::Update, Some(1), &update, 2);
    let cbor = |v: &dyn erased::Encode| v.cbor();
    match target {
        "frame_decoder" => vec![
            ClientMessage::Push {
                batch_id: 1,
                mutations: vec![created.clone()],
            }
            .encode(),
            RelayMessage::PushResult {
                batch_id: 1,
                results: vec![fieldsync_schema::wire::MutationResult {
                    mutation_id: created.mutation_id,
                    outcome: Outcome::Applied {
                        version: 1,
                        seq: 1,
                        duplicate_of: None,
                        lww_lost: Vec::new(),
                    },
                }],
            }
            .encode(),
        ],
        "envelope_decoders" => vec![cbor(&created), create.raw_bytes().to_vec(), doc.save()],
        "relay_core" => vec![
            cbor(&vec![
                ClientMessage::Push {
                    batch_id: 1,
                    mutations: vec![created.clone(), updated.clone()],
                },
                ClientMessage::Pull {
                    cursor: fieldsync_schema::PullCursor::default(),
                    max_entries: 100,
                },
                ClientMessage::Push {
                    batch_id: 2,
                    mutations: vec![created.clone()],
                },
            ]),
            // Reaching for the gym's record: an update of it, and a create under its id.
            cbor(&vec![ClientMessage::Push {
                batch_id: 1,
                mutations: vec![
                    Mutation {
                        entity_id: GYM_RECORD,
                        ..updated
                    },
                    Mutation {
                        entity_id: GYM_RECORD,
                        mutation_id: Uuid::from_bytes([3; 16]),
                        ..created
                    },
                ],
            }]),
        ],
        "peer_machine" => vec![cbor(&vec![
            RelayMessage::PushResult {
                batch_id: 1,
                results: Vec::new(),
            },
            RelayMessage::Changes {
                entries: vec![fieldsync_schema::FeedEntry {
                    seq: 1,
                    space_id: Uuid::from_bytes([0x66; 16]),
                    entity_type: "patient".into(),
                    entity_id: entity,
                    version: 1,
                    payload: fieldsync_schema::FeedPayload::Snapshot(Bytes(doc.save())),
                    origin: None,
                    lww_losses: Vec::new(),
                }],
                next: fieldsync_schema::PullCursor::at(Uuid::from_bytes([0x66; 16]), 1),
                caught_up: true,
            },
        ])],
        _ => Vec::new(),
    }
}

mod erased {
    pub trait Encode {
        fn cbor(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn cbor(&self) -> Vec<u8> {
            let mut out = Vec::new();
            ciborium::into_writer(self, &mut out).expect("seeds serialise");
            out
        }
    }
}

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 4] = [
    ("frame_decoder", frame_decoder),
    ("envelope_decoders", envelope_decoders),
    ("relay_core", relay_core),
    ("peer_machine", peer_machine),
];
