//! The thread that owns the relay core. It blocks on its input queue, takes everything that is
//! waiting (up to [`super::MAX_GROUP`] messages) as one group, lets the core handle and commit
//! it, and routes the outputs to the connection tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fieldsync_schema::wire::AuthFailure;
use fieldsync_schema::{ClientMessage, Outcome, RelayMessage, SystemTimeSource, TimeSource};
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc};

use crate::core::{CloseReason, ConnId, CoreStats, Output, Prechecked, RelayCore};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;

use super::{MAX_GROUP, SEND_QUEUE_BYTES};

pub(crate) enum CoreInput {
    Open {
        conn: ConnId,
        tx: mpsc::Sender<Outbound>,
        kill: Arc<Notify>,
        /// Estimated bytes of the messages waiting in this connection's send queue.
        queued_bytes: Arc<AtomicUsize>,
    },
    /// A decoded message, with its push's signatures already checked on the connection task.
    /// `permit` holds the message's share of the inbound budget until the core has handled it.
    Message {
        conn: ConnId,
        msg: ClientMessage,
        checked: Option<Prechecked>,
        permit: OwnedSemaphorePermit,
    },
    Closed(ConnId),
    Tick,
    Shutdown,
}

/// What a connection task is asked to do.
pub(crate) enum Outbound {
    /// `size` is the message's [`RelayMessage::size_hint`], already counted in the
    /// connection's queued bytes; the task subtracts it once the frame is written.
    Message {
        msg: Box<RelayMessage>,
        size: usize,
    },
    /// The session's device key, so the connection task can check signatures itself.
    Key([u8; 32]),
    Close(CloseReason),
}

/// What `/v1/status` shows; refreshed after every group.
#[derive(Debug, Clone, Serialize)]
pub struct StatusSnapshot {
    pub relay_id: uuid::Uuid,
    pub connections: usize,
    pub authenticated: usize,
    pub groups: u64,
    pub largest_group: usize,
    pub slow_reader_disconnects: u64,
    /// WebSocket connections accepted since start.
    pub connections_opened: u64,
    /// Open connections closed because their device was revoked.
    pub revoked_disconnects: u64,
    /// Messages waiting in all per-connection send queues, and in the fullest one.
    pub send_queue_messages: usize,
    pub send_queue_max: usize,
    pub stats: CoreStats,
}

impl StatusSnapshot {
    pub fn new(relay_id: uuid::Uuid) -> Self {
        StatusSnapshot {
            relay_id,
            connections: 0,
            authenticated: 0,
            groups: 0,
            largest_group: 0,
            slow_reader_disconnects: 0,
            connections_opened: 0,
            revoked_disconnects: 0,
            send_queue_messages: 0,
            send_queue_max: 0,
            stats: CoreStats::default(),
        }
    }
}

struct Route {
    tx: mpsc::Sender<Outbound>,
    kill: Arc<Notify>,
    queued_bytes: Arc<AtomicUsize>,
    /// The authenticated device's user, looked up once for log lines.
    user: Option<uuid::Uuid>,
}

/// Logs the outcome of every mutation in a push result with the device, user and mutation
/// ids: refusals at info (an operator wants to see them), the rest at debug.
fn log_outcomes(core: &RelayCore<SqliteStore>, route: &mut Route, conn: ConnId, msg: &RelayMessage) {
    let RelayMessage::PushResult { results, .. } = msg else {
        return;
    };
    let device_id = core.connection_device(conn);
    if route.user.is_none()
        && let Some(d) = device_id
    {
        route.user = core.store().device(d).ok().flatten().map(|row| row.user_id);
    }
    let device = device_id.map(|d| d.to_string()).unwrap_or_default();
    let user = route.user.map(|u| u.to_string()).unwrap_or_default();
    for r in results {
        let outcome = r.outcome.name();
        match r.outcome {
            Outcome::Applied { .. } | Outcome::AlreadyApplied { .. } | Outcome::NotAttempted => tracing::debug!(
                conn, device_id = %device, user_id = %user, mutation_id = %r.mutation_id, outcome,
                "mutation answered"
            ),
            _ => tracing::info!(
                conn, device_id = %device, user_id = %user, mutation_id = %r.mutation_id, outcome,
                "mutation refused"
            ),
        }
    }
}

