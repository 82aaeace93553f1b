//! `fieldsync-schema`: what the device and the relay must agree on.
//!
//! - [`registry`]: entity types, policies, fields, roles; loaded from `entities.toml`.
//! - [`validate`]: field validation with every error reported at once.
//! - [`document`]: how an entity is laid out in its Automerge document.
//! - [`envelope`]: the mutation envelope, the relay's outcomes, the error taxonomy.
//! - [`signing`]: the canonical bytes devices sign, and device keys.
//! - [`wire`]: protocol messages and their bounded CBOR framing.
//! - [`hlc`]: the hybrid logical clock used for last-writer-wins.
//! - [`time_fmt`]: injected time sources and date formats.
//! - [`ids`]: ids drawn from an injected randomness source.
//! - [`cli`]: what the command lines share (quiet exit on a closed pipe).
//! - `sqlite_file` (feature `sqlite`): the integrity check every fieldsync SQLite file passes.
//! - `sqlite_key` (feature `sqlite`): the key that encrypts a SQLite file at rest.
//! - `testkit` (feature `testkit`): a device built by hand, for tests and the load generator.

pub mod cli;
pub mod document;
pub mod envelope;
pub mod hlc;
pub mod ids;
pub mod registry;
pub mod signing;
#[cfg(feature = "sqlite")]
pub mod sqlite_file;
#[cfg(feature = "sqlite")]
pub mod sqlite_key;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod time_fmt;
pub mod validate;
pub mod wire;

pub use document::EntityDoc;
pub use envelope::{
    Bytes, ConflictReason, Disposition, LwwLoss, Mutation, MutationKind, Origin, Outcome, TransportError,
};
pub use hlc::{Hlc, HlcClock};
pub use registry::compat::{self, CompatReport, SchemaChange, Verdict};
pub use registry::{EntityType, Field, FieldKind, Policy, Role, Schema, SchemaError, SchemaHash, SyncWindow};
pub use signing::DeviceKey;
pub use time_fmt::{ManualTime, SystemTimeSource, TimeSource};
pub use validate::{FieldError, Rule, ValidationErrors};
pub use wire::{ClientMessage, FeedEntry, FeedPayload, PullCursor, RelayMessage};
