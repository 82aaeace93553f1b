//! What crosses the boundary: plain records of strings and numbers. A record's fields and any
//! field value travel as JSON text (`fields_json`, `value_json`): the schema is the app's, so
//! a typed record per entity type would be generated from it, not fixed here; each language
//! parses JSON in one call. Ids are UUID strings.

use fieldsync_peer as peer;
use fieldsync_peer::backup;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{Result, bad_argument};

pub(crate) fn parse_id(id: &str) -> Result<Uuid> {
    Uuid::parse_str(id.trim()).map_err(|e| bad_argument(format!("`{id}` is not a record id (a UUID): {e}")))
}

pub(crate) fn parse_fields(json: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(bad_argument(format!(
            "fields must be a JSON object like {{\"name\": \"Ada\"}}, not {other}"
        ))),
        Err(e) => Err(bad_argument(format!("fields are not valid JSON: {e}"))),
    }
}

pub(crate) fn parse_value(json: &str) -> Result<Value> {
    serde_json::from_str(json).map_err(|e| bad_argument(format!("`{json}` is not a JSON value: {e}")))
}

fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}

/// The snake_case name serde gives an enum value (`keep_mine`, `rejected_locked`, ...).
fn name_of(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(Value::Object(map)) => map.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    }
}

/// A filter for `list`: records whose `field` equals the JSON value.
#[derive(Debug, Clone, uniffi::Record)]
pub struct FieldFilter {
    pub field: String,
    pub value_json: String,
}

impl FieldFilter {
    pub(crate) fn to_peer(&self) -> Result<peer::FieldFilter> {
        Ok(peer::FieldFilter {
            field: self.field.clone(),
            value: parse_value(&self.value_json)?,
        })
    }
}

