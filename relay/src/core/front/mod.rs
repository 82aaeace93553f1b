//! The front: connections and sessions, handshakes, enrollment and key rotation, pulls, live
//! fan-out and the periodic tick. It decides nothing about a mutation; it routes each push
//! batch — cut to one space — to the worker of that space's shard as a [`Job`], with what it
//! knows of the sender, and answers when the worker's report comes back.
//!
//! One turn ([`Front::handle`]) is one directory transaction (enrollments, key rotations): its
//! replies are released only after it commits.

mod fanout;
mod fetch;
mod housekeeping;
mod pull;
mod session;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fieldsync_schema::wire::{ErrorCode, MutationResult};
use fieldsync_schema::{ClientMessage, Mutation, Outcome, PullCursor, RelayMessage, Role, Schema};
use rand_core::Rng;
use uuid::Uuid;

pub use session::token_hash;

use super::worker::checks::sender_refusal;
use super::worker::{Job, JobResult, Sender, WorkerReport};
use super::{CloseReason, ConnId, CoreStats, Input, Output, Prechecked, RelayConfig};
use crate::store::{Directory, SpaceStore, StoreError};

pub(crate) enum ConnState {
    /// Connected; waiting for `Hello` or `Enroll`.
    Fresh,
    /// A challenge was sent; waiting for `Auth`.
    Challenged {
        device_id: Uuid,
        nonce: Vec<u8>,
        issued_ms: u64,
        /// The types the device said it holds (`None`: all).
        types: Option<BTreeSet<String>>,
        /// The device syncs by windows.
        windowed: bool,
        /// Delivery order and link (see [`Session::priority_order`], [`Session::metered`]).
        priority_order: bool,
        metered: bool,
    },
    Ready(Box<Session>),
    /// The device proved its key but was revoked with a wipe: it was told to erase its data,
    /// and only its `Wiped` report is taken.
    Wiping {
        device_id: Uuid,
    },
    /// A close was requested; further input is ignored.
    Closing,
}

/// An authenticated device session.
pub(crate) struct Session {
    pub device_id: Uuid,
    pub user_id: Uuid,
    pub public_key: Vec<u8>,
    /// The key, parsed once for the session (parsing costs as much as a verification).
    pub verifier: fieldsync_schema::signing::Verifier,
    pub spaces: BTreeMap<Uuid, Role>,
    /// The revoked device this one took over from (its changes arrive from this one).
    pub replaces: Option<Uuid>,
    /// The entity types the device holds (selective sync; `None`: all): pull pages and live
    /// delivery carry nothing of another type.
    pub types: Option<BTreeSet<String>>,
    /// The device syncs by windows (SPEC §16): a space's first download leaves out records
    /// dated outside their type's window; the device fetches what it needs of them.
    pub windowed: bool,
    /// The device takes a snapshot's reference data (`priority = "low"`) after every other
    /// type: two walks over the documents.
    pub priority_order: bool,
    /// The device is on a metered link: nothing of a low-priority type, in pages or live.
    pub metered: bool,
    /// Set once the device caught up: for each space, the position after which live entries
    /// are pushed to it.
    pub live: Option<BTreeMap<Uuid, u64>>,
    pub tokens: f64,
    pub tokens_at_ms: u64,
    /// When the device's last-seen time was last written (sign-in, then every
    /// [`housekeeping::LAST_SEEN_EVERY_MS`] while connected).
    pub seen_recorded_ms: u64,
}

impl Session {
    /// Token bucket: refills at `rate` per second up to `burst`; takes `n` or refuses.
    fn take_tokens(&mut self, n: f64, now_ms: u64, rate: f64, burst: f64) -> Result<(), u64> {
        let elapsed = now_ms.saturating_sub(self.tokens_at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.tokens_at_ms = now_ms;
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            let missing = n - self.tokens;
            Err(((missing / rate) * 1000.0).ceil() as u64)
        }
    }
}

/// What one call of the front produced: messages to send, and jobs for the workers (by
/// shard), to be handed over in this order.
#[derive(Debug, Default)]
pub struct FrontStep {
    pub outputs: Vec<Output>,
    pub jobs: Vec<(u32, Job)>,
}

/// Work for the end of a turn.
#[derive(Default)]
pub(crate) struct Turn {
    in_tx: bool,
    /// Replies whose release waits for the directory commit (enrollment, key rotation).
    pub(crate) replies: Vec<(ConnId, RelayMessage)>,
    /// Connections to close after the replies (enrollment completed).
    pub(crate) closes: Vec<(ConnId, CloseReason)>,
    pulls: Vec<(ConnId, PullCursor, u32)>,
    fetches: Vec<(ConnId, Vec<Uuid>)>,
}

