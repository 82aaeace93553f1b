//! Devices in the simulated world: the production `Device` (SQLite file) and `SyncMachine`,
//! each reading time through its own skewed clock and drawing randomness from its own stream.

use std::path::PathBuf;
use std::sync::Arc;

use fieldsync_peer::Device;
use fieldsync_peer::sync::{Phase, SyncInput, SyncMachine};
use fieldsync_relay::core::ConnId;
use fieldsync_schema::{ClientMessage, RelayMessage, TimeSource};

use crate::clock::DeviceClock;
use crate::clock::{HOUR, SECOND};
use crate::options::Fault;
use crate::rng::{Draw, stream};
use crate::world::{Event, World};

pub struct SimDevice {
    pub index: usize,
    pub user: usize,
    pub dir: PathBuf,
    pub clock: DeviceClock,
    pub dev: Option<Device>,
    pub machine: SyncMachine,
    pub conn: Option<ConnId>,
    pub boots: u64,
    /// No network until this world time (partition or days offline).
    pub net_down_until: u64,
    /// The pending wake-up, to drop stale timer events.
    pub wake_at: Option<u64>,
    pub resolve_scheduled: bool,
    /// Which of the world's schemas its app runs (see [`crate::upgrades`]).
    pub level: usize,
    /// The relay of its last connection (several relays: a new one means it failed over).
    pub last_relay: Option<usize>,
}

impl SimDevice {
    pub fn new(index: usize, user: usize, dir: PathBuf, clock: DeviceClock) -> Self {
        SimDevice {
            index,
            user,
            dir,
            clock,
            dev: None,
            machine: SyncMachine::default(),
            conn: None,
            boots: 0,
            net_down_until: 0,
            wake_at: None,
            resolve_scheduled: false,
            level: 0,
            last_relay: None,
        }
    }

    pub fn device_now(&self) -> u64 {
        self.clock.now_ms()
    }
}

impl World {
    /// Opens (or reopens after a crash) a device on its files, with a fresh machine.
    pub fn device_boot(&mut self, i: usize) -> anyhow::Result<()> {
        let d = &mut self.devices[i];
        let boot = d.boots;
        d.boots += 1;
        let rng = stream(self.opts.seed, &format!("device{i}/boot{boot}"));
        let schema = self.schemas[d.level.min(self.schemas.len() - 1)].clone();
        let dev = Device::open_with_schema(&d.dir, Arc::new(d.clock.clone()), Box::new(rng), schema)?;
        d.dev = Some(dev);
        d.machine = SyncMachine::default();
        d.conn = None;
        d.wake_at = None;
        let now = self.now();
        self.trace.record(now, &format!("dev{i} boot {boot}"));
        self.check_outbox_survived(i);
        self.wake_device(i, now);
        Ok(())
    }

    /// The device process dies: the machine's memory and the connection are gone; the files stay.
    pub fn device_crash(&mut self, i: usize) {
        if !self.device_stop(i, "device crashed") {
            return;
        }
        self.stats.count_fault(Fault::DeviceCrash);
        let now = self.now();
        self.trace.record(now, &format!("dev{i} crash"));
        let delay = self.rng.faults.between(SECOND, HOUR);
        self.schedule_in(delay, Event::DeviceRestart(i));
    }

    /// The device process ends (a crash, an app update); false if it was not running.
    pub fn device_stop(&mut self, i: usize, why: &str) -> bool {
        if self.devices[i].dev.is_none() {
            return false;
        }
        if let Some(conn) = self.devices[i].conn.take() {
            self.reset_conn(conn, why);
        }
        self.devices[i].dev = None;
        true
    }

    /// Schedules the device's next wake-up at `world_ms` unless an earlier one is pending.
    pub fn wake_device(&mut self, i: usize, world_ms: u64) {
        let at = world_ms.max(self.now());
        let d = &mut self.devices[i];
        if d.wake_at.is_some_and(|w| w <= at && w >= self.clock.now()) {
            return;
        }
        d.wake_at = Some(at);
        self.schedule(at, Event::DeviceWake(i));
    }

    /// Asks the machine when it next needs attention and schedules that (in world time).
    pub fn reschedule_device(&mut self, i: usize) {
        let d = &self.devices[i];
        if d.dev.is_none() {
            return;
        }
        let now = self.now();
        let skew = d.clock.skew();
        let next = if d.conn.is_none() {
            if d.net_down_until > now {
                None // NetworkBack wakes it
            } else {
                d.dev
                    .as_ref()
                    .map(|dev| d.device_now() + d.machine.reconnect_in(dev).unwrap_or(0))
            }
        } else {
            d.machine.next_wakeup().map(|t| t.ms())
        };
        if let Some(device_ms) = next {
            let world_ms = (device_ms as i64 - skew).max(now as i64 + 1) as u64;
            self.wake_device(i, world_ms);
        }
    }

    pub fn on_device_wake(&mut self, i: usize) {
        let now = self.now();
        let d = &mut self.devices[i];
        if d.wake_at != Some(now) {
            return; // superseded by an earlier or later wake-up
        }
        d.wake_at = None;
        if d.dev.is_none() || d.machine.phase() == Phase::AuthFailed {
            return;
        }
        if d.conn.is_none() {
            if d.net_down_until > now {
                return;
            }
            if d.dev.as_ref().is_some_and(|dev| d.machine.should_connect(dev)) {
                self.device_connect(i);
            }
        } else {
            let (Some(dev), machine) = (d.dev.as_mut(), &mut d.machine) else {
                return;
            };
            match machine.handle(dev, SyncInput::Tick) {
                Ok(out) => self.device_send(i, out),
                Err(e) => self.device_drop_conn(i, &format!("tick: {e}")),
            }
        }
        self.reschedule_device(i);
    }

