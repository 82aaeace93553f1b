//! Validation of an entity's fields (a JSON object) against its type.
//!
//! Both sides run the same code: the device before a write commits, the relay on the merged
//! result of a mutation. It reports every error at once so that a form can mark all bad fields
//! in one pass. Whether a `ref` points at an existing entity is not decided here: only the
//! holder of the data can tell, so it adds [`Rule::Ref`] errors of its own.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::registry::{EntityType, Field, FieldKind};
use crate::time_fmt::{parse_date, parse_timestamp};

/// The rule a field broke. Stable snake_case names: apps match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Required,
    RequiredUnless,
    Type,
    Enum,
    Min,
    Max,
    MaxLength,
    Format,
    UnknownField,
    /// A reference to an entity that does not exist (in this space, of that type).
    Ref,
    /// A change the entity's type does not allow (e.g. setting a counter instead of incrementing).
    NotAllowed,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Required => "required",
            Rule::RequiredUnless => "required_unless",
            Rule::Type => "type",
            Rule::Enum => "enum",
            Rule::Min => "min",
            Rule::Max => "max",
            Rule::MaxLength => "max_length",
            Rule::Format => "format",
            Rule::UnknownField => "unknown_field",
            Rule::Ref => "ref",
            Rule::NotAllowed => "not_allowed",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One broken rule on one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub rule: Rule,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, rule: Rule, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            rule,
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.field, self.message, self.rule)
    }
}

/// All the field errors of one validation, never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "invalid: {}", parts.join("; "))
    }
}

