//! What the CLI prints: a short human form, or JSON on stdout with `--json`.

use anyhow::Result;
use fieldsync_peer::backup::{ExportReport, SignOutReport};
use fieldsync_peer::{Device, Entity, OutboxItem, RetryReport, Status, WriteReceipt};
use fieldsync_schema::outln;
use fieldsync_schema::time_fmt::render_ms;
use serde::Serialize;
use serde_json::json;

pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

fn when(ms: Option<u64>) -> String {
    ms.map_or_else(|| "never".to_string(), render_ms)
}

pub fn init(dev: &Device, existed: bool, json: bool) -> Result<()> {
    if json {
        return print_json(&json!({
            "device_id": dev.device_id(),
            "public_key": hex::encode(dev.public_key()),
            "created": !existed,
        }));
    }
    let verb = if existed { "already initialised" } else { "initialised" };
    outln!("device {} {verb} in {}", dev.device_id(), dev.dir().display())?;
    Ok(())
}

pub fn entity(e: &Entity, json: bool) -> Result<()> {
    if json {
        return print_json(e);
    }
    outln!("{} {}", e.entity_type, e.entity_id)?;
    outln!("  space:         {}", e.space_id)?;
    outln!("  sync state:    {}", e.sync_state)?;
    outln!("  relay version: {}", e.relay_version)?;
    let mut flags = Vec::new();
    if e.deleted {
        flags.push("deleted");
    }
    if e.signed {
        flags.push("signed");
    }
    if e.locked {
        flags.push("locked");
    }
    if !flags.is_empty() {
        outln!("  flags:         {}", flags.join(", "))?;
    }
    if let Some(sig) = &e.signature {
        outln!(
            "  signed by:     user {} on device {} at {}",
            sig.signer_user,
            sig.signer_device,
            render_ms(sig.signed_at_ms)
        )?;
    }
    for (k, v) in &e.fields {
        outln!("  {k}: {v}")?;
    }
    Ok(())
}

pub fn list(items: &[Entity], json: bool) -> Result<()> {
    if json {
        return print_json(items);
    }
    for e in items {
        let deleted = if e.deleted { " deleted" } else { "" };
        outln!(
            "{}  {}{deleted}  {}",
            e.entity_id,
            e.sync_state,
            serde_json::Value::Object(e.fields.clone())
        )?;
    }
    Ok(())
}

pub fn receipt(r: &WriteReceipt, verb: &str, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    match r.mutation_id {
        Some(m) => outln!("{verb} {} {} (outbox item {m})", r.entity_type, r.entity_id)?,
        None => outln!("{} {} unchanged", r.entity_type, r.entity_id)?,
    }
    Ok(())
}

pub fn status(s: &Status, json: bool) -> Result<()> {
    if json {
        return print_json(s);
    }
    outln!("device:    {}", s.device_id)?;
    match &s.enrolled {
        Some(e) => outln!("enrolled:  user {} ({}) at {}", e.user_name, e.user_id, e.relay_url)?,
        None => outln!("enrolled:  not enrolled")?,
    }
    outln!("state:     {}", s.state.as_str())?;
    if let Some(b) = &s.blocked {
        outln!("blocked:   {} {} — {}", b.entity_type, b.entity_id, b.reason)?;
    }
    if let Some(a) = &s.auth_failure {
        outln!("auth:      {a}")?;
        if a.starts_with("revoked") && s.wiped.is_none() {
            outln!(
                "           local changes are kept but cannot sync; with a new token from the operator, \
                 `enroll --new-identity --token TOKEN` carries them to a new identity"
            )?;
        }
    }
    if let Some(w) = &s.wiped {
        outln!(
            "wiped:     {} at the relay's request ({} unsynced changes discarded); this device takes no writes",
            render_ms(w.wiped_at_ms),
            w.discarded
        )?;
    }
    if let Some(w) = &s.relay_behind {
        outln!("waiting:   {w}")?;
    }
    outln!("unsynced:  {}", s.unsynced)?;
    outln!("oldest:    {}", when(s.oldest_pending_ms))?;
    outln!("last sync: {}", when(s.last_sync_ms))?;
    outln!("entities:  {}", s.entities)?;
    outln!("at rest:   {}", if s.encrypted { "encrypted" } else { "not encrypted" })?;
    if let Some(types) = &s.synced_types {
        outln!("holds:     {} (selective sync)", types.join(", "))?;
    }
    if s.windowed {
        outln!("windows:   on ({} record(s) wait to be fetched)", s.fetch_queued)?;
    }
    if s.metered {
        outln!(
            "metered:   deferring {} until an unmetered link",
            s.deferred_types.join(", ")
        )?;
    }
    if s.possible_duplicates > 0 {
        outln!(
            "duplicates: {} possible (fieldsync-peer duplicates)",
            s.possible_duplicates
        )?;
    }
    if s.superseded_requests > 0 {
        outln!(
            "superseded: {} request(s) (fieldsync-peer superseded)",
            s.superseded_requests
        )?;
    }
    match s.relay_schema_version {
        Some(relay) if relay != s.schema_version => {
            outln!("schema:    v{} (the relay serves v{relay})", s.schema_version)?
        }
        _ => outln!("schema:    v{}", s.schema_version)?,
    }
    Ok(())
}

pub fn queue(items: &[OutboxItem], json: bool) -> Result<()> {
    if json {
        return print_json(items);
    }
    if items.is_empty() {
        outln!("outbox is empty: nothing waits for the relay")?;
    }
    for i in items {
        let next = if i.next_attempt_ms > 0 {
            format!(" next {}", render_ms(i.next_attempt_ms))
        } else {
            String::new()
        };
        let err = i.error.as_ref().map(|e| format!(" — {e}")).unwrap_or_default();
        outln!(
            "{:>6} {} {:<9} {} {} {:<8} attempts {}{next}{err}",
            i.seq,
            i.mutation_id,
            i.kind,
            i.entity_type,
            i.entity_id,
            i.state,
            i.attempts
        )?;
    }
    Ok(())
}

pub fn retry(r: &RetryReport, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    outln!("{}", r.message)?;
    Ok(())
}

pub fn rekey(r: &fieldsync_peer::RekeyReport, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    let what = if r.was_encrypted {
        "moved to the new key"
    } else {
        "encrypted"
    };
    outln!(
        "device database {what} ({} bytes); open it with the new key from now on",
        r.bytes
    )?;
    Ok(())
}

pub fn export(r: &ExportReport, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    outln!(
        "exported {} entities and {} outbox items to {} ({} bytes)",
        r.entities,
        r.outbox_items,
        r.file.display(),
        r.bytes
    )?;
    Ok(())
}

pub fn import(dev: &Device, json: bool) -> Result<()> {
    let s = dev.status()?;
    if json {
        return print_json(&s);
    }
    outln!(
        "imported device {} into {}: {} entities, {} unsynced",
        s.device_id,
        dev.dir().display(),
        s.entities,
        s.unsynced
    )?;
    Ok(())
}

pub fn sign_out(r: &SignOutReport, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    if r.forced {
        outln!(
            "signed out device {} (forced: {} unsynced change(s) discarded)",
            r.device_id,
            r.unsynced_at_sign_out
        )?;
    } else {
        outln!("signed out device {}; local data wiped", r.device_id)?;
    }
    Ok(())
}
