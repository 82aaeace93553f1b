//! Selective sync (issue 19): the entity types a device holds. A phone that only logs workouts
//! need not download a clinic's exercise library; a device says which types it holds in every
//! `Hello`, and the relay sends nothing of another type, in pull pages or live (a live entry of
//! another type arrives as its bare place in the feed, `FeedPayload::NotSelected`, so the live
//! run stays contiguous). The choice is stored on the device and can change at any time
//! without enrolling again: widening it starts the next pull from the relay's snapshots, so the
//! records of the added types arrive (those already held merge as no-ops); narrowing it keeps
//! what the device holds and stops what it receives.
//!
//! A metered link defers reference data the same way: while the app says the device is on one
//! (`set_metered`), every `Hello` says so and the relay sends nothing of a type the schema marks
//! `priority = "low"`; back on an unmetered link, the next pull starts from the snapshots again
//! and brings what waited. (Without a metered link, a new device still gets reference data last:
//! the relay walks its snapshot twice, every other type first.)

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
    /// Whether the app said the device is on a metered link.
    pub fn metered(&self) -> Result<bool> {
        Ok(db::meta_get(&self.conn, keys::METERED)?.is_some())
    }

    /// The device is on a metered link (`true`) or not, from the next connection on. Leaving a
    /// metered link drops the pull position, so the next sync brings the deferred reference data
    /// (what is held merges as a no-op).
    pub fn set_metered(&mut self, metered: bool) -> Result<()> {
        let tx = self.conn.transaction()?;
        let was = db::meta_get(&tx, keys::METERED)?.is_some();
        if metered {
            db::meta_set(&tx, keys::METERED, "1")?;
        } else if was {
            db::meta_delete(&tx, keys::METERED)?;
            db::meta_delete(&tx, keys::CURSOR)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The types whose records wait for an unmetered link (empty when not metered).
    pub fn deferred_types(&self) -> Result<Vec<String>> {
        if !self.metered()? {
            return Ok(Vec::new());
        }
        let held = self.synced_types()?;
        Ok(self
            .schema
            .types()
            .filter(|t| t.low_priority && held.as_ref().is_none_or(|h| h.contains(&t.name)))
            .map(|t| t.name.clone())
            .collect())
    }

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

#[cfg(test)]
mod tests {
    use fieldsync_schema::PullCursor;

    use crate::db::{self, keys};
    use crate::testutil::{Fixture, space};

    #[test]
    fn a_metered_link_defers_reference_data_and_leaving_it_pulls_again() {
        let mut f = Fixture::new(1);
        assert!(f.dev.deferred_types().unwrap().is_empty());
        db::meta_set_json(f.dev.connection(), keys::CURSOR, &PullCursor::at(space(), 9)).unwrap();
        f.dev.set_metered(true).unwrap();
        assert_eq!(f.dev.deferred_types().unwrap(), ["exercise", "vocab"]);
        assert_eq!(f.dev.status().unwrap().deferred_types, ["exercise", "vocab"]);
        assert_eq!(
            f.dev.cursor().unwrap().seq(&space()),
            9,
            "going metered keeps the position"
        );
        f.dev
            .set_synced_types(Some(vec!["exercise".into(), "patient".into()]))
            .unwrap();
        assert_eq!(
            f.dev.deferred_types().unwrap(),
            ["exercise"],
            "only types it holds wait"
        );
        f.dev.set_metered(false).unwrap();
        assert!(f.dev.deferred_types().unwrap().is_empty());
        assert_eq!(
            f.dev.cursor().unwrap(),
            PullCursor::default(),
            "what waited comes with the next pull"
        );
    }
}
