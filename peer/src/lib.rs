//! `fieldsync-peer`: the device library.
//!
//! - [`Device`] (`device`, `write`, `backup`): one device's SQLite store — Automerge documents,
//!   the signed outbox, identity and enrollment. Every write is local and durable at once.
//! - [`conflict`]: conflict prompts and their resolution, refused edits (discard, addendum),
//!   LWW losses and their undo.
//! - [`Client`] (`net::app`): what an app holds — the device, its machine and the background sync
//!   task behind one cheap clone, with notifications ([`ClientEvent`]) after each commit.
//! - [`sync::SyncMachine`]: the device half of the sync protocol. One door,
//!   [`SyncMachine::handle`](sync::SyncMachine::handle): an input (connected, a relay message, a
//!   tick, ...) in, client messages out. The network shell ([`net`]) and the simulator drive it.
//!
//! Outside [`net`], nothing here opens a socket, reads the clock or draws randomness of its own:
//! time and randomness are injected at [`Device::open`] (`Device::open_default`, in `net::app`,
//! injects the system's). Storage I/O (SQLite) is synchronous and
//! happens inside the calls, so the machine is free of network and clock, not of I/O.

pub mod at_rest;
pub mod authority;
pub mod backup;
pub mod conflict;
pub mod db;
pub mod deadline;
pub mod device;
pub mod entity;
pub mod error;
pub mod net;
pub mod new_identity;
pub mod outbox;
mod rules;
pub mod selective;
pub mod sync;
pub mod windows;
pub mod wipe;
pub mod write;

pub use at_rest::RekeyReport;
pub use authority::{MergeReport, PossibleDuplicate, SupersededRequest};
pub use conflict::{
    Author, ConflictRecord, DiscardReport, FieldConflict, FieldStatus, LwwLossRecord, RecordState, RejectedEdit,
    Resolution, Side, UNDO_WINDOW_MS,
};
pub use device::{BlockedOn, Device, DeviceRng, EnrolledAs, Enrollment, Notice, RetryReport, Status, SyncStatus};
pub use entity::{Entity, FieldFilter, SyncState};
pub use error::{PeerError, Result};
pub use fieldsync_schema::sqlite_key::DatabaseKey;
pub use net::app::{Client, ClientEvent, Write, os_rng};
pub use new_identity::IdentityReport;
pub use outbox::{OutboxItem, OutboxState};
pub use selective::TypesReport;
pub use windows::{EvictReport, FetchState};
pub use wipe::WipeRecord;
pub use write::WriteReceipt;

#[cfg(test)]
mod testutil;
