//! Live fan-out between relays on one PostgreSQL store: PostgreSQL's `LISTEN`/`NOTIFY`.
//!
//! Every commit that advances a space notifies `fieldsync_commit` with the space's id, and
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
use crate::store::postgres::{ACCESS_CHANNEL, COMMIT_CHANNEL, connect, redact};

/// Waits between attempts to reconnect the listening connection.
const RECONNECT: Duration = Duration::from_secs(1);

/// Listens until the front's queue closes (shutdown).
pub(crate) fn listen(url: String, core: mpsc::Sender<CoreInput>) {
    loop {
        match connect(&url).and_then(|mut client| {
            client
                .batch_execute(&format!("LISTEN {COMMIT_CHANNEL}; LISTEN {ACCESS_CHANNEL}"))
                .map_err(crate::store::StoreError::from)?;
            Ok(client)
        }) {
            Ok(mut client) => {
                // Whatever was notified while no one listened: look at everything once.
                let everything = CoreInput::StoreChanged {
                    spaces: None,
                    access: true,
                };
                if core.blocking_send(everything).is_err() {
                    return;
                }
                if let Err(e) = relay_bursts(&mut client, &core) {
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
fn relay_bursts(client: &mut postgres::Client, core: &mpsc::Sender<CoreInput>) -> Result<(), postgres::Error> {
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
        let mut take = |n: postgres::Notification| {
            if n.channel() == ACCESS_CHANNEL {
                access = true;
            } else if let Ok(space) = Uuid::parse_str(n.payload()) {
                spaces.push(space);
            }
        };
        take(first);
        // The rest of the burst, already received: one look for all of it.
        let mut pending = client.notifications();
        let mut more = pending.iter();
        while let Some(n) = more.next()? {
            take(n);
        }
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
        let listener = std::thread::spawn(move || listen(url, tx));
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

        directory.create_user(Uuid::from_u128(3), "dana", 1).unwrap();
        directory
            .set_membership(Uuid::from_u128(3), space, fieldsync_schema::Role::Clinician)
            .unwrap();
        assert_eq!(next(&mut rx), (Some(Vec::new()), true));

        drop(rx);
        listener.join().unwrap();
    }
}
