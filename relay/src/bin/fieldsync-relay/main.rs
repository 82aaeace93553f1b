//! `fieldsync-relay`: run the relay server, administer its data directory, back it up and
//! prove the backups restore.

mod admin_cmd;
mod admin_report;
mod backup_cmd;
mod serve_cmd;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fieldsync_relay::config::LogFormat;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[derive(Parser)]
#[command(
    name = "fieldsync-relay",
    version,
    about = "The fieldsync relay: the authoritative copy of every record"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve devices over WebSocket (`/v1/sync`), with `/healthz`, `/metrics` and `/v1/status`.
    Serve(serve_cmd::ServeArgs),
    /// Administer a data directory (works while the relay runs).
    Admin(admin_cmd::AdminArgs),
    /// Copy the relay database to a file with SQLite's online backup (works while it serves).
    Backup(backup_cmd::BackupArgs),
    /// Restore a backup into a scratch directory and verify it; non-zero exit on failure.
    RestoreDrill(backup_cmd::DrillArgs),
    /// Make a verified backup the database of a data directory (stop the relay first).
    Restore(backup_cmd::RestoreArgs),
}

fn os_rng() -> anyhow::Result<ChaCha20Rng> {
    ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng).context("the operating system's random number generator failed")
}

/// Logs go to stderr; `RUST_LOG` wins over `filter`, which defaults to `info`.
fn init_logging(format: LogFormat, filter: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .ok()
        .or_else(|| filter.and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok()))
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        // One JSON object per line, with the fields of every enclosing span (`spans`).
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve_cmd::run(args),
        Command::Admin(args) => {
            init_logging(LogFormat::Text, Some("warn"));
            admin_cmd::run(args)
        }
        Command::Backup(args) => {
            init_logging(LogFormat::Text, Some("warn"));
            backup_cmd::backup(args)
        }
        Command::RestoreDrill(args) => {
            init_logging(LogFormat::Text, Some("warn"));
            backup_cmd::drill(args)
        }
        Command::Restore(args) => {
            init_logging(LogFormat::Text, Some("warn"));
            backup_cmd::restore(args)
        }
    };
    match result {
        Ok(code) => code,
        // The reader (`| head -1`) had what it wanted.
        Err(e) if fieldsync_schema::cli::is_closed_pipe(e.as_ref()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
