//! Sync windows (SPEC §16): which records of a type a new device downloads.
//!
//! A type may declare `window = { field = "date", days_back = 90, days_ahead = 56 }` on one of
//! its date or timestamp fields. A device that syncs by windows gets, in its first download,
//! only the records whose field lies within the window around the relay's now (plus what they
//! reference, which the device fetches), and may evict held records that left it. A record
//! whose field is empty or unreadable counts as inside: a window only ever leaves out what it
//! can date.
//!
//! A window is not part of the schema's hash: it says what a device downloads first, not what
//! a record may hold, so devices and relays with different windows still sync the same records.

use serde::Serialize;
use serde_json::{Map, Value};
use toml::Value as Toml;

use super::{FieldKind, SchemaError, invalid};
use crate::time_fmt::{parse_date, parse_timestamp};

const DAY_MS: i64 = 86_400_000;

/// The longest window side, in days (about 30 years): enough for any clinic's archive.
const MAX_DAYS: i64 = 11_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncWindow {
    /// The date or timestamp field that places a record in time.
    pub field: String,
    /// How many days before today a record stays inside; `None`: no limit into the past.
    pub days_back: Option<i64>,
    /// How many days after today; `None`: no limit into the future.
    pub days_ahead: Option<i64>,
}

impl SyncWindow {
    /// Whether a record with these (stored) fields lies inside the window at `now_ms`.
    pub fn contains(&self, fields: &Map<String, Value>, now_ms: u64) -> bool {
        self.day_of_record(fields)
            .is_none_or(|day| self.contains_day(day, now_ms))
    }

    /// The day (since 1970-01-01, UTC) a record with these fields is placed at; `None`: the
    /// window cannot date it (it counts as inside). The relay keeps it beside each document, so
    /// a windowed snapshot needs no document decoded.
    pub fn day_of_record(&self, fields: &Map<String, Value>) -> Option<i64> {
        fields.get(&self.field).and_then(Value::as_str).and_then(day_of)
    }

    /// Whether `day` lies inside the window at `now_ms`.
    pub fn contains_day(&self, day: i64, now_ms: u64) -> bool {
        let today = i64::try_from(now_ms).unwrap_or(i64::MAX) / DAY_MS;
        self.days_back.is_none_or(|back| day >= today - back)
            && self.days_ahead.is_none_or(|ahead| day <= today + ahead)
    }
}

/// The day (since 1970-01-01, UTC) a date or timestamp value names.
fn day_of(text: &str) -> Option<i64> {
    if let Some(date) = parse_date(text) {
        let epoch = time::Date::from_calendar_date(1970, time::Month::January, 1).ok()?;
        return Some((date - epoch).whole_days());
    }
    let at = parse_timestamp(text)?;
    Some((at.unix_timestamp() * 1000).div_euclid(DAY_MS))
}

/// Parses a type's `window` against its fields.
pub(super) fn parse_window(
    value: &Toml,
    fields: &std::collections::BTreeMap<String, super::Field>,
    loc: &str,
) -> Result<SyncWindow, SchemaError> {
    let what = "`window` must be a table { field = \"date_field\", days_back = N, days_ahead = N }";
    let table = value.as_table().ok_or_else(|| invalid(loc, what))?;
    let mut field = None;
    let mut days_back = None;
    let mut days_ahead = None;
    for (key, v) in table {
        let days = || {
            v.as_integer()
                .filter(|d| (0..=MAX_DAYS).contains(d))
                .ok_or_else(|| invalid(loc, format!("`window.{key}` must be 0 to {MAX_DAYS} days")))
        };
        match key.as_str() {
            "field" => field = Some(v.as_str().ok_or_else(|| invalid(loc, what))?.to_string()),
            "days_back" => days_back = Some(days()?),
            "days_ahead" => days_ahead = Some(days()?),
            other => return Err(invalid(loc, format!("unknown key `{other}` in `window`; {what}"))),
        }
    }
    let field = field.ok_or_else(|| invalid(loc, format!("`window` needs `field`; {what}")))?;
    match fields.get(&field).map(|f| &f.kind) {
        Some(FieldKind::Date | FieldKind::Timestamp) => {}
        Some(other) => {
            return Err(invalid(
                loc,
                format!(
                    "`window.field` (`{field}`) must be a date or timestamp field, not {}",
                    other.type_name()
                ),
            ));
        }
        None => {
            return Err(invalid(
                loc,
                format!("`window.field` names `{field}`, which is not a field of this type"),
            ));
        }
    }
    if days_back.is_none() && days_ahead.is_none() {
        return Err(invalid(loc, "`window` needs `days_back`, `days_ahead` or both"));
    }
    Ok(SyncWindow {
        field,
        days_back,
        days_ahead,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_796_083_200_000; // 2026-12-01T00:00:00Z

    fn window(back: Option<i64>, ahead: Option<i64>) -> SyncWindow {
        SyncWindow {
            field: "date".into(),
            days_back: back,
            days_ahead: ahead,
        }
    }

    fn at(date: &str) -> Map<String, Value> {
        json!({ "date": date }).as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_date_is_inside_between_its_bounds_and_outside_beyond_them() {
        let w = window(Some(90), Some(56));
        assert!(w.contains(&at("2026-12-01"), NOW));
        assert!(w.contains(&at("2026-09-02"), NOW), "90 days back is inside");
        assert!(!w.contains(&at("2026-09-01"), NOW), "91 days back is outside");
        assert!(w.contains(&at("2027-01-26"), NOW), "56 days ahead is inside");
        assert!(!w.contains(&at("2027-01-27"), NOW));
    }

    #[test]
    fn a_timestamp_counts_by_its_utc_day_and_an_open_side_has_no_limit() {
        let w = window(Some(90), None);
        assert!(w.contains(&at("2026-09-02T23:59:00Z"), NOW));
        assert!(!w.contains(&at("2026-09-01T23:59:00Z"), NOW));
        assert!(
            !w.contains(&at("2026-09-02T01:00:00+02:00"), NOW),
            "that is September 1st in UTC"
        );
        assert!(w.contains(&at("2040-01-01T00:00:00Z"), NOW));
    }

    #[test]
    fn a_record_the_window_cannot_date_is_inside() {
        let w = window(Some(1), Some(1));
        assert!(w.contains(&Map::new(), NOW));
        assert!(w.contains(&at("not a date"), NOW));
    }
}
