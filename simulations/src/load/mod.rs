//! The load generator (`fieldsync-sim load`): K real device sessions over WebSockets on
//! 127.0.0.1 against a real relay process. Every mutation is built and signed before the timed
//! phase, so the figures are the relay's, not this tool's.

pub mod catchup;
pub mod relay_proc;
pub mod session;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::Context;
use fieldsync_schema::{ClientMessage, Mutation, SystemTimeSource, TimeSource};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::rng::stream;
use crate::synth::SynthDevice;
use relay_proc::RelayProc;
use session::{Batch, SessionResult, Shared};

/// What to write: the entity types and how updates look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mix {
    /// Workouts: a gated clinical record (version gate on every update).
    Gated,
    /// Settings: last-writer-wins per field.
    Lww,
    /// Alternating gated and LWW entities.
    Mixed,
}

impl std::str::FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gated" => Ok(Mix::Gated),
            "lww" => Ok(Mix::Lww),
            "mixed" => Ok(Mix::Mixed),
            other => Err(format!("unknown mix `{other}` (expected gated, lww or mixed)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub devices: usize,
    /// Entities each device creates.
    pub entities: usize,
    /// Updates per entity after its create.
    pub updates: usize,
    pub mix: Mix,
    /// Devices per space (live entries fan out within a space).
    pub space_size: usize,
    /// Mutations per push.
    pub batch: usize,
    /// Target mutations per second over all devices (`None`: as fast as acks allow).
    pub rate: Option<f64>,
    pub seed: u64,
    pub progress: bool,
}

/// The `p` quantile (0..=1) of sorted values, nearest rank; 0 for none.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub devices: usize,
    pub spaces: usize,
    pub mix: Mix,
    pub mutations: u64,
    pub applied: u64,
    pub seconds: f64,
    pub applied_per_s: f64,
    pub target_rate: Option<f64>,
    pub relay_cpu_us_per_mutation: Option<f64>,
    pub relay_cpu_cores: Option<f64>,
    pub push_to_ack_ms: BTreeMap<String, f64>,
    pub fanout_ms: BTreeMap<String, f64>,
    pub fanout_samples: u64,
    pub relay_peak_rss_mb: Option<f64>,
    pub relay_idle_kib_per_connection: Option<f64>,
    pub loadgen_cpu_us_per_mutation: f64,
    pub errors: BTreeMap<String, u64>,
}

pub(crate) fn own_cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let t = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (t(11) + t(12)) * 10_000
}

