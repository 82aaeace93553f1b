//! Simulated time. The world has one clock; each device reads it through its own skew, which
//! the fault injector moves — forwards or backwards — while the device runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use fieldsync_schema::TimeSource;

/// 2026-11-23 08:00 UTC: a Monday morning at the clinic.
pub const EPOCH_MS: u64 = 1_795_420_800_000;
pub const SECOND: u64 = 1_000;
pub const MINUTE: u64 = 60 * SECOND;
pub const HOUR: u64 = 60 * MINUTE;
pub const DAY: u64 = 24 * HOUR;

/// The world's time, in milliseconds since the Unix epoch.
#[derive(Debug, Clone)]
pub struct WorldClock(Arc<AtomicU64>);

impl WorldClock {
    pub fn new(start_ms: u64) -> Self {
        WorldClock(Arc::new(AtomicU64::new(start_ms)))
    }
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

/// A device's wall clock: world time plus a skew that can change at any moment.
#[derive(Debug, Clone)]
pub struct DeviceClock {
    world: WorldClock,
    skew_ms: Arc<AtomicI64>,
}

impl DeviceClock {
    pub fn new(world: WorldClock) -> Self {
        DeviceClock {
            world,
            skew_ms: Arc::new(AtomicI64::new(0)),
        }
    }
    pub fn set_skew(&self, ms: i64) {
        self.skew_ms.store(ms, Ordering::SeqCst);
    }
    pub fn skew(&self) -> i64 {
        self.skew_ms.load(Ordering::SeqCst)
    }
}

impl TimeSource for DeviceClock {
    fn now_ms(&self) -> u64 {
        let t = self.world.now() as i64 + self.skew_ms.load(Ordering::SeqCst);
        t.max(0) as u64
    }
}
