//! `fieldsync-relay verify --store URL` (or `--data DIR`): the drill for a store restored from
//! the operator's backups (pg_dump, base backups) or copied by hand — every space's audit chain
//! recomputed, the cross-table checks (applied mutations with their audit record and receipt,
//! dense feeds agreeing with their heads, document versions with their feed rows), and what it
//! holds. Read-only; exits non-zero when anything is wrong.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use fieldsync_relay::audit;
use fieldsync_relay::store::consistency::Consistency;
use fieldsync_relay::store::{Backend, Counts};
use serde_json::json;

use crate::admin_cmd::{open, open_postgres, print};

#[derive(Args)]
pub struct VerifyArgs {
    /// A PostgreSQL store (`postgres://USER@HOST:PORT/DB`).
    #[arg(long, value_name = "URL", required_unless_present = "data", conflicts_with = "data")]
    store: Option<String>,
    /// A SQLite store's data directory.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    match (&args.store, &args.data) {
        (Some(url), _) => {
            let (backend, _) = open_postgres(url)?;
            let consistency = backend.consistency()?;
            report(&backend, consistency, args.json)
        }
        (None, Some(data)) => {
            let (backend, _) = open(data)?;
            let consistency = backend.consistency()?;
            report(&backend, consistency, args.json)
        }
        (None, None) => anyhow::bail!("say which store: --store postgres://... or --data DIR"),
    }
}

fn report<B: Backend>(backend: &B, consistency: Consistency, json: bool) -> anyhow::Result<ExitCode> {
    let chains = audit::verify(backend)?;
    let counts = Counts::of_store(backend)?;
    let mut problems = consistency.problems();
    for (space, bad) in chains.bad() {
        problems.push(format!(
            "audit chain of space {space} broken at record {} (mutation {}): {}",
            bad.audit_id, bad.mutation_id, bad.reason
        ));
    }
    let text = if problems.is_empty() {
        format!(
            "store OK: {} audit records verified in {} spaces; {} applied mutations, {} receipts, {} documents; \
             every applied mutation has its audit record and receipt, every feed is dense",
            chains.records,
            chains.spaces.len(),
            counts.feed,
            counts.receipts,
            counts.documents
        )
    } else {
        format!("store DAMAGED:\n- {}", problems.join("\n- "))
    };
    print(
        json,
        json!({"ok": problems.is_empty(), "problems": problems, "audit": chains, "consistency": consistency, "counts": counts}),
        text,
    )?;
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
