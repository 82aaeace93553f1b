//! `fieldsync-relay admin --data DIR ...` (or `--store postgres://...`): spaces, users and
//! roles, enrollment tokens, devices; the audit, conflict and statistics reports are in
//! `admin_report`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use fieldsync_relay::admin;
use fieldsync_relay::store::postgres::{PgBackend, redact};
use fieldsync_relay::store::sqlite::{DB_FILE, SqliteBackend, SqliteDirectory};
use fieldsync_relay::store::{Backend, Directory};
use fieldsync_schema::outln;
use fieldsync_schema::time_fmt::render_ms;
use fieldsync_schema::{Role, SystemTimeSource, TimeSource};
use serde_json::json;
use uuid::Uuid;

use crate::admin_report;

#[derive(Args)]
pub struct AdminArgs {
    /// The relay's data directory (its SQLite store).
    #[arg(long, required_unless_present = "store", conflicts_with = "store")]
    data: Option<PathBuf>,
    /// The relay's PostgreSQL store (`postgres://USER@HOST:PORT/DB`), shared by its relays.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Spaces (tenants: a clinic, a team, one person's account).
    #[command(subcommand)]
    Space(SpaceCommand),
    /// Users and their roles in spaces.
    #[command(subcommand)]
    User(UserCommand),
    /// Print a single-use enrollment token for a user (valid 24 hours unless told otherwise).
    Enroll {
        user: String,
        /// How long the single-use token stays valid, 1–720 hours (30 days): a token is a
        /// credential, so it never lives forever.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=720))]
        valid_hours: u64,
        /// A name for the device this token enrolls, shown in `device list` ("Dana's iPad").
        #[arg(long)]
        label: Option<String>,
    },
    /// Enrollment tokens (stored hashed: listed by id, never by value).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// The hash-chained audit log.
    #[command(subcommand)]
    Audit(admin_report::AuditCommand),
    /// The conflict archive: every losing version (LWW losers, resolution losers), newest first.
    Conflicts(admin_report::ConflictArgs),
    /// Counts of everything in the database.
    Stats,
}

#[derive(Subcommand)]
enum SpaceCommand {
    /// Create a space.
    Add { name: String },
    /// List spaces.
    List,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user (if needed) and give them a role in a space.
    Add {
        name: String,
        #[arg(long)]
        space: String,
        /// admin, clinician, assistant, patient or service.
        #[arg(long)]
        role: String,
    },
    /// Change the role of a member of a space.
    Role {
        name: String,
        #[arg(long)]
        space: String,
        #[arg(long)]
        role: String,
    },
    /// Remove a user from a space (their devices stop seeing it within a second).
    Remove {
        name: String,
        #[arg(long)]
        space: String,
    },
    /// List users with their spaces and roles.
    List,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// List enrollment tokens with their user, expiry and state.
    List,
    /// Expire an unused token now (by id from `token list`, or the token itself).
    Expire { token: String },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List devices with their user, enrollment, last seen and revocation.
    List,
    /// Revoke a device: its open connections close within a second, new ones are refused.
    Revoke {
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        device: Uuid,
        /// Also erase the device's local data at its next contact (a lost or stolen device);
        /// it reports how many unsynced changes it discarded, shown in `device list`. Works on
        /// an already revoked device too.
        #[arg(long)]
        wipe: bool,
    },
    /// Name a device for people ("Dana's iPad"), shown in `device list`.
    Label {
        #[arg(value_parser = fieldsync_schema::cli::parse_uuid)]
        device: Uuid,
        label: String,
    },
}

/// The store of `data` and a handle on its directory. Never creates a store (a typo in the path
/// must not make an empty relay) and never migrates one (a relay may be serving it).
pub(crate) fn open(data: &std::path::Path) -> anyhow::Result<(SqliteBackend, SqliteDirectory)> {
    if !data.join(DB_FILE).exists() {
        bail!(
            "no relay database in {} (start the relay once with `fieldsync-relay serve --data {}`, or check the path)",
            data.display(),
            data.display()
        );
    }
    let backend = SqliteBackend::open_current_keyed(data, crate::db_key().cloned())
        .with_context(|| format!("cannot open {}", data.display()))?;
    let directory = backend
        .open_directory()
        .with_context(|| format!("cannot open {}", data.display()))?;
    Ok((backend, directory))
}

pub(crate) fn print(json: bool, value: serde_json::Value, text: String) -> std::io::Result<()> {
    if json { outln!("{value}") } else { outln!("{text}") }
}

fn lines_or(lines: Vec<String>, empty: &str) -> String {
    if lines.is_empty() {
        empty.to_string()
    } else {
        lines.join("\n")
    }
}

fn parse_role(role: &str) -> anyhow::Result<Role> {
    role.parse().map_err(anyhow::Error::msg)
}

