//! The handle an app holds: one [`Device`], its [`SyncMachine`] and the background sync task
//! behind a cheap clone, with notifications.
//!
//! A `Device` alone is what the CLI needs: one command, one owner. An app has a UI thread and
//! a sync task that both reach the same device, and wants to hear what sync changed. So the
//! client keeps device and machine behind one lock, which the sync task takes for each step
//! only (a message handled, a tick) and never across a wait on the network; every handle sees
//! the same status, connected or not. What sync committed reaches [`Client::subscribe`]rs as
//! [`ClientEvent`]s, sent after the lock is released, so a listener may call back into the
//! client, and on a broadcast channel, so a slow listener never blocks sync (it misses the
//! oldest events instead, and is told how many).

use std::sync::{Arc, Mutex, MutexGuard};

use fieldsync_schema::ClientMessage;
use serde_json::{Map, Value};
use tokio::sync::{Notify, broadcast};
use uuid::Uuid;

use super::{Drive, NetError, SyncOptions, WatchEvent, watch_with};
use crate::device::{Device, DeviceRng, Enrollment, Notice, Status};
use crate::entity::{Entity, FieldFilter};
use crate::error::{PeerError, Result};
use crate::sync::{SyncMachine, SyncSummary};
use crate::write::WriteReceipt;

/// How many events a listener may fall behind before it misses the oldest.
const EVENT_BUFFER: usize = 1024;

/// What a listener hears.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The status changed: unsynced count, state, what blocks the outbox, auth failure.
    Status(Box<Status>),
    /// Sync committed something: a record changed by a pull or live entry, a conflict or a
    /// rejection to show, a last-writer-wins value overridden.
    Notice(Notice),
    Connected,
    Disconnected {
        reason: String,
        retry_in_ms: u64,
    },
    /// The sync task ended on its own: the relay refused the device (revoked, unknown, its
    /// schema retired) or the store failed. `stop` ends it without this event.
    Stopped {
        reason: String,
    },
}

/// The device, its machine and the background sync task, shared by every clone. When the
/// last clone is dropped, the sync task stops (writes not yet confirmed stay queued).
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    /// Held by the handles only, not by the sync task (which holds `shared`): its drop is the
    /// last handle going away.
    _handles: Arc<LastHandle>,
}

struct LastHandle(Arc<Shared>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.0.task).take() {
            let _ = task.stop.send(());
        }
    }
}

struct Shared {
    core: Mutex<Core>,
    events: broadcast::Sender<ClientEvent>,
    /// Wakes the sync task: a local write to push, `sync_now`.
    nudge: Notify,
    task: Mutex<Option<SyncTask>>,
    opts: SyncOptions,
}

struct Core {
    device: Device,
    machine: SyncMachine,
    /// What listeners last heard, to tell them only of changes.
    last_summary: Option<SyncSummary>,
    last_status: Option<Status>,
}

struct SyncTask {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Opens the device in `dir` (created on first use) with the default schema, the system
    /// clock and an OS-seeded random number generator.
    pub fn open(dir: &std::path::Path) -> Result<Client> {
        Ok(Client::new(Device::open_default(dir)?))
    }

