//! `fieldsync-relay admin --data DIR ...`: spaces, users and roles, enrollment, devices.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use fieldsync_relay::admin;
use fieldsync_relay::store::Store;
use fieldsync_relay::store::sqlite::{DB_FILE, SqliteStore};
use fieldsync_schema::time_fmt::render_ms;
use fieldsync_schema::{Role, SystemTimeSource, TimeSource, ids};
use serde_json::json;
use uuid::Uuid;

#[derive(Args)]
pub struct AdminArgs {
    /// The relay's data directory.
    #[arg(long)]
    data: PathBuf,
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
        #[arg(long, default_value_t = 24)]
        valid_hours: u64,
    },
    /// Enrolled devices.
    #[command(subcommand)]
    Device(DeviceCommand),
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
    /// List users with their spaces and roles.
    List,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List devices with their user, enrollment, last seen and revocation.
    List,
    /// Revoke a device: its open connections close within a second, new ones are refused.
    Revoke { device: Uuid },
}

fn open(data: &std::path::Path) -> anyhow::Result<SqliteStore> {
    if !data.join(DB_FILE).exists() {
        bail!(
            "no relay database in {} (start the relay once with `fieldsync-relay serve --data {}`, or check the path)",
            data.display(),
            data.display()
        );
    }
    let mut rng = crate::os_rng()?;
    SqliteStore::open_dir(data, ids::new_uuid(&mut rng)).with_context(|| format!("cannot open {}", data.display()))
}

fn print(json: bool, value: serde_json::Value, text: String) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let mut store = open(&args.data)?;
    let now = SystemTimeSource.now_ms();
    let mut rng = crate::os_rng()?;
    let json = args.json;
    match args.command {
        AdminCommand::Space(SpaceCommand::Add { name }) => {
            let s = admin::add_space(&mut store, &name, now, &mut rng)?;
            print(json, json!(s), format!("space {} created ({})", s.name, s.space_id));
        }
        AdminCommand::Space(SpaceCommand::List) => {
            let spaces = store.spaces()?;
            let text = spaces
                .iter()
                .map(|s| format!("{}  {}", s.space_id, s.name))
                .collect::<Vec<_>>()
                .join("\n");
            print(json, json!(spaces), text);
        }
        AdminCommand::User(UserCommand::Add { name, space, role }) => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let u = admin::add_user(&mut store, &name, &space, role, now, &mut rng)?;
            print(
                json,
                json!({"user_id": u.user_id, "name": u.name, "space": space, "role": role}),
                format!("user {} is {} in {} ({})", u.name, role, space, u.user_id),
            );
        }
        AdminCommand::User(UserCommand::List) => {
            let mut rows = Vec::new();
            let mut lines = Vec::new();
            for u in store.users()? {
                let m = store.memberships(u.user_id)?;
                lines.push(format!(
                    "{}  {}  {}",
                    u.user_id,
                    u.name,
                    m.iter()
                        .map(|m| format!("{}:{}", m.space_name, m.role))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                rows.push(json!({"user_id": u.user_id, "name": u.name, "memberships": m}));
            }
            print(json, json!(rows), lines.join("\n"));
        }
        AdminCommand::Enroll { user, valid_hours } => {
            let ttl = valid_hours.saturating_mul(3_600_000);
            let (token, expires) = admin::create_enrollment_token(&mut store, &user, ttl, now, &mut rng)?;
            print(
                json,
                json!({"token": token, "user": user, "expires_at": render_ms(expires)}),
                format!("{token}\n(single use, for {user}, valid until {})", render_ms(expires)),
            );
        }
        AdminCommand::Device(DeviceCommand::List) => {
            let devices = store.devices()?;
            let mut rows = Vec::new();
            let mut lines = Vec::new();
            for d in &devices {
                let user = store.user(d.user_id)?.map(|u| u.name).unwrap_or_default();
                let state = match d.revoked_ms {
                    Some(t) => format!("revoked {}", render_ms(t)),
                    None => "active".to_string(),
                };
                let seen = d.last_seen_ms.map(render_ms).unwrap_or_else(|| "never".into());
                lines.push(format!(
                    "{}  {}  enrolled {}  last seen {}  {}",
                    d.device_id,
                    user,
                    render_ms(d.enrolled_ms),
                    seen,
                    state
                ));
                rows.push(json!({
                    "device_id": d.device_id,
                    "user": user,
                    "enrolled_at": render_ms(d.enrolled_ms),
                    "last_seen_at": d.last_seen_ms.map(render_ms),
                    "revoked_at": d.revoked_ms.map(render_ms),
                }));
            }
            print(
                json,
                json!(rows),
                if lines.is_empty() {
                    "no devices".into()
                } else {
                    lines.join("\n")
                },
            );
        }
        AdminCommand::Device(DeviceCommand::Revoke { device }) => {
            admin::revoke_device(&mut store, device, now)?;
            print(
                json,
                json!({"device_id": device, "revoked": true}),
                format!("device {device} revoked"),
            );
        }
    }
    Ok(())
}
