//! Which schema changes a fleet of devices on mixed versions survives.
//!
//! Devices update over days or weeks, so a relay serving schema N+1 meets devices still on N,
//! and an updated device meets a relay still on N. A change is *compatible* when every write
//! valid under the old schema stays valid under the new one and every value an old device holds
//! keeps its meaning: new types, new optional fields, new enum values, widened ranges, relaxed
//! requirements, new permissions. Anything else is *breaking*: an old device would write what
//! the new relay refuses, or read a value under a meaning that changed.
//!
//! [`compare`] lists every change between two schemas with its verdict, for
//! `fieldsync-relay schema check` and for the relay's refusal to serve a breaking schema.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use super::{EntityType, Field, FieldKind, Role, Schema};

/// Whether devices on the old schema keep working against the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Compatible,
    Breaking,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Compatible => "compatible",
            Verdict::Breaking => "breaking",
        })
    }
}

/// One difference between two schemas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SchemaChange {
    /// `type`, `type.field`, or `schema_version`.
    pub location: String,
    /// What changed, in words (`"new optional field"`, `"max 10 → 5"`).
    pub change: String,
    pub verdict: Verdict,
}

/// Every change from one schema to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompatReport {
    pub from_version: u64,
    pub to_version: u64,
    pub changes: Vec<SchemaChange>,
}

impl CompatReport {
    /// Whether devices on the old schema keep working (no change is breaking).
    pub fn is_compatible(&self) -> bool {
        self.breaking().next().is_none()
    }

    pub fn breaking(&self) -> impl Iterator<Item = &SchemaChange> {
        self.changes.iter().filter(|c| c.verdict == Verdict::Breaking)
    }

    /// The report for people: one line per change, then the verdict.
    pub fn render(&self) -> String {
        let mut out = format!("schema v{} → v{}\n", self.from_version, self.to_version);
        if self.changes.is_empty() {
            out.push_str("no changes\n");
        }
        for c in &self.changes {
            out.push_str(&format!(
                "  {:<10}  {}: {}\n",
                c.verdict.to_string(),
                c.location,
                c.change
            ));
        }
        let breaking = self.breaking().count();
        if breaking == 0 {
            out.push_str("compatible: devices on the old version keep syncing\n");
        } else {
            out.push_str(&format!(
                "{breaking} breaking change{}: devices on v{} would be refused\n",
                if breaking == 1 { "" } else { "s" },
                self.from_version
            ));
        }
        out
    }
}

/// Lists every change from `old` to `new`, types and fields in name order.
pub fn compare(old: &Schema, new: &Schema) -> CompatReport {
    let mut changes = Changes::default();
    let names: BTreeSet<&str> = old.type_names().chain(new.type_names()).collect();
    for name in names {
        match (old.entity_type(name), new.entity_type(name)) {
            (Some(_), None) => changes.breaking(name, "type removed"),
            (None, Some(_)) => changes.compatible(name, "new type"),
            (Some(o), Some(n)) => compare_types(&mut changes, o, n),
            (None, None) => {}
        }
    }
    let mut changes = changes.0;
    if !changes.is_empty() && new.version() <= old.version() {
        changes.push(SchemaChange {
            location: "schema_version".into(),
            change: format!(
                "the schema changed but its version did not rise ({} → {}): devices could not tell the two apart",
                old.version(),
                new.version()
            ),
            verdict: Verdict::Breaking,
        });
    }
    CompatReport {
        from_version: old.version(),
        to_version: new.version(),
        changes,
    }
}

#[derive(Default)]
struct Changes(Vec<SchemaChange>);

impl Changes {
    fn push(&mut self, location: &str, change: impl Into<String>, verdict: Verdict) {
        self.0.push(SchemaChange {
            location: location.to_string(),
            change: change.into(),
            verdict,
        });
    }
    fn breaking(&mut self, location: &str, change: impl Into<String>) {
        self.push(location, change, Verdict::Breaking);
    }
    fn compatible(&mut self, location: &str, change: impl Into<String>) {
        self.push(location, change, Verdict::Compatible);
    }
}

