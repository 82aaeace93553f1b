//! The outbox: every local write as a signed mutation envelope, strictly ordered by `seq`.
//!
//! Items are never deleted: they move from `pending` to `applied` (confirmed by the relay) or
//! `blocked` (a blocking outcome, kept with its reason until a resolution), and to
//! `superseded` when a resolution replaces them (`superseded_by` names the resolution's item;
//! none when the user discarded them). "Unsynced" is `pending` + `blocked` + items superseded
//! by a resolution the relay has not confirmed yet: a write leaves the unsynced set only when
//! the relay has it. Envelopes are stored as CBOR, exactly as they will be sent, so the
//! signature covers what is on disk.
//!
//! Order is by `position` (the `seq` of the item a resolution took the place of) and then
//! `seq`: a resolution is pushed where the conflicted item stood, before later writes.

use std::fmt;
use std::str::FromStr;

use fieldsync_schema::wire::MAX_MESSAGE_BYTES;
use fieldsync_schema::{Mutation, MutationKind, Outcome};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use uuid::Uuid;

use crate::deadline::Deadline;
use crate::entity::{i64_of, parse_uuid};
use crate::error::{PeerError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxState {
    /// Waiting to be sent, or backing off after a retryable failure.
    Pending,
    /// Confirmed by the relay.
    Applied,
    /// Refused with a blocking outcome; halts the outbox until a resolution.
    Blocked,
    /// Replaced by a resolution (its changes travel inside it), or discarded by the user.
    Superseded,
}

impl OutboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Applied => "applied",
            OutboxState::Blocked => "blocked",
            OutboxState::Superseded => "superseded",
        }
    }
}

impl fmt::Display for OutboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OutboxState {
    type Err = PeerError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(OutboxState::Pending),
            "applied" => Ok(OutboxState::Applied),
            "blocked" => Ok(OutboxState::Blocked),
            "superseded" => Ok(OutboxState::Superseded),
            other => Err(PeerError::Corrupt(format!("unknown outbox state `{other}`"))),
        }
    }
}

/// One outbox item as the user sees it in `queue`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxItem {
    pub seq: u64,
    pub mutation_id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub kind: MutationKind,
    pub state: OutboxState,
    pub attempts: u32,
    /// When a backing-off item is due again (0: now).
    pub next_attempt_ms: u64,
    pub created_at_ms: u64,
    pub last_attempt_ms: Option<u64>,
    /// The relay's outcome, for applied and blocked items.
    pub outcome: Option<Outcome>,
    /// A human description of why the item is blocked or was retried.
    pub error: Option<String>,
    pub applied_version: Option<u64>,
    /// For a superseded item: the resolution that carries its changes (`None`: discarded).
    pub superseded_by: Option<Uuid>,
}

pub(crate) fn encode(m: &Mutation) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    ciborium::into_writer(m, &mut out).map_err(|e| PeerError::Corrupt(format!("encoding an envelope: {e}")))?;
    Ok(out)
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Mutation> {
    ciborium::from_reader(bytes).map_err(|e| PeerError::Corrupt(format!("stored envelope: {e}")))
}

fn kind_of(s: &str) -> Result<MutationKind> {
    MutationKind::ALL
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| PeerError::Corrupt(format!("unknown mutation kind `{s}`")))
}

const COLUMNS: &str = "seq, mutation_id, entity_type, entity_id, kind, state, attempts, next_attempt_ms, \
                       created_at_ms, last_attempt_ms, outcome, error, applied_version, superseded_by";

/// Push order: a resolution stands where the item it replaced stood.
const ORDER: &str = "ORDER BY COALESCE(position, seq), seq";

/// Items the relay has not confirmed: waiting, blocked, or carried by a resolution that is
/// itself still waiting or blocked.
const UNSYNCED: &str = "(state IN ('pending', 'blocked') OR (state = 'superseded' AND superseded_by IN \
                        (SELECT r.mutation_id FROM outbox r WHERE r.state IN ('pending', 'blocked'))))";

type RawItem = (
    i64,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

fn raw(r: &Row<'_>) -> rusqlite::Result<RawItem> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
    ))
}