pub struct Front<D: Directory, R: SpaceStore> {
    pub(crate) directory: D,
    /// A read handle on every shard (pull pages, other writers' rows).
    pub(crate) readers: Vec<R>,
    pub(crate) schema: Arc<Schema>,
    pub(crate) config: RelayConfig,
    pub(crate) relay_id: Uuid,
    pub(crate) conns: BTreeMap<ConnId, ConnState>,
    pub(crate) rng: Box<dyn Rng + Send>,
    pub(crate) stats: CoreStats,
    /// What the periodic tick last saw (see `housekeeping`).
    housekeeping: housekeeping::TickState,
    /// Each space's shard, as the directory says (spaces never move).
    shard_of: BTreeMap<Uuid, u32>,
    /// Jobs sent to workers and not yet reported, by (connection, batch), with their space.
    in_flight: BTreeMap<(ConnId, u64), Uuid>,
    /// How far each space's feed has been fanned out (see `fanout`).
    fanned: BTreeMap<Uuid, u64>,
    /// A deliberate defect for the simulator ([`crate::core::FaultSwitches`]).
    pub(crate) ignore_other_relays: bool,
}

impl<D: Directory, R: SpaceStore> Front<D, R> {
    pub fn new(
        directory: D,
        readers: Vec<R>,
        schema: Arc<Schema>,
        config: RelayConfig,
        rng: Box<dyn Rng + Send>,
    ) -> Self {
        let relay_id = directory.relay_id();
        Front {
            directory,
            readers,
            schema,
            config,
            relay_id,
            conns: BTreeMap::new(),
            rng,
            stats: CoreStats::default(),
            housekeeping: housekeeping::TickState::default(),
            shard_of: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            fanned: BTreeMap::new(),
            ignore_other_relays: false,
        }
    }

    pub fn relay_id(&self) -> Uuid {
        self.relay_id
    }

    pub fn directory(&self) -> &D {
        &self.directory
    }

    pub fn directory_mut(&mut self) -> &mut D {
        &mut self.directory
    }

    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    /// Every counter so far, the workers' included (they come with their reports).
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// Number of open connections, and of those authenticated.
    pub fn connection_counts(&self) -> (usize, usize) {
        let ready = self.conns.values().filter(|c| matches!(c, ConnState::Ready(_))).count();
        (self.conns.len(), ready)
    }

    /// The public key of an authenticated connection's device (to check signatures elsewhere).
    pub fn session_key(&self, conn: ConnId) -> Option<[u8; 32]> {
        match self.conns.get(&conn) {
            Some(ConnState::Ready(s)) => Some(s.verifier.public_key()),
            _ => None,
        }
    }

    /// The device behind an authenticated connection.
    pub fn connection_device(&self, conn: ConnId) -> Option<Uuid> {
        match self.conns.get(&conn) {
            Some(ConnState::Ready(s)) => Some(s.device_id),
            _ => None,
        }
    }

    /// Takes what happened since the last call, in order: connections open and close at once,
    /// messages are handled in order within one directory transaction, a `Tick` runs last.
    pub fn handle(&mut self, inputs: impl IntoIterator<Item = Input>, now_ms: u64) -> FrontStep {
        let mut step = FrontStep::default();
        let mut turn = Turn::default();
        let mut tick = false;
        let mut outside = OutsideWrites {
            spaces: Some(std::collections::BTreeSet::new()),
            ..OutsideWrites::default()
        };
        for input in inputs {
            match input {
                Input::Opened(conn) => {
                    self.conns.insert(conn, ConnState::Fresh);
                }
                Input::Closed(conn) => {
                    self.conns.remove(&conn);
                }
                Input::Message { conn, msg, prechecked } => {
                    if matches!(self.conns.get(&conn), None | Some(ConnState::Closing)) {
                        continue;
                    }
                    if let Err(e) = self.dispatch(conn, msg, prechecked, now_ms, &mut turn, &mut step) {
                        tracing::error!(error = %e, "directory failure while handling a message");
                        self.abort_turn(&mut turn, &mut step);
                        turn = Turn::default();
                        // The message that failed gets its answer too, not silence until the
                        // idle timeout.
                        step.outputs.push(Output::Send(conn, storage_error(&e)));
                    }
                }
                Input::Tick => tick = true,
                Input::StoreChanged { spaces, access } => {
                    outside.access |= access;
                    match (&mut outside.spaces, spaces) {
                        (Some(all), Some(more)) => all.extend(more),
                        (all, None) => *all = None,
                        (None, Some(_)) => {}
                    }
                    outside.any = true;
                }
            }
        }
        self.finish_turn(turn, now_ms, &mut step);
        if tick {
            self.tick(now_ms, &mut step.outputs);
        } else if outside.any {
            self.look_outside(now_ms, outside.access, outside.spaces.as_ref(), &mut step.outputs);
        }
        step
    }

