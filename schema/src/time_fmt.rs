//! Injected time and the date formats of the schema.
//!
//! Cores never read the wall clock: production passes [`SystemTimeSource`], tests and the
//! simulator pass [`ManualTime`], so a simulation seed reproduces every timestamp.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};

/// Milliseconds since the Unix epoch, from whatever clock the caller chose.
pub trait TimeSource: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The operating system's wall clock. Only binaries and async shells construct it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemTimeSource;

impl TimeSource for SystemTimeSource {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 is a misconfigured machine; treat it as the epoch rather than fail.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to; clones share the same reading.
#[derive(Debug, Clone, Default)]
pub struct ManualTime(Arc<AtomicU64>);

impl ManualTime {
    pub fn new(start_ms: u64) -> Self {
        ManualTime(Arc::new(AtomicU64::new(start_ms)))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl TimeSource for ManualTime {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Parses an RFC 3339 date-time (`2026-11-22T09:30:00Z`, `...+01:00`, fractional seconds).
pub fn parse_timestamp(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// Parses a calendar date `YYYY-MM-DD`, rejecting impossible dates such as February 30th.
pub fn parse_date(s: &str) -> Option<Date> {
    Date::parse(s, format_description!("[year]-[month]-[day]")).ok()
}

/// Renders milliseconds since the epoch as ISO 8601 UTC with millisecond precision,
/// e.g. `2026-11-22T09:30:00.123Z`.
pub fn render_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => {
            let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
            t.format(&fmt).unwrap_or_else(|_| format!("@{ms}ms"))
        }
        Err(_) => format!("@{ms}ms"),
    }
}

/// Parses what [`render_ms`] (or any RFC 3339 timestamp) produced back into milliseconds.
pub fn parse_ms(s: &str) -> Option<u64> {
    let t = parse_timestamp(s)?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_and_parse_round_trip() {
        let ms = 1_795_000_000_123;
        let s = render_ms(ms);
        assert!(s.ends_with(".123Z"), "{s}");
        assert_eq!(parse_ms(&s), Some(ms));
        assert_eq!(render_ms(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn dates_are_checked_against_the_calendar() {
        assert!(parse_date("2024-02-29").is_some());
        assert!(parse_date("2026-02-29").is_none());
        assert!(parse_date("2026-13-01").is_none());
        assert!(parse_date("26-01-01").is_none());
    }

    #[test]
    fn manual_time_is_shared_between_clones() {
        let t = ManualTime::new(5);
        let u = t.clone();
        t.advance(10);
        assert_eq!(u.now_ms(), 15);
    }
}
