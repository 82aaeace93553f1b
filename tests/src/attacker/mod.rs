//! A raw protocol client for the attacker tests: it speaks CBOR frames to a real relay without
//! the peer library's good manners, so a test can send exactly the envelope, key or frame an
//! attacker would, record every byte the relay sends back, and look at the relay's database
//! to see that nothing was stored.
//!
//! [`RawConn`] is one WebSocket connection; [`Dev`] is a device identity (key, ids, Automerge
//! documents) that builds signed mutations the way an honest device does, so a test can then
//! change exactly one thing about them. [`honest_round_trip`] checks with the real peer library
//! that the relay still serves everyone else.

mod conn;
mod dev;
mod process;
mod stored;

pub use conn::*;
pub use dev::*;
pub use process::*;
pub use stored::*;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldsync_schema::{ClientMessage, DeviceKey, Outcome, Schema};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

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

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub use crate::obj;

pub fn schema_hash() -> fieldsync_schema::SchemaHash {
    Schema::default_schema().hash()
}

/// The `Enroll` message an honest device sends for `key`, `device_id` and `token`.
pub fn enroll_message(token: &str, device_id: Uuid, key: &DeviceKey) -> ClientMessage {
    ClientMessage::enroll(key, token, device_id, &Schema::default_schema())
}

pub fn hello(device_id: Uuid) -> ClientMessage {
    ClientMessage::hello(device_id, &Schema::default_schema())
}

/// The answer to a challenge, signed by `key` for `device_id` at relay `relay_id`.
pub fn auth_message(key: &DeviceKey, relay_id: Uuid, nonce: &[u8], device_id: Uuid) -> ClientMessage {
    ClientMessage::auth(key, &relay_id, nonce, &device_id)
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
