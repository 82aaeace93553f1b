//! The core's periodic tick: revocations and membership changes made by the admin CLI (another
//! process) reach open sessions, and unanswered challenges expire.
//!
//! With a thousand connected devices, re-reading every session's memberships every 250 ms costs
//! the core thread thousands of queries a second and shows up as latency spikes. Admin changes
//! are rare, so the tick first asks the store whether anyone else wrote since the last look
//! ([`Store::outside_writes_marker`]) and only then reads revocations and memberships; a full
//! refresh every [`FULL_REFRESH_MS`] bounds staleness whatever the store can tell.

use std::collections::{BTreeMap, BTreeSet};

use fieldsync_schema::wire::{AuthFailure, UserInfo};
use fieldsync_schema::{RelayMessage, Role};
use uuid::Uuid;

use super::{ConnState, Front};
use crate::core::{CloseReason, ConnId, Output};
use crate::store::{Directory, SpaceStore};

/// Memberships and revocations are re-read at least this often even when the store reports no
/// outside writes.
pub const FULL_REFRESH_MS: u64 = 10_000;

/// How often a connected device's last-seen time is written (`device list` shows it): often
/// enough that a device in a day-long session does not look gone, rarely enough that a
/// thousand sessions cost a handful of directory writes a second, all in one transaction.
pub const LAST_SEEN_EVERY_MS: u64 = 60_000;

/// Revocations are looked up from this long before the previous check, so that a revocation
/// stamped by a clock slightly behind ours is not missed.
const REVOCATION_CLOCK_SLACK_MS: u64 = 5_000;

#[derive(Debug, Default)]
pub(crate) struct TickState {
    last_check_ms: u64,
    last_marker: Option<u64>,
    last_tick_ms: u64,
}

impl TickState {
    pub(super) fn last_tick_ms(&self) -> u64 {
        self.last_tick_ms
    }
}