fn compare_types(changes: &mut Changes, old: &EntityType, new: &EntityType) {
    let at = old.name.as_str();
    if old.policy != new.policy {
        changes.breaking(at, format!("policy {} → {}", old.policy, new.policy));
    }
    for (modifier, was, is) in [
        ("lockable", old.lockable, new.lockable),
        ("signable", old.signable, new.signable),
    ] {
        if was != is {
            changes.breaking(at, format!("{modifier} {was} → {is}"));
        }
    }
    compare_roles(changes, at, "write", &old.write_roles, &new.write_roles);
    compare_roles(changes, at, "sign", &old.sign_roles, &new.sign_roles);
    let fields: BTreeSet<&String> = old.fields.keys().chain(new.fields.keys()).collect();
    for name in fields {
        let location = format!("{at}.{name}");
        match (old.fields.get(name), new.fields.get(name)) {
            (Some(_), None) => changes.breaking(&location, "field removed"),
            (None, Some(f)) if f.required => changes.breaking(
                &location,
                "new required field (devices on the old version cannot fill it)",
            ),
            (None, Some(f)) if f.required_unless.is_some() => changes.breaking(
                &location,
                "new conditionally required field (devices on the old version cannot fill it)",
            ),
            (None, Some(_)) => changes.compatible(&location, "new optional field"),
            (Some(o), Some(n)) => compare_fields(changes, &location, o, n),
            (None, None) => {}
        }
    }
}

fn compare_roles(changes: &mut Changes, at: &str, what: &str, old: &BTreeSet<Role>, new: &BTreeSet<Role>) {
    for role in new.difference(old) {
        changes.compatible(at, format!("{role} may now {what}"));
    }
    for role in old.difference(new) {
        changes.breaking(at, format!("{role} may no longer {what}"));
    }
}

fn compare_fields(changes: &mut Changes, at: &str, old: &Field, new: &Field) {
    if old.kind.type_name() != new.kind.type_name() {
        changes.breaking(at, format!("type {} → {}", old.kind.type_name(), new.kind.type_name()));
        return;
    }
    let (was, is) = (requirement(old), requirement(new));
    if was != is {
        let words = format!("{was} → {is}");
        // Relaxing is compatible: everything an old device writes still satisfies it.
        let relaxed = matches!(
            (&was, &is),
            (_, Requirement::Optional) | (Requirement::Required, Requirement::RequiredUnless(_))
        );
        if relaxed {
            changes.compatible(at, words);
        } else {
            changes.breaking(at, words);
        }
    }
    compare_kinds(changes, at, &old.kind, &new.kind);
}

#[derive(Debug, PartialEq, Eq)]
enum Requirement<'a> {
    Optional,
    Required,
    RequiredUnless(&'a str),
}

impl fmt::Display for Requirement<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Optional => f.write_str("optional"),
            Requirement::Required => f.write_str("required"),
            Requirement::RequiredUnless(other) => write!(f, "required unless {other}"),
        }
    }
}

fn requirement(f: &Field) -> Requirement<'_> {
    match (&f.required_unless, f.required) {
        (Some(other), _) => Requirement::RequiredUnless(other),
        (None, true) => Requirement::Required,
        (None, false) => Requirement::Optional,
    }
}

/// A bound from `old` to `new`; `upper` says which way widens.
fn compare_bound<T: PartialOrd + fmt::Display>(
    changes: &mut Changes,
    at: &str,
    name: &str,
    old: Option<T>,
    new: Option<T>,
    upper: bool,
) {
    let words = |o: &Option<T>, n: &Option<T>| {
        let show = |b: &Option<T>| b.as_ref().map_or("none".to_string(), ToString::to_string);
        format!("{name} {} → {}", show(o), show(n))
    };
    let widened = match (&old, &new) {
        (None, None) => return,
        (Some(o), Some(n)) if o == n => return,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (Some(o), Some(n)) => (n > o) == upper,
    };
    if widened {
        changes.compatible(at, words(&old, &new));
    } else {
        changes.breaking(at, words(&old, &new));
    }
}