    /// A worker's report: each batch's answer, then the live fan-out of what it committed.
    pub fn handle_report(&mut self, report: WorkerReport, _now_ms: u64) -> FrontStep {
        let mut step = FrontStep::default();
        self.stats.absorb(&report.stats);
        for result in report.results {
            let (conn, msg) = match result {
                JobResult::Decided {
                    conn,
                    batch_id,
                    results,
                } => {
                    self.in_flight.remove(&(conn, batch_id));
                    (conn, RelayMessage::PushResult { batch_id, results })
                }
                JobResult::Deferred {
                    conn,
                    batch_id,
                    retry_after_ms,
                    reason,
                } => {
                    self.in_flight.remove(&(conn, batch_id));
                    (
                        conn,
                        RelayMessage::PushDeferred {
                            batch_id,
                            retry_after_ms,
                            reason,
                        },
                    )
                }
            };
            if matches!(self.conns.get(&conn), Some(ConnState::Ready(_))) {
                step.outputs.push(Output::Send(conn, msg));
            }
        }
        self.fan_out_committed(report.applied, &mut step.outputs);
        step
    }

    /// When the front next wants an [`Input::Tick`]: while any connection is open, every
    /// `RelayConfig::tick_every_ms` (revocations and memberships written by other processes,
    /// other writers' feed rows), and when the earliest unanswered challenge expires. `None`:
    /// nothing to do until an input arrives.
    pub fn next_wakeup(&self) -> Option<u64> {
        if self.conns.is_empty() {
            return None;
        }
        let polling = self
            .housekeeping
            .last_tick_ms()
            .saturating_add(self.config.tick_every_ms);
        let expiry = self.conns.values().filter_map(|c| match c {
            ConnState::Challenged { issued_ms, .. } => Some(issued_ms.saturating_add(self.config.nonce_ttl_ms + 1)),
            _ => None,
        });
        expiry.chain(std::iter::once(polling)).min()
    }

    fn dispatch(
        &mut self,
        conn: ConnId,
        msg: ClientMessage,
        prechecked: Option<Prechecked>,
        now_ms: u64,
        turn: &mut Turn,
        step: &mut FrontStep,
    ) -> Result<(), StoreError> {
        let out = &mut step.outputs;
        match msg {
            ClientMessage::Hello {
                protocol_version,
                device_id,
                schema_hash,
                schema_version,
                types,
                windowed,
                priority,
                metered,
                ..
            } => self.on_hello(
                conn,
                session::HelloRequest {
                    protocol_version,
                    device_id,
                    schema: (schema_hash, schema_version),
                    types: types.map(|t| t.into_iter().collect()),
                    windowed,
                    priority_order: priority,
                    metered,
                },
                now_ms,
                out,
            ),
            ClientMessage::Auth { signature } => self.on_auth(conn, &signature.0, now_ms, out),
            ClientMessage::Enroll {
                protocol_version,
                token,
                device_id,
                public_key,
                schema_hash,
                schema_version,
                proof,
                replaces,
            } => {
                self.ensure_tx(turn)?;
                let request = session::EnrollRequest {
                    protocol_version,
                    token: &token,
                    device_id,
                    public_key: &public_key.0,
                    schema: (schema_hash, schema_version),
                    proof: &proof.0,
                    replaces: replaces.as_deref(),
                };
                self.on_enroll(conn, request, now_ms, turn, out)
            }
            ClientMessage::RotateKey {
                new_public_key,
                signature,
            } => {
                self.ensure_tx(turn)?;
                self.on_rotate_key(conn, &new_public_key.0, &signature.0, turn, out)
            }
            ClientMessage::Ping { nonce } => {
                out.push(Output::Send(conn, RelayMessage::Pong { nonce }));
                Ok(())
            }
            ClientMessage::Wiped { discarded } => {
                if !matches!(self.conns.get(&conn), Some(ConnState::Wiping { .. })) {
                    self.protocol_close(conn, "wiped without a wipe", out);
                    return Ok(());
                }
                self.ensure_tx(turn)?;
                self.on_wiped(conn, discarded, now_ms, turn)
            }
            ClientMessage::Push { batch_id, mutations } => {
                self.on_push(conn, batch_id, mutations, prechecked, now_ms, step);
                Ok(())
            }
            ClientMessage::Pull { cursor, max_entries } => {
                if !matches!(self.conns.get(&conn), Some(ConnState::Ready(_))) {
                    self.protocol_close(conn, "pull before authentication", out);
                    return Ok(());
                }
                turn.pulls.push((conn, cursor, max_entries));
                Ok(())
            }
            ClientMessage::Fetch { ids } => {
                if !matches!(self.conns.get(&conn), Some(ConnState::Ready(_))) {
                    self.protocol_close(conn, "fetch before authentication", out);
                    return Ok(());
                }
                turn.fetches.push((conn, ids));
                Ok(())
            }
        }
    }

