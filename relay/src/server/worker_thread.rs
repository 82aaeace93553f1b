//! The threads that run the apply workers: each owns the workers of some shards (shard `n` on
//! thread `n % threads`), takes every job waiting for them, lets each shard's worker decide and
//! commit its jobs as one group, and sends the report back to the front thread. Different
//! threads commit different shards at the same time: that is the relay using its cores.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use fieldsync_schema::{SystemTimeSource, TimeSource};
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::core::{Job, SpaceWorker, WorkerReport};
use crate::store::SpaceStore;

/// The worker threads, as the front thread sees them: where to send each shard's jobs.
pub(crate) struct WorkerPool {
    senders: Vec<std_mpsc::Sender<(u32, Job)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Mutations sent to the threads and not yet decided: the apply backlog, which the front
    /// thread keeps under [`super::APPLY_BACKLOG`] by not reading new input while it is over.
    backlog: Arc<AtomicUsize>,
}

impl WorkerPool {
    /// Starts `threads` threads (at least one) over `workers`, reporting to `front`.
    pub(crate) fn start<S: SpaceStore + Send + 'static>(
        workers: Vec<SpaceWorker<S>>,
        threads: usize,
        front: mpsc::UnboundedSender<WorkerReport>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let threads = threads.clamp(1, workers.len().max(1));
        let mut owned: Vec<Vec<SpaceWorker<S>>> = (0..threads).map(|_| Vec::new()).collect();
        for w in workers {
            let t = w.shard() as usize % threads;
            owned[t].push(w);
        }
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        let backlog = Arc::new(AtomicUsize::new(0));
        for (t, mine) in owned.into_iter().enumerate() {
            let (tx, rx) = std_mpsc::channel();
            let front = front.clone();
            let metrics = metrics.clone();
            let backlog = backlog.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("relay-worker-{t}"))
                    .spawn(move || run(mine, rx, front, metrics, backlog))?,
            );
            senders.push(tx);
        }
        Ok(WorkerPool {
            senders,
            threads: handles,
            backlog,
        })
    }

    /// Sends each job to the thread of its shard.
    pub(crate) fn dispatch(&self, jobs: Vec<(u32, Job)>) {
        for (shard, job) in jobs {
            let t = shard as usize % self.senders.len().max(1);
            let weight = job_weight(&job);
            self.backlog.fetch_add(weight, Ordering::Relaxed);
            if let Some(tx) = self.senders.get(t)
                && tx.send((shard, job)).is_err()
            {
                self.backlog.fetch_sub(weight, Ordering::Relaxed);
                tracing::error!(shard, "a worker thread is gone; the batch stays unanswered");
            }
        }
    }

    /// Mutations dispatched and not yet decided.
    pub(crate) fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Stops the threads after the groups they are committing, and waits for them.
    pub(crate) fn stop(self) {
        drop(self.senders);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn run<S: SpaceStore>(
    mut workers: Vec<SpaceWorker<S>>,
    rx: std_mpsc::Receiver<(u32, Job)>,
    front: mpsc::UnboundedSender<WorkerReport>,
    metrics: Arc<Metrics>,
    backlog: Arc<AtomicUsize>,
) {
    let clock = SystemTimeSource;
    while let Ok(first) = rx.recv() {
        let mut by_shard: BTreeMap<u32, Vec<Job>> = BTreeMap::new();
        let mut next = Some(first);
        while let Some((shard, job)) = next.take() {
            by_shard.entry(shard).or_default().push(job);
            next = rx.try_recv().ok();
        }
        for (shard, jobs) in by_shard {
            let Some(worker) = workers.iter_mut().find(|w| w.shard() == shard) else {
                continue;
            };
            let pushed: usize = jobs.iter().map(|j| j.mutations.len()).sum();
            let weight: usize = jobs.iter().map(job_weight).sum();
            let started = Instant::now();
            let report = worker.handle(jobs, clock.now_ms());
            backlog.fetch_sub(weight, Ordering::Relaxed);
            record_timings(
                &metrics,
                started.elapsed(),
                worker.store_mut().take_commit_times(),
                pushed,
            );
            let reconnects = worker.store_mut().take_reconnects();
            if reconnects > 0 {
                super::metrics::StoreMetrics::add(&metrics.store.reconnects, reconnects);
            }
            if front.send(report).is_err() {
                return;
            }
        }
    }
}

/// What a job counts for in the backlog: its mutations, and at least one (a job of only
/// not-attempted ids still waits for its turn).
fn job_weight(job: &Job) -> usize {
    job.mutations.len().max(1)
}

/// Group time, commit time, and the per-mutation acceptance time derived from them.
fn record_timings(metrics: &Metrics, group: Duration, commits: Vec<Duration>, pushed: usize) {
    let Ok(mut t) = metrics.timings.lock() else { return };
    t.group.observe(group);
    let mut committing = Duration::ZERO;
    for c in commits {
        committing += c;
        t.commit.observe(c);
    }
    if pushed > 0 {
        let per = group.saturating_sub(committing).as_secs_f64() / pushed as f64;
        t.apply.observe_n(per, pushed as u64);
    }
}