fn compare_kinds(changes: &mut Changes, at: &str, old: &FieldKind, new: &FieldKind) {
    match (old, new) {
        (FieldKind::String { max_length: o }, FieldKind::String { max_length: n })
        | (FieldKind::Text { max_length: o }, FieldKind::Text { max_length: n }) => {
            compare_bound(changes, at, "max_length", *o, *n, true);
        }
        (FieldKind::Int { min: omin, max: omax }, FieldKind::Int { min: nmin, max: nmax }) => {
            compare_bound(changes, at, "min", *omin, *nmin, false);
            compare_bound(changes, at, "max", *omax, *nmax, true);
        }
        (FieldKind::Float { min: omin, max: omax }, FieldKind::Float { min: nmin, max: nmax }) => {
            compare_bound(changes, at, "min", *omin, *nmin, false);
            compare_bound(changes, at, "max", *omax, *nmax, true);
        }
        (FieldKind::Counter { min: o }, FieldKind::Counter { min: n }) => {
            compare_bound(changes, at, "min", *o, *n, false);
        }
        (FieldKind::Enum { values: o }, FieldKind::Enum { values: n }) => {
            for v in n.iter().filter(|v| !o.contains(v)) {
                changes.compatible(at, format!("new value `{v}`"));
            }
            for v in o.iter().filter(|v| !n.contains(v)) {
                changes.breaking(at, format!("value `{v}` removed"));
            }
        }
        (FieldKind::Ref { to: o }, FieldKind::Ref { to: n }) if o != n => {
            changes.breaking(at, format!("refers to {n} instead of {o}"));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        schema_version = 1
        [types.patient]
        policy = "gated"
        write = ["admin", "clinician"]
        fields.name = { type = "string", required = true, max_length = 200 }
        fields.pain = { type = "int", min = 0, max = 10 }
        fields.weight = { type = "float", min = 0.0 }
        fields.status = { type = "enum", values = ["active", "discharged"] }
        fields.phone = { type = "string", max_length = 40 }
        [types.visit]
        policy = "gated"
        write = ["clinician"]
        fields.patient_id = { type = "ref", to = "patient", required = true }
        fields.room = { type = "string", required_unless = "patient_id" }
        [types.note]
        policy = "notes"
        signable = true
        write = ["clinician"]
        sign = ["clinician"]
        fields.body = { type = "text", max_length = 1000 }
        [types.tally]
        policy = "counter"
        write = ["clinician"]
        fields.reads = { type = "counter", min = 0 }
    "#;

    fn schema(text: &str) -> Schema {
        Schema::from_toml_str(text).unwrap()
    }

    /// Textual edits of BASE, and the one change they should report (location, words).
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);

    /// The report of changing BASE by `edits` (textual replacements) at version 2.
    fn report(edits: &[(&str, &str)]) -> CompatReport {
        let mut text = BASE.replace("schema_version = 1", "schema_version = 2");
        for (from, to) in edits {
            assert!(text.contains(from), "{from}");
            text = text.replacen(from, to, 1);
        }
        compare(&schema(BASE), &schema(&text))
    }

    fn verdicts(r: &CompatReport) -> Vec<(String, Verdict)> {
        r.changes.iter().map(|c| (c.location.clone(), c.verdict)).collect()
    }

    fn one(r: &CompatReport) -> (&str, Verdict) {
        assert_eq!(r.changes.len(), 1, "{r:#?}");
        (r.changes[0].location.as_str(), r.changes[0].verdict)
    }

    use Verdict::{Breaking, Compatible};

    #[test]
    fn an_unchanged_schema_has_no_changes_and_is_compatible() {
        let r = compare(&schema(BASE), &schema(BASE));
        assert!(r.changes.is_empty() && r.is_compatible(), "{r:?}");
    }

    #[test]
    fn the_additive_changes_people_make_are_compatible() {
        let cases: &[Case] = &[
            (
                &[(
                    "[types.note]",
                    "[types.plan]\npolicy = \"lww\"\nwrite = [\"service\"]\nfields.week = { type = \"int\" }\n[types.note]",
                )],
                "plan",
                "new type",
            ),
            (
                &[("fields.phone =", "fields.email = { type = \"string\" }\nfields.phone =")],
                "patient.email",
                "new optional field",
            ),
            (
                &[("\"discharged\"]", "\"discharged\", \"paused\"]")],
                "patient.status",
                "new value `paused`",
            ),
            (&[("max = 10", "max = 20")], "patient.pain", "max 10 → 20"),
            (
                &[("min = 0, max = 10", "min = -5, max = 10")],
                "patient.pain",
                "min 0 → -5",
            ),
            (
                &[("max_length = 40", "max_length = 80")],
                "patient.phone",
                "max_length 40 → 80",
            ),
            (&[(", max_length = 40", "")], "patient.phone", "max_length 40 → none"),
            (
                &[("type = \"float\", min = 0.0", "type = \"float\"")],
                "patient.weight",
                "min 0 → none",
            ),
            (
                &[("required = true, max_length = 200", "max_length = 200")],
                "patient.name",
                "required → optional",
            ),
            (
                &[(
                    "write = [\"admin\", \"clinician\"]",
                    "write = [\"admin\", \"clinician\", \"assistant\"]",
                )],
                "patient",
                "assistant may now write",
            ),
            (
                &[("type = \"counter\", min = 0", "type = \"counter\"")],
                "tally.reads",
                "min 0 → none",
            ),
            (
                &[("type = \"text\", max_length = 1000", "type = \"text\"")],
                "note.body",
                "max_length 1000 → none",
            ),
        ];
        for (edits, location, change) in cases {
            let r = report(edits);
            assert_eq!(one(&r), (*location, Compatible), "{edits:?}");
            assert_eq!(r.changes[0].change, *change);
            assert!(r.is_compatible());
        }
    }

    #[test]
    fn every_change_an_old_device_would_trip_on_is_breaking() {
        let cases: &[Case] = &[
            (
                &[("fields.phone = { type = \"string\", max_length = 40 }", "")],
                "patient.phone",
                "field removed",
            ),
            (
                &[(
                    "fields.phone = { type = \"string\", max_length = 40 }",
                    "fields.phone = { type = \"int\" }",
                )],
                "patient.phone",
                "type string → int",
            ),
            (
                &[(
                    "fields.phone =",
                    "fields.mrn = { type = \"string\", required = true }\nfields.phone =",
                )],
                "patient.mrn",
                "new required field",
            ),
            (
                &[(
                    "fields.phone =",
                    "fields.mrn = { type = \"string\", required_unless = \"phone\" }\nfields.phone =",
                )],
                "patient.mrn",
                "new conditionally required field",
            ),
            (&[("max = 10", "max = 5")], "patient.pain", "max 10 → 5"),
            (
                &[("min = 0, max = 10", "min = 1, max = 10")],
                "patient.pain",
                "min 0 → 1",
            ),
            (
                &[("max_length = 40", "max_length = 20")],
                "patient.phone",
                "max_length 40 → 20",
            ),
            (
                &[(", \"discharged\"]", "]")],
                "patient.status",
                "value `discharged` removed",
            ),
            (
                &[(
                    "fields.phone = { type = \"string\", max_length = 40 }",
                    "fields.phone = { type = \"string\", max_length = 40, required = true }",
                )],
                "patient.phone",
                "optional → required",
            ),
            (
                &[(
                    "policy = \"gated\"\n        write = [\"admin\"",
                    "policy = \"lww\"\n        write = [\"admin\"",
                )],
                "patient",
                "policy gated → lww",
            ),
            (
                &[(
                    "signable = true\n",
                    "signable = true\n        lockable = true\n        fields.locked = { type = \"bool\" }\n",
                )],
                "note",
                "lockable false → true",
            ),
            (
                &[("write = [\"admin\", \"clinician\"]", "write = [\"admin\"]")],
                "patient",
                "clinician may no longer write",
            ),
            (
                &[("to = \"patient\"", "to = \"note\"")],
                "visit.patient_id",
                "refers to note instead of patient",
            ),
            (
                &[(
                    "[types.visit]\n        policy = \"gated\"\n        write = [\"clinician\"]\n        fields.patient_id = { type = \"ref\", to = \"patient\", required = true }\n        fields.room = { type = \"string\", required_unless = \"patient_id\" }",
                    "",
                )],
                "visit",
                "type removed",
            ),
        ];
        for (edits, location, change) in cases {
            let r = report(edits);
            let found = r
                .changes
                .iter()
                .find(|c| c.location == *location && c.change.starts_with(change));
            assert_eq!(found.map(|c| c.verdict), Some(Breaking), "{edits:?}: {r:#?}");
            assert!(!r.is_compatible());
            // Nothing else is reported, apart from a field the edit had to add.
            assert!(
                r.changes.iter().filter(|c| c.verdict == Breaking).count() == 1,
                "{r:#?}"
            );
        }
    }

    #[test]
    fn a_requirement_may_be_relaxed_but_not_tightened_or_moved() {
        let room = "fields.room = { type = \"string\", required_unless = \"patient_id\" }";
        let cases = [
            (
                room,
                "fields.room = { type = \"string\" }",
                "required unless patient_id → optional",
                Compatible,
            ),
            (
                room,
                "fields.room = { type = \"string\", required = true }",
                "required unless patient_id → required",
                Breaking,
            ),
            (
                room,
                "fields.room = { type = \"string\", required_unless = \"room\" }",
                "required unless patient_id → required unless room",
                Breaking,
            ),
            (
                "fields.name = { type = \"string\", required = true, max_length = 200 }",
                "fields.name = { type = \"string\", required_unless = \"phone\", max_length = 200 }",
                "required → required unless phone",
                Compatible,
            ),
            (
                "fields.phone = { type = \"string\", max_length = 40 }",
                "fields.phone = { type = \"string\", max_length = 40, required_unless = \"name\" }",
                "optional → required unless name",
                Breaking,
            ),
        ];
        for (from, to, words, verdict) in cases {
            let r = report(&[(from, to)]);
            assert_eq!(one(&r).1, verdict, "{to}");
            assert_eq!(r.changes[0].change, words);
        }
    }

    #[test]
    fn a_changed_schema_must_raise_its_version() {
        let text = BASE.replace("max = 10", "max = 20");
        let r = compare(&schema(BASE), &schema(&text));
        assert_eq!(
            verdicts(&r),
            [
                ("patient.pain".to_string(), Compatible),
                ("schema_version".to_string(), Breaking)
            ]
        );
        assert!(
            r.render().contains("1 breaking change: devices on v1 would be refused"),
            "{}",
            r.render()
        );
    }

    #[test]
    fn the_report_lists_changes_in_type_and_field_order_with_their_verdicts() {
        let r = report(&[
            ("max = 10", "max = 5"),
            ("\"discharged\"]", "\"discharged\", \"paused\"]"),
        ]);
        let text = r.render();
        assert!(text.starts_with("schema v1 → v2\n"), "{text}");
        let pain = text.find("patient.pain: max 10 → 5").unwrap();
        let status = text.find("patient.status: new value `paused`").unwrap();
        assert!(pain < status, "{text}");
        assert!(text.contains("breaking    patient.pain"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["changes"][0]["verdict"], "breaking");
        assert_eq!(json["to_version"], 2);
    }
}
