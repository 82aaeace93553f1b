//! Devices killed with SIGKILL mid-write and mid-sync: real `fieldsync-peer` processes on
//! their own directories, against a live relay. After every kill the device opens and holds
//! every write it had acknowledged (with that write's value, or a later one); at the end every
//! device drains, no mutation id carries two different writes, and nothing is applied twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fieldsync_peer::outbox::OutboxState;
use fieldsync_peer::{Device, DeviceRng};
use fieldsync_schema::{SystemTimeSource, TimeSource};
use rand_core::Rng;
use serde_json::Value;
use uuid::Uuid;

use super::relay_view;
use super::{DeviceKillFigures, SoakOptions};
use crate::load::relay_proc::{RelayProc, sibling_binary};
use crate::rng::stream;

/// One device directory and what it has acknowledged to its user.
struct KilledDevice {
    dir: PathBuf,
    /// Entity → every name it may hold now (the last acknowledged one, plus any written by a
    /// later `put` that was killed before it answered).
    acceptable: HashMap<Uuid, HashSet<String>>,
    /// Names of creates killed before they printed an id (they may or may not exist).
    maybe_created: HashSet<String>,
}

struct Peer {
    binary: PathBuf,
}

impl Peer {
    fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--data").arg(dir).args(args);
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    fn ok(&self, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(dir, args).output().context("running fieldsync-peer")?;
        if !out.status.success() {
            bail!(
                "fieldsync-peer {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs the command and kills it with SIGKILL after `after` unless it finished; returns its
    /// stdout and how long it ran if it finished successfully, `None` if it was killed.
    fn run_or_kill(&self, dir: &Path, args: &[&str], after: Duration) -> anyhow::Result<Option<(String, f64)>> {
        let started = Instant::now();
        let mut child = self.command(dir, args).spawn().context("starting fieldsync-peer")?;
        let deadline = started + after;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if child.try_wait()?.is_none() {
            child.kill().context("killing fieldsync-peer")?;
            child.wait()?;
            return Ok(None);
        }
        let ran_ms = started.elapsed().as_secs_f64() * 1e3;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "fieldsync-peer {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Some((String::from_utf8_lossy(&out.stdout).trim().to_string(), ran_ms)))
    }
}

fn open(dir: &Path, seed: u64) -> anyhow::Result<Device> {
    let rng: DeviceRng = Box::new(stream(seed, "soak/inspect"));
    Device::open(dir, Arc::new(SystemTimeSource), rng).with_context(|| format!("opening {}", dir.display()))
}

fn name_of(fields: &serde_json::Map<String, Value>) -> String {
    fields
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Acknowledged writes the device no longer holds (with an acceptable value).
fn lost_locally(d: &KilledDevice, device: &Device) -> anyhow::Result<u64> {
    let mut lost = 0;
    for (id, names) in &d.acceptable {
        match device.get(*id)? {
            Some(e) if names.contains(&name_of(&e.fields)) => {}
            _ => lost += 1,
        }
    }
    Ok(lost)
}

pub fn run(opts: &SoakOptions, scratch: &Path) -> anyhow::Result<DeviceKillFigures> {
    let started = Instant::now();
    std::fs::create_dir_all(scratch)?;
    let data = scratch.join("relay");
    let relay = RelayProc::spawn_on(&data, "127.0.0.1:0")?;
    let peer = Peer {
        binary: sibling_binary("fieldsync-peer")?,
    };
    let mut rng = stream(opts.seed, "soak/devices");
    let count = opts.killed_devices.max(1);
    let tokens = relay.enrollment_tokens(1, count, SystemTimeSource.now_ms(), &mut rng)?;
    let mut devices = Vec::with_capacity(count);
    for (i, token) in tokens.iter().enumerate() {
        let dir = scratch.join(format!("peer-{i}"));
        peer.ok(&dir, &["init"])?;
        peer.ok(&dir, &["enroll", "--relay", &relay.url, "--token", token])?;
        devices.push(KilledDevice {
            dir,
            acceptable: HashMap::new(),
            maybe_created: HashSet::new(),
        });
    }

    let mut figures = DeviceKillFigures::default();
    // The longest a `put` and a `sync` took when left alone: kills land within 1.2× that, so
    // they hit process start, the open, the write or the sync itself, and some finish.
    let mut took_ms = [30.0f64, 150.0];
    for cycle in 0..opts.device_cycles {
        let i = (rng.next_u64() as usize) % devices.len();
        let d = &mut devices[i];
        let roll = rng.next_u64() % 10;
        let name = format!("Killed-device patient d{i} c{cycle}");
        let json = format!(r#"{{"name": "{name}"}}"#);
        let update = (4..7)
            .contains(&roll)
            .then(|| d.acceptable.keys().copied().min())
            .flatten();
        let (args, is_sync): (Vec<String>, bool) = if roll >= 7 {
            (vec!["sync".into()], true)
        } else if let Some(id) = update {
            (
                vec!["put".into(), "patient".into(), id.to_string(), "--json".into(), json],
                false,
            )
        } else {
            (vec!["put".into(), "patient".into(), "--json".into(), json], false)
        };
        let window_us = (took_ms[usize::from(is_sync)] * 1200.0) as u64;
        let after = Duration::from_micros(rng.next_u64() % window_us.max(1));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let finished = peer.run_or_kill(&d.dir, &args, after)?;
        if let Some((_, ms)) = &finished {
            let took = &mut took_ms[usize::from(is_sync)];
            *took = took.max(*ms);
        }
        let finished = finished.map(|(out, _)| out);
        match (&finished, is_sync, update) {
            (None, true, _) => figures.kills_mid_sync += 1,
            (None, false, Some(id)) => {
                figures.kills_mid_write += 1;
                d.acceptable.entry(id).or_default().insert(name.clone());
            }
            (None, false, None) => {
                figures.kills_mid_write += 1;
                d.maybe_created.insert(name.clone());
            }
            (Some(_), true, _) => figures.syncs_completed += 1,
            (Some(_), false, Some(id)) => {
                figures.writes_acknowledged += 1;
                d.acceptable.insert(id, HashSet::from([name.clone()]));
            }
            (Some(out), false, None) => {
                figures.writes_acknowledged += 1;
                let id: Uuid = out
                    .parse()
                    .with_context(|| format!("`put` printed `{out}`, not an id"))?;
                d.acceptable.insert(id, HashSet::from([name.clone()]));
            }
        }
        if finished.is_none() {
            figures.kills += 1;
            match open(&d.dir, opts.seed) {
                Ok(device) => figures.acked_local_lost += lost_locally(d, &device)?,
                Err(e) => {
                    figures.opens_failed += 1;
                    figures.first_open_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
    }

    // Heal: sync every device (no kills) until it drains, then once more to converge.
    for d in &devices {
        for _ in 0..5 {
            peer.ok(&d.dir, &["sync"])?;
            if open(&d.dir, opts.seed)?.status()?.unsynced == 0 {
                break;
            }
        }
    }
    for d in &devices {
        peer.ok(&d.dir, &["sync"])?;
    }
    drop(relay);

    let view = relay_view::read(&data)?;
    let mut holdings: Vec<BTreeMap<Uuid, String>> = Vec::new();
    for d in &devices {
        let device = open(&d.dir, opts.seed)?;
        figures.devices_not_drained += u64::from(device.status()?.unsynced > 0);
        figures.acked_local_lost += lost_locally(d, &device)?;
        let mut seen = HashSet::new();
        for item in device.queue(true)? {
            if !seen.insert(item.mutation_id) {
                figures.mutation_ids_reused += 1;
            }
            if item.state == OutboxState::Superseded {
                continue;
            }
            match view.applied.get(&item.mutation_id) {
                Some(a) if a.entity_id == item.entity_id && a.origin_device == device.device_id() => {}
                Some(_) => figures.mutation_ids_reused += 1,
                None => figures.lost_after_drain += 1,
            }
        }
        let held: BTreeMap<Uuid, String> = device
            .list("patient", &[], true)?
            .into_iter()
            .map(|e| (e.entity_id, name_of(&e.fields)))
            .collect();
        figures.unexplained_local += held
            .iter()
            .filter(|(id, name)| {
                !devices
                    .iter()
                    .any(|o| o.acceptable.contains_key(*id) || o.maybe_created.contains(*name))
            })
            .count() as u64;
        holdings.push(held);
    }
    figures.duplicates = view.duplicates();
    figures.audit_failures = u64::from(!view.audit_ok) + view.feeds_not_dense;
    figures.diverged = holdings.windows(2).any(|w| w[0] != w[1]);
    figures.seconds = started.elapsed().as_secs_f64();
    Ok(figures)
}
