//! The relays in the simulated world: production `RelayCore`s on real SQLite files, each behind
//! a simulated server shell that decodes frames, groups messages into turns and routes outputs.
//! With `--relays R` there are several, on one shared store (see [`crate::cluster`]).
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
use crate::store_loss::{LossyBackend, StoreLink};
use crate::world::{Event, World};

pub struct SimRelay {
    /// Its place in the cluster (0 when there is one relay).
    pub index: usize,
    pub core: Option<RelayCore<LossyBackend>>,
    /// Its connection to the store (the `store_loss` fault cuts it); a new one at each boot.
    pub link: StoreLink,
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

/// The store every relay of the world shares (one data directory), and read handles on it for
/// the checks, which stay open while relays come and go.
pub struct SharedStore {
    pub dir: PathBuf,
    pub backend: Option<SqliteBackend>,
    pub readers: Vec<SqliteShard>,
}

impl SharedStore {
    pub fn new(dir: PathBuf) -> Self {
        SharedStore {
            dir,
            backend: None,
            readers: Vec::new(),
        }
    }
}

impl SimRelay {
    pub fn new(index: usize) -> Self {
        SimRelay {
            index,
            core: None,
            link: StoreLink::default(),
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

    /// Its name in the trace and stream names: `relay` alone keeps a one-relay run's trace and
    /// randomness what they were before clusters existed.
    pub fn name(&self, cluster: usize) -> String {
        if cluster <= 1 {
            "relay".to_string()
        } else {
            format!("relay{}", self.index)
        }
    }

    pub fn is_up(&self) -> bool {
        self.core.is_some()
    }

    pub fn core(&self) -> Option<&RelayCore<LossyBackend>> {
        self.core.as_ref()
    }
}

impl World {
    /// How many relays the world runs.
    pub fn cluster_size(&self) -> usize {
        self.relays.len()
    }

    pub fn relay_name(&self, r: usize) -> String {
        self.relays[r].name(self.relays.len())
    }

    /// Whether any relay is running.
    pub fn any_relay_up(&self) -> bool {
        self.relays.iter().any(SimRelay::is_up)
    }

    /// The relays that are running.
    pub fn relays_up(&self) -> Vec<usize> {
        (0..self.relays.len()).filter(|r| self.relays[*r].is_up()).collect()
    }

    /// Opens (or reopens after a crash) relay `r` on the shared files, with all memory fresh.
    pub fn relay_boot(&mut self, r: usize) -> anyhow::Result<()> {
        let name = self.relay_name(r);
        let boot = self.relays[r].boots;
        self.relays[r].boots += 1;
        let mut rng = stream(self.opts.seed, &format!("{name}/boot{boot}"));
        let new_id = fieldsync_schema::ids::new_uuid(&mut rng);
        let files = SqliteBackend::open(&self.store.dir, new_id)?;
        let link = StoreLink::default();
        let backend = LossyBackend {
            inner: files.clone(),
            link: link.clone(),
        };
        // A relay that comes back while a rolling upgrade is under way comes back on what the
        // operator deployed: on its older schema it would be refused at start, since the store
        // already serves a newer one (a downgrade; the hunt found this with `--upgrades`).
        self.relays[r].level = self.relays[r].level.max(self.relay_level);
        let level = self.relays[r].level.min(self.schemas.len() - 1);
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
        // The simulated relay ticks every 30 s (see `relay_tick`): the other relays' commits
        // reach it as notifications, the tick is the safety net for lost ones.
        let config = RelayConfig {
            tick_every_ms: 30 * SECOND,
            schemas: acceptance,
            ..RelayConfig::default()
        };
        let mut core = RelayCore::new(&backend, schema, config, Box::new(rng))?;
        core.set_fault_switches(self.fault_switches());
        if self.store.backend.is_none() {
            self.store.readers = (0..files.shard_count())
                .map(|n| files.open_shard(n))
                .collect::<Result<_, _>>()?;
            self.store.backend = Some(files);
        }
        let relay = &mut self.relays[r];
        relay.core = Some(core);
        relay.link = link;
        relay.timing = stream(self.opts.seed, &format!("{name}/timing{boot}"));
        self.trace.record(now, &format!("{name} boot {boot}"));
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
            Some(InjectedBug::IgnoreOtherRelays) => FaultSwitches {
                ignore_other_relays: true,
                ..FaultSwitches::default()
            },
            Some(InjectedBug::SkipAuthoritySettle) => FaultSwitches {
                skip_authority_settle: true,
                ..FaultSwitches::default()
            },
            None => FaultSwitches::default(),
        }
    }

    /// Turns the run's deliberate defect on (after setup), on every relay.
    pub fn arm_bugs(&mut self) {
        self.bugs_armed = true;
        let switches = self.fault_switches();
        for relay in &mut self.relays {
            if let Some(core) = &mut relay.core {
                core.set_fault_switches(switches);
            }
        }
    }

    /// A relay process dies: memory, connections and the unprocessed inbox are gone. With
    /// several, a random running one (its devices fail over to the others).
    pub fn relay_crash(&mut self) {
        let r = if self.relays.len() == 1 {
            0
        } else {
            let up = self.relays_up();
            match self.rng.faults.pick(&up) {
                Some(&r) => r,
                None => return,
            }
        };
        let why = format!("{} crashed", self.relay_name(r));
        if !self.relay_stop(r, &why) {
            return;
        }
        self.stats.count_fault(Fault::RelayCrash);
        let delay = self.rng.faults.between(SECOND, 10 * MINUTE);
        self.schedule_in(delay, Event::RelayRestart(r));
    }

    /// Relay `r` ends (a crash, an upgrade): memory, connections and the unprocessed inbox are
    /// gone. False if it was not running.
    pub fn relay_stop(&mut self, r: usize, why: &str) -> bool {
        let relay = &mut self.relays[r];
        if relay.core.take().is_none() {
            return false;
        }
        relay.inbox.clear();
        // Jobs not run were never committed; reports not delivered were, but nobody heard.
        relay.jobs.clear();
        relay.worker_scheduled.clear();
        relay.reports.clear();
        let now = self.now();
        self.trace.record(now, why);
        let open: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.open && c.relay == r)
            .map(|(id, _)| *id)
            .collect();
        for conn in open {
            self.reset_conn(conn, why);
        }
        true
    }

