//! Crash soaks with real processes (`fieldsync-sim crash-soak`): the relay killed with SIGKILL
//! under load from many devices, and devices killed mid-write and mid-sync. Unlike the
//! simulator, nothing here is simulated: real binaries, real files, real sockets, real kills.
//! The figures say what survived; [`SoakReport::ok`] says whether every promise held.

pub mod device_kills;
pub mod relay_kills;
pub mod relay_view;

use serde::Serialize;

#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Relay kills (one per cycle).
    pub cycles: usize,
    /// Devices writing and syncing while the relay is killed.
    pub devices: usize,
    pub spaces: usize,
    /// Local writes per device per cycle (creates and edits of its own records).
    pub writes_per_cycle: usize,
    /// The first cycle's kill lands within this many ms of the devices connecting; later
    /// cycles kill within the time a whole round took when no kill cut it.
    pub kill_window_ms: u64,
    /// Device processes started and killed (or left to finish) at random moments.
    pub device_cycles: usize,
    /// Device directories the device cycles spread over.
    pub killed_devices: usize,
    pub seed: u64,
}

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions {
            cycles: 100,
            devices: 50,
            spaces: 10,
            writes_per_cycle: 4,
            kill_window_ms: 200,
            device_cycles: 200,
            killed_devices: 4,
            seed: 1,
        }
    }
}

/// The relay-kill half.
#[derive(Debug, Default, Serialize)]
pub struct RelayKillFigures {
    pub relay_kills: u64,
    /// Device sync rounds a kill cut short.
    pub syncs_cut: u64,
    /// Kills that cut some devices' rounds while others had completed theirs.
    pub kills_mid_round: u64,
    /// Local writes made (each one outbox item).
    pub writes: u64,
    /// Acknowledged mutations checked against the relay's store after the kills (cumulative:
    /// every acknowledged mutation is checked again after every later kill).
    pub acked_checked: u64,
    /// Acknowledged mutations missing from the relay's store after a kill. Must be 0.
    pub acked_lost: u64,
    /// Mutations applied more than once. Must be 0.
    pub duplicates: u64,
    /// Device mutations missing from the relay after the final drain. Must be 0.
    pub lost_after_drain: u64,
    /// A relay entry under a device's mutation id that is not that device's write. Must be 0.
    pub mutation_ids_reused: u64,
    /// Relay entries no device wrote. Must be 0.
    pub unexplained_on_relay: u64,
    pub relay_mutations: u64,
    pub devices_not_drained: u64,
    pub spaces_diverged: u64,
    pub audit_records: u64,
    /// Audit chains that did not verify, or feeds with a gap, over all checks. Must be 0.
    pub audit_failures: u64,
    pub restart_ms_p50: f64,
    pub restart_ms_max: f64,
    pub seconds: f64,
}

impl RelayKillFigures {
    pub fn ok(&self) -> bool {
        self.acked_lost == 0
            && self.duplicates == 0
            && self.lost_after_drain == 0
            && self.mutation_ids_reused == 0
            && self.unexplained_on_relay == 0
            && self.devices_not_drained == 0
            && self.spaces_diverged == 0
            && self.audit_failures == 0
    }
}

/// The device-kill half.
#[derive(Debug, Default, Serialize)]
pub struct DeviceKillFigures {
    pub kills: u64,
    pub kills_mid_write: u64,
    pub kills_mid_sync: u64,
    pub writes_acknowledged: u64,
    pub syncs_completed: u64,
    /// Acknowledged local writes missing (or with a value no write gave it). Must be 0.
    pub acked_local_lost: u64,
    /// Device databases that would not open after a kill. Must be 0.
    pub opens_failed: u64,
    pub first_open_error: Option<String>,
    /// One mutation id carrying two different writes. Must be 0.
    pub mutation_ids_reused: u64,
    pub lost_after_drain: u64,
    pub duplicates: u64,
    /// Records on a device no write explains. Must be 0.
    pub unexplained_local: u64,
    pub devices_not_drained: u64,
    pub diverged: bool,
    pub audit_failures: u64,
    pub seconds: f64,
}

impl DeviceKillFigures {
    pub fn ok(&self) -> bool {
        self.acked_local_lost == 0
            && self.opens_failed == 0
            && self.mutation_ids_reused == 0
            && self.lost_after_drain == 0
            && self.duplicates == 0
            && self.unexplained_local == 0
            && self.devices_not_drained == 0
            && !self.diverged
            && self.audit_failures == 0
    }
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub ok: bool,
    pub relay: RelayKillFigures,
    pub devices: DeviceKillFigures,
}

/// Runs both halves on scratch directories (removed afterwards unless the soak failed, so a
/// failure leaves its files to look at; the report names them).
pub fn run(opts: &SoakOptions) -> anyhow::Result<(SoakReport, Option<std::path::PathBuf>)> {
    let scratch = tempfile::Builder::new().prefix("fieldsync-soak-").tempdir()?;
    let relay = relay_kills::run(opts, &scratch.path().join("relay-kills"))?;
    let devices = device_kills::run(opts, &scratch.path().join("device-kills"))?;
    let ok = relay.ok() && devices.ok();
    let kept = (!ok).then(|| scratch.keep());
    Ok((SoakReport { ok, relay, devices }, kept))
}
