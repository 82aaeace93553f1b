//! The relay in the simulated world: the production `RelayCore` on real SQLite files, behind a
//! simulated server shell that decodes frames, groups messages into turns and routes outputs.
//!
//! As in the server, the front and the shards' workers run apart: a push becomes a job that
//! its shard's worker decides and commits a few simulated milliseconds later, and the report
//! reaches the front later still, while the front goes on with pulls, ticks and other spaces.
//! A crash loses jobs not yet run (never committed: devices retry) and reports not yet
//! delivered (committed but unanswered: devices retry and get the stored answer).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use fieldsync_relay::core::{ConnId, FaultSwitches, Input, Job, Output, RelayConfig, RelayCore, WorkerReport};
use fieldsync_relay::schema_history::{Adoption, adopt};
use fieldsync_relay::store::Backend;
use fieldsync_relay::store::sqlite::{SqliteBackend, SqliteShard};
use fieldsync_schema::{ClientMessage, RelayMessage, Schema};
use rand_chacha::ChaCha20Rng;
use uuid::Uuid;

use crate::clock::{MINUTE, SECOND};
use crate::options::{Fault, InjectedBug};
use crate::rng::{Draw, stream};
use crate::world::{Event, World};

pub struct SimRelay {
    pub dir: PathBuf,
    pub core: Option<RelayCore<SqliteBackend>>,
    /// The store's files, for the checks (read handles of their own on every shard).
    pub backend: Option<SqliteBackend>,
    pub readers: Vec<SqliteShard>,
    pub relay_id: Uuid,
    pub boots: u64,
    /// Which of the world's schemas it serves (see [`crate::upgrades`]).
    pub level: usize,
    inbox: Vec<(ConnId, ClientMessage)>,
    process_scheduled: bool,
    /// Jobs waiting for their shard's worker, and the shards with a run scheduled.
    jobs: BTreeMap<u32, Vec<Job>>,
    worker_scheduled: BTreeSet<u32>,
    /// Reports on their way to the front, by delivery id.
    reports: BTreeMap<u64, WorkerReport>,
    next_report: u64,
    /// When workers run and reports arrive (its own stream: the rest of the run does not
    /// shift when this changes).
    timing: ChaCha20Rng,
}

impl SimRelay {
    pub fn new(dir: PathBuf) -> Self {
        SimRelay {
            dir,
            core: None,
            backend: None,
            readers: Vec::new(),
            relay_id: Uuid::nil(),
            boots: 0,
            level: 0,
            inbox: Vec::new(),
            process_scheduled: false,
            jobs: BTreeMap::new(),
            worker_scheduled: BTreeSet::new(),
            reports: BTreeMap::new(),
            next_report: 0,
            timing: stream(0, "relay/timing"),
        }
    }

    pub fn is_up(&self) -> bool {
        self.core.is_some()
    }

    pub fn core(&self) -> Option<&RelayCore<SqliteBackend>> {
        self.core.as_ref()
    }
}

impl World {
    /// Opens (or reopens after a crash) the relay on its files, with all memory fresh.
    pub fn relay_boot(&mut self) -> anyhow::Result<()> {
        let boot = self.relay.boots;
        self.relay.boots += 1;
        let mut rng = stream(self.opts.seed, &format!("relay/boot{boot}"));
        let new_id = fieldsync_schema::ids::new_uuid(&mut rng);
        let backend = SqliteBackend::open(&self.relay.dir, new_id)?;
        let level = self.relay.level.min(self.schemas.len() - 1);
        let schema = self.schemas[level].clone();
        // What the server does at start: weigh the schema against every one served before.
        let now = self.now();
        // The operator hands it every version apps were released with, so devices on a version
        // this relay skipped (it was down while the ladder moved twice) are weighed too.
        let earlier: Vec<&Schema> = self.schemas[..level].iter().map(|s| &**s).collect();
        let acceptance = match adopt(&mut backend.open_directory()?, &schema, &earlier, false, now)? {
            Adoption::Served(plan) => plan.acceptance,
            Adoption::Refused(plan) => {
                anyhow::bail!(
                    "the relay refuses schema v{}: {}",
                    schema.version(),
                    plan.describe_breaking()
                )
            }
        };
        // The simulated relay ticks every 30 s (see `relay_tick`): no other process writes its
        // store, so polling faster would only add events.
        let config = RelayConfig {
            tick_every_ms: 30 * SECOND,
            schemas: acceptance,
            ..RelayConfig::default()
        };
        let mut core = RelayCore::new(&backend, schema, config, Box::new(rng))?;
        core.set_fault_switches(self.fault_switches());
        self.relay.readers = (0..backend.shard_count())
            .map(|n| backend.open_shard(n))
            .collect::<Result<_, _>>()?;
        self.relay.relay_id = core.relay_id();
        self.relay.core = Some(core);
        self.relay.backend = Some(backend);
        self.relay.timing = stream(self.opts.seed, &format!("relay/timing{boot}"));
        self.trace.record(now, &format!("relay boot {boot}"));
        Ok(())
    }

