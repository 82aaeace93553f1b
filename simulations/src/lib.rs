//! `fieldsync-simulations`: the deterministic multi-device simulator.
//!
//! [`run`] builds a world (the production relay core and device cores on real SQLite files, a
//! simulated network and clock), lets simulated users work through days of clinic and gym
//! traffic while faults are injected, then heals every fault, lets every queue drain, and checks
//! the invariants of SPEC §11. The same options give the same trace hash.
//!
//! Modules: [`world`] (event loop), [`relay_side`] / [`device_side`] (the cores' shells),
//! [`cluster`] (several relays on one store),
//! [`scenario`] / [`workload`] / [`users`] (who does what), [`faults`], [`oracle`] and
//! [`checks`] (invariants), [`upgrades`] (mixed schema versions), [`trace`], [`report`],
//! [`options`], [`rng`], [`clock`].

pub mod checks;
pub mod clock;
pub mod cluster;
pub mod device_side;
pub mod faults;
pub mod load;
pub mod options;
pub mod oracle;
pub mod relay_side;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod soak;
pub mod store_loss;
pub mod synth;
pub mod trace;
pub mod upgrades;
pub mod users;
pub mod wearables;
pub mod workload;
pub mod world;

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub use options::{Fault, FaultSet, InjectedBug, Shape, SimOptions, SwarmBounds};
pub use report::Report;

use crate::clock::{HOUR, SECOND};
use crate::trace::Trace;
use crate::world::{Event, World};

/// How long after healing everything must have converged (simulated time).
pub const DRAIN_LIMIT_MS: u64 = 12 * HOUR;

/// A scratch directory for the run's SQLite files: tmpfs when the machine has one (the files
/// are real SQLite files either way; tmpfs only makes fsync cheap).
fn scratch_dir() -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new().prefix("fieldsync-sim-").tempdir_in(shm)
    {
        return Ok(d);
    }
    Ok(tempfile::Builder::new().prefix("fieldsync-sim-").tempdir()?)
}

/// Runs one simulation. `trace` writes every event to a file; `progress` draws a bar.
pub fn run(opts: SimOptions, trace: Option<&Path>, progress: bool) -> anyhow::Result<Report> {
    anyhow::ensure!(opts.devices >= 1, "at least one device is needed");
    anyhow::ensure!(opts.relays >= 1, "at least one relay is needed");
    anyhow::ensure!(
        opts.bug != Some(InjectedBug::IgnoreOtherRelays) || opts.relays >= 2,
        "the ignore_other_relays defect needs a cluster (--relays 2 or more)"
    );
    let started = Instant::now();
    let dir = scratch_dir()?;
    let mut w = World::new(opts.clone(), dir.path().to_path_buf(), Trace::new(&opts, trace)?);
    w.setup()?;
    w.arm_bugs();
    let start_ms = w.now();
    w.schedule_in(SECOND, Event::Workload);
    for r in 0..w.relays.len() {
        // Relays tick at their own moments, as separate processes do.
        w.schedule_in(30 * SECOND + r as u64 * 7 * SECOND, Event::RelayTick(r));
    }
    w.schedule_in(2 * HOUR, Event::Checkpoint);
    w.schedule_faults();

    let bar = progress.then(|| {
        let b = ProgressBar::new(opts.steps);
        if let Ok(style) = ProgressStyle::with_template("{spinner} seed {msg} [{bar:30}] {pos}/{len} steps ({elapsed})")
        {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_message(opts.seed.to_string());
        b
    });
    while w.stats.steps < opts.steps && w.oracle.violations.is_empty() {
        let Some(ev) = w.next_event(u64::MAX) else { break };
        w.dispatch(ev)?;
        if let Some(b) = &bar {
            b.set_position(w.stats.steps);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    let mut converged = false;
    if w.oracle.violations.is_empty() {
        w.heal()?;
        let deadline = w.now() + DRAIN_LIMIT_MS;
        let mut since_check = 0u32;
        while w.oracle.violations.is_empty() {
            since_check += 1;
            if since_check >= 50 {
                since_check = 0;
                if w.settled() {
                    converged = true;
                    break;
                }
            }
            let Some(ev) = w.next_event(deadline) else {
                converged = w.settled();
                break;
            };
            w.dispatch(ev)?;
        }
        if w.oracle.violations.is_empty() {
            w.final_checks(converged);
        }
    }

    let sim_ms = w.now() - start_ms;
    let wall = started.elapsed().as_secs_f64();
    let events = w.stats.events;
    let conflicts = w.oracle.conflicts_prompted;
    let rejections = w.oracle.rejections;
    let applied = w.oracle.applied.len() as u64;
    let violations = w.oracle.violations.clone();
    let stats = w.stats.clone();
    let trace_hash = std::mem::replace(&mut w.trace, Trace::new(&opts, None)?).finish()?;
    Ok(Report {
        seed: opts.seed,
        devices: opts.devices,
        steps: opts.steps,
        faults: opts.faults.to_string(),
        relays: opts.relays,
        bug: opts.bug.map(|b| format!("{b:?}")),
        shape: opts.shape.clone(),
        simulated_hours: sim_ms as f64 / HOUR as f64,
        wall_seconds: wall,
        events_per_second: events as f64 / wall.max(1e-9),
        mutations_applied: applied,
        conflicts_prompted: conflicts,
        rejections,
        stats,
        converged,
        trace_hash,
        violations,
    })
}

impl World {
    fn dispatch(&mut self, ev: Event) -> anyhow::Result<()> {
        match ev {
            Event::Workload => self.workload_step(),
            Event::DeviceWake(i) => self.on_device_wake(i),
            Event::ToRelay(conn, bytes) => self.on_to_relay(conn, bytes),
            Event::ToDevice(conn, bytes) => self.on_to_device(conn, bytes),
            Event::CloseAtDevice(conn, reason) => self.on_close_at_device(conn, &reason),
            Event::RelayProcess(r) => self.relay_process(r),
            Event::RelayTick(r) => self.relay_tick(r),
            Event::WorkerRun(r, shard) => self.worker_run(r, shard),
            Event::WorkerReport(r, id) => self.worker_report(r, id),
            Event::StoreNotice(r, spaces) => self.relay_store_changed(r, spaces),
            Event::Fault(f) => self.inject(f),
            Event::RelayUpgrade(r) => self.relay_upgrade_one(r),
            Event::StoreBack(r) => self.store_back(r),
            Event::RelayRestart(r) => {
                if !self.relays[r].is_up() {
                    self.relay_boot(r)?;
                    // Everything acknowledged before the crash must have survived it.
                    self.checkpoint();
                }
            }
            Event::DeviceRestart(i) => {
                if self.devices[i].dev.is_none() {
                    self.device_boot(i)?;
                }
            }
            Event::NetworkBack(i) => self.on_network_back(i),
            Event::UserResolves(i) => self.on_user_resolves(i),
            Event::Checkpoint => {
                self.checkpoint();
                self.schedule_in(2 * HOUR, Event::Checkpoint);
            }
        }
        Ok(())
    }

    /// Every relay is up and every device is connected, caught up and has nothing left to do.
    fn settled(&self) -> bool {
        self.relays.iter().all(|r| r.is_up())
            && self.in_flight == 0
            && (0..self.devices.len()).all(|i| self.device_settled(i))
    }
}
