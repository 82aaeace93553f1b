//! `fieldsync-relay`: run the relay server, or administer its data directory.

mod admin_cmd;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fieldsync_relay::core::RelayConfig;
use fieldsync_relay::server::{ServeOptions, Server};
use fieldsync_schema::{Schema, ids};
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
    /// Serve devices over WebSocket (`/v1/sync`), with `/healthz` and `/v1/status`.
    Serve {
        /// Data directory; created with its database on first start.
        #[arg(long)]
        data: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Entity schema (TOML); the built-in default schema when absent.
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Administer a data directory (works while the relay runs).
    Admin(admin_cmd::AdminArgs),
}

fn os_rng() -> anyhow::Result<ChaCha20Rng> {
    ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng).context("the operating system's random number generator failed")
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { data, listen, schema } => serve(data, listen, schema),
        Command::Admin(args) => admin_cmd::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(data: PathBuf, listen: SocketAddr, schema: Option<PathBuf>) -> anyhow::Result<()> {
    let schema = Arc::new(Schema::load(schema.as_deref())?);
    let mut rng = os_rng()?;
    let new_relay_id = ids::new_uuid(&mut rng);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let opts = ServeOptions {
            data_dir: data.clone(),
            listen,
            schema: schema.clone(),
            config: RelayConfig::default(),
        };
        let server = Server::bind(opts, Box::new(rng), new_relay_id).await?;
        eprintln!(
            "fieldsync relay {} listening on ws://{}/v1/sync (data: {}, schema {})",
            server.relay_id(),
            server.local_addr(),
            data.display(),
            &schema.hash().to_hex()[..12]
        );
        server.run(shutdown_signal()).await?;
        Ok(())
    })
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