    /// The deliberate defect of this run, once armed (setup itself runs on a correct relay).
    fn fault_switches(&self) -> FaultSwitches {
        if !self.bugs_armed {
            return FaultSwitches::default();
        }
        match self.opts.bug {
            Some(InjectedBug::SkipVersionGate) => FaultSwitches {
                skip_version_gate: true,
                ..FaultSwitches::default()
            },
            Some(InjectedBug::AckBeforeCommit) => FaultSwitches {
                ack_before_commit: true,
                ..FaultSwitches::default()
            },
            Some(InjectedBug::IgnoreReceipts) => FaultSwitches {
                ignore_receipts: true,
                ..FaultSwitches::default()
            },
            None => FaultSwitches::default(),
        }
    }

    /// Turns the run's deliberate defect on (after setup).
    pub fn arm_bugs(&mut self) {
        self.bugs_armed = true;
        let switches = self.fault_switches();
        if let Some(core) = &mut self.relay.core {
            core.set_fault_switches(switches);
        }
    }

    /// The relay process dies: memory, connections and the unprocessed inbox are gone.
    pub fn relay_crash(&mut self) {
        if !self.relay_stop("relay crashed") {
            return;
        }
        self.stats.count_fault(Fault::RelayCrash);
        let delay = self.rng.faults.between(SECOND, 10 * MINUTE);
        self.schedule_in(delay, Event::RelayRestart);
    }

    /// The relay process ends (a crash, an upgrade): memory, connections and the unprocessed
    /// inbox are gone. False if it was not running.
    pub fn relay_stop(&mut self, why: &str) -> bool {
        if self.relay.core.take().is_none() {
            return false;
        }
        self.relay.inbox.clear();
        // Jobs not run were never committed; reports not delivered were, but nobody heard.
        self.relay.jobs.clear();
        self.relay.worker_scheduled.clear();
        self.relay.reports.clear();
        let now = self.now();
        self.trace.record(now, why);
        let open: Vec<ConnId> = self.conns.iter().filter(|(_, c)| c.open).map(|(id, _)| *id).collect();
        for conn in open {
            self.reset_conn(conn, why);
        }
        true
    }

