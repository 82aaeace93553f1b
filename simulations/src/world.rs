//! The simulated world: one time-ordered event queue driving the production relay core and the
//! production device cores over a simulated network, on real SQLite files.
//!
//! Nothing here is async and nothing reads a clock: time is [`WorldClock`], which only moves
//! when the next event is taken off the queue. Randomness comes from per-subsystem streams of
//! the run's seed. So a seed and options reproduce a run bit for bit (same trace hash).

use std::collections::{BTreeMap, BinaryHeap};
use std::path::PathBuf;
use std::sync::Arc;

use fieldsync_relay::core::ConnId;
use fieldsync_schema::Schema;
use rand_chacha::ChaCha20Rng;

use crate::clock::WorldClock;
use crate::clock::{EPOCH_MS, MINUTE};
use crate::device_side::SimDevice;
use crate::options::{Fault, SimOptions};
use crate::oracle::Oracle;
use crate::relay_side::{SharedStore, SimRelay};
use crate::report::Stats;
use crate::rng::stream;
use crate::trace::Trace;
use crate::upgrades::UpgradePlan;

#[derive(Debug, Clone)]
pub enum Event {
    /// A user does something on a device.
    Workload,
    /// A device's timer (reconnect, retry, timeout) or a connection attempt.
    DeviceWake(usize),
    /// Bytes arrive at the relay on a connection.
    ToRelay(ConnId, Vec<u8>),
    /// Bytes arrive at a device on a connection.
    ToDevice(ConnId, Vec<u8>),
    /// The connection's closing reaches the device (after everything sent before it).
    CloseAtDevice(ConnId, String),
    /// A relay handles everything in its inbox as one group commit.
    RelayProcess(usize),
    /// A relay's periodic tick (revocations, memberships, challenge expiry, other relays'
    /// commits it was not told of).
    RelayTick(usize),
    /// A shard's worker of a relay takes the jobs waiting for it.
    WorkerRun(usize, u32),
    /// A worker's report (by id) reaches its relay's front.
    WorkerReport(usize, u64),
    /// Another relay's commit (of these spaces; `None`: anything, after a lost notification
    /// connection came back) reaches a relay, as PostgreSQL's `NOTIFY` does in production.
    StoreNotice(usize, Option<Vec<uuid::Uuid>>),
    /// Inject one fault of the given kind.
    Fault(Fault),
    /// A crashed relay or device comes back.
    RelayRestart(usize),
    /// A relay of a rolling upgrade restarts on the cluster's newest schema.
    RelayUpgrade(usize),
    /// A relay's lost store connection is back.
    StoreBack(usize),
    DeviceRestart(usize),
    /// A partitioned or offline device regains the network.
    NetworkBack(usize),
    /// A simulated user looks at their device's conflicts and rejections.
    UserResolves(usize),
    /// Periodic invariant checkpoint.
    Checkpoint,
}

impl Event {
    /// Events that stand for something still travelling or waiting to be processed.
    fn is_in_flight(&self) -> bool {
        matches!(
            self,
            Event::ToRelay(..)
                | Event::ToDevice(..)
                | Event::CloseAtDevice(..)
                | Event::RelayProcess(..)
                | Event::WorkerRun(..)
                | Event::WorkerReport(..)
                | Event::StoreNotice(..)
        )
    }
}

#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // BinaryHeap is a max-heap: reverse so the earliest (then first scheduled) comes out first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// One open or recently closed connection between a device and a relay.
#[derive(Debug, Clone)]
pub struct Conn {
    pub device: usize,
    /// Which relay of the cluster the load balancer sent it to.
    pub relay: usize,
    pub open: bool,
    /// Delivery times so far, per direction: TCP never reorders within a connection.
    pub last_to_relay: u64,
    pub last_to_device: u64,
}

/// Randomness for the world's subsystems.
pub struct Streams {
    pub workload: ChaCha20Rng,
    pub net: ChaCha20Rng,
    pub faults: ChaCha20Rng,
    pub users: ChaCha20Rng,
    /// The upgrade workload's choices (unused when it is off, so other runs stay as they were).
    pub upgrades: ChaCha20Rng,
    /// The cluster's: which relay a connection lands on, notifications between relays (unused
    /// with one relay).
    pub cluster: ChaCha20Rng,
    /// The field-authority workload's choices (unused when it is off).
    pub wearables: ChaCha20Rng,
}

