//! `fieldsync-ffi`: the device library for Swift, Kotlin and Python apps, through UniFFI.
//!
//! One interface, defined here with UniFFI's attributes, generated for each language by the
//! `uniffi-bindgen` binary of this crate (README, "Use it from your app"):
//! - [`FieldsyncClient`] (`client`): a device directory — writes, reads, the outbox, conflicts
//!   and their resolutions, rejected edits, LWW losses, backups, sign-out — and its sync task
//!   on a runtime the object owns;
//! - [`SyncListener`] (`listener`): implemented in the app's language, told of every status
//!   change, record changed by sync, conflict, rejection and overridden value;
//! - [`FieldsyncError`] (`error`): one exception type with the CLI's field errors and reasons;
//! - `records`: what crosses the boundary, record fields as JSON text.
//!
//! Everything here wraps `fieldsync_peer::Client`: the bindings add no behaviour of their own
//! beyond moving values across the boundary and owning the runtime.

mod client;
mod error;
mod listener;
mod records;

pub use client::FieldsyncClient;
pub use error::{FieldError, FieldsyncError};
pub use listener::{ListenerError, SyncEvent, SyncListener};
pub use records::*;

uniffi::setup_scaffolding!("fieldsync");
