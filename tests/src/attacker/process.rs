//! The relay process from outside: its status page, its pid, memory and TCP states.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use fieldsync_peer::net::{self, SyncOptions};
use fieldsync_peer::sync::SyncMachine;
use serde_json::Value;

use super::obj;
use crate::{Relay, open_device};

/// `/v1/status` as JSON.
pub fn status(relay: &Relay) -> Value {
    let (code, body) = crate::http_get(relay.addr, "/v1/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

/// The relay process's id, found by its command line (it names the test's data directory).
pub fn relay_pid(relay: &Relay) -> u32 {
    let data = relay.data.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("fieldsync-relay"))
            && args.iter().any(|a| a == "serve")
            && args.contains(&data)
        {
            return pid;
        }
    }
    panic!("no relay process serving {data}");
}

/// Resident memory of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The TCP state (as in `/proc/net/tcp`: 01 established, 04 FIN_WAIT1, ...) of the socket with
/// local address `local` and remote address `remote`, if there is one.
pub fn tcp_state(local: SocketAddr, remote: SocketAddr) -> Option<u8> {
    fn hex_addr(a: SocketAddr) -> String {
        let SocketAddr::V4(v4) = a else { panic!("IPv4 only") };
        let ip = u32::from_le_bytes(v4.ip().octets());
        format!("{ip:08X}:{:04X}", v4.port())
    }
    let (l, r) = (hex_addr(local), hex_addr(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.len() > 3 && cols[1] == l && cols[2] == r).then(|| u8::from_str_radix(cols[3], 16).unwrap())
    })
}

/// The honest path still works: a new device of `user` (the real peer library) enrolls, writes
/// an entity of `entity_type` and syncs; a second new device of the same user receives it.
/// Returns how long the round took.
pub async fn honest_round_trip(relay: &Relay, dir: &Path, user: &str, entity_type: &str, fields: Value) -> Duration {
    let started = Instant::now();
    let opts = SyncOptions {
        progress: false,
        ..SyncOptions::default()
    };
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut writer = open_device(&dir.join(format!("honest-{n}-w")), 1000 + n * 2);
    net::enroll(&mut writer, &relay.url(), &relay.token(user))
        .await
        .unwrap();
    let id = writer.put(entity_type, None, obj(fields.clone())).unwrap().entity_id;
    let mut machine = SyncMachine::default();
    tokio::time::timeout(
        Duration::from_secs(30),
        net::sync_once(&mut writer, &mut machine, &opts),
    )
    .await
    .expect("the honest sync timed out")
    .expect("the honest sync failed");
    let status = writer.status().unwrap();
    assert_eq!(status.unsynced, 0, "the honest write was not accepted: {status:?}");
    let mut reader = open_device(&dir.join(format!("honest-{n}-r")), 1001 + n * 2);
    net::enroll(&mut reader, &relay.url(), &relay.token(user))
        .await
        .unwrap();
    let mut machine = SyncMachine::default();
    tokio::time::timeout(
        Duration::from_secs(30),
        net::sync_once(&mut reader, &mut machine, &opts),
    )
    .await
    .expect("the honest pull timed out")
    .expect("the honest pull failed");
    let got = reader
        .get(id)
        .unwrap()
        .expect("the second honest device received the write");
    for (k, v) in obj(fields) {
        assert_eq!(got.fields.get(&k), Some(&v), "field {k}");
    }
    started.elapsed()
}
