//! The thread that owns the relay's front. It waits on its two queues — input from the
//! connection tasks (bounded: back-pressure on clients) and reports from the workers
//! (unbounded: a worker never waits for the front, so shutting down can never deadlock on a
//! full queue) — until something arrives or the front's next wakeup, takes everything waiting
//! (up to [`super::MAX_GROUP`] messages), lets the front handle it, hands the jobs it made to
//! the worker threads and routes the outputs to the connection tasks.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldsync_schema::wire::AuthFailure;
use fieldsync_schema::{ClientMessage, Outcome, RelayMessage, SystemTimeSource, TimeSource};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

use super::worker_thread::WorkerPool;
use crate::core::{CloseReason, ConnId, CoreStats, Front, Input, Output, Prechecked, WorkerReport};
use crate::store::{Directory, SpaceStore};

use super::outbound::{OutboundBudget, Unsent};
use super::{APPLY_BACKLOG, MAX_GROUP};

pub(crate) enum CoreInput {
    Open {
        conn: ConnId,
        tx: mpsc::Sender<Outbound>,
        /// Set to cut the connection (a slow reader).
        kill: watch::Sender<bool>,
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
    /// Other relays of the shared store committed or changed access (`server::notify`).
    StoreChanged {
        spaces: Option<Vec<uuid::Uuid>>,
        access: bool,
    },
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

pub(crate) struct Route {
    pub(crate) tx: mpsc::Sender<Outbound>,
    pub(crate) kill: watch::Sender<bool>,
    pub(crate) queued_bytes: Arc<AtomicUsize>,
    /// The authenticated device's user, looked up once for log lines.
    pub(crate) user: Option<uuid::Uuid>,
}

/// Logs the outcome of every mutation in a push result with the device, user and mutation
/// ids: refusals at info (an operator wants to see them), the rest at debug.
fn log_outcomes<D: Directory, S: SpaceStore>(core: &Front<D, S>, route: &mut Route, conn: ConnId, msg: &RelayMessage) {
    let RelayMessage::PushResult { results, .. } = msg else {
        return;
    };
    let device_id = core.connection_device(conn);
    if route.user.is_none()
        && let Some(d) = device_id
    {
        route.user = core.directory().device(d).ok().flatten().map(|row| row.user_id);
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

/// What the core thread keeps besides the core: where each connection's messages go, and the
/// counts `/v1/status` shows.
struct CoreThread<D: Directory, S: SpaceStore> {
    core: Front<D, S>,
    workers: WorkerPool,
    routes: HashMap<ConnId, Route>,
    status: Arc<Mutex<StatusSnapshot>>,
    groups: u64,
    largest: usize,
    slow: u64,
    opened: u64,
    revoked: u64,
}

/// One turn's worth of input.
#[derive(Default)]
struct Turn {
    inputs: Vec<Input>,
    /// Released once the turn is handled: what the core no longer holds frees the budget.
    permits: Vec<OwnedSemaphorePermit>,
    messages: usize,
    reports: Vec<WorkerReport>,
    shutdown: bool,
}

pub(crate) fn run<D: Directory, S: SpaceStore>(
    core: Front<D, S>,
    workers: WorkerPool,
    mut rx: mpsc::Receiver<CoreInput>,
    mut reports: mpsc::UnboundedReceiver<WorkerReport>,
    status: Arc<Mutex<StatusSnapshot>>,
) {
    let clock = SystemTimeSource;
    // Only to wait on the queues with a deadline; the core itself never sees it.
    let Ok(waiter) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
        tracing::error!("cannot start the core thread's timer");
        return;
    };
    let mut thread = CoreThread {
        core,
        workers,
        routes: HashMap::new(),
        status,
        groups: 0,
        largest: 0,
        slow: 0,
        opened: 0,
        revoked: 0,
    };
    loop {
        // Sleep until input or a report arrives or the core's next wakeup, whichever is first.
        let wait = thread
            .core
            .next_wakeup()
            .map(|at| Duration::from_millis(at.saturating_sub(clock.now_ms())));
        // While the workers are behind, only their reports (and the timer) wake the thread.
        let taking_input = thread.workers.backlog() < APPLY_BACKLOG;
        let woke = waiter.block_on(async {
            let timer = async {
                match wait {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                Some(report) = reports.recv() => Wake::Report(report),
                input = rx.recv(), if taking_input => match input {
                    Some(input) => Wake::Input(input),
                    None => Wake::Gone,
                },
                () = timer => Wake::Timer,
            }
        });
        let mut turn = match woke {
            Wake::Gone => return,
            Wake::Timer => Turn::default(),
            Wake::Report(report) => {
                let mut turn = Turn::default();
                turn.reports.push(report);
                thread.collect(&mut turn, None, &mut rx, &mut reports);
                turn
            }
            Wake::Input(input) => {
                let mut turn = Turn::default();
                thread.collect(&mut turn, Some(input), &mut rx, &mut reports);
                turn
            }
        };
        let now = clock.now_ms();
        if thread.core.next_wakeup().is_some_and(|at| now >= at) {
            turn.inputs.push(Input::Tick);
        }
        let outputs = thread.handle(&mut turn, now);
        drop(std::mem::take(&mut turn.permits));
        thread.deliver(outputs, turn.shutdown);
        thread.publish_status();
        if turn.shutdown {
            // The workers finish the groups they are committing; then the front stops.
            thread.workers.stop();
            tracing::info!("relay core stopped");
            return;
        }
    }
}

/// Why the front thread woke up.
enum Wake {
    Report(WorkerReport),
    Input(CoreInput),
    Timer,
    /// Every sender of the input queue is gone.
    Gone,
}

impl<D: Directory, S: SpaceStore> CoreThread<D, S> {
    /// Adds `first` and everything else already waiting to `turn`: every report, and input up
    /// to a group's worth of messages.
    fn collect(
        &mut self,
        turn: &mut Turn,
        first: Option<CoreInput>,
        rx: &mut mpsc::Receiver<CoreInput>,
        reports: &mut mpsc::UnboundedReceiver<WorkerReport>,
    ) {
        while let Ok(report) = reports.try_recv() {
            turn.reports.push(report);
        }
        let taking_input = || self.workers.backlog() < APPLY_BACKLOG;
        let mut next = first.or_else(|| if taking_input() { rx.try_recv().ok() } else { None });
        while let Some(input) = next.take() {
            match input {
                CoreInput::Open {
                    conn,
                    tx,
                    kill,
                    queued_bytes,
                } => {
                    self.opened += 1;
                    self.routes.insert(
                        conn,
                        Route {
                            tx,
                            kill,
                            queued_bytes,
                            user: None,
                        },
                    );
                    turn.inputs.push(Input::Opened(conn));
                }
                CoreInput::Message {
                    conn,
                    msg,
                    checked,
                    permit,
                } => {
                    turn.messages += 1;
                    turn.inputs.push(Input::Message {
                        conn,
                        msg,
                        prechecked: checked,
                    });
                    turn.permits.push(permit);
                }
                CoreInput::Closed(conn) => {
                    self.routes.remove(&conn);
                    turn.inputs.push(Input::Closed(conn));
                }
                CoreInput::StoreChanged { spaces, access } => {
                    turn.inputs.push(Input::StoreChanged { spaces, access });
                }
                CoreInput::Shutdown => turn.shutdown = true,
            }
            if turn.messages < MAX_GROUP && !turn.shutdown {
                next = rx.try_recv().ok();
            }
        }
    }

    /// Hands the turn to the front: first the workers' reports (answers and fan-out of what
    /// they committed), then the new input; sends the jobs on to the workers.
    fn handle(&mut self, turn: &mut Turn, now: u64) -> Vec<Output> {
        let mut outputs = Vec::new();
        let mut jobs = Vec::new();
        for report in std::mem::take(&mut turn.reports) {
            let step = self.core.handle_report(report, now);
            outputs.extend(step.outputs);
            jobs.extend(step.jobs);
        }
        let step = self.core.handle(std::mem::take(&mut turn.inputs), now);
        outputs.extend(step.outputs);
        jobs.extend(step.jobs);
        if turn.messages > 0 {
            self.groups += 1;
            self.largest = self.largest.max(turn.messages);
        }
        self.workers.dispatch(jobs);
        self.revoked += outputs
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
        outputs
    }

    /// Routes the core's outputs to the connection tasks; a connection whose queue is full (in
    /// messages or bytes) is cut as a slow reader.
    fn deliver(&mut self, mut outputs: Vec<Output>, shutdown: bool) {
        if shutdown {
            outputs.extend(self.routes.keys().map(|conn| {
                Output::Close(
                    *conn,
                    CloseReason {
                        code: 1001,
                        reason: "relay shutting down".into(),
                    },
                )
            }));
        }
        let mut gone = Vec::new();
        let mut budget = OutboundBudget::measure(&self.routes);
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
            let Some(route) = self.routes.get_mut(&conn) else {
                continue;
            };
            // Before a session starts (or its key changes), its task learns the device key.
            if let Outbound::Message { msg: m, .. } = &msg
                && matches!(**m, RelayMessage::Welcome { .. } | RelayMessage::KeyRotated)
                && let Some(key) = self.core.session_key(conn)
            {
                let _ = route.tx.try_send(Outbound::Key(key));
            }
            if let Outbound::Message { msg: m, .. } = &msg {
                log_outcomes(&self.core, route, conn, m);
            }
            match budget.enqueue(route, msg) {
                Ok(()) => continue,
                Err(Unsent::Full) => {
                    // A device that does not read its messages is cut off rather than buffered
                    // without limit; it reconnects and pulls from its cursor.
                    tracing::warn!(conn, "send queue full: disconnecting a slow reader");
                    let _ = route.kill.send(true);
                    self.slow += 1;
                }
                Err(Unsent::Closed) => {}
            }
            // Nothing more goes to this connection, in this turn or later.
            self.routes.remove(&conn);
            gone.push(conn);
        }
        if !gone.is_empty() {
            // The core forgets them now; their tasks report `Closed` later, which is harmless.
            let _ = self.core.handle(gone.into_iter().map(Input::Closed), 0);
        }
    }

    fn publish_status(&self) {
        let Ok(mut s) = self.status.lock() else { return };
        let (connections, authenticated) = self.core.connection_counts();
        s.connections = connections;
        s.authenticated = authenticated;
        s.groups = self.groups;
        s.largest_group = self.largest;
        s.slow_reader_disconnects = self.slow;
        s.connections_opened = self.opened;
        s.revoked_disconnects = self.revoked;
        let depths = self.routes.values().map(|r| r.tx.max_capacity() - r.tx.capacity());
        let (total, max) = depths.fold((0, 0), |(t, m), d| (t + d, m.max(d)));
        s.send_queue_messages = total;
        s.send_queue_max = max;
        s.stats = self.core.stats().clone();
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
    use crate::core::{RelayConfig, RelayCore};
    use crate::server::metrics::Metrics;
    use crate::store::sqlite::SqliteBackend;

    #[test]
    fn a_connection_that_does_not_read_is_cut_off_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteBackend::open(dir.path(), uuid::Uuid::nil()).unwrap();
        let (front, workers) = RelayCore::parts(
            &backend,
            Arc::new(Schema::default_schema()),
            RelayConfig::default(),
            Box::new(ChaCha20Rng::seed_from_u64(1)),
        )
        .unwrap();
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let pool = WorkerPool::start(workers, 2, report_tx, Arc::new(Metrics::new())).unwrap();
        let (tx, rx) = mpsc::channel(64);
        let status = Arc::new(Mutex::new(StatusSnapshot::new(uuid::Uuid::nil())));
        let thread_status = status.clone();
        let thread = std::thread::spawn(move || run(front, pool, rx, report_rx, thread_status));
        // A connection whose queue holds one message and which never reads it.
        let (conn_tx, _never_read) = mpsc::channel(1);
        let (kill_tx, mut kill) = watch::channel(false);
        tx.blocking_send(CoreInput::Open {
            conn: 7,
            tx: conn_tx,
            kill: kill_tx,
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
            tokio::time::timeout(Duration::from_secs(5), kill.wait_for(|cut| *cut))
                .await
                .is_ok_and(|r| r.is_ok())
        });
        assert!(killed, "the slow reader was not disconnected");
        tx.blocking_send(CoreInput::Shutdown).unwrap();
        thread.join().unwrap();
        let s = status.lock().unwrap();
        assert_eq!(s.slow_reader_disconnects, 1);
        assert_eq!(s.connections, 0, "the core forgot the connection");
    }
}