/// Where a record stands with the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum RecordSyncState {
    Synced,
    Pending,
    Conflict,
    Rejected,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct Entity {
    pub entity_id: String,
    pub entity_type: String,
    pub space_id: String,
    /// The record's fields as a JSON object.
    pub fields_json: String,
    /// The last relay version this device knows of (0: not confirmed yet).
    pub relay_version: u64,
    pub sync_state: RecordSyncState,
    pub deleted: bool,
    pub signed: bool,
    pub locked: bool,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl From<peer::Entity> for Entity {
    fn from(e: peer::Entity) -> Self {
        Entity {
            entity_id: e.entity_id.to_string(),
            entity_type: e.entity_type,
            space_id: e.space_id.to_string(),
            fields_json: json(&e.fields),
            relay_version: e.relay_version,
            sync_state: match e.sync_state {
                peer::SyncState::Synced => RecordSyncState::Synced,
                peer::SyncState::Pending => RecordSyncState::Pending,
                peer::SyncState::Conflict => RecordSyncState::Conflict,
                peer::SyncState::Rejected => RecordSyncState::Rejected,
            },
            deleted: e.deleted,
            signed: e.signed,
            locked: e.locked,
            created_at_ms: e.created_at_ms,
            updated_at_ms: e.updated_at_ms,
        }
    }
}

/// What a local write did. `mutation_id` is absent when the write changed nothing.
#[derive(Debug, Clone, uniffi::Record)]
pub struct WriteReceipt {
    pub entity_id: String,
    pub entity_type: String,
    /// `create`, `update`, `delete`, `sign`, `lock`, ...
    pub kind: String,
    pub mutation_id: Option<String>,
    /// Appended to the previous, never-sent change of the same record.
    pub combined: bool,
}

impl From<peer::WriteReceipt> for WriteReceipt {
    fn from(r: peer::WriteReceipt) -> Self {
        WriteReceipt {
            entity_id: r.entity_id.to_string(),
            entity_type: r.entity_type,
            kind: name_of(&r.kind),
            mutation_id: r.mutation_id.map(|m| m.to_string()),
            combined: r.combined,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum SyncState {
    Synced,
    Syncing,
    Offline,
    Blocked,
    AuthFailed,
    /// The relay serves an older schema than this device's: changes wait for its upgrade.
    WaitingForRelay,
}

#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct EnrolledAs {
    pub user_id: String,
    pub user_name: String,
    pub relay_url: String,
    pub relay_id: String,
    pub default_space: String,
}

/// The first blocked outbox item, which halts the outbox until the user resolves it.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct BlockedOn {
    pub mutation_id: String,
    pub entity_type: String,
    pub entity_id: String,
    /// `conflict`, `rejected_immutable`, `rejected_locked`, `invalid`, `forbidden`.
    pub outcome: String,
    pub reason: String,
}

/// Always available, offline too.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Status {
    pub device_id: String,
    /// Absent: not enrolled.
    pub enrolled: Option<EnrolledAs>,
    pub state: SyncState,
    /// Changes the relay has not confirmed yet.
    pub unsynced: u64,
    pub oldest_pending_ms: Option<u64>,
    pub last_sync_ms: Option<u64>,
    pub blocked: Option<BlockedOn>,
    pub auth_failure: Option<String>,
    pub entities: u64,
    pub exported_at_ms: Option<u64>,
    pub schema_version: u64,
    pub relay_schema_version: Option<u64>,
    pub relay_behind: Option<String>,
    pub possible_duplicates: u64,
    pub superseded_requests: u64,
    /// The relay had this device's data erased (a remote wipe): when (device time, ms), and
    /// how many unsynced changes went with it. Writes are refused from then on.
    pub wiped_at_ms: Option<u64>,
    pub wipe_discarded: Option<u64>,
    /// Whether the database is encrypted at rest (`open_encrypted`).
    pub encrypted: bool,
    /// Whether the device syncs by windows (`set_windowed`), and how many records wait to be
    /// fetched at the next sync.
    pub windowed: bool,
    pub fetch_queued: u64,
    /// The app said the device is on a metered link (`set_metered`); the types whose records
    /// wait for another.
    pub metered: bool,
    pub deferred_types: Vec<String>,
}

impl From<peer::Status> for Status {
    fn from(s: peer::Status) -> Self {
        Status {
            device_id: s.device_id.to_string(),
            enrolled: s.enrolled.map(|e| EnrolledAs {
                user_id: e.user_id.to_string(),
                user_name: e.user_name,
                relay_url: e.relay_url,
                relay_id: e.relay_id.to_string(),
                default_space: e.default_space.to_string(),
            }),
            state: match s.state {
                peer::SyncStatus::Synced => SyncState::Synced,
                peer::SyncStatus::Syncing => SyncState::Syncing,
                peer::SyncStatus::Offline => SyncState::Offline,
                peer::SyncStatus::Blocked => SyncState::Blocked,
                peer::SyncStatus::AuthFailed => SyncState::AuthFailed,
                peer::SyncStatus::WaitingForRelay => SyncState::WaitingForRelay,
            },
            unsynced: s.unsynced,
            oldest_pending_ms: s.oldest_pending_ms,
            last_sync_ms: s.last_sync_ms,
            blocked: s.blocked.map(|b| BlockedOn {
                mutation_id: b.mutation_id.to_string(),
                entity_type: b.entity_type,
                entity_id: b.entity_id.to_string(),
                outcome: b.outcome,
                reason: b.reason,
            }),
            auth_failure: s.auth_failure,
            entities: s.entities,
            exported_at_ms: s.exported_at_ms,
            schema_version: s.schema_version,
            relay_schema_version: s.relay_schema_version,
            relay_behind: s.relay_behind,
            possible_duplicates: s.possible_duplicates,
            superseded_requests: s.superseded_requests,
            wiped_at_ms: s.wiped.map(|w| w.wiped_at_ms),
            wipe_discarded: s.wiped.map(|w| w.discarded),
            encrypted: s.encrypted,
            windowed: s.windowed,
            fetch_queued: s.fetch_queued,
            metered: s.metered,
            deferred_types: s.deferred_types,
        }
    }
}

/// One outbox item (`queue`).
#[derive(Debug, Clone, uniffi::Record)]
pub struct OutboxItem {
    pub seq: u64,
    pub mutation_id: String,
    pub entity_type: String,
    pub entity_id: String,
    pub kind: String,
    /// `pending`, `backing_off`, `blocked`, `applied`, `superseded`, ...
    pub state: String,
    pub attempts: u32,
    pub created_at_ms: u64,
    /// The relay's answer, for applied and blocked items.
    pub outcome: Option<String>,
    /// Why the item is blocked or was retried.
    pub error: Option<String>,
}

impl From<peer::OutboxItem> for OutboxItem {
    fn from(i: peer::OutboxItem) -> Self {
        OutboxItem {
            seq: i.seq,
            mutation_id: i.mutation_id.to_string(),
            entity_type: i.entity_type,
            entity_id: i.entity_id.to_string(),
            kind: name_of(&i.kind),
            state: i.state.as_str().to_string(),
            attempts: i.attempts,
            created_at_ms: i.created_at_ms,
            outcome: i.outcome.as_ref().map(name_of),
            error: i.error,
        }
    }
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct RetryReport {
    pub made_due: u64,
    pub still_blocked: u64,
    pub message: String,
}

impl From<peer::RetryReport> for RetryReport {
    fn from(r: peer::RetryReport) -> Self {
        RetryReport {
            made_due: r.made_due as u64,
            still_blocked: r.still_blocked as u64,
            message: r.message,
        }
    }
}

/// One side's value of a field in a conflict.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ConflictSide {
    /// `null`: the field is absent on this side.
    pub value_json: String,
    /// Differs from the base.
    pub changed: bool,
}

/// How one field stands in a conflict: `status` is `unchanged`, `mine`, `theirs`, `same`,
/// `contested` (the user decides) or `merged` (counters add up).
#[derive(Debug, Clone, uniffi::Record)]
pub struct FieldConflict {
    /// A schema field, or `_deleted` for the tombstone (delete versus edit).
    pub field: String,
    pub status: String,
    pub base_json: String,
    pub mine: ConflictSide,
    pub theirs: ConflictSide,
    /// Written by a device on a newer schema: every resolution keeps the relay's value.
    pub from_newer_version: bool,
}

/// An open conflict prompt: the record as it was (base), as this device has it (mine) and as
/// the relay has it (theirs), field by field, and the resolutions that will be accepted.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Conflict {
    pub conflict_id: u64,
    pub entity_type: String,
    pub entity_id: String,
    /// Why the relay refused the write (`version`, `deleted`, ...).
    pub reason: String,
    pub mutation_id: String,
    pub fields: Vec<FieldConflict>,
    pub base_json: String,
    pub mine_json: String,
    pub theirs_json: String,
    pub mine_deleted: bool,
    pub theirs_deleted: bool,
    /// Of `keep_mine`, `keep_theirs`, `merged`: each accepted when chosen.
    pub options: Vec<String>,
    pub recorded_at_ms: u64,
}

