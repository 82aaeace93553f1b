//! Hybrid logical clock: (physical ms, counter, device id).
//!
//! Device clocks are skewed by hours or days and jump backwards; LWW still needs an order that
//! every replica computes the same way and that respects causality (a write made after seeing
//! another must sort after it). The HLC takes the wall clock as an input — it never reads one —
//! and stays monotonic whatever that input does.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::time_fmt::{parse_ms, render_ms};

/// One timestamp. Totally ordered by physical time, then counter, then device id, so two
/// devices never produce equal stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hlc {
    pub physical_ms: u64,
    pub counter: u32,
    pub device: Uuid,
}

impl Ord for Hlc {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.physical_ms, self.counter, self.device).cmp(&(other.physical_ms, other.counter, other.device))
    }
}

impl PartialOrd for Hlc {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Hlc {
    /// The physical part in ISO 8601 (UTC, milliseconds), for people and JSON output.
    pub fn iso(&self) -> String {
        render_ms(self.physical_ms)
    }
}

/// `2026-11-22T09:30:00.123Z#0003@<device uuid>`: ISO 8601 physical time, counter, device.
/// Sorting these strings is not the HLC order (the counter width varies); compare [`Hlc`]s.
impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{:04}@{}", self.iso(), self.counter, self.device)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an HLC timestamp (expected ISO8601#counter@device): {0}")]
pub struct HlcParseError(String);

impl FromStr for Hlc {
    type Err = HlcParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || HlcParseError(s.to_string());
        let (time, rest) = s.split_once('#').ok_or_else(bad)?;
        let (counter, device) = rest.split_once('@').ok_or_else(bad)?;
        Ok(Hlc {
            physical_ms: parse_ms(time).ok_or_else(bad)?,
            counter: counter.parse().map_err(|_| bad())?,
            device: Uuid::parse_str(device).map_err(|_| bad())?,
        })
    }
}

/// The clock state of one device. Persist [`HlcClock::last`] and restore it with
/// [`HlcClock::resume`] so stamps stay monotonic across restarts.
#[derive(Debug, Clone)]
pub struct HlcClock {
    device: Uuid,
    physical_ms: u64,
    counter: u32,
}

impl HlcClock {
    pub fn new(device: Uuid) -> Self {
        HlcClock {
            device,
            physical_ms: 0,
            counter: 0,
        }
    }

    /// Continues from the last stamp this device issued (or observed).
    pub fn resume(device: Uuid, last: Option<Hlc>) -> Self {
        match last {
            Some(h) => HlcClock {
                device,
                physical_ms: h.physical_ms,
                counter: h.counter,
            },
            None => HlcClock::new(device),
        }
    }

    /// The latest stamp issued or observed, to persist.
    pub fn last(&self) -> Hlc {
        Hlc {
            physical_ms: self.physical_ms,
            counter: self.counter,
            device: self.device,
        }
    }

