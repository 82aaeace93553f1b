//! How a conflict can end: one rule for the options a conflict record offers and for what
//! [`Device::resolve`](crate::Device::resolve), [`Device::discard_rejection`](crate::Device::discard_rejection)
//! and [`Device::make_addendum`](crate::Device::make_addendum) accept, so a user following the
//! options the product shows is never refused (the simulator found a record offering keep-mine
//! on an intake form another device had locked meanwhile: every offered option was refused).

use fieldsync_schema::{EntityDoc, EntityType, MutationKind, Schema};
use rusqlite::Connection;
use uuid::Uuid;

use super::view::{self, OwnChanges, Sides};
use super::{OpenConflict, open_conflict};
use crate::entity::{self, Loaded};
use crate::error::{PeerError, Result};
use crate::outbox;

/// What can settle a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Keep mine, keep theirs, or merge per field.
    ByValues,
    /// A signature made on an older version of a note: it cannot be kept, only discarded (the
    /// user reviews the note and signs again).
    StaleSignature,
    /// The relay's record is signed or locked: nothing can change it any more. The change is
    /// discarded, or — for an edit of a signed note — becomes an addendum.
    Sealed { addendum: bool },
}

impl Settlement {
    pub(crate) fn of(kind: MutationKind, ty: &EntityType, theirs: &EntityDoc) -> Self {
        if kind == MutationKind::Sign {
            Settlement::StaleSignature
        } else if theirs.is_signed() || theirs.is_locked() {
            Settlement::Sealed {
                addendum: theirs.is_signed() && is_note_like(ty),
            }
        } else {
            Settlement::ByValues
        }
    }

    pub(crate) fn options(self) -> Vec<&'static str> {
        match self {
            Settlement::ByValues => vec!["keep_mine", "keep_theirs", "merged"],
            Settlement::StaleSignature | Settlement::Sealed { addendum: false } => vec!["discard"],
            Settlement::Sealed { addendum: true } => vec!["discard", "addendum"],
        }
    }
}

/// A type an addendum can be made of: a note with a body that can point at another note.
pub(crate) fn is_note_like(ty: &EntityType) -> bool {
    ty.field("body").is_some() && ty.field("addendum_to").is_some()
}

/// An open conflict with everything needed to show or end it.
pub(crate) struct Unsettled {
    pub open: OpenConflict,
    pub envelope: fieldsync_schema::Mutation,
    pub ty: EntityType,
    /// The local document, holding both sides.
    pub loaded: Loaded,
    /// This device's unconfirmed items of the entity (the conflicted one and those behind it).
    pub own: OwnChanges,
    pub sides: Sides,
    pub settlement: Settlement,
}

impl Unsettled {
    /// Loads `open` with its three sides.
    pub(crate) fn load(
        conn: &Connection,
        schema: &Schema,
        open: OpenConflict,
        me: Uuid,
        actor: automerge::ActorId,
    ) -> Result<Self> {
        let envelope = outbox::envelope(conn, open.mutation_id)?.ok_or(PeerError::NoSuchMutation(open.mutation_id))?;
        let mut loaded = entity::load(conn, open.entity_id, actor.clone())?.ok_or(PeerError::NotFound {
            entity_type: None,
            id: open.entity_id,
        })?;
        let ty = schema
            .entity_type(&loaded.meta.entity_type)
            .ok_or_else(|| PeerError::unknown_type(schema, &loaded.meta.entity_type))?
            .clone();
        let own = view::own_changes(conn, open.entity_id, None)?;
        let base_heads = view::base_heads(&envelope)?;
        let sides = view::three_way(&ty, &mut loaded.doc, &base_heads, &own, me, actor)?;
        let settlement = Settlement::of(envelope.kind, &ty, &sides.theirs_doc);
        Ok(Unsettled {
            open,
            envelope,
            ty,
            loaded,
            own,
            sides,
            settlement,
        })
    }

    /// The open conflict of `entity_id`, if it has one.
    pub(crate) fn of_entity(
        conn: &Connection,
        schema: &Schema,
        entity_id: Uuid,
        me: Uuid,
        actor: automerge::ActorId,
    ) -> Result<Option<Self>> {
        match open_conflict(conn, entity_id)? {
            Some(open) => Ok(Some(Self::load(conn, schema, open, me, actor)?)),
            None => Ok(None),
        }
    }
}
