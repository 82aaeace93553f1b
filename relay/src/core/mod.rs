//! The relay core: state machines that decide, mutation by mutation, what is accepted, and
//! never release an answer before the answer is durable.
//!
//! Two kinds, so that different spaces are applied at the same time (SPEC §13):
//! - the [`front`]: connections and sessions, handshakes and enrollment, pulls, live fan-out,
//!   the periodic tick; it routes each push batch, as a [`worker::Job`], to the worker of the
//!   space's shard;
//! - the [`worker`]s, one per shard: the acceptance pipeline and the group commit of the
//!   spaces stored there. Their reports come back to the front, which answers and fans out.
//!
//! [`RelayCore`] joins them into one door for callers that want one thread: `handle(inputs,
//! now_ms) -> outputs` runs the front, hands its jobs to the workers in turn and returns what
//! to send. The server runs the front and the workers on threads of their own
//! ([`RelayCore::into_parts`]); the simulator schedules them as separate events, so that
//! interleavings between spaces are explored. None of them reads a clock, opens a socket or
//! draws randomness other than from the RNG it was given.

pub mod front;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;

use fieldsync_schema::wire::{FeedPayload, MAX_BATCH};
use fieldsync_schema::{ClientMessage, FeedEntry, Schema};
use rand_core::Rng;
use serde::Serialize;
use uuid::Uuid;

pub use front::Front;
pub use front::token_hash;
pub use worker::{Job, JobResult, SpaceWorker, WorkerReport};

use crate::store::{Backend, Directory, SpaceStore, StoreResult};

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
    /// Time passed: see [`Front::next_wakeup`].
    Tick,
    /// Another writer of a shared store committed rows of `spaces` (`None`: any space, e.g.
    /// after notifications may have been missed), and with `access`, memberships or
    /// revocations changed: look now, as the tick would, instead of at the next tick. The
    /// server sends it on PostgreSQL's notifications; the tick stays the safety net.
    StoreChanged { spaces: Option<Vec<Uuid>>, access: bool },
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
    Send(ConnId, fieldsync_schema::RelayMessage),
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
    /// Parsed documents kept in memory by the whole relay, shared out evenly between the
    /// shards' workers. An Automerge document in memory is tens of KiB, so this is the main
    /// knob of the relay's resident memory (`--doc-cache`).
    pub doc_cache_capacity: usize,
    /// Sustained mutations per second per connection, and the burst allowed above it.
    pub rate_per_sec: f64,
    pub rate_burst: f64,
    /// How often, while connections are open, the front wants a tick to look for what other
    /// processes wrote (revocations within a second, SPEC §4).
    pub tick_every_ms: u64,
    /// Older schemas whose devices may connect, and those refused with their version named
    /// (see [`crate::schema_history`]); empty: only the current schema.
    pub schemas: crate::schema_history::SchemaAcceptance,
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
            schemas: crate::schema_history::SchemaAcceptance::default(),
        }
    }
}

impl RelayConfig {
    /// The configuration of one of `shards` workers: its share of the document cache.
    pub fn worker(&self, shards: u32) -> worker::WorkerConfig {
        worker::WorkerConfig {
            snapshot_every: self.snapshot_every,
            doc_cache_capacity: (self.doc_cache_capacity / shards.max(1) as usize).max(1),
        }
    }
}

/// Counters for metrics and the simulator's summary. Plain numbers; the shell adds timings.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
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
    /// Fetch requests answered (SPEC §16).
    pub fetches: u64,
}

impl CoreStats {
    /// Adds `other`'s counts (a worker's report) to these.
    pub fn absorb(&mut self, other: &CoreStats) {
        let add = |into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>| {
            for (k, v) in from {
                *into.entry(k.clone()).or_insert(0) += v;
            }
        };
        add(&mut self.outcomes, &other.outcomes);
        add(&mut self.rejections, &other.rejections);
        add(&mut self.auth_failures, &other.auth_failures);
        self.applied += other.applied;
        self.conflicts += other.conflicts;
        self.audit_records += other.audit_records;
        self.commits += other.commits;
        self.commit_failures += other.commit_failures;
        self.enrollments += other.enrollments;
        self.live_entries_sent += other.live_entries_sent;
        self.pull_pages += other.pull_pages;
        self.fetches += other.fetches;
    }
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
    /// Never look for rows other relays of a shared store committed (notifications and ticks
    /// do nothing): devices on this relay miss what was written through another.
    pub ignore_other_relays: bool,
    /// Leave a service's write over a concurrent provisional value to Automerge's tie-break
    /// (SPEC §17): the owner's value may lose to the person's it was meant to replace.
    pub skip_authority_settle: bool,
}

/// Which of a push's mutations were found correctly signed, and with which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prechecked {
    pub key: [u8; 32],
    pub valid: Vec<bool>,
}

impl Prechecked {
    /// Verifies every mutation of a push with `verifier` (off the core's threads).
    pub fn check(verifier: &fieldsync_schema::signing::Verifier, mutations: &[fieldsync_schema::Mutation]) -> Self {
        Prechecked {
            key: verifier.public_key(),
            valid: mutations.iter().map(|m| verifier.verify_mutation(m).is_ok()).collect(),
        }
    }
}

/// An applied mutation as it goes out to other devices.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedEntry {
    pub entry: FeedEntry,
    pub origin_device: Uuid,
    /// What the origin device gets: `Own`, or the changes the relay added (LWW settlement),
    /// which the origin does not have yet.
    pub origin_payload: FeedPayload,
}

impl AppliedEntry {
    /// The entry as `device` should see it: its own changes are not sent back.
    pub fn entry_for(&self, device: Uuid) -> FeedEntry {
        if device == self.origin_device {
            FeedEntry {
                payload: self.origin_payload.clone(),
                ..self.entry.clone()
            }
        } else {
            self.entry.clone()
        }
    }
}

