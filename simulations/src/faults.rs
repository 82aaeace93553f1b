//! Fault injection. Each enabled kind fires at random moments drawn from the fault stream;
//! every fault heals by itself (connections are re-established, processes restart, networks
//! come back), and nothing is injected once the run is healing.

use crate::clock::{DAY, HOUR, MINUTE};
use crate::options::Fault;
use crate::rng::Draw;
use crate::world::{Event, World};

impl World {
    /// Schedules the first occurrence of every enabled fault kind.
    pub fn schedule_faults(&mut self) {
        let kinds: Vec<Fault> = self.opts.faults.0.iter().copied().collect();
        for f in kinds {
            if let Some(gap) = self.fault_gap(f) {
                self.schedule_in(gap, Event::Fault(f));
            }
        }
    }

    /// Mean time between faults of a kind (drawn uniformly around it).
    fn fault_gap(&mut self, f: Fault) -> Option<u64> {
        let (lo, hi) = match f {
            Fault::Latency | Fault::LostAck => return None, // parameters, not events
            Fault::Reset => (self.net.reset_every_ms / 2, self.net.reset_every_ms * 3 / 2),
            Fault::Partition => (10 * MINUTE, 2 * HOUR),
            Fault::Offline => (DAY, 4 * DAY),
            Fault::RelayCrash => (2 * HOUR, 18 * HOUR),
            Fault::DeviceCrash => (HOUR, 12 * HOUR),
            Fault::Skew => (3 * HOUR, 24 * HOUR),
            Fault::StoreLoss if self.relays.len() > 1 => (HOUR, 8 * HOUR),
            Fault::StoreLoss => return None,
        };
        // A swarm shape fires faults more or less often than usual.
        let rate = self.opts.shape.fault_rate;
        let (lo, hi) = if rate == 1.0 {
            (lo, hi)
        } else {
            ((lo as f64 / rate) as u64, (hi as f64 / rate) as u64)
        };
        Some(self.rng.faults.between(lo.max(1), hi.max(1)))
    }

    pub fn inject(&mut self, f: Fault) {
        if self.healing {
            return;
        }
        match f {
            Fault::Reset => {
                let open: Vec<u64> = self.conns.iter().filter(|(_, c)| c.open).map(|(id, _)| *id).collect();
                if let Some(&conn) = self.rng.faults.pick(&open) {
                    self.stats.count_fault(f);
                    self.reset_conn(conn, "connection reset");
                }
            }
            Fault::Partition | Fault::Offline => {
                let n = self.devices.len() as u64;
                let i = self.rng.faults.below(n) as usize;
                let duration = if f == Fault::Partition {
                    self.rng.faults.between(5 * MINUTE, 3 * HOUR)
                } else {
                    self.rng.faults.between(DAY, 4 * DAY)
                };
                self.stats.count_fault(f);
                let now = self.now();
                self.trace.record(now, &format!("dev{i} {f} for {duration} ms"));
                self.take_offline(i, duration);
            }
            Fault::RelayCrash => self.relay_crash(),
            Fault::StoreLoss => self.store_loss(),
            Fault::DeviceCrash => {
                let alive: Vec<usize> = (0..self.devices.len())
                    .filter(|i| self.devices[*i].dev.is_some())
                    .collect();
                if let Some(&i) = self.rng.faults.pick(&alive) {
                    self.device_crash(i);
                }
            }
            Fault::Skew => {
                let i = self.rng.faults.below(self.devices.len() as u64) as usize;
                // Hours to days either way; a new draw can be far behind the old one (a jump back).
                let magnitude = self.rng.faults.between(HOUR, 3 * DAY) as i64;
                let skew = if self.rng.faults.chance(0.5) {
                    magnitude
                } else {
                    -magnitude
                };
                self.stats.count_fault(f);
                let now = self.now();
                self.trace.record(now, &format!("dev{i} clock skew {skew} ms"));
                self.devices[i].clock.set_skew(skew);
                self.reschedule_device(i);
            }
            Fault::Latency | Fault::LostAck => {}
        }
        if let Some(gap) = self.fault_gap(f) {
            self.schedule_in(gap, Event::Fault(f));
        }
    }

    /// Ends every fault: every relay and every device up, every network back.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        self.healing = true;
        let now = self.now();
        self.trace.record(now, "heal");
        for relay in &self.relays {
            relay.link.set_lost(false);
        }
        for r in 0..self.relays.len() {
            if !self.relays[r].is_up() {
                self.relay_boot(r)?;
            }
        }
        for i in 0..self.devices.len() {
            self.devices[i].net_down_until = 0;
            if self.devices[i].dev.is_none() {
                self.device_boot(i)?;
            } else {
                self.wake_device(i, now);
            }
            self.after_device_activity(i);
        }
        Ok(())
    }
}
