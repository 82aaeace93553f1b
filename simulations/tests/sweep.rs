//! The CI sweep: every invariant holds for a fixed range of seeds plus a few seeds derived from
//! the commit under test (so each commit also explores new ground), with every fault on.
//! `FIELDSYNC_SIM_SEEDS=A..B` replaces the range. A failing seed leaves a trace to replay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_simulations::{FaultSet, SimOptions, run};

/// Seeds 1..=8, and four consecutive seeds starting from the current commit's hash.
fn ci_seeds() -> Vec<u64> {
    if let Ok(range) = std::env::var("FIELDSYNC_SIM_SEEDS") {
        let (a, b) = range.split_once("..").expect("FIELDSYNC_SIM_SEEDS=A..B");
        return (a.parse().unwrap()..b.parse().unwrap()).collect();
    }
    let mut seeds: Vec<u64> = (1..=8).collect();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| u64::from_str_radix(String::from_utf8_lossy(&o.stdout).get(..12)?, 16).ok());
    if let Some(base) = commit {
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
