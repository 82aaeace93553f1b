//! Live fan-out between relays on one PostgreSQL store: PostgreSQL's `LISTEN`/`NOTIFY`.
//!
//! Every commit that advances a space notifies `fieldsync_commit` with the space's id (and the
//! database's clock at the notifying statement, for `fieldsync_notification_lag_seconds`), and
//! every access change (membership, revocation) `fieldsync_access` (in the writing
//! transaction, so a notification means a committed change). This thread listens on a
//! connection of its own and hands each burst to the front as one `StoreChanged`, which reads
//! the rows other relays committed and fans them out at once, instead of at the next tick.
//! After (re)connecting it asks for a look at everything: notifications sent while it was away
//! are lost, the feed is not. The one-second tick stays the safety net either way.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::core_thread::CoreInput;
use super::metrics::{Metrics, StoreMetrics};
use crate::store::postgres::{ACCESS_CHANNEL, COMMIT_CHANNEL, connect, redact};

/// Waits between attempts to reconnect the listening connection.
const RECONNECT: Duration = Duration::from_secs(1);

/// Listens until the front's queue closes (shutdown).
pub(crate) fn listen(url: String, core: mpsc::Sender<CoreInput>, metrics: &Metrics) {
    loop {
        match connect(&url).and_then(|mut client| {
            client
                .batch_execute(&format!("LISTEN {COMMIT_CHANNEL}; LISTEN {ACCESS_CHANNEL}"))
                .map_err(crate::store::StoreError::from)?;
            Ok(client)
        }) {
            Ok(mut client) => {
                StoreMetrics::add(&metrics.store.listener_connects, 1);
                // Whatever was notified while no one listened: look at everything once.
                let everything = CoreInput::StoreChanged {
                    spaces: None,
                    access: true,
                };
                if core.blocking_send(everything).is_err() {
                    return;
                }
                if let Err(e) = relay_bursts(&mut client, &core, metrics) {
                    tracing::warn!(error = %e, "lost the PostgreSQL notification connection; reconnecting");
                }
                if core.is_closed() {
                    return;
                }
            }
            Err(e) => tracing::warn!(store = %redact(&url), error = %e, "cannot listen for other relays' commits"),
        }
        if core.is_closed() {
            return;
        }
        std::thread::sleep(RECONNECT);
    }
}

/// Hands notifications to the front, a burst at a time, until the connection fails (an
/// error) or the front is gone (`Ok`).
fn relay_bursts(
    client: &mut postgres::Client,
    core: &mpsc::Sender<CoreInput>,
    metrics: &Metrics,
) -> Result<(), postgres::Error> {
    loop {
        // Wake at least every second to notice a shutdown.
        let first = client.notifications().timeout_iter(Duration::from_secs(1)).next()?;
        let Some(first) = first else {
            if core.is_closed() {
                return Ok(());
            }
            continue;
        };
        let mut spaces = Vec::new();
        let mut access = false;
        let mut lags = Vec::new();
        let mut take = |n: postgres::Notification| {
            if n.channel() == ACCESS_CHANNEL {
                access = true;
            } else if let Some((space, sent_ms)) = commit_payload(n.payload()) {
                spaces.push(space);
                if let Some(sent_ms) = sent_ms {
                    lags.push(sent_ms);
                }
            }
        };
        take(first);
        // The rest of the burst, already received: one look for all of it.
        let mut pending = client.notifications();
        let mut more = pending.iter();
        while let Some(n) = more.next()? {
            take(n);
        }
        record(metrics, (spaces.len() + usize::from(access)) as u64, &lags);
        spaces.sort_unstable();
        spaces.dedup();
        if core
            .blocking_send(CoreInput::StoreChanged {
                spaces: Some(spaces),
                access,
            })
            .is_err()
        {
            return Ok(());
        }
    }
}

