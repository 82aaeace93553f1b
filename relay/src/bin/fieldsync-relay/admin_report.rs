//! Read-only admin reports: `audit verify`, `audit export`, `conflicts`, `stats`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use fieldsync_relay::audit;
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_relay::store::{Backend, Counts, Directory, SpaceRow};
use fieldsync_schema::time_fmt::{parse_date, parse_ms, render_ms};
use serde_json::json;
use uuid::Uuid;

use crate::admin_cmd::print;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute every space's hash chain; names the first bad record of each broken chain and
    /// exits non-zero if any is broken.
    Verify,
    /// Print audit records as JSON lines (one object per line): space by space, each in chain
    /// order.
    Export {
        /// Only this space's records.
        #[arg(long)]
        space: Option<String>,
        /// Only records after this feed sequence number of the space (needs --space: each
        /// space numbers its own feed), or at/after this time (RFC 3339 like
        /// 2026-11-22T09:30:00Z, or a date like 2026-11-22, UTC).
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

/// The spaces by id, for naming them in reports.
fn space_names<B: Backend>(backend: &B) -> anyhow::Result<BTreeMap<Uuid, SpaceRow>> {
    Ok(backend
        .open_directory()?
        .spaces()?
        .into_iter()
        .map(|s| (s.space_id, s))
        .collect())
}

/// `audit verify` on any store: every space's chain recomputed.
pub fn audit_verify<B: Backend>(backend: &B, json: bool) -> anyhow::Result<ExitCode> {
    let report = audit::verify(backend)?;
    let names = space_names(backend)?;
    let mut lines = Vec::new();
    if report.ok() {
        lines.push(format!(
            "audit chains OK: {} records verified in {} spaces",
            report.records,
            report.spaces.len()
        ));
    }
    for (space, bad) in report.bad() {
        let name = names.get(&space).map_or("round-1 global chain", |s| s.name.as_str());
        lines.push(format!(
            "audit chain BROKEN in {name} ({space}) at record {} (mutation {}): {}",
            bad.audit_id, bad.mutation_id, bad.reason
        ));
    }
    if let Some(old) = report.round_one.as_ref().filter(|c| c.first_bad.is_none()) {
        lines.push(format!(
            "round-1 global chain kept from before the migration: {} records verified",
            old.records
        ));
    }
    print(json, json!(report), lines.join("\n"))?;
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `audit export` (a SQLite store's operator query pages through its files).
pub fn audit_export(backend: &SqliteBackend, space: Option<String>, since: Option<String>) -> anyhow::Result<()> {
    let (after_seq, since_ms) = match since.as_deref() {
        Some(s) => parse_since(s)?,
        None => (None, None),
    };
    let spaces: Vec<SpaceRow> = match &space {
        Some(name) => match backend.open_directory()?.space_by_name(name)? {
            Some(s) => vec![s],
            None => bail!("no space named `{name}` (see `admin space list`)"),
        },
        None => space_names(backend)?.into_values().collect(),
    };
    if after_seq.is_some() && space.is_none() {
        bail!("--since with a sequence number needs --space: every space numbers its own feed");
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut n = 0u64;
    for s in spaces {
        let shard = backend.open_shard(s.shard)?;
        let mut after_id = 0;
        loop {
            let page = shard.audit_page(after_id, Some(s.space_id), after_seq, since_ms, 1000)?;
            let Some(last) = page.last() else { break };
            after_id = last.audit_id;
            for row in &page {
                let mut value = serde_json::to_value(row)?;
                if let Some(obj) = value.as_object_mut() {
                    obj.insert("server_ts".into(), json!(render_ms(row.server_ts_ms)));
                    obj.insert("space".into(), json!(s.name));
                }
                writeln!(out, "{value}")?;
                n += 1;
            }
        }
    }
    out.flush()?;
    eprintln!("exported {n} audit records");
    Ok(())
}

pub fn conflicts(backend: &SqliteBackend, args: ConflictArgs, json: bool) -> anyhow::Result<()> {
    // Each shard's newest `limit`, merged newest first.
    let mut rows = Vec::new();
    for n in 0..backend.shard_count() {
        rows.extend(
            backend
                .open_shard(n)?
                .archive_query(args.entity, args.kind.as_deref(), args.limit)?,
        );
    }
    rows.sort_by_key(|r| std::cmp::Reverse((r.created_ms, r.archive_id)));
    rows.truncate(args.limit);
    let names = Names::read(&backend.open_directory()?)?;
    let lines: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "#{} {} {} {} in {} {} v{} {}: lost {} ({}, mutation {}) to {} ({})",
                r.archive_id,
                r.kind,
                r.entity_type,
                r.entity_id,
                names.space(r.space_id),
                r.field.as_deref().unwrap_or("-"),
                r.version,
                render_ms(r.created_ms),
                r.losing_json,
                names.device(r.loser_device),
                r.loser_mutation.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
                r.winning_json,
                names.device(r.winner_device),
            )
        })
        .collect();
    let text = if lines.is_empty() {
        "the conflict archive is empty".to_string()
    } else {
        lines.join("\n")
    };
    let with_names: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = json!(r);
            v["space"] = json!(names.space(r.space_id));
            v["loser"] = json!(names.device(r.loser_device));
            v["winner"] = json!(names.device(r.winner_device));
            v
        })
        .collect();
    print(json, json!(with_names), text)?;
    Ok(())
}

