//! A raw protocol client for the attacker tests: it speaks CBOR frames to a real relay without
//! the peer library's good manners, so a test can send exactly the envelope, key or frame an
//! attacker would, record every byte the relay sends back, and look at the relay's database
//! to see that nothing was stored.
//!
//! [`RawConn`] is one WebSocket connection; [`Dev`] is a device identity (key, ids, Automerge
//! documents) that builds signed mutations the way an honest device does, so a test can then
//! change exactly one thing about them. [`honest_round_trip`] checks with the real peer library
//! that the relay still serves everyone else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fieldsync_peer::net::{self, SyncOptions};
use fieldsync_peer::sync::SyncMachine;
use fieldsync_schema::document::device_actor;
use fieldsync_schema::testkit::{HandDevice, Versions};
use fieldsync_schema::wire::{ErrorCode, MutationResult, UserInfo};
use fieldsync_schema::{
    Bytes, ClientMessage, DeviceKey, EntityDoc, EntityType, FeedEntry, Mutation, MutationKind, Outcome, PullCursor,
    RelayMessage, Schema, ids,
};
use futures_util::{SinkExt, StreamExt};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::{Relay, open_device};

/// How long any single receive may take before the test fails instead of hanging.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Every byte an attacker received, across all its connections (to search for leaked values).
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<u8>>>);

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    fn record(&self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }

    /// Whether `needle` occurs anywhere in what was received.
    pub fn contains(&self, needle: &[u8]) -> bool {
        contains(&self.0.lock().unwrap(), needle)
    }

    /// Whether `needle` occurs in what was received after the first `offset` bytes.
    pub fn contains_after(&self, offset: usize, needle: &[u8]) -> bool {
        let all = self.0.lock().unwrap();
        contains(&all[offset.min(all.len())..], needle)
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A WebSocket close frame with its code and reason.
    Closed(u16, String),
    /// A close frame without a code.
    ClosedBare,
    /// The TCP connection ended (EOF or reset) without a close frame.
    Dropped(String),
}

impl Ending {
    /// Closed with `code`, or reset right after the relay's last message: a relay that closes a
    /// connection with frames of ours still unread makes the kernel answer with a reset, which
    /// can overtake its close frame.
    pub fn is_close_or_reset(&self, code: u16) -> bool {
        match self {
            Ending::Closed(c, _) => *c == code,
            Ending::Dropped(e) => e.contains("reset") || e.contains("end of stream"),
            Ending::ClosedBare => false,
        }
    }

    pub fn code(&self) -> Option<u16> {
        match self {
            Ending::Closed(c, _) => Some(*c),
            _ => None,
        }
    }
}

/// One thing the relay sent.
#[derive(Debug)]
pub enum Frame {
    Msg(Box<RelayMessage>),
    End(Ending),
}

/// One WebSocket connection to the relay, speaking raw frames.
pub struct RawConn {
    ws: Ws,
    pub recorder: Recorder,
    /// Every message received on this connection, in order.
    pub received: Vec<RelayMessage>,
    pub ended: Option<Ending>,
    /// The `Welcome` this connection got, if it authenticated.
    pub welcome: Option<RelayMessage>,
}

pub fn sync_url(relay: &Relay) -> String {
    format!("{}/v1/sync", relay.url())
}

impl RawConn {
    pub async fn open(relay: &Relay) -> RawConn {
        Self::open_recorded(relay, &Recorder::new()).await
    }

    pub async fn open_recorded(relay: &Relay, recorder: &Recorder) -> RawConn {
        let url = sync_url(relay);
        let (ws, _) = tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .expect("connect timed out")
            .expect("connect to the relay");
        RawConn {
            ws,
            recorder: recorder.clone(),
            received: Vec::new(),
            ended: None,
            welcome: None,
        }
    }

    pub async fn send(&mut self, msg: &ClientMessage) {
        self.send_bytes(msg.encode()).await.expect("send a frame");
    }