    /// A client around a device opened another way (another schema, injected clock).
    pub fn new(device: Device) -> Client {
        let opts = SyncOptions {
            progress: false,
            ..SyncOptions::default()
        };
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                device,
                machine: SyncMachine::default(),
                last_summary: None,
                last_status: None,
            }),
            events,
            nudge: Notify::new(),
            task: Mutex::new(None),
            opts,
        });
        Client {
            _handles: Arc::new(LastHandle(shared.clone())),
            shared,
        }
    }

    /// Every event from now on (see [`ClientEvent`]).
    pub fn subscribe(&self) -> broadcast::Receiver<ClientEvent> {
        self.shared.events.subscribe()
    }

    /// Runs `f` on the device (anything this facade does not wrap: conflicts, resolutions,
    /// export). Listeners then hear whatever it changed, after the lock is released; a write
    /// wakes the sync task to push it.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut Device) -> R) -> R {
        self.shared.step(true, |dev, _| f(dev))
    }

    pub fn status(&self) -> Result<Status> {
        self.read(|d| d.status())
    }

    /// The relays the device syncs with, in the order it tries them.
    pub fn relays(&self) -> Vec<String> {
        self.read(|d| d.relay_urls())
    }

    /// Sets the relays of the device's cluster ([`Device::set_relays`]); the sync task uses
    /// the new list from its next connection.
    pub fn set_relays(&self, urls: &[String]) -> Result<()> {
        self.shared.step(false, |dev, _| dev.set_relays(urls))
    }

    pub fn get(&self, id: Uuid) -> Result<Option<Entity>> {
        self.read(|d| d.get(id))
    }

    pub fn list(&self, entity_type: &str, filters: &[FieldFilter]) -> Result<Vec<Entity>> {
        self.read(|d| d.list(entity_type, filters, false))
    }

    /// A read: changes nothing, so the status is not re-read for listeners.
    fn read<R>(&self, f: impl FnOnce(&Device) -> R) -> R {
        self.shared.step(false, |dev, _| f(dev))
    }

    /// A new record of `entity_type`, or (with [`Write::id`]) changes to one:
    /// `client.write("patient").set("name", "Ada").save()?`.
    pub fn write(&self, entity_type: &str) -> Write<'_> {
        Write {
            client: self,
            entity_type: entity_type.to_string(),
            id: None,
            fields: Map::new(),
        }
    }

    pub fn delete(&self, entity_type: &str, id: Uuid) -> Result<WriteReceipt> {
        let receipt = self.with_device(|d| d.delete(entity_type, id))?;
        self.shared.nudge.notify_one();
        Ok(receipt)
    }

    /// Enrolls the device with a relay, with a single-use token from its operator (no lock is
    /// held while the relay answers).
    pub async fn enroll(&self, relay_url: &str, token: &str) -> std::result::Result<Enrollment, NetError> {
        let request = self.with_device(|d| ClientMessage::enroll(d.key(), token.trim(), d.device_id(), d.schema()));
        let reply = crate::net::enroll::exchange(relay_url, &request, &self.shared.opts.tls).await?;
        self.with_device(|d| crate::net::enroll::complete(d, relay_url, reply))
    }

    /// Starts the background sync task on the current tokio runtime: connected to the relay
    /// the device enrolled with, live both ways, reconnecting with backoff. Refused when
    /// already running or outside a runtime.
    pub fn start(&self) -> Result<()> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| PeerError::NotAllowed("`start` needs a tokio runtime to run the sync task on".into()))?;
        let mut task = lock(&self.shared.task);
        if task.as_ref().is_some_and(|t| !t.handle.is_finished()) {
            return Err(PeerError::NotAllowed("sync is already running".into()));
        }
        if self.with_device(|d| d.enrollment().is_none()) {
            return Err(PeerError::NotAllowed(
                "this device is not enrolled: enroll it with a token first".into(),
            ));
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = self.shared.clone();
        let handle = runtime.spawn(async move {
            let mut drive = SharedDrive(shared.clone());
            let opts = shared.opts.clone();
            let events = shared.events.clone();
            let stopped = async move {
                let _ = stopped.await;
            };
            let result = watch_with(&mut drive, &opts, stopped, |e| match e {
                WatchEvent::Connected => {
                    let _ = events.send(ClientEvent::Connected);
                }
                WatchEvent::Disconnected { reason, retry_in_ms } => {
                    let _ = events.send(ClientEvent::Disconnected { reason, retry_in_ms });
                }
                WatchEvent::Progress(_) | WatchEvent::Summary(_) => {}
            })
            .await;
            // The link is down now: listeners hear the status that says so.
            shared.step(true, |d, _| d.set_link(false, false));
            if let Err(e) = result {
                let _ = shared.events.send(ClientEvent::Stopped { reason: e.to_string() });
            }
        });
        *task = Some(SyncTask { stop, handle });
        Ok(())
    }

    /// Ends the sync task (a no-op when it is not running) and waits for it to end. Writes the
    /// relay has not confirmed stay queued, under the same ids, for the next `start`.
    pub async fn stop(&self) {
        let task = lock(&self.shared.task).take();
        if let Some(t) = task {
            let _ = t.stop.send(());
            let _ = t.handle.await;
        }
    }

    /// Pushes what is queued now instead of at the next tick (a no-op while disconnected).
    pub fn sync_now(&self) {
        self.shared.nudge.notify_one();
    }

    /// Stops sync and hands the device back (to sign out, which consumes it). Refused, with
    /// the client given back, while another handle of this client is alive.
    pub async fn into_device(self) -> std::result::Result<Device, Client> {
        self.stop().await;
        let Client { shared, _handles } = self;
        let last = match Arc::try_unwrap(_handles) {
            Ok(last) => last,
            Err(handles) => {
                return Err(Client {
                    shared,
                    _handles: handles,
                });
            }
        };
        drop(last);
        match Arc::try_unwrap(shared) {
            Ok(shared) => Ok(shared.core.into_inner().unwrap_or_else(|p| p.into_inner()).device),
            // Only a sync task could still hold it, and `stop` waited for it to end.
            Err(shared) => Err(Client {
                _handles: Arc::new(LastHandle(shared.clone())),
                shared,
            }),
        }
    }
}

