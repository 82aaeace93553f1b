//! `enroll` and `sync [--watch]`: the commands that talk to a relay.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fieldsync_peer::net::{self, NetError, SyncOptions, TlsOptions, WatchEvent};
use fieldsync_peer::sync::{SyncMachine, SyncSummary};
use fieldsync_peer::{Device, Notice};
use fieldsync_schema::outln;
use serde_json::json;

/// How the device trusts a `wss://` relay.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM file with the CA certificate(s) to trust for a wss:// relay instead of the system's.
    #[arg(long, value_name = "FILE", global = true)]
    ca_file: Option<PathBuf>,
}

impl TlsArgs {
    fn options(&self) -> TlsOptions {
        TlsOptions {
            ca_file: self.ca_file.clone(),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn enroll_new_identity(mut dev: Device, token: &str, tls: &TlsArgs, json: bool) -> Result<()> {
    let report = runtime()?.block_on(net::enroll_new_identity(&mut dev, token, &tls.options()))?;
    if json {
        outln!("{}", json!(report))?;
    } else {
        outln!(
            "this device is now {} (it replaces revoked {}); {} unsynced change(s) carried over, `sync` sends them",
            report.new_device_id,
            report.old_device_id,
            report.carried
        )?;
    }
    Ok(())
}

pub fn enroll(mut dev: Device, relay: &str, token: &str, tls: &TlsArgs, json: bool) -> Result<()> {
    let e = runtime()?.block_on(net::enroll_with_tls(&mut dev, relay, token, &tls.options()))?;
    if json {
        outln!(
            "{}",
            json!({
                "device_id": dev.device_id(),
                "relay": e.relay_url,
                "relay_id": e.relay_id,
                "user": e.user.name,
                "user_id": e.user.user_id,
                "default_space": e.default_space,
                "spaces": e.user.spaces,
            })
        )?;
    } else {
        let spaces: Vec<String> = e
            .user
            .spaces
            .iter()
            .map(|s| format!("{} ({})", s.name, s.role))
            .collect();
        outln!(
            "enrolled device {} as {} at {} (spaces: {})",
            dev.device_id(),
            e.user.name,
            e.relay_url,
            spaces.join(", ")
        )?;
    }
    Ok(())
}

fn print_summary(dev: &Device, s: &SyncSummary, json: bool) -> Result<()> {
    let status = dev.status()?;
    if json {
        outln!("{}", json!({ "summary": s, "status": status }))?;
        return Ok(());
    }
    outln!(
        "pushed {}, applied {}, conflicts {}, rejected {}, pulled {}; status: {}, {} unsynced",
        s.pushed,
        s.applied,
        s.conflicts,
        s.rejected,
        s.pulled,
        status.state.as_str(),
        status.unsynced
    )?;
    if let Some(b) = &status.blocked {
        outln!("blocked on {} {}: {}", b.entity_type, b.entity_id, b.reason)?;
    } else if let Some(at) = s.retry_at {
        let why = dev
            .queue(false)?
            .into_iter()
            .find_map(|i| i.error)
            .unwrap_or_else(|| "the relay asked to retry later".into());
        outln!(
            "{} change(s) wait for a retry in {:.0}s ({why}); they stay queued and go out on the next sync",
            status.unsynced,
            at.saturating_sub(dev.now_ms()) as f64 / 1000.0
        )?;
    }
    Ok(())
}

/// One sync without progress lines (a command that needs the relay for a moment, e.g. `fetch`).
pub fn sync_quietly(dev: &mut Device, tls: &TlsArgs) -> Result<SyncSummary> {
    let mut machine = SyncMachine::default();
    let opts = SyncOptions {
        progress: false,
        tls: tls.options(),
        ..SyncOptions::default()
    };
    Ok(runtime()?.block_on(net::sync_once(dev, &mut machine, &opts))?)
}

pub fn sync(mut dev: Device, watch: bool, tls: &TlsArgs, json: bool) -> Result<()> {
    let mut machine = SyncMachine::default();
    let opts = SyncOptions {
        progress: !json,
        tls: tls.options(),
        ..SyncOptions::default()
    };
    let rt = runtime()?;
    if !watch {
        return match rt.block_on(net::sync_once(&mut dev, &mut machine, &opts)) {
            Ok(summary) => print_summary(&dev, &summary, json),
            Err(e) => {
                let unsynced = dev.status().map(|s| s.unsynced).unwrap_or(0);
                let hint = if e.is_retryable() {
                    format!("; {unsynced} change(s) stay queued and go out on the next sync")
                } else {
                    String::new()
                };
                Err(anyhow::Error::new(e).context(format!("sync failed{hint}")))
            }
        };
    }
    let mut last = machine.summary();
    let mut drive = Announcing(net::Exclusive {
        dev: &mut dev,
        machine: &mut machine,
    });
    let result = rt.block_on(net::watch_with(&mut drive, &opts, stop_signal(), |event| match event {
        WatchEvent::Connected => eprintln!("connected"),
        WatchEvent::Progress(now) => {
            eprintln!("{}", progress_line(&last, &now));
            last = now;
        }
        WatchEvent::Disconnected { reason, retry_in_ms } => {
            eprintln!(
                "disconnected: {reason}; reconnecting in {:.1}s",
                retry_in_ms as f64 / 1000.0
            )
        }
        WatchEvent::Summary(_) => {}
    }));
    match result {
        Ok(()) => print_summary(&dev, &machine.summary(), json),
        Err(NetError::Store(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

/// The watch's way to the device: after each step, one line per notice an app's listener would
/// get (a record another device changed, a conflict, a rejection, an overridden value).
struct Announcing<'a>(net::Exclusive<'a>);

impl net::Drive for Announcing<'_> {
    fn step<R>(&mut self, f: impl FnOnce(&mut Device, &mut SyncMachine) -> R) -> R {
        let result = self.0.step(f);
        for notice in self.0.dev.take_notices() {
            eprintln!("{}", notice_line(&notice));
        }
        result
    }
}

fn notice_line(notice: &Notice) -> String {
    match notice {
        Notice::Changed { entity_type, entity_id } => format!("changed: {entity_type} {entity_id}"),
        Notice::Conflict { entity_type, entity_id } => {
            format!("conflict: {entity_type} {entity_id} (see `fieldsync-peer conflicts`)")
        }
        Notice::Rejected { entity_type, entity_id } => {
            format!("rejected: {entity_type} {entity_id} (see `fieldsync-peer conflicts`)")
        }
        Notice::LwwLoss {
            entity_type,
            entity_id,
            field,
        } => {
            format!("overridden: {entity_type} {entity_id} {field} (see `fieldsync-peer conflicts --lww`)")
        }
        Notice::PossibleDuplicate {
            entity_type,
            entity_id,
            duplicate_of,
        } => {
            format!("possible duplicate: {entity_type} {entity_id} of {duplicate_of} (see `fieldsync-peer duplicates`)")
        }
    }
}

/// One line per batch sent or answered and per page or live entry received, as deltas.
fn progress_line(before: &SyncSummary, now: &SyncSummary) -> String {
    let mut parts = Vec::new();
    let pushed = now.pushed.saturating_sub(before.pushed);
    if pushed > 0 {
        parts.push(format!("sent {pushed} change(s)"));
    }
    for (n, what) in [
        (now.applied.saturating_sub(before.applied), "applied"),
        (now.conflicts.saturating_sub(before.conflicts), "conflicted"),
        (now.rejected.saturating_sub(before.rejected), "rejected"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    let pulled = now.pulled.saturating_sub(before.pulled);
    if pulled > 0 {
        parts.push(format!("received {pulled} change(s)"));
    }
    parts.join(", ")
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