pub fn run(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let json = args.json;
    match (&args.store, &args.data) {
        (Some(url), _) => {
            let (backend, store) = open_postgres(url)?;
            run_on(&backend, store, args.command, json, |report| match report {
                Report::Stats => admin_report::counts_only(&backend, json),
                Report::Export { .. } | Report::Conflicts(_) => bail!(
                    "`audit export` and `conflicts` read a SQLite store's files; on PostgreSQL query the `audit` and \
                     `conflict_archive` tables (psql), or run `audit verify` and `stats`"
                ),
            })
        }
        (None, Some(data)) => {
            let (backend, store) = open(data)?;
            run_on(&backend, store, args.command, json, |report| match report {
                Report::Stats => admin_report::stats(&backend, json),
                Report::Export { space, since } => admin_report::audit_export(&backend, space, since),
                Report::Conflicts(args) => admin_report::conflicts(&backend, args, json),
            })
        }
        (None, None) => bail!("say which store: --data DIR (SQLite) or --store postgres://... (PostgreSQL)"),
    }
}

/// The PostgreSQL store at `url` and a handle on its directory; never creates one.
pub(crate) fn open_postgres(url: &str) -> anyhow::Result<(PgBackend, fieldsync_relay::store::postgres::PgDirectory)> {
    let backend = PgBackend::open_existing(url).with_context(|| format!("cannot open the store at {}", redact(url)))?;
    let directory = backend
        .open_directory()
        .with_context(|| format!("cannot open the store at {}", redact(url)))?;
    Ok((backend, directory))
}

/// The reports each store answers its own way (`run_on`'s `reports`).
enum Report {
    Stats,
    Export {
        space: Option<String>,
        since: Option<String>,
    },
    Conflicts(admin_report::ConflictArgs),
}

