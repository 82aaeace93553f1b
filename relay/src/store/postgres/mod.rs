//! The PostgreSQL store (`--store postgres://USER@HOST/DB`): the directory and every space's
//! data in one database, which several relay processes share (SPEC §13).
//!
//! Same traits, same tables as the SQLite store, with what several writers need: the writing
//! transaction locks the space's head row (`SELECT ... FOR UPDATE`, the row created first for a
//! new space), so mutations of one space serialize across relays and its feed never commits a
//! sequence out of order; receipts are unique by mutation id whichever relay decided; access
//! changes move a database sequence every relay reads. Shards stay as the assignment of spaces
//! to apply workers; all of them are the one database.
//!
//! The client is `postgres` (the synchronous face of `tokio-postgres`, rust-postgres): the
//! store traits are synchronous, called from the relay's worker and front threads, never from
//! async code.

mod columns;
mod directory;
mod shard;
pub mod throwaway;

use std::cell::RefCell;
use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement};
use uuid::Uuid;

pub use directory::PgDirectory;
pub use shard::PgShard;

use super::consistency::Consistency;
use super::{Backend, StoreError, StoreResult};

const SCHEMA_SQL: &str = include_str!("schema.sql");
/// Notified with a space's id by every commit that advances the space (`server::notify`).
pub const COMMIT_CHANNEL: &str = "fieldsync_commit";
/// Notified by every membership change and revocation.
pub const ACCESS_CHANNEL: &str = "fieldsync_access";
/// The layout version this build creates and reads (`fs_meta.layout`).
pub const LAYOUT: u64 = 1;
/// An arbitrary key for the advisory lock that makes creating and migrating the tables one
/// relay's job at a time when several start together.
const MIGRATION_LOCK: i64 = 0x6669_656c_6473_796e;

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Postgres(e.to_string())
    }
}

/// Whether a failed statement broke a unique constraint (a second insert of one key).
pub(crate) fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// A relay store in one PostgreSQL database: creates and migrates its tables on open, and opens
/// one connection per handle (the front, each worker, the admin tools).
#[derive(Debug, Clone)]
pub struct PgBackend {
    url: String,
    relay_id: Uuid,
    shards: u32,
}

impl PgBackend {
    /// Connects to `url`, creates the tables if the database has none (with `new_relay_id` and
    /// `new_shards`; an existing store keeps its own), and checks the layout.
    pub fn open(url: &str, new_relay_id: Uuid, new_shards: u32) -> StoreResult<Self> {
        let mut client = connect(url)?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        // "already exists, skipping" on every start is no news for the operator's log.
        tx.batch_execute("SET LOCAL client_min_messages = warning")?;
        tx.batch_execute(SCHEMA_SQL)?;
        let layout = meta_u64(&mut tx, "layout")?;
        match layout {
            None => set_meta(&mut tx, "layout", &LAYOUT.to_be_bytes())?,
            Some(LAYOUT) => {}
            Some(other) => {
                return Err(StoreError::Corrupt(format!(
                    "the database holds layout {other}; this relay reads layout {LAYOUT}: use a relay of that version"
                )));
            }
        }
        tx.execute(
            "INSERT INTO fs_meta(key, value) VALUES ('relay_id', $1) ON CONFLICT (key) DO NOTHING",
            &[&new_relay_id.as_bytes().to_vec()],
        )?;
        tx.execute(
            "INSERT INTO fs_meta(key, value) VALUES ('shards', $1) ON CONFLICT (key) DO NOTHING",
            &[&u64::from(new_shards.max(1)).to_be_bytes().to_vec()],
        )?;
        let (relay_id, shards) = identity(&mut tx)?;
        tx.commit()?;
        Ok(PgBackend {
            url: url.to_string(),
            relay_id,
            shards,
        })
    }

    /// Opens a store that must exist already (admin tools, verify): an operator's typo in the
    /// URL's database name must not create an empty relay.
    pub fn open_existing(url: &str) -> StoreResult<Self> {
        let mut client = connect(url)?;
        let exists: bool = client
            .query_one("SELECT to_regclass('fs_meta') IS NOT NULL", &[])?
            .try_get(0)?;
        if !exists {
            return Err(StoreError::NotFound(format!(
                "no relay store in the database at {}",
                redact(url)
            )));
        }
        Self::open(url, Uuid::nil(), 1)
    }

