//! `fieldsync-relay serve`: flags, the config file, logging, and the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use fieldsync_relay::config::{ConfigFile, LogFormat};
use fieldsync_relay::server::{ServeOptions, Server};
use fieldsync_relay::store::Backend;
use fieldsync_schema::{Schema, ids};

#[derive(Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory; created with its database on first start.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// A PostgreSQL store shared by several relays (`postgres://USER@HOST:PORT/DB`) instead of
    /// the SQLite one in --data; its tables are created on first start.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Entity schema (TOML); the built-in default schema when absent.
    #[arg(long, value_name = "FILE")]
    schema: Option<PathBuf>,
    /// PEM certificate chain: serve wss:// and https:// (needs --tls-key).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Take a verified backup into this directory at start and every --backup-every.
    #[arg(long, value_name = "DIR")]
    backup_dir: Option<PathBuf>,
    /// Interval between scheduled backups, e.g. 24h, 6h, 30m [default: 24h].
    #[arg(long, value_name = "DURATION")]
    backup_every: Option<String>,
    /// Scheduled backups to keep; older ones are deleted [default: 14].
    #[arg(long, value_name = "N")]
    backup_keep: Option<usize>,
    /// Log format on stderr: text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Log filter (tracing EnvFilter syntax, e.g. `info,fieldsync_relay=debug`); RUST_LOG wins.
    #[arg(long, value_name = "FILTER")]
    log_filter: Option<String>,
    /// Threads applying mutations; each takes a share of the shards [default: the cores].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Shard files of a data directory created now (fixed for its life) [default: 4].
    #[arg(long, value_name = "N")]
    shards: Option<u32>,
    /// Documents kept parsed in memory, shared between the shards [default: 4096].
    #[arg(long, value_name = "N")]
    doc_cache: Option<usize>,
    /// Skip SQLite's quick_check of every store file at start (for stores so large the check
    /// would delay the start; restore drills still verify backups).
    #[arg(long)]
    skip_start_check: bool,
    /// Serve a schema that breaks compatibility with one served before (see `schema check`):
    /// devices still on the broken versions are refused, told to update the app.
    #[arg(long)]
    allow_breaking_schema: bool,
    /// A schema file of a version devices may still run that this relay never served (an app
    /// released while the relay ran an older version, then the relay upgraded past it);
    /// repeatable. Weighed like the versions it served.
    #[arg(long, value_name = "FILE")]
    accept_schema: Vec<std::path::PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.clone();
    if let Some(url) = &store
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        anyhow::bail!("--store takes a PostgreSQL URL (postgres://USER@HOST:PORT/DB), not `{url}`");
    }
    let skip_start_check = args.skip_start_check;
    let allow_breaking_schema = args.allow_breaking_schema;
    let also_known_schemas = args
        .accept_schema
        .iter()
        .map(|p| Schema::load(Some(p)).with_context(|| format!("--accept-schema {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    // A relay on PostgreSQL keeps nothing in a data directory: none is asked for.
    let data = match (&store, args.data) {
        (Some(_), None) => Some(PathBuf::from(".")),
        (_, data) => data,
    };
    let flags = ConfigFile {
        data,
        listen: args.listen,
        schema: args.schema,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        backup_dir: args.backup_dir,
        backup_every: args.backup_every,
        backup_keep: args.backup_keep,
        log_format: args.log_format,
        log_filter: args.log_filter,
        workers: args.workers,
        shards: args.shards,
        doc_cache: args.doc_cache,
    };
    let config = file.overridden_by(flags).resolve()?;
    crate::init_logging(config.log_format, config.log_filter.as_deref());

    let schema = Arc::new(Schema::load(config.schema.as_deref())?);
    let mut rng = crate::os_rng()?;
    let new_relay_id = ids::new_uuid(&mut rng);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut opts = ServeOptions::new(config.data.clone(), config.listen, schema.clone());
        opts.tls = config.tls.clone();
        opts.backup = config.backup.clone();
        opts.workers = config.workers;
        opts.shards = config.shards;
        opts.config.doc_cache_capacity = config.doc_cache;
        opts.check_at_start = !skip_start_check;
        opts.allow_breaking_schema = allow_breaking_schema;
        opts.also_known_schemas = also_known_schemas;
        opts.db_key = crate::db_key().cloned();
        let backups = match &config.backup {
            Some(b) => format!(
                ", backups every {} to {} keeping {}",
                humantime::format_duration(b.every),
                b.dir.display(),
                b.keep
            ),
            None => String::new(),
        };
        let version = format!("schema v{} {}", schema.version(), &schema.hash().to_hex()[..12]);
        match store {
            Some(url) => {
                let server = Server::bind_postgres(opts, &url, Box::new(rng), new_relay_id).await?;
                let store = fieldsync_relay::store::postgres::redact(&url);
                serve(server, &format!("store: {store}, {version}")).await
            }
            None => {
                let server = Server::bind(opts, Box::new(rng), new_relay_id).await?;
                serve(server, &format!("data: {}, {version}{backups}", config.data.display())).await
            }
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Announces the bound relay (the line tests and operators wait for) and serves until a signal.
async fn serve<B: Backend>(server: Server<B>, details: &str) -> anyhow::Result<()>
where
    B::Directory: Send + 'static,
    B::Shard: Send + 'static,
{
    eprintln!(
        "fieldsync relay {} listening on {}://{}/v1/sync ({details})",
        server.relay_id(),
        server.scheme(),
        server.local_addr(),
    );
    server.run(shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
