//! Who owns which field, which records are possible duplicates, and which requests a service
//! supersedes (SPEC §17).
//!
//! A record of a gated type is often written by two sources that own different parts of it: a
//! phone writes a workout's notes and effort, a service imports its distance and heart rate
//! from the watch. Declaring the owner per field lets the relay refuse a write by the wrong
//! side and merge, without a prompt, concurrent writes that each touched only their own side's
//! fields. The rules themselves live here so that device and relay apply the same ones.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{EntityType, Role};
use crate::document::RootOps;

/// The class of writer that owns a field (`authority = "..."` in the schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Authority {
    /// Written by people: every role but `service`. The default in a type that declares any
    /// authority, so subjective fields need no annotation.
    User,
    /// Written by a backend service (`service` role), e.g. metrics imported from a wearable.
    Service,
    /// Both may write it; concurrent writes to it are gated as before.
    Shared,
}

impl Authority {
    pub const ALL: [Authority; 3] = [Authority::User, Authority::Service, Authority::Shared];

    pub fn as_str(self) -> &'static str {
        match self {
            Authority::User => "user",
            Authority::Service => "service",
            Authority::Shared => "shared",
        }
    }

    pub fn parse(s: &str) -> Option<Authority> {
        Authority::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The class a role writes as. `admin` is an operator: it may correct any field, so it owns
    /// none exclusively (its writes are always gated).
    pub fn of_role(role: Role) -> Option<Authority> {
        match role {
            Role::Service => Some(Authority::Service),
            Role::Admin => None,
            Role::Clinician | Role::Assistant | Role::Patient => Some(Authority::User),
        }
    }

    /// Whether a writer of this class may put a field `owner` owns: a shared field, its own,
    /// or a service field that is `provisional` (a person's value until the service writes).
    pub fn may_write(self, owner: Authority, provisional: bool) -> bool {
        owner == Authority::Shared || owner == self || (owner == Authority::Service && provisional)
    }
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `duplicates = { same = [...], near = "started_at", within_minutes = 10 }`: two live records
/// of the type in one space with equal `same` fields and `near` times at most `within_minutes`
/// apart are possibly one event logged twice (a watch import and a manual log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DuplicateKey {
    pub same: Vec<String>,
    pub near: String,
    pub within_minutes: u32,
}

/// The field the relay writes on a newly applied record that matches an existing one.
pub const DUPLICATE_OF: &str = "duplicate_of";
/// The field a merged-away record's tombstone names its survivor in.
pub const MERGED_INTO: &str = "merged_into";
/// Fields a type with `request_for` carries, written by the service that supersedes a request.
pub const SUPERSEDED_AT: &str = "superseded_at";
pub const SUPERSEDED_BY_VERSION: &str = "superseded_by_version";
pub const SUPERSEDED_NOTICE: &str = "superseded_notice";
pub const SUPERSEDED_FIELDS: [&str; 3] = [SUPERSEDED_AT, SUPERSEDED_BY_VERSION, SUPERSEDED_NOTICE];

/// Why `role` may not put a value in `key` of `ty`, or `None` when it may. The relay's flag
/// `duplicate_of` is never put by a device (a device may only clear it: dismissing), and
/// `merged_into` only by the delete that merges the record, which [`ownership_refusal`] judges.
pub fn put_refusal(ty: &EntityType, role: Role, key: &str) -> Option<String> {
    let has_duplicates = ty.duplicates.is_some();
    if has_duplicates && key == DUPLICATE_OF {
        return Some(format!(
            "`{DUPLICATE_OF}` of `{}` is set only by the relay when it finds a possible duplicate; \
             a device may only clear it (dismiss the flag)",
            ty.name
        ));
    }
    if has_duplicates && key == MERGED_INTO {
        return Some(format!(
            "`{MERGED_INTO}` of `{}` is written only by the delete that merges this record into another",
            ty.name
        ));
    }
    let class = Authority::of_role(role)?; // admin corrects any field
    let field = ty.field(key)?;
    let owner = ty.owner_of(&field.name);
    (!class.may_write(owner, field.provisional)).then(|| {
        format!(
            "`{key}` of `{}` is owned by the {owner} (authority = \"{owner}\"); role `{role}` may not write it",
            ty.name
        )
    })
}