    /// Sends one binary frame; an error means the relay already dropped the connection.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        tokio::time::timeout(RECV_TIMEOUT, self.ws.send(Message::Binary(bytes.into())))
            .await
            .map_err(|_| "send timed out".to_string())?
            .map_err(|e| e.to_string())
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.ws
            .send(Message::Text(text.to_string().into()))
            .await
            .map_err(|e| e.to_string())
    }

    /// Queues frames without flushing (to pipeline many requests in one write).
    pub async fn feed(&mut self, msg: &ClientMessage) {
        self.ws
            .feed(Message::Binary(msg.encode().into()))
            .await
            .expect("queue a frame");
    }

    /// Flushes queued frames; an error means the relay already dropped the connection.
    pub async fn try_flush(&mut self) -> Result<(), String> {
        self.ws.flush().await.map_err(|e| e.to_string())
    }

    pub async fn flush(&mut self) {
        self.ws.flush().await.expect("flush");
    }

    /// The next message or the end of the connection; fails the test after [`RECV_TIMEOUT`].
    pub async fn next(&mut self) -> Frame {
        self.next_within(RECV_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("nothing from the relay within {RECV_TIMEOUT:?}"))
    }

    /// Like [`RawConn::next`], `None` if nothing arrived within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Frame> {
        if let Some(e) = &self.ended {
            return Some(Frame::End(e.clone()));
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()?;
            let ending = match got {
                Some(Ok(Message::Binary(bytes))) => {
                    self.recorder.record(&bytes);
                    let msg = RelayMessage::decode(&bytes).expect("the relay sends well-formed frames");
                    if matches!(msg, RelayMessage::Welcome { .. }) {
                        self.welcome = Some(msg.clone());
                    }
                    self.received.push(msg.clone());
                    return Some(Frame::Msg(Box::new(msg)));
                }
                Some(Ok(Message::Text(t))) => {
                    self.recorder.record(t.as_bytes());
                    panic!("the relay sent a text frame: {t}");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(Some(f)))) => {
                    self.recorder.record(f.reason.as_bytes());
                    Ending::Closed(u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => Ending::ClosedBare,
                Some(Err(e)) => Ending::Dropped(e.to_string()),
                None => Ending::Dropped("end of stream".into()),
            };
            self.ended = Some(ending.clone());
            return Some(Frame::End(ending));
        }
    }

    /// The next message; fails the test if the connection ends instead.
    pub async fn recv(&mut self) -> RelayMessage {
        match self.next().await {
            Frame::Msg(m) => *m,
            Frame::End(e) => panic!(
                "the relay ended the connection ({e:?}); before that: {:?}",
                self.received
            ),
        }
    }

    /// Reads until the connection ends; returns the messages that came first and how it ended.
    pub async fn until_end(&mut self) -> (Vec<RelayMessage>, Ending) {
        let mut msgs = Vec::new();
        loop {
            match self.next().await {
                Frame::Msg(m) => msgs.push(*m),
                Frame::End(e) => return (msgs, e),
            }
        }
    }

    /// Expects exactly an `AuthFailed` followed by the end of the connection (1008).
    pub async fn expect_auth_failed(&mut self) -> fieldsync_schema::wire::AuthFailure {
        let (msgs, end) = self.until_end().await;
        let reason = match msgs.as_slice() {
            [RelayMessage::AuthFailed { reason, .. }] => *reason,
            other => panic!("expected one AuthFailed, got {other:?} then {end:?}"),
        };
        assert_eq!(end.code(), Some(1008), "refusals close with 1008: {end:?}");
        reason
    }

    /// Expects an `Error{code}` and then the end of the connection; returns the close.
    pub async fn expect_error_close(&mut self, code: ErrorCode) -> (String, Ending) {
        let (msgs, end) = self.until_end().await;
        let message = msgs
            .iter()
            .find_map(|m| match m {
                RelayMessage::Error { code: c, message } if *c == code => Some(message.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("expected Error{{{code:?}}}, got {msgs:?} then {end:?}"));
        for m in &msgs {
            assert!(
                matches!(
                    m,
                    RelayMessage::Error { .. } | RelayMessage::Changes { .. } | RelayMessage::Pong { .. }
                ),
                "unexpected {m:?} before the close"
            );
        }
        (message, end)
    }

    /// Sends a ping and reads until its pong, returning what arrived before it. The relay
    /// answers in order, so everything it queued for this connection before the ping is in.
    pub async fn barrier(&mut self, nonce: u64) -> Vec<RelayMessage> {
        self.send(&ClientMessage::Ping { nonce }).await;
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                RelayMessage::Pong { nonce: n } if n == nonce => return before,
                other => before.push(other),
            }
        }
    }

    /// This end's address (to find the relay's side of the socket in `/proc/net/tcp`).
    pub fn local_addr(&self) -> SocketAddr {
        match self.ws.get_ref() {
            MaybeTlsStream::Plain(tcp) => tcp.local_addr().unwrap(),
            _ => panic!("plain TCP only"),
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// The relay's id and the user this connection authenticated as.
    pub fn user(&self) -> UserInfo {
        match &self.welcome {
            Some(RelayMessage::Welcome { user, .. }) => user.clone(),
            _ => panic!("not authenticated"),
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

pub fn schema_hash() -> fieldsync_schema::SchemaHash {
    Schema::default_schema().hash()
}

/// The `Enroll` message an honest device sends for `key`, `device_id` and `token`.
pub fn enroll_message(token: &str, device_id: Uuid, key: &DeviceKey) -> ClientMessage {
    ClientMessage::enroll(key, token, device_id, schema_hash())
}

pub fn hello(device_id: Uuid) -> ClientMessage {
    ClientMessage::hello(device_id, schema_hash())
}

/// The answer to a challenge, signed by `key` for `device_id` at relay `relay_id`.
pub fn auth_message(key: &DeviceKey, relay_id: Uuid, nonce: &[u8], device_id: Uuid) -> ClientMessage {
    ClientMessage::auth(key, &relay_id, nonce, &device_id)
}

/// A device identity speaking raw frames: the hand-built device of `fieldsync_schema::testkit`
/// (its key, ids and Automerge documents, so it builds correctly signed mutations and can then
/// tamper with them), its user, and a recording of every frame it received.
pub struct Dev {
    pub hand: HandDevice,
    pub user: UserInfo,
    pub recorder: Recorder,
    next_batch: u64,
}

impl Deref for Dev {
    type Target = HandDevice;
    fn deref(&self) -> &HandDevice {
        &self.hand
    }
}

impl DerefMut for Dev {
    fn deref_mut(&mut self) -> &mut HandDevice {
        &mut self.hand
    }
}

impl Dev {
    /// A fresh key and device id from `seed`.
    pub fn identity(seed: u64) -> (DeviceKey, Uuid, ChaCha20Rng) {
        let rng = ChaCha20Rng::seed_from_u64(seed);
        let hand = HandDevice::new(rng.clone(), Versions::Recorded);
        (hand.key.clone(), hand.device_id, hand.rng)
    }

    /// Enrolls a new device for `user` with a fresh token, over a raw connection.
    pub async fn enroll(relay: &Relay, user: &str, seed: u64) -> Dev {
        let mut hand = HandDevice::new(ChaCha20Rng::seed_from_u64(seed), Versions::Recorded);
        let token = relay.token(user);
        let recorder = Recorder::new();
        let mut conn = RawConn::open_recorded(relay, &recorder).await;
        conn.send(&hand.enroll(&token)).await;
        let user = match conn.recv().await {
            RelayMessage::Enrolled { user, .. } => user,
            other => panic!("enrollment failed: {other:?}"),
        };
        let (_, end) = conn.until_end().await;
        assert_eq!(end.code(), Some(1000), "{end:?}");
        hand.adopt_user(&user);
        Dev {
            hand,
            user,
            recorder,
            next_batch: 1,
        }
    }

    pub fn space(&self, name: &str) -> Uuid {
        self.user
            .spaces
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{} is not in {name}", self.user.name))
            .space_id
    }

    /// A fresh id from this device's randomness.
    pub fn new_id(&mut self) -> Uuid {
        ids::new_uuid(&mut self.hand.rng)
    }

    /// Hello, Challenge, Auth, Welcome on a new connection.
    pub async fn connect(&self, relay: &Relay) -> RawConn {
        let mut conn = RawConn::open_recorded(relay, &self.recorder).await;
        conn.send(&self.hello()).await;
        let (relay_id, nonce) = match conn.recv().await {
            RelayMessage::Challenge { relay_id, nonce } => (relay_id, nonce),
            other => panic!("expected a challenge, got {other:?}"),
        };
        conn.send(&self.auth(relay_id, &nonce.0)).await;
        match conn.recv().await {
            RelayMessage::Welcome { .. } => {}
            other => panic!("login failed: {other:?}"),
        }
        conn
    }

    /// A signed envelope around `changes`, in [`HandDevice::space_id`], based on the known version.
    pub fn envelope(
        &mut self,
        entity_type: &str,
        entity_id: Uuid,
        kind: MutationKind,
        changes: Vec<Bytes>,
    ) -> Mutation {
        self.hand.envelope(entity_type, entity_id, kind, changes, now_ms())
    }

    /// Edits the local document of `entity_id` with `edit` and wraps the change as a mutation.
    pub fn write(
        &mut self,
        entity_type: &str,
        entity_id: Uuid,
        kind: MutationKind,
        edit: impl FnOnce(&mut EntityDoc, &EntityType),
    ) -> Mutation {
        self.hand
            .write(entity_type, entity_id, kind, now_ms(), |d, ty| {
                edit(d, ty);
                Ok(())
            })
            .expect("the edit changed something")
    }

    pub fn create(&mut self, entity_type: &str, fields: Value) -> (Uuid, Mutation) {
        let id = self.new_id();
        let m = self.create_with_id(entity_type, id, fields);
        (id, m)
    }

    pub fn create_with_id(&mut self, entity_type: &str, id: Uuid, fields: Value) -> Mutation {
        let fields = obj(fields);
        self.write(entity_type, id, MutationKind::Create, |d, ty| {
            d.write_fields(ty, &fields).unwrap();
            d.init_counters(ty).unwrap();
        })
    }

    pub fn update(&mut self, entity_type: &str, id: Uuid, patch: Value) -> Mutation {
        let patch = obj(patch);
        self.write(entity_type, id, MutationKind::Update, |d, ty| {
            d.write_fields(ty, &patch).unwrap()
        })
    }

    pub fn delete(&mut self, entity_type: &str, id: Uuid) -> Mutation {
        self.write(entity_type, id, MutationKind::Delete, |d, _| {
            d.set_deleted(true).unwrap()
        })
    }

    pub fn lock(&mut self, entity_type: &str, id: Uuid) -> Mutation {
        self.write(entity_type, id, MutationKind::Lock, |d, ty| {
            d.write_fields(ty, &obj(serde_json::json!({"locked": true}))).unwrap()
        })
    }

    /// A `Sign` mutation for a note, with a valid signature by this device over its content.
    pub fn sign_note(&mut self, id: Uuid) -> Mutation {
        self.hand.sign_note(id, now_ms()).expect("a signable note")
    }

    /// The note signature write under any `kind` (to try it as an `Update`).
    pub fn sign_note_as(&mut self, id: Uuid, kind: MutationKind) -> Mutation {
        let mut m = self.sign_note(id);
        m.kind = kind;
        self.resign(m)
    }

    /// Signs `m` again with this device's key (after a deliberate change).
    pub fn resign(&self, mut m: Mutation) -> Mutation {
        self.key.sign_mutation(&mut m);
        m
    }

    /// Pushes a batch and reads its result (skipping live entries that arrive first).
    pub async fn push(&mut self, conn: &mut RawConn, mutations: Vec<Mutation>) -> Vec<MutationResult> {
        let batch_id = self.next_batch;
        self.next_batch += 1;
        let entities: BTreeMap<Uuid, Uuid> = mutations.iter().map(|m| (m.mutation_id, m.entity_id)).collect();
        conn.send(&ClientMessage::Push { batch_id, mutations }).await;
        loop {
            match conn.recv().await {
                RelayMessage::PushResult { batch_id: b, results } if b == batch_id => {
                    for r in &results {
                        if let Some((version, _)) = r.outcome.applied() {
                            let e = entities[&r.mutation_id];
                            let v = self.versions.entry(e).or_insert(0);
                            *v = (*v).max(version);
                        }
                    }
                    return results;
                }
                RelayMessage::Live { .. } | RelayMessage::Pong { .. } => {}
                other => panic!("expected the push result, got {other:?}"),
            }
        }
    }

    pub async fn push_one(&mut self, conn: &mut RawConn, m: Mutation) -> Outcome {
        self.push(conn, vec![m]).await.remove(0).outcome
    }

    /// Pulls from `cursor` until caught up, applying what arrives; returns every entry.
    pub async fn pull_from(&mut self, conn: &mut RawConn, mut cursor: PullCursor) -> (Vec<FeedEntry>, PullCursor) {
        let mut all = Vec::new();
        for _ in 0..10_000 {
            conn.send(&ClientMessage::Pull {
                cursor,
                max_entries: 1000,
            })
            .await;
            let (entries, next, caught_up) = loop {
                match conn.recv().await {
                    RelayMessage::Changes {
                        entries,
                        next,
                        caught_up,
                    } => break (entries, next, caught_up),
                    RelayMessage::Live { .. } => {}
                    other => panic!("expected a changes page, got {other:?}"),
                }
            };
            for e in &entries {
                self.apply_entry(e);
            }
            all.extend(entries);
            cursor = next;
            if caught_up {
                return (all, cursor);
            }
        }
        panic!("the pull never caught up");
    }

    pub async fn pull_all(&mut self, conn: &mut RawConn) -> Vec<FeedEntry> {
        self.pull_from(conn, PullCursor::default()).await.0
    }

    pub fn apply_entry(&mut self, e: &FeedEntry) {
        self.hand.apply_entry(e).expect("a well-formed entry");
    }
}

/// What the relay's database holds, read through a read-only connection of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub devices: u64,
    pub documents: u64,
    pub feed: u64,
    pub receipts: u64,
    pub audit: u64,
    pub archive: u64,
    pub tokens_used: u64,
}

impl Stored {
    /// The same, ignoring receipts (a refusal decided after the sender was proven leaves its
    /// answer as a receipt, so a retry gets the same answer; it stores no data).
    pub fn data(&self) -> (u64, u64, u64, u64, u64, u64) {
        (
            self.devices,
            self.documents,
            self.feed,
            self.audit,
            self.archive,
            self.tokens_used,
        )
    }
}

pub fn db(relay: &Relay) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open_with_flags(
        relay.data.join("relay.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the relay database read-only");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

pub fn stored(relay: &Relay) -> Stored {
    let conn = db(relay);
    let count = |sql: &str| -> u64 { conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64 };
    Stored {
        devices: count("SELECT COUNT(*) FROM devices"),
        documents: count("SELECT COUNT(*) FROM documents"),
        feed: count("SELECT COUNT(*) FROM feed"),
        receipts: count("SELECT COUNT(*) FROM receipts"),
        audit: count("SELECT COUNT(*) FROM audit"),
        archive: count("SELECT COUNT(*) FROM conflict_archive"),
        tokens_used: count("SELECT COUNT(*) FROM tokens WHERE used_ms IS NOT NULL"),
    }
}

/// The relay's version of an entity (`None`: the relay has no such entity).
pub fn version_of(relay: &Relay, entity: Uuid) -> Option<u64> {
    db(relay)
        .query_row(
            "SELECT version FROM documents WHERE entity_id = ?1",
            [entity.as_bytes().to_vec()],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .map(|v| v as u64)
}

/// The public key the relay holds for a device (`None`: not enrolled).
pub fn device_key(relay: &Relay, device: Uuid) -> Option<Vec<u8>> {
    db(relay)
        .query_row(
            "SELECT public_key FROM devices WHERE device_id = ?1",
            [device.as_bytes().to_vec()],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .ok()
}

/// The relay's current fields of an entity, from its stored document.
pub fn relay_fields(relay: &Relay, entity: Uuid) -> Map<String, Value> {
    use fieldsync_relay::store::Store;
    let store = fieldsync_relay::store::sqlite::SqliteStore::open_dir(&relay.data, Uuid::nil()).unwrap();
    let row = store.document(entity).unwrap().expect("entity exists");
    let bytes = store.document_bytes(row.doc_key).unwrap();
    EntityDoc::load(&bytes, device_actor(Uuid::nil())).unwrap().fields()
}

/// `/v1/status` as JSON.
pub fn status(relay: &Relay) -> Value {
    let (code, body) = crate::http_get(relay.addr, "/v1/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

/// The relay process's id, found by its command line (it names the test's data directory).
pub fn relay_pid(relay: &Relay) -> u32 {
    let data = relay.data.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("fieldsync-relay"))
            && args.iter().any(|a| a == "serve")
            && args.contains(&data)
        {
            return pid;
        }
    }
    panic!("no relay process serving {data}");
}

/// Resident memory of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The TCP state (as in `/proc/net/tcp`: 01 established, 04 FIN_WAIT1, ...) of the socket with
/// local address `local` and remote address `remote`, if there is one.
pub fn tcp_state(local: SocketAddr, remote: SocketAddr) -> Option<u8> {
    fn hex_addr(a: SocketAddr) -> String {
        let SocketAddr::V4(v4) = a else { panic!("IPv4 only") };
        let ip = u32::from_le_bytes(v4.ip().octets());
        format!("{ip:08X}:{:04X}", v4.port())
    }
    let (l, r) = (hex_addr(local), hex_addr(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.len() > 3 && cols[1] == l && cols[2] == r).then(|| u8::from_str_radix(cols[3], 16).unwrap())
    })
}

/// The honest path still works: a new device of `user` (the real peer library) enrolls, writes
/// an entity of `entity_type` and syncs; a second new device of the same user receives it.
/// Returns how long the round took.
pub async fn honest_round_trip(relay: &Relay, dir: &Path, user: &str, entity_type: &str, fields: Value) -> Duration {
    let started = Instant::now();
    let opts = SyncOptions {
        progress: false,
        ..SyncOptions::default()
    };
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut writer = open_device(&dir.join(format!("honest-{n}-w")), 1000 + n * 2);
    net::enroll(&mut writer, &relay.url(), &relay.token(user))
        .await
        .unwrap();
    let id = writer.put(entity_type, None, obj(fields.clone())).unwrap().entity_id;
    let mut machine = SyncMachine::default();
    tokio::time::timeout(
        Duration::from_secs(30),
        net::sync_once(&mut writer, &mut machine, &opts),
    )
    .await
    .expect("the honest sync timed out")
    .expect("the honest sync failed");
    let status = writer.status().unwrap();
    assert_eq!(status.unsynced, 0, "the honest write was not accepted: {status:?}");
    let mut reader = open_device(&dir.join(format!("honest-{n}-r")), 1001 + n * 2);
    net::enroll(&mut reader, &relay.url(), &relay.token(user))
        .await
        .unwrap();
    let mut machine = SyncMachine::default();
    tokio::time::timeout(
        Duration::from_secs(30),
        net::sync_once(&mut reader, &mut machine, &opts),
    )
    .await
    .expect("the honest pull timed out")
    .expect("the honest pull failed");
    let got = reader
        .get(id)
        .unwrap()
        .expect("the second honest device received the write");
    for (k, v) in obj(fields) {
        assert_eq!(got.fields.get(&k), Some(&v), "field {k}");
    }
    started.elapsed()
}

/// Runs `f` on a fresh single-threaded runtime.
pub fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Whether an outcome carries any stored document data (changes, authors, LWW values).
pub fn carries_data(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Conflict {
            server_changes,
            authors,
            ..
        } => !server_changes.is_empty() || !authors.is_empty(),
        Outcome::Applied { lww_lost, .. } => !lww_lost.is_empty(),
        Outcome::AlreadyApplied { original } => carries_data(original),
        _ => false,
    }
}

pub fn forbidden(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Forbidden { reason } => reason,
        other => panic!("expected Forbidden, got {other:?}"),
    }
}
