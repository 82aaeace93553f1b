//! The relay's network shell: HTTP and WebSocket on one port, around the sans-IO core.
//!
//! Layout of the running relay:
//! - one tokio task per WebSocket connection ([`connection`]) decodes frames and forwards
//!   messages; it never decides anything;
//! - one OS thread owns the [`RelayCore`] and its SQLite store ([`core_thread`]). It drains
//!   every message that arrived while it was busy and hands them to the core as one group, so
//!   one fsync covers many mutations (group commit) without any timer;
//! - the core thread also wakes when the core asks to (`RelayCore::next_wakeup`): every 250 ms
//!   while connections are open, to see revocations within a second (SPEC §4);
//! - with `--tls-cert/--tls-key` the same router runs behind rustls ([`tls`]);
//! - with `--backup-dir`, scheduled backups run on a blocking thread ([`scheduled`]).

mod connection;
mod core_thread;
mod http;
mod metrics;
mod notify;
mod outbound;
mod scheduled;
pub mod tls;
mod worker_thread;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use fieldsync_schema::Schema;
use fieldsync_schema::sqlite_key::DatabaseKey;
use rand_core::Rng;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::backup::LOCK_FILE;
use crate::config::{BackupSchedule, TlsFiles};
use crate::core::{Front, RelayConfig, RelayCore, SpaceWorker};
use crate::store::Backend;
use crate::store::postgres::{PgBackend, redact};
use crate::store::sqlite::SqliteBackend;
use metrics::Metrics;

pub use core_thread::StatusSnapshot;

/// Frames and messages above this size are refused by the WebSocket layer itself.
pub const MAX_FRAME_BYTES: usize = fieldsync_schema::wire::MAX_MESSAGE_BYTES;
/// Messages queued for one connection before it counts as a slow reader and is disconnected.
pub const SEND_QUEUE: usize = 256;
/// Estimated bytes queued for one connection before it counts as a slow reader: two full pull
/// pages and change. With the per-connection request limits
/// (`fieldsync_schema::wire::MAX_*_IN_FLIGHT`) this bounds what one connection makes the relay
/// hold (see ARCHITECTURE.md, "Trust boundaries").
pub const SEND_QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// Estimated bytes queued for all connections together. Over it, a live entry for a connection
/// holding more than its fair share (the budget divided among the connections, at least
/// [`OUTBOUND_FAIR_SHARE_MIN`]) cuts that connection as a slow reader; it reconnects and pulls.
pub const OUTBOUND_BUDGET_BYTES: usize = 256 * 1024 * 1024;
/// The least a connection may hold in live entries when the relay-wide budget is spent.
pub const OUTBOUND_FAIR_SHARE_MIN: usize = 256 * 1024;
/// Bytes of received messages waiting for the core, all connections together. When it is
/// spent, connection tasks stop reading their sockets (TCP pushes back) instead of the relay's
/// memory growing.
pub const INBOUND_BUDGET_BYTES: u32 = 256 * 1024 * 1024;
/// Messages queued from all connections to the core before connections stop reading.
pub const CORE_QUEUE: usize = 8192;
/// Most messages the core takes into one group commit.
pub const MAX_GROUP: usize = 4096;
/// Mutations handed to the apply workers and not yet decided before the front thread stops
/// taking new input. Without it the workers' queues, not the inbound budget, hold a flood: the
/// budget is returned when the front has routed a message, long before a busy worker applies
/// it. A few seconds of work at full speed (a smaller bound starved one worker thread while
/// the other held the backlog); past it, waiting messages stay in the bounded
/// core queue with their budget held, and connections stop reading (TCP pushes back).
pub const APPLY_BACKLOG: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    // The cause is the error's source: `{:#}` prints it once, after a colon.
    #[error("cannot open the relay store in {dir}")]
    Store {
        dir: String,
        source: crate::store::StoreError,
    },
    #[error(
        "the relay store in {dir} is damaged — {findings}. Nothing was served from it. Restore the newest verified \
         backup with `fieldsync-relay restore --from BACKUP_DIR --data {dir} --force` (the damaged files are moved \
         aside, not deleted; `fieldsync-relay restore-drill --from BACKUP_DIR` checks a backup first)"
    )]
    Damaged { dir: String, findings: String },
    #[error(
        "the schema v{version} breaks compatibility with schemas this relay served, which devices may still \
         hold — {changes}. Make the change compatible (`fieldsync-relay schema check OLD.toml NEW.toml` lists \
         every change), or start with --allow-breaking-schema to refuse the devices of those versions"
    )]
    BreakingSchema { version: u64, changes: String },
    #[error("cannot listen on {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the relay core stopped unexpectedly")]
    CoreStopped,
    #[error(
        "another relay is already serving {} (it holds {LOCK_FILE}); one relay per data directory — stop the \
         other one first (several relays need a shared PostgreSQL store)",
        .0.display()
    )]
    AlreadyServed(PathBuf),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(
        "scheduled backups copy a SQLite store's files; a PostgreSQL store is backed up by its operator          (pg_dump, base backups) and checked with `fieldsync-relay verify --store URL`"
    )]
    NoFileBackups,
}

pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub schema: Arc<Schema>,
    pub config: RelayConfig,
    /// Serve `wss://` / `https://` with this certificate and key.
    pub tls: Option<TlsFiles>,
    /// Take verified backups on a schedule, keeping the newest N.
    pub backup: Option<BackupSchedule>,
    /// Threads applying mutations (each takes a share of the shards; default: the cores).
    pub workers: usize,
    /// Shards of a store created now (an existing store keeps its own).
    pub shards: u32,
    /// Run SQLite's `quick_check` on every store file before serving (on by default; a store
    /// of many gigabytes may choose to skip it and rely on restore drills).
    pub check_at_start: bool,
    /// Serve a schema that breaks compatibility with one the relay served before: devices on
    /// the broken versions are then refused with their version named (`--allow-breaking-schema`).
    pub allow_breaking_schema: bool,
    /// Schema versions devices may run that this relay never served (`--accept-schema`): an
    /// app released while the relay ran an older version. Weighed like served ones.
    pub also_known_schemas: Vec<Schema>,
    /// The key a SQLite store's files are encrypted with at rest (`--db-key-file`); scheduled
    /// backups are encrypted with it too. `None`: plaintext files.
    pub db_key: Option<DatabaseKey>,
}

/// Which older schemas devices may connect with; refuses a breaking schema unless allowed,
/// and records the current one as served only when it will be.
fn accept_schemas<B: Backend>(
    backend: &B,
    opts: &ServeOptions,
    store: &str,
) -> Result<crate::schema_history::SchemaAcceptance, ServerError> {
    let (schema, allow_breaking) = (&opts.schema, opts.allow_breaking_schema);
    let also_known: Vec<&Schema> = opts.also_known_schemas.iter().collect();
    let store_error = |source| ServerError::Store {
        dir: store.to_string(),
        source,
    };
    use crate::schema_history::{Adoption, adopt};
    let mut directory = backend.open_directory().map_err(store_error)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    match adopt(&mut directory, schema, &also_known, allow_breaking, now_ms).map_err(store_error)? {
        Adoption::Refused(plan) => Err(ServerError::BreakingSchema {
            version: schema.version(),
            changes: plan.describe_breaking(),
        }),
        Adoption::Served(plan) => {
            if !plan.breaking.is_empty() {
                tracing::warn!(changes = %plan.describe_breaking(), "serving a breaking schema: devices on the broken versions are refused");
            }
            Ok(plan.acceptance)
        }
    }
}

impl ServeOptions {
    /// Plain WebSocket, no scheduled backups, default limits.
    pub fn new(data_dir: PathBuf, listen: SocketAddr, schema: Arc<Schema>) -> Self {
        ServeOptions {
            data_dir,
            listen,
            schema,
            config: RelayConfig::default(),
            tls: None,
            backup: None,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            shards: crate::store::sqlite::DEFAULT_SHARDS,
            check_at_start: true,
            allow_breaking_schema: false,
            also_known_schemas: Vec::new(),
            db_key: None,
        }
    }
}

/// Shared between the HTTP handlers, the connection tasks and the core thread.
#[derive(Clone)]
pub(crate) struct Shared {
    pub core_tx: mpsc::Sender<core_thread::CoreInput>,
    /// The inbound budget ([`INBOUND_BUDGET_BYTES`]), one permit per byte.
    pub inbound: Arc<tokio::sync::Semaphore>,
    pub status: Arc<Mutex<StatusSnapshot>>,
    pub metrics: Arc<Metrics>,
    pub next_conn: Arc<AtomicU64>,
}

