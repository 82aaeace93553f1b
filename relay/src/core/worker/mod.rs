//! An apply worker: the acceptance pipeline for the spaces of one shard, and their group
//! commit.
//!
//! The front hands it [`Job`]s — one push batch each, all of one space, with what the front
//! knows of the sender (device, user, role in that space, key) — and it returns, for every job,
//! the batch's results, released only after the shard's transaction committed, with the
//! applied entries the front fans out. Different shards have different workers, so different
//! spaces are applied at the same time; one shard's jobs are applied strictly in order, so a
//! device's mutations in a space keep their order.
//!
//! Like the front, a worker reads no clock, opens no socket and spawns nothing: the server
//! runs it on a thread of its own, the simulator and the tests call it in turn.

mod accept;
mod archive;
pub(crate) mod checks;
mod duplicates;
mod lww;
mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fieldsync_schema::signing::Verifier;
use fieldsync_schema::wire::MutationResult;
use fieldsync_schema::{Disposition, Mutation, Outcome, Role, Schema};
use uuid::Uuid;

use super::{AppliedEntry, ConnId, CoreStats, FaultSwitches, Prechecked};
use crate::doc_cache::DocCache;
use crate::store::{ReceiptRow, SpaceHead, SpaceStore, StoreError};

/// What the front knows of the device that sent a job.
#[derive(Debug, Clone)]
pub struct Sender {
    pub device_id: Uuid,
    pub user_id: Uuid,
    /// The space of the job, and the user's role there when the front took the batch (`None`:
    /// not a member).
    pub space_id: Uuid,
    pub role: Option<Role>,
    /// The device's current key, parsed.
    pub verifier: Verifier,
    /// The revoked device this one took over from (`enroll --new-identity`): the changes it
    /// carries were authored by that device, and that device's receipts answer its repeats.
    pub replaces: Option<Uuid>,
}

impl Sender {
    /// Whether `device` is this sender or the device it took over from.
    pub fn speaks_for(&self, device: Uuid) -> bool {
        device == self.device_id || Some(device) == self.replaces
    }
}

impl Sender {
    /// The user's role in `space` (only the job's space is known).
    pub fn role_in(&self, space: Uuid) -> Option<Role> {
        self.role.filter(|_| space == self.space_id)
    }
}

/// One push batch of one space.
#[derive(Debug, Clone)]
pub struct Job {
    pub conn: ConnId,
    pub batch_id: u64,
    pub sender: Sender,
    pub mutations: Vec<Mutation>,
    /// Signatures checked outside (the server's connection task), if any.
    pub prechecked: Option<Prechecked>,
    /// Mutations of the batch after its first space change: never looked at here, answered
    /// `NotAttempted` (batches never mix spaces).
    pub not_attempted: Vec<Uuid>,
}

/// What became of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobResult {
    /// The batch was decided and its decisions committed.
    Decided {
        conn: ConnId,
        batch_id: u64,
        results: Vec<MutationResult>,
    },
    /// Nothing of the batch was kept (a storage failure): the device sends it again later.
    Deferred {
        conn: ConnId,
        batch_id: u64,
        /// How long the device should wait: a full disk does not free itself within a second.
        retry_after_ms: u64,
        reason: String,
    },
}

/// The retry hint for a batch a storage failure deferred.
const RETRY_AFTER_STORAGE_ERROR_MS: u64 = 1_000;
const RETRY_AFTER_STORAGE_FULL_MS: u64 = 30_000;

/// A worker's answer to one turn.
#[derive(Debug, Default)]
pub struct WorkerReport {
    pub results: Vec<JobResult>,
    /// Everything committed this turn, in each space's seq order.
    pub applied: Vec<AppliedEntry>,
    /// Counters since the previous report.
    pub stats: CoreStats,
}

/// Knobs of a worker (from [`super::RelayConfig`]).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Re-save a document's snapshot after this many changes since the last one.
    pub snapshot_every: u64,
    /// Parsed documents kept in memory.
    pub doc_cache_capacity: usize,
}

pub struct SpaceWorker<S: SpaceStore> {
    shard: u32,
    pub(crate) store: S,
    /// Read handles on the other shards: an entity id is one record in one space, relay-wide.
    others: Vec<S>,
    pub(crate) schema: Arc<Schema>,
    config: WorkerConfig,
    pub(crate) relay_id: Uuid,
    pub(crate) docs: DocCache,
    pub(crate) stats: CoreStats,
    pub(crate) faults: FaultSwitches,
    /// Changes applied to each document since its last snapshot (a hint, rebuilt from the
    /// store when missing), so a mutation need not count them in SQL.
    pub(crate) since_snapshot: BTreeMap<u64, u64>,
}

/// Work for after one turn's commit.
#[derive(Default)]
pub(crate) struct Group {
    in_tx: bool,
    pub(crate) applied: Vec<AppliedEntry>,
    pub(crate) touched_docs: BTreeSet<u64>,
    /// Each space's head as this turn advanced it (read once inside the transaction).
    pub(crate) heads: BTreeMap<Uuid, SpaceHead>,
    /// The heads as the turn first read them: only the ones that moved are written back.
    pub(crate) read_heads: BTreeMap<Uuid, SpaceHead>,
}