/// Why a write whose changes do `ops` may not be accepted from `role` (the device refuses it
/// locally, the relay answers `Forbidden` with this text). Judged on every key the changes
/// touch: clearing `duplicate_of` or `merged_into` is the one write of a field nobody may put,
/// and a write that `may_merge` (a delete, or a resolution carrying a delete made offline) may
/// name the record it was merged into; the relay refuses a resolution that leaves a live record
/// naming one.
pub fn ownership_refusal(ty: &EntityType, role: Role, ops: &RootOps, may_merge: bool) -> Option<String> {
    let has_duplicates = ty.duplicates.is_some();
    for key in ops.touched() {
        let cleared_only = ops.deletes.contains(&key)
            && !ops.puts.contains(&key)
            && !ops.makes.contains_key(&key)
            && !ops.counter_puts.contains(&key)
            && !ops.increments.contains_key(&key);
        // Clearing the flag dismisses it; clearing `merged_into` goes with bringing a merged
        // record back (a conflict resolved for the side that kept it).
        if has_duplicates && (key == DUPLICATE_OF || key == MERGED_INTO) && cleared_only {
            continue;
        }
        if has_duplicates && key == MERGED_INTO && may_merge {
            continue; // whoever may delete the record may merge it
        }
        if let Some(reason) = put_refusal(ty, role, &key) {
            return Some(reason);
        }
    }
    None
}

/// Whether a write on a stale base merges without a prompt: the writer touched only fields its
/// class owns, and the versions it did not see touched none of them — except provisional fields
/// of the service, which a service write overrides (a user's manual distance stands only until
/// the wearable's arrives). `concurrent` is what the unseen versions touched. The relay's
/// duplicate flag is not a field anyone edits: a device only clears it, and two clearings (or
/// a clearing and any edit) agree, so a dismissal merges with anything and is merged with.
pub fn merges_without_prompt(
    ty: &EntityType,
    role: Role,
    touched: &BTreeSet<String>,
    concurrent: &BTreeSet<String>,
) -> bool {
    if !ty.has_authority() {
        return false;
    }
    let Some(class) = Authority::of_role(role) else {
        return false;
    };
    let is_flag = |key: &String| ty.duplicates.is_some() && key == DUPLICATE_OF;
    let dismisses = touched.iter().any(is_flag);
    let touched: BTreeSet<&String> = touched.iter().filter(|k| !is_flag(k)).collect();
    if touched.is_empty() {
        return dismisses;
    }
    let owns = |key: &str| ty.field(key).is_some_and(|_| ty.owner_of(key) == class);
    if !touched.iter().all(|k| owns(k)) {
        return false;
    }
    concurrent.iter().filter(|k| !is_flag(k)).all(|k| {
        let Some(field) = ty.field(k) else {
            return false; // a reserved key (a delete) or a field this schema does not know
        };
        match ty.owner_of(k) {
            owner if owner == class => class == Authority::Service && field.provisional,
            Authority::Shared => false,
            _ => true,
        }
    })
}

/// The fields a merge writes onto the survivor: for each field the survivor lacks, the other
/// record's value; where both hold a value, a service-owned field keeps the service's record's
/// value and a user-owned field the other record's (the manual log's) — "wearable data takes
/// precedence for objective metrics, manual log preserved for subjective data". Shared fields
/// and the duplicate bookkeeping stay the survivor's.
pub fn merged_fields(
    ty: &EntityType,
    survivor: &Map<String, Value>,
    other: &Map<String, Value>,
    survivor_is_service_record: bool,
) -> Map<String, Value> {
    let mut patch = Map::new();
    for field in ty.fields.values() {
        let name = field.name.as_str();
        if name == DUPLICATE_OF || name == MERGED_INTO {
            continue;
        }
        let Some(theirs) = other.get(name).filter(|v| !v.is_null()) else {
            continue;
        };
        let mine = survivor.get(name).filter(|v| !v.is_null());
        let take = match (mine, ty.owner_of(name)) {
            (None, _) => true,
            (Some(m), _) if m == theirs => false,
            (Some(_), Authority::Service) => !survivor_is_service_record,
            (Some(_), Authority::User) => survivor_is_service_record,
            (Some(_), Authority::Shared) => false,
        };
        if take {
            patch.insert(name.to_string(), theirs.clone());
        }
    }
    patch
}

