//! The relay's hot path in one process, no network: verify + policy + validation + apply +
//! audit + receipt + group commit (`synchronous=FULL` on the real disk), per mutation.
//!
//! `cargo bench -p fieldsync-simulations --bench relay_apply` prints, per group size, the
//! wall and CPU microseconds per mutation (compare with `../shared/anchors/floor`), then the
//! cost of one more change against an entity's history length (10, 1,000, 10,000 changes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use fieldsync_relay::admin;
use fieldsync_relay::core::{ConnId, Input, Output, RelayConfig, RelayCore};
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_schema::{ClientMessage, Mutation, RelayMessage, Role, Schema};
use fieldsync_simulations::rng::stream;
use fieldsync_simulations::synth::SynthDevice;
use serde_json::json;

const T0: u64 = 1_795_420_800_000;

use fieldsync_schema::testkit::obj;

/// Process CPU time (user + system) in microseconds.
fn cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    ticks * 10_000 // USER_HZ = 100
}

struct Bench {
    _dir: tempfile::TempDir,
    core: RelayCore<SqliteBackend>,
    devices: Vec<(SynthDevice, ConnId)>,
    now: u64,
}

impl Bench {
    fn new(devices: usize) -> Bench {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let backend = SqliteBackend::open(dir.path(), uuid::Uuid::nil()).unwrap();
        let config = RelayConfig {
            rate_burst: 1e12,
            rate_per_sec: 1e12,
            ..RelayConfig::default()
        };
        let mut core = RelayCore::new(
            &backend,
            Arc::new(Schema::default_schema()),
            config,
            Box::new(stream(1, "relay")),
        )
        .unwrap();
        let mut rng = stream(1, "admin");
        admin::add_space(core.directory_mut(), "gym", T0, &mut rng).unwrap();
        admin::add_user(core.directory_mut(), "pat", "gym", Role::Patient, T0, &mut rng).unwrap();
        let mut out = Vec::new();
        let mut conn: ConnId = 1;
        for i in 0..devices {
            let mut d = SynthDevice::new(1, i as u64);
            let (token, _) =
                admin::create_enrollment_token(core.directory_mut(), "pat", 3_600_000, T0, &mut rng).unwrap();
            core.handle([Input::Opened(conn)], 0);
            let o = core.handle([Input::message(conn, d.enroll_message(&token))], T0);
            let Some(Output::Send(_, RelayMessage::Enrolled { user, .. })) = o.into_iter().next() else {
                panic!("enrollment failed")
            };
            d.user_id = user.user_id;
            d.space_id = user.spaces[0].space_id;
            conn += 1;
            core.handle([Input::Opened(conn)], 0);
            let o = core.handle([Input::message(conn, d.hello())], T0);
            let Some(Output::Send(_, RelayMessage::Challenge { relay_id, nonce })) = o.into_iter().next() else {
                panic!("no challenge")
            };
            core.handle([Input::message(conn, d.auth(relay_id, &nonce.0))], T0);
            out.push((d, conn));
            conn += 1;
        }
        Bench {
            _dir: dir,
            core,
            devices: out,
            now: T0,
        }
    }

    /// Hands one group to the core; returns how many were applied.
    fn group(&mut self, pushes: Vec<(ConnId, Vec<Mutation>)>) -> usize {
        self.now += 1;
        let inputs = pushes
            .into_iter()
            .enumerate()
            .map(|(i, (c, mutations))| {
                Input::message(
                    c,
                    ClientMessage::Push {
                        batch_id: i as u64,
                        mutations,
                    },
                )
            })
            .collect::<Vec<_>>();
        let out = self.core.handle(inputs, self.now);
        out.iter()
            .map(|o| match o {
                Output::Send(_, RelayMessage::PushResult { results, .. }) => {
                    results.iter().filter(|r| r.outcome.applied().is_some()).count()
                }
                _ => 0,
            })
            .sum()
    }
}