/// Names for the ids a report shows: spaces by name, devices by label and user.
struct Names {
    spaces: BTreeMap<Uuid, String>,
    devices: BTreeMap<Uuid, String>,
}

impl Names {
    fn read(directory: &impl Directory) -> anyhow::Result<Self> {
        let spaces = directory.spaces()?.into_iter().map(|s| (s.space_id, s.name)).collect();
        let users: BTreeMap<Uuid, String> = directory.users()?.into_iter().map(|u| (u.user_id, u.name)).collect();
        let devices = directory
            .devices()?
            .into_iter()
            .map(|d| {
                let user = users.get(&d.user_id).cloned().unwrap_or_else(|| d.user_id.to_string());
                let short = d.device_id.simple().to_string();
                let name = match d.label {
                    Some(label) => format!("{user}'s \"{label}\", device {}", &short[..8]),
                    None => format!("{user}'s device {}", &short[..8]),
                };
                (d.device_id, name)
            })
            .collect();
        Ok(Names { spaces, devices })
    }

    fn space(&self, id: Uuid) -> String {
        self.spaces.get(&id).cloned().unwrap_or_else(|| id.to_string())
    }

    fn device(&self, id: Option<Uuid>) -> String {
        match id {
            Some(d) => self.devices.get(&d).cloned().unwrap_or_else(|| format!("device {d}")),
            None => "-".into(),
        }
    }
}

fn file_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// `stats` on a store that is not files: what it holds, counted over every shard.
pub fn counts_only<B: Backend>(backend: &B, json: bool) -> anyhow::Result<()> {
    let c = Counts::of_store(backend)?;
    let relay_id = backend.open_directory()?.relay_id();
    print(
        json,
        json!({"relay_id": relay_id, "counts": c, "shards": backend.shard_count()}),
        counts_text(relay_id, &c),
    )?;
    Ok(())
}

/// What `stats` says of any store.
fn counts_text(relay_id: Uuid, c: &Counts) -> String {
    format!(
        "relay {relay_id}\nspaces {}  users {}  devices {}\ndocuments {}  applied mutations {}  receipts {}\n\
         audit records {}  archived losers {}",
        c.spaces, c.users, c.devices, c.documents, c.feed, c.receipts, c.audit, c.archive,
    )
}

pub fn stats(backend: &SqliteBackend, json: bool) -> anyhow::Result<()> {
    let c = backend.counts()?;
    let files = backend.files();
    let db_bytes: u64 = files.iter().map(|f| file_size(f)).sum();
    let wal_bytes: u64 = files
        .iter()
        .map(|f| file_size(&f.with_file_name(format!("{}-wal", f.file_name().unwrap_or_default().to_string_lossy()))))
        .sum();
    let text = format!(
        "{}\nstore {db_bytes} bytes in {} files (+ {wal_bytes} bytes WAL)",
        counts_text(backend.relay_id(), &c),
        files.len(),
    );
    print(
        json,
        json!({
            "relay_id": backend.relay_id(),
            "counts": c,
            "shards": backend.shard_count(),
            "database_bytes": db_bytes,
            "wal_bytes": wal_bytes,
        }),
        text,
    )?;
    Ok(())
}
