//! The object an app holds: one device directory, its sync task on a runtime this object
//! owns (the app never sees tokio), and listeners. Every method is safe to call from any
//! thread of the app's; none blocks on the network except `enroll`, `stop` and `sign_out`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use fieldsync_peer::{Client, DatabaseKey, Device};
use fieldsync_schema::{Schema, SystemTimeSource};

use crate::error::{FieldsyncError, Result};
use crate::listener::{self, SyncListener};
use crate::records::{
    Conflict, DiscardReport, Entity, ExportReport, FieldFilter, LwwLoss, OutboxItem, RejectedEdit, Resolution,
    RetryReport, SignOutReport, Status, WriteReceipt, parse_fields, parse_id,
};

#[derive(uniffi::Object)]
pub struct FieldsyncClient {
    dir: PathBuf,
    /// The database's at-rest key (`None`: plaintext), to open the device again after a
    /// refused sign-out; `rekey` replaces it.
    db_key: Mutex<Option<DatabaseKey>>,
    runtime: tokio::runtime::Runtime,
    /// `None` once closed or signed out.
    client: Mutex<Option<Client>>,
    /// Listener threads, joined when the client closes: no callback runs after `close`
    /// returns (an interpreter shutting down must not be called into).
    listeners: Mutex<Vec<JoinHandle<()>>>,
}

impl FieldsyncClient {
    fn around(dir: PathBuf, device: Device, db_key: Option<DatabaseKey>) -> Result<Arc<Self>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fieldsync-sync")
            .enable_all()
            .build()
            .map_err(|e| FieldsyncError::Storage {
                message: format!("cannot start the sync runtime: {e}"),
            })?;
        Ok(Arc::new(FieldsyncClient {
            dir,
            db_key: Mutex::new(db_key),
            runtime,
            client: Mutex::new(Some(Client::new(device))),
            listeners: Mutex::new(Vec::new()),
        }))
    }

    fn client(&self) -> Result<Client> {
        self.slot().clone().ok_or_else(|| FieldsyncError::NotAllowed {
            message: format!("the client of {} is closed; open it again", self.dir.display()),
        })
    }

    fn slot(&self) -> MutexGuard<'_, Option<Client>> {
        lock(&self.client)
    }

    /// After the last `Client` is gone its event channel closes: each listener delivers what
    /// was already sent, then ends. Waits for that, except from inside a callback (a listener
    /// thread cannot wait for itself; the others still end).
    fn join_listeners(&self) {
        let current = std::thread::current().id();
        let threads: Vec<JoinHandle<()>> = lock(&self.listeners).drain(..).collect();
        for thread in threads {
            if thread.thread().id() != current {
                let _ = thread.join();
            }
        }
    }

    /// A write through the device, then a nudge so sync pushes it now.
    fn write(
        &self,
        f: impl FnOnce(&mut Device) -> fieldsync_peer::Result<fieldsync_peer::WriteReceipt>,
    ) -> Result<WriteReceipt> {
        let client = self.client()?;
        let receipt = client.with_device(f)?;
        client.sync_now();
        Ok(receipt.into())
    }

    fn read<R>(&self, f: impl FnOnce(&mut Device) -> fieldsync_peer::Result<R>) -> Result<R> {
        Ok(self.client()?.with_device(f)?)
    }

    /// A change to what sync does (a fetch queued, what the device holds), then a nudge so the
    /// sync task acts on it now (a delivery change reconnects, a fetch goes out).
    fn steer<R>(&self, f: impl FnOnce(&mut Device) -> fieldsync_peer::Result<R>) -> Result<R> {
        let client = self.client()?;
        let answer = client.with_device(f)?;
        client.sync_now();
        Ok(answer)
    }
}

#[uniffi::export]
impl FieldsyncClient {
    /// Opens the device in `dir`, creating it on first use (default schema, system clock,
    /// OS-seeded randomness).
    #[uniffi::constructor]
    pub fn open(dir: String) -> Result<Arc<Self>> {
        let dir = PathBuf::from(dir);
        let device = Device::open_default(&dir)?;
        FieldsyncClient::around(dir, device, None)
    }

