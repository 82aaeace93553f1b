//! The device half of the sync protocol (SPEC §7), sans-IO.
//!
//! [`SyncMachine`] has one door, [`SyncMachine::handle`]: an input (connected, disconnected, a
//! relay message, a tick, a local write) in, the client messages to send out. Time comes from
//! the device's injected clock, read once per input. It sleeps, spawns and opens sockets never:
//! the async shell (and the simulator) deliver inputs, tick at [`SyncMachine::next_wakeup`],
//! and connect when [`SyncMachine::should_connect`] says so.
//!
//! Order is strict: one push batch in flight, oldest first, halted by the first blocked item.
//! A disconnect leaves the in-flight batch pending, so it is resent under the same mutation ids.

mod backoff;
mod store;

use fieldsync_schema::wire::{AuthFailure, ErrorCode, MAX_BATCH, MAX_FETCH};
use fieldsync_schema::{ClientMessage, RelayMessage};
use serde::Serialize;
use uuid::Uuid;

pub use backoff::Backoff;
pub use store::PushTally;

use crate::deadline::Deadline;
use crate::device::Device;
use crate::error::PeerError;

/// Knobs of the machine; the defaults suit production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConfig {
    /// Between reconnect attempts.
    pub reconnect: Backoff,
    /// Before resending a batch the relay deferred.
    pub retry: Backoff,
    /// Entries per pull page.
    pub pull_page: u32,
    /// How long a push or pull may go unanswered before the connection is given up.
    pub request_timeout_ms: u64,
    /// The least wait before connecting again to a relay whose schema is older than the
    /// device's (an upgrade is a deploy, not a blip).
    pub relay_behind_wait_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            reconnect: Backoff::default(),
            retry: Backoff::default(),
            pull_page: 500,
            request_timeout_ms: 30_000,
            relay_behind_wait_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Disconnected,
    AwaitingChallenge,
    AwaitingWelcome,
    Ready,
    /// The relay refused this device; no reconnecting until the user acts (re-enroll).
    AuthFailed,
    /// The relay ordered this device's data erased (it was revoked with a wipe): done, and
    /// reported; the relay's refusal follows.
    Wiping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Disconnected => "disconnected",
            Phase::AwaitingChallenge => "awaiting_challenge",
            Phase::AwaitingWelcome => "awaiting_welcome",
            Phase::Ready => "ready",
            Phase::AuthFailed => "auth_failed",
            Phase::Wiping => "wiping",
        }
    }
}

/// What the machine has done so far, for status lines, tests and the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SyncSummary {
    pub phase: Phase,
    /// Mutations sent (a resend counts again).
    pub pushed: u64,
    pub applied: u64,
    pub conflicts: u64,
    pub rejected: u64,
    /// Feed entries received (pull pages and live).
    pub pulled: u64,
    pub batch_in_flight: bool,
    pub caught_up: bool,
    /// Caught up, nothing in flight, nothing left to push now: a one-shot sync may stop.
    pub idle: bool,
    /// Caught up and nothing in flight, but queued changes wait for a retry (the relay
    /// deferred them, e.g. its disk is full): when they are due, in device time (ms).
    pub retry_at: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("unexpected `{got}` from the relay while {phase}")]
    Unexpected { got: &'static str, phase: &'static str },
    #[error("the relay reported an error ({code:?}): {message}")]
    Relay { code: ErrorCode, message: String },
    #[error("the relay challenged as {got}, but this device is enrolled with relay {expected}")]
    WrongRelay { expected: Uuid, got: Uuid },
    #[error("push result for batch {got}, but batch {expected:?} is in flight")]
    WrongBatch { expected: Option<u64>, got: u64 },
    #[error("timed out waiting for the relay")]
    Timeout,
    #[error("what the device asks the relay to send changed (types, windows, metered link): reconnecting")]
    DeliveryChanged,
    #[error("authentication failed ({reason}): {message}")]
    AuthFailed { reason: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] PeerError),
}

#[derive(Debug, Clone)]
struct Batch {
    id: u64,
    mutations: Vec<Uuid>,
    sent_at: u64,
}