/// Whether a record holds a value in a field only the service may write: it came from (or was
/// touched by) the service, so its service-owned values are the authoritative ones.
pub fn is_service_record(ty: &EntityType, fields: &Map<String, Value>) -> bool {
    ty.fields.values().any(|f| {
        ty.owner_of(&f.name) == Authority::Service
            && !f.provisional
            && fields.get(&f.name).is_some_and(|v| !v.is_null())
    })
}

/// A record's possible-duplicate key: the JSON of its `same` fields' values and its `near` time
/// in ms since the epoch (a date counts from its midnight UTC). `None` when the type declares no
/// key or the record lacks one of its fields (nothing to compare).
pub fn duplicate_key(ty: &EntityType, fields: &Map<String, Value>) -> Option<(String, i64)> {
    let key = ty.duplicates.as_ref()?;
    let mut same = Vec::with_capacity(key.same.len());
    for name in &key.same {
        same.push(fields.get(name).filter(|v| !v.is_null())?.clone());
    }
    let near = fields.get(&key.near)?.as_str()?;
    let at_ms = match crate::time_fmt::parse_timestamp(near) {
        Some(t) => i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()?,
        None => {
            let day = crate::time_fmt::parse_date(near)?;
            day.midnight().assume_utc().unix_timestamp() * 1000
        }
    };
    Some((Value::Array(same).to_string(), at_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Schema;
    use serde_json::json;

    fn workout() -> EntityType {
        Schema::default_schema().entity_type("workout").cloned().unwrap()
    }

    fn keys(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn puts(names: &[&str]) -> RootOps {
        RootOps {
            puts: keys(names),
            ..RootOps::default()
        }
    }

    #[test]
    fn each_side_writes_its_own_fields_and_a_provisional_one() {
        let ty = workout();
        assert_eq!(put_refusal(&ty, Role::Patient, "rpe"), None);
        assert_eq!(put_refusal(&ty, Role::Service, "avg_hr"), None);
        assert_eq!(put_refusal(&ty, Role::Service, "name"), None, "shared");
        assert_eq!(put_refusal(&ty, Role::Patient, "distance_m"), None, "provisional");
        let refused = put_refusal(&ty, Role::Patient, "avg_hr").unwrap();
        assert!(refused.contains("owned by the service"), "{refused}");
        assert!(put_refusal(&ty, Role::Service, "feeling").is_some());
        assert_eq!(
            put_refusal(&ty, Role::Admin, "avg_hr"),
            None,
            "an operator corrects any field"
        );
    }

    #[test]
    fn the_duplicate_bookkeeping_is_never_put_by_a_device() {
        let ty = workout();
        for role in [Role::Admin, Role::Service, Role::Patient] {
            assert!(put_refusal(&ty, role, DUPLICATE_OF).is_some());
            assert!(put_refusal(&ty, role, MERGED_INTO).is_some());
        }
    }

    #[test]
    fn clearing_the_flag_or_merging_by_delete_is_allowed_but_a_put_hidden_in_a_delete_is_not() {
        let ty = workout();
        let clear = RootOps {
            deletes: keys(&[DUPLICATE_OF]),
            ..RootOps::default()
        };
        assert_eq!(ownership_refusal(&ty, Role::Patient, &clear, false), None);
        assert_eq!(ownership_refusal(&ty, Role::Patient, &puts(&[MERGED_INTO]), true), None);
        assert!(ownership_refusal(&ty, Role::Patient, &puts(&[MERGED_INTO]), false).is_some());
        // A change set that both deletes and puts the flag (carried changes of a resolution)
        // still puts it.
        let both = RootOps {
            puts: keys(&[DUPLICATE_OF]),
            deletes: keys(&[DUPLICATE_OF]),
            ..RootOps::default()
        };
        assert!(ownership_refusal(&ty, Role::Patient, &both, true).is_some());
        assert!(ownership_refusal(&ty, Role::Patient, &puts(&["rpe", "avg_hr"]), false).is_some());
        assert_eq!(
            ownership_refusal(&ty, Role::Service, &puts(&["avg_hr", "name"]), false),
            None
        );
    }

    #[test]
    fn disjoint_owners_merge_and_overlapping_or_shared_fields_prompt() {
        let ty = workout();
        let merges = |role, touched: &[&str], concurrent: &[&str]| {
            merges_without_prompt(&ty, role, &keys(touched), &keys(concurrent))
        };
        assert!(merges(Role::Patient, &["rpe", "notes"], &["avg_hr", "distance_m"]));
        assert!(merges(Role::Service, &["avg_hr"], &["feeling"]));
        // The service's value overrides a person's provisional one.
        assert!(merges(Role::Service, &["distance_m"], &["distance_m"]));
        assert!(!merges(Role::Patient, &["rpe"], &["rpe"]), "the same user field twice");
        assert!(
            !merges(Role::Patient, &["distance_m"], &["avg_hr"]),
            "not the writer's own field"
        );
        assert!(!merges(Role::Patient, &["rpe"], &["name"]), "shared fields stay gated");
        assert!(
            !merges(Role::Patient, &["rpe"], &["_deleted"]),
            "a delete is never merged past"
        );
        assert!(
            !merges(Role::Admin, &["rpe"], &["avg_hr"]),
            "an operator's writes are gated"
        );
        // A dismissal agrees with anything.
        assert!(merges(Role::Patient, &[DUPLICATE_OF], &["name", DUPLICATE_OF]));
        assert!(merges(Role::Patient, &["rpe"], &[DUPLICATE_OF]));
        // A type without authority keeps gated semantics.
        let plan = Schema::default_schema().entity_type("progression").cloned().unwrap();
        assert!(!merges_without_prompt(
            &plan,
            Role::Patient,
            &keys(&["target_reps"]),
            &keys(&["effective_date"])
        ));
    }

    #[test]
    fn a_merge_takes_measurements_from_the_watch_and_feelings_from_the_manual_log() {
        let ty = workout();
        let watch = json!({"name": "Watch run", "activity_type": "run", "distance_m": 5012.5, "avg_hr": 150,
            "duplicate_of": "00000000-0000-0000-0000-000000000001"});
        let manual = json!({"name": "Morning run", "activity_type": "run", "distance_m": 5000.0, "rpe": 7.0,
            "feeling": "good"});
        let (watch, manual) = (watch.as_object().unwrap(), manual.as_object().unwrap());
        assert!(is_service_record(&ty, watch));
        assert!(
            !is_service_record(&ty, manual),
            "a provisional distance makes no service record"
        );
        let onto_watch = merged_fields(&ty, watch, manual, true);
        assert_eq!(
            onto_watch,
            json!({"rpe": 7.0, "feeling": "good"}).as_object().unwrap().clone()
        );
        let onto_manual = merged_fields(&ty, manual, watch, false);
        assert_eq!(
            onto_manual,
            json!({"distance_m": 5012.5, "avg_hr": 150})
                .as_object()
                .unwrap()
                .clone(),
            "the survivor's shared name stays; the flag is not copied"
        );
    }

    #[test]
    fn a_duplicate_key_compares_same_fields_and_a_time() {
        let ty = workout();
        let at = |s: &str| {
            json!({"activity_type": "run", "started_at": s})
                .as_object()
                .unwrap()
                .clone()
        };
        let (k1, t1) = duplicate_key(&ty, &at("2026-03-01T07:00:00Z")).unwrap();
        let (k2, t2) = duplicate_key(&ty, &at("2026-03-01T07:09:00Z")).unwrap();
        assert_eq!(k1, k2);
        assert_eq!(t2 - t1, 9 * 60 * 1000);
        let no_type = json!({"started_at": "2026-03-01T07:00:00Z"})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(duplicate_key(&ty, &no_type), None);
        let plan = Schema::default_schema().entity_type("progression").cloned().unwrap();
        assert_eq!(duplicate_key(&plan, &at("2026-03-01T07:00:00Z")), None);
    }
}
