//! Several relays on one store (`--relays R`, SPEC §13), the way a PostgreSQL cluster runs them:
//! the production cores share one data directory (several connections to one SQLite file are
//! the same concurrency model as several relays on one database, and deterministic here), a
//! load balancer sends each new connection to a running relay, and a relay hears of the others'
//! commits through notifications — simulated messages that arrive late, or not at all when the
//! relay's notification connection drops (it then asks for everything once it is back, as
//! `server::notify` does), with the relays' ticks as the safety net.
//!
//! With one relay nothing here draws randomness or sends anything, so a one-relay run is the
//! run it always was.

use uuid::Uuid;

use crate::clock::SECOND;
use crate::rng::Draw;
use crate::world::{Event, World};

/// Chance that a commit's notification to one relay is lost with its notification connection.
const NOTICE_LOSS: f64 = 0.05;
/// Of those losses, the share after which the listener reconnects and asks for everything; the
/// others are left to the tick (a notification that never came, with nothing to say so).
const LOSS_REPORTED: f64 = 0.7;

impl World {
    /// The relay a new connection lands on: a running one, as a load balancer picks (none while
    /// every relay is down).
    pub fn balance(&mut self) -> Option<usize> {
        if self.relays.len() == 1 {
            return self.relays[0].is_up().then_some(0);
        }
        let up = self.relays_up();
        self.rng.cluster.pick(&up).copied()
    }

    /// Relay `from` committed rows of `spaces`: every other running relay is told, a little
    /// later, unless its notification connection drops on the way.
    pub fn notify_commit(&mut self, from: usize, spaces: Vec<Uuid>) {
        if self.relays.len() == 1 {
            return;
        }
        for to in self.relays_up() {
            if to == from {
                continue;
            }
            if !self.healing && self.rng.cluster.chance(NOTICE_LOSS) {
                self.stats.notices_lost += 1;
                let now = self.now();
                self.trace
                    .record(now, &format!("{} misses a notification", self.relay_name(to)));
                if self.rng.cluster.chance(LOSS_REPORTED) {
                    let back = self.rng.cluster.between(SECOND, 5 * SECOND);
                    self.schedule_in(back, Event::StoreNotice(to, None));
                }
                continue;
            }
            let delay = self.rng.cluster.between(1, 200);
            self.schedule_in(delay, Event::StoreNotice(to, Some(spaces.clone())));
        }
    }

    /// A running relay loses its store connection for a while (`store_loss`): its workers'
    /// turns fail and are answered "try later", its reads fail, until the link is back.
    pub fn store_loss(&mut self) {
        let up = self.relays_up();
        let Some(&r) = self.rng.faults.pick(&up) else { return };
        let down_for = self.rng.faults.between(SECOND, 3 * crate::clock::MINUTE);
        self.stats.count_fault(crate::options::Fault::StoreLoss);
        let now = self.now();
        self.trace.record(
            now,
            &format!("{} loses its store for {down_for} ms", self.relay_name(r)),
        );
        self.relays[r].link.set_lost(true);
        self.schedule_in(down_for, Event::StoreBack(r));
    }

    /// The relay's store connection is back (a new one, as the production store reconnects).
    pub fn store_back(&mut self, r: usize) {
        if self.relays[r].link.is_lost() {
            let now = self.now();
            self.trace
                .record(now, &format!("{} has its store back", self.relay_name(r)));
            self.relays[r].link.set_lost(false);
        }
    }

    /// Every relay of a rolling upgrade after the first restarts onto `relay_level` at its own
    /// moment; the first goes now (with one relay, exactly the single relay's upgrade).
    pub fn relay_upgrade_one(&mut self, r: usize) {
        self.relays[r].level = self.relay_level;
        let now = self.now();
        let why = format!("{} upgraded", self.relay_name(r));
        self.trace.record(
            now,
            &format!(
                "{} upgrade to v{}",
                self.relay_name(r),
                self.schemas[self.relay_level].version()
            ),
        );
        if self.relay_stop(r, &why) {
            let delay = self.rng.upgrades.between(SECOND, 10 * crate::clock::MINUTE);
            self.schedule_in(delay, Event::RelayRestart(r));
        }
    }
}