/// The commands every store answers the same way; `reports` answers the rest.
fn run_on<B: Backend>(
    backend: &B,
    mut store: B::Directory,
    command: AdminCommand,
    json: bool,
    reports: impl FnOnce(Report) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let now = SystemTimeSource.now_ms();
    let mut rng = crate::os_rng()?;
    match command {
        AdminCommand::Space(SpaceCommand::Add { name }) => {
            let s = admin::add_space(&mut store, &name, now, &mut rng)?;
            print(json, json!(s), format!("space {} created ({})", s.name, s.space_id))?;
        }
        AdminCommand::Space(SpaceCommand::List) => {
            let spaces = store.spaces()?;
            let lines = spaces
                .iter()
                .map(|s| format!("{}  {}  (shard {})", s.space_id, s.name, s.shard))
                .collect();
            print(json, json!(spaces), lines_or(lines, "no spaces"))?;
        }
        AdminCommand::User(UserCommand::Add { name, space, role }) => {
            let role = parse_role(&role)?;
            let u = admin::add_user(&mut store, &name, &space, role, now, &mut rng)?;
            print(
                json,
                json!({"user_id": u.user_id, "name": u.name, "space": space, "role": role}),
                format!("user {} is {} in {} ({})", u.name, role, space, u.user_id),
            )?;
        }
        AdminCommand::User(UserCommand::Role { name, space, role }) => {
            let role = parse_role(&role)?;
            let before = admin::change_role(&mut store, &name, &space, role)?;
            print(
                json,
                json!({"name": name, "space": space, "role": role, "previous_role": before}),
                format!("{name} is now {role} in {space} (was {before})"),
            )?;
        }
        AdminCommand::User(UserCommand::Remove { name, space }) => {
            admin::remove_member(&mut store, &name, &space)?;
            print(
                json,
                json!({"name": name, "space": space, "removed": true}),
                format!("{name} removed from {space}"),
            )?;
        }
        AdminCommand::User(UserCommand::List) => {
            let mut rows = Vec::new();
            let mut lines = Vec::new();
            for u in store.users()? {
                let m = store.memberships(u.user_id)?;
                let roles: Vec<String> = m.iter().map(|m| format!("{}:{}", m.space_name, m.role)).collect();
                lines.push(format!("{}  {}  {}", u.user_id, u.name, roles.join(", ")));
                rows.push(json!({"user_id": u.user_id, "name": u.name, "memberships": m}));
            }
            print(json, json!(rows), lines_or(lines, "no users"))?;
        }
        AdminCommand::Enroll {
            user,
            valid_hours,
            label,
        } => {
            let ttl = valid_hours.saturating_mul(3_600_000);
            let (token, expires) = match &label {
                Some(label) => admin::create_labelled_enrollment_token(&mut store, &user, label, ttl, now, &mut rng)?,
                None => admin::create_enrollment_token(&mut store, &user, ttl, now, &mut rng)?,
            };
            print(
                json,
                json!({"token": token, "user": user, "expires_at": render_ms(expires)}),
                format!("{token}\n(single use, for {user}, valid until {})", render_ms(expires)),
            )?;
        }
        AdminCommand::Token(TokenCommand::List) => token_list(&store, now, json)?,
        AdminCommand::Token(TokenCommand::Expire { token }) => {
            let id = admin::expire_token(&mut store, &token, now)?;
            print(
                json,
                json!({"token_id": id, "expired": true}),
                format!("token {id} expired"),
            )?;
        }
        AdminCommand::Device(DeviceCommand::List) => device_list(&store, json)?,
        AdminCommand::Device(DeviceCommand::Label { device, label }) => {
            admin::label_device(&mut store, device, &label)?;
            print(
                json,
                json!({"device_id": device, "label": label.trim()}),
                format!("device {device} is now \"{}\"", label.trim()),
            )?;
        }
        AdminCommand::Device(DeviceCommand::Revoke { device, wipe: false }) => {
            admin::revoke_device(&mut store, device, now)?;
            print(
                json,
                json!({"device_id": device, "revoked": true}),
                format!("device {device} revoked; its open connections close within a second"),
            )?;
        }
        AdminCommand::Device(DeviceCommand::Revoke { device, wipe: true }) => {
            let done = admin::revoke_and_wipe(&mut store, device, now)?;
            let text = match done {
                admin::WipeRequest::RevokedWithWipe => format!(
                    "device {device} revoked; it erases its local data at its next contact (`device list` shows when it did)"
                ),
                admin::WipeRequest::WipeAdded => format!(
                    "device {device} was already revoked; it erases its local data at its next contact (`device list` shows when it did)"
                ),
            };
            print(
                json,
                json!({"device_id": device, "revoked": true, "wipe": "pending"}),
                text,
            )?;
        }
        AdminCommand::Audit(admin_report::AuditCommand::Verify) => return admin_report::audit_verify(backend, json),
        AdminCommand::Audit(admin_report::AuditCommand::Export { space, since }) => {
            reports(Report::Export { space, since })?
        }
        AdminCommand::Conflicts(args) => reports(Report::Conflicts(args))?,
        AdminCommand::Stats => reports(Report::Stats)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn user_name(store: &impl Directory, user_id: Uuid) -> anyhow::Result<String> {
    Ok(store.user(user_id)?.map(|u| u.name).unwrap_or_default())
}

fn token_list(store: &impl Directory, now: u64, json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    for t in store.tokens()? {
        let id = admin::token_id(&t.token_hash);
        let user = user_name(store, t.user_id)?;
        let state = match (t.used_ms, t.expires_ms <= now) {
            (Some(_), _) => "used",
            (None, true) => "expired",
            (None, false) => "active",
        };
        lines.push(format!(
            "{id}  {user}  {state}  created {}  expires {}{}",
            render_ms(t.created_ms),
            render_ms(t.expires_ms),
            t.used_by.map(|d| format!("  used by {d}")).unwrap_or_default()
        ));
        rows.push(json!({
            "token_id": id,
            "user": user,
            "user_id": t.user_id,
            "state": state,
            "created_at": render_ms(t.created_ms),
            "expires_at": render_ms(t.expires_ms),
            "used_at": t.used_ms.map(render_ms),
            "used_by": t.used_by,
        }));
    }
    print(json, json!(rows), lines_or(lines, "no tokens"))?;
    Ok(())
}

fn device_list(store: &impl Directory, json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    for d in store.devices()? {
        let user = user_name(store, d.user_id)?;
        let state = match (d.revoked_ms, d.wipe_requested_ms, d.wiped_ms) {
            (_, _, Some(w)) => format!(
                "wiped {} ({} unsynced changes discarded)",
                render_ms(w),
                d.wipe_discarded.unwrap_or(0)
            ),
            (Some(t), Some(_), None) => format!("revoked {}, wipe pending", render_ms(t)),
            (Some(t), None, _) => format!("revoked {}", render_ms(t)),
            (None, ..) => "active".to_string(),
        };
        let seen = d.last_seen_ms.map(render_ms).unwrap_or_else(|| "never".into());
        let label = d.label.as_deref().map(|l| format!("  \"{l}\"")).unwrap_or_default();
        let replaces = d
            .replaces
            .map(|old| format!("  (new identity of revoked {old})"))
            .unwrap_or_default();
        lines.push(format!(
            "{}{label}  {}  enrolled {}  last seen {}  {}{replaces}",
            d.device_id,
            user,
            render_ms(d.enrolled_ms),
            seen,
            state
        ));
        rows.push(json!({
            "device_id": d.device_id,
            "label": d.label,
            "user": user,
            "user_id": d.user_id,
            "enrolled_at": render_ms(d.enrolled_ms),
            "last_seen_at": d.last_seen_ms.map(render_ms),
            "revoked_at": d.revoked_ms.map(render_ms),
            "wipe_requested_at": d.wipe_requested_ms.map(render_ms),
            "wiped_at": d.wiped_ms.map(render_ms),
            "wipe_discarded": d.wipe_discarded,
            "replaces": d.replaces,
        }));
    }
    print(json, json!(rows), lines_or(lines, "no devices"))?;
    Ok(())
}
