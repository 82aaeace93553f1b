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
}

impl Fault {
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
        FaultSet(Fault::ALL.into_iter().collect())
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
            let f = Fault::ALL.into_iter().find(|f| f.as_str() == part).ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.as_str()).collect();
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
}

impl FromStr for InjectedBug {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.replace('-', "_").as_str() {
            "skip_version_gate" => Ok(InjectedBug::SkipVersionGate),
            "ack_before_commit" => Ok(InjectedBug::AckBeforeCommit),
            "ignore_receipts" => Ok(InjectedBug::IgnoreReceipts),
            other => Err(format!(
                "unknown bug `{other}` (expected skip_version_gate, ack_before_commit or ignore_receipts)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimOptions {
    pub seed: u64,
    pub devices: usize,
    /// User actions (writes, resolutions) before healing and draining.
    pub steps: u64,
    pub faults: FaultSet,
    pub bug: Option<InjectedBug>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            devices: 6,
            steps: 300,
            faults: FaultSet::all(),
            bug: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_lists_parse_and_print() {
        let s: FaultSet = "reset,lost-ack,skew".parse().unwrap();
        assert_eq!(s.to_string(), "reset,lost_ack,skew");
        assert_eq!("all".parse::<FaultSet>().unwrap(), FaultSet::all());
        assert!("reset,explode".parse::<FaultSet>().unwrap_err().contains("explode"));
    }
}
