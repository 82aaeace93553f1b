//! Architecture invariants that a grep can check (ARCHITECTURE.md, "Architecture invariants"):
//! the cores — the relay's acceptance core and the device's library below its network shell —
//! never import tokio, open sockets, read a clock, sleep, spawn threads or draw randomness from
//! the operating system. Storage I/O through `Store` / `Device` is theirs; everything else comes
//! in as input (messages, `now_ms`, an injected RNG and time source).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// What a core file must not mention.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "std::net",
    "TcpStream",
    "SystemTime::now",
    "Instant::now",
    "SystemTimeSource",
    "thread::spawn",
    "thread::sleep",
    "OsRng",
    "SysRng",
    "thread_rng",
    "rand::rng(",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The core files: the relay's `core/`, and the device library except its network shell, its
/// binary and its test helpers.
fn core_files() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root.join("relay/src/core"), &mut files);
    let mut peer = Vec::new();
    rust_files(&root.join("peer/src"), &mut peer);
    files.extend(peer.into_iter().filter(|p| {
        let s = p.to_string_lossy();
        !s.contains("/net/") && !s.contains("/bin/") && !s.ends_with("testutil.rs")
    }));
    files
}

#[test]
fn the_cores_import_no_tokio_and_read_no_clock_network_or_os_randomness() {
    let files = core_files();
    assert!(files.len() > 20, "found only {} core files", files.len());
    let mut offences = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                if code.contains(word) {
                    offences.push(format!("{}:{}: `{word}` in `{}`", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "core files reach outside:\n{}",
        offences.join("\n")
    );
}

/// The device's tables and the one module that reads and writes each (`db.rs`, which creates
/// and migrates them, aside): the rules about a table live beside its SQL.
const DEVICE_TABLES: &[(&str, &str)] = &[
    ("outbox", "peer/src/outbox.rs"),
    ("entities", "peer/src/entity.rs"),
    ("conflicts", "peer/src/conflict/"),
    ("rejected_edits", "peer/src/conflict/"),
    ("lww_losses", "peer/src/conflict/"),
    ("meta", "peer/src/db.rs"),
];

/// A file's code before its unit tests (tests may look at any table).
fn production_part(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or(text)
}

#[test]
fn each_device_table_is_read_and_written_only_by_its_module() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root.join("peer/src"), &mut files);
    let mut offences = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
        let is_test =
            relative.contains("/tests") || relative.ends_with("testutil.rs") || relative.contains("property_tests");
        if is_test || relative == "peer/src/db.rs" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in production_part(&text).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (table, owner) in DEVICE_TABLES {
                let touches = ["FROM ", "INTO ", "UPDATE ", "JOIN "].iter().any(|verb| {
                    code.split(&format!("{verb}{table}"))
                        .skip(1)
                        .any(|rest| !rest.starts_with(|c: char| c == '_' || c.is_alphanumeric()))
                });
                if touches {
                    seen.insert(*table);
                    if !relative.starts_with(owner) {
                        offences.push(format!(
                            "{relative}:{}: `{table}` belongs to {owner}: `{}`",
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "tables used outside their module:\n{}",
        offences.join("\n")
    );
    // The check sees SQL at all (a renamed table would otherwise pass it silently).
    for (table, _) in DEVICE_TABLES.iter().filter(|(t, _)| *t != "meta") {
        assert!(
            seen.contains(table),
            "no SQL on `{table}` found: is the table list stale?"
        );
    }
}