    pub fn relay_id(&self) -> Uuid {
        self.relay_id
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl PgBackend {
    /// The cross-table checks of a restore drill (`fieldsync-relay verify --store URL`), the
    /// same as the SQLite store's, over the one database.
    pub fn consistency(&self) -> StoreResult<Consistency> {
        let mut client = connect(&self.url)?;
        let mut count = |sql: &str| -> StoreResult<i64> { Ok(client.query_one(sql, &[])?.try_get(0)?) };
        let mut found = Consistency::counted(&mut count)?;
        // Data of a space the directory does not know: no relay would ever serve it.
        found.misplaced_spaces = count(
            "SELECT COUNT(*) FROM (SELECT space_id FROM documents UNION SELECT space_id FROM feed) d
             WHERE d.space_id NOT IN (SELECT space_id FROM spaces)",
        )?
        .max(0) as u64;
        Ok(found)
    }
}

impl Backend for PgBackend {
    type Directory = PgDirectory;
    type Shard = PgShard;

    fn open_directory(&self) -> StoreResult<PgDirectory> {
        Ok(PgDirectory::new(
            connect(&self.url)?,
            &self.url,
            self.relay_id,
            self.shards,
        ))
    }

    fn open_shard(&self, shard: u32) -> StoreResult<PgShard> {
        if shard >= self.shards {
            return Err(StoreError::NotFound(format!(
                "shard {shard} (the store has {})",
                self.shards
            )));
        }
        Ok(PgShard::new(connect(&self.url)?, &self.url, shard))
    }

    fn shard_count(&self) -> u32 {
        self.shards
    }

    fn shards_share_tables(&self) -> bool {
        true
    }
}

/// A connection with the relay's settings: serializable reads are not needed (every write
/// locks what it builds on), but a statement that waits for a lock gives up after a while
/// instead of hanging a worker forever.
pub fn connect(url: &str) -> StoreResult<Client> {
    let mut client = Client::connect(url, NoTls)
        .map_err(|e| StoreError::Postgres(format!("cannot connect to {}: {e}", redact(url))))?;
    client.batch_execute("SET lock_timeout = '30s'; SET idle_in_transaction_session_timeout = '5min'")?;
    Ok(client)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn meta_u64(tx: &mut postgres::Transaction<'_>, key: &str) -> StoreResult<Option<u64>> {
    let row = tx.query_opt("SELECT value FROM fs_meta WHERE key = $1", &[&key])?;
    row.map(|r| {
        let bytes: Vec<u8> = r.try_get(0)?;
        let array: [u8; 8] = bytes
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("fs_meta.{key} is not a number")))?;
        Ok(u64::from_be_bytes(array))
    })
    .transpose()
}

fn set_meta(tx: &mut postgres::Transaction<'_>, key: &str, value: &[u8]) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO fs_meta(key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&key, &value],
    )?;
    Ok(())
}

fn identity(tx: &mut postgres::Transaction<'_>) -> StoreResult<(Uuid, u32)> {
    let id: Vec<u8> = tx
        .query_one("SELECT value FROM fs_meta WHERE key = 'relay_id'", &[])?
        .try_get(0)?;
    let relay_id = Uuid::from_slice(&id).map_err(|e| StoreError::Corrupt(format!("relay id: {e}")))?;
    let shards = meta_u64(tx, "shards")?.ok_or_else(|| StoreError::Corrupt("fs_meta has no shard count".into()))?;
    Ok((relay_id, u32::try_from(shards).unwrap_or(u32::MAX).max(1)))
}

/// A connection the trait's `&self` reads can use (`postgres::Client` takes `&mut self`),
/// with every statement prepared once: an unprepared query costs PostgreSQL a parse and the
/// relay a round trip more, on every call.
///
/// A connection the server or the network dropped (a PostgreSQL restart or failover, an
/// administrator's `pg_terminate_backend`) fails what was running on it — that transaction is
/// gone, and its caller rolls back and answers "try later" — and is replaced by a new one
/// before the next statement outside a transaction, so a relay that lost its store recovers by
/// itself instead of failing every turn until it is restarted. Never inside a transaction:
/// the statements after a lost `BEGIN` would each commit on their own.
pub(crate) struct Conn {
    url: String,
    client: RefCell<Client>,
    statements: RefCell<HashMap<String, Statement>>,
    /// Between `BEGIN` and `COMMIT`/`ROLLBACK` (see [`Conn::begin`]).
    in_transaction: std::cell::Cell<bool>,
    /// Connections replaced so far (metrics, tests).
    reconnects: std::cell::Cell<u64>,
}