    /// A push: checked for the session, the limits and the rate here; cut to its first space
    /// (batches never mix spaces: what follows a space change is not attempted); then the
    /// space's worker decides it.
    fn on_push(
        &mut self,
        conn: ConnId,
        batch_id: u64,
        mutations: Vec<Mutation>,
        prechecked: Option<Prechecked>,
        now_ms: u64,
        step: &mut FrontStep,
    ) {
        let out = &mut step.outputs;
        if !matches!(self.conns.get(&conn), Some(ConnState::Ready(_))) {
            self.protocol_close(conn, "push before authentication", out);
            return;
        }
        if mutations.len() > self.config.max_batch {
            let reason = format!(
                "batch of {} mutations exceeds the limit of {}",
                mutations.len(),
                self.config.max_batch
            );
            out.push(Output::Send(
                conn,
                RelayMessage::Error {
                    code: ErrorCode::LimitExceeded,
                    message: reason.clone(),
                },
            ));
            self.close(conn, CloseReason::policy(&reason), out);
            return;
        }
        let Some(first_space) = mutations.first().map(|m| m.space_id) else {
            out.push(Output::Send(
                conn,
                RelayMessage::PushResult {
                    batch_id,
                    results: Vec::new(),
                },
            ));
            return;
        };
        let (rate, burst) = (self.config.rate_per_sec, self.config.rate_burst);
        let Some(ConnState::Ready(s)) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Err(wait_ms) = s.take_tokens(mutations.len() as f64, now_ms, rate, burst) {
            out.push(Output::Send(
                conn,
                RelayMessage::PushDeferred {
                    batch_id,
                    retry_after_ms: wait_ms.max(50),
                    reason: "rate limit: too many mutations from this device".into(),
                },
            ));
            return;
        }
        let sender = Sender {
            device_id: s.device_id,
            user_id: s.user_id,
            space_id: first_space,
            role: s.spaces.get(&first_space).copied(),
            verifier: s.verifier.clone(),
            replaces: s.replaces,
        };
        let cut = mutations
            .iter()
            .position(|m| m.space_id != first_space)
            .unwrap_or(mutations.len());
        let mut mutations = mutations;
        let rest: Vec<Uuid> = mutations.drain(cut..).map(|m| m.mutation_id).collect();
        let shard = match sender.role {
            Some(_) => self.shard(first_space),
            None => None,
        };
        let Some(shard) = shard else {
            // Not a member (or no such space): nothing of the space is read, nothing stored.
            // The sender and signature checks still come first (SPEC §10's order).
            let first = &mutations[0];
            let checked = prechecked.as_ref().and_then(|p| Some((p.key, *p.valid.first()?)));
            let outcome = sender_refusal(&sender, first, checked).unwrap_or(Outcome::Forbidden {
                reason: "the user is not a member of this space".into(),
            });
            let mut results = vec![MutationResult {
                mutation_id: first.mutation_id,
                outcome,
            }];
            results.extend(
                mutations[1..]
                    .iter()
                    .map(|m| m.mutation_id)
                    .chain(rest)
                    .map(|mutation_id| MutationResult {
                        mutation_id,
                        outcome: Outcome::NotAttempted,
                    }),
            );
            out.push(Output::Send(conn, RelayMessage::PushResult { batch_id, results }));
            return;
        };
        let prechecked = prechecked.map(|mut p| {
            p.valid.truncate(cut);
            p
        });
        self.in_flight.insert((conn, batch_id), first_space);
        step.jobs.push((
            shard,
            Job {
                conn,
                batch_id,
                sender,
                mutations,
                prechecked,
                not_attempted: rest,
            },
        ));
    }

