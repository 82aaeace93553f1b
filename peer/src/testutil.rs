//! Helpers for the library's unit tests: seeded devices on temp dirs, enrollment, JSON objects.

use std::path::Path;
use std::sync::Arc;

use fieldsync_schema::wire::{SpaceGrant, UserInfo};
use fieldsync_schema::{ManualTime, Role};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use uuid::Uuid;

use crate::Device;

pub const T0: u64 = 1_795_000_000_000;

pub use fieldsync_schema::testkit::obj;

pub fn open(dir: &Path, seed: u64, time: &ManualTime) -> Device {
    Device::open(dir, Arc::new(time.clone()), Box::new(ChaCha20Rng::seed_from_u64(seed))).unwrap()
}

pub fn space() -> Uuid {
    Uuid::from_bytes([0x5a; 16])
}

pub fn relay_id() -> Uuid {
    Uuid::from_bytes([0x77; 16])
}

pub fn user(role: Role) -> UserInfo {
    UserInfo {
        user_id: Uuid::from_bytes([0x11; 16]),
        name: "dana".into(),
        spaces: vec![SpaceGrant {
            space_id: space(),
            name: "clinic".into(),
            role,
        }],
    }
}

pub fn enroll(dev: &mut Device, role: Role) {
    dev.enroll_complete("ws://relay.test/v1/sync", relay_id(), user(role), space())
        .unwrap();
}

/// A device in a temp dir with a manual clock at `T0`.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub time: ManualTime,
    pub dev: Device,
}

impl Fixture {
    pub fn new(seed: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let time = ManualTime::new(T0);
        let dev = open(dir.path(), seed, &time);
        Fixture { dir, time, dev }
    }

    pub fn reopen(self, seed: u64) -> Fixture {
        let Fixture { dir, time, dev } = self;
        drop(dev);
        let dev = open(dir.path(), seed, &time);
        Fixture { dir, time, dev }
    }

    pub fn patient(&mut self, name: &str) -> Uuid {
        self.dev
            .put("patient", None, obj(serde_json::json!({ "name": name })))
            .unwrap()
            .entity_id
    }

    pub fn outbox_count(&self) -> i64 {
        self.dev
            .connection()
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .unwrap()
    }
}

/// Whether any file of a device directory (database, WAL, shared memory) holds `needle` in
/// plain bytes.
pub fn dir_holds_text(dir: &Path, needle: &str) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let bytes = std::fs::read(e.unwrap().path()).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}