/// The connection with its statement cache, as the store's closures see it: the query
/// methods of `postgres::Client` taking SQL text, each statement prepared on first use.
pub(crate) struct Prepared<'a> {
    client: &'a mut Client,
    statements: &'a mut HashMap<String, Statement>,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl Prepared<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    pub(crate) fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query(&statement, params)
    }

    pub(crate) fn query_one(&mut self, sql: &str, params: Params<'_>) -> Result<Row, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_one(&statement, params)
    }

    pub(crate) fn query_opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_opt(&statement, params)
    }

    pub(crate) fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, params)
    }
}

impl Conn {
    fn new(client: Client, url: &str) -> Self {
        Conn {
            url: url.to_string(),
            client: RefCell::new(client),
            statements: RefCell::new(HashMap::new()),
            in_transaction: std::cell::Cell::new(false),
            reconnects: std::cell::Cell::new(0),
        }
    }

    /// Replaces a closed connection (outside a transaction only); its prepared statements went
    /// with it. A failed attempt leaves the closed one, and the next statement tries again.
    fn revive(&self) -> StoreResult<()> {
        if self.in_transaction.get() || !self.client.borrow().is_closed() {
            return Ok(());
        }
        self.reconnect()
    }

    /// Replaces the connection unconditionally (it is known to be gone).
    fn reconnect(&self) -> StoreResult<()> {
        let fresh = connect(&self.url)?;
        tracing::warn!(url = %redact(&self.url), "the PostgreSQL connection was lost; connected again");
        *self.client.borrow_mut() = fresh;
        self.statements.borrow_mut().clear();
        self.reconnects.set(self.reconnects.get() + 1);
        Ok(())
    }

    /// Starts a transaction with `sql` (`BEGIN ...`), on a new connection if the old one was
    /// lost — also when that is only found out by this `BEGIN` failing: it had no effect, so
    /// it is safe to send again.
    fn begin(&self, sql: &str) -> StoreResult<()> {
        self.revive()?;
        let first = self.client.borrow_mut().batch_execute(sql);
        if let Err(e) = first {
            if !connection_lost(&e) && !self.client.borrow().is_closed() {
                return Err(e.into());
            }
            self.reconnect()?;
            self.batch(sql)?;
        }
        self.in_transaction.set(true);
        Ok(())
    }

    /// Ends the transaction with `sql` (`COMMIT` or `ROLLBACK`). The transaction is over
    /// whatever the answer: on a lost connection the server has rolled it back — or, when only
    /// the answer to `COMMIT` was lost, committed it; the worker then answers "try later" and
    /// the device's retry is answered from the receipt the commit stored.
    fn finish(&self, sql: &str) -> StoreResult<()> {
        self.in_transaction.set(false);
        self.batch(sql)
    }

    /// Runs `f` with the connection, its errors as the client gives them (to tell a unique
    /// violation from the rest).
    fn raw<T>(&self, f: impl FnOnce(&mut Prepared<'_>) -> Result<T, postgres::Error>) -> Result<T, postgres::Error> {
        if let Err(e) = self.revive() {
            tracing::error!(error = %e, "cannot reconnect to PostgreSQL");
        }
        let mut client = self.client.borrow_mut();
        let mut statements = self.statements.borrow_mut();
        f(&mut Prepared {
            client: &mut client,
            statements: &mut statements,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Prepared<'_>) -> Result<T, postgres::Error>) -> StoreResult<T> {
        Ok(self.raw(f)?)
    }

    fn try_with<T>(&self, f: impl FnOnce(&mut Prepared<'_>) -> StoreResult<T>) -> StoreResult<T> {
        self.revive()?;
        let mut client = self.client.borrow_mut();
        let mut statements = self.statements.borrow_mut();
        f(&mut Prepared {
            client: &mut client,
            statements: &mut statements,
        })
    }

    fn batch(&self, sql: &str) -> StoreResult<()> {
        Ok(self.client.borrow_mut().batch_execute(sql)?)
    }
}

/// Whether `e` says the server's end of the connection is gone: closed, or ended by the
/// server (`57P01` admin shutdown — `pg_terminate_backend` or a restart — `57P02` crash
/// shutdown, `57P03` cannot connect now). The client may not have marked itself closed yet
/// when the server's last message was such an error.
fn connection_lost(e: &postgres::Error) -> bool {
    e.is_closed() || e.code().is_some_and(|c| c.code().starts_with("57P"))
}

#[cfg(test)]
mod tests;
