//! Read-only admin reports: `audit verify`, `audit export`, `conflicts`, `stats`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use fieldsync_relay::audit;
use fieldsync_relay::store::Store;
use fieldsync_relay::store::sqlite::{DB_FILE, SqliteStore};
use fieldsync_schema::time_fmt::{parse_date, parse_ms, render_ms};
use serde_json::json;
use uuid::Uuid;

use crate::admin_cmd::print;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain; names the first bad record and exits non-zero if broken.
    Verify,
    /// Print audit records as JSON lines (one object per line, chain order).
    Export {
        /// Only records after this feed sequence number, or at/after this time
        /// (RFC 3339 like 2026-11-22T09:30:00Z, or a date like 2026-11-22, UTC).
        #[arg(long, value_name = "SEQ_OR_TIME")]
        since: Option<String>,
    },
}

#[derive(Args)]
pub struct ConflictArgs {
    /// Only losers of this entity.
    #[arg(long)]
    entity: Option<Uuid>,
    /// Only this kind: `lww` or `resolution`.
    #[arg(long)]
    kind: Option<String>,
    /// At most this many rows (newest first).
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

/// `--since`: a number is a feed sequence number (exclusive), anything else a time (inclusive).
fn parse_since(s: &str) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let s = s.trim();
    if let Ok(seq) = s.parse::<u64>() {
        return Ok((Some(seq), None));
    }
    if let Some(ms) = parse_ms(s) {
        return Ok((None, Some(ms)));
    }
    if let Some(date) = parse_date(s) {
        let ms = date.midnight().assume_utc().unix_timestamp().max(0) as u64 * 1000;
        return Ok((None, Some(ms)));
    }
    bail!("--since `{s}` is neither a sequence number nor a time like 2026-11-22T09:30:00Z or 2026-11-22")
}

pub fn audit(store: &SqliteStore, cmd: AuditCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify => {
            let report = audit::verify(store)?;
            let text = match &report.first_bad {
                None => format!("audit chain OK: {} records verified", report.records),
                Some(bad) => format!(
                    "audit chain BROKEN at record {} (mutation {}): {}",
                    bad.audit_id, bad.mutation_id, bad.reason
                ),
            };
            print(json, json!(report), text)?;
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Export { since } => {
            let (after_seq, since_ms) = match since.as_deref() {
                Some(s) => parse_since(s)?,
                None => (None, None),
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut after_id = 0;
            let mut n = 0u64;
            loop {
                let page = store.audit_page(after_id, after_seq, since_ms, 1000)?;
                let Some(last) = page.last() else { break };
                after_id = last.audit_id;
                for row in &page {
                    let mut value = serde_json::to_value(row)?;
                    if let Some(obj) = value.as_object_mut() {
                        obj.insert("server_ts".into(), json!(render_ms(row.server_ts_ms)));
                    }
                    writeln!(out, "{value}")?;
                    n += 1;
                }
            }
            out.flush()?;
            eprintln!("exported {n} audit records");
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn conflicts(store: &SqliteStore, args: ConflictArgs, json: bool) -> anyhow::Result<()> {
    let rows = store.archive_query(args.entity, args.kind.as_deref(), args.limit)?;
    let lines: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "#{} {} {} {} {} v{} {}: lost {} (device {}, mutation {}) to {} (device {})",
                r.archive_id,
                r.kind,
                r.entity_type,
                r.entity_id,
                r.field.as_deref().unwrap_or("-"),
                r.version,
                render_ms(r.created_ms),
                r.losing_json,
                r.loser_device.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
                r.loser_mutation.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
                r.winning_json,
                r.winner_device.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
            )
        })
        .collect();
    let text = if lines.is_empty() {
        "the conflict archive is empty".to_string()
    } else {
        lines.join("\n")
    };
    print(json, json!(rows), text)?;
    Ok(())
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

pub fn stats(store: &SqliteStore, data: &Path, json: bool) -> anyhow::Result<()> {
    let c = store.counts()?;
    let db_bytes = file_size(&data.join(DB_FILE));
    let wal_bytes = file_size(&data.join(format!("{DB_FILE}-wal")));
    let text = format!(
        "relay {}\nspaces {}  users {}  devices {}\ndocuments {}  applied mutations {}  receipts {}\n\
         audit records {}  archived losers {}\ndatabase {} bytes (+ {} bytes WAL)",
        store.relay_id(),
        c.spaces,
        c.users,
        c.devices,
        c.documents,
        c.feed,
        c.receipts,
        c.audit,
        c.archive,
        db_bytes,
        wal_bytes
    );
    print(
        json,
        json!({
            "relay_id": store.relay_id(),
            "counts": c,
            "database_bytes": db_bytes,
            "wal_bytes": wal_bytes,
        }),
        text,
    )?;
    Ok(())
}