fn fields(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// Builds, signs and encodes every batch of one device (creates first, then rounds of updates).
fn prepare(
    device: &mut SynthDevice,
    opts: &LoadOptions,
    now: u64,
    next_batch: &mut u64,
) -> Vec<(Batch, Vec<Mutation>)> {
    let mut mutations = Vec::with_capacity(opts.entities * (1 + opts.updates));
    let mut ids = Vec::with_capacity(opts.entities);
    for e in 0..opts.entities {
        let lww = opts.mix == Mix::Lww || (opts.mix == Mix::Mixed && e % 2 == 1);
        let m = if lww {
            device.create(
                "settings",
                &fields(json!({"units": "kg", "available_days": "mon"})),
                now,
            )
        } else {
            device.create("workout", &fields(json!({"name": format!("Workout {e}")})), now)
        };
        if let Some(m) = m {
            ids.push((m.entity_id, lww));
            mutations.push(m);
        }
    }
    for u in 0..opts.updates {
        for (id, lww) in &ids {
            let patch = if *lww {
                json!({"units": if u % 2 == 0 { "lb" } else { "kg" }, "available_days": format!("d{u}")})
            } else {
                json!({"notes": format!("set {u} done"), "duration_min": (u % 90) as i64})
            };
            if let Some(m) = device.update(*id, &fields(patch), now + u as u64) {
                mutations.push(m);
            }
        }
    }
    mutations
        .chunks(opts.batch.max(1))
        .map(|chunk| {
            let batch_id = *next_batch;
            *next_batch += 1;
            let msg = ClientMessage::Push {
                batch_id,
                mutations: chunk.to_vec(),
            };
            (
                Batch {
                    batch_id,
                    frame: msg.encode(),
                    mutations: chunk.iter().map(|m| m.mutation_id).collect(),
                },
                chunk.to_vec(),
            )
        })
        .collect()
}

/// Runs the load against `relay` and reports what it measured.
pub fn run(relay: &RelayProc, opts: &LoadOptions) -> anyhow::Result<LoadReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let now = SystemTimeSource.now_ms();
    let spaces = opts.devices.div_ceil(opts.space_size.max(1));
    let mut admin_rng = stream(opts.seed, "load/admin");
    let tokens = relay.enrollment_tokens(spaces, opts.devices, now, &mut admin_rng)?;
    let mut devices: Vec<SynthDevice> = (0..opts.devices)
        .map(|i| SynthDevice::new(opts.seed, i as u64))
        .collect();
    let say = |s: &str| {
        if opts.progress {
            eprintln!("{s}");
        }
    };
    say(&format!("enrolling {} devices in {spaces} spaces...", opts.devices));
    rt.block_on(async {
        for chunk in devices.chunks_mut(64).zip(tokens.chunks(64)) {
            let futs = chunk
                .0
                .iter_mut()
                .zip(chunk.1)
                .map(|(d, t)| session::enroll(&relay.url, d, t));
            for r in futures_util::future::join_all(futs).await {
                r?;
            }
        }
        anyhow::Ok(())
    })?;

    say("building and signing mutations...");
    let mut next_batch = 1;
    let mut plans: Vec<Vec<Batch>> = Vec::with_capacity(devices.len());
    let mut index = HashMap::new();
    for d in devices.iter_mut() {
        let batches = prepare(d, opts, now, &mut next_batch);
        let mut plan = Vec::with_capacity(batches.len());
        for (b, muts) in batches {
            for m in &muts {
                let i = index.len();
                index.insert(m.mutation_id, i);
            }
            plan.push(b);
        }
        plans.push(plan);
    }
    let total = index.len() as u64;

    say("connecting and catching up...");
    let rss_before = relay.rss_kib();
    let sockets = rt.block_on(async {
        let mut out = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(64) {
            let futs = chunk.iter().map(|d| session::open(&relay.url, d));
            for r in futures_util::future::join_all(futs).await {
                out.push(r?);
            }
        }
        anyhow::Ok(out)
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = relay.rss_kib();

    let shared = Arc::new(Shared {
        start: Instant::now(),
        sent_ns: (0..total).map(|_| AtomicU64::new(0)).collect(),
        index,
        acked: AtomicU64::new(0),
        total,
    });
    let pace = opts.rate.map(|r| {
        let per_device = (r / opts.devices as f64).max(1e-6);
        Duration::from_secs_f64(opts.batch as f64 / per_device)
    });
    let bar = opts.progress.then(|| {
        let b = ProgressBar::new(total);
        if let Ok(s) =
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} acknowledged ({per_sec}, {elapsed})")
        {
            b.set_style(s.progress_chars("=> "));
        }
        b
    });
    say(&format!("pushing {total} mutations..."));
    let (cpu0, own0, t0) = (relay.cpu_us(), own_cpu_us(), Instant::now());
    let results: Vec<SessionResult> = rt.block_on(async {
        let mut handles = Vec::with_capacity(sockets.len());
        let n = sockets.len().max(1) as u32;
        for (i, (ws, plan)) in sockets.into_iter().zip(plans).enumerate() {
            let pace = pace.map(|interval| (interval, interval * i as u32 / n));
            handles.push(tokio::spawn(session::push_all(ws, plan, pace, shared.clone())));
        }
        if let Some(b) = &bar {
            let (b, s) = (b.clone(), shared.clone());
            tokio::spawn(async move {
                loop {
                    b.set_position(s.acked.load(std::sync::atomic::Ordering::Relaxed));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap_or_default());
        }
        out
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // The timed phase ends when the last device's last push was acknowledged.
    let end_ns = results.iter().map(|r| r.finished_ns).max().unwrap_or(0);
    let seconds = if end_ns > 0 {
        end_ns as f64 / 1e9
    } else {
        t0.elapsed().as_secs_f64()
    };
    let relay_cpu = match (cpu0, relay.cpu_us()) {
        (Some(a), Some(b)) => Some((b - a) as f64),
        _ => None,
    };
    let own_cpu = (own_cpu_us() - own0) as f64;

    let mut ack: Vec<f64> = results.iter().flat_map(|r| r.ack_ms.iter().copied()).collect();
    let mut fan: Vec<f64> = results.iter().flat_map(|r| r.fanout_ms.iter().copied()).collect();
    ack.sort_by(f64::total_cmp);
    fan.sort_by(f64::total_cmp);
    let applied: u64 = results.iter().map(|r| r.applied).sum();
    let mut errors = BTreeMap::new();
    for r in &results {
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
    }
    let pct = |v: &[f64], ps: &[(&str, f64)]| ps.iter().map(|(n, p)| (n.to_string(), percentile(v, *p))).collect();
    Ok(LoadReport {
        devices: opts.devices,
        spaces,
        mix: opts.mix,
        mutations: total,
        applied,
        seconds,
        applied_per_s: applied as f64 / seconds.max(1e-9),
        target_rate: opts.rate,
        relay_cpu_us_per_mutation: relay_cpu.map(|c| c / applied.max(1) as f64),
        relay_cpu_cores: relay_cpu.map(|c| c / 1e6 / seconds.max(1e-9)),
        push_to_ack_ms: pct(&ack, &[("p50", 0.5), ("p95", 0.95), ("p99", 0.99)]),
        fanout_ms: pct(&fan, &[("p50", 0.5), ("p99", 0.99)]),
        fanout_samples: fan.len() as u64,
        relay_peak_rss_mb: relay.rss_kib().map(|(_, peak)| peak as f64 / 1024.0),
        relay_idle_kib_per_connection: match (rss_before, rss_idle) {
            (Some((a, _)), Some((b, _))) if opts.devices > 0 => Some(b.saturating_sub(a) as f64 / opts.devices as f64),
            _ => None,
        },
        loadgen_cpu_us_per_mutation: own_cpu / applied.max(1) as f64,
        errors,
    })
}
