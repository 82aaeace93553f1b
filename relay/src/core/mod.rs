//! The relay core: a sans-IO state machine that decides, mutation by mutation, what is
//! accepted, and never releases an answer before the answer is durable.
//!
//! The async server hands it `(connection, message)` pairs together with the current time and
//! sends whatever [`Output`]s it returns; the simulator does the same with simulated time. The
//! core reads no clock, opens no socket and draws randomness only from the RNG it was given.
//!
//! One call to [`RelayCore::handle`] is one group commit: every push in the group is applied
//! inside a single transaction, the transaction commits, and only then are the outcomes, the
//! live fan-out and any pull pages (which must only ever show committed data) released.

mod accept;
mod archive;
mod checks;
mod fanout;
mod housekeeping;
mod lww;
mod pull;
mod session;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fieldsync_schema::wire::{ErrorCode, MAX_BATCH, MutationResult};
use fieldsync_schema::{ClientMessage, Outcome, RelayMessage, Role, Schema};
use rand_core::Rng;
use serde::Serialize;
use uuid::Uuid;

use crate::doc_cache::DocCache;
use crate::store::{Store, StoreError};

pub use accept::AppliedEntry;
pub use session::token_hash;

/// Identifies one connection for the lifetime of the process.
pub type ConnId = u64;

/// Everything the core reacts to. It reads no clock: the time comes with every call.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A transport connection opened.
    Opened(ConnId),
    /// A decoded message. `prechecked`: the push's signatures, if the shell checked them (the
    /// server does, on the connection's task); counted only if made with the session's key.
    Message {
        conn: ConnId,
        msg: ClientMessage,
        prechecked: Option<Prechecked>,
    },
    /// The connection is gone, whichever side closed it.
    Closed(ConnId),
    /// Time passed: see [`RelayCore::next_wakeup`].
    Tick,
}

impl Input {
    /// A message whose signatures the core checks itself.
    pub fn message(conn: ConnId, msg: ClientMessage) -> Self {
        Input::Message {
            conn,
            msg,
            prechecked: None,
        }
    }
}

/// What the shell must do for the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Send(ConnId, RelayMessage),
    /// Close the connection after sending what was queued before, with a WebSocket close code
    /// and a human-readable reason.
    Close(ConnId, CloseReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
}

impl CloseReason {
    /// Normal closure (1000).
    pub fn normal(reason: &str) -> Self {
        CloseReason {
            code: 1000,
            reason: reason.to_string(),
        }
    }
    /// Policy violation (1008): authentication or authorization failures.
    pub fn policy(reason: &str) -> Self {
        CloseReason {
            code: 1008,
            reason: reason.to_string(),
        }
    }
    /// Protocol error (1002): garbage or out-of-order messages.
    pub fn protocol(reason: &str) -> Self {
        CloseReason {
            code: 1002,
            reason: reason.to_string(),
        }
    }
    /// Try again later (1013).
    pub fn try_later(reason: &str) -> Self {
        CloseReason {
            code: 1013,
            reason: reason.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// How long a connect challenge may go unanswered.
    pub nonce_ttl_ms: u64,
    /// Most mutations accepted in one push.
    pub max_batch: usize,
    /// Most entries in one pull page, and its byte budget.
    pub pull_page_entries: usize,
    pub pull_page_bytes: usize,
    /// Re-save a document's snapshot after this many changes since the last one.
    pub snapshot_every: u64,
    /// Parsed documents kept in memory.
    pub doc_cache_capacity: usize,
    /// Sustained mutations per second per connection, and the burst allowed above it.
    pub rate_per_sec: f64,
    pub rate_burst: f64,
    /// How often, while connections are open, the core wants a tick to look for what other
    /// processes wrote (revocations within a second, SPEC §4).
    pub tick_every_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            nonce_ttl_ms: 30_000,
            max_batch: MAX_BATCH,
            pull_page_entries: 1000,
            pull_page_bytes: 3 * 1024 * 1024,
            snapshot_every: 64,
            doc_cache_capacity: 4096,
            rate_per_sec: 5_000.0,
            rate_burst: 20_000.0,
            tick_every_ms: 250,
        }
    }
}

/// Counters for metrics and the simulator's summary. Plain numbers; the shell adds timings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CoreStats {
    pub outcomes: BTreeMap<String, u64>,
    pub applied: u64,
    pub conflicts: u64,
    pub rejections: BTreeMap<String, u64>,
    pub audit_records: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub auth_failures: BTreeMap<String, u64>,
    pub enrollments: u64,
    pub live_entries_sent: u64,
    pub pull_pages: u64,
}

