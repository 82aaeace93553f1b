//! The CI sweeps. The fixed-shape sweep: every invariant holds for seeds 1..=8 plus a few seeds
//! derived from the commit under test, 8 devices, 200 steps, every fault on (the deliberate-bug
//! tests rely on its seeds); `FIELDSYNC_SIM_SEEDS=A..B` replaces them. The swarm sweep: 300
//! seeds, each drawing its own shape, on every core; `FIELDSYNC_SWARM_SEEDS=A..B`
//! replaces them. A failing seed leaves a trace to replay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use fieldsync_simulations::{FaultSet, SimOptions, SwarmBounds, run};

/// The first 48 bits of the commit under test, if git can tell.
fn commit_base() -> Option<u64> {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| u64::from_str_radix(String::from_utf8_lossy(&o.stdout).get(..12)?, 16).ok())
}

fn seeds_from_env(var: &str) -> Option<Vec<u64>> {
    let range = std::env::var(var).ok()?;
    let (a, b) = range.split_once("..").expect("A..B");
    Some((a.parse().unwrap()..b.parse().unwrap()).collect())
}

/// Seeds 1..=8, and four consecutive seeds starting from the current commit's hash.
fn ci_seeds() -> Vec<u64> {
    if let Some(seeds) = seeds_from_env("FIELDSYNC_SIM_SEEDS") {
        return seeds;
    }
    let mut seeds: Vec<u64> = (1..=8).collect();
    if let Some(base) = commit_base() {
        seeds.extend((0..4).map(|k| base.wrapping_add(k)));
    }
    seeds
}

#[test]
fn the_sweep_with_every_fault_keeps_every_invariant() {
    let mut failures = Vec::new();
    let (mut events, mut hours, mut wall) = (0u64, 0f64, 0f64);
    for seed in ci_seeds() {
        let trace = std::env::temp_dir().join(format!("fieldsync-sim-ci-{seed}.trace"));
        let opts = SimOptions {
            seed,
            devices: 8,
            steps: 200,
            faults: FaultSet::all(),
            bug: None,
            shape: Default::default(),
            upgrades: false,
            relays: 1,
            wearables: false,
        };
        let report = run(opts, Some(&trace), false).unwrap();
        events += report.stats.events;
        hours += report.simulated_hours;
        wall += report.wall_seconds;
        if report.ok() {
            let _ = std::fs::remove_file(&trace);
            assert!(report.converged);
        } else {
            failures.push(format!(
                "{}replay: fieldsync-sim --replay {}",
                report.render(),
                trace.display()
            ));
        }
    }
    eprintln!(
        "sweep: {events} events, {hours:.0} simulated hours, {:.0} events/s",
        events as f64 / wall.max(1e-9)
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Swarm seeds 1..=150, and 150 consecutive seeds from the commit's hash (so each commit hunts
/// new ground); `FIELDSYNC_SWARM_SEEDS=A..B` replaces them.
fn swarm_seeds() -> Vec<u64> {
    if let Some(seeds) = seeds_from_env("FIELDSYNC_SWARM_SEEDS") {
        return seeds;
    }
    let mut seeds: Vec<u64> = (1..=150).collect();
    if let Some(base) = commit_base() {
        seeds.extend((0..150).map(|k| (base << 8).wrapping_add(k)));
    }
    seeds
}

/// Every swarm seed's run, each drawing its own shape (devices, steps, faults and their rate,
/// hot-record skew, bursts) within CI's bounds, on every core. A failure prints the command
/// that replays it.
#[test]
fn the_swarm_sweep_keeps_every_invariant_in_shapes_no_one_chose() {
    let seeds = swarm_seeds();
    let next = AtomicUsize::new(0);
    let results = Mutex::new((0u64, 0f64, 0f64, Vec::new()));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let trace = std::env::temp_dir().join(format!("fieldsync-swarm-ci-{seed}.trace"));
                    let report = run(SimOptions::swarm(seed, SwarmBounds::CI), Some(&trace), false).unwrap();
                    let mut r = results.lock().unwrap();
                    r.0 += report.stats.events;
                    r.1 += report.simulated_hours;
                    r.2 += report.wall_seconds;
                    if report.ok() {
                        let _ = std::fs::remove_file(&trace);
                    } else {
                        r.3.push(format!(
                            "{}replay: fieldsync-sim --swarm --swarm-scale ci --seed {seed} (or --replay {})",
                            report.render(),
                            trace.display()
                        ));
                    }
                }
            });
        }
    });
    let (events, hours, wall, failures) = results.into_inner().unwrap();
    eprintln!(
        "swarm sweep: {} seeds, {events} events, {hours:.0} simulated hours, {:.0} events/s per thread",
        seeds.len(),
        events as f64 / wall.max(1e-9)
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
