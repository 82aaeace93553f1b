//! The crash soak, shortened for CI: `fieldsync-sim crash-soak` kills the real relay process
//! with SIGKILL while real devices push, and kills real `fieldsync-peer` processes mid-write and
//! mid-sync. Every acknowledged write must survive exactly once, and every audit chain verify.
//! The full soak (100 relay kills, 50 devices) is `fieldsync-sim crash-soak` in release.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use fieldsync_tests::bin;
use serde_json::Value;

#[test]
fn relay_and_device_kills_lose_no_acknowledged_write_and_apply_none_twice() {
    let out = Command::new(bin("fieldsync-sim"))
        .args(["crash-soak", "--cycles", "8", "--devices", "12", "--spaces", "3"])
        .args(["--device-cycles", "40", "--seed", "7", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let relay = &report["relay"];
    let devices = &report["devices"];
    assert_eq!(relay["relay_kills"], 8, "{report:#}");
    assert!(
        relay["acked_checked"].as_u64().unwrap() > 0,
        "kills came after acknowledgements: {report:#}"
    );
    for figure in [
        "acked_lost",
        "duplicates",
        "lost_after_drain",
        "mutation_ids_reused",
        "audit_failures",
    ] {
        assert_eq!(relay[figure], 0, "relay {figure}: {report:#}");
    }
    // `acked_lost` is the relay half's; the devices half counts `acked_local_lost` (below).
    for figure in [
        "duplicates",
        "lost_after_drain",
        "mutation_ids_reused",
        "audit_failures",
    ] {
        assert_eq!(devices[figure], 0, "devices {figure}: {report:#}");
    }
    assert_eq!(
        relay["relay_mutations"], relay["writes"],
        "every write applied once: {report:#}"
    );
    assert!(devices["kills"].as_u64().unwrap() >= 5, "{report:#}");
    for figure in [
        "acked_local_lost",
        "opens_failed",
        "unexplained_local",
        "devices_not_drained",
    ] {
        assert_eq!(devices[figure], 0, "devices {figure}: {report:#}");
    }
    assert_eq!(report["ok"], true, "{report:#}");
    assert!(out.status.success());
}
