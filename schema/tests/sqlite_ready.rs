//! SQLCipher's additions are on every connection [`sqlite_key::open`] gives, even one opened
//! while another thread is initialising SQLite.
//!
//! SQLite's initialisation happens once per process, so this file holds one test: its own
//! process, where the threads below are the first to touch SQLite. A thread opening a plain
//! connection first (as a test, or a library, may) races the ones opening through
//! `sqlite_key::open`; before [`sqlite_key::ready`], a connection could come back without
//! `sqlcipher_export` (CI saw encrypting a plaintext device fail with "no such function").

use std::sync::{Arc, Barrier};

use fieldsync_schema::sqlite_key;
use rusqlite::Connection;

fn knows_sqlcipher_export(conn: &Connection) -> bool {
    conn.query_row(
        "SELECT COUNT(*) FROM pragma_function_list WHERE name = 'sqlcipher_export'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n == 1)
    .unwrap_or(false)
}

#[test]
fn connections_opened_while_sqlite_initialises_have_sqlcipher_export() {
    let dir = tempfile::tempdir().unwrap();
    let threads = 8;
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let start = Arc::clone(&start);
            let path = dir.path().join(format!("{i}.db"));
            std::thread::spawn(move || {
                start.wait();
                if i % 2 == 0 {
                    // A bystander that may be the one initialising SQLite.
                    Connection::open_in_memory().map(|_| true).unwrap_or(false)
                } else {
                    let conn = sqlite_key::open_rw(&path, None).unwrap();
                    knows_sqlcipher_export(&conn)
                }
            })
        })
        .collect();
    for (i, handle) in handles.into_iter().enumerate() {
        assert!(
            handle.join().unwrap(),
            "thread {i} got a connection without sqlcipher_export"
        );
    }
}