fn to_item(r: RawItem) -> Result<OutboxItem> {
    let u = |i: i64| u64::try_from(i).unwrap_or(0);
    let outcome = match r.10 {
        None => None,
        Some(s) => Some(serde_json::from_str(&s).map_err(|e| PeerError::Corrupt(format!("stored outcome: {e}")))?),
    };
    Ok(OutboxItem {
        seq: u(r.0),
        mutation_id: parse_uuid(&r.1)?,
        entity_type: r.2,
        entity_id: parse_uuid(&r.3)?,
        kind: kind_of(&r.4)?,
        state: r.5.parse()?,
        attempts: u32::try_from(r.6).unwrap_or(u32::MAX),
        next_attempt_ms: u(r.7),
        created_at_ms: u(r.8),
        last_attempt_ms: r.9.map(u),
        outcome,
        error: r.11,
        applied_version: r.12.map(u),
        superseded_by: r.13.as_deref().map(parse_uuid).transpose()?,
    })
}

fn outcome_json(o: &Outcome) -> Result<String> {
    serde_json::to_string(o).map_err(|e| PeerError::Corrupt(format!("encoding an outcome: {e}")))
}

pub(crate) fn append(conn: &Connection, m: &Mutation, now_ms: u64) -> Result<u64> {
    conn.execute(
        "INSERT INTO outbox (mutation_id, entity_id, entity_type, kind, envelope, state, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6)",
        params![
            m.mutation_id.to_string(),
            m.entity_id.to_string(),
            m.entity_type,
            m.kind.as_str(),
            encode(m)?,
            i64_of(now_ms)
        ],
    )?;
    Ok(u64::try_from(conn.last_insert_rowid()).unwrap_or(0))
}

/// The newest item, if it was never sent: the only one a new write may be combined into.
pub(crate) fn last_unsent(conn: &Connection) -> Result<Option<(u64, Mutation)>> {
    let row: Option<(i64, String, i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, state, attempts, envelope FROM outbox ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    match row {
        Some((seq, state, 0, env)) if state == "pending" => Ok(Some((u64::try_from(seq).unwrap_or(0), decode(&env)?))),
        _ => Ok(None),
    }
}

pub(crate) fn replace_envelope(conn: &Connection, seq: u64, m: &Mutation) -> Result<()> {
    conn.execute(
        "UPDATE outbox SET envelope = ?2 WHERE seq = ?1",
        params![i64_of(seq), encode(m)?],
    )?;
    Ok(())
}

/// This device's not-yet-confirmed items for an entity (they count towards `base_version`).
pub(crate) fn unconfirmed_for(conn: &Connection, entity_id: Uuid) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM outbox WHERE entity_id = ?1 AND state IN ('pending', 'blocked')",
        [entity_id.to_string()],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The outbox in push order; without `include_applied`, only the unsynced items.
pub(crate) fn list(conn: &Connection, include_applied: bool) -> Result<Vec<OutboxItem>> {
    let filter = if include_applied {
        String::new()
    } else {
        format!("WHERE {UNSYNCED}")
    };
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM outbox {filter} {ORDER}"))?;
    let rows = stmt.query_map([], raw)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(to_item(r?)?);
    }
    Ok(out)
}

pub(crate) fn get(conn: &Connection, mutation_id: Uuid) -> Result<Option<OutboxItem>> {
    let r = conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM outbox WHERE mutation_id = ?1"),
            [mutation_id.to_string()],
            raw,
        )
        .optional()?;
    r.map(to_item).transpose()
}