    fn device_connect(&mut self, i: usize) {
        let now = self.now();
        let Some(r) = self.balance() else {
            let d = &mut self.devices[i];
            if let Some(dev) = d.dev.as_mut() {
                let _ = d.machine.handle(dev, SyncInput::Disconnected);
            }
            self.trace.record(now, &format!("dev{i} connect refused"));
            return;
        };
        if self.devices[i].last_relay.is_some_and(|last| last != r) {
            self.stats.relay_switches += 1;
        }
        self.devices[i].last_relay = Some(r);
        let conn = self.open_conn(i, r);
        self.trace.record(now, &format!("dev{i} connect conn{conn}"));
        let d = &mut self.devices[i];
        d.conn = Some(conn);
        let Some(dev) = d.dev.as_mut() else { return };
        let out = d.machine.handle(dev, SyncInput::Connected).unwrap_or_default();
        self.device_send(i, out);
    }

    /// Sends the machine's messages on the device's connection.
    pub fn device_send(&mut self, i: usize, msgs: Vec<ClientMessage>) {
        let Some(conn) = self.devices[i].conn else { return };
        for msg in msgs {
            self.oracle_client_message(i, &msg);
            let bytes = msg.encode();
            self.trace.absorb(&bytes);
            let at = self.delivery_time(conn, true);
            self.schedule(at, Event::ToRelay(conn, bytes));
        }
    }

    /// The device gives up on its connection (an error or a timeout on its side).
    fn device_drop_conn(&mut self, i: usize, why: &str) {
        let now = self.now();
        self.trace.record(now, &format!("dev{i} drops connection: {why}"));
        if let Some(conn) = self.devices[i].conn.take() {
            self.reset_conn(conn, why);
        }
        let d = &mut self.devices[i];
        if let Some(dev) = d.dev.as_mut() {
            let _ = d.machine.handle(dev, SyncInput::Disconnected);
        }
    }

    pub fn on_to_device(&mut self, conn: ConnId, bytes: Vec<u8>) {
        let Some(i) = self.conns.get(&conn).map(|c| c.device) else {
            return;
        };
        if self.devices[i].conn != Some(conn) || self.devices[i].dev.is_none() {
            return;
        }
        let msg = match RelayMessage::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                let v = self.violation("codec", format!("dev{i} could not decode a relay message: {e}"), None);
                self.oracle.violations.push(v);
                return;
            }
        };
        self.oracle_delivered(i, &msg);
        let d = &mut self.devices[i];
        let Some(dev) = d.dev.as_mut() else { return };
        match d.machine.handle(dev, SyncInput::Message(msg)) {
            Ok(out) => self.device_send(i, out),
            Err(e) => self.device_drop_conn(i, &format!("{e}")),
        }
        self.after_device_activity(i);
        self.reschedule_device(i);
    }

    pub fn on_close_at_device(&mut self, conn: ConnId, reason: &str) {
        let Some(i) = self.conns.get(&conn).map(|c| c.device) else {
            return;
        };
        if self.devices[i].conn != Some(conn) {
            return;
        }
        let now = self.now();
        self.trace
            .record(now, &format!("dev{i} sees close of conn{conn}: {reason}"));
        self.devices[i].conn = None;
        let d = &mut self.devices[i];
        if let Some(dev) = d.dev.as_mut() {
            let _ = d.machine.handle(dev, SyncInput::Disconnected);
        }
        self.reschedule_device(i);
    }

    /// After a write or an answer: if the device is now blocked, its user will look at it.
    pub fn after_device_activity(&mut self, i: usize) {
        let needs_user = self.devices[i]
            .dev
            .as_ref()
            .and_then(|d| d.status().ok())
            .is_some_and(|s| s.blocked.is_some() || self.has_open_duplicates(i, &s));
        if needs_user && !self.devices[i].resolve_scheduled {
            self.devices[i].resolve_scheduled = true;
            let delay = if self.healing {
                self.rng.users.between(SECOND, 60 * SECOND)
            } else {
                self.rng.users.between(5 * 60 * SECOND, 4 * HOUR)
            };
            self.schedule_in(delay, Event::UserResolves(i));
        }
    }

    /// The device regains its network after a partition or days offline.
    pub fn on_network_back(&mut self, i: usize) {
        let now = self.now();
        if self.devices[i].net_down_until > now {
            return;
        }
        self.trace.record(now, &format!("dev{i} network back"));
        self.wake_device(i, now);
    }

    /// Cuts a device off the network for `duration` (its connection drops).
    pub fn take_offline(&mut self, i: usize, duration: u64) {
        let now = self.now();
        let until = now + duration;
        let d = &mut self.devices[i];
        d.net_down_until = d.net_down_until.max(until);
        if let Some(conn) = d.conn {
            self.reset_conn(conn, "network gone");
        }
        self.schedule(until, Event::NetworkBack(i));
    }

    /// Whether the device is up, connected, caught up and has nothing left to do.
    pub fn device_settled(&self, i: usize) -> bool {
        let d = &self.devices[i];
        let Some(dev) = d.dev.as_ref() else { return false };
        let s = d.machine.summary();
        d.conn.is_some()
            && s.phase == Phase::Ready
            && s.idle
            && dev
                .status()
                .map(|st| st.unsynced == 0 && st.blocked.is_none() && !self.has_open_duplicates(i, &st))
                .unwrap_or(false)
    }
}
