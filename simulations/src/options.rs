//! What a simulation run is asked to do: seed, size, faults. Everything that changes a run's
//! outcome is here, so a trace header holding these options replays the run.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kinds of fault the simulator can inject (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Message latency and jitter (always on when any fault is on).
    Latency,
    /// Connections reset at random moments, also mid-batch.
    Reset,
    /// The relay's answer to a push is lost (the device retries the same mutation ids).
    LostAck,
    /// A device cannot reach the relay for a while.
    Partition,
    /// A device stays offline for days (its user works without signal).
    Offline,
    /// The relay process crashes and restarts: files reopened, all memory lost.
    RelayCrash,
    /// A device crashes and restarts.
    DeviceCrash,
    /// Device clocks skewed by hours to days, with jumps backwards.
    Skew,
    /// A relay of a cluster loses its store connection for a while (only with `--relays` ≥ 2;
    /// see [`crate::store_loss`]).
    StoreLoss,
}

impl Fault {
    /// The kinds a swarm seed draws one by one (the cluster's is drawn apart, on its own
    /// stream, so every swarm seed keeps its shape).
    pub const ALL: [Fault; 8] = [
        Fault::Latency,
        Fault::Reset,
        Fault::LostAck,
        Fault::Partition,
        Fault::Offline,
        Fault::RelayCrash,
        Fault::DeviceCrash,
        Fault::Skew,
    ];

    /// Every kind: [`Fault::ALL`] and the cluster's last (a one-relay run never draws for it,
    /// so adding it kept every such run what it was).
    pub fn every() -> impl Iterator<Item = Fault> {
        Fault::ALL.into_iter().chain([Fault::StoreLoss])
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Latency => "latency",
            Fault::Reset => "reset",
            Fault::LostAck => "lost_ack",
            Fault::Partition => "partition",
            Fault::Offline => "offline",
            Fault::RelayCrash => "relay_crash",
            Fault::DeviceCrash => "device_crash",
            Fault::Skew => "skew",
            Fault::StoreLoss => "store_loss",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of faults: `all`, `none`, or a comma-separated list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSet(pub BTreeSet<Fault>);

impl FaultSet {
    pub fn all() -> Self {
        FaultSet(Fault::every().collect())
    }
    pub fn none() -> Self {
        FaultSet(BTreeSet::new())
    }
    pub fn has(&self, f: Fault) -> bool {
        self.0.contains(&f)
    }
}

impl FromStr for FaultSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "all" => return Ok(FaultSet::all()),
            "none" | "" => return Ok(FaultSet::none()),
            _ => {}
        }
        let mut set = BTreeSet::new();
        for part in s.split(',') {
            let part = part.trim().replace('-', "_");
            let f = Fault::every().find(|f| f.as_str() == part).ok_or_else(|| {
                let names: Vec<&str> = Fault::every().map(Fault::as_str).collect();
                format!(
                    "unknown fault `{part}` (expected all, none or some of: {})",
                    names.join(", ")
                )
            })?;
            set.insert(f);
        }
        Ok(FaultSet(set))
    }
}

impl fmt::Display for FaultSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.0.iter().map(|f| f.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

/// Deliberate defects in the relay core, to prove the simulator catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectedBug {
    SkipVersionGate,
    AckBeforeCommit,
    IgnoreReceipts,
    /// A relay of a cluster never reads what the others committed (needs `--relays` ≥ 2).
    IgnoreOtherRelays,
    /// A service's write over a person's concurrent provisional value is not settled (needs
    /// `--wearables`).
    SkipAuthoritySettle,
}

impl FromStr for InjectedBug {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.replace('-', "_").as_str() {
            "skip_version_gate" => Ok(InjectedBug::SkipVersionGate),
            "ack_before_commit" => Ok(InjectedBug::AckBeforeCommit),
            "ignore_receipts" => Ok(InjectedBug::IgnoreReceipts),
            "ignore_other_relays" => Ok(InjectedBug::IgnoreOtherRelays),
            "skip_authority_settle" => Ok(InjectedBug::SkipAuthoritySettle),
            other => Err(format!(
                "unknown bug `{other}` (expected skip_version_gate, ack_before_commit, ignore_receipts, \
                 ignore_other_relays or skip_authority_settle)"
            )),
        }
    }
}

/// How a run's world behaves beyond its size and fault kinds: how often faults fire and how
/// the users write. The default is the shape every fixed-size run has always had (old seeds and
/// traces keep their meaning); a swarm run draws it from the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Shape {
    /// How often each fault kind fires, as a multiple of its usual rate (its gaps divided by it).
    pub fault_rate: f64,
    /// Chance that an edit goes to one of the two hot records of its type.
    pub hot_skew: f64,
    /// Chance that the next user acts within seconds of the last (a busy moment).
    pub burst: f64,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            fault_rate: 1.0,
            hot_skew: 0.7,
            burst: 0.3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimOptions {
    pub seed: u64,
    pub devices: usize,
    /// User actions (writes, resolutions) before healing and draining.
    pub steps: u64,
    pub faults: FaultSet,
    pub bug: Option<InjectedBug>,
    #[serde(default)]
    pub shape: Shape,
    /// The schema-upgrade workload: the relay moves from v1 to v3 and devices update their
    /// app at random steps, writing fields only newer versions know and old field names only
    /// older versions use (see [`crate::upgrades`]).
    #[serde(default)]
    pub upgrades: bool,
    /// Relay processes sharing one store (SPEC §13): devices land on any running one, each
    /// hears of the others' commits through notifications that can be late or lost, and a
    /// crashed relay's devices fail over to the others (see [`crate::cluster`]).
    #[serde(default = "one_relay")]
    pub relays: usize,
    /// The field-authority workload (SPEC §17): the gym's service imports watch data into
    /// workouts people are editing and imports runs people also log by hand; people merge or
    /// dismiss the duplicates the relay flags (see [`crate::wearables`]).
    #[serde(default)]
    pub wearables: bool,
}