impl<D: Directory, R: SpaceStore> Front<D, R> {
    /// Periodic work: close connections of devices revoked since the last check (SPEC §4: within
    /// a second), refresh space memberships, expire unanswered challenges, and fan out what
    /// other writers of the store committed.
    pub(super) fn tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        self.housekeeping.last_tick_ms = now_ms;
        self.look_outside(now_ms, true, None, out);
        self.expire_challenges(now_ms, out);
        self.record_last_seen(now_ms);
    }

    /// What other writers of the store changed: access (revocations, memberships) when
    /// `access` and the store's marker moved, and the rows they committed in `spaces` (`None`:
    /// every space with live sessions).
    pub(super) fn look_outside(
        &mut self,
        now_ms: u64,
        access: bool,
        spaces: Option<&std::collections::BTreeSet<uuid::Uuid>>,
        out: &mut Vec<Output>,
    ) {
        if access {
            let marker = match self.directory.outside_writes_marker() {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(error = %e, "could not ask the store for outside writes");
                    None
                }
            };
            let stale = now_ms.saturating_sub(self.housekeeping.last_check_ms) >= FULL_REFRESH_MS;
            if marker.is_none() || marker != self.housekeeping.last_marker || stale {
                self.close_revoked(now_ms, out);
                self.refresh_memberships(out);
                self.housekeeping.last_marker = marker;
            }
        }
        self.fan_out_outside(spaces, out);
    }

    /// Writes the last-seen time of every device connected for a while (best-effort: a full
    /// disk or a busy store must not disturb the sessions).
    fn record_last_seen(&mut self, now_ms: u64) {
        let due: Vec<Uuid> = self
            .conns
            .values()
            .filter_map(|c| match c {
                ConnState::Ready(s) if now_ms.saturating_sub(s.seen_recorded_ms) >= LAST_SEEN_EVERY_MS => {
                    Some(s.device_id)
                }
                _ => None,
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let written = self.directory.begin().and_then(|()| {
            for device in &due {
                self.directory.touch_device(*device, now_ms)?;
            }
            self.directory.commit()
        });
        if let Err(e) = written {
            let _ = self.directory.rollback();
            tracing::warn!(error = %e, devices = due.len(), "could not record when connected devices were last seen");
        }
        // Either way, try again a period later rather than on every tick.
        for c in self.conns.values_mut() {
            if let ConnState::Ready(s) = c
                && due.contains(&s.device_id)
            {
                s.seen_recorded_ms = now_ms;
            }
        }
    }

    fn close_revoked(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let since = self
            .housekeeping
            .last_check_ms
            .saturating_sub(REVOCATION_CLOCK_SLACK_MS);
        let revoked = match self.directory.revoked_since(since) {
            Ok(revoked) => revoked,
            Err(e) => {
                // Keep the old check time: the next tick looks again from there.
                tracing::error!(error = %e, "revocation check failed");
                return;
            }
        };
        self.housekeeping.last_check_ms = now_ms;
        let revoked: BTreeSet<Uuid> = revoked.into_iter().map(|(d, _)| d).collect();
        // Revoked with a wipe: a session (its key already proven) is told to wipe at once; a
        // pending challenge is left to `on_auth`, which tells it after the proof.
        let mut to_wipe = BTreeSet::new();
        for device_id in &revoked {
            match self.directory.device(*device_id) {
                Ok(Some(d)) if d.wipe_pending() => {
                    to_wipe.insert(*device_id);
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, device_id = %device_id, "cannot read a revoked device"),
            }
        }
        let victims: Vec<(ConnId, Option<Uuid>)> = self
            .conns
            .iter()
            .filter_map(|(id, st)| match st {
                ConnState::Ready(s) if to_wipe.contains(&s.device_id) => Some((*id, Some(s.device_id))),
                ConnState::Ready(s) if revoked.contains(&s.device_id) => Some((*id, None)),
                ConnState::Challenged { device_id, .. }
                    if revoked.contains(device_id) && !to_wipe.contains(device_id) =>
                {
                    Some((*id, None))
                }
                _ => None,
            })
            .collect();
        for (conn, wipe) in victims {
            match wipe {
                Some(device_id) => self.order_wipe(conn, device_id, out),
                None => self.refuse(
                    conn,
                    AuthFailure::Revoked,
                    "this device was revoked",
                    "device revoked",
                    out,
                ),
            }
        }
    }

    /// Memberships change through admin commands in another process; a session must stop
    /// seeing a space as soon as its user leaves it, and learn of a space it joined (it pulls
    /// that space's history, from its compacted documents) without reconnecting.
    fn refresh_memberships(&mut self, out: &mut Vec<Output>) {
        let users: BTreeSet<Uuid> = self
            .conns
            .values()
            .filter_map(|c| match c {
                ConnState::Ready(s) => Some(s.user_id),
                _ => None,
            })
            .collect();
        let mut infos: BTreeMap<Uuid, (BTreeMap<Uuid, Role>, UserInfo)> = BTreeMap::new();
        for user in users {
            let rows = match self.directory.memberships(user) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, %user, "membership refresh failed");
                    continue;
                }
            };
            let Ok(Some(row)) = self.directory.user(user) else {
                continue;
            };
            let spaces = rows.iter().map(|m| (m.space_id, m.role)).collect();
            infos.insert(user, (spaces, super::session::user_info(&row, rows)));
        }
        for (conn, c) in self.conns.iter_mut() {
            let ConnState::Ready(s) = c else { continue };
            let Some((spaces, info)) = infos.get(&s.user_id) else {
                continue;
            };
            if *spaces == s.spaces {
                continue;
            }
            s.spaces = spaces.clone();
            if let Some(live) = &mut s.live {
                // Left spaces stop at once; joined ones are live after the device pulls them.
                live.retain(|space, _| spaces.contains_key(space));
            }
            out.push(Output::Send(*conn, RelayMessage::UserChanged { user: info.clone() }));
        }
    }

    fn expire_challenges(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter_map(|(id, st)| match st {
                ConnState::Challenged { issued_ms, .. }
                    if now_ms.saturating_sub(*issued_ms) > self.config.nonce_ttl_ms =>
                {
                    Some(*id)
                }
                _ => None,
            })
            .collect();
        for conn in expired {
            self.refuse(
                conn,
                AuthFailure::NonceExpired,
                "the challenge was not answered in time",
                "challenge expired",
                out,
            );
        }
    }

    /// Tells the device why it is refused, then closes its connection.
    fn refuse(&mut self, conn: ConnId, reason: AuthFailure, message: &str, close: &str, out: &mut Vec<Output>) {
        out.push(Output::Send(
            conn,
            RelayMessage::AuthFailed {
                reason,
                message: message.into(),
            },
        ));
        self.close(conn, CloseReason::policy(close), out);
    }
}
