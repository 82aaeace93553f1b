//! `fieldsync-relay`: the authority. It decides, mutation by mutation, what is accepted and
//! never loses what it acknowledged.
//!
//! - [`core`]: the sans-IO relay core (sessions, acceptance, policies, pull, live fan-out).
//! - [`store`]: the storage trait and its SQLite implementation.
//! - [`audit`]: the hash-chained audit log and its verification.
//! - [`admin`]: spaces, users, roles, enrollment tokens, devices.
//! - [`doc_cache`]: parsed documents kept in memory.
//! - [`server`]: the tokio / axum shell: WebSocket `/v1/sync`, `/healthz`, `/metrics` (its
//!   Prometheus exposition), `/v1/status`, optionally behind TLS, with scheduled backups.
//! - [`backup`]: online backups, restore drills, restores, retention.
//! - [`config`]: the TOML configuration file of `serve`.

pub mod admin;
pub mod audit;
pub mod backup;
pub mod config;
pub mod core;
pub mod doc_cache;
pub mod schema_history;
pub mod server;
pub mod store;