impl EntityType {
    /// Checks `fields` (schema fields only; `null` means absent) and returns every error found.
    pub fn validate(&self, fields: &Map<String, Value>) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        for (name, value) in fields {
            match self.field(name) {
                None => errors.push(FieldError::new(
                    name,
                    Rule::UnknownField,
                    format!("`{name}` is not a field of `{}`", self.name),
                )),
                Some(_) if value.is_null() => {}
                Some(field) => check_value(field, value, &mut errors),
            }
        }
        for field in self.fields.values() {
            let present = is_present(fields, &field.name);
            if field.required && !present {
                errors.push(FieldError::new(&field.name, Rule::Required, "is required"));
            }
            if let Some(other) = &field.required_unless
                && !present
                && !is_present(fields, other)
            {
                errors.push(FieldError::new(
                    &field.name,
                    Rule::RequiredUnless,
                    format!("is required when `{other}` is absent"),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

fn is_present(fields: &Map<String, Value>, name: &str) -> bool {
    fields.get(name).is_some_and(|v| !v.is_null())
}

fn type_error(field: &Field, value: &Value, expected: &str) -> FieldError {
    FieldError::new(
        &field.name,
        Rule::Type,
        format!("expected {expected}, got {}", json_type_name(value)),
    )
}

pub(crate) fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn check_value(field: &Field, value: &Value, errors: &mut Vec<FieldError>) {
    let name = &field.name;
    match &field.kind {
        FieldKind::String { max_length } | FieldKind::Text { max_length } => match value.as_str() {
            None => errors.push(type_error(field, value, "a string")),
            Some(s) => {
                if let Some(max) = max_length {
                    let len = s.chars().count() as u64;
                    if len > *max {
                        errors.push(FieldError::new(
                            name,
                            Rule::MaxLength,
                            format!("is {len} characters long, at most {max} allowed"),
                        ));
                    }
                }
            }
        },
        FieldKind::Int { min, max } => match value.as_i64() {
            None => errors.push(type_error(field, value, "an integer")),
            Some(i) => check_range(name, i as f64, min.map(|m| m as f64), max.map(|m| m as f64), errors),
        },
        FieldKind::Counter { min } => match value.as_i64() {
            None => errors.push(type_error(field, value, "an integer counter value")),
            Some(i) => check_range(name, i as f64, min.map(|m| m as f64), None, errors),
        },
        FieldKind::Float { min, max } => match value.as_f64() {
            None => errors.push(type_error(field, value, "a number")),
            Some(x) if !x.is_finite() => errors.push(FieldError::new(name, Rule::Type, "must be a finite number")),
            Some(x) => check_range(name, x, *min, *max, errors),
        },
        FieldKind::Bool => {
            if !value.is_boolean() {
                errors.push(type_error(field, value, "true or false"));
            }
        }
        FieldKind::Timestamp => match value.as_str() {
            None => errors.push(type_error(field, value, "an RFC 3339 timestamp string")),
            Some(s) => {
                if parse_timestamp(s).is_none() {
                    errors.push(FieldError::new(
                        name,
                        Rule::Format,
                        format!("`{s}` is not an RFC 3339 timestamp such as 2026-11-22T09:30:00Z"),
                    ));
                }
            }
        },
        FieldKind::Date => match value.as_str() {
            None => errors.push(type_error(field, value, "a date string")),
            Some(s) => {
                if parse_date(s).is_none() {
                    errors.push(FieldError::new(
                        name,
                        Rule::Format,
                        format!("`{s}` is not a calendar date such as 2026-11-22"),
                    ));
                }
            }
        },
        FieldKind::Enum { values } => match value.as_str() {
            None => errors.push(type_error(field, value, "one of the enum values")),
            Some(s) => {
                if !values.iter().any(|v| v == s) {
                    errors.push(FieldError::new(
                        name,
                        Rule::Enum,
                        format!("`{s}` is not one of {}", values.join(", ")),
                    ));
                }
            }
        },
        FieldKind::Ref { to } => match value.as_str() {
            None => errors.push(type_error(field, value, &format!("the id of a `{to}`"))),
            Some(s) => {
                if Uuid::parse_str(s).is_err() {
                    errors.push(FieldError::new(
                        name,
                        Rule::Format,
                        format!("`{s}` is not an entity id (UUID) of a `{to}`"),
                    ));
                }
            }
        },
    }
}

fn check_range(name: &str, x: f64, min: Option<f64>, max: Option<f64>, errors: &mut Vec<FieldError>) {
    if let Some(m) = min
        && x < m
    {
        errors.push(FieldError::new(
            name,
            Rule::Min,
            format!("{x} is below the minimum {m}"),
        ));
    }
    if let Some(m) = max
        && x > m
    {
        errors.push(FieldError::new(
            name,
            Rule::Max,
            format!("{x} is above the maximum {m}"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::registry::Schema;

    use super::*;

    const P: &str = "6d2f2d7e-9c1b-4c1e-8a55-0b8f0f3d2a11";
    const S: &str = "0f9c8b7a-6e5d-4c3b-9a19-8f7e6d5c4b3a";
    const E: &str = "1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d";

    use crate::testkit::obj;

    fn good_examples() -> Vec<(&'static str, Value)> {
        vec![
            (
                "patient",
                json!({"name": "Ada Lovelace", "date_of_birth": "1815-12-10", "mrn": "A-1"}),
            ),
            (
                "session",
                json!({"patient_id": P, "started_at": "2026-11-22T09:30:00Z", "status": "in_progress"}),
            ),
            (
                "set",
                json!({"session_id": S, "exercise_name": "Squat", "reps": 8, "weight_kg": 60.5, "rpe": 7.5}),
            ),
            (
                "note",
                json!({"patient_id": P, "session_id": S, "body": "Knee flexion improved."}),
            ),
            (
                "assignment",
                json!({"patient_id": P, "exercise_id": E, "sets": 3, "reps": 10, "status": "active"}),
            ),
            ("role", json!({"user_name": "dana", "role": "clinician"})),
            ("vocab", json!({"term": "ROM", "definition": "Range of motion"})),
            (
                "intake_form",
                json!({"patient_id": P, "answers": "No allergies.", "locked": false}),
            ),
            ("exercise", json!({"name": "Back squat", "muscle_group": "legs"})),
            ("plan", json!({"name": "Base block", "week_start": "2026-11-23"})),
            (
                "workout",
                json!({"name": "Leg day", "started_at": "2026-11-22T18:00:00+01:00", "notes": "ok"}),
            ),
            (
                "progression",
                json!({"exercise_id": E, "target_weight_kg": 80, "target_reps": 5}),
            ),
            ("profile", json!({"display_name": "Sam"})),
            ("settings", json!({"units": "kg", "goal_race_date": "2027-04-18"})),
            ("recovery", json!({"date": "2026-11-22", "score": 71})),
            (
                "volume",
                json!({"week": "2026-11-16", "chest_sets": 0, "legs_sets": 12}),
            ),
            (
                "activity",
                json!({"kind": "run", "started_at": "2026-11-22T07:00:00Z", "distance_km": 5.2}),
            ),
            (
                "checkin",
                json!({"date": "2026-11-22", "sleep_hours": 7.5, "soreness": 3, "recovery": 8}),
            ),
            (
                "journal_entry",
                json!({"date": "2026-11-22", "pain_level": 4, "body": "Stiff morning."}),
            ),
            (
                "plan_change_request",
                json!({"plan_id": "018f0000-0000-7000-8000-000000000001", "move_to": "2026-11-24", "reason": "Travel"}),
            ),
        ]
    }

    #[test]
    fn every_default_type_accepts_a_good_example() {
        let schema = Schema::default_schema();
        let examples = good_examples();
        for t in schema.types() {
            assert!(examples.iter().any(|(n, _)| *n == t.name), "no example for {}", t.name);
        }
        for (ty, v) in examples {
            let t = schema.entity_type(ty).unwrap();
            t.validate(&obj(v)).unwrap_or_else(|e| panic!("{ty}: {e}"));
        }
    }

    fn errors_of(ty: &str, v: Value) -> Vec<FieldError> {
        Schema::default_schema()
            .entity_type(ty)
            .unwrap()
            .validate(&obj(v))
            .unwrap_err()
            .0
    }

    /// The errors of a write that may be valid (none when it is).
    fn check(ty: &str, v: Value) -> Vec<FieldError> {
        Schema::default_schema()
            .entity_type(ty)
            .unwrap()
            .validate(&obj(v))
            .err()
            .map(|e| e.0)
            .unwrap_or_default()
    }

    fn has(errors: &[FieldError], field: &str, rule: Rule) -> bool {
        errors.iter().any(|e| e.field == field && e.rule == rule)
    }

    #[test]
    fn session_without_patient_id_names_the_field() {
        let e = errors_of("session", json!({"started_at": "2026-11-22T09:30:00Z"}));
        assert!(has(&e, "patient_id", Rule::Required), "{e:?}");
    }

    #[test]
    fn set_without_exercise_id_or_name_is_refused_and_either_one_suffices() {
        let e = errors_of("set", json!({"session_id": S, "reps": 5}));
        assert!(has(&e, "exercise_name", Rule::RequiredUnless), "{e:?}");
        let schema = Schema::default_schema();
        let set = schema.entity_type("set").unwrap();
        assert!(set.validate(&obj(json!({"session_id": S, "exercise_id": E}))).is_ok());
        assert!(
            set.validate(&obj(json!({"session_id": S, "exercise_name": "Lunge"})))
                .is_ok()
        );
        let e = errors_of("set", json!({"reps": 5, "exercise_name": "x"}));
        assert!(has(&e, "session_id", Rule::Required), "{e:?}");
    }

    #[test]
    fn enum_out_of_range_wrong_type_and_unknown_field_are_all_reported_together() {
        let e = errors_of(
            "session",
            json!({"patient_id": P, "started_at": "2026-11-22T09:30:00Z", "status": "paused", "pain_before": "high", "colour": "red"}),
        );
        assert!(has(&e, "status", Rule::Enum), "{e:?}");
        assert!(has(&e, "pain_before", Rule::Type), "{e:?}");
        assert!(has(&e, "colour", Rule::UnknownField), "{e:?}");
        assert_eq!(e.len(), 3, "{e:?}");
    }

    #[test]
    fn ranges_formats_and_lengths() {
        let e = errors_of(
            "checkin",
            json!({"date": "2026-02-30", "sleep_hours": 25, "soreness": -1, "recovery": 3.5}),
        );
        assert!(has(&e, "date", Rule::Format), "{e:?}");
        assert!(has(&e, "sleep_hours", Rule::Max), "{e:?}");
        assert!(has(&e, "soreness", Rule::Min), "{e:?}");
        assert!(has(&e, "recovery", Rule::Type), "{e:?}");

        let e = errors_of(
            "set",
            json!({"session_id": "not-a-uuid", "exercise_name": "x", "rpe": 11}),
        );
        assert!(has(&e, "session_id", Rule::Format), "{e:?}");
        assert!(has(&e, "rpe", Rule::Max), "{e:?}");

        let e = errors_of("session", json!({"patient_id": P, "started_at": "yesterday"}));
        assert!(has(&e, "started_at", Rule::Format), "{e:?}");

        let e = errors_of("patient", json!({"name": "x".repeat(201)}));
        assert!(has(&e, "name", Rule::MaxLength), "{e:?}");

        let e = errors_of("intake_form", json!({"patient_id": P, "locked": "yes"}));
        assert!(has(&e, "locked", Rule::Type), "{e:?}");
    }

    #[test]
    fn values_exactly_at_a_limit_are_accepted_and_one_past_it_refused() {
        assert!(check("patient", json!({"name": "x".repeat(200)})).is_empty());
        let e = check("patient", json!({"name": "é".repeat(201)}));
        assert!(has(&e, "name", Rule::MaxLength), "characters, not bytes: {e:?}");
        assert!(check("patient", json!({"name": "é".repeat(200)})).is_empty());
        let at = |rpe: f64| check("set", json!({"session_id": E, "exercise_name": "x", "rpe": rpe}));
        assert!(at(10.0).is_empty(), "{:?}", at(10.0));
        assert!(has(&at(10.5), "rpe", Rule::Max));
        assert!(at(0.0).is_empty(), "{:?}", at(0.0));
        assert!(has(&at(-0.5), "rpe", Rule::Min));
    }

    #[test]
    fn a_type_error_names_the_json_type_it_got() {
        for (value, got) in [
            (json!(5), "got an integer"),
            (json!(-3), "got an integer"),
            (json!(u64::MAX), "got an integer"),
            (json!(5.5), "got a number"),
            (json!(true), "got a boolean"),
            (json!(["Ada"]), "got an array"),
            (json!({"first": "Ada"}), "got an object"),
        ] {
            let e = check("patient", json!({ "name": value }));
            assert!(
                e.iter()
                    .any(|e| e.rule == Rule::Type && e.message == format!("expected a string, {got}")),
                "{value}: {e:?}"
            );
        }
        let e = check("set", json!({"session_id": E, "exercise_name": "x", "reps": "ten"}));
        assert!(
            e.iter().any(|e| e.message == "expected an integer, got a string"),
            "{e:?}"
        );
    }

    #[test]
    fn rule_names_are_stable_for_apps_that_match_on_them() {
        let names: Vec<&str> = [
            Rule::Required,
            Rule::RequiredUnless,
            Rule::Type,
            Rule::Enum,
            Rule::Min,
            Rule::Max,
            Rule::MaxLength,
            Rule::Format,
            Rule::UnknownField,
            Rule::Ref,
            Rule::NotAllowed,
        ]
        .iter()
        .map(|r| r.as_str())
        .collect();
        assert_eq!(
            names,
            [
                "required",
                "required_unless",
                "type",
                "enum",
                "min",
                "max",
                "max_length",
                "format",
                "unknown_field",
                "ref",
                "not_allowed"
            ]
        );
        for r in [Rule::MaxLength, Rule::NotAllowed] {
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                json!(r.as_str()),
                "the wire name is the same"
            );
            assert_eq!(r.to_string(), r.as_str());
        }
    }

    #[test]
    fn null_means_absent() {
        let e = errors_of("patient", json!({"name": null}));
        assert!(has(&e, "name", Rule::Required), "{e:?}");
        let schema = Schema::default_schema();
        let p = schema.entity_type("patient").unwrap();
        assert!(p.validate(&obj(json!({"name": "A", "date_of_birth": null}))).is_ok());
    }

    #[test]
    fn error_messages_name_field_and_rule() {
        let e = errors_of("patient", json!({}));
        let text = ValidationErrors(e).to_string();
        assert!(text.contains("name") && text.contains("required"), "{text}");
    }
}
