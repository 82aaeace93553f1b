//! The hash-chained audit logs: one chain per space, one record per applied mutation, written
//! in the same transaction as the change, each record's hash covering the previous record's
//! hash and its place in the chain.
//!
//! SQLite triggers refuse UPDATE and DELETE on audit rows; the chains catch what the triggers
//! cannot (someone editing a file after dropping them, or restoring a doctored backup). A store
//! migrated from round 1 also keeps the round-1 global chain (`v1_audit`), verified here too.

use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::store::{AuditRow, Backend, Directory, SpaceStore, StoreResult};

/// The hash a chain starts from.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// SHA-256 over the previous hash, the record's space and place in its chain, and every field
/// of the record except its own hash and row id, each length-prefixed so that no two different
/// records hash the same bytes.
pub fn record_hash(row: &AuditRow) -> String {
    let mut h = Sha256::new();
    field(&mut h, b"fieldsync/audit/v2");
    field(&mut h, row.prev_hash.as_bytes());
    field(&mut h, row.space_id.as_bytes());
    field(&mut h, &row.audit_seq.to_be_bytes());
    field(&mut h, &row.seq.to_be_bytes());
    field(&mut h, row.mutation_id.as_bytes());
    field(&mut h, row.actor_id.as_bytes());
    field(&mut h, row.device_id.as_bytes());
    rest(&mut h, row);
    hex::encode(h.finalize())
}

/// The hash of a round-1 record (one global chain: no chain position, the global seq).
pub fn record_hash_round_one(row: &AuditRow) -> String {
    let mut h = Sha256::new();
    field(&mut h, b"fieldsync/audit/v1");
    field(&mut h, row.prev_hash.as_bytes());
    field(&mut h, &row.seq.to_be_bytes());
    field(&mut h, row.mutation_id.as_bytes());
    field(&mut h, row.actor_id.as_bytes());
    field(&mut h, row.device_id.as_bytes());
    field(&mut h, row.space_id.as_bytes());
    rest(&mut h, row);
    hex::encode(h.finalize())
}

fn rest(h: &mut Sha256, row: &AuditRow) {
    field(h, row.entity_type.as_bytes());
    field(h, row.entity_id.as_bytes());
    field(h, row.kind.as_bytes());
    field(h, &row.version.to_be_bytes());
    field(h, row.before_json.as_bytes());
    field(h, row.after_json.as_bytes());
    field(h, row.client_ts.as_bytes());
    field(h, &row.server_ts_ms.to_be_bytes());
}

/// The result of recomputing every chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records in all chains.
    pub records: u64,
    /// One entry per space, in space-id order.
    pub spaces: Vec<SpaceChain>,
    /// The round-1 global chain of a migrated store.
    pub round_one: Option<SpaceChain>,
}

/// One space's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpaceChain {
    pub space_id: Uuid,
    pub records: u64,
    /// The first record whose stored hash, link or place does not match, if any.
    pub first_bad: Option<BadRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadRecord {
    pub audit_id: u64,
    pub mutation_id: String,
    pub reason: String,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.spaces.iter().chain(&self.round_one).all(|c| c.first_bad.is_none())
    }

    /// Every broken chain's first bad record, with its space.
    pub fn bad(&self) -> Vec<(Uuid, &BadRecord)> {
        self.spaces
            .iter()
            .chain(&self.round_one)
            .filter_map(|c| c.first_bad.as_ref().map(|b| (c.space_id, b)))
            .collect()
    }
}

/// Recomputes one space's chain from its first record; names the first record that breaks it.
pub fn verify_space(store: &dyn SpaceStore, space_id: Uuid) -> StoreResult<SpaceChain> {
    let mut prev = GENESIS_HASH.to_string();
    let mut expected_seq = 1u64;
    let mut records = 0u64;
    loop {
        let page = store.audit_after(space_id, expected_seq - 1, 1000)?;
        if page.is_empty() {
            break;
        }
        for row in page {
            records += 1;
            let bad = |reason: String| BadRecord {
                audit_id: row.audit_id,
                mutation_id: row.mutation_id.to_string(),
                reason,
            };
            let problem = if row.audit_seq != expected_seq {
                Some(format!(
                    "place broken: record {} of the chain where {expected_seq} was expected (a record was removed)",
                    row.audit_seq
                ))
            } else if row.prev_hash != prev {
                Some(format!(
                    "link broken: prev_hash {} but the previous record hashes to {prev}",
                    row.prev_hash
                ))
            } else {
                let expect = record_hash(&row);
                (row.hash != expect).then(|| {
                    format!(
                        "content changed: stored hash {} but the record hashes to {expect}",
                        row.hash
                    )
                })
            };
            if let Some(reason) = problem {
                return Ok(SpaceChain {
                    space_id,
                    records,
                    first_bad: Some(bad(reason)),
                });
            }
            prev = row.hash;
            expected_seq += 1;
        }
    }
    // The head the next record will link to must be where the chain ends: a removed tail, or
    // every record removed (an empty chain's head is record 0 at the genesis hash).
    let head = store.space_head(space_id)?;
    let first_bad = (head.audit_seq != records || head.audit_hash != prev).then(|| BadRecord {
        audit_id: 0,
        mutation_id: String::new(),
        reason: format!(
            "the chain ends at record {records} but the space's head says {} ({})",
            head.audit_seq, head.audit_hash
        ),
    });
    Ok(SpaceChain {
        space_id,
        records,
        first_bad,
    })
}

