//! Deadlines in device time, and the one rule for when they have come.
//!
//! A device's clock can jump backwards by hours (a user fixing the time, a dead RTC battery).
//! A deadline set before such a jump would then lie far in the future, and waiting for the
//! clock to catch up could stall reconnects and retries for that long; so a deadline further
//! away than any wait this library ever schedules counts as due.

/// The longest wait the library ever schedules (backoff caps and relay retry hints stay below
/// it). A deadline further away than this means the clock jumped backwards since it was set.
pub const MAX_PLAUSIBLE_WAIT_MS: u64 = 10 * 60 * 1000;

/// A moment in device time (ms since the Unix epoch) at which something becomes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(u64);

impl Deadline {
    pub const fn at(ms: u64) -> Self {
        Deadline(ms)
    }

    /// `delay_ms` after `now_ms`.
    pub const fn after(now_ms: u64, delay_ms: u64) -> Self {
        Deadline(now_ms.saturating_add(delay_ms))
    }

    pub const fn ms(self) -> u64 {
        self.0
    }

    /// Whether the deadline has come at `now_ms`, allowing for the clock jumping backwards.
    pub const fn is_due(self, now_ms: u64) -> bool {
        now_ms >= self.0 || self.0 - now_ms > MAX_PLAUSIBLE_WAIT_MS
    }

    /// How long until the deadline: zero once due (including after a clock jump).
    pub const fn remaining(self, now_ms: u64) -> u64 {
        if self.is_due(now_ms) { 0 } else { self.0 - now_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_is_due_at_its_time_and_after_a_backwards_clock_jump() {
        let d = Deadline::after(1_000, 500);
        assert_eq!(d.ms(), 1_500);
        assert!(!d.is_due(1_499));
        assert!(d.is_due(1_500));
        assert_eq!(d.remaining(1_200), 300);
        // Set 30 s ahead, then the clock jumps back two hours: due now, not in two hours.
        let set_at = 10 * 3_600_000;
        let retry = Deadline::after(set_at, 30_000);
        assert!(retry.is_due(set_at - 2 * 3_600_000));
        assert_eq!(retry.remaining(set_at - 2 * 3_600_000), 0);
        // Up to the longest plausible wait it waits; beyond it, it is due.
        assert!(!Deadline::at(MAX_PLAUSIBLE_WAIT_MS).is_due(0));
        assert!(Deadline::at(MAX_PLAUSIBLE_WAIT_MS + 1).is_due(0));
    }
}