impl From<peer::ConflictRecord> for Conflict {
    fn from(c: peer::ConflictRecord) -> Self {
        let side = |s: &peer::Side| ConflictSide {
            value_json: json(&s.value),
            changed: s.changed,
        };
        Conflict {
            conflict_id: c.conflict_id,
            entity_type: c.entity_type,
            entity_id: c.entity_id.to_string(),
            reason: name_of(&c.reason),
            mutation_id: c.mutation_id.to_string(),
            fields: c
                .fields
                .iter()
                .map(|f| FieldConflict {
                    field: f.field.clone(),
                    status: name_of(&f.status),
                    base_json: json(&f.base),
                    mine: side(&f.mine),
                    theirs: side(&f.theirs),
                    from_newer_version: f.from_newer_version,
                })
                .collect(),
            base_json: json(&c.base.fields),
            mine_json: json(&c.mine.fields),
            theirs_json: json(&c.theirs.fields),
            mine_deleted: c.mine.deleted,
            theirs_deleted: c.theirs.deleted,
            options: c.options.iter().map(|o| o.to_string()).collect(),
            recorded_at_ms: c.recorded_at_ms,
        }
    }
}

/// How to settle a conflict.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum Resolution {
    /// Every field (and the tombstone) as this device had it.
    KeepMine,
    /// Every field (and the tombstone) as the relay has it.
    KeepTheirs,
    /// The relay's version with these fields replaced (`null` removes one; `_deleted: true`
    /// chooses the tombstone), validated like any write.
    Merged { fields_json: String },
}

impl Resolution {
    pub(crate) fn to_peer(&self) -> Result<peer::Resolution> {
        Ok(match self {
            Resolution::KeepMine => peer::Resolution::KeepMine,
            Resolution::KeepTheirs => peer::Resolution::KeepTheirs,
            Resolution::Merged { fields_json } => peer::Resolution::Merged(parse_fields(fields_json)?),
        })
    }
}

/// A write the relay refused for a reason other than a conflict.
#[derive(Debug, Clone, uniffi::Record)]
pub struct RejectedEdit {
    pub rejection_id: u64,
    pub entity_type: String,
    pub entity_id: String,
    pub mutation_id: String,
    /// The relay's answer (`rejected_immutable`, `rejected_locked`, `invalid`, `forbidden`).
    pub outcome: String,
    pub reason: String,
    /// The record as this device had it with the refused change: for a note, the text that
    /// was not accepted.
    pub fields_json: String,
    pub deleted: bool,
    /// `discard`, and `addendum` for an edit of a signed note.
    pub options: Vec<String>,
    pub recorded_at_ms: u64,
}

impl From<peer::RejectedEdit> for RejectedEdit {
    fn from(r: peer::RejectedEdit) -> Self {
        RejectedEdit {
            rejection_id: r.rejection_id,
            entity_type: r.entity_type,
            entity_id: r.entity_id.to_string(),
            mutation_id: r.mutation_id.to_string(),
            outcome: name_of(&r.outcome),
            reason: r.reason,
            fields_json: json(&r.fields),
            deleted: r.deleted,
            options: r.options.iter().map(|o| o.to_string()).collect(),
            recorded_at_ms: r.recorded_at_ms,
        }
    }
}

/// What discarding a rejected edit dropped.
#[derive(Debug, Clone, uniffi::Record)]
pub struct DiscardReport {
    pub entity_type: String,
    pub entity_id: String,
    pub discarded_mutations: Vec<String>,
    /// The values the discarded changes held.
    pub values_json: String,
}

