//! Catch-up benchmarks with the real device library (SQLite on disk, `synchronous=FULL`):
//! a device back after a week offline pushing its queue, and a new device pulling everything.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use fieldsync_peer::net::{self, SyncOptions, Traffic};
use fieldsync_peer::sync::SyncMachine;
use fieldsync_peer::{Device, DeviceRng};
use fieldsync_schema::{SystemTimeSource, TimeSource};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::relay_proc::RelayProc;
use super::session::{self, Batch, Shared};
use crate::rng::stream;
use crate::synth::SynthDevice;

#[derive(Debug, Serialize)]
pub struct CatchupReport {
    /// Whether the devices offered compressed frames (`--no-compression` turns it off).
    pub compression: bool,
    pub queued: u64,
    /// From connecting to the last acknowledgement (and the pull that follows), seconds.
    pub drain_seconds: f64,
    pub drained_per_s: f64,
    /// Frame bytes of the drain, device to relay and back.
    pub drain_traffic: Traffic,
    /// CPU of the drain in microseconds: this process (the device) and the relay process.
    pub drain_device_cpu_us: u64,
    pub drain_relay_cpu_us: Option<u64>,
    /// The relay's records are journal entries dated over this many days back (`--dated`);
    /// absent: patients, which no window applies to.
    pub dated_days: Option<u32>,
    /// The new device syncs by windows (`--windowed`): entries older than 90 days stay out.
    pub windowed: bool,
    /// Entities the new device holds after its first sync.
    pub fresh_entities: u64,
    /// A new device's first sync: compacted documents for every entity, seconds.
    pub fresh_pull_seconds: f64,
    pub fresh_entities_per_s: f64,
    /// Frame bytes of the new device's first sync.
    pub fresh_traffic: Traffic,
    pub fresh_device_cpu_us: u64,
    pub fresh_relay_cpu_us: Option<u64>,
}