fn group_sizes() {
    println!(
        "relay apply + group commit (synchronous=FULL, {}):",
        std::env::temp_dir().display()
    );
    println!(
        "  {:>6} {:>12} {:>12} {:>14}",
        "group", "wall µs/mut", "cpu µs/mut", "mutations/s"
    );
    for &(devices, per_device) in &[(1usize, 1usize), (10, 1), (10, 10), (50, 10), (100, 10)] {
        let mut b = Bench::new(devices);
        let rounds = (2000 / (devices * per_device)).clamp(5, 400);
        // Each device creates entities, then keeps updating them (one batch per device per group).
        let mut plans: Vec<Vec<Vec<Mutation>>> = Vec::new();
        for (d, _) in b.devices.iter_mut() {
            let mut batches = Vec::new();
            let mut ids = Vec::new();
            for r in 0..rounds {
                let mut batch = Vec::new();
                for k in 0..per_device {
                    let m = if r == 0 {
                        let m = d.create("workout", &obj(json!({"name": format!("W{k}")})), T0).unwrap();
                        ids.push(m.entity_id);
                        m
                    } else {
                        d.update(ids[k], &obj(json!({"notes": format!("round {r}")})), T0 + r as u64)
                            .unwrap()
                    };
                    batch.push(m);
                }
                batches.push(batch);
            }
            plans.push(batches);
        }
        let conns: Vec<ConnId> = b.devices.iter().map(|(_, c)| *c).collect();
        let (t, c) = (Instant::now(), cpu_us());
        let mut applied = 0;
        for r in 0..rounds {
            let pushes = conns
                .iter()
                .zip(plans.iter_mut())
                .map(|(c, p)| (*c, std::mem::take(&mut p[r])))
                .collect();
            applied += b.group(pushes);
        }
        let (wall, cpu) = (t.elapsed().as_secs_f64() * 1e6, (cpu_us() - c) as f64);
        assert_eq!(applied, rounds * devices * per_device, "every mutation applies");
        println!(
            "  {:>6} {:>12.1} {:>12.1} {:>14.0}",
            devices * per_device,
            wall / applied as f64,
            cpu / applied as f64,
            applied as f64 / (wall / 1e6)
        );
    }
}

fn history_lengths() {
    println!("cost of one more change against the entity's history (groups of 50):");
    println!("  {:>8} {:>12} {:>12}", "history", "wall µs/mut", "cpu µs/mut");
    for &history in &[10usize, 1_000, 10_000] {
        let mut b = Bench::new(1);
        let conn = b.devices[0].1;
        let id = {
            let d = &mut b.devices[0].0;
            let m = d.create("workout", &obj(json!({"name": "hot"})), T0).unwrap();
            let id = m.entity_id;
            b.group(vec![(conn, vec![m])]);
            id
        };
        let mut built = 1;
        while built < history {
            let n = (history - built).min(200);
            let batch: Vec<Mutation> = (0..n)
                .map(|k| {
                    b.devices[0]
                        .0
                        .update(
                            id,
                            &obj(json!({"notes": format!("h{}", built + k)})),
                            T0 + (built + k) as u64,
                        )
                        .unwrap()
                })
                .collect();
            b.group(vec![(conn, batch)]);
            built += n;
        }
        let measured = 200;
        let batches: Vec<Vec<Mutation>> = (0..measured / 50)
            .map(|g| {
                (0..50)
                    .map(|k| {
                        let i = history + g * 50 + k;
                        b.devices[0]
                            .0
                            .update(id, &obj(json!({"notes": format!("m{i}")})), T0 + i as u64)
                            .unwrap()
                    })
                    .collect()
            })
            .collect();
        let (t, c) = (Instant::now(), cpu_us());
        let mut applied = 0;
        for batch in batches {
            applied += b.group(vec![(conn, batch)]);
        }
        let (wall, cpu) = (t.elapsed().as_secs_f64() * 1e6, (cpu_us() - c) as f64);
        assert_eq!(applied, measured);
        println!(
            "  {:>8} {:>12.1} {:>12.1}",
            history,
            wall / applied as f64,
            cpu / applied as f64
        );
    }
}

fn main() {
    // `BENCH_PHASE=groups` or `history` runs one part (handy under a profiler).
    let phase = std::env::var("BENCH_PHASE").unwrap_or_default();
    if phase.is_empty() || phase == "groups" {
        group_sizes();
    }
    if phase.is_empty() || phase == "history" {
        history_lengths();
    }
}