    /// The shard of a space, from the directory the first time.
    pub(crate) fn shard(&mut self, space: Uuid) -> Option<u32> {
        if let Some(s) = self.shard_of.get(&space) {
            return Some(*s);
        }
        match self.directory.space(space) {
            Ok(Some(row)) => {
                self.shard_of.insert(space, row.shard);
                Some(row.shard)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read a space's shard");
                None
            }
        }
    }

    /// Whether a job of `space` is with a worker (its rows will come with the report).
    pub(crate) fn busy(&self, space: Uuid) -> bool {
        self.in_flight.values().any(|s| *s == space)
    }

    fn ensure_tx(&mut self, turn: &mut Turn) -> Result<(), StoreError> {
        if !turn.in_tx {
            self.directory.begin()?;
            turn.in_tx = true;
        }
        Ok(())
    }

    /// A directory failure mid-turn: roll back and tell whoever waited that nothing changed.
    fn abort_turn(&mut self, turn: &mut Turn, step: &mut FrontStep) {
        self.stats.commit_failures += 1;
        if let Err(e) = self.directory.rollback() {
            tracing::error!(error = %e, "rollback failed");
        }
        for (conn, _) in turn.replies.drain(..) {
            step.outputs.push(Output::Send(
                conn,
                RelayMessage::Error {
                    code: ErrorCode::Internal,
                    message: "relay storage error; nothing was changed, try again".into(),
                },
            ));
        }
        turn.closes.clear();
    }

    fn finish_turn(&mut self, mut turn: Turn, now_ms: u64, step: &mut FrontStep) {
        if turn.in_tx {
            if let Err(e) = self.directory.commit() {
                tracing::error!(error = %e, "directory commit failed");
                self.abort_turn(&mut turn, step);
                return;
            }
            self.stats.commits += 1;
        }
        for (conn, msg) in turn.replies {
            step.outputs.push(Output::Send(conn, msg));
        }
        for (conn, reason) in turn.closes {
            self.close(conn, reason, &mut step.outputs);
        }
        for (conn, cursor, max_entries) in turn.pulls {
            if let Err(e) = self.on_pull(conn, cursor, max_entries, now_ms, &mut step.outputs) {
                tracing::error!(error = %e, "pull failed");
                step.outputs.push(Output::Send(
                    conn,
                    RelayMessage::Error {
                        code: ErrorCode::Internal,
                        message: "relay storage error while reading changes; try again".into(),
                    },
                ));
            }
        }
        for (conn, ids) in turn.fetches {
            if let Err(e) = self.on_fetch(conn, ids, &mut step.outputs) {
                tracing::error!(error = %e, "fetch failed");
                step.outputs.push(Output::Send(
                    conn,
                    RelayMessage::Error {
                        code: ErrorCode::Internal,
                        message: "relay storage error while reading records; try again".into(),
                    },
                ));
            }
        }
    }

    pub(crate) fn close(&mut self, conn: ConnId, reason: CloseReason, out: &mut Vec<Output>) {
        if let Some(state) = self.conns.get_mut(&conn) {
            *state = ConnState::Closing;
            out.push(Output::Close(conn, reason));
        }
    }

    pub(crate) fn protocol_close(&mut self, conn: ConnId, reason: &str, out: &mut Vec<Output>) {
        out.push(Output::Send(
            conn,
            RelayMessage::Error {
                code: ErrorCode::UnexpectedMessage,
                message: reason.to_string(),
            },
        ));
        self.close(conn, CloseReason::protocol(reason), out);
    }
}

/// The answer to a message the store failed on: nothing was changed; a full disk is a
/// condition to wait out (`Unavailable`), anything else a relay fault (`Internal`).
fn storage_error(e: &StoreError) -> RelayMessage {
    let code = match e {
        StoreError::StorageFull(_) => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    RelayMessage::Error {
        code,
        message: format!("relay storage error ({e}); nothing was changed, try again"),
    }
}

/// What the turn's [`Input::StoreChanged`] asked for together.
#[derive(Default)]
struct OutsideWrites {
    any: bool,
    access: bool,
    /// `None`: every space with live sessions.
    spaces: Option<std::collections::BTreeSet<Uuid>>,
}