/// Test-only switches that break one guarantee on purpose, so that the simulator can prove it
/// catches the breakage. All off by default; nothing in production sets them.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultSwitches {
    /// Accept gated updates on any base version.
    pub skip_version_gate: bool,
    /// Ignore receipts: a replayed mutation is applied again.
    pub ignore_receipts: bool,
    /// Release outcomes without committing (the transaction is rolled back afterwards).
    pub ack_before_commit: bool,
}

pub(crate) enum ConnState {
    /// Connected; waiting for `Hello` or `Enroll`.
    Fresh,
    /// A challenge was sent; waiting for `Auth`.
    Challenged {
        device_id: Uuid,
        nonce: Vec<u8>,
        issued_ms: u64,
    },
    Ready(Box<Session>),
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
    /// Set once the device caught up: live entries after this feed position are pushed.
    pub live_cursor: Option<u64>,
    pub tokens: f64,
    pub tokens_at_ms: u64,
}

impl Session {
    fn space_list(&self) -> Vec<Uuid> {
        self.spaces.keys().copied().collect()
    }

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

pub struct RelayCore<S: Store> {
    pub(crate) store: S,
    pub(crate) schema: Arc<Schema>,
    pub(crate) config: RelayConfig,
    pub(crate) relay_id: Uuid,
    pub(crate) conns: BTreeMap<ConnId, ConnState>,
    pub(crate) docs: DocCache,
    pub(crate) rng: Box<dyn Rng + Send>,
    pub(crate) stats: CoreStats,
    pub(crate) faults: FaultSwitches,
    /// What the periodic tick last saw (see `housekeeping`).
    housekeeping: housekeeping::TickState,
    /// Changes applied to each document since its last snapshot (a hint, rebuilt from the
    /// store when missing), so a mutation need not count them in SQL.
    pub(crate) since_snapshot: BTreeMap<u64, u64>,
    /// How far the feed has been fanned out (see `fanout`).
    fanned: fanout::FanOutState,
}

/// Work for after the group's commit.
#[derive(Default)]
struct Group {
    in_tx: bool,
    /// Push results and other replies whose release waits for the commit.
    replies: Vec<(ConnId, RelayMessage)>,
    /// Pushes turned away for rate or commit failure are answered with `PushDeferred`.
    batch_ids: Vec<(ConnId, u64)>,
    /// Connections to close after the replies (enrollment completed).
    closes: Vec<(ConnId, CloseReason)>,
    applied: Vec<AppliedEntry>,
    touched_docs: BTreeSet<u64>,
    pulls: Vec<(ConnId, fieldsync_schema::PullCursor, u32)>,
    /// Signature checks made outside the core for the message being handled.
    prechecked: Option<Prechecked>,
    /// The audit chain's last hash, once read in this group's transaction.
    audit_head: Option<String>,
}

/// Which of a push's mutations were found correctly signed, and with which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prechecked {
    pub key: [u8; 32],
    pub valid: Vec<bool>,
}

impl Prechecked {
    /// Verifies every mutation of a push with `verifier` (off the core's thread).
    pub fn check(verifier: &fieldsync_schema::signing::Verifier, mutations: &[fieldsync_schema::Mutation]) -> Self {
        Prechecked {
            key: verifier.public_key(),
            valid: mutations.iter().map(|m| verifier.verify_mutation(m).is_ok()).collect(),
        }
    }
}

impl<S: Store> RelayCore<S> {
    pub fn new(store: S, schema: Arc<Schema>, config: RelayConfig, rng: Box<dyn Rng + Send>) -> Self {
        let relay_id = store.relay_id();
        let docs = DocCache::new(config.doc_cache_capacity);
        let fanned = fanout::FanOutState::starting_at(&store);
        RelayCore {
            store,
            schema,
            config,
            relay_id,
            conns: BTreeMap::new(),
            docs,
            rng,
            stats: CoreStats::default(),
            faults: FaultSwitches::default(),
            housekeeping: housekeeping::TickState::default(),
            since_snapshot: BTreeMap::new(),
            fanned,
        }
    }