    /// Opens a connection from a device; the relay must be up.
    pub fn open_conn(&mut self, device: usize) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        let now = self.now();
        self.conns.insert(
            id,
            crate::world::Conn {
                device,
                open: true,
                last_to_relay: now,
                last_to_device: now,
            },
        );
        if let Some(core) = &mut self.relay.core {
            core.handle([Input::Opened(id)], 0);
        }
        id
    }

    /// Drops a connection on both sides (a reset): in-flight bytes are lost.
    pub fn reset_conn(&mut self, conn: ConnId, why: &str) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if !c.open {
            return;
        }
        c.open = false;
        let device = c.device;
        if let Some(core) = &mut self.relay.core {
            core.handle([Input::Closed(conn)], 0);
        }
        self.relay.inbox.retain(|(c, _)| *c != conn);
        let now = self.now();
        self.trace.record(now, &format!("reset conn{conn} dev{device}: {why}"));
        // The device notices a moment later (its next read fails).
        let at = now + 1 + self.net.latency_ms;
        self.schedule(at, Event::CloseAtDevice(conn, why.to_string()));
    }

    pub fn on_to_relay(&mut self, conn: ConnId, bytes: Vec<u8>) {
        if !self.relay.is_up() || !self.conns.get(&conn).is_some_and(|c| c.open) {
            return; // lost with the connection
        }
        match ClientMessage::decode(&bytes) {
            Ok(msg) => {
                self.relay.inbox.push((conn, msg));
                if !self.relay.process_scheduled {
                    self.relay.process_scheduled = true;
                    let now = self.now();
                    self.schedule(now, Event::RelayProcess);
                }
            }
            Err(e) => {
                let v = self.violation(
                    "codec",
                    format!("the relay could not decode a device message: {e}"),
                    None,
                );
                self.oracle.violations.push(v);
                self.reset_conn(conn, "malformed message");
            }
        }
    }

    /// Everything that arrived while the relay was busy becomes one group commit.
    pub fn relay_process(&mut self) {
        self.relay.process_scheduled = false;
        let inbox = std::mem::take(&mut self.relay.inbox);
        let now = self.now();
        let Some(core) = &mut self.relay.core else { return };
        if inbox.is_empty() {
            return;
        }
        self.stats.groups += 1;
        self.trace.record(now, &format!("relay group of {}", inbox.len()));
        let step = core
            .front_mut()
            .handle(inbox.into_iter().map(|(conn, msg)| Input::message(conn, msg)), now);
        self.queue_jobs(step.jobs);
        self.route(step.outputs);
    }

    /// Hands jobs to their shards' workers, each of which runs a little later.
    fn queue_jobs(&mut self, jobs: Vec<(u32, Job)>) {
        for (shard, job) in jobs {
            self.relay.jobs.entry(shard).or_default().push(job);
            if self.relay.worker_scheduled.insert(shard) {
                let delay = self.relay.timing.between(1, 40);
                self.schedule_in(delay, Event::WorkerRun(shard));
            }
        }
    }

    /// A shard's worker decides and commits every job waiting for it as one group; its report
    /// reaches the front a little later.
    pub fn worker_run(&mut self, shard: u32) {
        self.relay.worker_scheduled.remove(&shard);
        let jobs = self.relay.jobs.remove(&shard).unwrap_or_default();
        let now = self.now();
        let Some(core) = &mut self.relay.core else { return };
        let Some(worker) = core.workers_mut().get_mut(shard as usize) else {
            return;
        };
        if jobs.is_empty() {
            return;
        }
        self.trace.record(now, &format!("shard{shard} group of {}", jobs.len()));
        let report = worker.handle(jobs, now);
        let id = self.relay.next_report;
        self.relay.next_report += 1;
        self.relay.reports.insert(id, report);
        let delay = self.relay.timing.between(0, 20);
        self.schedule_in(delay, Event::WorkerReport(id));
    }

    /// A worker's report arrives at the front: answers, then the live fan-out of its rows.
    pub fn worker_report(&mut self, id: u64) {
        let Some(report) = self.relay.reports.remove(&id) else {
            return;
        };
        let now = self.now();
        let Some(core) = &mut self.relay.core else { return };
        let step = core.front_mut().handle_report(report, now);
        self.queue_jobs(step.jobs);
        self.route(step.outputs);
    }

    pub fn relay_tick(&mut self) {
        let now = self.now();
        if let Some(core) = &mut self.relay.core {
            let outputs = core.handle([Input::Tick], now);
            self.route(outputs);
        }
        self.schedule_in(30 * SECOND, Event::RelayTick);
    }

    fn route(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send(conn, msg) => self.relay_send(conn, msg),
                Output::Close(conn, reason) => {
                    if let Some(c) = self.conns.get_mut(&conn)
                        && c.open
                    {
                        c.open = false;
                        if let Some(core) = &mut self.relay.core {
                            core.handle([Input::Closed(conn)], 0);
                        }
                        let at = self.delivery_time(conn, false);
                        self.schedule(at, Event::CloseAtDevice(conn, reason.reason.clone()));
                    }
                }
            }
        }
    }

    fn relay_send(&mut self, conn: ConnId, msg: RelayMessage) {
        let Some(device) = self.conns.get(&conn).filter(|c| c.open).map(|c| c.device) else {
            return;
        };
        self.oracle_relay_output(device, &msg);
        if matches!(msg, RelayMessage::PushResult { .. })
            && self.opts.faults.has(Fault::LostAck)
            && !self.healing
            && self.rng.faults.chance(self.net.lost_ack_chance)
        {
            // The relay did the work and answered; the answer never arrives.
            self.stats.count_fault(Fault::LostAck);
            self.reset_conn(conn, "acknowledgement lost");
            return;
        }
        let bytes = msg.encode();
        self.trace.absorb(&bytes);
        let at = self.delivery_time(conn, false);
        self.schedule(at, Event::ToDevice(conn, bytes));
    }
}
