//! `fieldsync-peer --data DIR <command>`: the device CLI.
//!
//! The only place that constructs the production clock and an OS-seeded RNG; everything else
//! takes them injected.

mod authority_cmd;
mod conflict_cmd;
mod net_cmd;
mod output;
mod windows_cmd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use fieldsync_peer::{DatabaseKey, Device, DeviceRng, FieldFilter};
use fieldsync_schema::outln;
use fieldsync_schema::{Schema, SystemTimeSource, TimeSource};
use rand_core::SeedableRng;
use serde_json::{Map, Value};
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(
    name = "fieldsync-peer",
    version,
    about = "An offline-first fieldsync device: local store, signed outbox"
)]
struct Cli {
    /// The device's data directory (holds device.db).
    #[arg(long, value_name = "DIR", global = true)]
    data: Option<PathBuf>,
    /// Validate against this schema file instead of the built-in default.
    #[arg(long, value_name = "FILE", global = true)]
    schema: Option<PathBuf>,
    /// The key the device's database is encrypted with at rest: a file holding 64 hex digits
    /// (`openssl rand -hex 32`). Or set FIELDSYNC_DB_KEY to the hex digits. A new device is
    /// created encrypted; an encrypted one does not open without its key.
    #[arg(long, value_name = "FILE", global = true)]
    db_key_file: Option<PathBuf>,
    #[command(flatten)]
    tls: net_cmd::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Creates the device (identity and key) if it does not exist yet.
    Init {
        #[arg(long)]
        json: bool,
    },
    /// Creates or updates an entity from a JSON object of fields; prints the id.
    Put {
        entity_type: String,
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Option<Uuid>,
        /// The fields to write, e.g. '{"name": "Ada"}' (null removes an optional field).
        #[arg(long = "json", value_name = "JSON")]
        fields: String,
        /// The space for a new entity, by name or id (default: the user's default space).
        #[arg(long)]
        space: Option<String>,
    },
    /// Shows one entity.
    Get {
        entity_type: String,
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Uuid,
        /// Writes the entity's Automerge document (standard binary format) to FILE.
        #[arg(long, value_name = "FILE")]
        save: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Lists the entities of a type, optionally filtered: --where field=value (repeatable).
    List {
        entity_type: String,
        #[arg(long = "where", value_name = "FIELD=VALUE")]
        filters: Vec<String>,
        /// Include deleted (tombstoned) entities.
        #[arg(long)]
        deleted: bool,
        #[arg(long)]
        json: bool,
    },
    /// Deletes (tombstones) an entity.
    Delete {
        entity_type: String,
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Replaces a note's text (edited in place, so concurrent edits merge).
    NoteEdit {
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Uuid,
        #[arg(long)]
        text: String,
        #[arg(long)]
        json: bool,
    },
    /// Signs a note as the enrolled user; it is read-only from then on.
    Sign {
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Locks a lockable record (e.g. an intake form); it is read-only from then on.
    Lock {
        entity_type: String,
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Adds N to a counter field.
    #[command(allow_negative_numbers = true)]
    Incr {
        entity_type: String,
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Uuid,
        field: String,
        by: i64,
        #[arg(long)]
        json: bool,
    },
    /// The schema's entity types: policy, who may write them, and every field (one type with
    /// TYPE). Needs no device.
    Schema {
        entity_type: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Device id, enrollment, unsynced count, last sync, state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The outbox: unsynced items in order, with state, attempts and errors.
    Queue {
        /// Include items the relay already confirmed.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Makes backing-off items due now (blocked items stay blocked until resolved).
    Retry {
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        mutation_id: Option<Uuid>,
        #[arg(long)]
        json: bool,
    },
    /// Writes a complete backup of the device to FILE.
    Export {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Restores a backup into a data dir that holds no device yet.
    Import {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Encrypts the device's database with a new key (a plaintext device), or moves an
    /// encrypted one (opened with --db-key-file) to the new key.
    Rekey {
        /// A file holding the new key (64 hex digits).
        #[arg(long, value_name = "FILE")]
        new_key_file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Wipes the device; refused while anything is unsynced unless exported first or --force.
    SignOut {
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Registers this device with a relay, using a single-use token from the relay operator.
    Enroll {
        /// The relay's address, e.g. ws://127.0.0.1:7070 (with --new-identity: the relay the
        /// device is enrolled with).
        #[arg(long, required_unless_present = "new_identity")]
        relay: Option<String>,
        #[arg(long)]
        token: String,
        /// A revoked device: enroll a fresh identity (the operator's new token) that takes over
        /// every change the relay has not confirmed, re-signed, same mutation ids.
        #[arg(long, conflicts_with = "relay")]
        new_identity: bool,
        /// Hold only these entity types (selective sync; `types` changes it later).
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        types: Option<Vec<String>>,
        /// Sync by windows from the first download on (`windows` changes it later).
        #[arg(long)]
        windows: bool,
        #[arg(long)]
        json: bool,
    },
    /// Sync windows: with --on, the first download of a space holds only records dated inside
    /// their type's window (the schema's `window`) plus what they reference; older ones come
    /// with `fetch`. --off downloads everything again at the next sync.
    Windows {
        #[arg(long, conflicts_with = "off")]
        on: bool,
        #[arg(long)]
        off: bool,
        /// Evict automatically after each sync once the device holds more than N records.
        #[arg(long, value_name = "N", conflicts_with_all = ["off", "no_auto_evict"])]
        evict_above: Option<u64>,
        /// Evict only when asked (`evict`).
        #[arg(long)]
        no_auto_evict: bool,
        #[arg(long)]
        json: bool,
    },
    /// Whether the device is on a metered link: --on defers reference data (types the schema
    /// marks `priority = "low"`) until --off, whose next sync brings what waited.
    Metered {
        #[arg(long, conflicts_with = "off")]
        on: bool,
        #[arg(long)]
        off: bool,
        #[arg(long)]
        json: bool,
    },
    /// Brings a record this device does not hold (outside its window, or evicted) and what it
    /// references; offline, it is queued and fetched at the next sync.
    Fetch {
        entity_type: String,
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Removes records that left their window and are synced, with no conflict or rejection on
    /// record and no held record referencing them (a device that syncs by windows); `fetch`
    /// brings one back.
    Evict {
        #[arg(long)]
        json: bool,
    },
    /// The relays this device syncs with, in the order it tries them; with --set, replaces
    /// them (relays of the cluster it enrolled with, e.g. ws://a:7070,ws://b:7070). The first
    /// one's refusal is final; the others are tried when it cannot be reached.
    Relays {
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        set: Option<Vec<String>>,
        #[arg(long)]
        json: bool,
    },
    /// The entity types this device holds (selective sync): the relay sends nothing of another
    /// type. --set a,b holds only those from the next sync on (adding a type pulls its
    /// records); --all holds every type again.
    Types {
        #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "all")]
        set: Option<Vec<String>>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Records the relay flagged as possible duplicates; --merge ID combines a flagged record
    /// with its match by field authority (the other becomes a tombstone naming the survivor),
    /// --dismiss ID keeps both.
    Duplicates {
        #[arg(long, value_parser = fieldsync_schema::cli::parse_uuid, conflicts_with = "dismiss")]
        merge: Option<Uuid>,
        #[arg(long, value_parser = fieldsync_schema::cli::parse_uuid)]
        dismiss: Option<Uuid>,
        #[arg(long)]
        json: bool,
    },
    /// Requests (e.g. plan_change_request) a service marked superseded, with its notice.
    Superseded {
        #[arg(long)]
        json: bool,
    },
    /// Marks a request superseded by a new version of what it asked to change (a service's write).
    Supersede {
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Uuid,
        /// The version that superseded it (e.g. the new plan_version).
        #[arg(long)]
        version: i64,
        /// What the user is told.
        #[arg(long)]
        notice: String,
        #[arg(long)]
        json: bool,
    },
    /// Syncs with the relay: pushes every queued change, pulls until caught up, prints a summary.
    Sync {
        /// Stay connected: live changes both ways, reconnecting with backoff, until Ctrl-C.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Unresolved conflicts (three-way, field by field) and changes the relay refused; with
    /// --lww, the last-writer-wins values this device lost and until when they can be undone.
    Conflicts {
        #[arg(long)]
        lww: bool,
        #[arg(long)]
        json: bool,
    },
    /// Resolves the conflict or refused change of one record; the outbox then moves on.
    #[command(group(clap::ArgGroup::new("how").required(true).args(["keep", "merged", "discard", "addendum"])))]
    Resolve {
        entity_type: String,
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        id: Uuid,
        /// Take every field (and the deletion) from one side.
        #[arg(long, value_enum)]
        keep: Option<conflict_cmd::Keep>,
        /// Per-field merge: the relay's version with these fields replaced, e.g.
        /// '{"notes": "both"}' (null removes a field, "_deleted": true|false the deletion).
        #[arg(long = "json", value_name = "MERGED")]
        merged: Option<String>,
        /// Drop a refused change for good (or a signature made on an older version).
        #[arg(long)]
        discard: bool,
        /// Turn a refused edit of a signed note into an addendum (a new linked note); prints its id.
        #[arg(long)]
        addendum: bool,
    },
    /// Re-applies a last-writer-wins value this device lost (within 24 hours; see `conflicts --lww`).
    Undo {
        loss_id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Test and benchmark helper: N patient creates in a row, one line per committed write.
    #[command(hide = true)]
    Burst {
        #[arg(long, default_value_t = 1000)]
        count: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `put` and `resolve` take `--json FIELDS` as input; every other `--json` asks for JSON
    // output, errors included.
    let json_output = !matches!(cli.command, Command::Put { .. } | Command::Resolve { .. })
        && std::env::args().any(|a| a == "--json");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader (`| grep -q x`) had what it wanted.
        Err(e) if fieldsync_schema::cli::is_closed_pipe(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            fieldsync_schema::cli::report_error(&format!("{e:#}"), error_kind(&e), json_output);
            ExitCode::FAILURE
        }
    }
}

/// The `kind` of a `--json` error: what a script can branch on.
fn error_kind(e: &anyhow::Error) -> &'static str {
    use fieldsync_peer::PeerError;
    for cause in e.chain() {
        if let Some(p) = cause.downcast_ref::<PeerError>() {
            return match p {
                PeerError::Invalid { .. } => "invalid",
                PeerError::Refused { .. } | PeerError::NotAllowed(_) | PeerError::SignOutRefused(_) => "refused",
                PeerError::NotFound { .. } | PeerError::NoSuchMutation(_) => "not_found",
                PeerError::UnknownType { .. } | PeerError::WrongType { .. } => "unknown_type",
                PeerError::BadRelayAddress(_) => "invalid",
                PeerError::AlreadyExists { .. } => "already_exists",
                PeerError::Resolution(_) => "resolution",
                PeerError::StorageFull(_) => "storage_full",
                PeerError::Wiped { .. } => "wiped",
                PeerError::Corrupt(_) | PeerError::Doc(_) => "corrupt",
                PeerError::Key(_) => "key",
                PeerError::Db(_) | PeerError::Io { .. } | PeerError::Backup(_) | PeerError::Schema(_) => "storage",
            };
        }
        if cause.is::<fieldsync_schema::sqlite_key::KeyError>() {
            return "key";
        }
        if let Some(n) = cause.downcast_ref::<fieldsync_peer::net::NetError>() {
            return if n.is_retryable() { "network" } else { "relay_refused" };
        }
    }
    "error"
}

fn production_rng() -> Result<DeviceRng> {
    let rng = rand_chacha::ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| anyhow!("cannot seed the random number generator from the OS: {e}"))?;
    Ok(Box::new(rng))
}

fn clock() -> Arc<dyn TimeSource> {
    Arc::new(SystemTimeSource)
}

fn load_schema(path: Option<&Path>) -> Result<Arc<Schema>> {
    Ok(Arc::new(Schema::load(path)?))
}

/// A write on a revoked device is kept, but cannot sync: say so, and what brings it back.
fn warn_if_revoked(dev: &Device) {
    if dev.is_revoked().unwrap_or(false) {
        eprintln!(
            "warning: this device is revoked: the change is kept here but cannot sync; with a new token from \
             the relay's operator, `enroll --new-identity --token TOKEN` moves every unsynced change to a new identity"
        );
    }
}

/// The at-rest key: `--db-key-file`, else `FIELDSYNC_DB_KEY`, else none (a plaintext device).
fn db_key(file: Option<&Path>) -> Result<Option<DatabaseKey>> {
    if let Some(file) = file {
        return Ok(Some(DatabaseKey::from_file(file)?));
    }
    match std::env::var("FIELDSYNC_DB_KEY") {
        Ok(hex) if !hex.trim().is_empty() => Ok(Some(DatabaseKey::from_hex(&hex).context("FIELDSYNC_DB_KEY")?)),
        _ => Ok(None),
    }
}

fn open_existing(dir: &Path, schema: Arc<Schema>, key: Option<&DatabaseKey>) -> Result<Device> {
    if !Device::exists(dir) {
        bail!(
            "no device in {}; run `fieldsync-peer --data {} init` first (or `import` a backup)",
            dir.display(),
            dir.display()
        );
    }
    Ok(Device::open_keyed(
        dir,
        clock(),
        production_rng()?,
        schema,
        key.cloned(),
    )?)
}

fn parse_fields(json: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(json).context("--json is not valid JSON")? {
        Value::Object(m) => Ok(m),
        other => bail!("--json must be a JSON object of fields, got {other}"),
    }
}

fn parse_filter(s: &str) -> Result<FieldFilter> {
    let (field, value) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--where expects FIELD=VALUE, got `{s}`"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok(FieldFilter {
        field: field.trim().to_string(),
        value,
    })
}

/// Prints the schema, or one type of it.
fn print_schema(schema: &Schema, only: Option<&str>, json: bool) -> Result<()> {
    let listing = fieldsync_schema::cli::schema_listing(schema, only, json).map_err(|e| anyhow!(e))?;
    outln!("{listing}")?;
    Ok(())
}

/// A space named by the user: one of the device's spaces, by name or id.
fn resolve_space(dev: &Device, given: &str) -> Result<Uuid> {
    let spaces = dev.enrollment().map(|e| e.user.spaces.clone()).unwrap_or_default();
    if let Some(s) = spaces
        .iter()
        .find(|s| s.name == given || s.space_id.to_string() == given.trim())
    {
        return Ok(s.space_id);
    }
    if spaces.is_empty() {
        bail!("--space `{given}`: this device is not enrolled, so it has no spaces yet");
    }
    let names: Vec<&str> = spaces.iter().map(|s| s.name.as_str()).collect();
    let hint = fieldsync_schema::cli::did_you_mean(given, names.iter().copied());
    bail!(
        "no space `{given}` on this device: {hint}its spaces: {}",
        names.join(", ")
    )
}

fn run(cli: Cli) -> Result<()> {
    let schema = load_schema(cli.schema.as_deref())?;
    if let Command::Schema { entity_type, json } = &cli.command {
        return print_schema(&schema, entity_type.as_deref(), *json);
    }
    let dir = cli
        .data
        .clone()
        .ok_or_else(|| anyhow!("--data DIR is required (the device's data directory)"))?;
    let tls = cli.tls;
    let key = db_key(cli.db_key_file.as_deref())?;
    let key = key.as_ref();
    match cli.command {
        Command::Init { json } => {
            let existed = Device::exists(&dir);
            let dev = Device::open_keyed(&dir, clock(), production_rng()?, schema, key.cloned())?;
            output::init(&dev, existed, json)
        }
        Command::Put {
            entity_type,
            id,
            fields,
            space,
        } => {
            let mut dev = open_existing(&dir, schema, key)?;
            let space = space.map(|s| resolve_space(&dev, &s)).transpose()?;
            let r = dev.put_in_space(space, &entity_type, id, parse_fields(&fields)?)?;
            warn_if_revoked(&dev);
            outln!("{}", r.entity_id)?;
            Ok(())
        }
        Command::Get {
            entity_type,
            id,
            save,
            json,
        } => {
            let dev = open_existing(&dir, schema, key)?;
            let e = dev.get_typed(&entity_type, id)?;
            if let Some(file) = save {
                let bytes = dev.document_bytes(id)?;
                std::fs::write(&file, bytes).with_context(|| format!("writing {}", file.display()))?;
            }
            output::entity(&e, json)
        }
        Command::List {
            entity_type,
            filters,
            deleted,
            json,
        } => {
            let dev = open_existing(&dir, schema, key)?;
            let filters = filters.iter().map(|f| parse_filter(f)).collect::<Result<Vec<_>>>()?;
            output::list(&dev.list(&entity_type, &filters, deleted)?, json)
        }
        Command::Delete { entity_type, id, json } => {
            let mut dev = open_existing(&dir, schema, key)?;
            let receipt = dev.delete(&entity_type, id)?;
            warn_if_revoked(&dev);
            output::receipt(&receipt, "deleted", json)
        }
        Command::NoteEdit { id, text, json } => {
            let mut dev = open_existing(&dir, schema, key)?;
            let receipt = dev.edit_note(id, &text)?;
            warn_if_revoked(&dev);
            output::receipt(&receipt, "edited", json)
        }
        Command::Sign { id, json } => {
            let mut dev = open_existing(&dir, schema, key)?;
            let receipt = dev.sign_note(id)?;
            warn_if_revoked(&dev);
            output::receipt(&receipt, "signed", json)
        }
        Command::Lock { entity_type, id, json } => {
            let mut dev = open_existing(&dir, schema, key)?;
            let receipt = dev.lock(&entity_type, id)?;
            warn_if_revoked(&dev);
            output::receipt(&receipt, "locked", json)
        }
        Command::Incr {
            entity_type,
            id,
            field,
            by,
            json,
        } => {
            let mut dev = open_existing(&dir, schema, key)?;
            let receipt = dev.increment(&entity_type, id, &field, by)?;
            warn_if_revoked(&dev);
            output::receipt(&receipt, "incremented", json)
        }
        Command::Schema { entity_type, json } => print_schema(&schema, entity_type.as_deref(), json),
        Command::Status { json } => output::status(&open_existing(&dir, schema, key)?.status()?, json),
        Command::Queue { all, json } => output::queue(&open_existing(&dir, schema, key)?.queue(all)?, json),
        Command::Retry { mutation_id, json } => {
            let mut dev = open_existing(&dir, schema, key)?;
            output::retry(&dev.retry(mutation_id)?, json)
        }
        Command::Export { file, json } => {
            let mut dev = open_existing(&dir, schema, key)?;
            output::export(&dev.export(&file)?, json)
        }
        Command::Import { file, json } => {
            let dev = Device::import_keyed(&dir, &file, clock(), production_rng()?, schema, key.cloned())?;
            output::import(&dev, json)
        }
        Command::Rekey { new_key_file, json } => {
            let new = DatabaseKey::from_file(&new_key_file)?;
            let mut dev = open_existing(&dir, schema, key)?;
            output::rekey(&dev.rekey(new)?, json)
        }
        Command::SignOut { force, json } => {
            let dev = open_existing(&dir, schema, key)?;
            output::sign_out(&dev.sign_out(force)?, json)
        }
        Command::Enroll {
            relay,
            token,
            new_identity,
            types,
            windows,
            json,
        } => {
            let mut dev = open_existing(&dir, schema, key)?;
            if types.is_some() {
                // Chosen before the first sync, so nothing of another type is ever pulled.
                dev.set_synced_types(types)?;
            }
            if windows {
                dev.set_windowed(true)?;
            }
            match relay {
                Some(relay) if !new_identity => net_cmd::enroll(dev, &relay, &token, &tls, json),
                _ => net_cmd::enroll_new_identity(dev, &token, &tls, json),
            }
        }
        Command::Duplicates { merge, dismiss, json } => {
            authority_cmd::duplicates(&mut open_existing(&dir, schema, key)?, merge, dismiss, json)
        }
        Command::Superseded { json } => authority_cmd::superseded(&open_existing(&dir, schema, key)?, json),
        Command::Supersede {
            id,
            version,
            notice,
            json,
        } => {
            let mut dev = open_existing(&dir, schema, key)?;
            output::receipt(&dev.supersede_request(id, version, &notice)?, "superseded", json)
        }
        Command::Types { set, all, json } => {
            let mut dev = open_existing(&dir, schema, key)?;
            let report = match (set, all) {
                (Some(types), _) => Some(dev.set_synced_types(Some(types))?),
                (None, true) => Some(dev.set_synced_types(None)?),
                (None, false) => None,
            };
            let types = dev.synced_types()?;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "types": types, "pull_again": report.is_some_and(|r| r.pull_again) })
                )?;
            } else {
                match &types {
                    Some(t) => outln!("holds: {}", t.join(", "))?,
                    None => outln!("holds: every type")?,
                }
                if report.is_some_and(|r| r.pull_again) {
                    outln!("the next sync pulls the added types' records")?;
                }
            }
            Ok(())
        }
        Command::Windows {
            on,
            off,
            evict_above,
            no_auto_evict,
            json,
        } => {
            let mut dev = open_existing(&dir, schema, key)?;
            if on || off {
                dev.set_windowed(on)?;
            }
            if evict_above.is_some() || no_auto_evict {
                dev.set_eviction_bound(evict_above)?;
            }
            windows_cmd::windows(&dev, off, json)
        }
        Command::Metered { on, off, json } => {
            let mut dev = open_existing(&dir, schema, key)?;
            if on || off {
                dev.set_metered(on)?;
            }
            let deferred = dev.deferred_types()?;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "metered": dev.metered()?, "deferred_types": deferred })
                )?;
            } else if dev.metered()? {
                outln!("metered: {} wait for an unmetered link", deferred.join(", "))?;
            } else {
                outln!("not metered: every type syncs")?;
            }
            Ok(())
        }
        Command::Fetch { entity_type, id, json } => {
            windows_cmd::fetch(open_existing(&dir, schema, key)?, &entity_type, id, &tls, json)
        }
        Command::Evict { json } => windows_cmd::evict(&mut open_existing(&dir, schema, key)?, json),
        Command::Relays { set, json } => {
            let mut dev = open_existing(&dir, schema, key)?;
            if let Some(urls) = set {
                dev.set_relays(&urls)?;
            }
            let urls = dev.relay_urls();
            if json {
                outln!("{}", serde_json::json!({ "relays": urls }))?;
            } else if urls.is_empty() {
                outln!("not enrolled: no relay yet")?;
            } else {
                outln!("{}", urls.join("\n"))?;
            }
            Ok(())
        }
        Command::Sync { watch, json } => net_cmd::sync(open_existing(&dir, schema, key)?, watch, &tls, json),
        Command::Conflicts { lww, json } => conflict_cmd::conflicts(&open_existing(&dir, schema, key)?, lww, json),
        Command::Resolve {
            entity_type,
            id,
            keep,
            merged,
            discard,
            addendum,
        } => {
            let mut dev = open_existing(&dir, schema, key)?;
            let action = match (keep, merged) {
                (Some(k), _) => conflict_cmd::Action::Keep(k),
                (None, Some(m)) => conflict_cmd::Action::Merged(m),
                (None, None) if addendum => conflict_cmd::Action::Addendum,
                (None, None) if discard => conflict_cmd::Action::Discard,
                (None, None) => bail!("say how to resolve: --keep mine|theirs, --json MERGED, --discard or --addendum"),
            };
            conflict_cmd::resolve(&mut dev, &entity_type, id, action)
        }
        Command::Undo { loss_id, json } => conflict_cmd::undo(&mut open_existing(&dir, schema, key)?, loss_id, json),
        Command::Burst { count } => {
            let mut dev = open_existing(&dir, schema, key)?;
            let stdout = std::io::stdout();
            for i in 0..count {
                let mut fields = Map::new();
                fields.insert("name".into(), Value::String(format!("burst {i}")));
                let r = dev.put("patient", None, fields)?;
                let mut out = stdout.lock();
                writeln!(out, "committed {}", r.entity_id)?;
                out.flush()?;
            }
            Ok(())
        }
    }
}
