//! The relay in the simulated world: the production `RelayCore` on a real SQLite file, behind a
//! simulated server shell that decodes frames, groups messages into commits and routes outputs.

use std::path::PathBuf;
use std::sync::Arc;

use fieldsync_relay::core::{ConnId, FaultSwitches, Input, Output, RelayConfig, RelayCore};
use fieldsync_relay::store::sqlite::SqliteStore;
use fieldsync_schema::{ClientMessage, RelayMessage, Schema};
use uuid::Uuid;

use crate::clock::{MINUTE, SECOND};
use crate::options::{Fault, InjectedBug};
use crate::rng::{Draw, stream};
use crate::world::{Event, World};

pub struct SimRelay {
    pub dir: PathBuf,
    pub core: Option<RelayCore<SqliteStore>>,
    pub relay_id: Uuid,
    pub boots: u64,
    inbox: Vec<(ConnId, ClientMessage)>,
    process_scheduled: bool,
}

impl SimRelay {
    pub fn new(dir: PathBuf) -> Self {
        SimRelay {
            dir,
            core: None,
            relay_id: Uuid::nil(),
            boots: 0,
            inbox: Vec::new(),
            process_scheduled: false,
        }
    }

    pub fn is_up(&self) -> bool {
        self.core.is_some()
    }

    pub fn core(&self) -> Option<&RelayCore<SqliteStore>> {
        self.core.as_ref()
    }
}

impl World {
    /// Opens (or reopens after a crash) the relay on its files, with all memory fresh.
    pub fn relay_boot(&mut self) -> anyhow::Result<()> {
        let boot = self.relay.boots;
        self.relay.boots += 1;
        let mut rng = stream(self.opts.seed, &format!("relay/boot{boot}"));
        let new_id = fieldsync_schema::ids::new_uuid(&mut rng);
        let store = SqliteStore::open_dir(&self.relay.dir, new_id)?;
        // The simulated relay ticks every 30 s (see `relay_tick`): no other process writes its
        // store, so polling faster would only add events.
        let config = RelayConfig {
            tick_every_ms: 30 * SECOND,
            ..RelayConfig::default()
        };
        let mut core = RelayCore::new(store, Arc::new(Schema::default_schema()), config, Box::new(rng));
        core.set_fault_switches(self.fault_switches());
        self.relay.relay_id = core.relay_id();
        self.relay.core = Some(core);
        let now = self.now();
        self.trace.record(now, &format!("relay boot {boot}"));
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
            None => FaultSwitches::default(),
        }
    }

    /// Turns the run's deliberate defect on (after setup).
    pub fn arm_bugs(&mut self) {
        self.bugs_armed = true;
        let switches = self.fault_switches();
        if let Some(core) = &mut self.relay.core {
            core.set_fault_switches(switches);
        }
    }

    /// The relay process dies: memory, connections and the unprocessed inbox are gone.
    pub fn relay_crash(&mut self) {
        if self.relay.core.take().is_none() {
            return;
        }
        self.relay.inbox.clear();
        self.stats.count_fault(Fault::RelayCrash);
        let now = self.now();
        self.trace.record(now, "relay crash");
        let open: Vec<ConnId> = self.conns.iter().filter(|(_, c)| c.open).map(|(id, _)| *id).collect();
        for conn in open {
            self.reset_conn(conn, "relay crashed");
        }
        let delay = self.rng.faults.between(SECOND, 10 * MINUTE);
        self.schedule_in(delay, Event::RelayRestart);
    }

    /// Opens a connection from a device; the relay must be up.
    pub fn open_conn(&mut self, device: usize) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        let now = self.now();
        self.conns.insert(
            id,
            crate::world::Conn {
                device,
                open: true,
                last_to_relay: now,
                last_to_device: now,
            },
        );
        if let Some(core) = &mut self.relay.core {
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
        let device = c.device;
        if let Some(core) = &mut self.relay.core {
            core.handle([Input::Closed(conn)], 0);
        }
        self.relay.inbox.retain(|(c, _)| *c != conn);
        let now = self.now();
        self.trace.record(now, &format!("reset conn{conn} dev{device}: {why}"));
        // The device notices a moment later (its next read fails).
        let at = now + 1 + self.net.latency_ms;
        self.schedule(at, Event::CloseAtDevice(conn, why.to_string()));
    }

    pub fn on_to_relay(&mut self, conn: ConnId, bytes: Vec<u8>) {
        if !self.relay.is_up() || !self.conns.get(&conn).is_some_and(|c| c.open) {
            return; // lost with the connection
        }
        match ClientMessage::decode(&bytes) {
            Ok(msg) => {
                self.relay.inbox.push((conn, msg));
                if !self.relay.process_scheduled {
                    self.relay.process_scheduled = true;
                    let now = self.now();
                    self.schedule(now, Event::RelayProcess);
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
    pub fn relay_process(&mut self) {
        self.relay.process_scheduled = false;
        let inbox = std::mem::take(&mut self.relay.inbox);
        let now = self.now();
        let Some(core) = &mut self.relay.core else { return };
        if inbox.is_empty() {
            return;
        }
        self.stats.groups += 1;
        self.trace.record(now, &format!("relay group of {}", inbox.len()));
        let outputs = core.handle(inbox.into_iter().map(|(conn, msg)| Input::message(conn, msg)), now);
        self.route(outputs);
    }

    pub fn relay_tick(&mut self) {
        let now = self.now();
        if let Some(core) = &mut self.relay.core {
            let outputs = core.handle([Input::Tick], now);
            self.route(outputs);
        }
        self.schedule_in(30 * SECOND, Event::RelayTick);
    }

    fn route(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send(conn, msg) => self.relay_send(conn, msg),
                Output::Close(conn, reason) => {
                    if let Some(c) = self.conns.get_mut(&conn)
                        && c.open
                    {
                        c.open = false;
                        if let Some(core) = &mut self.relay.core {
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
