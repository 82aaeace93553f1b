//! The relay killed with SIGKILL while devices push and pull: after every kill, every mutation
//! a device holds as acknowledged is in the relay's store exactly once; after the last, every
//! device drains, every space converges and every audit chain verifies.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fieldsync_peer::net::{self, SyncOptions};
use fieldsync_peer::outbox::OutboxState;
use fieldsync_peer::sync::SyncMachine;
use fieldsync_peer::{Device, DeviceRng};
use fieldsync_schema::{SystemTimeSource, TimeSource};
use rand_core::Rng;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::relay_view::{self, RelayView};
use super::{RelayKillFigures, SoakOptions};
use crate::load::percentile;
use crate::load::relay_proc::RelayProc;
use crate::rng::stream;

/// One device of the soak and the entities it created (it edits only its own, so nothing it
/// writes is a conflict and every write must arrive).
struct SoakDevice {
    device: Device,
    own: Vec<Uuid>,
    space: usize,
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn fields(name: String) -> Map<String, Value> {
    let mut f = Map::new();
    f.insert("name".into(), Value::String(name));
    f
}

/// Local writes of one cycle: creates, and edits of the device's own earlier records.
fn write_cycle(
    d: &mut SoakDevice,
    index: usize,
    cycle: usize,
    writes: usize,
    rng: &mut impl Rng,
) -> anyhow::Result<u64> {
    let mut written = 0;
    for k in 0..writes {
        let receipt = if k % 2 == 1 && !d.own.is_empty() {
            let id = d.own[(rng.next_u64() as usize) % d.own.len()];
            d.device.update(
                "patient",
                id,
                fields(format!("Soak patient d{index} edited c{cycle} k{k}")),
            )?
        } else {
            let r = d
                .device
                .put("patient", None, fields(format!("Soak patient d{index} c{cycle} k{k}")))?;
            d.own.push(r.entity_id);
            r
        };
        written += u64::from(receipt.mutation_id.is_some() && !receipt.combined);
    }
    Ok(written)
}

/// Mutations the device holds as confirmed by the relay that the relay does not have.
fn acked_missing(d: &SoakDevice, view: &RelayView) -> anyhow::Result<(u64, u64)> {
    let mut acked = 0;
    let mut missing = 0;
    for item in d.device.queue(true)? {
        if item.state == OutboxState::Applied {
            acked += 1;
            if !view.applied.contains_key(&item.mutation_id) {
                missing += 1;
            }
        }
    }
    Ok((acked, missing))
}

/// Syncs every device at once; returns them with whether their round completed and when it
/// ended (ms from the start).
fn sync_all(
    rt: &tokio::runtime::Runtime,
    devices: Vec<SoakDevice>,
    during: impl FnOnce(),
) -> anyhow::Result<Vec<(SoakDevice, bool, f64)>> {
    let start = Instant::now();
    let tasks: Vec<_> = devices
        .into_iter()
        .map(|mut d| {
            rt.spawn(async move {
                let mut machine = SyncMachine::default();
                let opts = SyncOptions::quiet();
                let round = net::sync_once(&mut d.device, &mut machine, &opts);
                let done = matches!(tokio::time::timeout(Duration::from_secs(60), round).await, Ok(Ok(_)));
                (d, done, start.elapsed().as_secs_f64() * 1e3)
            })
        })
        .collect();
    during();
    rt.block_on(async {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.context("a syncing device task failed")?);
        }
        anyhow::Ok(out)
    })
}