pub(crate) fn envelope(conn: &Connection, mutation_id: Uuid) -> Result<Option<Mutation>> {
    let env: Option<Vec<u8>> = conn
        .query_row(
            "SELECT envelope FROM outbox WHERE mutation_id = ?1",
            [mutation_id.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    env.map(|e| decode(&e)).transpose()
}

/// (unsynced count, oldest unsynced item's creation time).
pub(crate) fn unsynced(conn: &Connection) -> Result<(u64, Option<u64>)> {
    let (n, oldest): (i64, Option<i64>) = conn.query_row(
        &format!("SELECT COUNT(*), MIN(created_at_ms) FROM outbox WHERE {UNSYNCED}"),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((
        u64::try_from(n).unwrap_or(0),
        oldest.map(|o| u64::try_from(o).unwrap_or(0)),
    ))
}

/// Drops the confirmed (applied or superseded) items of one record: its eviction. The caller
/// checked that nothing of it is unconfirmed.
pub(crate) fn forget_confirmed_for(conn: &Connection, entity_id: Uuid) -> Result<()> {
    conn.execute(
        "DELETE FROM outbox WHERE entity_id = ?1 AND state IN ('applied', 'superseded')",
        [entity_id.to_string()],
    )?;
    Ok(())
}

/// Deletes every queued and past change (a remote wipe, `crate::wipe`).
pub(crate) fn erase_all(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM outbox", [])?;
    Ok(())
}

pub(crate) fn pending_count(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM outbox WHERE state = 'pending'", [], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) fn first_blocked(conn: &Connection) -> Result<Option<OutboxItem>> {
    let r = conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM outbox WHERE state = 'blocked' {ORDER} LIMIT 1"),
            [],
            raw,
        )
        .optional()?;
    r.map(to_item).transpose()
}

/// A push frame's share for envelopes: the relay refuses frames over `MAX_MESSAGE_BYTES`, and a
/// refused frame would be retried unchanged forever. The rest covers the `Push` wrapper.
pub(crate) const PUSH_ENVELOPE_BUDGET: usize = MAX_MESSAGE_BYTES - 64 * 1024;

/// What may be sent now, oldest first: nothing while any item is blocked (the outbox is
/// halted), and never past an item that is still backing off (order is strict). At most `limit`
/// items, together within [`PUSH_ENVELOPE_BUDGET`] (the first item always goes; a write's change
/// is bounded by `MAX_MUTATION_CHANGE_BYTES`, far below the budget).
pub(crate) fn pushable(conn: &Connection, now_ms: u64, limit: usize) -> Result<Vec<Mutation>> {
    if first_blocked(conn)?.is_some() {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT next_attempt_ms, envelope FROM outbox WHERE state = 'pending' {ORDER} LIMIT ?1"
    ))?;
    let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for r in rows {
        let (next, env) = r?;
        if !Deadline::at(u64::try_from(next).unwrap_or(0)).is_due(now_ms) {
            break;
        }
        bytes += env.len();
        if bytes > PUSH_ENVELOPE_BUDGET && !out.is_empty() {
            break;
        }
        let m = decode(&env)?;
        // A batch holds one space: each space is ordered and committed on its own.
        if out.first().is_some_and(|first: &Mutation| first.space_id != m.space_id) {
            break;
        }
        out.push(m);
    }
    Ok(out)
}

/// When the oldest pending item is due, if the outbox is not halted.
pub(crate) fn next_due(conn: &Connection) -> Result<Option<u64>> {
    if first_blocked(conn)?.is_some() {
        return Ok(None);
    }
    let next: Option<i64> = conn
        .query_row(
            &format!("SELECT next_attempt_ms FROM outbox WHERE state = 'pending' {ORDER} LIMIT 1"),
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(next.map(|n| u64::try_from(n).unwrap_or(0)))
}

pub(crate) fn mark_sent(conn: &Connection, mutation_id: Uuid, now_ms: u64) -> Result<()> {
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, last_attempt_ms = ?2 WHERE mutation_id = ?1",
        params![mutation_id.to_string(), i64_of(now_ms)],
    )?;
    Ok(())
}

pub(crate) fn mark_applied(conn: &Connection, mutation_id: Uuid, outcome: &Outcome, version: u64) -> Result<()> {
    conn.execute(
        "UPDATE outbox SET state = 'applied', outcome = ?2, error = NULL, applied_version = ?3 WHERE mutation_id = ?1",
        params![mutation_id.to_string(), outcome_json(outcome)?, i64_of(version)],
    )?;
    Ok(())
}

pub(crate) fn mark_blocked(conn: &Connection, mutation_id: Uuid, outcome: &Outcome) -> Result<()> {
    conn.execute(
        "UPDATE outbox SET state = 'blocked', outcome = ?2, error = ?3 WHERE mutation_id = ?1",
        params![mutation_id.to_string(), outcome_json(outcome)?, outcome.describe()],
    )?;
    Ok(())
}

/// A retryable failure: stays pending, due again at `next_ms`.
pub(crate) fn schedule_retry(conn: &Connection, mutation_id: Uuid, next_ms: u64, error: &str) -> Result<()> {
    conn.execute(
        "UPDATE outbox SET next_attempt_ms = ?2, error = ?3 WHERE mutation_id = ?1 AND state = 'pending'",
        params![mutation_id.to_string(), i64_of(next_ms), error],
    )?;
    Ok(())
}

/// Makes backing-off items due now; returns how many changed.
pub(crate) fn make_due(conn: &Connection, mutation_id: Option<Uuid>) -> Result<usize> {
    Ok(match mutation_id {
        Some(id) => conn.execute(
            "UPDATE outbox SET next_attempt_ms = 0 WHERE mutation_id = ?1 AND state = 'pending'",
            [id.to_string()],
        )?,
        None => conn.execute(
            "UPDATE outbox SET next_attempt_ms = 0 WHERE state = 'pending' AND next_attempt_ms > 0",
            [],
        )?,
    })
}

/// Envelopes the relay has not confirmed (pending and blocked), oldest first: what a new
/// identity re-signs ([`crate::new_identity`]).
pub(crate) fn unconfirmed(conn: &Connection) -> Result<Vec<(u64, Mutation)>> {
    envelopes_where(conn, "state IN ('pending', 'blocked')")
}

/// Never-sent envelopes, oldest first (enrollment adopts them into the user's space).
pub(crate) fn unsent(conn: &Connection) -> Result<Vec<(u64, Mutation)>> {
    envelopes_where(conn, "state = 'pending' AND attempts = 0")
}

/// `(seq, envelope)` of the items matching `filter` (a fixed condition of this module), by seq.
fn envelopes_where(conn: &Connection, filter: &str) -> Result<Vec<(u64, Mutation)>> {
    let mut stmt = conn.prepare(&format!("SELECT seq, envelope FROM outbox WHERE {filter} ORDER BY seq"))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
    let mut out = Vec::new();
    for r in rows {
        let (seq, env) = r?;
        out.push((u64::try_from(seq).unwrap_or(0), decode(&env)?));
    }
    Ok(out)
}

/// One item's place and envelope, for the resolution code.
pub(crate) struct QueuedItem {
    /// Where it stands in push order (`position`, else `seq`).
    pub place: u64,
    pub state: OutboxState,
    pub envelope: Mutation,
}

/// This device's unconfirmed (pending or blocked) items for an entity, in push order, up to
/// `upto_seq` if given: the changes of these the relay has not applied.
pub(crate) fn unconfirmed_items(conn: &Connection, entity_id: Uuid, upto_seq: Option<u64>) -> Result<Vec<QueuedItem>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT COALESCE(position, seq), state, envelope FROM outbox
         WHERE entity_id = ?1 AND state IN ('pending', 'blocked') AND seq <= ?2 {ORDER}"
    ))?;
    let upto = i64_of(upto_seq.unwrap_or(u64::MAX));
    let rows = stmt.query_map(params![entity_id.to_string(), upto], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (place, state, env) = r?;
        out.push(QueuedItem {
            place: u64::try_from(place).unwrap_or(0),
            state: state.parse()?,
            envelope: decode(&env)?,
        });
    }
    Ok(out)
}