impl Device {
    /// Opens the device in `dir` with the default schema, the system clock and a random number
    /// generator seeded by the operating system: what an app wants. [`Device::open`] takes
    /// both injected (tests, the simulator).
    ///
    /// (Here, in the shell, because the device library's core never reads the system clock or
    /// the operating system's randomness: the architecture test checks it.)
    pub fn open_default(dir: &std::path::Path) -> Result<Device> {
        Device::open(dir, Arc::new(fieldsync_schema::SystemTimeSource), os_rng()?)
    }
}

/// The random number generator an app's device uses: ChaCha20 seeded by the operating system
/// (for [`Device::open`] and [`Device::import`] outside tests).
pub fn os_rng() -> Result<DeviceRng> {
    use rand_core::SeedableRng;
    let rng = rand_chacha::ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| PeerError::Corrupt(format!("cannot seed the random number generator from the OS: {e}")))?;
    Ok(Box::new(rng))
}

/// A write being put together: fields by name, then [`Write::save`].
pub struct Write<'c> {
    client: &'c Client,
    entity_type: String,
    id: Option<Uuid>,
    fields: Map<String, Value>,
}

impl Write<'_> {
    /// Changes this record instead of creating one.
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }

    pub fn set(mut self, field: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(field.to_string(), value.into());
        self
    }

    /// Removes an optional field.
    pub fn clear(mut self, field: &str) -> Self {
        self.fields.insert(field.to_string(), Value::Null);
        self
    }

    /// Validates and writes locally (durable at once); the sync task pushes it.
    pub fn save(self) -> Result<WriteReceipt> {
        let Write {
            client,
            entity_type,
            id,
            fields,
        } = self;
        let receipt = client.with_device(|d| d.put(&entity_type, id, fields))?;
        client.shared.nudge.notify_one();
        Ok(receipt)
    }
}

impl Shared {
    /// Runs `f` under the lock, then tells listeners what changed, with the lock released.
    /// `status`: re-read the status whatever happened (an app's own write changes it; a sync
    /// step changes it only when the machine's summary moved or sync committed something).
    fn step<R>(&self, status: bool, f: impl FnOnce(&mut Device, &mut SyncMachine) -> R) -> R {
        let (result, events) = {
            let mut core = lock(&self.core);
            let Core { device, machine, .. } = &mut *core;
            let result = f(device, machine);
            (result, core.news(status))
        };
        for e in events {
            // No listener is not an error.
            let _ = self.events.send(e);
        }
        result
    }
}

impl Core {
    /// What listeners have not heard yet: sync's notices, and the status when it changed.
    fn news(&mut self, status: bool) -> Vec<ClientEvent> {
        let mut out: Vec<ClientEvent> = self
            .device
            .take_notices()
            .into_iter()
            .map(ClientEvent::Notice)
            .collect();
        let summary = self.machine.summary();
        // The status costs a few queries: read it only when something may have moved it.
        if !status && out.is_empty() && self.last_summary == Some(summary) && self.last_status.is_some() {
            return out;
        }
        self.last_summary = Some(summary);
        if let Ok(status) = self.device.status()
            && self.last_status.as_ref() != Some(&status)
        {
            self.last_status = Some(status.clone());
            out.push(ClientEvent::Status(Box::new(status)));
        }
        out
    }
}

/// The sync task's way to the device: the shared lock, per step.
struct SharedDrive(Arc<Shared>);

impl Drive for SharedDrive {
    fn step<R>(&mut self, f: impl FnOnce(&mut Device, &mut SyncMachine) -> R) -> R {
        self.0.step(false, f)
    }

    fn nudged(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let shared = self.0.clone();
        Box::pin(async move { shared.nudge.notified().await })
    }
}

/// The lock, even after a panic elsewhere poisoned it: the device's state is in SQLite, whose
/// transactions a panic rolls back, so what the mutex guards is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
