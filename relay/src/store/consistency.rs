//! The cross-table checks every relay store must pass (SPEC §10, §11 invariants 4, 10): what a
//! restore drill and `fieldsync-relay verify` count, the same queries on SQLite and PostgreSQL.

use serde::Serialize;

use super::StoreResult;

/// Cross-table checks that must hold in every relay database (SPEC §10, §11 invariants 4, 10).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Consistency {
    /// Feed rows (applied mutations) without an audit record with the same seq and mutation.
    pub feed_without_audit: u64,
    /// Audit records that name no feed row.
    pub audit_without_feed: u64,
    /// Applied mutations without a receipt (a retry would be applied twice).
    pub feed_without_receipt: u64,
    /// Sum of document versions minus feed rows: each applied mutation adds exactly one of each.
    pub version_drift: i64,
    /// Spaces whose feed is not 1, 2, ..., n, or whose head disagrees with it.
    pub broken_sequences: u64,
    /// Spaces whose data sits in a shard the directory does not assign them to (their data
    /// would be invisible to the relay).
    pub misplaced_spaces: u64,
}

impl std::ops::AddAssign for Consistency {
    fn add_assign(&mut self, o: Consistency) {
        self.feed_without_audit += o.feed_without_audit;
        self.audit_without_feed += o.audit_without_feed;
        self.feed_without_receipt += o.feed_without_receipt;
        self.version_drift += o.version_drift;
        self.broken_sequences += o.broken_sequences;
        self.misplaced_spaces += o.misplaced_spaces;
    }
}

impl Consistency {
    /// The checks every store answers with the same queries ([`checks`]), each counted by
    /// `count`; `misplaced_spaces` is the store's own to fill in.
    pub(crate) fn counted(mut count: impl FnMut(&str) -> StoreResult<i64>) -> StoreResult<Consistency> {
        let version_drift = count(checks::VERSION_SUM)? - count(checks::FEED_ROWS)?;
        let mut n = |sql: &str| count(sql).map(|v| v.max(0) as u64);
        Ok(Consistency {
            feed_without_audit: n(checks::FEED_WITHOUT_AUDIT)?,
            audit_without_feed: n(checks::AUDIT_WITHOUT_FEED)?,
            feed_without_receipt: n(checks::FEED_WITHOUT_RECEIPT)?,
            version_drift,
            broken_sequences: n(checks::BROKEN_SEQUENCES)?,
            misplaced_spaces: 0,
        })
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.feed_without_audit > 0 {
            p.push(format!(
                "{} applied mutation(s) without an audit record",
                self.feed_without_audit
            ));
        }
        if self.audit_without_feed > 0 {
            p.push(format!(
                "{} audit record(s) without their feed row",
                self.audit_without_feed
            ));
        }
        if self.feed_without_receipt > 0 {
            p.push(format!(
                "{} applied mutation(s) without a receipt",
                self.feed_without_receipt
            ));
        }
        if self.version_drift != 0 {
            p.push(format!(
                "document versions and feed rows disagree by {}",
                self.version_drift
            ));
        }
        if self.broken_sequences > 0 {
            p.push(format!(
                "{} space feed(s) not numbered 1, 2, ... up to their head",
                self.broken_sequences
            ));
        }
        if self.misplaced_spaces > 0 {
            p.push(format!(
                "{} space(s) hold data in a shard the directory does not assign them to",
                self.misplaced_spaces
            ));
        }
        p
    }
}

/// The checks' queries, one count each, in SQL both stores speak.
pub(crate) mod checks {
    /// Feed rows without the audit record of the same space, seq and mutation.
    pub const FEED_WITHOUT_AUDIT: &str = "SELECT COUNT(*) FROM feed f LEFT JOIN audit a
         ON a.space_id = f.space_id AND a.seq = f.seq AND a.mutation_id = f.mutation_id
         WHERE a.audit_id IS NULL";
    /// Audit records whose feed row is missing.
    pub const AUDIT_WITHOUT_FEED: &str = "SELECT COUNT(*) FROM audit a LEFT JOIN feed f
         ON f.space_id = a.space_id AND f.seq = a.seq WHERE f.seq IS NULL";
    /// Applied mutations without a receipt.
    pub const FEED_WITHOUT_RECEIPT: &str = "SELECT COUNT(*) FROM feed f LEFT JOIN receipts r
         ON r.mutation_id = f.mutation_id WHERE r.mutation_id IS NULL";
    /// The sum of every document's version (a whole number in both stores).
    pub const VERSION_SUM: &str = "SELECT CAST(COALESCE(SUM(version), 0) AS BIGINT) FROM documents";
    pub const FEED_ROWS: &str = "SELECT COUNT(*) FROM feed";
    /// Spaces whose feed is not 1, 2, ..., n, or whose head disagrees with it.
    pub const BROKEN_SEQUENCES: &str = "SELECT COUNT(*) FROM (SELECT f.space_id, COUNT(*) AS n, MAX(f.seq) AS top
         FROM feed f GROUP BY f.space_id) s LEFT JOIN space_heads h ON h.space_id = s.space_id
         WHERE s.n != s.top OR h.seq IS NULL OR h.seq != s.top";
}