/// Verifies every space's chain (each in the shard the directory names), and the round-1
/// chain of a migrated store.
pub fn verify<B: Backend>(backend: &B) -> StoreResult<VerifyReport> {
    let directory = backend.open_directory()?;
    let mut shards = Vec::new();
    for n in 0..backend.shard_count() {
        shards.push(backend.open_shard(n)?);
    }
    let mut spaces: Vec<(Uuid, u32)> = directory.spaces()?.into_iter().map(|s| (s.space_id, s.shard)).collect();
    spaces.sort();
    let mut report = VerifyReport {
        records: 0,
        spaces: Vec::new(),
        round_one: None,
    };
    for (space, shard) in spaces {
        let Some(store) = shards.get(shard as usize) else {
            continue;
        };
        let chain = verify_space(store, space)?;
        report.records += chain.records;
        report.spaces.push(chain);
    }
    report.round_one = verify_round_one(&directory)?;
    Ok(report)
}

/// The round-1 global chain a migrated store keeps, if it has one.
fn verify_round_one(directory: &impl Directory) -> StoreResult<Option<SpaceChain>> {
    let mut prev = GENESIS_HASH.to_string();
    let mut last = 0u64;
    let mut records = 0u64;
    let mut any = false;
    loop {
        let page = directory.round_one_audit_after(last, 1000)?;
        if page.is_empty() {
            break;
        }
        any = true;
        for row in page {
            records += 1;
            if row.prev_hash != prev || record_hash_round_one(&row) != row.hash {
                return Ok(Some(SpaceChain {
                    space_id: Uuid::nil(),
                    records,
                    first_bad: Some(BadRecord {
                        audit_id: row.audit_id,
                        mutation_id: row.mutation_id.to_string(),
                        reason: "the round-1 chain is broken here".into(),
                    }),
                }));
            }
            prev = row.hash;
            last = row.audit_id;
        }
    }
    Ok(any.then_some(SpaceChain {
        space_id: Uuid::nil(),
        records,
        first_bad: None,
    }))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::store::sqlite::SqliteBackend;

    /// The round-1 relay store of `tests/fixtures/round1`, migrated in a temporary directory,
    /// after `sql` ran on its round-1 chain (with that chain's triggers dropped).
    fn migrated_round_one_store(sql: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("relay");
        std::fs::create_dir_all(&data).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/round1/relay/relay.db");
        std::fs::copy(fixture, data.join("relay.db")).unwrap();
        drop(SqliteBackend::open(&data, Uuid::nil()).unwrap());
        let conn = rusqlite::Connection::open(data.join("relay.db")).unwrap();
        conn.execute_batch("DROP TRIGGER v1_audit_no_update; DROP TRIGGER v1_audit_no_delete;")
            .unwrap();
        conn.execute_batch(sql).unwrap();
        (dir, data)
    }

    fn verify_dir(data: &Path) -> VerifyReport {
        verify(&SqliteBackend::open_existing(data).unwrap()).unwrap()
    }

    #[test]
    fn a_migrated_round_one_chain_verifies_with_every_record_counted() {
        let (_dir, data) = migrated_round_one_store("");
        let report = verify_dir(&data);
        assert!(report.ok(), "{report:?}");
        let kept: i64 = rusqlite::Connection::open(data.join("relay.db"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM v1_audit", [], |r| r.get(0))
            .unwrap();
        assert!(kept > 2);
        assert_eq!(report.round_one.map(|c| c.records), Some(kept as u64));
    }

    #[test]
    fn a_doctored_round_one_record_is_named() {
        let third = "(SELECT audit_id FROM v1_audit ORDER BY audit_id LIMIT 1 OFFSET 2)";
        for sql in [
            format!("UPDATE v1_audit SET before_json = '{{}}' WHERE audit_id = {third}"),
            format!("UPDATE v1_audit SET prev_hash = hash WHERE audit_id = {third}"),
        ] {
            let (_dir, data) = migrated_round_one_store(&sql);
            let report = verify_dir(&data);
            assert!(!report.ok(), "{sql}: {report:?}");
            let chain = report.round_one.expect("the round-1 chain");
            assert_eq!(chain.records, 3, "{sql}: broken at its third record");
            assert!(chain.first_bad.is_some());
        }
    }

    fn chain(space: u8, bad: bool) -> SpaceChain {
        SpaceChain {
            space_id: Uuid::from_bytes([space; 16]),
            records: 3,
            first_bad: bad.then(|| BadRecord {
                audit_id: 2,
                mutation_id: "m".into(),
                reason: "hash mismatch".into(),
            }),
        }
    }

    #[test]
    fn one_broken_chain_anywhere_fails_the_report_and_is_named() {
        let sound = VerifyReport {
            records: 6,
            spaces: vec![chain(1, false), chain(2, false)],
            round_one: None,
        };
        assert!(sound.ok() && sound.bad().is_empty());
        let broken_space = VerifyReport {
            spaces: vec![chain(1, false), chain(2, true)],
            ..sound.clone()
        };
        assert!(!broken_space.ok());
        assert_eq!(broken_space.bad()[0].0, Uuid::from_bytes([2; 16]));
        let broken_round_one = VerifyReport {
            round_one: Some(chain(0, true)),
            ..sound
        };
        assert!(!broken_round_one.ok());
        assert_eq!(broken_round_one.bad().len(), 1);
    }
}