pub(crate) fn run(
    mut core: RelayCore<SqliteStore>,
    mut rx: mpsc::Receiver<CoreInput>,
    status: Arc<Mutex<StatusSnapshot>>,
    metrics: Arc<Metrics>,
) {
    let clock = SystemTimeSource;
    let mut routes: HashMap<ConnId, Route> = HashMap::new();
    let mut groups = 0u64;
    let mut largest = 0usize;
    let mut slow = 0u64;
    let mut opened = 0u64;
    let mut revoked = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let mut inputs = Vec::new();
        // Released when this group is handled: what the core no longer holds frees the budget.
        let mut permits = Vec::new();
        let mut tick = false;
        let mut shutdown = false;
        let mut next = Some(first);
        while let Some(input) = next.take() {
            match input {
                CoreInput::Open {
                    conn,
                    tx,
                    kill,
                    queued_bytes,
                } => {
                    core.open_connection(conn);
                    opened += 1;
                    routes.insert(
                        conn,
                        Route {
                            tx,
                            kill,
                            queued_bytes,
                            user: None,
                        },
                    );
                }
                CoreInput::Message {
                    conn,
                    msg,
                    checked,
                    permit,
                } => {
                    inputs.push((conn, msg, checked));
                    permits.push(permit);
                }
                CoreInput::Closed(conn) => {
                    core.close_connection(conn);
                    routes.remove(&conn);
                }
                CoreInput::Tick => tick = true,
                CoreInput::Shutdown => shutdown = true,
            }
            if inputs.len() < MAX_GROUP && !shutdown {
                next = rx.try_recv().ok();
            }
        }
        let now = clock.now_ms();
        largest = largest.max(inputs.len());
        let pushed: usize = inputs
            .iter()
            .map(|(_, m, _)| match m {
                ClientMessage::Push { mutations, .. } => mutations.len(),
                _ => 0,
            })
            .sum();
        let mut outputs = if inputs.is_empty() {
            Vec::new()
        } else {
            let started = Instant::now();
            let out = core.handle_checked(inputs, now);
            record_timings(
                &metrics,
                started.elapsed(),
                core.store_mut().take_commit_times(),
                pushed,
            );
            out
        };
        if tick {
            let ticked = core.tick(now);
            revoked += ticked
                .iter()
                .filter(|o| {
                    matches!(
                        o,
                        Output::Send(
                            _,
                            RelayMessage::AuthFailed {
                                reason: AuthFailure::Revoked,
                                ..
                            }
                        )
                    )
                })
                .count() as u64;
            outputs.extend(ticked);
        }
        if shutdown {
            for conn in routes.keys() {
                outputs.push(Output::Close(
                    *conn,
                    CloseReason {
                        code: 1001,
                        reason: "relay shutting down".into(),
                    },
                ));
            }
        }
        drop(permits);
        for output in outputs {
            let (conn, msg) = match output {
                Output::Send(conn, msg) => {
                    let size = msg.size_hint();
                    (
                        conn,
                        Outbound::Message {
                            msg: Box::new(msg),
                            size,
                        },
                    )
                }
                Output::Close(conn, reason) => (conn, Outbound::Close(reason)),
            };
            let Some(route) = routes.get_mut(&conn) else { continue };
            // Before a session starts (or its key changes), its task learns the device key.
            if let Outbound::Message { msg: m, .. } = &msg
                && matches!(**m, RelayMessage::Welcome { .. } | RelayMessage::KeyRotated)
                && let Some(key) = core.session_key(conn)
            {
                let _ = route.tx.try_send(Outbound::Key(key));
            }
            let mut over_budget = false;
            if let Outbound::Message { msg: m, size } = &msg {
                log_outcomes(&core, route, conn, m);
                // Bytes, not only messages, are bounded: one message can be megabytes.
                let queued = route.queued_bytes.fetch_add(*size, Ordering::Relaxed) + size;
                over_budget = queued > SEND_QUEUE_BYTES;
            }
            let sent = if over_budget {
                if let Outbound::Message { size, .. } = &msg {
                    route.queued_bytes.fetch_sub(*size, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(msg))
            } else {
                route.tx.try_send(msg)
            };
            match sent {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(unsent)) => {
                    if let Outbound::Message { size, .. } = &unsent
                        && !over_budget
                    {
                        route.queued_bytes.fetch_sub(*size, Ordering::Relaxed);
                    }
                    // A device that does not read its messages is cut off rather than buffered
                    // without limit; it reconnects and pulls from its cursor.
                    tracing::warn!(conn, "send queue full: disconnecting a slow reader");
                    route.kill.notify_one();
                    core.close_connection(conn);
                    routes.remove(&conn);
                    slow += 1;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    core.close_connection(conn);
                    routes.remove(&conn);
                }
            }
        }
        groups += 1;
        if let Ok(mut s) = status.lock() {
            let (connections, authenticated) = core.connection_counts();
            s.connections = connections;
            s.authenticated = authenticated;
            s.groups = groups;
            s.largest_group = largest;
            s.slow_reader_disconnects = slow;
            s.connections_opened = opened;
            s.revoked_disconnects = revoked;
            let depths = routes.values().map(|r| r.tx.max_capacity() - r.tx.capacity());
            let (total, max) = depths.fold((0, 0), |(t, m), d| (t + d, m.max(d)));
            s.send_queue_messages = total;
            s.send_queue_max = max;
            s.stats = core.stats().clone();
        }
        if shutdown {
            tracing::info!("relay core stopped");
            return;
        }
    }
}

