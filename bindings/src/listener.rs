//! Notifications in the app's language. Each listener gets its own thread, which waits on the
//! client's event channel and calls the app: the callback never runs while the device's
//! database is locked (the client sends events after releasing it), never on the runtime
//! that runs sync (a slow callback delays nothing but its own listener), and never on the
//! app's UI thread (an app hops to it itself, as it would for any background work).

use std::sync::Arc;
use std::thread::JoinHandle;

use fieldsync_peer::{ClientEvent, Notice};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::records::Status;

/// What a listener hears. Records named here are already committed locally: `get` sees them.
// Events are serialised across the boundary, one at a time: the in-memory size of the status
// variant costs nothing worth a box (which UniFFI would not carry as one anyway).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum SyncEvent {
    /// The status changed: unsynced count, state, what blocks the outbox, auth failure.
    StatusChanged {
        status: Status,
    },
    /// A pull or live entry from another device changed a record (created, edited, deleted).
    EntityChanged {
        entity_type: String,
        entity_id: String,
    },
    /// The relay answered one of this device's writes with a conflict: `conflicts()` shows it.
    ConflictRaised {
        entity_type: String,
        entity_id: String,
    },
    /// The relay refused one of this device's writes: `rejections()` shows it.
    EditRejected {
        entity_type: String,
        entity_id: String,
    },
    /// A last-writer-wins value of this device's was overridden: `lww_losses()` shows it.
    ValueOverridden {
        entity_type: String,
        entity_id: String,
        field: String,
    },
    /// The relay flagged a record this device created as possibly the same as `duplicate_of`:
    /// the user merges or keeps both.
    PossibleDuplicate {
        entity_type: String,
        entity_id: String,
        duplicate_of: String,
    },
    Connected,
    /// The connection dropped; sync reconnects by itself after `retry_in_ms`.
    Disconnected {
        reason: String,
        retry_in_ms: u64,
    },
    /// Sync ended on its own: the relay refused the device (revoked, unknown, schema retired)
    /// or the store failed. `start` again once the cause is fixed.
    Stopped {
        reason: String,
    },
    /// This listener fell so far behind that `count` events were dropped: re-read what it
    /// shows (`status`, `list`).
    Missed {
        count: u64,
    },
}

/// Implemented by the app: `on_event` is called for every event, in order, on a thread of
/// the listener's own. What it throws ends that one call only: the next event still comes.
#[uniffi::export(with_foreign)]
pub trait SyncListener: Send + Sync {
    fn on_event(&self, event: SyncEvent) -> Result<(), ListenerError>;
}

/// What a listener's callback threw (any exception of the app's becomes this).
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum ListenerError {
    #[error("the listener failed: {reason}")]
    Failed { reason: String },
}

impl From<uniffi::UnexpectedUniFFICallbackError> for ListenerError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        ListenerError::Failed { reason: e.reason }
    }
}

impl From<ClientEvent> for SyncEvent {
    fn from(event: ClientEvent) -> Self {
        match event {
            ClientEvent::Status(status) => SyncEvent::StatusChanged {
                status: Status::from(*status),
            },
            ClientEvent::Notice(Notice::Changed { entity_type, entity_id }) => SyncEvent::EntityChanged {
                entity_type,
                entity_id: entity_id.to_string(),
            },
            ClientEvent::Notice(Notice::Conflict { entity_type, entity_id }) => SyncEvent::ConflictRaised {
                entity_type,
                entity_id: entity_id.to_string(),
            },
            ClientEvent::Notice(Notice::Rejected { entity_type, entity_id }) => SyncEvent::EditRejected {
                entity_type,
                entity_id: entity_id.to_string(),
            },
            ClientEvent::Notice(Notice::LwwLoss {
                entity_type,
                entity_id,
                field,
            }) => SyncEvent::ValueOverridden {
                entity_type,
                entity_id: entity_id.to_string(),
                field,
            },
            ClientEvent::Notice(Notice::PossibleDuplicate {
                entity_type,
                entity_id,
                duplicate_of,
            }) => SyncEvent::PossibleDuplicate {
                entity_type,
                entity_id: entity_id.to_string(),
                duplicate_of: duplicate_of.to_string(),
            },
            ClientEvent::Connected => SyncEvent::Connected,
            ClientEvent::Disconnected { reason, retry_in_ms } => SyncEvent::Disconnected { reason, retry_in_ms },
            ClientEvent::Stopped { reason } => SyncEvent::Stopped { reason },
        }
    }
}

/// Delivers `events` to `listener` on a new thread until the client is gone (its event
/// channel closed), then ends: the handle joins it.
pub(crate) fn spawn(
    mut events: broadcast::Receiver<ClientEvent>,
    listener: Arc<dyn SyncListener>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("fieldsync-listener".into())
        .spawn(move || {
            loop {
                let event = match events.blocking_recv() {
                    Ok(event) => SyncEvent::from(event),
                    Err(RecvError::Lagged(count)) => SyncEvent::Missed { count },
                    Err(RecvError::Closed) => return,
                };
                // A callback that throws (or, in Rust, panics) must not end the deliveries of
                // the events after it: the error is the app's, and it has it.
                let listener = listener.clone();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || listener.on_event(event)));
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::mpsc;

    struct Recorder(Mutex<mpsc::Sender<SyncEvent>>);

    impl SyncListener for Recorder {
        fn on_event(&self, event: SyncEvent) -> Result<(), ListenerError> {
            let _ = self.0.lock().unwrap().send(event.clone());
            match event {
                SyncEvent::Connected => panic!("a listener that panics"),
                SyncEvent::Disconnected { reason, .. } => Err(ListenerError::Failed { reason }),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn events_arrive_in_order_a_failing_callback_does_not_end_delivery_and_lag_is_reported() {
        let (tx, rx) = mpsc::channel();
        let (events, receiver) = broadcast::channel(2);
        let changed = |n: u128| {
            ClientEvent::Notice(Notice::Changed {
                entity_type: "patient".into(),
                entity_id: uuid::Uuid::from_u128(n),
            })
        };
        // Three events into a buffer of two before the listener runs: the oldest is missed.
        events.send(changed(1)).unwrap();
        events.send(changed(2)).unwrap();
        events.send(changed(3)).unwrap();
        let thread = spawn(receiver, Arc::new(Recorder(Mutex::new(tx)))).unwrap();
        let next = || rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(next(), SyncEvent::Missed { count: 1 });
        assert!(
            matches!(next(), SyncEvent::EntityChanged { entity_id, .. } if entity_id == uuid::Uuid::from_u128(2).to_string())
        );
        assert!(matches!(next(), SyncEvent::EntityChanged { .. }));
        // One at a time (the buffer holds two): each is delivered after the one before it
        // panicked or failed.
        events.send(ClientEvent::Connected).unwrap();
        assert_eq!(next(), SyncEvent::Connected);
        let cut = ClientEvent::Disconnected {
            reason: "cut".into(),
            retry_in_ms: 5,
        };
        events.send(cut).unwrap();
        assert!(matches!(next(), SyncEvent::Disconnected { .. }));
        events
            .send(ClientEvent::Stopped {
                reason: "revoked".into(),
            })
            .unwrap();
        assert_eq!(
            next(),
            SyncEvent::Stopped {
                reason: "revoked".into()
            }
        );
        drop(events);
        thread.join().unwrap();
        assert!(rx.try_recv().is_err(), "nothing after the channel closed");
    }
}