pub fn run(opts: &SoakOptions, scratch: &Path) -> anyhow::Result<RelayKillFigures> {
    let started = Instant::now();
    std::fs::create_dir_all(scratch)?;
    let data = scratch.join("relay");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut relay = RelayProc::spawn_on(&data, &listen)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut rng = stream(opts.seed, "soak/relay");
    let spaces = opts.spaces.clamp(1, opts.devices.max(1));
    let tokens = relay.enrollment_tokens(spaces, opts.devices, SystemTimeSource.now_ms(), &mut rng)?;
    let mut devices = Vec::with_capacity(opts.devices);
    for (i, token) in tokens.iter().enumerate() {
        let device_rng: DeviceRng = Box::new(stream(opts.seed, &format!("soak/device/{i}")));
        let mut device = Device::open(
            &scratch.join(format!("device-{i}")),
            Arc::new(SystemTimeSource),
            device_rng,
        )?;
        rt.block_on(net::enroll(&mut device, &relay.url, token))
            .with_context(|| format!("enrolling soak device {i}"))?;
        devices.push(SoakDevice {
            device,
            own: Vec::new(),
            space: i % spaces,
        });
    }

    let mut figures = RelayKillFigures::default();
    let mut restart_ms = Vec::new();
    let mut round_ms = opts.kill_window_ms as f64;
    for cycle in 0..opts.cycles {
        for (i, d) in devices.iter_mut().enumerate() {
            figures.writes += write_cycle(d, i, cycle, opts.writes_per_cycle, &mut rng)?;
        }
        // Kill somewhere inside the time a whole round takes (learned as the cycles go), so
        // kills land before, during and after acknowledgements.
        let kill_after = Duration::from_micros(rng.next_u64() % (round_ms * 1200.0).max(1.0) as u64);
        let mut killed = Ok(());
        let synced = sync_all(&rt, devices, || {
            std::thread::sleep(kill_after);
            killed = relay.kill();
        })?;
        killed?;
        figures.relay_kills += 1;
        let cut = synced.iter().filter(|(_, done, _)| !done).count() as u64;
        figures.syncs_cut += cut;
        figures.kills_mid_round += u64::from(cut > 0 && cut < synced.len() as u64);
        // A round lasts at least as long as the slowest round that completed; a kill that cut
        // every round says nothing of its length, so the estimate grows.
        let slowest_done = synced
            .iter()
            .filter(|(_, done, _)| *done)
            .map(|(_, _, ms)| *ms)
            .fold(0.0, f64::max);
        round_ms = if cut == synced.len() as u64 {
            round_ms * 1.25
        } else {
            round_ms.max(slowest_done)
        };
        devices = synced.into_iter().map(|(d, _, _)| d).collect();

        let view = relay_view::read(&data)?;
        for d in &devices {
            let (acked, missing) = acked_missing(d, &view)?;
            figures.acked_checked += acked;
            figures.acked_lost += missing;
        }
        figures.duplicates = figures.duplicates.max(view.duplicates());
        figures.audit_failures += u64::from(!view.audit_ok);
        drop(view);

        let t = Instant::now();
        relay = RelayProc::spawn_on(&data, &listen)
            .with_context(|| format!("restarting the relay after kill {}", cycle + 1))?;
        restart_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // Heal: every device syncs until its outbox is empty, then once more so each holds every
    // record of its space.
    for _ in 0..10 {
        if devices
            .iter()
            .all(|d| d.device.status().map(|s| s.unsynced == 0).unwrap_or(false))
        {
            break;
        }
        devices = sync_all(&rt, devices, || {})?.into_iter().map(|(d, _, _)| d).collect();
    }
    devices = sync_all(&rt, devices, || {})?.into_iter().map(|(d, _, _)| d).collect();
    drop(relay);

    let view = relay_view::read(&data)?;
    let mut ours = 0u64;
    for d in &devices {
        let status = d.device.status()?;
        figures.devices_not_drained += u64::from(status.unsynced > 0);
        for item in d.device.queue(true)? {
            if item.state == OutboxState::Superseded {
                continue;
            }
            ours += 1;
            match view.applied.get(&item.mutation_id) {
                Some(a) if a.entity_id == item.entity_id && a.origin_device == d.device.device_id() => {}
                Some(_) => figures.mutation_ids_reused += 1,
                None => figures.lost_after_drain += 1,
            }
        }
    }
    figures.relay_mutations = view.applied.len() as u64;
    figures.unexplained_on_relay = (view.applied.len() as u64).saturating_sub(ours);
    figures.duplicates = figures.duplicates.max(view.duplicates());
    figures.audit_records = view.audit_records;
    figures.audit_failures += u64::from(!view.audit_ok) + view.feeds_not_dense;
    figures.spaces_diverged = diverged_spaces(&devices)?;
    restart_ms.sort_by(f64::total_cmp);
    figures.restart_ms_p50 = percentile(&restart_ms, 0.5);
    figures.restart_ms_max = percentile(&restart_ms, 1.0);
    figures.seconds = started.elapsed().as_secs_f64();
    Ok(figures)
}

/// The patients one device holds: id → fields.
type Holding = BTreeMap<Uuid, Map<String, Value>>;

/// Spaces whose devices do not all hold the same patients with the same fields.
fn diverged_spaces(devices: &[SoakDevice]) -> anyhow::Result<u64> {
    let mut by_space: BTreeMap<usize, Vec<Holding>> = BTreeMap::new();
    for d in devices {
        let held = d
            .device
            .list("patient", &[], true)?
            .into_iter()
            .map(|e| (e.entity_id, e.fields))
            .collect();
        by_space.entry(d.space).or_default().push(held);
    }
    Ok(by_space
        .values()
        .filter(|views| views.windows(2).any(|w| w[0] != w[1]))
        .count() as u64)
}
