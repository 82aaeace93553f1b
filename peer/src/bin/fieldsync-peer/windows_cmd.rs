//! `windows`, `fetch` and `evict`: sync windows (SPEC §16) from the command line.

use anyhow::Result;
use fieldsync_peer::{Device, FetchState, PeerError};
use fieldsync_schema::outln;
use serde_json::json;
use uuid::Uuid;

use crate::net_cmd::{self, TlsArgs};
use crate::output;

/// Shows whether the device syncs by windows (after `--on` / `--off`, which `main` applied).
pub fn windows(dev: &Device, turned_off: bool, json: bool) -> Result<()> {
    let windowed = dev.windowed()?;
    let queued = dev.fetch_queue()?.len();
    let bound = dev.eviction_bound()?;
    if json {
        return output::print_json(&json!({ "windowed": windowed, "fetch_queue": queued, "evict_above": bound }));
    }
    if !windowed {
        outln!("downloads every record (no windows)")?;
        if turned_off {
            outln!("the next sync pulls what the windows left out")?;
        }
        return Ok(());
    }
    outln!("syncs by windows:")?;
    for ty in dev.schema().types() {
        if let Some(w) = &ty.window {
            let back = w.days_back.map_or("any time".to_string(), |d| format!("{d} days back"));
            let ahead = w
                .days_ahead
                .map_or("any time".to_string(), |d| format!("{d} days ahead"));
            outln!("  {}.{}: {back} to {ahead}", ty.name, w.field)?;
        }
    }
    if queued > 0 {
        outln!("{queued} record(s) wait to be fetched at the next sync")?;
    }
    match bound {
        Some(n) => outln!("evicts after a sync once it holds more than {n} records")?,
        None => outln!("evicts only when asked (`evict`)")?,
    }
    Ok(())
}

/// Brings a record the device does not hold: queued, then fetched now if the relay answers.
pub fn fetch(mut dev: Device, entity_type: &str, id: Uuid, tls: &TlsArgs, json: bool) -> Result<()> {
    if dev.fetch(entity_type, id)? == FetchState::Queued {
        if let Err(e) = net_cmd::sync_quietly(&mut dev, tls) {
            if json {
                return output::print_json(&json!({ "state": "queued", "error": e.to_string() }));
            }
            outln!("queued {entity_type} {id}: it is fetched at the next sync ({e})")?;
            return Ok(());
        }
        if dev.get(id)?.is_none() {
            return Err(PeerError::NotFound {
                entity_type: Some(entity_type.to_string()),
                id,
            }
            .into());
        }
    }
    output::entity(&dev.get_typed(entity_type, id)?, json)
}

/// Evicts records that left their window (synced, settled, referenced by nothing held).
pub fn evict(dev: &mut Device, json: bool) -> Result<()> {
    let report = dev.evict()?;
    if json {
        return output::print_json(&report);
    }
    outln!(
        "evicted {} record(s) outside their window; kept {} with unsynced changes, a conflict or a rejection, {} referenced by held records",
        report.evicted,
        report.kept_unsettled,
        report.kept_referenced
    )?;
    Ok(())
}
