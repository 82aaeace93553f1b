//! Catch-up benchmarks with the real device library (SQLite on disk, `synchronous=FULL`):
//! a device back after a week offline pushing its queue, and a new device pulling everything.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use fieldsync_peer::net::{self, SyncOptions};
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
    pub queued: u64,
    /// From connecting to the last acknowledgement (and the pull that follows), seconds.
    pub drain_seconds: f64,
    pub drained_per_s: f64,
    pub fresh_entities: u64,
    /// A new device's first sync: compacted documents for every entity, seconds.
    pub fresh_pull_seconds: f64,
    pub fresh_entities_per_s: f64,
}

fn device(dir: &std::path::Path, seed: u64) -> anyhow::Result<Device> {
    let rng: DeviceRng = Box::new(stream(seed, "catchup/device"));
    Ok(Device::open(dir, Arc::new(SystemTimeSource), rng)?)
}

pub fn run(relay: &RelayProc, queued: usize, fresh_entities: usize, seed: u64) -> anyhow::Result<CatchupReport> {
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
    let mut machine = SyncMachine::default();
    rt.block_on(net::sync_once(&mut back, &mut machine, &SyncOptions::quiet()))?;
    let drain = t.elapsed().as_secs_f64();
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
            let fields: Map<String, Value> = json!({"name": "Patient"}).as_object().cloned().unwrap_or_default();
            let muts: Vec<_> = (0..per).filter_map(|_| d.create("patient", &fields, now)).collect();
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
    rt.block_on(net::enroll(&mut fresh, &relay.url, &tokens[1]))?;
    let t = Instant::now();
    let mut machine = SyncMachine::default();
    rt.block_on(net::sync_once(&mut fresh, &mut machine, &SyncOptions::quiet()))?;
    let pull = t.elapsed().as_secs_f64();
    let got = fresh.status()?.entities;
    Ok(CatchupReport {
        queued: queued as u64,
        drain_seconds: drain,
        drained_per_s: queued as f64 / drain.max(1e-9),
        fresh_entities: got,
        fresh_pull_seconds: pull,
        fresh_entities_per_s: got as f64 / pull.max(1e-9),
    })
}
