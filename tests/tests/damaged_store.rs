//! A damaged page in a relay store file is found when the relay starts: `serve` refuses with
//! the file, what SQLite found and the restore command, and after that restore the relay
//! serves the data the backup held.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use fieldsync_tests::{Peer, Relay, bin, stdout_of};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn serve_refuses_a_damaged_store_names_the_file_and_the_restore_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let a = Peer::init(&dir.path().join("a"));
    a.enroll(&relay, "dana");
    for i in 0..40 {
        a.put(
            "patient",
            &format!(r#"{{"name": "Patient {i}", "phone": "{}"}}"#, "5".repeat(30)),
        );
    }
    a.ok(&["sync"]);
    let backup = dir.path().join("backup");
    let out = Relay::cli(&["backup", "--data", p(&relay.data), "--to", p(&backup), "--verify"]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    assert!(relay.stop());

    // Damage the clinic's shard (the largest file) one page in.
    let shard = std::fs::read_dir(relay.data.join("shards"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "db"))
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut f = std::fs::OpenOptions::new().write(true).open(&shard).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(&[0xA5; 4096]).unwrap();
    drop(f);

    let refused = Command::new(bin("fieldsync-relay"))
        .args(["serve", "--data", p(&relay.data), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is damaged"), "{stderr}");
    assert!(stderr.contains(p(&shard)), "names the damaged file: {stderr}");
    assert!(
        stderr.contains("fieldsync-relay restore --from"),
        "points at the restore: {stderr}"
    );

    let out = Relay::cli(&["restore", "--from", p(&backup), "--data", p(&relay.data), "--force"]);
    assert!(
        out.status.success(),
        "{}{}",
        stdout_of(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let relay = Relay::start(&relay.data, 0);
    let b = Peer::init(&dir.path().join("b"));
    b.enroll(&relay, "dana");
    b.ok(&["sync"]);
    assert_eq!(b.json(&["list", "patient"]).as_array().unwrap().len(), 40);
}
