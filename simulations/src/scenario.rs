//! Who is in the simulated world: a clinic and a gym, their users, and which device belongs to
//! whom. Devices enroll through the real protocol (token, proof, `Enrolled`) before the run.

use fieldsync_relay::admin;
use fieldsync_relay::core::{Input, Output};
use fieldsync_schema::{ClientMessage, RelayMessage, Role};

use crate::clock::DeviceClock;
use crate::device_side::SimDevice;
use crate::rng::stream;
use crate::world::World;

pub struct UserSpec {
    pub name: &'static str,
    pub space: &'static str,
    pub role: Role,
}

/// The people of the simulation (SPEC §4 roles), in two spaces.
pub const USERS: [UserSpec; 6] = [
    UserSpec {
        name: "dana",
        space: "clinic",
        role: Role::Clinician,
    },
    UserSpec {
        name: "sam",
        space: "clinic",
        role: Role::Clinician,
    },
    UserSpec {
        name: "pat",
        space: "gym",
        role: Role::Patient,
    },
    UserSpec {
        name: "ava",
        space: "clinic",
        role: Role::Assistant,
    },
    UserSpec {
        name: "coach",
        space: "gym",
        role: Role::Clinician,
    },
    UserSpec {
        name: "planner",
        space: "gym",
        role: Role::Service,
    },
];

/// Which user each device belongs to: the athlete has a phone and a tablet (devices 2 and 3),
/// so LWW profile and settings edits happen on two devices of one user.
const DEVICE_OWNERS: [usize; 12] = [0, 1, 2, 2, 3, 4, 5, 0, 1, 2, 3, 4];

pub fn owner_of(device: usize) -> usize {
    DEVICE_OWNERS[device % DEVICE_OWNERS.len()]
}

impl World {
    /// Boots the relays, creates spaces and users, and enrolls every device.
    pub fn setup(&mut self) -> anyhow::Result<()> {
        if self.opts.upgrades {
            self.schemas = crate::upgrades::ladder()?;
            self.upgrades = crate::upgrades::UpgradePlan::draw(
                self.opts.seed,
                self.opts.devices,
                self.opts.steps,
                self.schemas.len(),
            );
            // The checks judge records by the newest version (it knows every field).
            if let Some(top) = self.schemas.last() {
                self.oracle.schema = (**top).clone();
            }
        }
        for r in 0..self.relays.len() {
            self.relay_boot(r)?;
        }
        let now = self.now();
        let mut admin_rng = stream(self.opts.seed, "admin");
        let mut space_ids = std::collections::BTreeMap::new();
        {
            let core = self.relays[0]
                .core
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("relay not up"))?;
            for space in ["clinic", "gym"] {
                let s = admin::add_space(core.directory_mut(), space, now, &mut admin_rng)?;
                space_ids.insert(space, s.space_id);
            }
            for u in &USERS {
                admin::add_user(core.directory_mut(), u.name, u.space, u.role, now, &mut admin_rng)?;
            }
        }
        for i in 0..self.opts.devices {
            let user = owner_of(i);
            let clock = DeviceClock::new(self.clock.clone());
            let dir = self.dir.join(format!("device{i}"));
            self.devices.push(SimDevice::new(i, user, dir, clock));
            self.oracle
                .device_spaces
                .push([space_ids[USERS[user].space]].into_iter().collect());
            self.device_boot(i)?;
            self.enroll(i, &mut admin_rng)?;
        }
        Ok(())
    }

    fn enroll(&mut self, i: usize, admin_rng: &mut rand_chacha::ChaCha20Rng) -> anyhow::Result<()> {
        let now = self.now();
        let user = &USERS[self.devices[i].user];
        // Each device enrolls through its own relay of the cluster; tokens live in the store.
        let r = i % self.relays.len();
        let core = self.relays[0]
            .core
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("relay not up"))?;
        let (token, _) = admin::create_enrollment_token(core.directory_mut(), user.name, 3_600_000, now, admin_rng)?;
        let dev = self.devices[i]
            .dev
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("device {i} not up"))?;
        let msg = ClientMessage::enroll(dev.key(), &token, dev.device_id(), dev.schema());
        let conn = self.open_conn(i, r);
        let core = self.relays[r]
            .core
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("relay not up"))?;
        let out = core.handle([Input::message(conn, msg)], now);
        core.handle([Input::Closed(conn)], 0);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.open = false;
        }
        let enrolled = out.into_iter().find_map(|o| match o {
            Output::Send(_, RelayMessage::Enrolled { relay_id, user }) => Some((relay_id, user)),
            _ => None,
        });
        let (relay_id, info) = enrolled.ok_or_else(|| anyhow::anyhow!("device {i} was not enrolled"))?;
        let space = info
            .spaces
            .first()
            .map(|s| s.space_id)
            .ok_or_else(|| anyhow::anyhow!("user {} has no space", info.name))?;
        let dev = self.devices[i]
            .dev
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("device {i} not up"))?;
        dev.enroll_complete("sim://relay", relay_id, info, space)?;
        self.trace.record(now, &format!("dev{i} enrolled as {}", user.name));
        Ok(())
    }
}
