//! One relay per SQLite data directory: a second `serve` on a served directory is refused (two
//! relays each kept their own order and fan-out, and a watching device missed a record for
//! good), while admin commands keep working beside the running relay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use fieldsync_tests::{Relay, bin};

#[test]
fn a_second_serve_on_a_served_directory_is_refused_and_admin_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = Relay::start(&data, 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let started = Instant::now();
    let second = Command::new(bin("fieldsync-relay"))
        .args(["serve", "--data"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once, not after a timeout"
    );
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already serving"), "{stderr}");
    assert_eq!(stderr.matches("already serving").count(), 1, "said once: {stderr}");
    // Admin commands work beside the running relay; the running relay is untouched.
    assert!(relay.admin(&["user", "list"]).to_string().contains("dana"));
    let (code, _) = fieldsync_tests::http_get(relay.addr, "/healthz");
    assert_eq!(code, 200);
    // Once the first relay stops, the directory can be served again.
    assert!(relay.stop());
    let again = Relay::start(&data, 0);
    assert_eq!(fieldsync_tests::http_get(again.addr, "/healthz").0, 200);
}

#[test]
fn a_serve_that_cannot_bind_its_port_leaves_no_database_behind() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let data = dir.path().join("fresh");
    let out = Command::new(bin("fieldsync-relay"))
        .args(["serve", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert_eq!(stderr.matches("cannot listen").count(), 1, "said once: {stderr}");
    assert!(!data.join("relay.db").exists(), "no database was created");
}

#[test]
fn a_serve_that_cannot_listen_says_so_once_and_leaves_no_directory_behind() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("first"), 0);
    let second = dir.path().join("second");
    let out = Command::new(bin("fieldsync-relay"))
        .args(["serve", "--data"])
        .arg(&second)
        .args(["--listen", &relay.addr.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot listen on {}", relay.addr)), "{stderr}");
    assert_eq!(stderr.matches("in use").count(), 1, "the cause said once: {stderr}");
    assert!(
        !second.exists(),
        "no data directory created for a relay that never served"
    );
}