impl Shared {
    pub fn new_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Refuses to serve a store with a damaged file, naming the file, what SQLite found, and the
/// restore command.
fn check_store(dir: &std::path::Path, key: Option<&DatabaseKey>) -> Result<(), ServerError> {
    let damaged = crate::store::sqlite::health::quick_check_keyed(dir, key).map_err(|source| ServerError::Store {
        dir: dir.display().to_string(),
        source,
    })?;
    if damaged.is_empty() {
        return Ok(());
    }
    let findings = damaged
        .iter()
        .map(|d| format!("{}: {}", d.file.display(), d.problem))
        .collect::<Vec<_>>()
        .join(" | ");
    Err(ServerError::Damaged {
        dir: dir.display().to_string(),
        findings,
    })
}

/// The exclusive lock on `DIR/relay.lock` a serving relay holds for its whole life. One relay
/// per SQLite directory: two would each keep their own order and their own live fan-out, and a
/// device watching one would never hear of the other's writes (its cursor then moves past
/// them). Admin commands and online backups take no lock and keep working beside it; `restore`
/// needs the lock and so is refused while a relay serves.
fn serve_lock(dir: &std::path::Path) -> Result<std::fs::File, ServerError> {
    let path = dir.join(LOCK_FILE);
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServerError::AlreadyServed(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(ServerError::Io(e)),
    }
}

/// The TLS settings (certificate read and checked) and the bound port: what can fail before
/// any store is touched.
async fn listen(opts: &ServeOptions) -> Result<(Option<Arc<rustls::ServerConfig>>, TcpListener), ServerError> {
    let tls = opts.tls.as_ref().map(tls::server_config).transpose()?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: opts.listen,
            source,
        })?;
    Ok((tls, listener))
}

/// A bound, not yet running relay. Binding first lets callers (tests, `serve`) learn the real
/// address when they asked for port 0. On SQLite ([`Server::bind`]) one relay owns its data
/// directory; on PostgreSQL ([`Server::bind_postgres`]) several relays share the database.
pub struct Server<B: Backend = SqliteBackend> {
    listener: TcpListener,
    addr: SocketAddr,
    front: Front<B::Directory, B::Shard>,
    workers: Vec<SpaceWorker<B::Shard>>,
    worker_threads: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
    backup: Option<BackupSchedule>,
    data_dir: PathBuf,
    /// The SQLite store's at-rest key, for scheduled backups.
    db_key: Option<DatabaseKey>,
    /// The exclusive lock on `DIR/relay.lock` for as long as a SQLite relay lives
    /// ([`serve_lock`]); none on PostgreSQL, whose relays share the store.
    _lock: Option<std::fs::File>,
    /// The PostgreSQL store to listen on for other relays' commits (`notify`).
    listen_to: Option<String>,
}

impl Server<PgBackend> {
    /// Binds the port, then opens (creating or migrating its tables if needed) the PostgreSQL
    /// store at `url`, which other relays of the cluster may be serving too. `opts.data_dir`
    /// holds nothing of the store here.
    pub async fn bind_postgres(
        opts: ServeOptions,
        url: &str,
        rng: Box<dyn Rng + Send>,
        new_relay_id: uuid::Uuid,
    ) -> Result<Self, ServerError> {
        if opts.backup.is_some() {
            return Err(ServerError::NoFileBackups);
        }
        let (tls, listener) = listen(&opts).await?;
        let addr = listener.local_addr()?;
        let store = redact(url);
        let store_error = |source| ServerError::Store {
            dir: store.clone(),
            source,
        };
        let url_for_listening = url.to_string();
        let url = url.to_string();
        let shards = opts.shards;
        // The client blocks; opening may wait on another relay creating the tables.
        let backend = tokio::task::spawn_blocking(move || PgBackend::open(&url, new_relay_id, shards))
            .await
            .map_err(|_| ServerError::CoreStopped)?
            .map_err(store_error)?;
        let (front, workers, worker_threads, data_dir) = tokio::task::spawn_blocking(move || {
            let store = redact(backend.url());
            let mut config = opts.config.clone();
            config.schemas = accept_schemas(&backend, &opts, &store)?;
            let (front, workers) = RelayCore::parts(&backend, opts.schema, config, rng)
                .map_err(|source| ServerError::Store { dir: store, source })?;
            Ok::<_, ServerError>((front, workers, opts.workers, opts.data_dir))
        })
        .await
        .map_err(|_| ServerError::CoreStopped)??;
        Ok(Server {
            listener,
            addr,
            front,
            workers,
            worker_threads,
            tls,
            backup: None,
            data_dir,
            db_key: None,
            _lock: None,
            listen_to: Some(url_for_listening),
        })
    }
}