/// A commit notification's space, and when it was sent (Unix ms; absent from a relay of the
/// version before it was added, which may share the store during a rolling upgrade).
fn commit_payload(payload: &str) -> Option<(Uuid, Option<u64>)> {
    let mut parts = payload.split(' ');
    let space = Uuid::parse_str(parts.next()?).ok()?;
    Some((space, parts.next().and_then(|ms| ms.parse().ok())))
}

fn record(metrics: &Metrics, notifications: u64, sent_ms: &[u64]) {
    StoreMetrics::add(&metrics.store.notifications, notifications);
    if sent_ms.is_empty() {
        return;
    }
    let now = fieldsync_schema::TimeSource::now_ms(&fieldsync_schema::SystemTimeSource);
    if let Ok(mut lag) = metrics.store.notification_lag.lock() {
        for sent in sent_ms {
            lag.observe(Duration::from_millis(now.saturating_sub(*sent)));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::store::postgres::PgBackend;
    use crate::store::postgres::throwaway::Throwaway;
    use crate::store::{Backend, Directory, SpaceHead, SpaceStore};

    fn next(rx: &mut mpsc::Receiver<CoreInput>) -> (Option<Vec<Uuid>>, bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match rx.try_recv() {
                Ok(CoreInput::StoreChanged { spaces, access }) => return (spaces, access),
                Ok(_) => panic!("not a store change"),
                Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("no notification: {e}"),
            }
        }
    }

    #[test]
    fn commits_and_access_changes_of_other_relays_reach_the_front_and_nothing_else_does() {
        let Some(server) = Throwaway::start_or_skip("notify") else {
            return;
        };
        let url = server.database("relay");
        let backend = PgBackend::open(&url, Uuid::from_u128(1), 1).unwrap();
        let mut directory = backend.open_directory().unwrap();
        let space = directory
            .create_space(Uuid::from_u128(2), "clinic", 1)
            .unwrap()
            .space_id;
        let (tx, mut rx) = mpsc::channel(16);
        let metrics = std::sync::Arc::new(Metrics::new());
        let _ = metrics.store.kind.set("postgres");
        let listening = metrics.clone();
        let listener = std::thread::spawn(move || listen(url, tx, &listening));
        assert_eq!(next(&mut rx), (None, true), "first, a look at everything");

        // A transaction that rolls back notifies nobody; one that commits, with its space.
        let mut shard = backend.open_shard(0).unwrap();
        let head = SpaceHead {
            seq: 1,
            audit_seq: 1,
            audit_hash: "h".into(),
        };
        shard.begin().unwrap();
        shard.set_space_head(space, &head).unwrap();
        shard.rollback().unwrap();
        shard.begin().unwrap();
        shard.set_space_head(space, &head).unwrap();
        shard.commit().unwrap();
        assert_eq!(next(&mut rx), (Some(vec![space]), false));
        let lag = metrics.store.notification_lag.lock().unwrap().count();
        assert_eq!(lag, 1, "the commit's notification carried its sending time");

        directory.create_user(Uuid::from_u128(3), "dana", 1).unwrap();
        directory
            .set_membership(Uuid::from_u128(3), space, fieldsync_schema::Role::Clinician)
            .unwrap();
        assert_eq!(next(&mut rx), (Some(Vec::new()), true));

        drop(rx);
        listener.join().unwrap();
        let text =
            super::super::metrics::render(&super::super::core_thread::StatusSnapshot::new(Uuid::nil()), &metrics);
        assert!(text.contains("fieldsync_notifications_total 2"), "{text}");
        assert!(text.contains("fieldsync_notification_connects_total 1"), "{text}");
    }

    #[test]
    fn a_commit_payload_names_its_space_with_or_without_its_sending_time() {
        let space = Uuid::from_u128(9);
        assert_eq!(
            commit_payload(&format!("{space} 1700000000123")),
            Some((space, Some(1_700_000_000_123)))
        );
        assert_eq!(
            commit_payload(&space.to_string()),
            Some((space, None)),
            "a relay of the version before"
        );
        assert_eq!(commit_payload("not-a-space 12"), None);
    }
}
