//! `fieldsync-relay`: run the relay server, administer its data directory, back it up and
//! prove the backups restore.

mod admin_cmd;
mod admin_report;
mod backup_cmd;
mod serve_cmd;
mod verify_cmd;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fieldsync_relay::config::LogFormat;
use fieldsync_schema::sqlite_key::DatabaseKey;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[derive(Parser)]
#[command(
    name = "fieldsync-relay",
    version,
    about = "The fieldsync relay: the authoritative copy of every record"
)]
struct Cli {
    /// The key a SQLite store's files are encrypted with at rest: a file holding 64 hex digits
    /// (`openssl rand -hex 32`); or set FIELDSYNC_RELAY_DB_KEY to the digits. A new store is
    /// created encrypted; an encrypted one opens only with it (serve, admin, backup, restore,
    /// verify). Backups are encrypted with the same key.
    #[arg(long, value_name = "FILE", global = true)]
    db_key_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The store's at-rest key for this run (read once, at start).
static DB_KEY: std::sync::OnceLock<Option<DatabaseKey>> = std::sync::OnceLock::new();

/// The at-rest key given on the command line or in the environment (`None`: plaintext files).
pub(crate) fn db_key() -> Option<&'static DatabaseKey> {
    DB_KEY.get().and_then(Option::as_ref)
}

fn read_db_key(file: Option<&std::path::Path>) -> anyhow::Result<Option<DatabaseKey>> {
    if let Some(file) = file {
        return Ok(Some(DatabaseKey::from_file(file)?));
    }
    match std::env::var("FIELDSYNC_RELAY_DB_KEY") {
        Ok(hex) if !hex.trim().is_empty() => Ok(Some(DatabaseKey::from_hex(&hex).context("FIELDSYNC_RELAY_DB_KEY")?)),
        _ => Ok(None),
    }
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
    /// The entity schema the relay serves.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Check a store (a restored PostgreSQL database, a copied data directory): audit chains,
    /// cross-table counts, receipts; non-zero exit when anything is wrong.
    Verify(verify_cmd::VerifyArgs),
}

#[derive(clap::Subcommand)]
enum SchemaCommand {
    /// Every entity type: policy, who may write it, and its fields (one type with TYPE).
    Show {
        entity_type: Option<String>,
        /// The schema file `serve --schema` is given (the built-in default when absent).
        #[arg(long, value_name = "FILE")]
        schema: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Lists every change from OLD to NEW with its verdict (compatible or breaking for devices
    /// still on OLD); exits 1 when any change is breaking, so a deploy pipeline can stop.
    Check {
        old: std::path::PathBuf,
        new: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The schema versions this relay has served, oldest first: which devices it still
    /// accepts (served) and which it refuses since a breaking schema was served on purpose
    /// (retired). Works while the relay runs.
    History {
        /// The relay's data directory.
        #[arg(long, value_name = "DIR", default_value = "./relay-data")]
        data: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
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
    // Every `--json` of the relay's commands is a switch asking for JSON output.
    let json_output = std::env::args().any(|a| a == "--json");
    let result = read_db_key(cli.db_key_file.as_deref()).and_then(|key| {
        let _ = DB_KEY.set(key);
        run(cli.command)
    });
    match result {
        Ok(code) => code,
        // The reader (`| head -1`) had what it wanted.
        Err(e) if fieldsync_schema::cli::is_closed_pipe(e.as_ref()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            fieldsync_schema::cli::report_error(&format!("{e:#}"), error_kind(&e), json_output);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one command (after the at-rest key was read).
fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Serve(args) => serve_cmd::run(args),
        Command::Verify(args) => {
            init_logging(LogFormat::Text, Some("warn"));
            verify_cmd::run(args)
        }
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
        Command::Schema(SchemaCommand::Show {
            entity_type,
            schema,
            json,
        }) => show_schema(entity_type.as_deref(), schema.as_deref(), json),
        Command::Schema(SchemaCommand::Check { old, new, json }) => check_schema(&old, &new, json),
        Command::Schema(SchemaCommand::History { data, json }) => schema_history(&data, json),
    }
}

fn show_schema(
    only: Option<&str>,
    file: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let schema = fieldsync_schema::Schema::load(file)?;
    let listing = fieldsync_schema::cli::schema_listing(&schema, only, json).map_err(anyhow::Error::msg)?;
    fieldsync_schema::outln!("{listing}")?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn check_schema(old: &std::path::Path, new: &std::path::Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let load = |p: &std::path::Path| fieldsync_schema::Schema::load(Some(p));
    let report = fieldsync_schema::compat::compare(&load(old)?, &load(new)?);
    if json {
        fieldsync_schema::outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        fieldsync_schema::outln!("{}", report.render().trim_end())?;
    }
    Ok(if report.is_compatible() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

fn schema_history(data: &std::path::Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    use fieldsync_relay::store::Directory;
    let (_backend, directory) = admin_cmd::open(data)?;
    let served = directory.served_schemas()?;
    let rows: Vec<serde_json::Value> = served
        .iter()
        .map(|s| {
            serde_json::json!({
                "version": s.version,
                "hash": s.hash,
                "first_served_ms": s.first_served_ms,
                "retired_ms": s.retired_ms,
            })
        })
        .collect();
    let lines: Vec<String> = served
        .iter()
        .map(|s| {
            let state = match s.retired_ms {
                Some(at) => format!(
                    "retired {} (its devices are refused)",
                    fieldsync_schema::time_fmt::render_ms(at)
                ),
                None => "served".to_string(),
            };
            format!(
                "v{:<4} {}  first served {}  {state}",
                s.version,
                &s.hash[..s.hash.len().min(16)],
                fieldsync_schema::time_fmt::render_ms(s.first_served_ms)
            )
        })
        .collect();
    let text = if lines.is_empty() {
        "no schema recorded yet (the relay records the schema it serves at each start)".to_string()
    } else {
        lines.join("\n")
    };
    admin_cmd::print(json, serde_json::Value::Array(rows), text)?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// The `kind` of a `--json` error: what a script can branch on.
fn error_kind(e: &anyhow::Error) -> &'static str {
    use fieldsync_relay::store::StoreError;
    for cause in e.chain() {
        if let Some(store) = cause.downcast_ref::<StoreError>() {
            return match store {
                StoreError::NotFound(_) => "not_found",
                StoreError::Conflict(_) => "conflict",
                StoreError::Corrupt(_) => "corrupt",
                StoreError::StorageFull(_) => "storage_full",
                StoreError::Key(_) => "key",
                StoreError::Sqlite(_) | StoreError::Postgres(_) | StoreError::Io(_) => "storage",
            };
        }
        if cause.downcast_ref::<fieldsync_relay::server::ServerError>().is_some() {
            return "server";
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return "io";
        }
    }
    "error"
}