/// CPU spent by this process and the relay's since `from`.
fn cpu_since(relay: &RelayProc, from: (u64, Option<u64>)) -> (u64, Option<u64>) {
    let own = super::own_cpu_us().saturating_sub(from.0);
    let relay_cpu = match (from.1, relay.cpu_us()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    (own, relay_cpu)
}

fn device(dir: &std::path::Path, seed: u64) -> anyhow::Result<Device> {
    let rng: DeviceRng = Box::new(stream(seed, "catchup/device"));
    Ok(Device::open(dir, Arc::new(SystemTimeSource), rng)?)
}

/// What the new device finds on the relay, and how it syncs.
#[derive(Debug, Clone, Copy)]
pub struct FreshDevice {
    /// Entities on the relay when it pulls.
    pub entities: usize,
    /// Journal entries dated over this many days back instead of patients.
    pub dated_days: Option<u32>,
    /// It syncs by windows.
    pub windowed: bool,
}

pub fn run(
    relay: &RelayProc,
    queued: usize,
    fresh_device: FreshDevice,
    seed: u64,
    compression: bool,
) -> anyhow::Result<CatchupReport> {
    let fresh_entities = fresh_device.entities;
    let options = || SyncOptions {
        compression,
        ..SyncOptions::quiet()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let scratch = tempfile::Builder::new().prefix("fieldsync-catchup-").tempdir()?;
    let mut rng = stream(seed, "catchup/admin");
    let populators = 10;
    let tokens = relay.enrollment_tokens(1, populators + 2, SystemTimeSource.now_ms(), &mut rng)?;

    // A week offline: `queued` writes waiting in the outbox.
    let mut back = device(&scratch.path().join("back"), seed)?;
    rt.block_on(net::enroll(&mut back, &relay.url, &tokens[0]))?;
    // It synced before leaving (it has a cursor), then worked a week without signal.
    let mut machine = SyncMachine::default();
    rt.block_on(net::sync_once(&mut back, &mut machine, &SyncOptions::quiet()))?;
    for i in 0..queued {
        let mut f = Map::new();
        f.insert("name".into(), Value::String(format!("Offline patient {i}")));
        back.put("patient", None, f)?;
    }
    let t = Instant::now();
    let cpu0 = (super::own_cpu_us(), relay.cpu_us());
    let mut machine = SyncMachine::default();
    let drain_opts = options();
    rt.block_on(net::sync_once(&mut back, &mut machine, &drain_opts))?;
    let drain = t.elapsed().as_secs_f64();
    let (drain_device_cpu_us, drain_relay_cpu_us) = cpu_since(relay, cpu0);
    anyhow::ensure!(back.status()?.unsynced == 0, "the queue did not drain");

    // Fill the relay up to `fresh_entities` with synthetic devices, then a new device pulls it all.
    let remaining = fresh_entities.saturating_sub(queued);
    let per = remaining.div_ceil(populators);
    let now = SystemTimeSource.now_ms();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (p, token) in tokens[2..].iter().enumerate() {
            let mut d = SynthDevice::new(seed, 10_000 + p as u64);
            session::enroll(&relay.url, &mut d, token).await?;
            let muts: Vec<_> = (0..per)
                .filter_map(|i| match fresh_device.dated_days {
                    None => {
                        let name = format!("Patient {p}-{i}");
                        let fields: Map<String, Value> =
                            json!({ "name": name }).as_object().cloned().unwrap_or_default();
                        d.create("patient", &fields, now)
                    }
                    Some(days) => {
                        let back = (p * per + i) as u64 % u64::from(days.max(1));
                        let date = &fieldsync_schema::time_fmt::render_ms(now.saturating_sub(back * 86_400_000))[..10];
                        let fields: Map<String, Value> =
                            json!({ "date": date, "pain_level": i % 10, "body": format!("Entry {p}-{i}: knee felt better after the long run") })
                                .as_object()
                                .cloned()
                                .unwrap_or_default();
                        d.create("journal_entry", &fields, now)
                    }
                })
                .collect();
            let batches: Vec<Batch> = muts
                .chunks(128)
                .enumerate()
                .map(|(k, c)| Batch {
                    batch_id: k as u64 + 1,
                    frame: fieldsync_schema::ClientMessage::Push {
                        batch_id: k as u64 + 1,
                        mutations: c.to_vec(),
                    }
                    .encode(),
                    mutations: c.iter().map(|m| m.mutation_id).collect(),
                })
                .collect();
            let ws = session::open(&relay.url, &d).await?;
            let shared = Arc::new(Shared {
                start: Instant::now(),
                index: Default::default(),
                sent_ns: Vec::new(),
                acked: 0.into(),
                total: muts.len() as u64,
            });
            tasks.push(tokio::spawn(session::push_all(ws, batches, None, shared)));
        }
        for t in tasks {
            let r = t.await?;
            anyhow::ensure!(r.errors.is_empty(), "populating failed: {:?}", r.errors);
        }
        anyhow::Ok(())
    })?;
    let mut fresh = device(&scratch.path().join("fresh"), seed + 1)?;
    if fresh_device.windowed {
        fresh.set_windowed(true)?;
    }
    rt.block_on(net::enroll(&mut fresh, &relay.url, &tokens[1]))?;
    let t = Instant::now();
    let cpu0 = (super::own_cpu_us(), relay.cpu_us());
    let mut machine = SyncMachine::default();
    let fresh_opts = options();
    rt.block_on(net::sync_once(&mut fresh, &mut machine, &fresh_opts))?;
    let pull = t.elapsed().as_secs_f64();
    let (fresh_device_cpu_us, fresh_relay_cpu_us) = cpu_since(relay, cpu0);
    let got = fresh.status()?.entities;
    Ok(CatchupReport {
        compression,
        queued: queued as u64,
        drain_seconds: drain,
        drained_per_s: queued as f64 / drain.max(1e-9),
        drain_traffic: drain_opts.traffic.total(),
        drain_device_cpu_us,
        drain_relay_cpu_us,
        dated_days: fresh_device.dated_days,
        windowed: fresh_device.windowed,
        fresh_entities: got,
        fresh_pull_seconds: pull,
        fresh_entities_per_s: got as f64 / pull.max(1e-9),
        fresh_traffic: fresh_opts.traffic.total(),
        fresh_device_cpu_us,
        fresh_relay_cpu_us,
    })
}