impl<S: SpaceStore> SpaceWorker<S> {
    pub fn new(
        shard: u32,
        store: S,
        others: Vec<S>,
        schema: Arc<Schema>,
        config: WorkerConfig,
        relay_id: Uuid,
    ) -> Self {
        let docs = DocCache::new(config.doc_cache_capacity);
        SpaceWorker {
            shard,
            store,
            others,
            schema,
            config,
            relay_id,
            docs,
            stats: CoreStats::default(),
            faults: FaultSwitches::default(),
            since_snapshot: BTreeMap::new(),
        }
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Turns on deliberate defects (simulator self-tests only).
    pub fn set_fault_switches(&mut self, faults: FaultSwitches) {
        self.faults = faults;
    }

    /// Decides every job in order inside one transaction, commits, and reports. A storage
    /// failure defers every job of the turn: nothing of them was kept.
    pub fn handle(&mut self, jobs: Vec<Job>, now_ms: u64) -> WorkerReport {
        let mut group = Group::default();
        let mut results = Vec::with_capacity(jobs.len());
        let mut failure = None;
        for job in &jobs {
            match self.decide_job(job, now_ms, &mut group) {
                Ok(r) => results.push(r),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let committed = match failure {
            Some(e) => Err(e),
            None => self.commit(&mut group),
        };
        let mut report = WorkerReport {
            stats: std::mem::take(&mut self.stats),
            ..WorkerReport::default()
        };
        match committed {
            Ok(()) => {
                report.results = results;
                report.applied = group.applied;
            }
            Err(e) => {
                tracing::error!(shard = self.shard, error = %e, "group failed; every batch of it is deferred");
                self.abort(&group);
                report.stats = CoreStats {
                    commit_failures: 1,
                    ..CoreStats::default()
                };
                let retry_after_ms = match e {
                    StoreError::StorageFull(_) => RETRY_AFTER_STORAGE_FULL_MS,
                    _ => RETRY_AFTER_STORAGE_ERROR_MS,
                };
                report.results = jobs
                    .iter()
                    .map(|j| JobResult::Deferred {
                        conn: j.conn,
                        batch_id: j.batch_id,
                        retry_after_ms,
                        reason: format!("relay storage error: {e}"),
                    })
                    .collect();
            }
        }
        report
    }

    fn decide_job(&mut self, job: &Job, now_ms: u64, group: &mut Group) -> Result<JobResult, StoreError> {
        if !group.in_tx {
            self.store.begin()?;
            group.in_tx = true;
        }
        let mut results = Vec::with_capacity(job.mutations.len() + job.not_attempted.len());
        let mut halted = false;
        for (i, m) in job.mutations.iter().enumerate() {
            let outcome = if halted {
                Outcome::NotAttempted
            } else {
                let signed = job
                    .prechecked
                    .as_ref()
                    .map(|p| (p.key, p.valid.get(i).copied().unwrap_or(false)));
                let outcome = self.accept(&job.sender, m, signed, now_ms, group)?;
                halted = outcome.disposition() == Disposition::Blocking;
                outcome
            };
            self.count_outcome(&outcome);
            results.push(MutationResult {
                mutation_id: m.mutation_id,
                outcome,
            });
        }
        for id in &job.not_attempted {
            self.count_outcome(&Outcome::NotAttempted);
            results.push(MutationResult {
                mutation_id: *id,
                outcome: Outcome::NotAttempted,
            });
        }
        Ok(JobResult::Decided {
            conn: job.conn,
            batch_id: job.batch_id,
            results,
        })
    }

    /// Writes every space head the turn advanced, then commits once (one fsync for the turn).
    fn commit(&mut self, group: &mut Group) -> Result<(), StoreError> {
        if !group.in_tx {
            return Ok(());
        }
        for (space, head) in &group.heads {
            if group.read_heads.get(space) != Some(head) {
                self.store.set_space_head(*space, head)?;
            }
        }
        if self.faults.ack_before_commit {
            // Deliberate defect: answers go out, then the work is thrown away.
            self.store.rollback()?;
            for key in &group.touched_docs {
                self.docs.invalidate(*key);
            }
            self.since_snapshot.clear();
        } else {
            self.store.commit()?;
        }
        self.stats.commits += 1;
        Ok(())
    }

    /// A storage failure mid-turn: roll back and forget every cached document the turn
    /// touched (their cached copies hold changes that were never committed).
    fn abort(&mut self, group: &Group) {
        if let Err(e) = self.store.rollback() {
            tracing::error!(error = %e, "rollback failed");
        }
        for key in &group.touched_docs {
            self.docs.invalidate(*key);
        }
        self.since_snapshot.clear();
    }

    /// Whether another shard holds `entity_id` (a create must not reuse a record's id in
    /// another space).
    pub(crate) fn held_elsewhere(&self, entity_id: Uuid) -> Result<bool, StoreError> {
        for other in &self.others {
            if other.document(entity_id)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A receipt for `mutation_id` in another shard, if any.
    pub(crate) fn receipt_elsewhere(&self, mutation_id: Uuid) -> Result<Option<ReceiptRow>, StoreError> {
        for other in &self.others {
            if let Some(r) = other.receipt(mutation_id)? {
                return Ok(Some(r));
            }
        }
        Ok(None)
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
}
