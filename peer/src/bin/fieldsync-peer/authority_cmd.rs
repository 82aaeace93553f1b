//! `duplicates`, `superseded` and `supersede`: what SPEC §17 shows and asks of the user.

use anyhow::Result;
use fieldsync_peer::Device;
use fieldsync_schema::outln;
use serde_json::Value;
use uuid::Uuid;

use crate::output;

/// Lists possible duplicates, or merges / dismisses one.
pub fn duplicates(dev: &mut Device, merge: Option<Uuid>, dismiss: Option<Uuid>, json: bool) -> Result<()> {
    if let Some(id) = merge {
        let report = dev.merge_duplicate(id)?;
        if json {
            return output::print_json(&report);
        }
        outln!(
            "merged {} into {} (took {}); {} is now a tombstone naming {}",
            report.merged,
            report.survivor,
            Value::Object(report.took.clone()),
            report.merged,
            report.survivor
        )?;
        return Ok(());
    }
    if let Some(id) = dismiss {
        return output::receipt(&dev.dismiss_duplicate(id)?, "dismissed the duplicate flag of", json);
    }
    let found = dev.possible_duplicates()?;
    if json {
        return output::print_json(&found);
    }
    if found.is_empty() {
        outln!("no possible duplicates")?;
    }
    for d in &found {
        outln!("{} {} may duplicate {}", d.entity_type, d.entity_id, d.duplicate_of)?;
        outln!("  this:  {}", Value::Object(d.fields.clone()))?;
        outln!("  other: {}", Value::Object(d.other_fields.clone()))?;
        outln!(
            "  merge: fieldsync-peer duplicates --merge {}   keep both: fieldsync-peer duplicates --dismiss {}",
            d.entity_id,
            d.entity_id
        )?;
    }
    Ok(())
}

/// Lists requests a service superseded, with its notice.
pub fn superseded(dev: &Device, json: bool) -> Result<()> {
    let found = dev.superseded_requests()?;
    if json {
        return output::print_json(&found);
    }
    if found.is_empty() {
        outln!("no superseded requests")?;
    }
    for r in &found {
        let version = r.superseded_by_version.map_or("?".to_string(), |v| v.to_string());
        outln!(
            "{} {} superseded by {} version {version} at {}: {}",
            r.entity_type,
            r.entity_id,
            r.request_for,
            r.superseded_at.as_deref().unwrap_or("?"),
            r.notice.as_deref().unwrap_or("(no notice)")
        )?;
    }
    Ok(())
}
