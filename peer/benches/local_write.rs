//! Local write latency and open time of a device holding many entities.
//!
//! `cargo bench -p fieldsync-peer --bench local_write` (50,000 entities; override with
//! `FIELDSYNC_BENCH_ENTITIES=N`; `FIELDSYNC_BENCH_ENCRYPTED=1` encrypts the database at rest). Real files in a temp dir, WAL with `synchronous=FULL`: every
//! measured write is a durable commit, as in production.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync_peer::{Device, FieldFilter};
use fieldsync_schema::SystemTimeSource;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use serde_json::json;
use uuid::Uuid;

use fieldsync_schema::testkit::obj;

fn open(dir: &std::path::Path, seed: u64) -> Device {
    let key = std::env::var("FIELDSYNC_BENCH_ENCRYPTED")
        .is_ok_and(|v| v == "1")
        .then(|| fieldsync_peer::DatabaseKey::from_bytes([0x5e; 32]));
    match Device::open_keyed(
        dir,
        Arc::new(SystemTimeSource),
        Box::new(ChaCha20Rng::seed_from_u64(seed)),
        Arc::new(fieldsync_schema::Schema::default_schema()),
        key,
    ) {
        Ok(d) => d,
        Err(e) => panic!("open: {e}"),
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut d: Vec<Duration>) {
    d.sort_unstable();
    println!(
        "{what:<44} n={:<6} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
        d.len(),
        pct(&d, 0.50).as_secs_f64() * 1e3,
        pct(&d, 0.99).as_secs_f64() * 1e3,
        d.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

fn main() {
    let n: usize = std::env::var("FIELDSYNC_BENCH_ENTITIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let mut dev = open(dir.path(), 1);
    let mut pick = ChaCha20Rng::seed_from_u64(2);
    let mut patients: Vec<Uuid> = Vec::new();
    let mut creates = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        // Four patients, then a session for a random earlier patient.
        let (ty, fields) = if i % 5 == 4 && !patients.is_empty() {
            let p = patients[(pick.next_u64() % patients.len() as u64) as usize];
            (
                "session",
                json!({"patient_id": p.to_string(), "started_at": "2026-11-22T09:30:00Z", "status": "completed"}),
            )
        } else {
            (
                "patient",
                json!({"name": format!("Patient {i}"), "mrn": format!("M{i:06}")}),
            )
        };
        let t = Instant::now();
        let r = dev.put(ty, None, obj(fields));
        creates.push(t.elapsed());
        match r {
            Ok(r) if ty == "patient" => patients.push(r.entity_id),
            Ok(_) => {}
            Err(e) => panic!("write {i}: {e}"),
        }
    }
    let total = started.elapsed();
    println!("fieldsync-peer local write benchmark: {n} entities, WAL + synchronous=FULL");
    println!(
        "created {n} entities in {:.1} s ({:.0} writes/s)",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
    report("create (validate + doc + outbox, 1 txn)", creates);

    let mut updates = Vec::new();
    for i in 0..2_000 {
        let p = patients[(pick.next_u64() % patients.len() as u64) as usize];
        let t = Instant::now();
        if let Err(e) = dev.update("patient", p, obj(json!({"phone": format!("555-{i:04}")}))) {
            panic!("update: {e}");
        }
        updates.push(t.elapsed());
    }
    report(&format!("update of an existing entity ({n} held)"), updates);
    drop(dev);

    let mut opens = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let d = open(dir.path(), 10 + i);
        opens.push(t.elapsed());
        drop(d);
    }
    report(&format!("open with {} entities", n), opens);

    let dev = open(dir.path(), 20);
    let t = Instant::now();
    let status = match dev.status() {
        Ok(s) => s,
        Err(e) => panic!("status: {e}"),
    };
    let status_time = t.elapsed();
    let mut lists = Vec::new();
    let mut listed = 0;
    for _ in 0..5 {
        let t = Instant::now();
        listed = dev.list("session", &[], false).map(|v| v.len()).unwrap_or(0);
        lists.push(t.elapsed());
    }
    report(&format!("list one type (session: {listed} entities)"), lists);
    let mut filtered = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let f = FieldFilter {
            field: "mrn".into(),
            value: json!("M000123"),
        };
        let _ = dev.list("patient", &[f], false);
        filtered.push(t.elapsed());
    }
    report("list patient --where mrn=M000123", filtered);
    println!(
        "status: {:.3} ms (unsynced {}, entities {})",
        status_time.as_secs_f64() * 1e3,
        status.unsynced,
        status.entities
    );
    let size = std::fs::metadata(dir.path().join("device.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("database size: {:.1} MiB", size as f64 / 1048576.0);
}
