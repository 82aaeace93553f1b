//! The hash-chained audit log: one record per applied mutation, written in the same
//! transaction as the change, each record's hash covering the previous record's hash.
//!
//! SQLite triggers refuse UPDATE and DELETE on audit rows; the chain catches what the triggers
//! cannot (someone editing the file after dropping them, or restoring a doctored backup).

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::store::{AuditRow, Store, StoreResult};

/// The hash a chain starts from.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 over the previous hash and every field of the record except its own hash and row id
/// (assigned by the database on insert; the links already fix the order), each length-prefixed
/// so that no two different records hash the same bytes.
pub fn record_hash(row: &AuditRow) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(b"fieldsync/audit/v1");
    field(row.prev_hash.as_bytes());
    field(&row.seq.to_be_bytes());
    field(row.mutation_id.as_bytes());
    field(row.actor_id.as_bytes());
    field(row.device_id.as_bytes());
    field(row.space_id.as_bytes());
    field(row.entity_type.as_bytes());
    field(row.entity_id.as_bytes());
    field(row.kind.as_bytes());
    field(&row.version.to_be_bytes());
    field(row.before_json.as_bytes());
    field(row.after_json.as_bytes());
    field(row.client_ts.as_bytes());
    field(&row.server_ts_ms.to_be_bytes());
    hex::encode(h.finalize())
}

/// The result of recomputing the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    /// The first record whose stored hash or link does not match, if any.
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
        self.first_bad.is_none()
    }
}

/// Recomputes every hash from the first record and names the first record that breaks.
pub fn verify(store: &dyn Store) -> StoreResult<VerifyReport> {
    let mut prev = GENESIS_HASH.to_string();
    let mut last_id = 0u64;
    let mut records = 0u64;
    loop {
        let page = store.audit_after(last_id, 1000)?;
        if page.is_empty() {
            return Ok(VerifyReport {
                records,
                first_bad: None,
            });
        }
        for row in page {
            records += 1;
            let bad = |reason: String| BadRecord {
                audit_id: row.audit_id,
                mutation_id: row.mutation_id.to_string(),
                reason,
            };
            if row.prev_hash != prev {
                return Ok(VerifyReport {
                    records,
                    first_bad: Some(bad(format!(
                        "link broken: prev_hash {} but the previous record hashes to {prev}",
                        row.prev_hash
                    ))),
                });
            }
            let expect = record_hash(&row);
            if row.hash != expect {
                return Ok(VerifyReport {
                    records,
                    first_bad: Some(bad(format!(
                        "content changed: stored hash {} but the record hashes to {expect}",
                        row.hash
                    ))),
                });
            }
            prev = row.hash;
            last_id = row.audit_id;
        }
    }
}
