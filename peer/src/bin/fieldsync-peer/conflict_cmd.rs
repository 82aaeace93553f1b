//! `conflicts`, `resolve` and `undo`: the conflict prompt on the command line.

use anyhow::{Result, bail};
use clap::ValueEnum;
use fieldsync_peer::{ConflictRecord, Device, FieldStatus, LwwLossRecord, RejectedEdit, Resolution, Side};
use fieldsync_schema::outln;
use fieldsync_schema::time_fmt::render_ms;
use serde_json::{Value, json};
use uuid::Uuid;

/// Which side `--keep` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Keep {
    Mine,
    Theirs,
}

/// How `resolve` was asked to resolve.
#[derive(Debug)]
pub enum Action {
    Keep(Keep),
    Merged(String),
    Discard,
    Addendum,
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

fn short(id: Option<Uuid>) -> String {
    id.map_or_else(|| "relay".to_string(), |u| u.to_string()[..8].to_string())
}

/// Who this device is: its id, and its user's id and name (other users are known by id only).
struct Me<'a> {
    device: Uuid,
    user: Option<(Uuid, &'a str)>,
}

fn side(s: &Side, me: &Me<'_>) -> String {
    let who = match &s.by {
        Some(a) if a.device_id == Some(me.device) => format!(" (this device, {})", render_ms(a.at_ms)),
        Some(a) => {
            let user = match me.user {
                Some((id, name)) if a.user_id == Some(id) => format!("you ({name})"),
                _ => format!("user {}", short(a.user_id)),
            };
            format!(" ({user} on device {}, {})", short(a.device_id), render_ms(a.at_ms))
        }
        None => String::new(),
    };
    format!("{}{who}", s.value)
}

fn print_conflict(c: &ConflictRecord, me: &Me<'_>) -> Result<()> {
    let reason = serde_json::to_value(c.reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    outln!(
        "CONFLICT {} {} ({reason}): your {} {} was built on version {}, the relay is at version {}",
        c.entity_type,
        c.entity_id,
        c.kind,
        c.mutation_id,
        c.base_version.map_or_else(|| "none".to_string(), |v| v.to_string()),
        c.relay_version
    )?;
    for f in &c.fields {
        let mark = match f.status {
            FieldStatus::Unchanged => continue,
            FieldStatus::Contested => "CONTESTED",
            FieldStatus::Mine => "mine only",
            FieldStatus::Theirs => "theirs only",
            FieldStatus::Same => "same on both",
            FieldStatus::Merged => "merged (counter)",
        };
        if f.from_newer_version {
            outln!(
                "  {} [{mark}; a newer app version's field, kept as the relay has it]",
                f.field
            )?;
        } else {
            outln!("  {} [{mark}]", f.field)?;
        }
        outln!("    base:   {}", f.base)?;
        outln!("    mine:   {}", side(&f.mine, me))?;
        outln!("    theirs: {}", side(&f.theirs, me))?;
    }
    if c.options.contains(&"discard") {
        outln!(
            "  resolve: fieldsync-peer resolve {} {} --discard",
            c.entity_type,
            c.entity_id
        )?;
    } else {
        outln!(
            "  resolve: fieldsync-peer resolve {} {} --keep mine | --keep theirs | --json '{{\"field\": value, ...}}' \
             (the relay's version with these fields replaced)",
            c.entity_type,
            c.entity_id
        )?;
    }
    Ok(())
}

fn print_rejection(r: &RejectedEdit) -> Result<()> {
    outln!(
        "REJECTED {} {}: {} (item {})",
        r.entity_type,
        r.entity_id,
        r.reason,
        r.mutation_id
    )?;
    outln!("  your version: {}", Value::Object(r.fields.clone()))?;
    let mut how = vec!["--discard"];
    if r.options.contains(&"addendum") {
        how.insert(0, "--addendum");
    }
    outln!(
        "  resolve: fieldsync-peer resolve {} {} {}",
        r.entity_type,
        r.entity_id,
        how.join(" | ")
    )?;
    Ok(())
}

fn print_loss(l: &LwwLossRecord, now: u64) -> Result<()> {
    let undo = match (l.undone_at_ms, now <= l.undo_until_ms) {
        (Some(at), _) => format!("undone at {}", render_ms(at)),
        (None, true) => format!(
            "undo until {}: fieldsync-peer undo {}",
            render_ms(l.undo_until_ms),
            l.loss_id
        ),
        (None, false) => "undo window over".to_string(),
    };
    outln!(
        "loss {}: {} {} `{}`: yours {} (at {}) lost to {} by device {} (at {}); {undo}",
        l.loss_id,
        l.loss.entity_type,
        l.loss.entity_id,
        l.loss.field,
        l.loss.loser_value,
        render_ms(l.loss.loser_hlc.physical_ms),
        l.loss.winner_value,
        short(Some(l.loss.winner_device)),
        render_ms(l.loss.winner_hlc.physical_ms)
    )?;
    Ok(())
}

pub fn conflicts(dev: &Device, lww: bool, json: bool) -> Result<()> {
    if lww {
        let losses = dev.lww_loss_records()?;
        if json {
            return print_json(&json!({ "lww_losses": losses }));
        }
        if losses.is_empty() {
            outln!("no last-writer-wins losses on this device")?;
        }
        for l in &losses {
            print_loss(l, dev.now_ms())?;
        }
        return Ok(());
    }
    let conflicts = dev.conflicts()?;
    let rejections = dev.rejections()?;
    if json {
        return print_json(&json!({ "conflicts": conflicts, "rejections": rejections }));
    }
    if conflicts.is_empty() && rejections.is_empty() {
        outln!("no conflicts or rejected changes")?;
    }
    for c in &conflicts {
        let me = Me {
            device: dev.device_id(),
            user: dev.enrollment().map(|e| (e.user.user_id, e.user.name.as_str())),
        };
        print_conflict(c, &me)?;
    }
    for r in &rejections {
        print_rejection(r)?;
    }
    Ok(())
}

pub fn resolve(dev: &mut Device, entity_type: &str, id: Uuid, action: Action) -> Result<()> {
    dev.get_typed(entity_type, id)?;
    match action {
        Action::Discard => {
            let r = dev.discard_rejection(id)?;
            outln!(
                "discarded {} change(s) to {} {}: {}",
                r.discarded.len(),
                r.entity_type,
                r.entity_id,
                Value::Object(r.values)
            )?;
        }
        Action::Addendum => {
            let r = dev.make_addendum(id)?;
            outln!("{}", r.entity_id)?;
        }
        Action::Keep(k) => {
            let resolution = match k {
                Keep::Mine => Resolution::KeepMine,
                Keep::Theirs => Resolution::KeepTheirs,
            };
            receipt(&dev.resolve(id, resolution)?)?;
        }
        Action::Merged(text) => {
            let Value::Object(map) = serde_json::from_str::<Value>(&text)? else {
                bail!("--json must be a JSON object of the fields to take, e.g. '{{\"notes\": \"...\"}}'");
            };
            receipt(&dev.resolve(id, Resolution::Merged(map))?)?;
        }
    }
    Ok(())
}

fn receipt(r: &fieldsync_peer::WriteReceipt) -> Result<()> {
    match r.mutation_id {
        Some(m) => outln!(
            "resolved {} {} (outbox item {m}); sync to send it",
            r.entity_type,
            r.entity_id
        )?,
        None => outln!("{} {} unchanged", r.entity_type, r.entity_id)?,
    }
    Ok(())
}

pub fn undo(dev: &mut Device, loss_id: u64, json: bool) -> Result<()> {
    let r = dev.undo_lww_loss(loss_id)?;
    if json {
        return print_json(&r);
    }
    match r.mutation_id {
        Some(m) => outln!(
            "re-applied your value to {} {} (outbox item {m}); sync to send it",
            r.entity_type,
            r.entity_id
        )?,
        None => outln!("{} {} already holds your value", r.entity_type, r.entity_id)?,
    }
    Ok(())
}