    pub fn relay_id(&self) -> Uuid {
        self.relay_id
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// Turns on deliberate defects (simulator self-tests only).
    pub fn set_fault_switches(&mut self, faults: FaultSwitches) {
        self.faults = faults;
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

    /// The one door: takes what happened since the last call, in order, and returns what the
    /// shell must do. Connections open and close at once; every message of the call is one
    /// group commit (its pushes share one transaction, and outcomes, live entries and pull pages
    /// are released only after the commit); a `Tick` runs after the group. Time comes only
    /// from `now_ms`.
    pub fn handle(&mut self, inputs: impl IntoIterator<Item = Input>, now_ms: u64) -> Vec<Output> {
        let mut messages = Vec::new();
        let mut tick = false;
        for input in inputs {
            match input {
                Input::Opened(conn) => {
                    self.conns.insert(conn, ConnState::Fresh);
                }
                Input::Closed(conn) => {
                    self.conns.remove(&conn);
                }
                Input::Message { conn, msg, prechecked } => messages.push((conn, msg, prechecked)),
                Input::Tick => tick = true,
            }
        }
        let mut out = if messages.is_empty() {
            Vec::new()
        } else {
            self.handle_group(messages, now_ms)
        };
        if tick {
            self.tick(now_ms, &mut out);
        }
        out
    }

    /// When the core next wants a [`Input::Tick`]: while any connection is open, every
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

    /// Handles a group of messages as one group commit and returns what to send.
    fn handle_group(&mut self, inputs: Vec<(ConnId, ClientMessage, Option<Prechecked>)>, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        let mut group = Group::default();
        for (conn, msg, checked) in inputs {
            if matches!(self.conns.get(&conn), None | Some(ConnState::Closing)) {
                continue;
            }
            group.prechecked = checked;
            if let Err(e) = self.dispatch(conn, msg, now_ms, &mut group, &mut out) {
                tracing::error!(error = %e, "store failure while handling a message");
                self.abort_group(&mut group, &mut out, &e);
                return out;
            }
        }
        self.finish_group(group, now_ms, &mut out);
        out
    }

    fn dispatch(
        &mut self,
        conn: ConnId,
        msg: ClientMessage,
        now_ms: u64,
        group: &mut Group,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        match msg {
            ClientMessage::Hello {
                protocol_version,
                device_id,
                schema_hash,
            } => self.on_hello(conn, protocol_version, device_id, schema_hash, now_ms, out),
            ClientMessage::Auth { signature } => {
                self.ensure_tx(group)?;
                self.on_auth(conn, &signature.0, now_ms, out)
            }
            ClientMessage::Enroll {
                protocol_version,
                token,
                device_id,
                public_key,
                schema_hash,
                proof,
            } => {
                self.ensure_tx(group)?;
                let request = session::EnrollRequest {
                    protocol_version,
                    token: &token,
                    device_id,
                    public_key: &public_key.0,
                    schema_hash,
                    proof: &proof.0,
                };
                self.on_enroll(conn, request, now_ms, group, out)
            }
            ClientMessage::RotateKey {
                new_public_key,
                signature,
            } => {
                self.ensure_tx(group)?;
                self.on_rotate_key(conn, &new_public_key.0, &signature.0, group, out)
            }
            ClientMessage::Ping { nonce } => {
                out.push(Output::Send(conn, RelayMessage::Pong { nonce }));
                Ok(())
            }
            ClientMessage::Push { batch_id, mutations } => {
                if !matches!(self.conns.get(&conn), Some(ConnState::Ready(_))) {
                    self.protocol_close(conn, "push before authentication", out);
                    return Ok(());
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
                    return Ok(());
                }
                if let Some(ConnState::Ready(s)) = self.conns.get_mut(&conn) {
                    let (rate, burst) = (self.config.rate_per_sec, self.config.rate_burst);
                    if let Err(wait_ms) = s.take_tokens(mutations.len() as f64, now_ms, rate, burst) {
                        out.push(Output::Send(
                            conn,
                            RelayMessage::PushDeferred {
                                batch_id,
                                retry_after_ms: wait_ms.max(50),
                                reason: "rate limit: too many mutations from this device".into(),
                            },
                        ));
                        return Ok(());
                    }
                }
                // Registered first: if storage fails from here on, this batch is told to retry.
                group.batch_ids.push((conn, batch_id));
                self.ensure_tx(group)?;
                let results = self.apply_batch(conn, &mutations, now_ms, group)?;
                group
                    .replies
                    .push((conn, RelayMessage::PushResult { batch_id, results }));
                Ok(())
            }
            ClientMessage::Pull { cursor, max_entries } => {
                if !matches!(self.conns.get(&conn), Some(ConnState::Ready(_))) {
                    self.protocol_close(conn, "pull before authentication", out);
                    return Ok(());
                }
                group.pulls.push((conn, cursor, max_entries));
                Ok(())
            }
        }
    }

    fn ensure_tx(&mut self, group: &mut Group) -> Result<(), StoreError> {
        if !group.in_tx {
            self.store.begin()?;
            group.in_tx = true;
        }
        Ok(())
    }

    /// A store failure mid-group: roll back, forget cached documents the group touched, and
    /// tell every pusher to retry (their mutations were not applied).
    fn abort_group(&mut self, group: &mut Group, out: &mut Vec<Output>, error: &StoreError) {
        self.stats.commit_failures += 1;
        if let Err(e) = self.store.rollback() {
            tracing::error!(error = %e, "rollback failed");
        }
        for key in &group.touched_docs {
            self.docs.invalidate(*key);
        }
        for (conn, batch_id) in group.batch_ids.drain(..) {
            out.push(Output::Send(
                conn,
                RelayMessage::PushDeferred {
                    batch_id,
                    retry_after_ms: 1000,
                    reason: format!("relay storage error: {error}"),
                },
            ));
        }
        for (conn, msg) in group.replies.drain(..) {
            if !matches!(msg, RelayMessage::PushResult { .. }) {
                out.push(Output::Send(
                    conn,
                    RelayMessage::Error {
                        code: ErrorCode::Internal,
                        message: "relay storage error; nothing was changed, try again".into(),
                    },
                ));
            }
        }
    }

    fn finish_group(&mut self, mut group: Group, now_ms: u64, out: &mut Vec<Output>) {
        if group.in_tx {
            let committed = if self.faults.ack_before_commit {
                // Deliberate defect: answers go out, then the work is thrown away.
                if let Err(e) = self.store.rollback() {
                    tracing::error!(error = %e, "rollback failed");
                }
                for key in &group.touched_docs {
                    self.docs.invalidate(*key);
                }
                Ok(())
            } else {
                self.store.commit()
            };
            if let Err(e) = committed {
                tracing::error!(error = %e, "group commit failed");
                self.abort_group(&mut group, out, &e);
                return;
            }
            self.stats.commits += 1;
        }
        for (conn, msg) in group.replies {
            out.push(Output::Send(conn, msg));
        }
        for (conn, reason) in group.closes {
            self.close(conn, reason, out);
        }
        self.fan_out_committed(&group.applied, out);
        for (conn, cursor, max_entries) in group.pulls {
            if let Err(e) = self.on_pull(conn, cursor, max_entries, now_ms, out) {
                tracing::error!(error = %e, "pull failed");
                out.push(Output::Send(
                    conn,
                    RelayMessage::Error {
                        code: ErrorCode::Internal,
                        message: "relay storage error while reading changes; try again".into(),
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

    pub(crate) fn count_outcome(&mut self, outcome: &Outcome) {
        *self.stats.outcomes.entry(outcome.name().to_string()).or_insert(0) += 1;
        match outcome {
            Outcome::Applied { .. } => {
                self.stats.applied += 1;
                self.stats.audit_records += 1;
            }
            Outcome::Conflict { .. } => self.stats.conflicts += 1,
            Outcome::RejectedImmutable { .. }
            | Outcome::RejectedLocked { .. }
            | Outcome::Invalid { .. }
            | Outcome::Forbidden { .. } => {
                *self.stats.rejections.entry(outcome.name().to_string()).or_insert(0) += 1;
            }
            Outcome::AlreadyApplied { .. } | Outcome::NotAttempted => {}
        }
    }

    fn apply_batch(
        &mut self,
        conn: ConnId,
        mutations: &[fieldsync_schema::Mutation],
        now_ms: u64,
        group: &mut Group,
    ) -> Result<Vec<MutationResult>, StoreError> {
        let mut results = Vec::with_capacity(mutations.len());
        let mut halted = false;
        let prechecked = group.prechecked.take();
        for (i, m) in mutations.iter().enumerate() {
            let outcome = if halted {
                Outcome::NotAttempted
            } else {
                let signed = prechecked
                    .as_ref()
                    .map(|p| (p.key, p.valid.get(i).copied().unwrap_or(false)));
                let outcome = self.accept(conn, m, signed, now_ms, group)?;
                if outcome.disposition() == fieldsync_schema::Disposition::Blocking {
                    halted = true;
                }
                outcome
            };
            self.count_outcome(&outcome);
            results.push(MutationResult {
                mutation_id: m.mutation_id,
                outcome,
            });
        }
        Ok(results)
    }
}