    /// A new stamp for a local event, later than every stamp issued or observed before.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        if wall_ms > self.physical_ms {
            self.physical_ms = wall_ms;
            self.counter = 0;
        } else {
            self.bump_counter();
        }
        self.last()
    }

    /// Folds in a stamp received from elsewhere, so later local stamps sort after it.
    pub fn observe(&mut self, remote: &Hlc, wall_ms: u64) {
        let physical = wall_ms.max(self.physical_ms).max(remote.physical_ms);
        let (local_equal, remote_equal) = (physical == self.physical_ms, physical == remote.physical_ms);
        let counter = match (local_equal, remote_equal) {
            (true, true) => self.counter.max(remote.counter),
            (true, false) => self.counter,
            (false, true) => remote.counter,
            (false, false) => {
                self.physical_ms = physical;
                self.counter = 0;
                return;
            }
        };
        self.physical_ms = physical;
        self.counter = counter;
        self.bump_counter();
    }

    fn bump_counter(&mut self) {
        match self.counter.checked_add(1) {
            Some(c) => self.counter = c,
            None => {
                // 4 billion events within one millisecond: borrow the next millisecond.
                self.physical_ms += 1;
                self.counter = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn dev(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    #[test]
    fn monotonic_when_the_wall_clock_jumps_backwards() {
        let mut c = HlcClock::new(dev(1));
        let a = c.tick(10_000);
        let b = c.tick(5_000); // clock set back by five seconds
        let d = c.tick(5_001);
        let e = c.tick(20_000);
        assert!(a < b && b < d && d < e, "{a} {b} {d} {e}");
        assert_eq!(b.physical_ms, 10_000);
        assert_eq!(e.counter, 0);
    }

    #[test]
    fn two_stamps_in_one_millisecond_differ_and_a_full_counter_borrows_the_next_millisecond() {
        let mut c = HlcClock::new(dev(1));
        let a = c.tick(7_000);
        let b = c.tick(7_000);
        assert!(a < b, "{a} {b}");
        assert_eq!((b.physical_ms, b.counter), (7_000, 1));

        let persisted = Hlc {
            physical_ms: 7_000,
            counter: u32::MAX,
            device: dev(1),
        };
        let mut full = HlcClock::resume(dev(1), Some(persisted));
        let next = full.tick(7_000);
        assert_eq!((next.physical_ms, next.counter), (7_001, 0));
        assert!(next > persisted);
    }

    #[test]
    fn observing_a_remote_stamp_orders_later_local_events_after_it() {
        let mut c = HlcClock::new(dev(1));
        c.tick(1_000);
        let remote = Hlc {
            physical_ms: 86_400_000, // a device a day ahead
            counter: 7,
            device: dev(2),
        };
        c.observe(&remote, 1_001);
        let next = c.tick(1_002);
        assert!(next > remote, "{next} should follow {remote}");
    }

    #[test]
    fn ties_are_broken_by_device() {
        let a = Hlc {
            physical_ms: 5,
            counter: 1,
            device: dev(1),
        };
        let b = Hlc { device: dev(2), ..a };
        assert!(a < b);
        assert_ne!(a.cmp(&b), Ordering::Equal);
    }

    #[test]
    fn resume_continues_after_the_persisted_stamp() {
        let mut c = HlcClock::new(dev(3));
        let a = c.tick(1_000);
        let mut r = HlcClock::resume(dev(3), Some(c.last()));
        let b = r.tick(900);
        assert!(b > a);
    }

    #[test]
    fn display_parses_back() {
        let h = Hlc {
            physical_ms: 1_795_000_000_123,
            counter: 42,
            device: dev(9),
        };
        let s = h.to_string();
        assert!(s.starts_with("2026-") || s.starts_with("2025-"), "{s}");
        assert_eq!(s.parse::<Hlc>().unwrap(), h);
        assert!("garbage".parse::<Hlc>().is_err());
    }

    proptest! {
        /// Whatever the wall clock and the remote stamps do, issued stamps strictly increase.
        #[test]
        fn stamps_strictly_increase(events in proptest::collection::vec((0u64..1_000_000, any::<bool>(), 0u64..2_000_000, 0u32..5), 1..200)) {
            let mut c = HlcClock::new(dev(1));
            let mut prev: Option<Hlc> = None;
            for (wall, is_remote, rphys, rcount) in events {
                if is_remote {
                    let r = Hlc { physical_ms: rphys, counter: rcount, device: dev(2) };
                    c.observe(&r, wall);
                    let next = c.tick(wall);
                    prop_assert!(next > r);
                    if let Some(p) = prev { prop_assert!(next > p); }
                    prev = Some(next);
                } else {
                    let next = c.tick(wall);
                    if let Some(p) = prev { prop_assert!(next > p); }
                    prev = Some(next);
                }
            }
        }

        /// The order is total and consistent with the tuple order.
        #[test]
        fn order_is_total(a in (0u64..10, 0u32..3, 0u8..3), b in (0u64..10, 0u32..3, 0u8..3)) {
            let x = Hlc { physical_ms: a.0, counter: a.1, device: dev(a.2) };
            let y = Hlc { physical_ms: b.0, counter: b.1, device: dev(b.2) };
            prop_assert_eq!(x.cmp(&y), (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
            prop_assert_eq!(x == y, a == b);
        }
    }
}