/// Group time, commit time, and the per-mutation acceptance time derived from them.
fn record_timings(metrics: &Metrics, group: std::time::Duration, commits: Vec<std::time::Duration>, pushed: usize) {
    let Ok(mut t) = metrics.timings.lock() else { return };
    t.group.observe(group);
    let mut committing = std::time::Duration::ZERO;
    for c in commits {
        committing += c;
        t.commit.observe(c);
    }
    if pushed > 0 {
        let per = group.saturating_sub(committing).as_secs_f64() / pushed as f64;
        t.apply.observe_n(per, pushed as u64);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use fieldsync_schema::Schema;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::core::RelayConfig;

    #[test]
    fn a_connection_that_does_not_read_is_cut_off_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_dir(dir.path(), uuid::Uuid::nil()).unwrap();
        let core = RelayCore::new(
            store,
            Arc::new(Schema::default_schema()),
            RelayConfig::default(),
            Box::new(ChaCha20Rng::seed_from_u64(1)),
        );
        let (tx, rx) = mpsc::channel(64);
        let status = Arc::new(Mutex::new(StatusSnapshot::new(uuid::Uuid::nil())));
        let thread_status = status.clone();
        let thread = std::thread::spawn(move || run(core, rx, thread_status, Arc::new(Metrics::new())));
        // A connection whose queue holds one message and which never reads it.
        let (conn_tx, _never_read) = mpsc::channel(1);
        let kill = Arc::new(Notify::new());
        tx.blocking_send(CoreInput::Open {
            conn: 7,
            tx: conn_tx,
            kill: kill.clone(),
            queued_bytes: Arc::new(AtomicUsize::new(0)),
        })
        .unwrap();
        let budget = Arc::new(tokio::sync::Semaphore::new(1024));
        for nonce in 0..3 {
            tx.blocking_send(CoreInput::Message {
                conn: 7,
                msg: ClientMessage::Ping { nonce },
                checked: None,
                permit: budget.clone().try_acquire_many_owned(1).unwrap(),
            })
            .unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let killed = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), kill.notified())
                .await
                .is_ok()
        });
        assert!(killed, "the slow reader was not disconnected");
        tx.blocking_send(CoreInput::Shutdown).unwrap();
        thread.join().unwrap();
        let s = status.lock().unwrap();
        assert_eq!(s.slow_reader_disconnects, 1);
        assert_eq!(s.connections, 0, "the core forgot the connection");
    }
}
