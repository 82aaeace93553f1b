//! Selective sync (issue 19): the entity types a device holds. A phone that only logs workouts
//! need not download a clinic's exercise library; a device says which types it holds in every
//! `Hello`, and the relay sends nothing of another type, in pull pages or live (a live entry of
//! another type arrives as its bare place in the feed, `FeedPayload::NotSelected`, so the live
//! run stays contiguous). The choice is stored on the device and can change at any time
//! without enrolling again: widening it starts the next pull from the relay's snapshots, so the
//! records of the added types arrive (those already held merge as no-ops); narrowing it keeps
//! what the device holds and stops what it receives.

use serde::Serialize;

use crate::db::{self, keys};
use crate::device::Device;
use crate::error::{PeerError, Result};

/// What [`Device::set_synced_types`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypesReport {
    /// `None`: every type.
    pub types: Option<Vec<String>>,
    /// The selection grew: the next sync pulls from the snapshots again.
    pub pull_again: bool,
}

impl Device {
    /// The types this device holds (`None`: every type of its schema).
    pub fn synced_types(&self) -> Result<Option<Vec<String>>> {
        db::meta_get_json(&self.conn, keys::SYNCED_TYPES)
    }

    /// Holds only `types` from the next connection on (`None`: every type). Every name must be
    /// a type of the schema; an empty list is refused (a device that holds nothing).
    pub fn set_synced_types(&mut self, types: Option<Vec<String>>) -> Result<TypesReport> {
        let types = match types {
            None => None,
            Some(names) => {
                let mut names: Vec<String> = names.into_iter().map(|n| n.trim().to_string()).collect();
                names.sort();
                names.dedup();
                if names.is_empty() {
                    return Err(PeerError::NotAllowed(
                        "select at least one type, or every type (`types --all`)".into(),
                    ));
                }
                if let Some(unknown) = names.iter().find(|n| self.schema.entity_type(n).is_none()) {
                    return Err(PeerError::unknown_type(&self.schema, unknown));
                }
                Some(names)
            }
        };
        let before = self.synced_types()?;
        let pull_again = match (&before, &types) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(old), Some(new)) => new.iter().any(|t| !old.contains(t)),
        };
        let tx = self.conn.transaction()?;
        match &types {
            Some(t) => db::meta_set_json(&tx, keys::SYNCED_TYPES, t)?,
            None => db::meta_delete(&tx, keys::SYNCED_TYPES)?,
        }
        if pull_again {
            db::meta_delete(&tx, keys::CURSOR)?;
        }
        tx.commit()?;
        Ok(TypesReport { types, pull_again })
    }
}