#[derive(Debug, Clone)]
pub struct SyncMachine {
    config: SyncConfig,
    phase: Phase,
    max_batch: usize,
    next_batch_id: u64,
    batch: Option<Batch>,
    pull_sent_at: Option<u64>,
    /// When the fetch in flight was sent (one at a time, after the pull caught up).
    fetch_sent_at: Option<u64>,
    /// The relay answers fetches (its `Welcome` said so).
    relay_fetches: bool,
    /// What this connection's `Hello` asked to be sent: if the app changes it meanwhile, the
    /// machine reconnects so the relay hears the new choice.
    sent_delivery: Option<store::Delivery>,
    caught_up: bool,
    reconnect_failures: u32,
    reconnect_at: Option<Deadline>,
    /// The relay said it serves an older schema than the device's: wait longer to reconnect.
    relay_behind: bool,
    /// When the oldest backing-off item becomes due (cached after each pump).
    outbox_due_at: Option<Deadline>,
    was_idle: bool,
    pushed: u64,
    applied: u64,
    conflicts: u64,
    rejected: u64,
    pulled: u64,
    /// Connected to one of the device's other relays (not its first): a refusal before the
    /// relay named its cluster is not final (see [`crate::device::Enrollment::other_relays`]).
    on_other_relay: bool,
}

impl Default for SyncMachine {
    fn default() -> Self {
        SyncMachine::new(SyncConfig::default())
    }
}

type Out = Result<Vec<ClientMessage>, SyncError>;

/// What the machine reacts to. Time is not among them: the machine reads it from the device's
/// injected clock ([`Device::now_ms`]), once per input, so there is one time channel.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncInput {
    /// A transport connection opened: the handshake starts.
    Connected,
    /// The connection is gone. The in-flight batch stays pending with the same ids.
    Disconnected,
    /// A message from the relay.
    Message(RelayMessage),
    /// Time passed (at [`SyncMachine::next_wakeup`] or any other moment): timeouts, retries
    /// whose backoff ended, writes another process made.
    Tick,
    /// A local write happened: push it if connected.
    LocalWrite,
}

