//! `backup`, `restore-drill` and `restore`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use fieldsync_relay::backup;
use fieldsync_schema::outln;
use fieldsync_schema::{SystemTimeSource, TimeSource};
use serde_json::json;

#[derive(Args)]
pub struct BackupArgs {
    /// The relay's data directory.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The backup directory to write (it gets `relay.db` and `shards/`).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Replace DIR if it exists.
    #[arg(long)]
    force: bool,
    /// Also run a restore drill on the new backup (non-zero exit if it fails).
    #[arg(long)]
    verify: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DrillArgs {
    /// The backup to check: a backup directory, or a round-1 backup file (never modified).
    #[arg(long, value_name = "PATH")]
    from: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The backup to restore: a backup directory, or a round-1 backup file.
    #[arg(long, value_name = "PATH")]
    from: PathBuf,
    /// The data directory that gets the restored store.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Replace an existing database (it is moved aside, not deleted).
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

pub fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let key = crate::db_key();
    let info = backup::backup_store_keyed(&args.data, &args.to, args.force, key)?;
    let drill = args.verify.then(|| backup::restore_drill_keyed(&args.to, key));
    if args.json {
        outln!("{}", json!({ "backup": info, "drill": drill }))?;
    } else {
        outln!(
            "backup written: {} ({} bytes in {} files, {} ms)",
            info.file.display(),
            info.bytes,
            info.files,
            info.duration_ms
        )?;
        if let Some(d) = &drill {
            outln!("{}", d.verdict())?;
        }
    }
    Ok(match drill {
        Some(d) if !d.ok => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

pub fn drill(args: DrillArgs) -> anyhow::Result<ExitCode> {
    let report = backup::restore_drill_keyed(&args.from, crate::db_key());
    if args.json {
        outln!("{}", json!({ "verdict": report.verdict(), "report": report }))?;
    } else {
        outln!("{}", report.verdict())?;
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let report = backup::restore_keyed(
        &args.from,
        &args.data,
        args.force,
        SystemTimeSource.now_ms(),
        crate::db_key(),
    )?;
    if args.json {
        outln!("{}", json!(report))?;
    } else {
        outln!("{}", report.drill.verdict())?;
        for old in &report.replaced {
            outln!("the previous store's {} was kept", old.display())?;
        }
        outln!(
            "restored {} into {}; start the relay with `fieldsync-relay serve --data {}`",
            args.from.display(),
            report.database.display(),
            args.data.display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