fn one_relay() -> usize {
    1
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            devices: 6,
            steps: 300,
            faults: FaultSet::all(),
            bug: None,
            shape: Shape::default(),
            upgrades: false,
            relays: 1,
            wearables: false,
        }
    }
}

/// The bounds a swarm run draws its shape from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwarmBounds {
    pub devices: (u64, u64),
    pub steps: (u64, u64),
}

impl SwarmBounds {
    /// The hunting range: 2–24 devices, 100–1,500 steps.
    pub const HUNT: SwarmBounds = SwarmBounds {
        devices: (2, 24),
        steps: (100, 1_500),
    };
    /// CI's range, smaller so that 300 seeds fit its budget in the test build (2–8 devices,
    /// 60–300 steps).
    pub const CI: SwarmBounds = SwarmBounds {
        devices: (2, 8),
        steps: (60, 300),
    };
}

impl SimOptions {
    /// A swarm run (TigerBeetle's swarm testing): the seed draws the whole shape of the run —
    /// its size, which faults are on and how often they fire, how skewed towards hot records the
    /// writes are and how bursty — so a sweep covers combinations no one wrote down. The draw
    /// has its own stream: the run itself then uses the seed exactly as a fixed-shape run does.
    pub fn swarm(seed: u64, bounds: SwarmBounds) -> SimOptions {
        use crate::rng::{Draw, stream};
        let mut rng = stream(seed, "swarm");
        let devices = rng.between(bounds.devices.0, bounds.devices.1) as usize;
        let steps = rng.between(bounds.steps.0, bounds.steps.1);
        let mut faults = BTreeSet::new();
        for f in Fault::ALL {
            if rng.chance(0.6) {
                faults.insert(f);
            }
        }
        let fault_rate = *rng.pick(&[0.25, 0.5, 1.0, 2.0, 4.0]).unwrap_or(&1.0);
        let hot_skew = rng.between(0, 95) as f64 / 100.0;
        let burst = rng.between(0, 80) as f64 / 100.0;
        // Its own stream, so the draws above stay what they were before upgrades existed.
        let upgrades = stream(seed, "swarm/upgrades").chance(0.3);
        // A cluster for about a third of the seeds, likewise on its own stream.
        let mut cluster = stream(seed, "swarm/relays");
        let relays = if cluster.chance(0.3) {
            cluster.between(2, 3) as usize
        } else {
            1
        };
        if relays > 1 && cluster.chance(0.6) {
            faults.insert(Fault::StoreLoss);
        }
        // The field-authority workload for 40 % of the seeds, on its own stream too.
        let wearables = stream(seed, "swarm/wearables").chance(0.4);
        SimOptions {
            seed,
            devices,
            steps,
            faults: FaultSet(faults),
            bug: None,
            shape: Shape {
                fault_rate,
                hot_skew,
                burst,
            },
            upgrades,
            relays,
            wearables,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swarm_shape_is_the_seeds_own_and_stays_in_bounds() {
        assert_eq!(
            SimOptions::swarm(7, SwarmBounds::HUNT),
            SimOptions::swarm(7, SwarmBounds::HUNT)
        );
        let shapes: Vec<SimOptions> = (0..200).map(|s| SimOptions::swarm(s, SwarmBounds::HUNT)).collect();
        for o in &shapes {
            assert!(
                (2..=24).contains(&o.devices) && (100..=1_500).contains(&o.steps),
                "{o:?}"
            );
            assert!((0.0..=0.95).contains(&o.shape.hot_skew) && (0.0..=0.8).contains(&o.shape.burst));
        }
        // The draws vary: sizes, fault sets and rates all take several values.
        let distinct = |f: &dyn Fn(&SimOptions) -> String| shapes.iter().map(f).collect::<BTreeSet<_>>().len();
        assert!(distinct(&|o| o.devices.to_string()) > 10);
        assert!(distinct(&|o| o.faults.to_string()) > 50);
        assert_eq!(distinct(&|o| o.shape.fault_rate.to_string()), 5);
    }

    #[test]
    fn an_old_trace_header_without_a_shape_reads_as_the_default_shape() {
        let old = r#"{"seed":3,"devices":8,"steps":600,"faults":["latency"],"bug":null}"#;
        let o: SimOptions = serde_json::from_str(old).unwrap();
        assert_eq!(o.shape, Shape::default());
    }

    #[test]
    fn fault_lists_parse_and_print() {
        let s: FaultSet = "reset,lost-ack,skew".parse().unwrap();
        assert_eq!(s.to_string(), "reset,lost_ack,skew");
        assert_eq!("all".parse::<FaultSet>().unwrap(), FaultSet::all());
        assert!("reset,explode".parse::<FaultSet>().unwrap_err().contains("explode"));
    }
}