impl Server<SqliteBackend> {
    /// Takes the data directory for this process, binds the port, then opens (creating if
    /// needed) the database — in that order, so a second relay on the same directory, or a
    /// port already in use, is refused before anything is created or opened.
    pub async fn bind(
        opts: ServeOptions,
        rng: Box<dyn Rng + Send>,
        new_relay_id: uuid::Uuid,
    ) -> Result<Self, ServerError> {
        // What can fail without touching the data directory fails first: a port in use or a
        // bad certificate leaves no new directory behind.
        let (tls, listener) = listen(&opts).await?;
        std::fs::create_dir_all(&opts.data_dir)?;
        let lock = serve_lock(&opts.data_dir)?;
        let addr = listener.local_addr()?;
        if let Some(b) = &opts.backup {
            std::fs::create_dir_all(&b.dir)?;
        }
        let store_error = |source| ServerError::Store {
            dir: opts.data_dir.display().to_string(),
            source,
        };
        if opts.check_at_start {
            check_store(&opts.data_dir, opts.db_key.as_ref())?;
        }
        let backend = SqliteBackend::open_keyed(&opts.data_dir, new_relay_id, opts.shards, opts.db_key.clone())
            .map_err(store_error)?;
        let schemas = accept_schemas(&backend, &opts, &opts.data_dir.display().to_string())?;
        let mut config = opts.config;
        config.schemas = schemas;
        let (front, workers) = RelayCore::parts(&backend, opts.schema, config, rng).map_err(store_error)?;
        Ok(Server {
            listener,
            addr,
            front,
            workers,
            worker_threads: opts.workers,
            tls,
            backup: opts.backup,
            data_dir: opts.data_dir.clone(),
            db_key: opts.db_key.clone(),
            _lock: Some(lock),
            listen_to: None,
        })
    }
}

impl<B: Backend> Server<B>
where
    B::Directory: Send + 'static,
    B::Shard: Send + 'static,
{
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `wss` behind TLS, else `ws`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "wss" } else { "ws" }
    }

    pub fn relay_id(&self) -> uuid::Uuid {
        self.front.relay_id()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets the core finish the group it
    /// is committing, closes every connection with a reason, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServerError> {
        let (core_tx, core_rx) = mpsc::channel(CORE_QUEUE);
        let status = Arc::new(Mutex::new(StatusSnapshot::new(self.front.relay_id())));
        let metrics = Arc::new(Metrics::new());
        let _ = metrics
            .store
            .kind
            .set(if self.listen_to.is_some() { "postgres" } else { "sqlite" });
        let core_status = status.clone();
        let front = self.front;
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let pool = worker_thread::WorkerPool::start(self.workers, self.worker_threads, report_tx, metrics.clone())?;
        let core_thread = std::thread::Builder::new()
            .name("relay-front".into())
            .spawn(move || core_thread::run(front, pool, core_rx, report_rx, core_status))?;
        if let Some(schedule) = self.backup.clone() {
            tokio::spawn(scheduled::run(
                self.data_dir.clone(),
                schedule,
                self.db_key.clone(),
                metrics.clone(),
            ));
        }
        if let Some(url) = self.listen_to.clone() {
            let core = core_tx.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("relay-notifications".into())
                .spawn(move || notify::listen(url, core, &metrics))?;
        }

        let shared = Shared {
            core_tx: core_tx.clone(),
            inbound: Arc::new(tokio::sync::Semaphore::new(INBOUND_BUDGET_BYTES as usize)),
            status,
            metrics,
            next_conn: Arc::new(AtomicU64::new(1)),
        };
        let app = Router::new()
            .route("/v1/sync", get(connection::upgrade))
            .route("/healthz", get(http::healthz))
            .route("/metrics", get(http::metrics))
            .route("/v1/status", get(http::status))
            .with_state(shared);

        tracing::info!(addr = %self.addr, tls = self.tls.is_some(), "relay listening");
        let stop_tx = core_tx.clone();
        drop(core_tx);
        let graceful = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, closing open ones");
            let _ = stop_tx.send(core_thread::CoreInput::Shutdown).await;
        };
        match self.tls {
            Some(config) => {
                let listener = tls::TlsListener::new(self.listener, config)?;
                axum::serve(listener, app).with_graceful_shutdown(graceful).await?;
            }
            None => axum::serve(self.listener, app).with_graceful_shutdown(graceful).await?,
        }
        tokio::task::spawn_blocking(move || core_thread.join())
            .await
            .map_err(|_| ServerError::CoreStopped)?
            .map_err(|_| ServerError::CoreStopped)?;
        tracing::info!("relay stopped");
        Ok(())
    }
}