impl From<backup::ExportReport> for ExportReport {
    fn from(r: backup::ExportReport) -> Self {
        ExportReport {
            file: r.file.display().to_string(),
            bytes: r.bytes,
            entities: r.entities,
            outbox_items: r.outbox_items,
        }
    }
}

impl From<backup::SignOutReport> for SignOutReport {
    fn from(r: backup::SignOutReport) -> Self {
        SignOutReport {
            device_id: r.device_id.to_string(),
            unsynced_at_sign_out: r.unsynced_at_sign_out,
            forced: r.forced,
        }
    }
}

impl From<peer::DiscardReport> for DiscardReport {
    fn from(d: peer::DiscardReport) -> Self {
        DiscardReport {
            entity_type: d.entity_type,
            entity_id: d.entity_id.to_string(),
            discarded_mutations: d.discarded.iter().map(Uuid::to_string).collect(),
            values_json: json(&d.values),
        }
    }
}

/// A last-writer-wins value of this device's that a later write overrode; `undo_lww_loss`
/// writes it again until `undo_until_ms`.
#[derive(Debug, Clone, uniffi::Record)]
pub struct LwwLoss {
    pub loss_id: u64,
    pub entity_type: String,
    pub entity_id: String,
    pub field: String,
    pub lost_value_json: String,
    pub winning_value_json: String,
    pub winner_device: String,
    pub recorded_at_ms: u64,
    pub undo_until_ms: u64,
    pub undone_at_ms: Option<u64>,
}

impl From<peer::LwwLossRecord> for LwwLoss {
    fn from(l: peer::LwwLossRecord) -> Self {
        LwwLoss {
            loss_id: l.loss_id,
            entity_type: l.loss.entity_type,
            entity_id: l.loss.entity_id.to_string(),
            field: l.loss.field,
            lost_value_json: json(&l.loss.loser_value),
            winning_value_json: json(&l.loss.winner_value),
            winner_device: l.loss.winner_device.to_string(),
            recorded_at_ms: l.recorded_at_ms,
            undo_until_ms: l.undo_until_ms,
            undone_at_ms: l.undone_at_ms,
        }
    }
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct ExportReport {
    pub file: String,
    pub bytes: u64,
    pub entities: u64,
    pub outbox_items: u64,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct SignOutReport {
    pub device_id: String,
    /// Unsynced changes that existed at sign-out (non-zero only when exported first or forced).
    pub unsynced_at_sign_out: u64,
    pub forced: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FieldsyncError;

    #[test]
    fn fields_must_be_a_json_object_and_ids_uuids() {
        assert_eq!(parse_fields(r#"{"name": "Ada"}"#).unwrap()["name"], "Ada");
        for bad in ["[1]", "\"x\"", "{", ""] {
            let err = parse_fields(bad).unwrap_err();
            assert!(matches!(err, FieldsyncError::BadArgument { .. }), "{bad}: {err}");
        }
        assert!(parse_id("not-a-uuid").is_err());
        let id = Uuid::from_u128(7);
        assert_eq!(parse_id(&format!(" {id} ")).unwrap(), id);
    }

    #[test]
    fn values_and_fields_cross_as_json_text_both_ways() {
        assert_eq!(parse_value("4").unwrap(), serde_json::json!(4));
        assert_eq!(parse_value(r#""Ada""#).unwrap(), serde_json::json!("Ada"));
        assert!(matches!(parse_value("Ada"), Err(FieldsyncError::BadArgument { .. })));
        let filter = FieldFilter {
            field: "name".into(),
            value_json: r#""Ada""#.into(),
        };
        assert_eq!(filter.to_peer().unwrap().value, serde_json::json!("Ada"));
        assert_eq!(
            json(&serde_json::json!({"name": "Ada", "n": 1})),
            r#"{"n":1,"name":"Ada"}"#
        );
        assert_eq!(json(&serde_json::Value::Null), "null");
    }

    #[test]
    fn enum_values_cross_as_their_snake_case_names() {
        assert_eq!(name_of(&fieldsync_schema::MutationKind::Create), "create");
        assert_eq!(name_of(&peer::FieldStatus::Contested), "contested");
        assert_eq!(name_of(&serde_json::json!({"applied": {"version": 3}})), "applied");
    }

    #[test]
    fn a_merged_resolution_reads_its_fields_and_refuses_what_is_not_an_object() {
        let merged = Resolution::Merged {
            fields_json: r#"{"pain_level": 4}"#.into(),
        };
        let peer::Resolution::Merged(fields) = merged.to_peer().unwrap() else {
            panic!("not merged");
        };
        assert_eq!(fields["pain_level"], 4);
        assert!(
            Resolution::Merged {
                fields_json: "4".into()
            }
            .to_peer()
            .is_err()
        );
    }
}