    /// Opens the device in `dir` encrypted at rest with `key_hex` (64 hex digits: 32 random
    /// bytes the app keeps in the platform keystore); a new device is created encrypted. A
    /// wrong key, or a plaintext device, is a `Key` error and opens nothing.
    #[uniffi::constructor]
    pub fn open_encrypted(dir: String, key_hex: String) -> Result<Arc<Self>> {
        let dir = PathBuf::from(dir);
        let key = parse_key(&key_hex)?;
        let device = open_device(&dir, Some(key.clone()))?;
        FieldsyncClient::around(dir, device, Some(key))
    }

    /// Restores a backup made by `export_backup` into `dir`, which must not hold a device.
    /// A backup of an encrypted device needs its key (`key_hex`), and stays encrypted.
    #[uniffi::constructor(default(key_hex = None))]
    pub fn import_backup(dir: String, file: String, key_hex: Option<String>) -> Result<Arc<Self>> {
        let dir = PathBuf::from(dir);
        let key = key_hex.as_deref().map(parse_key).transpose()?;
        let device = Device::import_keyed(
            &dir,
            std::path::Path::new(&file),
            Arc::new(SystemTimeSource),
            fieldsync_peer::os_rng()?,
            Arc::new(Schema::default_schema()),
            key.clone(),
        )?;
        FieldsyncClient::around(dir, device, key)
    }

    /// Encrypts a plaintext device with `new_key_hex`, or moves an encrypted one to it. Open
    /// it with the new key from then on.
    pub fn rekey(&self, new_key_hex: String) -> Result<()> {
        let key = parse_key(&new_key_hex)?;
        self.read(|d| d.rekey(key.clone()))?;
        *lock(&self.db_key) = Some(key);
        Ok(())
    }

    pub fn device_id(&self) -> Result<String> {
        self.read(|d| Ok(d.device_id().to_string()))
    }

    /// Enrolls the device with a relay (`ws://` or `wss://`), with a single-use token from
    /// its operator. Waits for the relay's answer.
    pub fn enroll(&self, relay_url: String, token: String) -> Result<Status> {
        let client = self.client()?;
        self.runtime.block_on(client.enroll(&relay_url, &token))?;
        Ok(client.status()?.into())
    }

    /// Creates a record (`entity_id` absent) or changes one; `fields_json` is a JSON object,
    /// `null` removes an optional field. Durable locally at once; sync pushes it.
    pub fn put(&self, entity_type: String, entity_id: Option<String>, fields_json: String) -> Result<WriteReceipt> {
        let id = entity_id.as_deref().map(parse_id).transpose()?;
        let fields = parse_fields(&fields_json)?;
        self.write(|d| d.put(&entity_type, id, fields))
    }

    pub fn get(&self, entity_id: String) -> Result<Option<Entity>> {
        let id = parse_id(&entity_id)?;
        Ok(self.read(|d| d.get(id))?.map(Entity::from))
    }

    /// Records of one type whose fields equal every filter's value, in id order.
    pub fn list(&self, entity_type: String, filters: Vec<FieldFilter>, include_deleted: bool) -> Result<Vec<Entity>> {
        let filters = filters.iter().map(FieldFilter::to_peer).collect::<Result<Vec<_>>>()?;
        let found = self.read(|d| d.list(&entity_type, &filters, include_deleted))?;
        Ok(found.into_iter().map(Entity::from).collect())
    }

    pub fn delete(&self, entity_type: String, entity_id: String) -> Result<WriteReceipt> {
        let id = parse_id(&entity_id)?;
        self.write(|d| d.delete(&entity_type, id))
    }

    /// Replaces the text of a note (merged character by character with concurrent edits).
    pub fn edit_note(&self, entity_id: String, text: String) -> Result<WriteReceipt> {
        let id = parse_id(&entity_id)?;
        self.write(|d| d.edit_note(id, &text))
    }

    /// Signs a note: from then on it never changes (an addendum adds to it).
    pub fn sign_note(&self, entity_id: String) -> Result<WriteReceipt> {
        let id = parse_id(&entity_id)?;
        self.write(|d| d.sign_note(id))
    }

    pub fn lock(&self, entity_type: String, entity_id: String) -> Result<WriteReceipt> {
        let id = parse_id(&entity_id)?;
        self.write(|d| d.lock(&entity_type, id))
    }