/// Appends an item that takes the place `position` in push order (a resolution).
pub(crate) fn append_at(conn: &Connection, m: &Mutation, now_ms: u64, position: u64) -> Result<u64> {
    let seq = append(conn, m, now_ms)?;
    conn.execute(
        "UPDATE outbox SET position = ?2 WHERE seq = ?1",
        params![i64_of(seq), i64_of(position)],
    )?;
    Ok(seq)
}

/// Marks items superseded: by the resolution `by`, or discarded (`None`). Items an earlier
/// resolution among them carried move to `by` as well, so one lookup tells whether the relay
/// has confirmed them.
pub(crate) fn supersede(conn: &Connection, ids: &[Uuid], by: Option<Uuid>, note: &str) -> Result<()> {
    let by = by.map(|u| u.to_string());
    for id in ids {
        conn.execute(
            "UPDATE outbox SET state = 'superseded', superseded_by = ?2, error = ?3 WHERE mutation_id = ?1",
            params![id.to_string(), by, note],
        )?;
        conn.execute(
            "UPDATE outbox SET superseded_by = ?2 WHERE superseded_by = ?1",
            params![id.to_string(), by],
        )?;
    }
    Ok(())
}

/// The highest `seq` so far (0: empty outbox).
pub(crate) fn max_seq(conn: &Connection) -> Result<u64> {
    let n: Option<i64> = conn.query_row("SELECT MAX(seq) FROM outbox", [], |r| r.get(0))?;
    Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `template` under another mutation id, carrying one change of `size` bytes.
    fn with_change_of(template: &Mutation, id: u128, size: usize) -> Mutation {
        let mut m = template.clone();
        m.mutation_id = Uuid::from_u128(id);
        m.changes = vec![fieldsync_schema::Bytes(vec![0; size])];
        m
    }

    #[test]
    fn every_state_reads_back_from_its_stored_name() {
        let all = [
            OutboxState::Pending,
            OutboxState::Applied,
            OutboxState::Blocked,
            OutboxState::Superseded,
        ];
        let names: Vec<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            ["pending", "applied", "blocked", "superseded"],
            "the names the table's CHECK allows"
        );
        for s in all {
            assert_eq!(s.as_str().parse::<OutboxState>().unwrap(), s);
        }
        assert!("sent".parse::<OutboxState>().is_err());
    }

    #[test]
    fn only_a_pending_never_sent_item_is_a_combine_target() {
        let mut f = crate::testutil::Fixture::new(3);
        f.patient("Ada");
        let conn = f.dev.connection();
        let (_, newest) = last_unsent(conn).unwrap().expect("a fresh write is a combine target");
        supersede(conn, &[newest.mutation_id], None, "discarded").unwrap();
        assert!(
            last_unsent(conn).unwrap().is_none(),
            "a superseded item is never written into"
        );
    }

    #[test]
    fn pending_counts_only_what_still_waits_to_be_sent() {
        let mut f = crate::testutil::Fixture::new(4);
        f.patient("Ada");
        f.patient("Bea");
        let conn = f.dev.connection();
        assert_eq!(pending_count(conn).unwrap(), 2);
        let (_, newest) = last_unsent(conn).unwrap().unwrap();
        supersede(conn, &[newest.mutation_id], None, "discarded").unwrap();
        assert_eq!(pending_count(conn).unwrap(), 1);
    }

    #[test]
    fn a_push_stops_short_of_the_frame_budget_with_room_for_its_wrapper() {
        let mut f = crate::testutil::Fixture::new(5);
        f.patient("Ada");
        let conn = f.dev.connection();
        let (_, template) = last_unsent(conn).unwrap().unwrap();
        let big = |n: u128, size: usize| with_change_of(&template, 1000 + n, size);
        // Four envelopes that fit a frame together, but not with 64 KiB kept for the wrapper.
        let overhead = encode(&big(0, 1000)).unwrap().len() - 1000;
        let size = (MAX_MESSAGE_BYTES - 30_000) / 4 - overhead;
        for n in 0..4 {
            append(conn, &big(n, size), crate::testutil::T0).unwrap();
        }
        let batch = pushable(conn, u64::MAX, 100).unwrap();
        assert_eq!(batch.len(), 4, "the create and three of the four large items");
        let total: usize = batch.iter().map(|m| encode(m).unwrap().len()).sum();
        assert!(total <= PUSH_ENVELOPE_BUDGET, "{total}");
    }

    #[test]
    fn make_due_brings_a_backing_off_item_forward_and_counts_it() {
        let mut f = crate::testutil::Fixture::new(7);
        f.patient("Ada");
        let conn = f.dev.connection();
        let (_, m) = last_unsent(conn).unwrap().unwrap();
        let later = crate::testutil::T0 + 60_000;
        schedule_retry(conn, m.mutation_id, later, "relay unavailable").unwrap();
        assert!(
            pushable(conn, crate::testutil::T0, 10).unwrap().is_empty(),
            "backing off"
        );
        assert_eq!(make_due(conn, None).unwrap(), 1);
        assert_eq!(pushable(conn, crate::testutil::T0, 10).unwrap().len(), 1, "due now");
        assert_eq!(make_due(conn, None).unwrap(), 0, "nothing left backing off");
        schedule_retry(conn, m.mutation_id, later, "relay unavailable").unwrap();
        assert_eq!(make_due(conn, Some(m.mutation_id)).unwrap(), 1);
    }

    #[test]
    fn envelopes_filling_the_budget_exactly_go_in_one_push() {
        let mut f = crate::testutil::Fixture::new(6);
        f.patient("Ada");
        let conn = f.dev.connection();
        let (_, template) = last_unsent(conn).unwrap().unwrap();
        let big = |n: u128, size: usize| with_change_of(&template, 2000 + n, size);
        let overhead = encode(&big(0, 100_000)).unwrap().len() - 100_000;
        let left = PUSH_ENVELOPE_BUDGET - encode(&template).unwrap().len();
        let first = left / 2 - overhead;
        let second = left - (first + overhead) - overhead;
        append(conn, &big(1, first), crate::testutil::T0).unwrap();
        append(conn, &big(2, second), crate::testutil::T0).unwrap();
        let batch = pushable(conn, u64::MAX, 100).unwrap();
        let total: usize = batch.iter().map(|m| encode(m).unwrap().len()).sum();
        assert_eq!(
            (batch.len(), total),
            (3, PUSH_ENVELOPE_BUDGET),
            "exactly the budget fits"
        );
    }
}