/// Network parameters drawn per seed.
#[derive(Debug, Clone, Copy)]
pub struct NetParams {
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub reset_every_ms: u64,
    pub lost_ack_chance: f64,
}

pub struct World {
    pub opts: SimOptions,
    pub dir: PathBuf,
    pub clock: WorldClock,
    queue: BinaryHeap<Scheduled>,
    next_seq: u64,
    /// The relays, on one shared store (one unless `--relays`).
    pub relays: Vec<SimRelay>,
    pub store: SharedStore,
    /// The schema level the operator has deployed (relays restart onto it one by one).
    pub relay_level: usize,
    pub devices: Vec<SimDevice>,
    pub conns: BTreeMap<ConnId, Conn>,
    pub next_conn: ConnId,
    pub rng: Streams,
    pub net: NetParams,
    pub oracle: Oracle,
    pub trace: Trace,
    pub stats: Stats,
    /// Set once the workload is over: no new faults, users resolve promptly.
    pub healing: bool,
    /// Whether the run's deliberate relay defect (if any) is on; off during setup.
    pub bugs_armed: bool,
    /// Messages and closes on the wire, and relay work queued: the world is not settled
    /// while any remain.
    pub in_flight: u64,
    /// The schema versions of the run, oldest first (only the default one unless the
    /// upgrade workload is on); the relay and each device run the one at their level.
    pub schemas: Vec<Arc<Schema>>,
    /// When the relay and the devices move up a level.
    pub upgrades: UpgradePlan,
}

impl World {
    pub fn new(opts: SimOptions, dir: PathBuf, trace: Trace) -> Self {
        let seed = opts.seed;
        let mut net_rng = stream(seed, "net-params");
        use crate::rng::Draw;
        let has = |f| opts.faults.has(f);
        let net = NetParams {
            latency_ms: if has(Fault::Latency) { net_rng.between(1, 80) } else { 1 },
            jitter_ms: if has(Fault::Latency) { net_rng.between(0, 60) } else { 0 },
            reset_every_ms: net_rng.between(20, 240) * MINUTE,
            lost_ack_chance: net_rng.between(2, 15) as f64 / 100.0,
        };
        World {
            clock: WorldClock::new(EPOCH_MS),
            relays: (0..opts.relays.max(1)).map(SimRelay::new).collect(),
            store: SharedStore::new(dir.join("relay")),
            relay_level: 0,
            devices: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            rng: Streams {
                workload: stream(seed, "workload"),
                net: stream(seed, "net"),
                faults: stream(seed, "faults"),
                users: stream(seed, "users"),
                upgrades: stream(seed, "upgrades"),
                cluster: stream(seed, "cluster"),
                wearables: stream(seed, "wearables"),
            },
            net,
            oracle: Oracle::default(),
            trace,
            stats: Stats::default(),
            healing: false,
            bugs_armed: false,
            in_flight: 0,
            schemas: vec![Arc::new(Schema::default_schema())],
            upgrades: UpgradePlan::default(),
            queue: BinaryHeap::new(),
            next_seq: 0,
            opts,
            dir,
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    pub fn schedule(&mut self, at: u64, event: Event) {
        if event.is_in_flight() {
            self.in_flight += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Scheduled {
            at: at.max(self.now()),
            seq,
            event,
        });
    }

    pub fn schedule_in(&mut self, delay: u64, event: Event) {
        let at = self.now().saturating_add(delay);
        self.schedule(at, event);
    }

    /// Takes the next event (moving the clock to it) unless it lies beyond `deadline`.
    pub fn next_event(&mut self, deadline: u64) -> Option<Event> {
        let next = self.queue.peek()?;
        if next.at > deadline {
            return None;
        }
        let s = self.queue.pop()?;
        if s.event.is_in_flight() {
            self.in_flight -= 1;
        }
        self.clock.set(s.at);
        self.stats.events += 1;
        Some(s.event)
    }

    pub fn pending_events(&self) -> usize {
        self.queue.len()
    }

    /// A network delay for one message on a connection, never reordering within it.
    pub fn delivery_time(&mut self, conn: ConnId, to_relay: bool) -> u64 {
        use crate::rng::Draw;
        let base = self.net.latency_ms + self.rng.net.below(self.net.jitter_ms + 1);
        let want = self.now() + base;
        let Some(c) = self.conns.get_mut(&conn) else {
            return want;
        };
        let slot = if to_relay {
            &mut c.last_to_relay
        } else {
            &mut c.last_to_device
        };
        let at = want.max(*slot);
        *slot = at;
        at
    }
}