/// The front and one worker per shard behind one door, for callers that run everything on one
/// thread (tests, tools, the simulator's single-worker mode).
pub struct RelayCore<B: Backend> {
    front: Front<B::Directory, B::Shard>,
    workers: Vec<SpaceWorker<B::Shard>>,
}

impl<B: Backend> RelayCore<B> {
    /// A front and one worker per shard on `backend`, each with connections of its own.
    pub fn new(backend: &B, schema: Arc<Schema>, config: RelayConfig, rng: Box<dyn Rng + Send>) -> StoreResult<Self> {
        let (front, workers) = Self::parts(backend, schema, config, rng)?;
        Ok(RelayCore { front, workers })
    }

    /// The front and the workers, to run apart (the server puts each on a thread).
    #[allow(clippy::type_complexity)]
    pub fn parts(
        backend: &B,
        schema: Arc<Schema>,
        config: RelayConfig,
        rng: Box<dyn Rng + Send>,
    ) -> StoreResult<(Front<B::Directory, B::Shard>, Vec<SpaceWorker<B::Shard>>)> {
        let directory = backend.open_directory()?;
        let relay_id = directory.relay_id();
        let shards = backend.shard_count();
        let mut readers = Vec::new();
        for n in 0..shards {
            readers.push(backend.open_shard(n)?);
        }
        let mut workers = Vec::new();
        for n in 0..shards {
            let mut others = Vec::new();
            // One database: the worker's own lookups see every space (and each handle is a
            // connection of the database's to spare).
            if !backend.shards_share_tables() {
                for k in (0..shards).filter(|k| *k != n) {
                    others.push(backend.open_shard(k)?);
                }
            }
            workers.push(SpaceWorker::new(
                n,
                backend.open_shard(n)?,
                others,
                schema.clone(),
                config.worker(shards),
                relay_id,
            ));
        }
        let front = Front::new(directory, readers, schema, config, rng);
        Ok((front, workers))
    }

    /// Joins parts made by [`RelayCore::parts`].
    pub fn from_parts(front: Front<B::Directory, B::Shard>, workers: Vec<SpaceWorker<B::Shard>>) -> Self {
        RelayCore { front, workers }
    }

    #[allow(clippy::type_complexity)]
    pub fn into_parts(self) -> (Front<B::Directory, B::Shard>, Vec<SpaceWorker<B::Shard>>) {
        (self.front, self.workers)
    }

    /// The one door: what happened since the last call in, what to send out. Every job the
    /// front makes of it is decided (and committed) by its worker before this returns.
    pub fn handle(&mut self, inputs: impl IntoIterator<Item = Input>, now_ms: u64) -> Vec<Output> {
        let step = self.front.handle(inputs, now_ms);
        let mut out = step.outputs;
        let mut jobs = step.jobs;
        while !jobs.is_empty() {
            let mut by_shard: BTreeMap<u32, Vec<Job>> = BTreeMap::new();
            for (shard, job) in jobs.drain(..) {
                by_shard.entry(shard).or_default().push(job);
            }
            for (shard, batch) in by_shard {
                let Some(worker) = self.workers.get_mut(shard as usize) else {
                    continue;
                };
                let report = worker.handle(batch, now_ms);
                let step = self.front.handle_report(report, now_ms);
                out.extend(step.outputs);
                jobs.extend(step.jobs);
            }
        }
        out
    }

    /// When the front next wants an [`Input::Tick`].
    pub fn next_wakeup(&self) -> Option<u64> {
        self.front.next_wakeup()
    }

    pub fn front(&self) -> &Front<B::Directory, B::Shard> {
        &self.front
    }

    pub fn front_mut(&mut self) -> &mut Front<B::Directory, B::Shard> {
        &mut self.front
    }

    pub fn workers(&self) -> &[SpaceWorker<B::Shard>] {
        &self.workers
    }

    /// The workers, to run apart from the front (the simulator delays their commits and
    /// reports to explore the interleavings a server's threads produce).
    pub fn workers_mut(&mut self) -> &mut [SpaceWorker<B::Shard>] {
        &mut self.workers
    }

    pub fn relay_id(&self) -> Uuid {
        self.front.relay_id()
    }

    pub fn directory(&self) -> &B::Directory {
        self.front.directory()
    }

    pub fn directory_mut(&mut self) -> &mut B::Directory {
        self.front.directory_mut()
    }

    /// The shard holding `space`'s data (through the worker's own handle).
    pub fn shard_of(&self, space: Uuid) -> Option<&B::Shard> {
        let shard = self.directory().space(space).ok().flatten()?.shard;
        self.workers.get(shard as usize).map(SpaceWorker::store)
    }

    /// The stored row of an entity, wherever it lives (tests and tools).
    pub fn document(&self, entity_id: Uuid) -> StoreResult<Option<(crate::store::DocumentRow, &B::Shard)>> {
        for w in &self.workers {
            if let Some(row) = w.store().document(entity_id)? {
                return Ok(Some((row, w.store())));
            }
        }
        Ok(None)
    }

    /// Every counter: the front's and every worker's so far.
    pub fn stats(&self) -> &CoreStats {
        self.front.stats()
    }

    /// Turns on deliberate defects (simulator self-tests only).
    pub fn set_fault_switches(&mut self, faults: FaultSwitches) {
        for w in &mut self.workers {
            w.set_fault_switches(faults);
        }
        self.front.ignore_other_relays = faults.ignore_other_relays;
    }

    pub fn connection_counts(&self) -> (usize, usize) {
        self.front.connection_counts()
    }
}