    /// Adds `by` to a counter field (concurrent increments add up).
    pub fn increment(&self, entity_type: String, entity_id: String, field: String, by: i64) -> Result<WriteReceipt> {
        let id = parse_id(&entity_id)?;
        self.write(|d| d.increment(&entity_type, id, &field, by))
    }

    pub fn status(&self) -> Result<Status> {
        Ok(self.client()?.status()?.into())
    }

    /// The relays this device syncs with, in the order it tries them.
    pub fn relays(&self) -> Result<Vec<String>> {
        self.read(|d| Ok(d.relay_urls()))
    }

    /// Replaces them with relays of the cluster the device enrolled with (after enrolling): the
    /// first one's refusal is final, the others are tried in order when it cannot be reached.
    /// Sync uses the new list from its next connection.
    pub fn set_relays(&self, urls: Vec<String>) -> Result<()> {
        self.read(|d| d.set_relays(&urls))
    }

    /// The entity types this device holds (selective sync); absent: every type.
    pub fn synced_types(&self) -> Result<Option<Vec<String>>> {
        self.read(|d| d.synced_types())
    }

    /// Holds only `types` from the next connection on (absent: every type again); the relay
    /// sends nothing of another type. Adding a type pulls its records at the next sync.
    pub fn set_synced_types(&self, types: Option<Vec<String>>) -> Result<()> {
        self.steer(|d| d.set_synced_types(types).map(|_| ()))
    }

    /// Tells the device whether it is on a metered link (from the platform's network monitor):
    /// while it is, reference data (`priority = "low"` types) waits; leaving it brings what
    /// waited at the next sync.
    pub fn set_metered(&self, metered: bool) -> Result<()> {
        self.steer(|d| d.set_metered(metered))
    }

    /// Whether the device syncs by windows (SPEC §16).
    pub fn windowed(&self) -> Result<bool> {
        self.read(|d| d.windowed())
    }

    /// Syncs by windows from the next connection on: a space's first download holds only
    /// records dated inside their type's window plus what they reference. Off: the next sync
    /// downloads everything.
    pub fn set_windowed(&self, on: bool) -> Result<()> {
        self.steer(|d| d.set_windowed(on))
    }

    /// Asks for a record the device does not hold (outside its window, or evicted); returns
    /// whether it is held already. Otherwise it is fetched with what it references at the next
    /// sync (works offline).
    pub fn fetch(&self, entity_type: String, id: String) -> Result<bool> {
        let id = parse_id(&id)?;
        self.steer(|d| d.fetch(&entity_type, id).map(|s| s == fieldsync_peer::FetchState::Held))
    }

    /// Removes records that left their window and are synced and settled (never one with
    /// unsynced changes, a conflict or a rejection, or referenced by a held record); returns
    /// how many.
    pub fn evict(&self) -> Result<u64> {
        self.read(|d| d.evict().map(|r| r.evicted))
    }

    /// The outbox: unconfirmed changes (and, with `include_applied`, confirmed ones).
    pub fn queue(&self, include_applied: bool) -> Result<Vec<OutboxItem>> {
        Ok(self
            .read(|d| d.queue(include_applied))?
            .into_iter()
            .map(OutboxItem::from)
            .collect())
    }

    /// Makes backing-off items due now (one, or all when `mutation_id` is absent).
    pub fn retry(&self, mutation_id: Option<String>) -> Result<RetryReport> {
        let id = mutation_id.as_deref().map(parse_id).transpose()?;
        let client = self.client()?;
        let report = client.with_device(|d| d.retry(id))?;
        client.sync_now();
        Ok(report.into())
    }

    pub fn conflicts(&self) -> Result<Vec<Conflict>> {
        Ok(self.read(|d| d.conflicts())?.into_iter().map(Conflict::from).collect())
    }

    pub fn resolve(&self, entity_id: String, resolution: Resolution) -> Result<WriteReceipt> {
        let id = parse_id(&entity_id)?;
        let resolution = resolution.to_peer()?;
        self.write(|d| d.resolve(id, resolution))
    }

    pub fn rejections(&self) -> Result<Vec<RejectedEdit>> {
        Ok(self
            .read(|d| d.rejections())?
            .into_iter()
            .map(RejectedEdit::from)
            .collect())
    }

