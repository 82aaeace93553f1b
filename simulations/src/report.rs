//! Counters of a run and the one-screen summary.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::options::Fault;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub events: u64,
    pub steps: u64,
    pub idle_steps: u64,
    pub local_writes: u64,
    pub local_refusals: u64,
    pub groups: u64,
    pub faults: BTreeMap<String, u64>,
    pub resolutions: u64,
    pub checkpoints: u64,
    pub invariant_checks: u64,
    /// The upgrade workload: schema upgrades of the relay and of devices, and writes of
    /// fields only newer versions know.
    pub relay_upgrades: u64,
    pub device_upgrades: u64,
    pub newer_field_writes: u64,
    /// A cluster run: commits seen through another relay's notification, notifications lost
    /// (the tick or a reconnect's catch-up found those rows), connections that landed on a
    /// relay other than the one the device last used (failover, or the balancer's choice).
    pub notices: u64,
    pub notices_lost: u64,
    pub relay_switches: u64,
    /// The field-authority workload: the service's imports of watch data, and the possible
    /// duplicates people merged or dismissed.
    pub imports: u64,
    pub duplicates_merged: u64,
    pub duplicates_dismissed: u64,
}

impl Stats {
    pub fn count_fault(&mut self, f: Fault) {
        *self.faults.entry(f.as_str().to_string()).or_insert(0) += 1;
    }
}

/// The outcome of one simulated run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub devices: usize,
    pub steps: u64,
    pub faults: String,
    pub relays: usize,
    pub bug: Option<String>,
    pub shape: crate::options::Shape,
    pub simulated_hours: f64,
    pub wall_seconds: f64,
    pub events_per_second: f64,
    pub mutations_applied: u64,
    pub conflicts_prompted: u64,
    pub rejections: u64,
    pub stats: Stats,
    pub converged: bool,
    pub trace_hash: String,
    pub violations: Vec<crate::oracle::Violation>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The one-screen summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let verdict = if self.ok() { "OK" } else { "VIOLATION" };
        s.push_str(&format!(
            "fieldsync-sim seed {} — {verdict}\n  devices {}, {}steps {}, faults {}{}\n",
            self.seed,
            self.devices,
            if self.relays > 1 {
                format!("relays {} on one store, ", self.relays)
            } else {
                String::new()
            },
            self.steps,
            self.faults,
            self.bug
                .as_ref()
                .map(|b| format!(", injected bug {b}"))
                .unwrap_or_default()
        ));
        if self.shape != crate::options::Shape::default() {
            s.push_str(&format!(
                "  swarm shape: faults at {}× their usual rate, hot-record skew {:.2}, bursts {:.2}\n",
                self.shape.fault_rate, self.shape.hot_skew, self.shape.burst
            ));
        }
        s.push_str(&format!(
            "  simulated {:.1} h in {:.2} s wall ({} events, {:.0} events/s)\n",
            self.simulated_hours, self.wall_seconds, self.stats.events, self.events_per_second
        ));
        s.push_str(&format!(
            "  local writes {} (refused locally {}), mutations applied {}, group commits {}\n",
            self.stats.local_writes, self.stats.local_refusals, self.mutations_applied, self.stats.groups
        ));
        s.push_str(&format!(
            "  conflicts prompted {}, resolved {}, rejections {}\n",
            self.conflicts_prompted, self.stats.resolutions, self.rejections
        ));
        if self.stats.relay_upgrades + self.stats.device_upgrades > 0 {
            s.push_str(&format!(
                "  schema upgrades: relay {}, devices {}; writes of fields only newer versions know {}\n",
                self.stats.relay_upgrades, self.stats.device_upgrades, self.stats.newer_field_writes
            ));
        }
        if self.relays > 1 {
            s.push_str(&format!(
                "  cluster: {} notifications delivered, {} lost; {} connections moved to another relay\n",
                self.stats.notices, self.stats.notices_lost, self.stats.relay_switches
            ));
        }
        let faults: Vec<String> = self.stats.faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
        s.push_str(&format!(
            "  faults injected: {}\n",
            if faults.is_empty() {
                "none".into()
            } else {
                faults.join(", ")
            }
        ));
        s.push_str(&format!(
            "  invariant checks {} over {} checkpoints; converged: {}\n  trace hash {}\n",
            self.stats.invariant_checks, self.stats.checkpoints, self.converged, self.trace_hash
        ));
        for v in &self.violations {
            s.push_str(&format!(
                "  VIOLATION {} at event {} ({} ms): {}{}\n",
                v.invariant,
                v.event,
                v.at_ms,
                v.detail,
                v.entity.as_ref().map(|e| format!(" [entity {e}]")).unwrap_or_default()
            ));
        }
        s
    }
}