impl SyncMachine {
    pub fn new(config: SyncConfig) -> Self {
        SyncMachine {
            config,
            phase: Phase::Disconnected,
            max_batch: MAX_BATCH,
            next_batch_id: 1,
            batch: None,
            pull_sent_at: None,
            fetch_sent_at: None,
            relay_fetches: false,
            sent_delivery: None,
            caught_up: false,
            reconnect_failures: 0,
            reconnect_at: None,
            relay_behind: false,
            outbox_due_at: None,
            was_idle: false,
            pushed: 0,
            applied: 0,
            conflicts: 0,
            rejected: 0,
            pulled: 0,
            on_other_relay: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn summary(&self) -> SyncSummary {
        SyncSummary {
            phase: self.phase,
            pushed: self.pushed,
            applied: self.applied,
            conflicts: self.conflicts,
            rejected: self.rejected,
            pulled: self.pulled,
            batch_in_flight: self.batch.is_some(),
            caught_up: self.caught_up,
            idle: self.was_idle,
            retry_at: self
                .outbox_due_at
                .filter(|_| {
                    self.caught_up
                        && self.batch.is_none()
                        && self.pull_sent_at.is_none()
                        && self.fetch_sent_at.is_none()
                        && !self.was_idle
                })
                .map(Deadline::ms),
        }
    }

    /// Whether the shell should open a connection now.
    pub fn should_connect(&self, dev: &Device) -> bool {
        self.phase == Phase::Disconnected && self.reconnect_at.is_none_or(|t| t.is_due(dev.now_ms()))
    }

    /// The one door: applies `input` to the machine and the device; returns what to send.
    pub fn handle(&mut self, dev: &mut Device, input: SyncInput) -> Out {
        let now_ms = dev.now_ms();
        if matches!(input, SyncInput::Message(_) | SyncInput::Tick | SyncInput::LocalWrite)
            && matches!(
                self.phase,
                Phase::AwaitingChallenge | Phase::AwaitingWelcome | Phase::Ready
            )
            && let Some(sent) = &self.sent_delivery
            && *sent != dev.delivery()?
        {
            // Before anything of this connection is applied: a page filtered by the old choice
            // would move the cursor past what the new one wants.
            return Err(SyncError::DeliveryChanged);
        }
        match input {
            SyncInput::Connected => Ok(self.on_connected(dev)),
            SyncInput::Disconnected => {
                self.on_disconnected(dev, now_ms);
                Ok(Vec::new())
            }
            SyncInput::Message(msg) => self.on_message(dev, msg, now_ms),
            SyncInput::Tick => self.on_tick(dev, now_ms),
            SyncInput::LocalWrite => self.pump(dev, now_ms),
        }
    }

    /// The shell says which relay the next connection goes to: the device's first (`false`) or
    /// one of its others (`true`).
    pub fn set_on_other_relay(&mut self, other: bool) {
        self.on_other_relay = other;
    }

    /// When a [`SyncInput::Tick`] next has something to do (reconnect, a timeout, a due retry).
    pub fn next_wakeup(&self) -> Option<Deadline> {
        match self.phase {
            Phase::Disconnected => self.reconnect_at,
            Phase::AuthFailed => None,
            Phase::AwaitingChallenge | Phase::AwaitingWelcome | Phase::Wiping => None,
            Phase::Ready => {
                let timeout = self.config.request_timeout_ms;
                [
                    self.batch.as_ref().map(|b| Deadline::after(b.sent_at, timeout)),
                    self.pull_sent_at.map(|t| Deadline::after(t, timeout)),
                    self.fetch_sent_at.map(|t| Deadline::after(t, timeout)),
                    self.outbox_due_at.filter(|_| self.batch.is_none()),
                ]
                .into_iter()
                .flatten()
                .min()
            }
        }
    }

    /// A transport connection is open: start the handshake.
    fn on_connected(&mut self, dev: &mut Device) -> Vec<ClientMessage> {
        self.phase = Phase::AwaitingChallenge;
        self.batch = None;
        self.pull_sent_at = None;
        self.fetch_sent_at = None;
        self.relay_fetches = false;
        self.caught_up = false;
        self.was_idle = false;
        dev.set_link(true, false);
        // Unreadable, the choice falls back to every type and no filter: more arrives, nothing
        // is lost (and a readable one later differs, which reconnects).
        let delivery = dev.delivery().unwrap_or(store::Delivery {
            types: None,
            windowed: false,
            metered: false,
        });
        let mut hello = ClientMessage::hello(dev.device_id(), dev.schema());
        if let ClientMessage::Hello {
            types,
            windowed,
            metered,
            ..
        } = &mut hello
        {
            *types = delivery.types.clone();
            *windowed = delivery.windowed;
            *metered = delivery.metered;
        }
        self.sent_delivery = Some(delivery);
        vec![hello]
    }

    /// The connection is gone. The in-flight batch stays pending with the same ids; the next
    /// connection attempt waits a jittered, growing delay.
    fn on_disconnected(&mut self, dev: &mut Device, now_ms: u64) {
        self.batch = None;
        self.pull_sent_at = None;
        self.fetch_sent_at = None;
        self.caught_up = false;
        self.was_idle = false;
        dev.set_link(false, false);
        if self.phase == Phase::AuthFailed {
            return;
        }
        self.phase = Phase::Disconnected;
        let mut delay = self.config.reconnect.delay(self.reconnect_failures, dev.random_u64());
        if self.relay_behind {
            delay = delay.max(self.config.relay_behind_wait_ms);
        }
        self.reconnect_failures = self.reconnect_failures.saturating_add(1);
        self.reconnect_at = Some(Deadline::after(now_ms, delay));
    }

    /// When the machine will want to reconnect, if it is waiting to.
    pub fn reconnect_at(&self) -> Option<Deadline> {
        self.reconnect_at
    }

    /// `reconnect_at`, as a delay from the device's now (zero when due, also after a clock jump).
    pub fn reconnect_in(&self, dev: &Device) -> Option<u64> {
        self.reconnect_at.map(|t| t.remaining(dev.now_ms()))
    }

    /// Allows connecting again after an authentication failure (e.g. after re-enrollment).
    pub fn clear_auth_failure(&mut self, dev: &mut Device) -> Result<(), SyncError> {
        dev.set_auth_failed(None)?;
        if self.phase == Phase::AuthFailed {
            self.phase = Phase::Disconnected;
            self.reconnect_at = None;
        }
        Ok(())
    }

    /// Time passed: detect unanswered requests, send items whose backoff ended.
    fn on_tick(&mut self, dev: &mut Device, now_ms: u64) -> Out {
        if self.phase != Phase::Ready {
            return Ok(Vec::new());
        }
        let timeout = self.config.request_timeout_ms;
        let late = |t: u64| now_ms >= t.saturating_add(timeout);
        if self.batch.as_ref().is_some_and(|b| late(b.sent_at))
            || self.pull_sent_at.is_some_and(late)
            || self.fetch_sent_at.is_some_and(late)
        {
            return Err(SyncError::Timeout);
        }
        self.pump(dev, now_ms)
    }

    fn on_message(&mut self, dev: &mut Device, msg: RelayMessage, now_ms: u64) -> Out {
        let unexpected = |phase: Phase, got: &RelayMessage| SyncError::Unexpected {
            got: got.name(),
            phase: phase.as_str(),
        };
        match (self.phase, msg) {
            (Phase::AwaitingChallenge, RelayMessage::Challenge { relay_id, nonce }) => {
                if let Some(e) = dev.enrollment()
                    && e.relay_id != relay_id
                {
                    return Err(SyncError::WrongRelay {
                        expected: e.relay_id,
                        got: relay_id,
                    });
                }
                self.phase = Phase::AwaitingWelcome;
                Ok(vec![ClientMessage::auth(
                    dev.key(),
                    &relay_id,
                    &nonce.0,
                    &dev.device_id(),
                )])
            }
            (
                Phase::AwaitingWelcome,
                RelayMessage::Welcome {
                    user,
                    server_time_ms,
                    max_batch,
                    schema_version,
                    fetch,
                    priority,
                    ..
                },
            ) => {
                self.phase = Phase::Ready;
                self.relay_fetches = fetch;
                dev.note_relay_priority(priority)?;
                self.max_batch = usize::try_from(max_batch).unwrap_or(MAX_BATCH).clamp(1, MAX_BATCH);
                self.reconnect_failures = 0;
                self.reconnect_at = None;
                dev.set_auth_failed(None)?;
                dev.refresh_user(user)?;
                dev.record_relay_schema_version(schema_version)?;
                self.relay_behind = false;
                dev.set_relay_behind(None)?;
                dev.observe_relay_time(server_time_ms, now_ms)?;
                self.pump(dev, now_ms)
            }
            (Phase::AwaitingWelcome | Phase::Ready, RelayMessage::Wipe) => {
                // Only after this device answered the challenge of the relay it is enrolled
                // with: the relay proved nothing to the device but its id (and TLS).
                let record = dev.wipe()?;
                self.phase = Phase::Wiping;
                self.batch = None;
                self.pull_sent_at = None;
                self.fetch_sent_at = None;
                self.caught_up = false;
                Ok(vec![ClientMessage::Wiped {
                    discarded: record.discarded,
                }])
            }
            (
                Phase::AwaitingChallenge | Phase::AwaitingWelcome | Phase::Ready | Phase::Wiping,
                RelayMessage::AuthFailed { reason, message },
            ) => {
                let text = format!("{}: {message}", reason.as_str());
                if reason == AuthFailure::SchemaAhead {
                    // The relay has not been upgraded yet: the device keeps working and its
                    // outbox waits; it connects again later, not as a refused device.
                    self.relay_behind = true;
                    dev.set_relay_behind(Some(&message))?;
                    return Err(SyncError::AuthFailed {
                        reason: reason.as_str(),
                        message,
                    });
                }
                if self.on_other_relay && self.phase == Phase::AwaitingChallenge {
                    // One of the other addresses refused before naming its cluster: maybe a
                    // relay of another cluster listed by mistake. Not a verdict on the device;
                    // the shell tries the next address, the first relay's answer is final.
                    return Err(SyncError::AuthFailed {
                        reason: reason.as_str(),
                        message: format!("{message} (an address other than the device's first relay; trying the next)"),
                    });
                }
                if reason == AuthFailure::NonceExpired {
                    // A slow handshake, not a verdict on the device: reconnect as usual.
                    return Err(SyncError::AuthFailed {
                        reason: reason.as_str(),
                        message,
                    });
                }
                self.phase = Phase::AuthFailed;
                dev.set_auth_failed(Some(&text))?;
                dev.set_link(false, false);
                Err(SyncError::AuthFailed {
                    reason: reason.as_str(),
                    message,
                })
            }
            (Phase::Ready, RelayMessage::PushResult { batch_id, results }) => {
                let batch = self.take_batch(batch_id)?;
                let tally = dev.apply_push_results(&batch.mutations, &results, now_ms)?;
                self.applied += tally.applied;
                self.conflicts += tally.conflicts;
                self.rejected += tally.rejected;
                self.pump(dev, now_ms)
            }
            (
                Phase::Ready,
                RelayMessage::PushDeferred {
                    batch_id,
                    retry_after_ms,
                    reason,
                },
            ) => {
                let batch = self.take_batch(batch_id)?;
                let attempts = batch
                    .mutations
                    .first()
                    .and_then(|id| dev.outbox_item(*id).ok().flatten())
                    .map_or(1, |i| i.attempts);
                let delay = self
                    .config
                    .retry
                    .delay(attempts.saturating_sub(1), dev.random_u64())
                    .max(retry_after_ms);
                dev.defer_batch(
                    &batch.mutations,
                    now_ms.saturating_add(delay),
                    &format!("deferred: {reason}"),
                )?;
                self.pump(dev, now_ms)
            }
            (
                Phase::Ready,
                RelayMessage::Changes {
                    entries,
                    next,
                    caught_up,
                },
            ) => {
                if self.pull_sent_at.take().is_none() {
                    return Err(SyncError::Unexpected {
                        got: "changes",
                        phase: "no pull was in flight",
                    });
                }
                dev.apply_feed(&entries, next, now_ms)?;
                self.pulled += entries.len() as u64;
                self.caught_up = caught_up;
                self.pump(dev, now_ms)
            }
            (Phase::Ready, RelayMessage::Fetched { entries, unknown, .. }) => {
                if self.fetch_sent_at.take().is_none() {
                    return Err(SyncError::Unexpected {
                        got: "fetched",
                        phase: "no fetch was in flight",
                    });
                }
                // Ids the relay left for later stay queued and go in the next fetch.
                dev.apply_fetched(&entries, &unknown, now_ms)?;
                self.pulled += entries.len() as u64;
                self.pump(dev, now_ms)
            }
            (Phase::Ready, RelayMessage::Live { entries }) => {
                if !dev.apply_live(&entries, now_ms)? {
                    // A gap in a space's run: pull from the cursor to fill it.
                    self.caught_up = false;
                }
                self.pulled += entries.len() as u64;
                self.pump(dev, now_ms)
            }
            (Phase::Ready, RelayMessage::UserChanged { user }) => {
                // Spaces joined start from their snapshots, left ones are gone: pull again.
                dev.refresh_user(user)?;
                self.caught_up = false;
                self.pump(dev, now_ms)
            }
            (_, RelayMessage::Pong { .. }) => Ok(Vec::new()),
            (_, RelayMessage::Error { code, message }) => Err(SyncError::Relay { code, message }),
            (phase, other) => Err(unexpected(phase, &other)),
        }
    }

    fn take_batch(&mut self, batch_id: u64) -> Result<Batch, SyncError> {
        match self.batch.take() {
            Some(b) if b.id == batch_id => Ok(b),
            other => {
                let expected = other.as_ref().map(|b| b.id);
                self.batch = other;
                Err(SyncError::WrongBatch {
                    expected,
                    got: batch_id,
                })
            }
        }
    }

    /// Sends the next batch, or a pull when there is nothing to push; records a completed sync.
    fn pump(&mut self, dev: &mut Device, now_ms: u64) -> Out {
        let mut out = Vec::new();
        if self.phase != Phase::Ready {
            return Ok(out);
        }
        if self.batch.is_none() {
            let mutations = dev.pushable(now_ms, self.max_batch)?;
            if !mutations.is_empty() {
                let ids: Vec<Uuid> = mutations.iter().map(|m| m.mutation_id).collect();
                dev.mark_sent(&ids, now_ms)?;
                let id = self.next_batch_id;
                self.next_batch_id += 1;
                self.pushed += ids.len() as u64;
                self.batch = Some(Batch {
                    id,
                    mutations: ids,
                    sent_at: now_ms,
                });
                out.push(ClientMessage::Push {
                    batch_id: id,
                    mutations,
                });
            }
        }
        if self.batch.is_none() && self.pull_sent_at.is_none() && !self.caught_up {
            self.pull_sent_at = Some(now_ms);
            out.push(ClientMessage::Pull {
                cursor: dev.cursor()?,
                max_entries: self.config.pull_page,
            });
        }
        // Records asked for by id, once the pull caught up (they may have come with it).
        if self.relay_fetches
            && self.caught_up
            && self.batch.is_none()
            && self.pull_sent_at.is_none()
            && self.fetch_sent_at.is_none()
        {
            let ids = dev.fetch_batch(MAX_FETCH)?;
            if !ids.is_empty() {
                self.fetch_sent_at = Some(now_ms);
                out.push(ClientMessage::Fetch { ids });
            }
        }
        self.outbox_due_at = if self.batch.is_none() {
            dev.next_due()?.map(Deadline::at).filter(|t| !t.is_due(now_ms))
        } else {
            None
        };
        let idle = self.caught_up
            && self.batch.is_none()
            && self.pull_sent_at.is_none()
            && self.fetch_sent_at.is_none()
            && (dev.pending_count()? == 0 || dev.is_halted()?);
        if idle && !self.was_idle {
            dev.record_sync_complete(now_ms)?;
        }
        self.was_idle = idle;
        dev.set_link(true, self.caught_up);
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