    /// Drops a refused change (and those queued behind it for the same record).
    pub fn discard_rejection(&self, entity_id: String) -> Result<DiscardReport> {
        let id = parse_id(&entity_id)?;
        let client = self.client()?;
        let report = client.with_device(|d| d.discard_rejection(id))?;
        client.sync_now();
        Ok(report.into())
    }

    /// Turns a refused edit of a signed note into an addendum note.
    pub fn make_addendum(&self, note_id: String) -> Result<WriteReceipt> {
        let id = parse_id(&note_id)?;
        self.write(|d| d.make_addendum(id))
    }

    pub fn lww_losses(&self) -> Result<Vec<LwwLoss>> {
        Ok(self
            .read(|d| d.lww_loss_records())?
            .into_iter()
            .map(LwwLoss::from)
            .collect())
    }

    pub fn undo_lww_loss(&self, loss_id: u64) -> Result<WriteReceipt> {
        self.write(|d| d.undo_lww_loss(loss_id))
    }

    /// Writes a consistent copy of the device (records, outbox, identity) to `file`.
    pub fn export_backup(&self, file: String) -> Result<ExportReport> {
        Ok(self.read(|d| d.export(std::path::Path::new(&file)))?.into())
    }

    /// Wipes the device: refused while changes are unsynced, unless exported after the last
    /// write or `force`d. The client is closed after a sign-out, and stays usable after a
    /// refusal.
    pub fn sign_out(&self, force: bool) -> Result<SignOutReport> {
        let mut slot = self.slot();
        let client = slot.take().ok_or_else(|| FieldsyncError::NotAllowed {
            message: "the client is closed".into(),
        })?;
        let device = match self.runtime.block_on(client.into_device()) {
            Ok(device) => device,
            Err(client) => {
                *slot = Some(client);
                return Err(FieldsyncError::NotAllowed {
                    message: "another handle of this device is still in use".into(),
                });
            }
        };
        match device.sign_out(force) {
            Ok(report) => {
                drop(slot);
                self.join_listeners();
                Ok(report.into())
            }
            Err(refused) => {
                let key = lock(&self.db_key).clone();
                *slot = Some(Client::new(open_device(&self.dir, key)?));
                Err(refused.into())
            }
        }
    }

    /// Calls `listener` for every event from now on, on a thread of its own; add listeners
    /// before `start` to hear everything sync does.
    pub fn add_listener(&self, listener: Arc<dyn SyncListener>) -> Result<()> {
        let events = self.client()?.subscribe();
        let thread = listener::spawn(events, listener).map_err(|e| FieldsyncError::Storage {
            message: format!("cannot start a listener thread: {e}"),
        })?;
        lock(&self.listeners).push(thread);
        Ok(())
    }

    /// Starts syncing in the background with the relay the device enrolled with: live both
    /// ways, reconnecting with backoff.
    pub fn start(&self) -> Result<()> {
        let client = self.client()?;
        let _inside = self.runtime.enter();
        client.start()?;
        Ok(())
    }

    /// Stops syncing and waits for the task to end; unconfirmed changes stay queued.
    pub fn stop(&self) -> Result<()> {
        let client = self.client()?;
        self.runtime.block_on(client.stop());
        Ok(())
    }

    /// Pushes what is queued now instead of at the next tick.
    pub fn sync_now(&self) -> Result<()> {
        self.client()?.sync_now();
        Ok(())
    }

    /// Stops syncing and releases the device; returns once every listener has heard its last
    /// event. Open the directory again with `open`. Call it before the app exits.
    pub fn close(&self) {
        let client = self.slot().take();
        if let Some(client) = client {
            self.runtime.block_on(client.stop());
        }
        self.join_listeners();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Opens `dir` as an app does (default schema, system clock, OS-seeded randomness).
fn open_device(dir: &std::path::Path, key: Option<DatabaseKey>) -> Result<Device> {
    Ok(Device::open_keyed(
        dir,
        Arc::new(SystemTimeSource),
        fieldsync_peer::os_rng()?,
        Arc::new(Schema::default_schema()),
        key,
    )?)
}

fn parse_key(hex: &str) -> Result<DatabaseKey> {
    DatabaseKey::from_hex(hex).map_err(|e| FieldsyncError::Key { message: e.to_string() })
}