    /// Opens a connection from a device to relay `r`, which must be up.
    pub fn open_conn(&mut self, device: usize, r: usize) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        let now = self.now();
        self.conns.insert(
            id,
            crate::world::Conn {
                device,
                relay: r,
                open: true,
                last_to_relay: now,
                last_to_device: now,
            },
        );
        if let Some(core) = &mut self.relays[r].core {
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
        let (device, r) = (c.device, c.relay);
        let relay = &mut self.relays[r];
        if let Some(core) = &mut relay.core {
            core.handle([Input::Closed(conn)], 0);
        }
        relay.inbox.retain(|(c, _)| *c != conn);
        let now = self.now();
        self.trace.record(now, &format!("reset conn{conn} dev{device}: {why}"));
        // The device notices a moment later (its next read fails).
        let at = now + 1 + self.net.latency_ms;
        self.schedule(at, Event::CloseAtDevice(conn, why.to_string()));
    }

    pub fn on_to_relay(&mut self, conn: ConnId, bytes: Vec<u8>) {
        let Some(r) = self.conns.get(&conn).filter(|c| c.open).map(|c| c.relay) else {
            return; // lost with the connection
        };
        if !self.relays[r].is_up() {
            return;
        }
        match ClientMessage::decode(&bytes) {
            Ok(msg) => {
                let relay = &mut self.relays[r];
                relay.inbox.push((conn, msg));
                if !relay.process_scheduled {
                    relay.process_scheduled = true;
                    let now = self.now();
                    self.schedule(now, Event::RelayProcess(r));
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
    pub fn relay_process(&mut self, r: usize) {
        let now = self.now();
        let name = self.relay_name(r);
        let relay = &mut self.relays[r];
        relay.process_scheduled = false;
        let inbox = std::mem::take(&mut relay.inbox);
        let Some(core) = &mut relay.core else { return };
        if inbox.is_empty() {
            return;
        }
        self.stats.groups += 1;
        self.trace.record(now, &format!("{name} group of {}", inbox.len()));
        let step = core
            .front_mut()
            .handle(inbox.into_iter().map(|(conn, msg)| Input::message(conn, msg)), now);
        self.queue_jobs(r, step.jobs);
        self.route(r, step.outputs);
    }

    /// Hands jobs to their shards' workers, each of which runs a little later.
    fn queue_jobs(&mut self, r: usize, jobs: Vec<(u32, Job)>) {
        for (shard, job) in jobs {
            let relay = &mut self.relays[r];
            relay.jobs.entry(shard).or_default().push(job);
            if relay.worker_scheduled.insert(shard) {
                let delay = relay.timing.between(1, 40);
                self.schedule_in(delay, Event::WorkerRun(r, shard));
            }
        }
    }

    /// A shard's worker decides and commits every job waiting for it as one group; its report
    /// reaches the front a little later, and the other relays hear of the commit.
    pub fn worker_run(&mut self, r: usize, shard: u32) {
        let now = self.now();
        let label = if self.cluster_size() == 1 {
            format!("shard{shard}")
        } else {
            format!("{} shard{shard}", self.relay_name(r))
        };
        let relay = &mut self.relays[r];
        relay.worker_scheduled.remove(&shard);
        let jobs = relay.jobs.remove(&shard).unwrap_or_default();
        let Some(core) = &mut relay.core else { return };
        let Some(worker) = core.workers_mut().get_mut(shard as usize) else {
            return;
        };
        if jobs.is_empty() {
            return;
        }
        self.trace.record(now, &format!("{label} group of {}", jobs.len()));
        let report = worker.handle(jobs, now);
        let spaces: BTreeSet<Uuid> = report.applied.iter().map(|a| a.entry.space_id).collect();
        let id = relay.next_report;
        relay.next_report += 1;
        relay.reports.insert(id, report);
        let delay = relay.timing.between(0, 20);
        self.schedule_in(delay, Event::WorkerReport(r, id));
        if !spaces.is_empty() {
            self.notify_commit(r, spaces.into_iter().collect());
        }
    }

    /// A worker's report arrives at the front: answers, then the live fan-out of its rows.
    pub fn worker_report(&mut self, r: usize, id: u64) {
        let now = self.now();
        let relay = &mut self.relays[r];
        let Some(report) = relay.reports.remove(&id) else {
            return;
        };
        let Some(core) = &mut relay.core else { return };
        let step = core.front_mut().handle_report(report, now);
        self.queue_jobs(r, step.jobs);
        self.route(r, step.outputs);
    }

    pub fn relay_tick(&mut self, r: usize) {
        let now = self.now();
        if let Some(core) = &mut self.relays[r].core {
            let outputs = core.handle([Input::Tick], now);
            self.route(r, outputs);
        }
        self.schedule_in(30 * SECOND, Event::RelayTick(r));
    }

    /// What another relay's commit (or a lost notification's catch-up) makes relay `r` do.
    pub fn relay_store_changed(&mut self, r: usize, spaces: Option<Vec<Uuid>>) {
        let now = self.now();
        if let Some(core) = &mut self.relays[r].core {
            self.stats.notices += 1;
            let outputs = core.handle([Input::StoreChanged { spaces, access: false }], now);
            self.route(r, outputs);
        }
    }

    fn route(&mut self, r: usize, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send(conn, msg) => self.relay_send(conn, msg),
                Output::Close(conn, reason) => {
                    if let Some(c) = self.conns.get_mut(&conn)
                        && c.open
                    {
                        c.open = false;
                        if let Some(core) = &mut self.relays[r].core {
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
